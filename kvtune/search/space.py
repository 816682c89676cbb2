"""The search space: per-layer pruning of dominated pairs, then layers clustered into groups that
share one pair. Pure numpy/scikit-learn over the profile's table: no model is loaded here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def nondominated(cost: np.ndarray, memory: np.ndarray) -> list[int]:
    """Indices of the options no other option dominates (no more memory, no more cost, and
    strictly less of one). Ties (same cost and memory) keep the first."""
    keep = []
    for i in range(len(cost)):
        dominated = False
        for j in range(len(cost)):
            if j == i:
                continue
            no_worse = memory[j] <= memory[i] and cost[j] <= cost[i]
            better = memory[j] < memory[i] or cost[j] < cost[i]
            if no_worse and (better or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


def front_indices(cost: np.ndarray, memory: np.ndarray) -> list[int]:
    """Indices on the (memory, cost) Pareto front, memory ascending; ties keep the first. The
    O(n log n) form of :func:`nondominated`, for enumerations too large for pairwise checks."""
    order = np.lexsort((cost, memory))
    keep, lowest = [], np.inf
    for k in order:
        if cost[k] < lowest - 1e-15:
            keep.append(int(k))
            lowest = cost[k]
    return keep


def prune_layers(cost: np.ndarray, memory: np.ndarray) -> list[list[int]]:
    """Per layer (rows), the pair indices (columns) that survive intra-layer pruning."""
    return [nondominated(cost[layer], memory[layer]) for layer in range(cost.shape[0])]


def find_outliers(features: np.ndarray, z: float = 3.5) -> list[int]:
    """Layers whose mean log-sensitivity is far from the others' (robust z-score on the median
    absolute deviation): they get a group of their own."""
    level = features.mean(axis=1)
    median = np.median(level)
    mad = np.median(np.abs(level - median)) * 1.4826
    if mad == 0:
        return []
    return [int(i) for i in np.flatnonzero(np.abs(level - median) / mad > z)]


def cluster_layers(features: np.ndarray, n_groups: int, outliers: list[int] = ()) -> list[list[int]]:
    """Deterministic Ward clustering of layers by their sensitivity profile; outliers stand alone.
    Returns groups as sorted layer lists, ordered by their first layer."""
    from sklearn.cluster import AgglomerativeClustering

    layers = [i for i in range(len(features)) if i not in set(outliers)]
    groups = [[i] for i in outliers]
    n_rest = min(max(n_groups - len(outliers), 1), len(layers))
    if layers:
        if n_rest == len(layers):
            labels = np.arange(len(layers))
        else:
            labels = AgglomerativeClustering(n_clusters=n_rest, linkage="ward").fit_predict(features[layers])
        for label in np.unique(labels):
            groups.append([layers[i] for i in np.flatnonzero(labels == label)])
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


@dataclass
class SearchSpace:
    """Groups of layers, each choosing one pair among ``choices[g]`` (pair indices, memory ascending)."""

    pairs: list[tuple[int, int]]
    cost: np.ndarray  # (layers, pairs) predicted loss increase
    memory: np.ndarray  # (layers, pairs) memory in the budget's unit
    groups: list[list[int]]
    choices: list[list[int]]
    full_size: float  # log10 of the unpruned, unclustered space
    pruned_size: float  # log10 after intra-layer pruning

    @property
    def size(self) -> float:
        return float(sum(np.log10(len(c)) for c in self.choices))

    def group_cost(self, g: int) -> np.ndarray:
        return self.cost[self.groups[g]][:, self.choices[g]].sum(axis=0)

    def group_memory(self, g: int) -> np.ndarray:
        return self.memory[self.groups[g]][:, self.choices[g]].sum(axis=0)

    def layer_pairs(self, x) -> list[int]:
        """Pair index per layer for a decision vector (one choice index per group)."""
        out = [0] * self.cost.shape[0]
        for g, layers in enumerate(self.groups):
            for layer in layers:
                out[layer] = self.choices[g][int(x[g])]
        return out


def build_space(pairs, cost: np.ndarray, memory: np.ndarray, n_groups: int, fixed: dict[int, int] | None = None) -> SearchSpace:
    """Pruned and clustered space; ``fixed`` (layer → column) holds layers an engine never lets
    change at one column, each in a group of its own with that single choice."""
    fixed = fixed or {}
    kept = [[fixed[layer]] if layer in fixed else k for layer, k in enumerate(prune_layers(cost, memory))]
    quantized = [j for j, p in enumerate(pairs) if p != (16, 16)] or list(range(len(pairs)))
    free = [i for i in range(cost.shape[0]) if i not in fixed]
    groups = [[i] for i in fixed]
    if free:
        features = np.log10(np.maximum(cost[free][:, quantized], 1e-12))
        clustered = cluster_layers(features, max(n_groups - len(fixed), 1), find_outliers(features))
        groups += [[free[i] for i in g] for g in clustered]
    groups = sorted(groups, key=lambda g: g[0])
    choices = []
    for layers in groups:
        union = sorted({j for layer in layers for j in kept[layer]})
        summed_cost, summed_memory = cost[layers][:, union].sum(0), memory[layers][:, union].sum(0)
        survivors = [union[i] for i in nondominated(summed_cost, summed_memory)]
        choices.append(sorted(survivors, key=lambda j: (memory[layers[0], j], cost[layers[0], j])))
    return SearchSpace(
        pairs=list(pairs),
        cost=cost,
        memory=memory,
        groups=groups,
        choices=choices,
        full_size=len(free) * float(np.log10(cost.shape[1])),
        pruned_size=float(sum(np.log10(len(k)) for k in kept)),
    )
