"""A/B arms: a deterministic choice per user, so one user always sees the same arm."""

from __future__ import annotations

import hashlib

from router.task_table import TaskRoute


def bucket(task: str, user_key: str) -> float:
    """A uniform number in [0, 1) fixed by (task, user); the task salts it so a user's arm in one
    experiment does not predict their arm in another."""
    digest = hashlib.sha256(f"{task}\x00{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_arm(task: str, route: TaskRoute, user_key: str) -> str:
    """The arm of `route` that serves `user_key`, with probability proportional to its weight."""
    if not route.is_ab:
        return route.arms[0][0]
    total = sum(weight for _, weight in route.arms)
    point = bucket(task, user_key) * total
    for adapter, weight in route.arms:
        point -= weight
        if point < 0:
            return adapter
    return route.arms[-1][0]  # float rounding at the very top of the range
