"""Programs from Debian packages that tests need (nginx, docker-compose, systemd-analyze),
installed on demand the way :func:`support.redis.install_redis` installs redis-server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: Where Debian puts programs; /usr/sbin is not on a non-root PATH.
_BIN_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")


def find_program(name: str) -> str | None:
    """``name`` on PATH or in Debian's bin directories; None when absent."""
    found = shutil.which(name)
    if found:
        return found
    for d in _BIN_DIRS:
        if os.access(p := Path(d) / name, os.X_OK):
            return str(p)
    return None


def apt_install(program: str, package: str, *, recommends: bool = True) -> tuple[str | None, str]:
    """The path of ``program``, running ``apt-get install -y <package>`` first when it is
    missing (and ``apt-get update``, then the install again, when that fails). Returns the
    path (None when it could not be installed) and what apt-get said, for the failure
    message. Needs root, or password-less sudo. ``recommends=False`` adds
    ``--no-install-recommends`` (docker-compose would pull in the Docker engine otherwise)."""
    path = find_program(program)
    if path:
        return path, ""
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if not shutil.which("sudo"):
            return None, f"{program} is missing, and installing {package} needs root or sudo"
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*prefix, "apt-get", "install", "-y", "-q", *([] if recommends else ["--no-install-recommends"]), package]
    log: list[str] = []
    for cmd in (install, [*prefix, "apt-get", "update", "-q"], install):
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.append(f"{' '.join(cmd)}: {e}")
            continue
        log.append(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-1500:]}")
        if cmd is install and p.returncode == 0:
            break
    return find_program(program), "\n".join(log)


def require_program(program: str, package: str, *, recommends: bool = True) -> str:
    """:func:`apt_install`, failing the test (not skipping it) when the program is still missing."""
    path, log = apt_install(program, package, recommends=recommends)
    assert path, f"{program} is missing and Debian's {package} package could not be installed:\n{log}"
    return path
