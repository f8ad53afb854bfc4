"""A Janus started by a test or bench: generated loopback configuration in a temp dir, no root."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from gaga_ros.stream.janus import minimal_config

ROOM = 1234


def janus_path() -> str | None:
    """The janus binary on PATH (Debian: apt-get install -y janus), or None."""
    return shutil.which("janus")


class JanusProcess:
    """`janus` on a free loopback port with minimal_config; restartable on the same port and room."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="gaga-janus-")
        self.secret = secrets.token_hex(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/janus"
        self.command = minimal_config(Path(self.dir.name) / "conf", self.port, self.secret, ROOM)
        self.proc: subprocess.Popen | None = None
        self.log = Path(self.dir.name) / "janus.log"

    def start(self, timeout: float = 30.0) -> JanusProcess:
        """Start Janus and return once its HTTP API answers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/info", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"janus did not start (exit {self.proc.poll()}): {self.tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """End Janus abruptly (as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 20) -> str:
        """The last lines of Janus's log (for failure messages)."""
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.dir.cleanup()
