"""Helpers shared by tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO / "hack" / "cluster.sh"
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Polls `check` until it returns something truthy; fails the test with `what` after `timeout` seconds."""
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
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def cluster_logs(lines: int = 40) -> str:
    return subprocess.run(["bash", str(CLUSTER_SH), "logs", str(lines)], capture_output=True, text=True).stdout
