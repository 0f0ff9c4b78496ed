"""Starting and stopping the helper processes of ``medq demo`` and ``medq bench``
(Redis, a model server or the simulator, workers): each in its own process group,
all stopped whatever happens, and probed with the standard library only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

import redis
from rich.console import Console

from medq.core.errors import DemoError
from medq.state.connect import connect, is_sentinel, shown_url


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Supervisor:
    """Starts helpers in their own process groups and stops all of them, whatever happens."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Started:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as fh:
            popen = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        proc = Started(name, popen, log_path)
        self.started.append(proc)
        return proc

    def check(self) -> None:
        """Fail fast if a helper died."""
        for proc in self.started:
            code = proc.popen.poll()
            if code is not None:
                raise DemoError(f"{proc.name} exited with code {code}; its log: {proc.log_path}\n{_tail(proc.log_path)}")

    def stop_all(self, timeout_s: float = 15) -> None:
        for proc in reversed(self.started):
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in reversed(self.started):
            try:
                proc.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            # the group may still hold children (a worker's pool) after its leader left
            _signal_group(proc.popen, signal.SIGKILL)
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.started.clear()


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def answers(url: str, timeout_s: float = 2) -> bool:
    """Whether ``url`` answers a GET with 200. The standard library is enough for a
    readiness probe; no HTTP client is installed for it (the `local` extra does not
    bring httpx)."""
    try:
        with urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (URLError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(ready: Any, what: str, sup: Supervisor, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sup.check()
        if ready():
            return
        time.sleep(0.2)
    raise DemoError(f"{what} was not ready after {timeout_s:.0f}s")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same way out as Ctrl-C, so the helpers are stopped."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ensure_redis(url: str, sup: Supervisor, console: Console) -> None:
    client = connect(url, socket_connect_timeout=2)
    try:
        client.ping()
        return
    except redis.ConnectionError:
        pass
    if is_sentinel(url):
        raise DemoError(f"no Redis master answers behind the sentinels of {shown_url(url)} (MEDQ_REDIS_URL)")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise DemoError(f"Redis does not answer at {host}:{port} (MEDQ_REDIS_URL), and the demo starts Redis only on this machine")
    server = shutil.which("redis-server")
    if server is None:
        raise DemoError(
            f"Redis does not answer at {host}:{port} and redis-server is not on PATH: "
            "install Redis (apt-get install redis-server) or set MEDQ_REDIS_URL"
        )
    console.print(f"starting redis-server on {host}:{port} (nothing saved to disk)", highlight=False)
    sup.start("redis", [server, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
                        "--dir", str(sup.log_dir)], dict(os.environ))

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    _wait_until(up, "redis-server", sup, 20)
