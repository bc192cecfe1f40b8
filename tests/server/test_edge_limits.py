"""The edge against a live server: connections that never finish their headers are closed, and
past the concurrency limit requests get 503 at once instead of piling up."""

from __future__ import annotations

import socket

import httpx
import pytest

from server.app import ServerSettings
from test_http_harness import live_server, make_model_folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_model_folder(tmp_path_factory.mktemp("edge") / "tiny")
    settings = ServerSettings(model=str(model_dir), header_timeout=3, keep_alive_timeout=3, limit_concurrency=3)
    with live_server(settings) as live:
        yield live


def _closed_by_server(connection: socket.socket) -> bool:
    """True once the server closes the connection; a socket timeout (20 s) means it never did."""
    try:
        return connection.recv(1024) == b""
    except socket.timeout:
        return False


def test_half_sent_header_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _closed_by_server(connection)


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
