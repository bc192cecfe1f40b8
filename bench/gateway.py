"""loraplex replicas behind a real nginx on this machine, configured from deploy/nginx/.

Used by bench/replicas.py and tests/deploy/: the nginx.conf they run is the shipped one, with only
the addresses, paths and (for the round-robin reference) the balancing line replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
NGINX_DIR = REPO / "deploy" / "nginx"
JS_MODULE_PLACES = ("/usr/lib/nginx/modules/ngx_http_js_module.so", "/usr/share/nginx/modules/ngx_http_js_module.so")


def find_nginx() -> tuple[str, str] | None:
    """(nginx binary, njs module) if both are installed (Debian: nginx-light, libnginx-mod-http-js)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    module = next((place for place in JS_MODULE_PLACES if os.path.exists(place)), None)
    return (binary, module) if binary and module else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen within {timeout:g} s")


@dataclass
class Replica:
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus series' samples whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if not match:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(key) == value for key, value in labels.items()):
                total += float(match.group(2))
        return total

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


def start_replica(folder: Path, serve_args: list[str], env: dict[str, str] | None = None) -> Replica:
    port = free_port()
    log_path = folder / f"replica-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *serve_args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
    )
    return Replica(port, process, log_path)


def wait_ready(replicas: list[Replica], timeout: float = 120) -> None:
    for replica in replicas:
        def up(replica: Replica = replica) -> bool:
            if replica.process.poll() is not None:
                raise RuntimeError(f"replica on port {replica.port} exited:\n{replica.log_path.read_text()[-3000:]}")
            return replica.ready()

        wait_until(up, timeout, f"replica on port {replica.port} ready")


def render_nginx_conf(
    replica_ports: list[int], listen_port: int, base_model: str, module: str, round_robin: bool = False
) -> str:
    """deploy/nginx/nginx.conf for these replicas on loopback."""
    text = (NGINX_DIR / "nginx.conf").read_text()
    text = text.replace("load_module modules/ngx_http_js_module.so;", f"load_module {module};")
    text = text.replace("js_path /etc/nginx/njs;", f"js_path {NGINX_DIR};")
    text = re.sub(r"js_var \$loraplex_base_model \S+;", f"js_var $loraplex_base_model {base_model};", text)
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in replica_ports)
    text = re.sub(r"(        server replica-\d+:8000 [^\n]*\n)+", servers + "\n", text)
    if round_robin:
        text = text.replace("hash $adapter_key consistent;", "")
    return text


@dataclass
class Nginx:
    folder: Path
    port: int
    process: subprocess.Popen
    replicas: list[Replica] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text() if path.exists() else ""


def start_nginx(folder: Path, replicas: list[Replica], base_model: str, round_robin: bool = False) -> Nginx:
    found = find_nginx()
    if found is None:
        raise RuntimeError("nginx with the njs module is not installed (Debian: nginx-light libnginx-mod-http-js)")
    binary, module = found
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(render_nginx_conf([r.port for r in replicas], port, base_model, module, round_robin))
    globals_ = f"daemon off; pid {folder / 'nginx.pid'}; error_log {folder / 'error.log'} warn;"
    process = subprocess.Popen([binary, "-p", str(folder), "-c", str(conf), "-g", globals_],
                               stdout=subprocess.DEVNULL, stderr=open(folder / "stderr.log", "w"))
    nginx = Nginx(folder, port, process, replicas)

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(folder / 'stderr.log').read_text()} {nginx.error_log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(listening, 30, "nginx listening")
    return nginx
