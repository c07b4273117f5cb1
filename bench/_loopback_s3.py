"""A real S3 endpoint on loopback for benchmarks: moto's threaded server and one bucket (as s3fs's own tests do)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def loopback_s3(bucket: str) -> Iterator[dict]:
    """Start moto on 127.0.0.1 (a free port), create ``bucket``, yield s3fs storage options; stop it afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield {"endpoint_url": url, "key": "bench", "secret": "bench", "client_kwargs": {"region_name": "us-east-1"}}
    finally:
        server.stop()
