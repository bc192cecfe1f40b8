"""Experiment definitions and consistent assignment of units to arms (DESIGN decision 10).

A unit key (a user, or a request) hashes into one of BUCKETS buckets, salted by the experiment's
name; each bucket belongs to one arm. Re-weighting hands over only as many buckets as the new
weights demand, from the arms that shrink to the arms that grow, so a unit changes arm only if
its bucket had to move. The server also remembers each unit's first arm, so a unit seen before a
re-weighting keeps its arm whatever its bucket says now."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

from router.adapter_registry import split_reference
from router.task_table import TaskTableError, check_name

BUCKETS = 10_000  # assignment granularity: weights are honoured to 0.01%
UNIT_KINDS = ("user", "request")  # "user": the `user` field or X-User-Id, else the request id
STATUSES = ("running", "stopped")


class ExperimentError(ValueError):
    """An experiment definition is malformed."""


@dataclass(frozen=True)
class Arm:
    name: str
    adapter: str  # "name" = the adapter's latest version; "name@7" = exactly version 7 (as X-Adapter says)
    weight: float


@dataclass(frozen=True)
class Shadow:
    adapter: str
    rate: float  # the share of live requests mirrored to the shadow adapter


@dataclass(frozen=True)
class Experiment:
    name: str
    task: str
    arms: tuple[Arm, ...]
    control: str
    unit: str = "user"
    shadow: Shadow | None = None
    status: str = "running"
    start_at: float | None = None  # unix time it starts routing (None = at once)
    stop_at: float | None = None  # unix time it stops routing (None = when stopped or deleted)
    # bucket -> index into `arms`; filled by `with_buckets`
    buckets: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def running(self) -> bool:
        """Switched on (it holds its task), whether or not its time window is open."""
        return self.status == "running"

    def routes_at(self, now: float) -> bool:
        """Switched on and inside its start/stop window: it routes its task's requests now."""
        started = self.start_at is None or now >= self.start_at
        return self.running and started and (self.stop_at is None or now < self.stop_at)

    @property
    def adapters(self) -> list[str]:
        """The adapter references of the arms and the shadow, as written ("name" or "name@7")."""
        shadow = [self.shadow.adapter] if self.shadow else []
        return [arm.adapter for arm in self.arms] + shadow

    @property
    def pinned_versions(self) -> list[str]:
        """The distinct "name@version" references: the server keeps those versions registered."""
        return sorted({adapter for adapter in self.adapters if "@" in adapter})

    def arm(self, name: str) -> Arm | None:
        return next((arm for arm in self.arms if arm.name == name), None)

    def shares(self) -> dict[str, float]:
        total = sum(arm.weight for arm in self.arms)
        return {arm.name: arm.weight / total for arm in self.arms}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "arms": [{"name": arm.name, "adapter": arm.adapter, "weight": arm.weight} for arm in self.arms],
            "control": self.control,
            "unit": self.unit,
            "shadow": {"adapter": self.shadow.adapter, "rate": self.shadow.rate} if self.shadow else None,
            "status": self.status,
            "start_at": self.start_at,
            "stop_at": self.stop_at,
        }


def experiment_from_json(name: str, body: object) -> Experiment:
    """Validate a PUT body (or a config-file entry); errors name the field and the fix."""
    check_name(name, "experiment")
    if not isinstance(body, dict):
        raise ExperimentError(f"experiment {name!r} must be an object with task, arms and control")
    unknown = sorted(set(body) - {"name", "task", "arms", "control", "unit", "shadow", "status", "start_at", "stop_at"})
    if unknown:
        raise ExperimentError(f"experiment {name!r}: unknown field(s) {unknown}")
    task = check_name(body.get("task"), "task")
    raw_arms = body.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ExperimentError('arms must be a non-empty list of {"name", "adapter", "weight"}')
    arms = []
    for raw in raw_arms:
        if not isinstance(raw, dict) or set(raw) - {"name", "adapter", "weight"}:
            raise ExperimentError(f'arm {raw!r} must be {{"name": str, "adapter": str, "weight": number}}')
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ExperimentError(f"arm {raw.get('name')!r} has weight {weight!r}; weights must be numbers >= 0")
        arms.append(Arm(check_name(raw.get("name"), "arm"), adapter_reference(raw.get("adapter"), "adapter"), float(weight)))
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ExperimentError(f"arm names must be unique, got {names}")
    total = sum(arm.weight for arm in arms)
    if not (total > 0 and math.isfinite(total)):  # an infinite sum (1e308 + 1e308) leaves no shares to split
        raise ExperimentError(f"arm weights {[arm.weight for arm in arms]} must sum to a positive number, and a finite one")
    control = body.get("control", names[0])
    if control not in names:
        raise ExperimentError(f"control {control!r} is not one of the arms {names}")
    unit = body.get("unit", "user")
    if unit not in UNIT_KINDS:
        raise ExperimentError(f"unit {unit!r} must be one of {list(UNIT_KINDS)}")
    status = body.get("status", "running")
    if status not in STATUSES:
        raise ExperimentError(f"status {status!r} must be one of {list(STATUSES)}")
    start_at, stop_at = _unix_time(body.get("start_at"), "start_at"), _unix_time(body.get("stop_at"), "stop_at")
    if start_at is not None and stop_at is not None and stop_at <= start_at:
        raise ExperimentError(f"stop_at ({stop_at}) must come after start_at ({start_at})")
    shadow = _shadow_from_json(body.get("shadow"))
    return Experiment(name, task, tuple(arms), control, unit, shadow, status, start_at, stop_at)


def _unix_time(value: object, field_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ExperimentError(f"{field_name} {value!r} must be a unix time in seconds, or null")
    return float(value)


def _shadow_from_json(raw: object) -> Shadow | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"adapter", "rate"}:
        raise ExperimentError(f'shadow {raw!r} must be {{"adapter": str, "rate": number in (0, 1]}} or null')
    rate = raw.get("rate", 1.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ExperimentError(f"shadow rate {rate!r} must be a number in (0, 1]")
    return Shadow(adapter_reference(raw.get("adapter"), "shadow adapter"), float(rate))


def adapter_reference(value: object, what: str) -> str:
    """An adapter name, or "name@version" to pin one version of it."""
    if not isinstance(value, str):
        raise ExperimentError(f"{what} {value!r} must be a string: NAME for the latest version or NAME@VERSION")
    try:
        name, _ = split_reference(value)
        check_name(name, what)
    except (ValueError, TaskTableError) as err:
        raise ExperimentError(str(err)) from None
    return value


def unit_hash(experiment: str, key: str, salt: str = "") -> int:
    """A uniform 64-bit number fixed by (experiment, key): salting by the experiment keeps a
    unit's arm in one experiment from predicting its arm in another."""
    digest = hashlib.sha256(f"{experiment}\x00{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def bucket_of(experiment: str, key: str) -> int:
    return unit_hash(experiment, key) % BUCKETS


def with_buckets(experiment: Experiment, previous: Experiment | None = None) -> Experiment:
    """`experiment` with its bucket table: the previous table where it can be kept, and the
    fewest buckets moved to meet the new weights (largest-remainder quotas)."""
    quotas = _quotas([arm.weight for arm in experiment.arms])
    index_of = {arm.name: i for i, arm in enumerate(experiment.arms)}
    owners: list[int | None] = [None] * BUCKETS
    if previous is not None and len(previous.buckets) == BUCKETS:
        for bucket, old_index in enumerate(previous.buckets):
            owners[bucket] = index_of.get(previous.arms[old_index].name)
    held = [0] * len(experiment.arms)
    for bucket, owner in enumerate(owners):
        if owner is not None:
            if held[owner] < quotas[owner]:
                held[owner] += 1
            else:
                owners[bucket] = None  # this arm shrank: the bucket is handed over
    growing = iter(i for i, quota in enumerate(quotas) for _ in range(quota - held[i]))
    table = tuple(owner if owner is not None else next(growing) for owner in owners)
    return replace(experiment, buckets=table)


def _quotas(weights: list[float]) -> list[int]:
    total = sum(weights)
    exact = [weight / total * BUCKETS for weight in weights]
    quotas = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - quotas[i], reverse=True)
    for i in by_remainder[: BUCKETS - sum(quotas)]:
        quotas[i] += 1
    return quotas


def assign(experiment: Experiment, unit_key: str) -> Arm:
    """The arm the bucket table gives `unit_key` (the server prefers a unit's remembered arm)."""
    if len(experiment.buckets) != BUCKETS:
        raise ExperimentError(f"experiment {experiment.name!r} has no bucket table; build it with with_buckets")
    return experiment.arms[experiment.buckets[bucket_of(experiment.name, unit_key)]]


def mirrors_to_shadow(experiment: Experiment, request_id: str) -> bool:
    """Whether this request is copied to the shadow adapter (a fixed draw per request id)."""
    if experiment.shadow is None:
        return False
    return unit_hash(experiment.name, request_id, salt="shadow") < experiment.shadow.rate * 2**64
