import pytest

from tests.s3server import s3_bucket, s3_server  # noqa: F401 - fixtures for every test module


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"
