"""Embedded defaults: a temporary Prefect server and a local Ray when none is given.

With ``PREFECT_API_URL`` set, runs report to that server; with ``ray_address`` (or ``RAY_ADDRESS``), they run on
that Ray cluster. Otherwise a temporary Prefect server (SQLite under ``PREFECT_HOME``) and a local Ray sized to
the machine are started here and stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

QUIET_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Settings (no secrets) a Ray job's workers get from the driver. PHPN_FAULT_DIR: the test-only fault hook
# (tasks.common.fault_point), inert unless set.
FORWARDED_ENV = ("PREFECT_LOGGING_TO_API_ENABLED", "PREFECT_HOME", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "PHPN_FAULT_DIR")


def quiet_environment(prefect_home: str | Path | None = None) -> None:
    """Set the quiet/fast defaults (before Prefect is imported); values already set by the user win."""
    for k, v in QUIET_PREFECT_ENV.items():
        os.environ.setdefault(k, v)
    # One home for all runs: the temporary server's SQLite migrations then happen once, not per run directory.
    home = Path(os.environ.get("PREFECT_HOME") or prefect_home or Path.home() / ".phpn" / "prefect").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)


@dataclass
class Runtime:
    api_url: str
    ray_address: str | None
    prefect_started_s: float
    ray_started_s: float
    started_server: bool
    started_ray: bool


@contextlib.contextmanager
def prefect_server() -> Iterator[tuple[str, bool, float]]:
    """Yield ``(api_url, started_here, seconds_to_start)``; starts a temporary server when none is configured."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if url:
        yield url, False, 0.0
        return
    from prefect.server.api.server import SubprocessASGIServer

    t = time.perf_counter()
    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
    took = time.perf_counter() - t
    # Flow-run heartbeats let a long-lived server mark a crashed run; this server dies with the process, so they
    # would only cost time: Prefect's heartbeat thread sleeps in whole seconds and every flow run's exit joins it
    # (about 1 s per flow run, subflows included). A user's PREFECT_FLOWS_HEARTBEAT_FREQUENCY wins.
    updates: dict = {PREFECT_API_URL: server.api_url}
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    try:
        with temporary_settings(updates=updates):
            os.environ["PREFECT_API_URL"] = server.api_url
            try:
                yield server.api_url, True, took
            finally:
                os.environ.pop("PREFECT_API_URL", None)
                _drain_api_logs()  # while the server still answers: queued run logs reach it, not stderr
    finally:
        server.stop()


def _drain_api_logs() -> None:
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - best effort: never mask the run's own outcome
        pass


@contextlib.contextmanager
def ray_runtime(*, address: str | None, num_cpus: int | None, api_url: str) -> Iterator[tuple[str | None, bool, float]]:
    """Yield ``(address, started_here, seconds_to_start)``; connects to ``address`` or starts a local Ray."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield address, False, 0.0
        return
    # Never credentials: Ray records a job's runtime_env in its GCS and logs it in plain text
    # (logs/runtime_env_agent.log, the dashboard's job table). A local Ray started here inherits this process's
    # environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN included); the nodes of a remote
    # cluster need their own credentials (environment of `ray start`, instance roles, ~/.aws).
    env = {"PREFECT_API_URL": api_url, **{k: os.environ[k] for k in QUIET_PREFECT_ENV if k in os.environ}}
    for k in FORWARDED_ENV:
        if k in os.environ:
            env[k] = os.environ[k]
    t = time.perf_counter()
    kwargs = dict(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False,
                  configure_logging=True, logging_level="WARNING")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=256 * 2**20, **kwargs)
    took = time.perf_counter() - t
    try:
        yield address, True, took
    finally:
        ray.shutdown()


@contextlib.contextmanager
def runtime(*, ray_address: str | None = None, num_cpus: int | None = None) -> Iterator[Runtime]:
    with prefect_server() as (url, started_server, t_p), \
            ray_runtime(address=ray_address, num_cpus=num_cpus, api_url=url) as (addr, started_ray, t_r):
        yield Runtime(url, addr, t_p, t_r, started_server, started_ray)
