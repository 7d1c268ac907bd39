"""`fairdiff up` as a user runs it: one command, a working API, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import ROOT, fairdiff_env, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not (ROOT / "service/app.py").is_file(), reason="no gateway")]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def launch(tmp_path: Path, worker_env: dict, port: int | None = None) -> tuple[subprocess.Popen, int, Path]:
    port = port or free_port()
    env = fairdiff_env("redis://127.0.0.1:1/0", tmp_path / "data", worker_env["FAIRDIFF_BASE_MODEL"],
                       classifier=worker_env["FAIRDIFF_CLASSIFIER"])  # fmt: skip
    env.pop("FAIRDIFF_REDIS_URL")  # `up` starts its own Redis
    out = tmp_path / "up.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "up", "--port", str(port), "--ready-timeout", "150"],
        cwd=ROOT, env=env, stdout=out.open("wb"), stderr=(tmp_path / "up.err").open("wb"), start_new_session=True,
    )  # fmt: skip
    return proc, port, out


def logs(tmp_path: Path) -> str:
    return (tmp_path / "up.out").read_text() + "\n--- stderr ---\n" + (tmp_path / "up.err").read_text()[-6000:]


def test_up_serves_and_stops_everything_on_sigterm(tmp_path: Path, worker_env: dict) -> None:
    proc, port, out = launch(tmp_path, worker_env)
    try:
        wait_until(lambda: "is serving at" in out.read_text() or proc.poll() is not None, 180, "fairdiff up banner")
        assert proc.poll() is None, logs(tmp_path)
        banner = out.read_text()
        assert f"http://127.0.0.1:{port}" in banner and "curl" in banner and "Prefer: wait=30" in banner
        kids = children_of(proc.pid)
        assert len(kids) == 4, kids  # redis, two workers, gateway

        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/generate",
            data=json.dumps({"prompt": "a photo of a doctor", "num_images": 2, "steps": 3}).encode(),
            headers={"Content-Type": "application/json", "Prefer": "wait=30"},
        )
        with urllib.request.urlopen(req, timeout=40) as resp:
            body = json.loads(resp.read())
        assert body["state"] == "succeeded", body
        assert (tmp_path / "data/jobs" / body["id"] / "1.png").is_file()

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, logs(tmp_path)
        assert time.monotonic() - t0 < 45
        assert not [k for k in kids if alive(k)], "fairdiff up left children running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            for k in children_of(proc.pid):
                os.killpg(k, signal.SIGKILL)


def _post_and_wait(port: int) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/generate",
        data=json.dumps({"prompt": "a photo of a doctor", "num_images": 1, "steps": 3}).encode(),
        headers={"Content-Type": "application/json", "Prefer": "wait=60"},
    )
    with urllib.request.urlopen(req, timeout=90) as resp:
        return json.loads(resp.read())


def _stop(proc: subprocess.Popen, kids: list[int]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for k in kids:
        if alive(k):
            os.killpg(k, signal.SIGKILL)


@pytest.mark.slow
def test_up_restarts_a_child_that_dies_and_starts_again_at_once_after_a_stop(tmp_path: Path, worker_env: dict) -> None:
    proc, port, out = launch(tmp_path, worker_env)
    kids: list[int] = []
    try:
        wait_until(lambda: "is serving at" in out.read_text() or proc.poll() is not None, 180, "fairdiff up banner")
        assert proc.poll() is None, logs(tmp_path)
        assert _post_and_wait(port)["state"] == "succeeded"  # traffic, so the port has connections in TIME_WAIT
        kids = children_of(proc.pid)
        cmdlines = {k: Path(f"/proc/{k}/cmdline").read_bytes() for k in kids}
        victim = next(k for k, c in cmdlines.items() if b"-Q\x00inference" in c)
        os.killpg(victim, signal.SIGKILL)

        def restarted() -> int | None:
            for k in children_of(proc.pid):
                if k != victim and b"-Q\x00inference" in Path(f"/proc/{k}/cmdline").read_bytes():
                    return k
            return None

        new_worker = wait_until(restarted, 30, "the inference worker to be restarted")
        kids = children_of(proc.pid)
        assert proc.poll() is None and len(kids) == 4, logs(tmp_path)
        assert "restarting it" in logs(tmp_path)
        # the next request succeeds with no manual action (the new worker loads the model, then serves)
        body = _post_and_wait(port)
        assert body["state"] == "succeeded" and body["result"] is not None, body
        assert alive(new_worker)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, logs(tmp_path)
        assert not [k for k in kids if alive(k)], "children left running"
        assert not (tmp_path / "data/redis/url").exists()  # no stale pointer to a stopped Redis

        # at once, on the same port: no "port already in use" while old connections linger
        (tmp_path / "again").mkdir()
        proc, _, out = launch(tmp_path / "again", worker_env, port=port)
        wait_until(lambda: "is serving at" in out.read_text() or proc.poll() is not None, 180, "the second banner")
        assert proc.poll() is None, logs(tmp_path / "again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc, kids)


def test_supervision_restarts_with_backoff_and_gives_up_on_a_child_that_keeps_dying(tmp_path: Path) -> None:
    from common.settings import Settings
    from workers import embedded
    from workers.embedded import Launcher, LaunchError

    launcher = Launcher(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"), "127.0.0.1", free_port())
    child = launcher._spawn("flaky", [sys.executable, "-c", "import sys; sys.exit(3)"])
    steady = launcher._spawn("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.monotonic()
        delays = []
        for _ in range(embedded.MAX_QUICK_DEATHS - 1):
            child.popen.wait(timeout=10)
            launcher.supervise(now)  # notices the death, schedules the restart
            assert child.restart_at is not None
            delays.append(child.restart_at - now)
            pid = child.popen.pid
            launcher.supervise(child.restart_at)  # due: restarted
            assert child.popen.pid != pid and child.restart_at is None
            now = child.started
        assert delays == [1.0, 2.0, 4.0, 8.0]
        assert steady.alive() and steady.restart_at is None  # the others keep running
        child.popen.wait(timeout=10)
        with pytest.raises(LaunchError, match="flaky exited with 3 5 times in a row"):
            launcher.supervise(now)
    finally:
        launcher.stop_all()


def test_standalone_processes_find_the_redis_of_a_running_up(tmp_path: Path, monkeypatch) -> None:
    from common.settings import DEFAULT_REDIS_URL, Settings

    monkeypatch.delenv("FAIRDIFF_REDIS_URL", raising=False)
    assert Settings(data_dir=tmp_path).redis_url == DEFAULT_REDIS_URL
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis/url").write_text("redis://127.0.0.1:41234/0\n")
    assert Settings(data_dir=tmp_path).redis_url == "redis://127.0.0.1:41234/0"
    assert Settings(data_dir=tmp_path, redis_url="redis://elsewhere:6379/0").redis_url == "redis://elsewhere:6379/0"
    monkeypatch.setenv("FAIRDIFF_REDIS_URL", "redis://from-env:6379/1")
    assert Settings(data_dir=tmp_path).redis_url == "redis://from-env:6379/1"


def test_the_quick_start_offers_a_fairness_target_exactly_when_a_classifier_loads() -> None:
    """The launcher (torch-free) and the workers must agree; a banner that offers a target the
    workers cannot serve would answer the user's first request with an error."""
    from adaptors.readers.registry import load_classifier
    from common.settings import Settings
    from workers.embedded import banner

    cases = [("testbed", "auto"), ("/some/other/model", "auto"), ("testbed", "none")]
    for base_model, classifier in cases:
        settings = Settings(base_model=base_model, classifier=classifier)
        loads = load_classifier(classifier, base_model) is not None
        assert settings.audits_attributes is loads, (base_model, classifier)
        shown = banner("http://x", Path("/d"), settings.audits_attributes)
        assert ("fairness_target" in shown) is loads
    assert [Settings(base_model=b, classifier=c).audits_attributes for b, c in cases] == [True, False, False]


def test_up_refuses_the_default_admin_token_off_loopback(tmp_path: Path) -> None:
    from common.settings import DEFAULT_ADMIN_TOKEN, Settings
    from workers.embedded import Launcher, LaunchError

    settings = Settings(env="dev", admin_token=DEFAULT_ADMIN_TOKEN, data_dir=tmp_path)
    launcher = Launcher(settings, "0.0.0.0", free_port())
    with pytest.raises(LaunchError, match="FAIRDIFF_ADMIN_TOKEN"):
        launcher.start_all()
    assert launcher.children == []  # refused before anything started
