"""The experiment store's writes, committed by one background thread in batches.

Every routed request of an experiment writes (a new unit's arm, the outcome's counters, a shadow
output, feedback): run on the event loop, each commit would stall every other request whenever
the disk is slow. Writers here only enqueue; the thread commits whatever has queued up in one
transaction, so a burst costs one commit, not one per request. A batch that fails is retried
item by item, so one bad write loses only itself. Order is kept: a write that must be durable
before its caller goes on (a definition, a delete) waits for everything queued before it.

The queue is bounded: when the disk cannot keep up, enqueuing blocks (the old, synchronous
behaviour) rather than dropping counts that the statistics depend on."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger("loraplex.experiments")

Statement = tuple[str, tuple]
# Statements, or a function that builds them inside the transaction (it may read what is committed).
Work = list[Statement] | Callable[[sqlite3.Connection], list[Statement]]

MAX_QUEUED = 10_000  # writes waiting for the thread; past it, enqueuing waits
MAX_BATCH = 512  # writes committed in one transaction


@dataclass
class _Item:
    work: Work
    done: Future | None = None  # set when the caller waits for the commit
    on_done: Callable[[], None] | None = None  # runs after the commit, or after its failure
    stop: bool = field(default=False)


class StoreWriter:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, max_queued: int = MAX_QUEUED) -> None:
        self._db = db
        self._lock = lock  # the connection's lock, shared with whoever else uses it
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=max_queued)
        self._closed = False
        self._close_lock = threading.Lock()
        self.failed_writes = 0  # writes lost to errors (each logged)
        self.commits = 0  # transactions committed: fewer than writes when they batch
        self._thread = threading.Thread(target=self._run, name="experiment-writer", daemon=True)
        self._thread.start()

    def write(self, work: Work, on_done: Callable[[], None] | None = None) -> None:
        """Commit `work` soon, in order with every other write."""
        self._put(_Item(work, on_done=on_done))

    def write_and_wait(self, work: Work) -> None:
        """Commit `work` after everything queued before it; raises what the commit raised."""
        done: Future = Future()
        self._put(_Item(work, done=done))
        done.result()

    def queued(self) -> int:
        return self._queue.qsize()

    def flush(self) -> None:
        """Return once every write queued so far is committed (or has failed)."""
        self.write_and_wait([])

    def close(self) -> None:
        """Commit what is queued, then stop the thread; later writes raise."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_Item([], stop=True))
        self._thread.join()

    def _put(self, item: _Item) -> None:
        with self._close_lock:  # nothing lands behind the stop item, where no one would commit it
            if self._closed:
                raise sqlite3.ProgrammingError("the experiment store is closed")
            self._queue.put(item)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)
            if any(item.stop for item in batch):
                return

    def _commit(self, batch: list[_Item]) -> None:
        try:
            self._transaction(batch)
        except Exception as err:
            if len(batch) == 1:
                self._finish(batch[0], err)
                return
            for item in batch:  # find the one that fails; the others still land
                try:
                    self._transaction([item])
                except Exception as item_err:
                    self._finish(item, item_err)
                else:
                    self._finish(item, None)
            return
        for item in batch:
            self._finish(item, None)

    def _transaction(self, batch: list[_Item]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item in batch:
                    statements = item.work(self._db) if callable(item.work) else item.work
                    for sql, params in statements:
                        self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.commits += 1

    def _finish(self, item: _Item, error: BaseException | None) -> None:
        if error is not None:
            self.failed_writes += 1
            if item.done is None:
                log.error("an experiment write failed and is lost: %s", error)
        if item.on_done is not None:
            item.on_done()
        if item.done is not None:
            if error is None:
                item.done.set_result(None)
            else:
                item.done.set_exception(error)

