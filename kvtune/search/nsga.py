"""NSGA-II (pymoo) over the pruned, clustered space: predicted loss vs memory, budget as a constraint."""

from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize

from kvtune.search.space import SearchSpace


class _PlanProblem(Problem):
    def __init__(self, space: SearchSpace, budget: float):
        self.costs = [space.group_cost(g) for g in range(len(space.groups))]
        self.memories = [space.group_memory(g) for g in range(len(space.groups))]
        self.budget = budget
        upper = np.array([len(c) - 1 for c in self.costs])
        super().__init__(n_var=len(self.costs), n_obj=2, n_ieq_constr=1, xl=np.zeros_like(upper), xu=upper, vtype=int)

    def _evaluate(self, X, out, *args, **kwargs):
        X = np.rint(X).astype(int)
        cost = sum(c[X[:, g]] for g, c in enumerate(self.costs))
        memory = sum(m[X[:, g]] for g, m in enumerate(self.memories))
        out["F"] = np.column_stack([cost, memory])
        out["G"] = (memory - self.budget)[:, None]


class _Progress(Callback):
    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def notify(self, algorithm):
        if self.bar is not None:
            self.bar.update(1)


def _initial_population(space: SearchSpace, size: int, rng: np.random.Generator) -> np.ndarray:
    """Every 'uniform' setting (same choice rank in every group) plus random vectors: the front's
    ends are then present from the first generation."""
    upper = np.array([len(c) - 1 for c in space.choices])
    ranks = [np.minimum(np.full_like(upper, r), upper) for r in range(upper.max() + 1)]
    random = [rng.integers(0, upper + 1) for _ in range(max(size - len(ranks), 0))]
    return np.array(ranks + random)[:size]


def nsga2_front(space: SearchSpace, budget: float, seed: int = 0, pop_size: int = 100, generations: int = 150,
                progress=None, max_pop_size: int = 1600):
    """(decision vectors, objectives [predicted loss, memory]) of the final non-dominated feasible set,
    and the population size that found it.

    A population holds at most ``pop_size`` plans, so a front with more points than that comes back
    thinned by crowding, with gaps to the exact optimum between the points it kept (at 6-16 bits on
    the default profile a front of 100 missed it by 5-22 %). When the front fills nine tenths of the
    population, the run repeats with twice the population, up to ``max_pop_size``."""
    while True:
        X, F = _run(space, budget, seed, pop_size, generations, progress)
        if len(X) < 0.9 * pop_size or pop_size * 2 > max_pop_size:
            return X, F, pop_size
        pop_size *= 2
        if progress is not None:
            progress.reset(total=generations)


def _run(space: SearchSpace, budget: float, seed: int, pop_size: int, generations: int, progress):
    problem = _PlanProblem(space, budget)
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=_initial_population(space, pop_size, np.random.default_rng(seed)),
        crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    result = minimize(problem, algorithm, ("n_gen", generations), seed=seed, verbose=False, callback=_Progress(progress))
    if result.X is None:
        return np.zeros((0, len(space.groups)), dtype=int), np.zeros((0, 2))
    X = np.atleast_2d(np.rint(result.X).astype(int))
    F = np.atleast_2d(result.F)
    order = np.lexsort((F[:, 0], F[:, 1]))  # by memory, then loss
    X, F = X[order], F[order]
    _, unique = np.unique(X, axis=0, return_index=True)
    keep = np.sort(unique)
    return X[keep], F[keep]
