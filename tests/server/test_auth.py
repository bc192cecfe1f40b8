"""API keys: the keys file, and the tenant matrix against a live server."""

from __future__ import annotations

import json

import httpx
import pytest

from router.task_table import TaskRoute
from server.app import ServerSettings
from server.auth import AdminRequiredError, ApiKeys, AuthConfigError, AuthenticationError
from test_http_harness import live_server, make_adapters, make_model_folder

KEYS = {
    "sk-admin-0000": {"tenant": "ops", "admin": True},
    "sk-tenant-a-1": {"tenant": "a", "tasks": ["task-a"], "adapters": ["ad-a"]},
    "sk-tenant-b-2": {"tenant": "b", "tasks": ["task-b"], "adapters": ["ad-b"]},
}


def test_keys_file_yaml_and_json(tmp_path):
    (tmp_path / "keys.json").write_text(json.dumps(KEYS))
    (tmp_path / "keys.yaml").write_text("sk-tenant-a-1: {tenant: a, tasks: [task-a], adapters: ['*']}\n")
    keys = ApiKeys.from_file(tmp_path / "keys.json")
    assert keys.authenticate("Bearer sk-admin-0000").admin
    grant = keys.authenticate("Bearer sk-tenant-a-1")
    assert grant.tenant == "a" and grant.allows_task("task-a") and not grant.allows_adapter("ad-b")
    assert ApiKeys.from_file(tmp_path / "keys.yaml").authenticate("Bearer sk-tenant-a-1").allows_adapter("anything")


@pytest.mark.parametrize("header", [None, "", "sk-admin-0000", "Basic sk-admin-0000", "Bearer ", "Bearer sk-admin-000"])
def test_missing_malformed_or_unknown_key_refused(header):
    with pytest.raises(AuthenticationError, match="Authorization: Bearer|invalid API key"):
        ApiKeys.from_mapping(KEYS).authenticate(header)


def test_non_admin_cannot_admin():
    with pytest.raises(AdminRequiredError, match="admin: true"):
        ApiKeys.from_mapping(KEYS).authenticate("Bearer sk-tenant-a-1").require_admin()


@pytest.mark.parametrize(
    "raw, words",
    [
        ([], "must map"),
        ({"short": {}}, "shorter than 8"),
        ({"sk-long-enough": {"tenant": "x", "role": "root"}}, "unknown field"),
        ({"sk-long-enough": {"admin": "yes"}}, "true or false"),
        ({"sk-long-enough": {"tasks": [1]}}, "list of names"),
    ],
)
def test_bad_keys_config_names_the_problem(raw, words):
    with pytest.raises(AuthConfigError, match=words):
        ApiKeys.from_mapping(raw)


def test_unreadable_keys_file(tmp_path):
    with pytest.raises(AuthConfigError, match="--api-keys"):
        ApiKeys.from_file(tmp_path / "absent.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AuthConfigError, match="not valid JSON"):
        ApiKeys.from_file(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http_auth")
    model_dir = make_model_folder(tmp / "tiny")
    root = tmp / "adapters"
    paths = make_adapters(model_dir, root, {"ad-a": 1, "ad-b": 2})
    settings = ServerSettings(
        model=str(model_dir),
        adapters={name: str(path) for name, path in paths.items()},
        tasks={"task-a": TaskRoute.single("ad-a"), "task-b": TaskRoute.single("ad-b")},
        api_keys=ApiKeys.from_mapping(KEYS),
        adapter_roots=[str(root)],
    )
    with live_server(settings) as server:
        yield server


def call(server, key, method="POST", path="/v1/completions", json_body=None, headers=None):
    all_headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        return http.request(method, path, json=json_body, headers=all_headers)


def completion(model, **extra):
    return {"model": model, "prompt": "hi", "max_tokens": 2, **extra}


def test_missing_or_unknown_key_is_401(secured):
    for key in (None, "sk-nobody-999"):
        response = call(secured, key, json_body=completion("tiny"))
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"


def test_tenant_matrix(secured):
    a = "sk-tenant-a-1"
    assert call(secured, a, json_body=completion("tiny")).status_code == 200  # every key may use the base
    assert call(secured, a, json_body=completion("ad-a")).headers["x-adapter"] == "ad-a@1"
    assert call(secured, a, json_body=completion("task-a")).headers["x-adapter"] == "ad-a@1"
    assert call(secured, a, json_body=completion("tiny"), headers={"X-Task-Id": "task-a"}).status_code == 200
    # Another tenant's adapter or task, and names that do not exist, are refused alike (403).
    for model in ("ad-b", "task-b", "no-such-adapter"):
        refused = call(secured, a, json_body=completion(model))
        assert refused.status_code == 403, model
        assert refused.json()["error"]["message"] == f"this API key may not use model {model!r}; ask an administrator to grant it"
    for task in ("task-b", "no-such-task"):
        assert call(secured, a, json_body=completion("tiny"), headers={"X-Task-Id": task}).status_code == 403
    assert call(secured, "sk-tenant-b-2", json_body=completion("ad-b")).status_code == 200


def test_listings_are_filtered_per_tenant(secured):
    models = call(secured, "sk-tenant-a-1", "GET", "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny", "ad-a"]
    tasks = call(secured, "sk-tenant-a-1", "GET", "/v1/tasks").json()["data"]
    assert [t["task"] for t in tasks] == ["task-a"]
    assert call(secured, "sk-tenant-a-1", "GET", "/v1/tasks/task-b").status_code == 403
    assert len(call(secured, "sk-admin-0000", "GET", "/v1/models").json()["data"]) == 3


def test_admin_endpoints_need_admin(secured):
    load = {"lora_name": "ad-c", "lora_path": "ad-a"}
    for key in ("sk-tenant-a-1", "sk-tenant-b-2"):
        assert call(secured, key, path="/v1/load_lora_adapter", json_body=load).status_code == 403
        assert call(secured, key, "PUT", "/v1/tasks/task-a", json_body={"adapter": "ad-b"}).status_code == 403
        assert call(secured, key, path="/v1/unload_lora_adapter", json_body={"lora_name": "ad-a"}).status_code == 403
    assert call(secured, None, path="/v1/load_lora_adapter", json_body=load).status_code == 401
    assert call(secured, "sk-admin-0000", path="/v1/load_lora_adapter", json_body=load).status_code == 200
    assert call(secured, "sk-admin-0000", "PUT", "/v1/tasks/task-c", json_body={"adapter": "ad-c"}).status_code == 200


def test_health_needs_no_key_but_metrics_and_openapi_do(secured):
    assert call(secured, None, "GET", "/health").status_code == 200
    assert call(secured, None, "GET", "/ready").status_code == 200
    for path in ("/metrics", "/openapi.json"):
        refused = call(secured, None, "GET", path)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", path
        assert call(secured, "sk-nobody-999", "GET", path).status_code == 401, path
    scraped = call(secured, "sk-tenant-a-1", "GET", "/metrics")
    assert scraped.status_code == 200 and "loraplex_requests" in scraped.text
    assert call(secured, "sk-tenant-a-1", "GET", "/openapi.json").json()["info"]["title"] == "loraplex"
