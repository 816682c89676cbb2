"""The verification race (kvtune.search.verify) on synthetic per-window NLL."""

import numpy as np
import pytest

from kvtune.search.verify import paired_gap, race


def _table(offsets, windows=16, spread=0.5, noise=0.001, seed=0):
    """Per-window NLL: a window difficulty every plan shares (large) + each plan's offset + small noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(3.0, spread, windows)
    return np.array([shared + off + rng.normal(0, noise, windows) for off in offsets])


def _run(nll, round_size=4, z=2.0):
    calls = []

    def measure(i, part):
        calls.append((i, part.start, part.stop))
        return nll[i, part]

    return race(measure, len(nll), nll.shape[1], round_size, z), calls


def test_clear_loser_stops_after_first_round_and_best_wins():
    nll = _table([0.0, 0.2, 0.01])
    result, calls = _run(nll)
    assert result.winner == 0
    assert result.windows.tolist()[1] == 4  # measured once, then dropped
    assert {c for c in calls if c[0] == 1} == {(1, 0, 4)}


def test_pairing_resolves_differences_far_below_the_spread_between_windows():
    # 0.005 nats apart while windows differ by 0.5: unpaired, the standard error would be ~0.1.
    nll = _table([0.005, 0.0], spread=0.5, noise=0.001)
    result, _ = _run(nll)
    assert result.winner == 1
    assert result.windows.tolist() == [4, 4]


def test_a_tie_uses_every_window_and_the_lowest_mean_wins():
    nll = _table([0.0, 0.0], noise=0.01, seed=3)
    result, _ = _run(nll, z=10.0)  # nobody is 10 standard errors behind
    assert result.windows.tolist() == [16, 16]
    assert result.winner == int(np.argmin(nll.mean(axis=1)))
    np.testing.assert_allclose(result.mean, nll.mean(axis=1))


def test_last_round_may_be_short_and_one_window_drops_nobody():
    nll = _table([0.0, 1.0, 2.0], windows=5)
    result, calls = _run(nll, round_size=1)
    assert all(stop - start == 1 for _, start, stop in calls)
    assert (result.windows[1:] == 2).all()  # both measured on windows 0 and 1, dropped after the second
    result, _ = _run(nll[:, :1], round_size=4)
    assert result.windows.tolist() == [1, 1, 1] and result.winner == 0


def test_paired_gap():
    gap, se = paired_gap(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.5, 2.0]))
    assert gap == pytest.approx(2 / 3)
    assert se == pytest.approx(np.std([0.5, 0.5, 1.0], ddof=1) / np.sqrt(3))
    assert paired_gap(np.array([1.0]), np.array([0.0])) == (1.0, 0.0)


def test_bad_race_is_an_error():
    with pytest.raises(ValueError):
        race(lambda i, s: [], 0, 4, 4)


def test_zero_one_scores_need_more_than_a_few_discordant_items():
    # Errors (1 − score) on 8 items: the candidate misses 3 the leader gets, and they agree on the rest.
    # As plain numbers that is 2.05 standard errors behind; a sign test says p = 0.125, so with the
    # pseudo-item on each side it stays in the race.
    leader = np.zeros(8)
    candidate = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=float)
    gap, se = paired_gap(candidate, leader)
    assert gap > 2 * se
    gap, se = paired_gap(candidate, leader, binary=True)
    assert gap == 0.375 and gap < 2 * se
    scores = np.stack([leader, candidate])
    result = race(lambda i, part: scores[i, part], 2, 8, 8, z=2.0, binary=True)
    assert np.isfinite(result.nll).all() and result.winner == 0
