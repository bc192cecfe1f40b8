"""Rows of one micro-batch regrouped so that almost no compute goes to padding.

A micro-batch is right-padded to its longest row; rows of uneven length then spend a share of
every matmul on padding. The forward instead runs the rows in buckets of similar length, each
padded only to its own longest row and holding at most `max_padding` of padding, and the
answer positions of all buckets meet again for one LM head and one cross-entropy. Rows are
independent (causal attention never crosses rows), so each token's loss is the one the padded
batch gives; only the matmul shapes, hence the last bits of rounding, differ.

Inside a bucket the rows are ordered by task: each adapter's rows are then one slice of the
batch, which the LoRA layers run as plain matmuls on views (adapters/lora_layer.py, slot spans).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PADDING = 0.05  # the largest share of a bucket's tokens that may be padding


def length_buckets(lengths: Sequence[int], task_ids: Sequence[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Row indices grouped by length, each bucket padded (to its longest row) by at most
    `max_padding` of its size; within a bucket rows are in (task, row) order."""
    if not 0 <= max_padding < 1:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    buckets: list[list[int]] = []
    current: list[int] = []
    real = 0  # tokens of `current` without padding
    for index in order:
        longest = lengths[index]  # ascending: the newcomer is the bucket's longest row
        padded = (len(current) + 1) * longest
        if current and padded - (real + longest) > max_padding * padded:
            buckets.append(current)
            current, real = [], 0
        current.append(index)
        real += longest
    if current:
        buckets.append(current)
    return [sorted(bucket, key=lambda i: (task_ids[i], i)) for bucket in buckets]


def slot_spans(slots: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """(slot, start, stop) of each run of equal slots when every slot's rows are one run (rows
    ordered by slot), else None."""
    spans: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if spans and spans[-1][0] == slot:
            spans[-1] = (slot, spans[-1][1], row + 1)
        else:
            spans.append((slot, row, row + 1))
    if len({slot for slot, _, _ in spans}) != len(spans):
        return None
    return spans
