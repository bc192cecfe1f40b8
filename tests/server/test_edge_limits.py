"""The edge against a live server: connections that never finish their headers are closed, a
body that does not arrive in time is answered 408 and its connection closed, even for a client
with a valid key, and past the concurrency limit requests get 503 at once instead of piling up."""

from __future__ import annotations

import socket

import httpx
import pytest

from server.app import ServerSettings
from server.auth import ApiKeys
from test_http_harness import live_server, make_model_folder


KEY = "sk-tenant-a-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_model_folder(tmp_path_factory.mktemp("edge") / "tiny")
    settings = ServerSettings(
        model=str(model_dir), api_keys=ApiKeys.from_mapping({KEY: {"tenant": "a", "tasks": ["*"]}}),
        header_timeout=3, body_timeout=2, keep_alive_timeout=3, limit_concurrency=3,
    )  # fmt: skip
    with live_server(settings) as live:
        yield live


def _closed_by_server(connection: socket.socket) -> bool:
    """True once the server closes the connection; a socket timeout (20 s) means it never did."""
    try:
        return connection.recv(1024) == b""
    except socket.timeout:
        return False


def _read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (a socket timeout fails the test)."""
    chunks = []
    while chunk := connection.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_half_sent_header_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _closed_by_server(connection)


def test_keyed_client_stalling_its_body_gets_408_and_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as connection:
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"model\": \"tiny\", \"prompt\": "
        )  # half the promised body, then nothing
        reply = _read_until_closed(connection)  # headers and body may come in separate packets
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert b"body_timeout" in reply and b"connection: close" in reply.lower()
    with httpx.Client(base_url=server.base_url, timeout=20, headers={"Authorization": f"Bearer {KEY}"}) as http:
        whole = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert whole.status_code == 200, whole.text  # a body sent at once is unaffected


def test_silent_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as connection:
        assert _closed_by_server(connection)


def test_over_concurrency_limit_is_503(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=20) for _ in range(2)]
    try:
        with httpx.Client(base_url=server.base_url, timeout=20) as http:
            assert http.get("/health").status_code == 503
    finally:
        for connection in idle:
            connection.close()
    with httpx.Client(base_url=server.base_url, timeout=20) as http:
        assert http.get("/health").status_code == 200
