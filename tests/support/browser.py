"""A headless browser for the playground test: Debian's chromium, driven by Playwright's Python package.

Neither fits the README's two set-up commands (pip cannot install a browser, and Playwright's own browser download
needs a CDN that CI machines need not reach), so the test finds chromium on the machine and, under CI, installs it
from Debian's registry with apt-get. Under CI a browser that cannot be had fails the test; elsewhere it skips, so a
developer without chromium still runs the rest of the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

INSTALL_TIMEOUT_S = 540  # under the suite's 600 s per-test timeout, which the fixture's setup counts against
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def in_ci() -> bool:
    """True where a missing browser must fail rather than skip (CI sets CI=true; so does .ci/run)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_chromium() -> str | None:
    """FAIRDIFF_CHROMIUM, else chromium on the PATH (Debian's package installs /usr/bin/chromium)."""
    named = os.environ.get("FAIRDIFF_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def install_chromium() -> str:
    """apt-get install chromium (refreshing the package lists if the first try fails); the executable's path.

    Raises RuntimeError with apt's output when it cannot: no apt-get, no root and no password-less sudo, no registry.
    """
    if shutil.which("apt-get") is None:
        raise RuntimeError("no chromium and no apt-get to install it: install chromium and set FAIRDIFF_CHROMIUM")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, **APT_ENV}
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if out.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run([*sudo, "apt-get", "update"], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    path = find_chromium()
    if out.returncode != 0 or path is None:
        what = f"exit {out.returncode}" if out.returncode else "installed, but no chromium found (check FAIRDIFF_CHROMIUM)"
        raise RuntimeError(f"apt-get install chromium: {what}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return path
