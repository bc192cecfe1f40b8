"""How long a routed request's experiment writes hold up the caller (the event loop), when the
caller waits for each commit (as every write did before the write-behind) against when it only
queues the write (server.experiment_writer). One request's writes: the unit's arm, then the
outcome's counters and latency bins. The cases interleave in rounds on one SQLite file; medians
of the per-round totals, and their ratio. Prints JSON.

    PYTHONPATH=. .venv/bin/python bench/experiment_writes.py --requests 500 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from server.experiment_store import ExperimentStore, _increment


def one_request_writes(index: int, shares: dict[str, float]) -> list[list[tuple[str, tuple]]]:
    unit, arm = f"unit-{index}", "a" if index % 2 else "b"
    remember = [("INSERT OR IGNORE INTO units VALUES (?, ?, ?)", ("exp", unit, arm)), _increment("exp", arm, "assignments", 1)]
    remember += [_increment("exp", name, "expected_assignments", share) for name, share in shares.items()]
    outcome = [_increment("exp", arm, metric, 1) for metric in ("requests", "prompt_tokens", "completion_tokens")]
    outcome.append(("INSERT INTO latency_bins VALUES (?, ?, ?, ?, 1) ON CONFLICT DO UPDATE SET count = count + 1",
                    ("exp", arm, "total", index % 40)))
    return [remember, outcome]


def run_case(store: ExperimentStore, queued: bool, requests: int, offset: int) -> float:
    """Seconds the caller spent in the write calls for `requests` requests."""
    shares = {"a": 0.5, "b": 0.5}
    spent = 0.0
    for index in range(offset, offset + requests):
        for statements in one_request_writes(index, shares):
            started = time.perf_counter()
            if queued:
                store.writer.write(statements)
            else:
                store.writer.write_and_wait(statements)
            spent += time.perf_counter() - started
    store.flush()  # both cases end with everything committed before the next round
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = ExperimentStore(folder)
        times: dict[str, list[float]] = {"wait_for_commit": [], "queued": []}
        offset = 0
        for _ in range(args.rounds):
            for case in ("wait_for_commit", "queued"):
                times[case].append(run_case(store, case == "queued", args.requests, offset))
                offset += args.requests
        commits = store.writer.commits
        store.close()
    medians = {case: statistics.median(values) for case, values in times.items()}
    print(json.dumps({
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "caller_seconds_per_request_median": {case: value / args.requests for case, value in medians.items()},
        "caller_time_ratio_wait_over_queued": medians["wait_for_commit"] / medians["queued"],
        "writes": 2 * args.requests * args.rounds * 2,
        "commits": commits,
    }, indent=2))


if __name__ == "__main__":
    main()
