"""A local MQTT broker for the demo and the tests: Debian's `mosquitto` on a free loopback port,
or the embedded fallback where mosquitto is not installed (the demo only; tests need mosquitto)."""

from __future__ import annotations

import getpass
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from pipeline.tools.embedded_broker import EmbeddedBroker

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """No broker could be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin), or None."""
    return shutil.which("mosquitto") or next(
        (str(p) for p in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto")) if p.exists()), None)


class LocalBroker:
    """mosquitto on 127.0.0.1:<port>: anonymous and in memory with `extra_config` lines appended, or run with
    a whole `config` of the caller's (which must listen on `port`)."""

    def __init__(self, port: int | None = None, extra_config: str = "", config: str | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._extra = extra_config
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="ecgmon-broker-"))

    @property
    def pid(self) -> int:
        """The running mosquitto's process id."""
        if self._process is None:
            raise BrokerError("mosquitto is not running")
        return self._process.pid

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto not found: install it (Debian: apt-get install mosquitto)")
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "mosquitto.conf"
        base = self._config or (f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                                f"max_queued_messages 100000\nmax_inflight_messages 0\n{self._extra}")
        # Run as whoever starts it: as root, mosquitto would otherwise switch to user "mosquitto", which cannot
        # read this process's private temporary files (certificates, password file, persistence).
        conf.write_text(f"{base}\nlog_dest file {self._dir / 'mosquitto.log'}\nuser {getpass.getuser()}\n")
        self._process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self._process.returncode}: {self.log_text()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):  # TLS or not, it listens
                    log.info("mosquitto up on %s:%d", self.host, self.port)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s:g} s")

    def stop(self) -> None:
        """Stop mosquitto and remove its folder (config, log)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_text(self) -> str:
        path = self._dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def local_broker() -> LocalBroker | EmbeddedBroker:
    """mosquitto where installed, else the embedded broker (not started yet)."""
    if find_mosquitto() is not None:
        return LocalBroker()
    log.warning("mosquitto not found: using the embedded MQTT broker (demo only; install mosquitto for real use)")
    return EmbeddedBroker()
