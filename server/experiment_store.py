"""Experiments on disk: definitions, counters, remembered units, history and shadow outputs in one
SQLite file in the server's state folder.

SQLite because every update is a small read-modify-write that must survive a crash whole: a
transaction commits all of a request's counters or none of them, the write-ahead log keeps the
file consistent if the process dies mid-write, and the standard library ships it. Without a
state folder the store lives in memory and experiments end with the process.

Per-request writes are queued and committed off the event loop (server.experiment_writer);
definitions commit before they return, and the figures (`counters`, ...) are read after the
queued writes land, so a reader sees everything sent before it asked."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from router.experiments import Arm, Experiment, Shadow
from server.experiment_writer import StoreWriter

DB_NAME = "experiments.sqlite"
SHADOW_OUTPUTS_KEPT = 1000  # per experiment, newest first; older ones are deleted

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY, definition TEXT NOT NULL, buckets TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    experiment TEXT, arm TEXT, metric TEXT, value REAL NOT NULL, PRIMARY KEY (experiment, arm, metric))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latency_bins (
    experiment TEXT, arm TEXT, kind TEXT, bin INTEGER, count INTEGER NOT NULL,
    PRIMARY KEY (experiment, arm, kind, bin)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels (
    experiment TEXT, arm TEXT, label TEXT, count INTEGER NOT NULL, PRIMARY KEY (experiment, arm, label))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS units (
    experiment TEXT, unit TEXT, arm TEXT NOT NULL, PRIMARY KEY (experiment, unit)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (experiment TEXT, at REAL, counters TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_experiment ON history (experiment, at);
CREATE TABLE IF NOT EXISTS shadow_outputs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT, request_id TEXT, at REAL, live_arm TEXT,
    live_text TEXT, shadow_text TEXT, finish_reason TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS pins (
    experiment TEXT, adapter TEXT, content_hash TEXT NOT NULL, PRIMARY KEY (experiment, adapter)) WITHOUT ROWID;
"""
TABLES_BY_EXPERIMENT = ("experiments", "counters", "latency_bins", "labels", "units", "history", "shadow_outputs", "pins")


class ExperimentStore:
    def __init__(self, state_dir: str | Path | None) -> None:
        if state_dir is None:
            self.path = None
            target = ":memory:"
        else:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(state_dir) / DB_NAME
            target = str(self.path)
        # Writes go through one connection, committed in batches by the writer thread.
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the file whole; a crash loses at most the last commits
            self._db.executescript(SCHEMA)
        # Reads of a file use their own connection: in WAL mode they never wait for a commit. An
        # in-memory database exists only in its one connection, so reads share it.
        if self.path is not None:
            self._read_db, self._read_lock = sqlite3.connect(target, check_same_thread=False, isolation_level=None), threading.Lock()
        else:
            self._read_db, self._read_lock = self._db, self._lock
        self.writer = StoreWriter(self._db, self._lock)
        # Units remembered but not committed yet: a unit's second request must not count twice.
        self._pending_units: dict[tuple[str, str], str] = {}
        self._pending_lock = threading.Lock()

    def close(self) -> None:
        self.writer.close()  # commits what is queued
        with self._lock:
            self._db.close()
        if self._read_db is not self._db:
            with self._read_lock:
                self._read_db.close()

    def flush(self) -> None:
        """Wait until every write queued so far is committed: reads after it see them."""
        self.writer.flush()

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        """Commit now, after the writes queued before (definitions must be durable on return)."""
        self.writer.write_and_wait(statements)

    def _query(self, sql: str, params: tuple = (), fresh: bool = True) -> list[tuple]:
        """`fresh`: after the queued writes land (admin reads); else what is committed now."""
        if fresh:
            self.flush()
        with self._read_lock:
            return self._read_db.execute(sql, params).fetchall()

    # ---- definitions -----------------------------------------------------------------------

    def put(self, experiment: Experiment, pinned_hashes: dict[str, str] | None = None) -> None:
        """The definition, and the content hash of each "name@version" it pins: version numbers
        restart with the process, so a restart checks the weights, not the number."""
        self._transaction([
            ("INSERT OR REPLACE INTO experiments VALUES (?, ?, ?, ?)",
             (experiment.name, json.dumps(experiment.to_json()), json.dumps(experiment.buckets), time.time())),
            ("DELETE FROM pins WHERE experiment = ?", (experiment.name,)),
            *[("INSERT INTO pins VALUES (?, ?, ?)", (experiment.name, adapter, content_hash))
              for adapter, content_hash in (pinned_hashes or {}).items()],
        ])

    def pinned_hashes(self, experiment: str) -> dict[str, str]:
        return dict(self._query("SELECT adapter, content_hash FROM pins WHERE experiment = ?", (experiment,)))

    def load_all(self) -> list[Experiment]:
        return [_experiment(definition, buckets) for definition, buckets in self._query(
            "SELECT definition, buckets FROM experiments ORDER BY name"
        )]

    def delete(self, name: str) -> None:
        self._transaction([(f"DELETE FROM {table} WHERE {_key(table)} = ?", (name,)) for table in TABLES_BY_EXPERIMENT])
        with self._pending_lock:
            for key in [key for key in self._pending_units if key[0] == name]:
                del self._pending_units[key]

    # ---- units and counters ----------------------------------------------------------------

    def remembered_arm(self, experiment: str, unit: str) -> str | None:
        """On every routed request: what is committed, plus the units still queued (no flush)."""
        with self._pending_lock:
            pending = self._pending_units.get((experiment, unit))
        if pending is not None:
            return pending
        # A queued unit leaves the pending map only after its commit, so one of the two looks finds it.
        rows = self._query("SELECT arm FROM units WHERE experiment = ? AND unit = ?", (experiment, unit), fresh=False)
        return rows[0][0] if rows else None

    def remember_unit(self, experiment: str, unit: str, arm: str, shares: dict[str, float]) -> None:
        """A new unit: its arm, one assignment, and every arm's expected share of it (for SRM)."""
        statements = [("INSERT OR IGNORE INTO units VALUES (?, ?, ?)", (experiment, unit, arm))]
        statements.append(_increment(experiment, arm, "assignments", 1))
        statements += [_increment(experiment, name, "expected_assignments", share) for name, share in shares.items()]
        key = (experiment, unit)
        with self._pending_lock:
            self._pending_units[key] = arm

        def committed() -> None:
            with self._pending_lock:
                self._pending_units.pop(key, None)

        self.writer.write(statements, on_done=committed)

    def add(self, experiment: str, arm: str, amounts: dict[str, float], latency: dict[str, float] | None = None,
            label: str | None = None) -> None:
        statements = [_increment(experiment, arm, metric, amount) for metric, amount in amounts.items()]
        for kind, bin_index in (latency or {}).items():
            statements.append((
                "INSERT INTO latency_bins VALUES (?, ?, ?, ?, 1) ON CONFLICT DO UPDATE SET count = count + 1",
                (experiment, arm, kind, bin_index),
            ))
        if label is not None:
            statements.append((
                "INSERT INTO labels VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE SET count = count + 1",
                (experiment, arm, label),
            ))
        self.writer.write(statements)

    def counters(self, experiment: str) -> dict[str, dict[str, float]]:
        return _counters(self._query(COUNTERS_SQL, (experiment,)))

    def latency_bins(self, experiment: str) -> dict[tuple[str, str], dict[int, int]]:
        result: dict[tuple[str, str], dict[int, int]] = {}
        for arm, kind, bin_index, count in self._query(
            "SELECT arm, kind, bin, count FROM latency_bins WHERE experiment = ?", (experiment,)
        ):
            result.setdefault((arm, kind), {})[bin_index] = count
        return result

    def labels(self, experiment: str) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for arm, label, count in self._query("SELECT arm, label, count FROM labels WHERE experiment = ?", (experiment,)):
            result.setdefault(arm, {})[label] = count
        return result

    # ---- history and shadow outputs --------------------------------------------------------

    def snapshot(self, experiment: str, at: float) -> None:
        """Append the counters as they are once the writes queued before land, for the report's
        figures over time."""
        def statements(db: sqlite3.Connection) -> list[tuple[str, tuple]]:
            counters = json.dumps(_counters(db.execute(COUNTERS_SQL, (experiment,)).fetchall()))
            return [("INSERT INTO history VALUES (?, ?, ?)", (experiment, at, counters))]

        self.writer.write(statements)

    def history(self, experiment: str) -> list[tuple[float, dict[str, dict[str, float]]]]:
        rows = self._query("SELECT at, counters FROM history WHERE experiment = ? ORDER BY at", (experiment,))
        return [(at, json.loads(counters)) for at, counters in rows]

    def record_shadow(self, experiment: str, request_id: str, live_arm: str, live_text: str | None,
                      shadow_text: str, finish_reason: str, error: str | None) -> None:
        self.writer.write([
            ("INSERT INTO shadow_outputs (experiment, request_id, at, live_arm, live_text, shadow_text, finish_reason, "
             "error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
             (experiment, request_id, time.time(), live_arm, live_text, shadow_text, finish_reason, error)),
            ("DELETE FROM shadow_outputs WHERE experiment = ? AND id NOT IN (SELECT id FROM shadow_outputs "
             "WHERE experiment = ? ORDER BY id DESC LIMIT ?)", (experiment, experiment, SHADOW_OUTPUTS_KEPT)),
        ])

    def shadow_outputs(self, experiment: str, limit: int) -> list[dict]:
        rows = self._query(
            "SELECT request_id, at, live_arm, live_text, shadow_text, finish_reason, error FROM shadow_outputs "
            "WHERE experiment = ? ORDER BY id DESC LIMIT ?", (experiment, limit),
        )
        keys = ("request_id", "at", "live_arm", "live_text", "shadow_text", "finish_reason", "error")
        return [dict(zip(keys, row)) for row in rows]


COUNTERS_SQL = "SELECT arm, metric, value FROM counters WHERE experiment = ?"


def _counters(rows: list[tuple]) -> dict[str, dict[str, float]]:
    result: dict[str, dict[str, float]] = {}
    for arm, metric, value in rows:
        result.setdefault(arm, {})[metric] = value
    return result


def _key(table: str) -> str:
    return "name" if table == "experiments" else "experiment"


def _increment(experiment: str, arm: str, metric: str, amount: float) -> tuple[str, tuple]:
    return (
        "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET value = value + excluded.value",
        (experiment, arm, metric, float(amount)),
    )


def _experiment(definition: str, buckets: str) -> Experiment:
    raw = json.loads(definition)
    shadow = raw.get("shadow")
    return Experiment(
        name=raw["name"], task=raw["task"], control=raw["control"], unit=raw["unit"], status=raw["status"],
        start_at=raw.get("start_at"), stop_at=raw.get("stop_at"),
        arms=tuple(Arm(arm["name"], arm["adapter"], arm["weight"]) for arm in raw["arms"]),
        shadow=Shadow(shadow["adapter"], shadow["rate"]) if shadow else None,
        buckets=tuple(json.loads(buckets)),
    )
