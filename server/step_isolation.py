"""A batch step that fails is retried without its newest rows before anyone is failed.

Sampling, stop handling and detokenization already fail only their own row (BatchRunner). What
is left is a failure of the batched forward itself, which cannot be pinned on a row: the rows
that joined last are the likeliest cause (the old ones ran fine a step ago), so the step runs
again without the newest row, then without the newest 2, 4, 8... (a few retries however large
the batch). Only the rows left out of the first retry that succeeds are failed; if even the
oldest row alone fails, all do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.batch_state import Row

log = logging.getLogger(__name__)

STEP_FAILED = "internal error; the server log has the details"


def step_isolating(
    step: Callable[[list[Row]], None],
    rows: list[Row],  # in admission order, oldest first
    fail: Callable[[Row, str], None],
) -> None:
    try:
        step(rows)
        return
    except Exception:
        log.exception("engine step failed with %d row(s); retrying without the newest", len(rows))
    left_out = 1
    while left_out < len(rows):
        kept = [row for row in rows[: len(rows) - left_out] if not row.ended]
        left_out *= 2
        try:
            step(kept)
        except Exception:
            log.exception("engine step failed again with the %d oldest row(s)", len(kept))
            continue
        kept_ids = {id(row) for row in kept}
        for row in rows:
            if id(row) not in kept_ids and not row.ended:
                fail(row, STEP_FAILED)
        return
    for row in rows:
        if not row.ended:
            fail(row, STEP_FAILED)
