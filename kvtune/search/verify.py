"""The measured choice: candidate plans race on verification windows, and the profile's best
prediction stands unless the measurements overturn it beyond noise.

All candidates are measured on the same windows, one round at a time; each round is a *look*. At a
look with ``n`` windows, the paired per-window difference of a candidate to the leader (the lowest
mean so far) is judged by a one-sided t-test with ``n - 1`` degrees of freedom (pairing cancels what
every plan shares: hard text is hard for all of them). With ``K`` looks and ``m`` candidates:

* a challenger drops out when it is behind the leader at level ``alpha / K`` (Bonferroni over the
  looks): a plan at least as good as the leader is dropped with probability at most ``alpha``;
* the *incumbent* — the plan the profile predicts best — drops out only at level
  ``alpha / (K (m - 1))`` (over the looks and every challenger that could be the leader), so when
  no challenger is truly better, the race overturns the prediction with probability at most
  ``alpha`` (the paired differences taken as normal; tests/test_verify.py measures it).

The incumbent wins whenever it is still in the race at the end: a challenger whose lower mean is
within noise does not replace it. Only where the incumbent dropped out does the lowest measured
mean among those left win. See docs/search.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class RaceResult:
    nll: np.ndarray  # (candidates, windows) mean NLL per window; NaN where a candidate had dropped out
    winner: int
    incumbent: int = 0  # the profile's best prediction
    leader: int = 0  # the lowest measured mean among the candidates that finished
    finalists: tuple[int, ...] = ()  # the candidates still in the race at the end

    @property
    def mean(self) -> np.ndarray:
        return np.nanmean(self.nll, axis=1)

    @property
    def windows(self) -> np.ndarray:
        return np.isfinite(self.nll).sum(axis=1)

    @property
    def overturned(self) -> bool:
        """The measurements replaced the profile's best prediction."""
        return self.winner != self.incumbent


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
    alpha: float = 0.05,
    on_measure: Callable[[int], None] | None = None,
    binary: bool = False,
    incumbent: int = 0,
) -> RaceResult:
    """``measure(i, windows)`` gives candidate ``i``'s mean NLL (or error) on each window of the
    slice; ``incumbent`` is the candidate the profile predicts best."""
    if candidates < 1 or windows < 1 or round_size < 1:
        raise ValueError("a race needs at least one candidate, one window and rounds of at least one window")
    if not 0 < alpha < 1 or not 0 <= incumbent < candidates:
        raise ValueError(f"alpha must be in (0, 1) and the incumbent one of the {candidates} candidates")
    nll = np.full((candidates, windows), np.nan)
    alive = list(range(candidates))
    stops = [min(start + round_size, windows) for start in range(0, windows, round_size)]
    looks = max(sum(stop > 1 for stop in stops), 1)  # one window gives no spread to judge by
    for start, stop in zip(range(0, windows, round_size), stops):
        for i in alive:
            nll[i, start:stop] = measure(i, slice(start, stop))
            if on_measure:
                on_measure(stop - start)
        leader = alive[int(np.argmin(nll[alive, :stop].mean(axis=1)))]
        if stop > 1:
            challenger_t = stats.t.ppf(1 - alpha / looks, stop - 1)
            incumbent_t = stats.t.ppf(1 - alpha / (looks * max(candidates - 1, 1)), stop - 1)
            alive = [i for i in alive if i == leader or not _behind(nll[i, :stop], nll[leader, :stop],
                                                                    incumbent_t if i == incumbent else challenger_t, binary)]
        if len(alive) == 1:
            break
    leader = alive[int(np.argmin(nll[alive, :stop].mean(axis=1)))]
    return RaceResult(nll, incumbent if incumbent in alive else leader, incumbent, leader, tuple(alive))


def _behind(candidate: np.ndarray, leader: np.ndarray, threshold: float, binary: bool = False) -> bool:
    gap, se = paired_gap(candidate, leader, binary)
    return gap > threshold * se
