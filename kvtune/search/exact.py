"""The exact optimum of the additive objective at one budget: a small integer program.

min Σ_g Σ_c cost[g,c]·x[g,c]  s.t.  Σ_c x[g,c] = 1 for every group,  Σ memory·x ≤ budget,  x binary.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from kvtune.search.space import SearchSpace


def exact_optimum(space: SearchSpace, budget: float) -> np.ndarray | None:
    """Decision vector (choice index per group) minimising predicted loss under ``budget``,
    or None if no assignment fits."""
    costs = [space.group_cost(g) for g in range(len(space.groups))]
    memories = [space.group_memory(g) for g in range(len(space.groups))]
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    c = np.concatenate(costs)
    one_each = np.zeros((len(sizes), n))
    start = 0
    for g, size in enumerate(sizes):
        one_each[g, start : start + size] = 1
        start += size
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(np.concatenate(memories)[None, :], -np.inf, budget * (1 + 1e-12)),
    ]
    result = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.x is None:
        return None
    x, start = [], 0
    for size in sizes:
        x.append(int(np.argmax(result.x[start : start + size])))
        start += size
    return np.array(x)


def evaluate(space: SearchSpace, x) -> tuple[float, float]:
    """(predicted loss, memory) of a decision vector."""
    cost = sum(space.group_cost(g)[int(x[g])] for g in range(len(space.groups)))
    memory = sum(space.group_memory(g)[int(x[g])] for g in range(len(space.groups)))
    return float(cost), float(memory)
