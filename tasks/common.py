"""What the tasks share: the I/O-only retry rule and device choice."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from phpn_core.errors import StoreError


def retry_on_io(task, task_run, state) -> bool:
    """Retry only I/O failures (store/registry/network), never a bad input or a bug."""
    try:
        state.result()
    except (StoreError, OSError, ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but this worker has no CUDA device; use 'auto' or 'cpu'.")
    return device


def worker_identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


FAULT_DIR_ENV = "PHPN_FAULT_DIR"
_FAULT_HOLD_S = 120.0


def fault_point(name: str) -> None:
    """Test-only fault injection hook; inert by default.

    Does nothing unless the environment variable ``PHPN_FAULT_DIR`` names a directory that holds a file
    ``<name>.hold``. Then exactly one process claims that file (atomic rename to ``<name>.held-<pid>``, which also
    tells the test which PID to kill) and waits until ``<name>.release`` appears (at most 120 s), so that a fault
    (SIGKILL of this worker or of the driver, an S3 outage) can be injected while this task holds its work.
    Used by tests/flows/test_faults.py; never set ``PHPN_FAULT_DIR`` in production.
    """
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return
    hold = Path(folder) / f"{name}.hold"
    try:
        os.rename(hold, Path(folder) / f"{name}.held-{os.getpid()}")
    except OSError:  # not planted, or claimed by another process
        return
    release = Path(folder) / f"{name}.release"
    deadline = time.monotonic() + _FAULT_HOLD_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
