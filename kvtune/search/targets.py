"""What each serving engine can express, as a search space over the profile's columns.

==================  =============================================================  ====================
target              a plan is                                                      searched by
==================  =============================================================  ====================
``kvtune``          any candidate per layer (kvtune's own cache)                   NSGA-II + exact MILP
``vllm``            one ``--kv-cache-dtype`` (K/V formats of ``VLLM_DTYPES``) and   NSGA-II + exact MILP,
                    a skipped set kept 16-bit; the layers vLLM always skips for    one space per dtype
                    that dtype held at 16 bits
``llama.cpp``       one K type and one V type for every layer                      enumerated (exact)
``ik-llama.cpp``    a K/V pair for the first N layers, one for the middle, one for  enumerated (exact)
                    the last M (``--cache-type-k/-v`` with ``-first``/``-last``;
                    K and V share N and M here)
==================  =============================================================  ====================

Each function returns plain data (numpy and lists); no model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvtune.formats import VLLM_DTYPES, vllm_forced_skips
from kvtune.plan import FULL_BITS, ModelShape, parse_candidate
from kvtune.search.budget import BudgetError
from kvtune.search.space import front_indices

TARGETS = ("kvtune", "vllm", "llama.cpp", "ik-llama.cpp")
# llama.cpp's cache types as kvtune labels (f16 and the block types).
LLAMA_CPP_LABELS = (FULL_BITS, "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@dataclass
class Subspace:
    """Columns (indices into the searched columns) a plan may use, and layers held at one column."""

    name: str
    columns: list[int]
    fixed: dict[int, int] = field(default_factory=dict)  # layer -> column


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise BudgetError(f"--target {target!r}: expected one of {list(TARGETS)}")
    return target


def vllm_dtype_of(name: str) -> str | None:
    """The vLLM dtype whose K/V formats a candidate is, or None (16-bit is the skipped state)."""
    k, v, group, residual = parse_candidate(name)
    return next((dtype for dtype, kv in VLLM_DTYPES.items() if kv == (k, v) and group is None and residual is None), None)


def _refuse(names: list[str], bad: list[str], target: str, what: str) -> None:
    if bad:
        raise BudgetError(f"--target {target} cannot store {bad}: {what}; choose --formats among what it runs "
                          f"(searched: {names})")


def vllm_subspaces(names: list[str], shape: ModelShape) -> list[Subspace]:
    """One space per dtype: each layer is that dtype or skipped (16-bit); vLLM's forced skips fixed."""
    full = [j for j, n in enumerate(names) if n.upper() == "K16V16"]
    dtypes = {j: vllm_dtype_of(n) for j, n in enumerate(names) if j not in full}
    _refuse(names, [names[j] for j, d in dtypes.items() if d is None], "vllm",
            "released vLLM stores one --kv-cache-dtype (or 16 bits) per layer")
    if not full:
        raise BudgetError("--target vllm needs K16V16 among --formats: it is what a skipped layer stores")
    num_layers = shape.model_layer(shape.num_layers - 1) + 1
    spaces = []
    for j, dtype in dtypes.items():
        forced = set(vllm_forced_skips(dtype, num_layers, shape.layer_ids is not None))
        fixed = {i: full[0] for i in range(shape.num_layers) if shape.model_layer(i) in forced}
        spaces.append(Subspace(dtype, [full[0], j], fixed))
    return spaces


def _llama_cpp_columns(names: list[str], target: str) -> list[int]:
    ok = [j for j, n in enumerate(names) if parse_candidate(n)[2:] == (None, None)
          and all(label in LLAMA_CPP_LABELS for label in parse_candidate(n)[:2])]
    _refuse(names, [n for j, n in enumerate(names) if j not in ok], target, "llama.cpp's cache types are f16, q8_0, q4_0, "
            "q4_1, q5_0 and q5_1")
    return ok


def segment_front(cost: np.ndarray, memory: np.ndarray, columns: list[int], max_ends: int) -> list[tuple[list[int], float, float]]:
    """The exact Pareto front of plans made of three runs of layers, [0, N), [N, L − M), [L − M, L),
    each at one column (N, M ≤ ``max_ends``; N = M = 0 is a uniform plan): every such plan is
    enumerated, so the front is exact for the additive objective. Returns (column per layer,
    cost, memory), memory ascending."""
    layers = cost.shape[0]
    prefix_cost = np.vstack([np.zeros(len(columns)), np.cumsum(cost[:, columns], axis=0)])  # (L+1, C)
    prefix_memory = np.vstack([np.zeros(len(columns)), np.cumsum(memory[:, columns], axis=0)])
    best: list[tuple[float, float, tuple]] = []
    c = len(columns)
    for n in range(0, min(max_ends, layers) + 1):
        for m in range(0, min(max_ends, layers - n) + 1):
            if n + m == layers and n and m:
                continue
            spans = [(0, n), (n, layers - m), (layers - m, layers)]
            seg_cost = [prefix_cost[b] - prefix_cost[a] for a, b in spans]
            seg_memory = [prefix_memory[b] - prefix_memory[a] for a, b in spans]
            total_cost = seg_cost[0][:, None, None] + seg_cost[1][None, :, None] + seg_cost[2][None, None, :]
            total_memory = seg_memory[0][:, None, None] + seg_memory[1][None, :, None] + seg_memory[2][None, None, :]
            flat_cost, flat_memory = total_cost.ravel(), total_memory.ravel()
            keep = front_indices(flat_cost, flat_memory)
            for k in keep:
                a, b, d = np.unravel_index(k, (c, c, c))
                best.append((float(flat_memory[k]), float(flat_cost[k]), (n, m, int(a), int(b), int(d))))
    best.sort()
    out = []
    for k in front_indices(np.array([b[1] for b in best]), np.array([b[0] for b in best])):
        mem, cst, (n, m, a, b, d) = best[k]
        out.append(([columns[a]] * n + [columns[b]] * (layers - n - m) + [columns[d]] * m, cst, mem))
    return out


def engine_front(target: str, names: list[str], cost: np.ndarray, memory: np.ndarray) -> list[tuple[list[int], float, float]]:
    """The exact front of the llama.cpp targets (small enough to enumerate)."""
    columns = _llama_cpp_columns(names, target)
    max_ends = 0 if target == "llama.cpp" else cost.shape[0]
    return segment_front(cost, memory, columns, max_ends)
