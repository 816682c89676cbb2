"""The measured choice: candidate plans race on verification windows.

All candidates are measured on the same windows, one round at a time. After each round, a candidate
whose mean NLL exceeds the leader's by more than ``z`` standard errors of their paired per-window
difference drops out; the race ends when one is left or the windows run out, and the lowest mean
among those left wins. Pairing cancels what every plan shares (hard text is hard for all of them),
so differences far smaller than the spread between windows are resolved, and clear losers stop
costing model time after the first round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class RaceResult:
    nll: np.ndarray  # (candidates, windows) mean NLL per window; NaN where a candidate had dropped out
    winner: int

    @property
    def mean(self) -> np.ndarray:
        return np.nanmean(self.nll, axis=1)

    @property
    def windows(self) -> np.ndarray:
        return np.isfinite(self.nll).sum(axis=1)


def paired_gap(a: np.ndarray, b: np.ndarray, binary: bool = False) -> tuple[float, float]:
    """Mean of ``a - b`` over windows and its standard error (0 for a single window).

    ``binary``: 0/1 scores (task items). Two plans agree on most items, and a few agreeing items
    give a standard error of 0, so one lucky item would decide; the error is then taken with one
    pseudo-item won by each side (a continuity correction), never below what two discordant items give.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    spread = np.concatenate([d, [1.0, -1.0]]) if binary else d
    se = spread.std(ddof=1) / np.sqrt(len(d)) if len(spread) > 1 else 0.0
    return float(d.mean()), float(se)


def race(
    measure: Callable[[int, slice], Sequence[float]],
    candidates: int,
    windows: int,
    round_size: int,
    z: float = 2.0,
    on_measure: Callable[[int], None] | None = None,
    binary: bool = False,
) -> RaceResult:
    """``measure(i, windows)`` gives candidate ``i``'s mean NLL on each window of the slice."""
    if candidates < 1 or windows < 1 or round_size < 1:
        raise ValueError("a race needs at least one candidate, one window and rounds of at least one window")
    nll = np.full((candidates, windows), np.nan)
    alive = list(range(candidates))
    for start in range(0, windows, round_size):
        stop = min(start + round_size, windows)
        for i in alive:
            nll[i, start:stop] = measure(i, slice(start, stop))
            if on_measure:
                on_measure(stop - start)
        seen = nll[alive, :stop]
        leader = alive[int(np.argmin(seen.mean(axis=1)))]
        # One window gives no spread to judge by: nobody drops out until there are two.
        if stop > 1:
            alive = [i for i in alive if i == leader or _not_behind(nll[i, :stop], nll[leader, :stop], z, binary)]
        if len(alive) == 1:
            break
    return RaceResult(nll, leader)


def _not_behind(candidate: np.ndarray, leader: np.ndarray, z: float, binary: bool = False) -> bool:
    gap, se = paired_gap(candidate, leader, binary)
    return gap <= z * se
