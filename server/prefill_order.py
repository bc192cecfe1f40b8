"""Which prefilling rows take this step's prefill chunk.

A tenant that had no row in the previous step (a newcomer) waits, at worst, for the step in
flight and then for its own prefill. That prefill goes alone: other tenants' prompts (a flood's
replacement rows, or the rest of its first rows' prompts) wait a step, so the newcomer's first
token does not pay for them. The precedence lasts the newcomer's first step only, so others wait
at most one step per newcomer admitted; a long prompt's later chunks go in admission order with
everyone else's.
"""

from __future__ import annotations

from server.batch_state import Row


def prefill_groups(rows: list[Row]) -> list[list[Row]]:
    """The prefilling rows in groups, in order of precedence: a step prefills the first group that
    can take a chunk now (a newcomer may be waiting for a prefix another row is computing)."""
    prefilling = [row for row in rows if row.prefilling]
    first = [row for row in prefilling if row.newcomer]
    rest = [row for row in prefilling if not row.newcomer]
    return [group for group in (first, rest) if group]
