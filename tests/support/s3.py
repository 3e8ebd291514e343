"""A private S3-compatible server for the media storage tests: ``s3s-fs`` (the s3s
project's file-system backed S3 server, SigV4 authentication, presigned URLs, multipart
uploads), built from crates.io into ``target/tools`` on first use.

- :func:`s3s_fs_binary`: the binary, ``cargo install``-ed when missing or of another
  version (about 80 s; a file lock makes parallel test processes build it once);
  ``python -m support.s3`` (with ``tests`` on ``PYTHONPATH``) does the same, for
  ``make tools``;
- :class:`S3Server`: one server on a free port of 127.0.0.1 with its own data directory
  and keys; :meth:`S3Server.start` waits until it answers HTTP, :meth:`S3Server.stop`
  ends it.

s3s-fs 0.14.1 is pinned: later versions need a newer rustc than this project's.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from .ports import free_port
from .wait import eventually_sync

S3S_FS_VERSION = "0.14.1"
REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "target" / "tools"


def _cargo() -> str:
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not os.access(found, os.X_OK):
        raise RuntimeError("cargo is not installed: it is needed to build s3s-fs (the S3 server of tests/media)")
    return found


def _version_ok(exe: Path) -> bool:
    if not os.access(exe, os.X_OK):
        return False
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.split()[-1:] == [S3S_FS_VERSION]


def s3s_fs_binary(root: Path = TOOLS) -> Path:
    """``root/bin/s3s-fs`` at :data:`S3S_FS_VERSION`, running ``cargo install s3s-fs
    --version … --features binary --locked --root root`` first when it is missing (under
    an exclusive lock on ``root/.s3s-fs.lock``: whoever waits finds it built)."""
    exe = root / "bin" / "s3s-fs"
    if _version_ok(exe):
        return exe
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".s3s-fs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _version_ok(exe):
            return exe
        cmd = [_cargo(), "install", "s3s-fs", "--version", S3S_FS_VERSION, "--features", "binary", "--locked", "--root", str(root)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if p.returncode != 0 or not _version_ok(exe):
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return exe


class S3Server:
    """One ``s3s-fs`` on 127.0.0.1:``port`` storing under ``workdir/data``, with random
    keys; its log is ``workdir/s3s-fs.log``. Buckets are made by the clients
    (CreateBucket)."""

    def __init__(self, binary: Path, workdir: Path, port: int | None = None, region: str = "us-east-1") -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.region = region
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.data = workdir / "data"
        self.log_path = workdir / "s3s-fs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.data.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> S3Server:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), f"--access-key={self.access_key}",
                 # "=": a random key may start with "-", which would read as an option.
                 f"--secret-key={self.secret_key}", "--", str(self.data)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        eventually_sync(self.ready, timeout, interval=0.05, what=f"s3s-fs on port {self.port} (log: {self.log_path})")
        return self

    def ready(self) -> bool:
        """Whether it answers HTTP (any status: an anonymous request gets 403)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"s3s-fs exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


if __name__ == "__main__":
    print(s3s_fs_binary())
