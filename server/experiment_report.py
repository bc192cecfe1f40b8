"""`loraplex experiment report NAME`: an experiment's figures as Markdown and a PNG of each arm's
reward (with its 95% interval) and of each arm's difference from the control (fixed-horizon and
always-valid intervals) over time. Reads a running server (`--server URL`) or the state folder
(`--state-dir DIR`, safe while the server runs: SQLite readers do not block its writer)."""

from __future__ import annotations

import argparse
import json
import math
import os
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from backbone.atomic_folder import write_atomically
from router.experiment_stats import Z_975, compare_means
from server.experiment_store import DB_NAME, ExperimentStore
from server.experiment_summary import reward_moments, summarize

MARKDOWN_FILE = "report.md"
CHART_FILE = "reward_over_time.png"


class ExperimentReportError(ValueError):
    """The experiment cannot be read from where the command was pointed."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    experiment = subparsers.add_parser("experiment", help="live A/B experiments: reports",
                                       description="Work with the server's live A/B experiments.")
    actions = experiment.add_subparsers(dest="action", metavar="ACTION", required=True)
    report = actions.add_parser("report", help="Markdown + PNG report of one experiment",
                                description="Write report.md and reward_over_time.png for one experiment.")
    report.add_argument("name", help="the experiment's name")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    source.add_argument("--state-dir", type=Path, help="the server's --state-dir (reads experiments.sqlite)")
    report.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                        help="an admin key for --server (default: $LORAPLEX_API_KEY)")
    report.add_argument("--out", type=Path, help="output folder (default: experiment-NAME)")
    report.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    if args.server:
        summary, history = _from_server(args.server, args.name, args.api_key)
    else:
        summary, history = _from_state_dir(args.state_dir, args.name)
    folder = args.out or Path(f"experiment-{args.name}")
    for path in write_report(summary, history, folder):
        print(path)
    return 0


def _from_server(url: str, name: str, api_key: str | None) -> tuple[dict, list[dict]]:
    def get(path: str) -> dict:
        request = urllib.request.Request(url.rstrip("/") + path)
        if api_key:
            request.add_header("Authorization", f"Bearer {api_key}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            detail = json.loads(err.read() or b"{}").get("error", {}).get("message", err.reason)
            raise ExperimentReportError(f"{url}{path} answered {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise ExperimentReportError(f"cannot reach --server {url}: {err.reason}; is the server running?") from None

    summary = get(f"/v1/experiments/{name}")
    return summary, get(f"/v1/experiments/{name}/history")["history"]


def _from_state_dir(state_dir: Path, name: str) -> tuple[dict, list[dict]]:
    if not (state_dir / DB_NAME).is_file():
        raise ExperimentReportError(f"--state-dir {state_dir} holds no {DB_NAME}; pass the folder given to serve --state-dir")
    store = ExperimentStore(state_dir)
    try:
        experiments = {experiment.name: experiment for experiment in store.load_all()}
        if name not in experiments:
            raise ExperimentReportError(f"no experiment {name!r} in {state_dir}; it holds {sorted(experiments) or 'none'}")
        summary = summarize(experiments[name], store.counters(name), store.latency_bins(name), store.labels(name))
        history = [{"at": at, "counters": counters} for at, counters in store.history(name)]
    finally:
        store.close()
    return summary, history


def write_report(summary: dict, history: list[dict], folder: Path) -> list[Path]:
    """Write both files atomically (temp file + rename); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown, chart = folder / MARKDOWN_FILE, folder / CHART_FILE
    write_atomically(markdown, lambda staging: staging.write_text(render_markdown(summary, CHART_FILE)))
    write_atomically(chart, lambda staging: _draw_chart(summary, history, staging))
    return [markdown, chart]


def render_markdown(summary: dict, chart_file: str) -> str:
    lines = [
        f"# Experiment `{summary['name']}`",
        "",
        f"Task `{summary['task']}`, status {summary['status']}, control arm `{summary['control']}`, unit {summary['unit']}.",
        "",
        "| arm | adapter | weight | units | requests | errors | TTFT p50 (s) | latency p50 / p95 (s) | feedback | reward mean | thumbs up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in summary["arms"]:
        lines.append(
            f"| {arm['name']} | {arm['adapter']} | {arm['weight']:g} | {arm['assignments']} | {arm['requests']} | "
            f"{arm['errors']} | {_num(arm['ttft_p50_s'])} | {_num(arm['latency_p50_s'])} / {_num(arm['latency_p95_s'])} | "
            f"{arm['feedback_count']} | {_num(arm['reward_mean'])} | {_num(arm['thumbs_up_rate'])} |"
        )
    lines += ["", "## Against the control", "",
              "| arm | metric | difference | 95% interval | p-value | always-valid 95% interval |", "|---|---|---|---|---|---|"]
    for comparison in summary["comparisons"]:
        lines.append(
            f"| {comparison['arm']} vs {comparison['vs']} | {comparison['metric']} | {_num(comparison['diff'])} | "
            f"{_interval(comparison['ci95'])} | {_num(comparison['p_value'])} | {_interval(comparison['always_valid_ci95'])} |"
        )
    srm = summary["srm"]
    verdict = "**sample ratio mismatch: the split is broken, distrust the comparisons**" if srm["flagged"] else "no sample ratio mismatch"
    lines += ["", f"Split check: {verdict} (chi-square p = {_num(srm['p_value'])}; units {srm['observed']}, "
                  f"expected {srm['expected']}).",
              "", "The always-valid interval (mSPRT) may be read at any time, as often as you like; the fixed 95% "
                  "interval and p-value hold only at one planned look.", ""]
    if summary.get("shadow"):
        shadow = summary["shadow"]
        lines += [f"Shadow adapter `{shadow['adapter']}` at rate {shadow['rate']:g}: {shadow['requests']} copies run, "
                  f"{shadow['errors']} failed, {shadow['dropped']} not sent.", ""]
    lines += [f"![reward over time]({chart_file})", ""]
    return "\n".join(lines)


def _draw_chart(summary: dict, history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, (per_arm, versus) = plt.subplots(1, 2, figsize=(11, 4))
    times = [datetime.fromtimestamp(point["at"], tz=timezone.utc) for point in history]
    control = summary["control"]
    for arm in summary["arms"]:
        series = [reward_moments(point["counters"].get(arm["name"], {})) for point in history]
        means = [m.mean if m.count else math.nan for m in series]
        half = [Z_975 * math.sqrt(m.variance / m.count) if m.count > 1 else math.nan for m in series]
        line, = per_arm.plot(times, means, ".-", label=arm["name"])
        per_arm.fill_between(times, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                             color=line.get_color(), alpha=0.2)
        if arm["name"] == control:
            continue
        comparisons = [compare_means(reward_moments(p["counters"].get(control, {})), reward_moments(p["counters"].get(arm["name"], {})))
                       for p in history]
        diffs = [c.diff if c else math.nan for c in comparisons]
        line, = versus.plot(times, diffs, ".-", label=f"{arm['name']} - {control}")
        for attribute, alpha in (("ci95", 0.25), ("always_valid_ci95", 0.1)):
            low = [getattr(c, attribute)[0] if c else math.nan for c in comparisons]
            high = [getattr(c, attribute)[1] if c else math.nan for c in comparisons]
            versus.fill_between(times, low, high, color=line.get_color(), alpha=alpha)
    versus.axhline(0.0, color="black", linewidth=0.8)
    per_arm.set_title("reward mean per arm (95% interval)", fontsize=9)
    versus.set_title("difference from control (dark: fixed 95%, light: always-valid)", fontsize=9)
    for axis in (per_arm, versus):
        axis.legend(fontsize=7)
        axis.tick_params(axis="x", labelrotation=30, labelsize=7)
    if not history:
        per_arm.text(0.5, 0.5, "no history yet (one snapshot a minute while feedback arrives)",
                     ha="center", transform=per_arm.transAxes, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _interval(interval: list[float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:.4g}, {interval[1]:.4g}]"
