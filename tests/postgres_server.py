"""A throwaway PostgreSQL server for tests.

The PostgreSQL conversation store is tested against a real server, not a
mock: transactions, row locks and `ON CONFLICT` are what keep concurrent turns
from being lost. This starts one from Debian's `postgresql` package
(`apt-get install -y postgresql`; binaries in /usr/lib/postgresql/<version>/bin)
in a temporary directory, on 127.0.0.1:8650 with trust authentication, and
removes it again. As root the server runs as the `postgres` user, which the
package creates (PostgreSQL refuses to run as root).

    with running_postgres() as server:   # in a pytest fixture
        ... server.dsn ...
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

APT_PACKAGE = "postgresql"
DEFAULT_PORT = 8650
DEBIAN_ROOT = Path("/usr/lib/postgresql")


def find_bindir() -> Path | None:
    """The directory with `initdb` and `pg_ctl`: PG_BINDIR, then PATH, then the newest Debian install."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = [p for p in DEBIAN_ROOT.glob("*/bin") if p.parent.name.isdigit()]
    candidates.extend(sorted(versions, key=lambda p: int(p.parent.name), reverse=True))
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


class PostgresServer:
    def __init__(self, bindir: Path, port: int = DEFAULT_PORT) -> None:
        self.bindir = bindir
        self.port = port
        self.root: Path | None = None

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(self._as_server_user(command), check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            output = f"{result.stdout}{result.stderr}{self._log_tail()}"
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")

    def _log_tail(self) -> str:
        log = self.root / "server.log" if self.root else None
        if log is None or not log.exists():
            return ""
        return "\nserver log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres", group="postgres")
        self._run([
            str(self.bindir / "initdb"), "-D", str(self._data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--no-sync",
        ])
        self.start_again()

    def start_again(self) -> None:
        """Start the server on its existing data (after `stop_keeping_data`)."""
        assert self.root is not None, "start() first"
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self._data), "-l", str(self.root / "server.log"),
                       "-w", "-t", "60", "-o", options, "start"])
        except RuntimeError as exc:
            hint = f"(Is port {self.port} taken, e.g. by a server left from an earlier run?)"
            raise RuntimeError(f"{exc}\n{hint}") from None

    def stop_keeping_data(self) -> None:
        """Stop the server at once, as a crash would (clients lose their connections), keeping its data."""
        if self.root is not None and (self._data / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "-w", "stop"])

    def stop(self) -> None:
        if self.root is None:
            return
        self.stop_keeping_data()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    @property
    def _data(self) -> Path:
        assert self.root is not None
        return self.root / "data"


def free_port() -> int:
    """A TCP port nothing listens on at the moment, for a server a test starts itself."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_postgres(port: int = DEFAULT_PORT) -> Iterator[PostgresServer]:
    """A started server for a pytest fixture; without the binaries, a skip (a failure in CI)."""
    bindir = find_bindir()
    if bindir is None:
        message = f"PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install -y {APT_PACKAGE}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bindir, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
