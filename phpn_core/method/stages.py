"""Where the time and the reads of X go inside a decomposition, measured on request.

``with stage_clock(device) as clock: decompose_head(...)`` fills ``clock.seconds`` (wall seconds per stage,
device-synchronised at each stage boundary) and ``clock.reads`` (how many times each stage read the features
whole: one product ``X G``, ``A X`` or one reduction over X counts one). Without an open clock, :func:`stage` is a
no-op and :func:`count_read` a dictionary miss: the solvers pay nothing for being measurable.

Stage names (in order): ``checks``, ``padding``, ``stats``, ``range_finder``, ``project_start``, ``compressed``,
``polish`` (or ``sweeps`` for the exact solver), ``scaling``, ``refine_gram``, ``refine_solve``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["StageClock", "stage_clock", "stage", "count_read"]


class StageClock:
    """Seconds and reads of X per stage (``defaultdict(float)`` / ``defaultdict(int)``)."""

    def __init__(self, device=None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.reads: defaultdict[str, int] = defaultdict(int)
        self.current: str | None = None


_CLOCK: ContextVar[StageClock | None] = ContextVar("phpn_stage_clock", default=None)


@contextmanager
def stage_clock(device=None):
    """Measure the stages of the decompositions run inside this block."""
    clock = StageClock(device)
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextmanager
def stage(name: str):
    """Attribute the enclosed work to ``name``; a stage opened inside another owns its own time (the outer one
    gets the rest)."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    outer = clock.current
    clock._sync()
    t = time.perf_counter()
    clock.current = name
    try:
        yield
    finally:
        clock._sync()
        dt = time.perf_counter() - t
        clock.seconds[name] += dt
        if outer is not None:
            clock.seconds[outer] -= dt  # the outer stage's own clock runs on; this part was not its work
        clock.current = outer


def count_read(n: int = 1) -> None:
    """One more read of X (whole) by the current stage."""
    clock = _CLOCK.get()
    if clock is not None:
        clock.reads[clock.current or "other"] += n
