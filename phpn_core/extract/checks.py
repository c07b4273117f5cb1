"""Argument checks shared by the extraction entry points (device, eval mode, dtype, counts, chunk selection)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from phpn_core.errors import InputValueError

__all__ = ["DTYPES", "check_device", "check_eval_mode", "check_dtype", "check_pos_int", "select_chunks"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)  # BatchNorm, InstanceNorm, Dropout


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputValueError(
            f"device {device!r} is not a torch device. Fix: pass 'cpu', 'cuda' or 'cuda:0'."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputValueError(
            f"device {str(dev)!r} requested but CUDA is not available on this machine. Fix: pass device='cpu'."
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputValueError(f"device {str(dev)!r} is not supported: expected 'cpu' or 'cuda[:i]'.")
    return dev


def check_eval_mode(features: Any) -> None:
    if not isinstance(features, nn.Module):
        raise InputValueError(
            f"features must be an nn.Module (x [B, 3, S, S] -> [B, D, h, w]), got {type(features).__name__}. "
            "Fix: pass split_classifier(model)[0]."
        )
    # Only modules whose forward depends on the mode matter (a wrapper's own flag does not).
    training = [
        name or type(features).__name__
        for name, m in features.named_modules()
        if m.training and isinstance(m, _MODE_DEPENDENT)
    ]
    if training:
        raise InputValueError(
            f"{type(features).__name__} is in training mode ({len(training)} BatchNorm/Dropout modules, e.g. "
            f"{training[:3]}): expected eval mode, else BatchNorm uses batch statistics and Dropout is active, so "
            "features depend on the batch. Fix: call model.eval() before splitting/extracting."
        )


def check_dtype(dtype: Any) -> None:
    if dtype not in DTYPES:
        raise InputValueError(
            f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}. Fix: pass dtype='float16' to halve the store."
        )


def check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputValueError(f"{name} must be an int >= 1, got {value!r}. Fix: pass e.g. 64.")
    return int(value)


def select_chunks(chunks: Sequence[int], missing: list[int], n_chunks: int) -> list[int]:
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, (Sequence, np.ndarray)):
        raise InputValueError(f"chunks must be a sequence of chunk indices, got {type(chunks).__name__}.")
    want = set()
    for k in chunks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n_chunks:
            raise InputValueError(
                f"chunks holds {k!r}: expected chunk indices in [0, {n_chunks}). Fix: pass indices from "
                "store.missing_chunks()."
            )
        want.add(int(k))
    return [k for k in missing if k in want]
