"""``kvtune search``: from a profile to a Pareto front and one chosen, measured plan.

1. Memory of every (layer, pair) in the budget's unit; an impossible budget stops here.
2. Intra-layer pruning and inter-layer clustering (:mod:`kvtune.search.space`).
3. NSGA-II over the clustered space (:mod:`kvtune.search.nsga`), checked against the exact
   optimum of the additive objective (:mod:`kvtune.search.exact`) at a grid of budgets.
4. ``verify`` best predicted plans under the budget (and the exact optimum) race on verification
   windows — text that neither calibration nor held-out evaluation uses — together with the
   uniform plans that fit the budget (:mod:`kvtune.search.verify`), and the winner is the chosen
   plan. The uniform plans join as rows of source ``uniform``: at high budgets the predicted
   impacts are near zero and cannot rank plans, and a user should never be handed a mixed plan
   that measures worse than the obvious uniform one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kvtune.distributed import ranks
from kvtune.errors import ModelError
from kvtune.formats import CALIBRATED
from kvtune.plan import LayerPlan, ModelShape, Plan, fit_candidate, parse_candidate
from kvtune.profiling.artifact import Profile
from kvtune.quant import QuantSpec
from kvtune.search.budget import Budget, BudgetError, parse_budget
from kvtune.search.exact import evaluate, exact_optimum
from kvtune.search.nsga import nsga2_front
from kvtune.search.space import SearchSpace, build_space, front_indices, nondominated
from kvtune.search.targets import Subspace, check_target, engine_front, vllm_subspaces
from kvtune.search.verify import RaceResult, paired_gap, race

UNIFORM_REFERENCES = ("k8v8", "k8v4", "k4v8", "k4v4", "k4v2", "k2v4", "k2v2")
FRONT_FILE, PLOT_FILE, PLAN_FILE, META_FILE = "front.csv", "front.png", "plan.json", "search.json"


@dataclass
class SearchSettings:
    profile: str = "outputs/profile"
    budget: str = "3.25bits"
    batch: int = 1
    context: int = 32768  # context for the bytes column when the budget is in bits
    groups: int = 8
    seed: int = 0
    pop_size: int = 100  # doubled while the front fills the population (kvtune.search.nsga) ...
    max_pop_size: int = 1600  # ... up to this
    generations: int = 150
    gap_budgets: int = 12  # budgets at which NSGA-II is checked against the exact optimum
    gap_tolerance: float = 0.02
    verify: int = 3
    verify_uniform: bool = True  # measure the uniform plans within budget beside the front's best
    formats: str | None = None  # a set or list of pairs (kvtune.plan.resolve_formats); None: all profiled
    # What runs the plan (kvtune.search.targets): "kvtune" (any candidate per layer), "vllm",
    # "llama.cpp", "ik-llama.cpp"; None: "vllm" for the vllm-<dtype> / vllm-released sets, else "kvtune".
    target: str | None = None
    verify_windows: int = 16  # at most; the race stops early once one plan is clearly best
    verify_round: int = 4  # windows per round of the race
    verify_alpha: float = 0.05  # the race's error rate: overturning the best prediction, dropping a plan as good as the leader
    verify_seq_len: int | None = None  # tokens per verification window; None: the profile's own window length
    # What the race compares: "nll" (per-window NLL on verification text) or "lm-eval:TASK" (per-item
    # error, 1 − the task's score, of an lm-evaluation-harness task; kvtune_wiki_* built from the
    # verification split). With a task, --verify-windows counts items.
    verify_metric: str = "nll"
    model: str | None = None  # default: the profile's
    data: str | None = None  # default: the profile's
    dtype: str | None = None  # default: the profile's
    device_map: str | None = None  # accelerate placement for verification (see kvtune.models.load_model)
    max_memory: str | None = None
    device: str = "cpu"


@dataclass
class SearchResult:
    front: pd.DataFrame
    plan: Plan
    meta: dict


def layer_plans(profile: Profile) -> list[LayerPlan]:
    """The profile's candidate pairs as layer settings (its modes, group and residual)."""
    s = profile.meta["settings"]
    return [
        LayerPlan.from_pair(p, key_mode=s["key_mode"], value_mode=s["value_mode"], group_size=s["group_size"], residual=s["residual"])
        for p in profile.pairs
    ]


def allowed_pairs(profile: Profile, formats: str | None) -> list[int]:
    """Columns of the profile that ``--formats`` admits; every pair it names must have been profiled."""
    if formats is None:
        return list(range(len(profile.pairs)))
    from kvtune.plan import resolve_formats

    wanted = resolve_formats(formats)
    s = profile.meta["settings"]
    # As the profile named them: its own group or window dropped, groups fitted to the head size.
    per_token = "per-token" in (s["key_mode"], s["value_mode"])
    wanted = list(dict.fromkeys(fit_candidate(p, s["group_size"], s["residual"], profile.shape.group_dim, per_token) for p in wanted))
    missing = [p for p in wanted if p not in profile.pairs]
    if missing:
        raise BudgetError(
            f"--formats {formats} asks for pairs the profile does not have: {missing}; profile them "
            f"(kvtune profile --formats {formats}) or choose from {profile.pairs}"
        )
    return [profile.pairs.index(p) for p in wanted]


def memory_tables(candidates: list[LayerPlan], shape: ModelShape, budget: Budget, context: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(nominal-bit shares, bytes per layer) of each candidate as (layers, pairs) arrays, and the context used for bytes."""
    context = budget.context or context
    n = shape.num_layers
    # A layer's share of the mean nominal width is its elements' share (layers alike: 1/n each).
    total = sum(shape.elements(i) for i in range(n))
    bits = np.array([[c.element_bits(shape, i) / total for c in candidates] for i in range(n)], dtype=float)
    # Sliding-window layers hold only their window, so a pair's bytes depend on the layer.
    per_layer_bytes = np.array([[c.cache_bytes(context, shape, budget.batch, i) for c in candidates]
                                for i in range(n)], dtype=float)
    return bits, per_layer_bytes, context


def _budget_text(budget: Budget, value: float) -> str:
    if budget.kind == "bits":
        return f"{value:.4g}bits"
    return f"{value / 2**20:.1f}MiB@{budget.context}"


def plan_from_pairs(profile: Profile, pair_indices: list[int], name: str, metadata: dict | None = None) -> Plan:
    """A plan of one profile column per layer; fp8 / nvfp4 sides carry the profile's calibrated amax."""
    candidates = layer_plans(profile)
    amax = profile.meta.get("amax")

    def calibrated(spec: QuantSpec, which: str, layer: int) -> QuantSpec:
        if amax is None or spec.format not in CALIBRATED:
            return spec
        return dataclasses.replace(spec, amax=amax[which][layer])

    layers = [LayerPlan(calibrated(candidates[j].key, "key", i), calibrated(candidates[j].value, "value", i), candidates[j].residual)
              for i, j in enumerate(pair_indices)]
    return Plan(
        tuple(layers),
        name=name,
        model=profile.meta.get("model", ""),
        shape=profile.shape,
        metadata=metadata or {},
    )


def _memory_figures(plan: Plan, shape: ModelShape, context: int, batch: int) -> dict:
    return {"nominal_bits": plan.nominal_bits(), "cache_bytes": plan.cache_bytes(shape, context, batch), "context": context,
            "batch": batch, "effective_bits": plan.effective_bits(shape, context, batch)}


def check_against_exact(space: SearchSpace, F: np.ndarray, budgets: np.ndarray) -> pd.DataFrame:
    rows = []
    for b in budgets:
        x = exact_optimum(space, b)
        if x is None:
            continue
        optimum, _ = evaluate(space, x)
        within = F[F[:, 1] <= b * (1 + 1e-9)]
        found = within[:, 0].min() if len(within) else np.inf
        gap = (found - optimum) / optimum if optimum > 0 else (0.0 if found == optimum else np.inf)
        rows.append({"budget": float(b), "exact": optimum, "nsga2": float(found), "gap": float(gap)})
    return pd.DataFrame(rows)


def check_budget_fits(budget: Budget, text: str, memory: np.ndarray) -> list[str]:
    """Refuse a budget below the smallest plan of the (layers, pairs) ``memory``; notes for one above the largest."""
    smallest, largest = memory.min(axis=1).sum(), memory.max(axis=1).sum()
    if smallest > budget.value * (1 + 1e-12):
        raise BudgetError(
            f"budget {text} is impossible with the profiled pairs: the smallest feasible budget is "
            f"{_budget_text(budget, smallest)}"
        )
    if budget.value > largest * (1 + 1e-9):
        return [f"budget {text} is above the largest plan ({_budget_text(budget, largest)}, every layer at its widest "
                "pair): the search is unconstrained and picks the best predicted plan"]
    return []


def check_settings(settings: SearchSettings, out: str | Path, overwrite: bool = False) -> tuple[Budget, Profile]:
    """Every input of a search checked before any work: budget, profile (and its fit to the model it
    names), formats, placement, data, and the output folder."""
    from kvtune import inputs
    from kvtune.data import check_data

    budget = parse_budget(settings.budget, settings.batch)
    profile = Profile.load(settings.profile)
    allowed_pairs(profile, settings.formats)
    inputs.check_counts((("--verify", settings.verify, 0), ("--verify-windows", settings.verify_windows, 1),
                         ("--groups", settings.groups, 1), ("--generations", settings.generations, 1),
                         ("--pop-size", settings.pop_size, 4), ("--context", settings.context, 1))
                        + ((("--verify-seq-len", settings.verify_seq_len, 2),) if settings.verify_seq_len is not None else ()), BudgetError)
    if not isinstance(settings.verify_alpha, (int, float)) or not 0 < settings.verify_alpha < 1:
        raise BudgetError(f"--verify-alpha {settings.verify_alpha!r}: the race's error rate must be between 0 and 1 (e.g. 0.05)")
    model = settings.model or profile.meta["settings"]["model"]
    # The profile's shape against its model's config: a plan of the wrong layer count is never written,
    # with or without verification (which would load the model anyway).
    if settings.verify:
        shape = inputs.model_shape(model, settings.device, settings.dtype, settings.device_map, settings.max_memory)
    else:  # no model is needed: check against a config already on disk, never convert or ask the hub for one
        from kvtune.models import config_on_disk

        try:
            shape = inputs.model_shape(model) if config_on_disk(model) else None
        except ModelError:
            shape = None
    if shape is not None:
        profile.check_model(shape, model)
    if settings.verify:
        check_data(settings.data or profile.meta["settings"]["data"])
    if settings.verify_metric != "nll":
        if not settings.verify_metric.startswith("lm-eval:") or not settings.verify_metric[len("lm-eval:"):].strip():
            raise BudgetError(f"--verify-metric {settings.verify_metric!r}: give 'nll' or 'lm-eval:TASK' (e.g. lm-eval:kvtune_wiki_next)")
        from kvtune.lmeval import require_lm_eval

        require_lm_eval()
    inputs.check_out_dir(out, "search", META_FILE, settings, overwrite, result_files=(FRONT_FILE, PLAN_FILE, PLOT_FILE))
    return budget, profile


def run_search(settings: SearchSettings, out: str | Path, progress: bool = True, overwrite: bool = False) -> SearchResult:
    group = ranks()  # under torchrun: the same search on every rank, the race's windows split, rank 0 writes
    budget, profile = group.checked(check_settings, settings, out, overwrite)  # everything fails here, before any work
    progress = progress and group.is_main
    if settings.verify and settings.verify_metric != "nll" and group.size > 1:
        raise ModelError(f"--verify-metric {settings.verify_metric} races in one process (lm-eval splits its own work); "
                         "start it without torchrun, or race on --verify-metric nll")
    out = Path(out)
    started = time.perf_counter()
    allowed = allowed_pairs(profile, settings.formats)
    pairs = [parse_candidate(profile.pairs[j])[:2] for j in allowed]
    cost = profile.matrix("taylor")[:, allowed]
    bits, nbytes, context = memory_tables(layer_plans(profile), profile.shape, budget, settings.context)
    memory = (bits if budget.kind == "bits" else nbytes)[:, allowed]
    notes = check_budget_fits(budget, settings.budget, memory)
    smallest = memory.min(axis=1).sum()

    target = search_target(settings, [profile.pairs[j] for j in allowed])
    names = [profile.pairs[j] for j in allowed]
    # Plans as a column of the profile per layer, with their (predicted loss, memory).
    candidates: list[tuple[str, list[int], float, float]] = []
    spaces_meta = []
    if target in ("llama.cpp", "ik-llama.cpp"):
        for per_layer, c, m in engine_front(target, names, cost, memory):
            if m <= budget.value * (1 + 1e-12):
                candidates.append(("exact", [allowed[j] for j in per_layer], c, m))
        gaps = pd.DataFrame(columns=["budget", "exact", "nsga2", "gap"])
        pop_size = 0
        spaces_meta.append({"name": target, "enumerated_plans": len(candidates)})
    else:
        subspaces = [Subspace("kvtune", list(range(len(allowed))))] if target == "kvtune" else vllm_subspaces(names, profile.shape)
        bar = tqdm(total=settings.generations * len(subspaces), desc="search: NSGA-II", disable=not progress, leave=False)
        gap_tables, smallest_runnable, pop_size = [], np.inf, 0
        for sub in subspaces:
            sub_cost, sub_memory = cost[:, sub.columns], memory[:, sub.columns]
            fixed = {layer: sub.columns.index(j) for layer, j in sub.fixed.items()}
            space = build_space([pairs[j] for j in sub.columns], sub_cost, sub_memory, settings.groups, fixed)
            least = sum(space.group_memory(g).min() for g in range(len(space.groups)))
            smallest_runnable = min(smallest_runnable, least)
            if least > budget.value * (1 + 1e-12):
                spaces_meta.append({"name": sub.name, "skipped": f"no plan of this space fits the budget (the smallest is "
                                                                 f"{_budget_text(budget, least)})"})
                bar.update(settings.generations)
                continue
            if space.size <= np.log10(ENUMERATE_UP_TO):  # small enough to list every plan: the front is exact
                found = [("exact", x) for x in enumerate_front(space, budget.value)]
                bar.update(settings.generations)
                spaces_meta.append({"name": sub.name, "enumerated_plans": int(round(10**space.size))})
            else:
                X, F, pop_size = nsga2_front(space, budget.value, settings.seed, settings.pop_size, settings.generations, bar,
                                             settings.max_pop_size)
                gap_tables.append(check_against_exact(space, F, np.linspace(smallest, budget.value, settings.gap_budgets)))
                exact_x = exact_optimum(space, budget.value)
                found = [("nsga2", x) for x in X]
                if exact_x is not None and not any(np.array_equal(exact_x, x) for x in X):
                    found.append(("exact", exact_x))
            for source, x in found:
                c, m = evaluate(space, x)
                candidates.append((source, [allowed[sub.columns[j]] for j in space.layer_pairs(x)], c, m))
            described = {"name": sub.name, "log10_full": space.full_size, "log10_after_pruning": space.pruned_size,
                         "log10_after_clustering": space.size, "groups": space.groups, "fixed_layers": sorted(sub.fixed),
                         "choices": [[profile.pairs[allowed[sub.columns[j]]] for j in c] for c in space.choices]}
            if spaces_meta and spaces_meta[-1].get("name") == sub.name:  # enumerated: one entry with both
                spaces_meta[-1] = {**described, **spaces_meta[-1]}
            else:
                spaces_meta.append(described)
        bar.close()
        gaps = combine_gaps(gap_tables)
    nsga_seconds = time.perf_counter() - started
    if not candidates:
        least = f" (the smallest is {_budget_text(budget, smallest_runnable)})" if target == "vllm" else ""
        raise BudgetError(f"no plan {target} can run fits budget {settings.budget}{least}")

    # The front table: the non-dominated plans found (NSGA-II's and the exact optima at the budget).
    # Rounded so that equal memory summed in another order still compares equal.
    objectives = np.array([(c, m) for _, _, c, m in candidates])
    rounded = np.round(objectives, 9)
    kept = nondominated(rounded[:, 0], rounded[:, 1])
    plans, records = [], []
    for i, j in enumerate(kept):
        source, columns, _, _ = candidates[j]
        plan = plan_from_pairs(profile, columns, name=f"front-{i}")
        plans.append(plan)
        records.append({"id": i, "source": source, "predicted_loss": objectives[j, 0],
                        **_memory_figures(plan, profile.shape, context, budget.batch),
                        "pairs": ",".join(profile.pairs[c] for c in columns), "verified_nll": np.nan, "chosen": False})
    # The measured choice: the best predicted plans, the exact optimum and the uniform plans in budget.
    if settings.verify:
        # The best predicted plans, and the exact optima at the budget (the best three where each
        # engine dtype has its own).
        exact_rows = sorted((i for i, j in enumerate(kept) if candidates[j][0] == "exact"), key=lambda i: records[i]["predicted_loss"])[:3]
        to_verify = sorted(range(len(records)), key=lambda i: records[i]["predicted_loss"])[: settings.verify]
        to_verify = list(dict.fromkeys(to_verify + exact_rows))
        if settings.verify_uniform:
            for column, layer_columns in uniform_references(target, profile, allowed, names):
                pair = profile.pairs[column]
                if sum(memory[i, allowed.index(c)] for i, c in enumerate(layer_columns)) > budget.value * (1 + 1e-12):
                    continue
                plan = plan_from_pairs(profile, layer_columns, name=f"uniform:{pair.lower()}")
                names_text = ",".join(profile.pairs[c] for c in layer_columns)
                if names_text in {r["pairs"] for r in records}:
                    continue  # already on the front
                plans.append(plan)
                predicted = sum(cost[i, allowed.index(c)] for i, c in enumerate(layer_columns))
                records.append({"id": len(records), "source": "uniform", "predicted_loss": float(predicted),
                                **_memory_figures(plan, profile.shape, context, budget.batch),
                                "pairs": names_text, "verified_nll": np.nan, "chosen": False})
                to_verify.append(len(records) - 1)
        front = pd.DataFrame(records)
        # The profile's best prediction is the race's incumbent: it stands unless measured beyond noise.
        incumbent = min(range(len(to_verify)), key=lambda k: records[to_verify[k]]["predicted_loss"])
        result = _verify(profile, settings, [plans[i] for i in to_verify], progress, incumbent)
        front.loc[to_verify, "verified_nll"] = result.mean
        front.loc[to_verify, "verified_windows"] = result.windows
        front.loc[to_verify, "finished_race"] = [k in result.finalists for k in range(len(to_verify))]
        winner_nll = result.nll[result.winner]
        for row, nll in zip(to_verify, result.nll):
            seen = np.isfinite(nll)
            gap, se = paired_gap(nll[seen], winner_nll[seen])
            front.loc[row, ["verified_gap", "verified_gap_se"]] = gap, se
        chosen = to_verify[result.winner]
        race_summary = _race_summary(front, to_verify, result, settings.verify_alpha)
        if race_summary["note"]:
            notes.append(race_summary["note"])
    else:
        race_summary = None
        front = pd.DataFrame(records)
        chosen = int(front["predicted_loss"].idxmin())
    front.loc[chosen, "chosen"] = True

    row = front.loc[chosen]
    plan = plans[chosen]
    plan.name = f"kvtune:{settings.budget}"
    plan.metadata = {
        "budget": settings.budget,
        "predicted_loss": float(row["predicted_loss"]),
        "verified_nll": None if np.isnan(row["verified_nll"]) else float(row["verified_nll"]),
        **_memory_figures(plan, profile.shape, context, budget.batch),
        "profile": str(settings.profile),
        "search": {k: v for k, v in asdict(settings).items() if k not in ("profile", "device")},
    }
    meta = {
        "settings": asdict(settings),
        "notes": notes,
        "budget": {"text": settings.budget, **asdict(budget)},
        "target": target,
        "space": spaces_meta[0] if len(spaces_meta) == 1 else {"spaces": spaces_meta},
        "nsga2_seconds": nsga_seconds,
        "nsga2_pop_size": pop_size,
        "front_size": int(len(front)),
        "exact_check": {"tolerance": settings.gap_tolerance, "max_gap": float(gaps["gap"].max()) if len(gaps) else None,
                        "budgets": gaps.to_dict(orient="records")},
        "chosen": int(chosen),
        "race": race_summary,
        "uniform_ties": uniform_ties(front) if settings.verify else [],
        "seconds": time.perf_counter() - started,
        "world_size": group.size,
    }
    # Uniform plans drawn beside the front; a candidate with its own group has its pair's nominal
    # bits, so it is drawn only where memory is in bytes.
    references = [profile.pairs[j] for j in allowed if profile.pairs[j].lower() != "k16v16"
                  and (budget.kind == "bytes" or parse_candidate(profile.pairs[j])[2:] == (None, None))]
    if group.is_main:
        _write(out, front, plan, meta, profile, references, budget, context)
    return SearchResult(front, plan, meta)


# A clustered space with at most this many plans is enumerated instead of searched by NSGA-II.
ENUMERATE_UP_TO = 1024


def enumerate_front(space: SearchSpace, budget: float) -> list[np.ndarray]:
    """Every decision vector of a small space, evaluated; the non-dominated ones within the budget."""
    grids = np.meshgrid(*[np.arange(len(c)) for c in space.choices], indexing="ij")
    X = np.stack([g.ravel() for g in grids], axis=1)
    cost = sum(space.group_cost(g)[X[:, g]] for g in range(len(space.groups)))
    memory = sum(space.group_memory(g)[X[:, g]] for g in range(len(space.groups)))
    fits = np.flatnonzero(memory <= budget * (1 + 1e-12))
    return [X[fits[i]] for i in front_indices(cost[fits], memory[fits])]


def search_target(settings: SearchSettings, names: list[str]) -> str:
    """The engine whose expressible plans the search keeps to (see :class:`SearchSettings`)."""
    from kvtune.formats import released_vllm_set

    if settings.target is not None:
        return check_target(settings.target)
    return "vllm" if settings.formats and released_vllm_set(settings.formats) else "kvtune"


def combine_gaps(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """NSGA-II against the exact optimum over several spaces: the best of each per budget."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return pd.DataFrame(columns=["budget", "exact", "nsga2", "gap"])
    rows = pd.concat(tables).groupby("budget", as_index=False)[["exact", "nsga2"]].min()
    rows["gap"] = [(f - o) / o if o > 0 else (0.0 if f == o else np.inf) for f, o in zip(rows["nsga2"], rows["exact"])]
    return rows


def uniform_references(target: str, profile: Profile, allowed: list[int], names: list[str]) -> list[tuple[int, list[int]]]:
    """(column, column per layer) of the plain plans a user of the target could pick without kvtune:
    every layer at one candidate, or for vLLM each dtype with the layers vLLM itself skips."""
    if target != "vllm":
        return [(column, [column] * profile.num_layers) for column in allowed]
    full = next(c for c, n in zip(allowed, names) if n.upper() == "K16V16")
    out = []
    for sub in vllm_subspaces(names, profile.shape):
        column = allowed[sub.columns[1]]
        out.append((column, [full if i in sub.fixed else column for i in range(profile.num_layers)]))
    return out


def uniform_ties(front: pd.DataFrame) -> list[dict]:
    """The uniform plans the race could not tell from a chosen mixed plan: still in the race at its
    end (measured on every window the chosen plan was, never significantly behind). Near 6-8 bits the
    verification often ends so; a user may then prefer the uniform plan, which every engine loads."""
    chosen = front.loc[front["chosen"]].iloc[0]
    if len(set(chosen["pairs"].split(","))) == 1:
        return []
    ties = front[(front["source"] == "uniform") & (front["finished_race"] == True)]  # noqa: E712 - NaN where not raced
    return [{"pair": row["pairs"].split(",")[0], "nominal_bits": float(row["nominal_bits"]),
             "gap": float(row["verified_gap"]), "gap_se": float(row["verified_gap_se"]),
             "windows": int(row["verified_windows"])} for _, row in ties.iterrows()]


def _race_summary(front: pd.DataFrame, to_verify: list[int], result, alpha: float) -> dict:
    """What the race decided against the prediction, with a note where they disagree."""
    incumbent, winner, leader = (to_verify[k] for k in (result.incumbent, result.winner, result.leader))
    summary = {"alpha": alpha, "predicted_best": int(incumbent), "chosen": int(winner), "measured_best": int(leader),
               "overturned": bool(result.overturned), "note": None}
    label = lambda row: (f"uniform {front.loc[row, 'pairs'].split(',')[0]}" if front.loc[row, "source"] == "uniform"  # noqa: E731
                         else f"front plan {row}")
    # The front already holds each raced plan's paired gap to the chosen one.
    gap = lambda row: "{:+.4f} ± {:.4f}".format(*front.loc[row, ["verified_gap", "verified_gap_se"]])  # noqa: E731
    if result.overturned:
        summary["note"] = (f"the race overturned the profile's best prediction ({label(incumbent)}): measured "
                           f"{gap(incumbent)} nats/token behind the chosen plan, beyond noise at alpha {alpha:g}")
    elif leader != winner:
        summary["note"] = (f"the race measured {label(leader)} {gap(leader)} nats/token against the "
                           f"profile's best prediction, within noise at alpha {alpha:g}: the prediction stands")
    return summary


def _verify(profile: Profile, settings: SearchSettings, plans: list[Plan], progress: bool, incumbent: int = 0) -> RaceResult:
    import torch

    from kvtune.data import load_windows
    from kvtune.errors import DataError
    from kvtune.models import load_model, model_shape
    from kvtune.perplexity import token_nll

    meta_settings = profile.meta["settings"]
    model, tokenizer = load_model(settings.model or meta_settings["model"], settings.device, settings.dtype or meta_settings.get("dtype"),
                                  settings.device_map, settings.max_memory)
    profile.check_model(model_shape(model), settings.model or meta_settings["model"])
    try:
        # The race judges plans at the context the profile measured, unless told another.
        windows = load_windows(tokenizer, "verification", settings.verify_seq_len or meta_settings["seq_len"], settings.verify_windows, settings.seed,
                               settings.data or meta_settings["data"])
    except DataError as e:  # the data cannot know which option asked for the windows
        raise DataError(f"verification: {e}; lower --verify-windows") from None
    # Rounds in random order: consecutive windows often come from one article.
    windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(settings.seed))]
    if settings.verify_metric != "nll":
        return _verify_by_task(model, tokenizer, settings, plans, progress, meta_settings, incumbent)
    bar = tqdm(total=len(plans) * len(windows), desc="search: verify (plan x window)", disable=not progress, leave=False)

    def measure(i: int, part: slice) -> list[float]:
        return token_nll(model, windows[part], plans[i]).mean(dim=1).tolist()

    result = race(measure, len(plans), len(windows), settings.verify_round, settings.verify_alpha,
                  on_measure=bar.update, incumbent=incumbent)
    bar.close()
    return result


def _verify_by_task(model, tokenizer, settings: SearchSettings, plans: list[Plan], progress: bool, meta_settings: dict,
                    incumbent: int = 0) -> RaceResult:
    """The race on an lm-eval task's items: each plan's per-item error (1 − score), paired by item.
    0/1 scores tie on most items, so the race judges them with a pseudo-count (kvtune.search.verify)."""
    import numpy as np

    from kvtune import lmeval

    task = settings.verify_metric[len("lm-eval:"):].strip()
    lm_settings = lmeval.LmEvalSettings(tasks=[task], seed=settings.seed, split="verification",
                                        data=settings.data or meta_settings["data"],
                                        next_items=max(settings.verify_windows, 200), needle_items=max(settings.verify_windows, 40))
    manager = lmeval.task_manager(tokenizer, lm_settings)
    items = np.random.default_rng(settings.seed).permutation(settings.verify_windows).tolist()
    bar = tqdm(total=len(plans) * len(items), desc=f"search: verify on {task} (plan x item)", disable=not progress, leave=False)

    def measure(i: int, part: slice) -> list[float]:
        wanted = items[part]
        result = lmeval.run_tasks(lmeval.plan_lm(model, tokenizer, plans[i]), manager, lm_settings,
                                  samples={task: wanted}, log_samples=True)
        if task not in result.get("samples", {}):
            raise ModelError(f"--verify-metric lm-eval:{task}: lm-eval returned no per-item results for {task} "
                             "(give one task, not a group)")
        rows = {row["doc_id"]: row for row in result["samples"][task]}
        metric = rows[wanted[0]]["metrics"][0]  # the task's first metric: acc, exact_match, …
        return [1.0 - float(rows[d][metric]) for d in wanted]

    result = race(measure, len(plans), len(items), max(settings.verify_round, 8), settings.verify_alpha, on_measure=bar.update,
                  binary=True, incumbent=incumbent)
    bar.close()
    return result


def _write(out: Path, front, plan, meta, profile, references, budget, context) -> None:
    from kvtune import files

    meta_text = json.dumps(meta, indent=2, default=float) + "\n"
    files.write_all(out, {
        FRONT_FILE: lambda p: front.to_csv(p, index=False),
        PLAN_FILE: lambda p: p.write_text(files.dumps(plan.to_dict())),
        PLOT_FILE: lambda p: _plot(p, front, profile, references, budget, context),
        META_FILE: lambda p: p.write_text(meta_text),  # last, with the settings: marks a finished search
    })


def uniform_reference(profile: Profile, pair: str, context: int, batch: int) -> dict:
    """Predicted loss and memory of a uniform plan under the profile's settings."""
    j = [p.lower() for p in profile.pairs].index(pair.lower())
    plan = plan_from_pairs(profile, [j] * profile.num_layers, name=f"uniform:{pair.lower()}")
    return {"plan": plan, "predicted_loss": float(profile.matrix("taylor")[:, j].sum()),
            **_memory_figures(plan, profile.shape, context, batch)}


def _plot(path: Path, front: pd.DataFrame, profile: Profile, references: list[str], budget: Budget, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_col, x_label = ("nominal_bits", "mean nominal bits") if budget.kind == "bits" else ("cache_bytes", f"cache MiB at {context} tokens")
    scale = 1.0 if budget.kind == "bits" else 2**-20
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    predicted = front[front["source"] != "uniform"]
    ax.plot(predicted[x_col] * scale, predicted["predicted_loss"], "o-", ms=3, label="kvtune front (NSGA-II)")
    for pair in references:
        ref = uniform_reference(profile, pair, context, budget.batch)
        ax.plot(ref[x_col] * scale, ref["predicted_loss"], "s", color="tab:red", ms=5)
        ax.annotate(pair, (ref[x_col] * scale, ref["predicted_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chosen = front[front["chosen"]]
    ax.plot(chosen[x_col] * scale, chosen["predicted_loss"], "*", color="gold", ms=14, mec="k", label="chosen plan")
    ax.axvline(budget.value * scale, color="gray", ls="--", lw=1, label=f"budget {budget.text}")
    ax.set_xlabel(x_label)
    ax.set_ylabel("predicted loss increase (Σ taylor)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{profile.meta.get('model')}: Pareto front vs uniform plans", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
