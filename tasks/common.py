"""What the tasks share: the I/O-only retry rule and device choice."""

from __future__ import annotations

import os
import socket

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
