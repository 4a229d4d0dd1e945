from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

from tests.s3server import s3_bucket, s3_server  # noqa: F401 - fixtures for every test module


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


def _daemons_of(me: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in me.children(recursive=True):
        try:
            args = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ingestd" in args and "-m" in args:
            found.append(child)
    return found


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way must not leave its `python -m ingestd` processes
    running (they would load the machine and hold ports for every later test): whatever
    daemon a test started and did not stop is killed when the test ends."""
    me = psutil.Process()
    before = {p.pid for p in _daemons_of(me)}
    yield
    left = [p for p in _daemons_of(me) if p.pid not in before]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
