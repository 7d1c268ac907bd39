"""Real processes for integration tests: redis-server, Celery workers, a uvicorn gateway.

Each process writes its output to a log file; `ManagedProcess.tail()` goes into assertion
messages and `dump_logs` prints them when a test fails, so a failing integration test says
what the worker or gateway actually did. Processes run in their own process group, so
stopping one also stops anything it spawned.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"<no log for {self.name}>"
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the process and anything it started)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL, no cleanup: what the fault tests simulate (a crashed worker or machine)."""
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        return self.popen.returncode


def spawn(name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed when we close our copy below
    try:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()
    return ManagedProcess(name, popen, log_path)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.05,
    procs: list[ManagedProcess] | tuple[ManagedProcess, ...] = (),
) -> T:
    """Poll `predicate` until truthy; fail early (with logs) if one of `procs` dies."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited ({p.popen.returncode}) while waiting for {what}\n{p.tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(interval)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local test URLs
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


# -- redis ------------------------------------------------------------------------------------


def start_redis(
    port: int, dir: Path, appendonly: bool = True, log_dir: Path | None = None, timeout: float = 10.0
) -> ManagedProcess:
    """A real redis-server on 127.0.0.1:`port` keeping its files in `dir` (restartable on the same dir)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(dir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "always" if appendonly else "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
    ]
    proc = spawn(f"redis-{port}", argv, log_dir or dir)
    proc.info["url"] = f"redis://127.0.0.1:{port}/0"
    proc.info["port"] = port

    def ping() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(ping, timeout, "redis-server to answer PING", procs=[proc])
    return proc


# -- fairdiff processes ---------------------------------------------------------------------------


def fairdiff_env(redis_url: str, data_dir: Path, base_model: str, **settings: str) -> dict[str, str]:
    """Environment for a worker or gateway: the FAIRDIFF_* settings plus a quiet single-thread torch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRDIFF_")}
    env.update(
        FAIRDIFF_REDIS_URL=redis_url,
        FAIRDIFF_DATA_DIR=str(data_dir),
        FAIRDIFF_BASE_MODEL=base_model,
        FAIRDIFF_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.update({f"FAIRDIFF_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_worker(queue: str, env: Mapping[str, str], log_dir: Path, name: str | None = None) -> ManagedProcess:
    """A real `celery worker` for one queue (solo pool, one task at a time, like production)."""
    name = name or f"{queue}-{free_port()}"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        queue,
        "--pool=solo",
        "--concurrency=1",
        "-n",
        f"{name}@%h",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    proc = spawn(f"worker-{name}", argv, log_dir, env)
    proc.info["queue"] = queue
    proc.info["hostname"] = f"{name}@{socket.gethostname()}"
    return proc


def wait_worker_alive(proc: ManagedProcess, redis_url: str, timeout: float = 90.0) -> None:
    """Until the worker's heartbeat is in Redis: model loaded, warmed, consuming its queue."""
    from common.jobs import JobStore

    store = JobStore.from_url(redis_url)
    queue, hostname = proc.info["queue"], proc.info["hostname"]
    try:
        # Heartbeat names are "<node name>/<pid>" (workers/recovery.py: incarnation).
        wait_until(
            lambda: any(w.startswith(hostname + "/") for w in store.live_workers(queue)),
            timeout,
            f"{proc.name} heartbeat",
            interval=0.2,
            procs=[proc],
        )
    finally:
        store.r.close()


def start_gateway(env: Mapping[str, str], log_dir: Path, port: int | None = None, timeout: float = 30.0) -> ManagedProcess:
    """A real uvicorn serving `service.app:create_app`; waits for /healthz. `info['url']` is its base URL."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "info",
    ]
    proc = spawn(f"gateway-{port}", argv, log_dir, env)
    url = f"http://127.0.0.1:{port}"
    proc.info.update(url=url, port=port)
    wait_until(lambda: http_status(url + "/healthz") == 200, timeout, "gateway /healthz", interval=0.1, procs=[proc])
    return proc


def dump_logs(procs: list[ManagedProcess], stream: Any = None, lines: int = 80) -> None:
    """Write each process's log tail (for failing tests; pytest shows captured stderr)."""
    stream = stream or sys.stderr
    for p in procs:
        stream.write(f"\n----- {p.name} (pid {p.pid}, rc {p.popen.poll()}) -----\n{p.tail(lines)}\n")
