"""API keys: who is calling (tenant) and what they may use (tasks, adapters, admin endpoints).

The keys file (YAML or JSON) maps each key to its grant:

    sk-team-a: {tenant: team-a, tasks: [summarize], adapters: [summarize-v2], admin: false}
    sk-ops:    {tenant: ops, admin: true}
    sk-batch:  {tenant: batch, tasks: ["*"], max_running: 2, max_queued: 50}

`"*"` in a list allows every name. `max_running` / `max_queued` cap the tenant's rows and waiting
requests (server.fair_queue); without them a tenant gets the server's per-tenant defaults. A grant without `tasks`/`adapters` allows none of them,
except on admin keys, which default to all. Every key may use the base model."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class AuthConfigError(ValueError):
    """The API keys file is malformed."""


class AuthenticationError(PermissionError):
    """No key, or a key we do not know (401)."""


class AdminRequiredError(PermissionError):
    """The key is valid but not an admin key (403)."""


@dataclass(frozen=True)
class Grant:
    tenant: str
    tasks: frozenset[str]
    adapters: frozenset[str]
    admin: bool = False
    max_running: int | None = None  # None = the server's per-tenant default
    max_queued: int | None = None

    def allows_task(self, task: str) -> bool:
        return "*" in self.tasks or task in self.tasks

    def allows_adapter(self, adapter: str) -> bool:
        return "*" in self.adapters or adapter in self.adapters

    def require_admin(self) -> None:
        if not self.admin:
            raise AdminRequiredError(
                f"tenant {self.tenant!r} may not call admin endpoints; use a key with admin: true"
            )


# With no keys file the server is open (like vLLM without --api-key): bind it to loopback.
OPEN_GRANT = Grant(tenant="default", tasks=frozenset({"*"}), adapters=frozenset({"*"}), admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, grants: dict[str, Grant]) -> None:
        # Digests of equal length let compare_digest run in time independent of the key.
        self._grants = [(_digest(key), grant) for key, grant in grants.items()]

    def __len__(self) -> int:
        return len(self._grants)

    def tenant_limits(self) -> dict[str, tuple[int | None, int | None]]:
        """(max_running, max_queued) per tenant whose key sets either; keys of one tenant must agree."""
        limits: dict[str, tuple[int | None, int | None]] = {}
        for _, grant in self._grants:
            wanted = (grant.max_running, grant.max_queued)
            if wanted == (None, None):
                continue
            if limits.setdefault(grant.tenant, wanted) != wanted:
                raise AuthConfigError(
                    f"the keys of tenant {grant.tenant!r} set different max_running/max_queued; give them the same limits"
                )
        return limits

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "api keys") -> "ApiKeys":
        if not isinstance(raw, dict) or not raw:
            raise AuthConfigError(f"{source} must map each API key to {{tenant, tasks, adapters, admin}}")
        grants = {}
        for key, entry in raw.items():
            if not isinstance(key, str) or len(key) < 8:
                raise AuthConfigError(f"{source}: API key {str(key)[:4]!r}... is shorter than 8 characters; use a long random key")
            entry = entry or {}
            if not isinstance(entry, dict):
                raise AuthConfigError(f"{source}: the grant of key {key[:4]}... must be a mapping")
            unknown = set(entry) - GRANT_FIELDS
            if unknown:
                raise AuthConfigError(
                    f"{source}: key {key[:4]}... has unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(GRANT_FIELDS))}"
                )
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise AuthConfigError(f"{source}: key {key[:4]}...: admin must be true or false, got {admin!r}")
            default = ["*"] if admin else []
            grants[key] = Grant(
                tenant=str(entry.get("tenant", key[:4] + "...")),
                tasks=_names(entry.get("tasks", default), source, "tasks"),
                adapters=_names(entry.get("adapters", default), source, "adapters"),
                admin=admin,
                max_running=_limit(entry.get("max_running"), source, key, "max_running"),
                max_queued=_limit(entry.get("max_queued"), source, key, "max_queued"),
            )
        return cls(grants)

    @classmethod
    def from_file(cls, path: str | Path) -> "ApiKeys":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise AuthConfigError(f"cannot read API keys file {path}: {err.strerror}; check --api-keys") from None
        try:
            raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise AuthConfigError(f"API keys file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
        return cls.from_mapping(raw, source=str(path))

    def authenticate(self, authorization: str | None) -> Grant:
        """The grant of the `Authorization: Bearer KEY` header; checks every key so the time taken
        does not reveal which (or whether any) key matched a prefix."""
        if not authorization:
            raise AuthenticationError("missing API key; send the header Authorization: Bearer YOUR_KEY")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("malformed Authorization header; send Authorization: Bearer YOUR_KEY")
        digest = _digest(key.strip())
        found = None
        for known, grant in self._grants:
            if hmac.compare_digest(known, digest):
                found = grant
        if found is None:
            raise AuthenticationError("invalid API key; check the key or ask an administrator for one")
        return found


GRANT_FIELDS = {"tenant", "tasks", "adapters", "admin", "max_running", "max_queued"}


def _limit(value: Any, source: str, key: str, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AuthConfigError(f"{source}: key {key[:4]}...: {field} must be an integer >= 1, got {value!r}")
    return value


def _names(value: Any, source: str, field: str) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthConfigError(f"{source}: {field} must be a list of names (or \"*\"), got {value!r}")
    return frozenset(value)
