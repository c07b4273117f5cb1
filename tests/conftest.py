"""Shared pytest fixtures. Keep this minimal: fixtures that one test module needs belong in that module."""

from __future__ import annotations

import copy
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: ``endpoint_url`` and the s3fs ``storage_options`` that reach it (dummy creds)."""

    endpoint_url: str
    _options: dict[str, Any] = field(repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        # A fresh copy per access: tests may mutate theirs without affecting other tests.
        return copy.deepcopy(self._options)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1:<free port> for the whole session (real HTTP, in-process thread)."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    try:
        yield S3Server(endpoint_url=endpoint, _options=options)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, uniquely named, empty bucket on the moto server; yields ``s3://<bucket>``."""
    import boto3

    name = f"phpn-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)  # us-east-1: no LocationConstraint (moto rejects s3fs.mkdir's)
    yield f"s3://{name}"
