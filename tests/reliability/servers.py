"""Real servers the reliability tests start for themselves: PostgreSQL (Debian's server
binaries) and an MLflow tracking server on it, as deployed on a cluster (manifests/)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl), if installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback; yields the URL of its database `mlflow`.
    As root, the server runs as the `postgres` user (it refuses to run as root)."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: "
                           "apt-get install postgresql")
    # Not under pytest's tmp_path: its parents are private to root, the server's user must
    # be able to reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="vidops-pg-"))
    root.chmod(0o755)
    data, sockets = root / "data", root / "run"
    data.mkdir()
    sockets.mkdir()
    as_server: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_server, *command], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr or done.stdout}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "vidops", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vidops",
            "mlflow")
        # psycopg2 (the `cluster` extra): SQLAlchemy 2.1 takes plain postgresql:// as psycopg 3.
        yield f"postgresql+psycopg2://vidops@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_server, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server` on `backend_uri` with proxied artifacts; yields its URL."""
    port = free_port()
    log = artifacts.parent / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
             "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
