"""Shared pytest fixtures. Keep this minimal: fixtures that one test module needs belong in that module."""

from __future__ import annotations

import contextlib
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


# ----------------------------------------------------------------------------------------------------------------
# A pausable TCP proxy in front of moto (the "S3 endpoint goes away, then comes back" fault) and the session's
# flow runtime (temporary Prefect server + local Ray), shared by test_flow, test_faults and test_security.

# A recognisable secret: every output of every run in the session can be grepped for it (moto accepts any).
CANARY_KEY_ID = "phpncanarykeyid0042"
CANARY_SECRET = "phpn/Canary+Secret/7f3a9c81d2"


class PausableProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream`` byte for byte. :meth:`pause` closes the listening socket and
    cuts every open connection (clients see "connection refused" / resets, as when the endpoint dies);
    :meth:`resume` listens again on the same port. :meth:`outage_on` arms a trigger: the first request whose bytes
    match a regex is dropped unforwarded (it never reaches moto) and the endpoint stays down for ``seconds``, then
    comes back by itself. Threads only; :meth:`stop` ends them all."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import threading

        self.upstream = upstream
        self.port = _free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list = []
        self.connections = 0
        self._triggers: list[dict] = []
        self._stopped = False
        self.resume()

    def outage_on(self, pattern: bytes, seconds: float) -> dict:
        """Arm a one-shot outage (see the class docstring). Returns its record: ``fired`` (a threading.Event set
        when it starts), ``ended`` (set when the endpoint is back), ``request`` (the matched request line)."""
        import re
        import threading

        trig = {"re": re.compile(pattern), "seconds": seconds, "fired": threading.Event(),
                "ended": threading.Event(), "request": None}
        with self._lock:
            self._triggers.append(trig)
        return trig

    def _check_triggers(self, data: bytes) -> bool:
        import threading

        with self._lock:
            for trig in self._triggers:
                m = trig["re"].search(data)
                if m is not None:
                    self._triggers.remove(trig)
                    break
            else:
                return False
        start = data.rfind(b"\r\n", 0, m.start())
        line = data[0 if start < 0 else start + 2: data.find(b"\r\n", m.start())]
        trig["request"] = line.decode("latin-1")[:300]
        self.pause()
        trig["fired"].set()

        def back():
            self.resume()
            trig["ended"].set()

        threading.Timer(trig["seconds"], back).start()
        return True

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paused(self) -> bool:
        return self._listener is None

    def resume(self) -> None:
        import threading

        with self._lock:
            if self._listener is not None or self._stopped:
                return
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port))
            ls.listen(64)
            self._listener = ls
        t = threading.Thread(target=self._accept, args=(ls,), daemon=True, name="s3-proxy-accept")
        t.start()
        self._threads.append(t)

    def pause(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def stop(self) -> None:
        self._stopped = True
        self.pause()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self, ls: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # paused or stopped
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not ls:  # paused meanwhile
                    client.close()
                    upstream.close()
                    continue
                self._conns.update((client, upstream))
                self.connections += 1
            for a, b, check in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(a, b, check), daemon=True, name="s3-proxy-pump")
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, check: bool) -> None:
        try:
            while data := src.recv(65536):
                if check and self._triggers and self._check_triggers(data):
                    break  # dropped: the request never reaches the endpoint
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            src.close()


@pytest.fixture(scope="session")
def s3_proxy(s3_server):
    """A :class:`PausableProxy` in front of the session's moto server (the endpoint the flow runtime uses)."""
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    proxy = PausableProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory):
    """The directory of the test-only fault hooks (``PHPN_FAULT_DIR``, see tasks/common.py:fault_point)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def phpn_runtime(s3_proxy, fault_dir, tmp_path_factory):
    """Prefect test server + local Ray (2 CPUs) for the session. AWS_* point at moto through :class:`PausableProxy`
    with the canary credentials, so Ray workers reach S3 too and every output can be checked for the secret.
    PHPN_FAULT_DIR is set (inert until a test plants a hold file)."""
    import os

    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "PREFECT_LOGGING_TO_API_ENABLED", "PHPN_FAULT_DIR",
                                            "RAY_TMPDIR")}
    os.environ.update({"AWS_ENDPOINT_URL": s3_proxy.endpoint_url, "AWS_ACCESS_KEY_ID": CANARY_KEY_ID,
                       "AWS_SECRET_ACCESS_KEY": CANARY_SECRET, "AWS_REGION": "us-east-1",
                       "PREFECT_LOGGING_TO_API_ENABLED": "false", "PHPN_FAULT_DIR": str(fault_dir)})
    from flows.runtime import quiet_environment

    quiet_environment(tmp_path_factory.mktemp("prefect-home"))
    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.runtime import runtime

    try:
        with prefect_test_harness(server_startup_timeout=180):
            with runtime(num_cpus=2) as rt:
                yield rt
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
