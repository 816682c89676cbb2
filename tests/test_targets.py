"""Searches that keep to what one engine can run: released vLLM, llama.cpp, ik_llama.cpp."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from kvtune.export import export_plan
from kvtune.formats import vllm_forced_skips
from kvtune.plan import LayerPlan, Plan, resolve_formats
from kvtune.profiling.artifact import SCHEMA, SCHEMA_VERSION, Profile
from kvtune.search import SearchSettings, run_search
from kvtune.search.budget import BudgetError
from kvtune.search.targets import segment_front


def _profile(folder, pairs, layers=10, seed=0):
    """Synthetic costs that fall with each side's nominal bits; layers differ in scale; the ends are
    the most sensitive (as real models' first and last layers often are)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 0.7, layers))
    scale[[0, -1]] *= 8
    rows = []
    for layer in range(layers):
        for pair in pairs:
            plan = LayerPlan.from_pair(pair, group_size=8, residual=4)
            k, v = plan.key.bits, plan.value.bits
            cost = 0.0 if (k, v) == (16, 16) else (3 * 2.0 ** -k + 2.0 ** -v) * scale[layer] * rng.uniform(0.8, 1.2)
            rows.append({"layer": layer, "pair": pair, "k_bits": k, "v_bits": v, "nominal_bits": (k + v) / 2,
                         "attn_err": cost, "attn_err_k": cost, "attn_err_v": cost, "taylor": cost, "taylor_signed": cost,
                         "taylor_abs": cost, "taylor_elem": cost, "taylor_fisher": cost, "measured_dnll": np.nan,
                         "measured_kl": np.nan})
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": "synthetic",
            "shape": {"num_layers": layers, "num_kv_heads": 2, "head_dim": 64}, "pairs": pairs,
            "settings": {"key_mode": "per-channel", "value_mode": "per-token", "group_size": 8, "residual": 4,
                         "model": "synthetic", "data": "enwiki"}}
    Profile(pd.DataFrame(rows), meta).save(folder)
    return folder


def _search(tmp_path, profile, budget, **kw):
    settings = SearchSettings(profile=str(profile), budget=budget, groups=4, verify=0, generations=40, **kw)
    return run_search(settings, tmp_path / "s", progress=False, overwrite=True)


def test_vllm_released_search_keeps_one_dtype_and_exports_without_rounding(tmp_path):
    profile = _profile(tmp_path / "p", resolve_formats("vllm-released"))
    result = _search(tmp_path, profile, "7bits", formats="vllm-released")
    assert result.meta["target"] == "vllm"
    quantized = {p for p in result.plan.pairs if p != "K16V16"}
    assert len(quantized) == 1 and result.plan.nominal_bits() <= 7 + 1e-9
    for pairs in result.front["pairs"]:  # every plan on the front is one dtype plus skipped layers
        assert len(set(pairs.split(",")) - {"K16V16"}) <= 1
    exported = export_plan(result.plan, "vllm", tmp_path / "e")
    payload = json.loads(exported.path.read_text())
    assert exported.plan.pairs == result.plan.pairs  # taken as it is: no --nearest
    assert payload["skip_layers"] == [i for i, p in enumerate(result.plan.pairs) if p == "K16V16"]


def test_without_a_target_the_same_search_mixes_dtypes(tmp_path):
    """The contrast that makes the previous test meaningful: an unconstrained search over the same
    table does use several dtypes, which released vLLM cannot take."""
    profile = _profile(tmp_path / "p", resolve_formats("vllm-released"))
    result = _search(tmp_path, profile, "7bits", formats="vllm-released", target="kvtune")
    assert len(set(result.plan.pairs) - {"K16V16"}) > 1
    with pytest.raises(Exception, match="one --kv-cache-dtype"):
        export_plan(result.plan, "vllm", tmp_path / "e")


def test_forced_skips_are_held_16_bit_and_counted(tmp_path, monkeypatch):
    """A dtype vLLM always skips the first and last two layers for: the search never quantizes them."""
    assert vllm_forced_skips("turboquant_k8v4", 10) == [0, 1, 8, 9]
    assert vllm_forced_skips("turboquant_k8v4", 3) == [0, 2] and vllm_forced_skips("turboquant_k8v4", 10, hybrid=True) == []
    assert vllm_forced_skips("int8_per_token_head", 10) == []
    import kvtune.search.targets as targets

    monkeypatch.setattr(targets, "vllm_forced_skips", lambda dtype, n, hybrid=False: [0, 1, n - 2, n - 1] if "int4" in dtype else [])
    profile = _profile(tmp_path / "p", resolve_formats("vllm-int4_per_token_head"))
    result = _search(tmp_path, profile, "10bits", formats="vllm-int4_per_token_head")
    pairs = result.plan.pairs
    assert [pairs[i] for i in (0, 1, 8, 9)] == ["K16V16"] * 4
    assert result.plan.nominal_bits() == pytest.approx(sum(16 if p == "K16V16" else 4 for p in pairs) / 10)
    with pytest.raises(BudgetError, match="8.8bits"):  # 4 layers must stay 16-bit: (4·16 + 6·4)/10 = 8.8 bits at least
        _search(tmp_path, profile, "8bits", formats="vllm-int4_per_token_head")


def test_vllm_target_refuses_formats_vllm_does_not_store(tmp_path):
    profile = _profile(tmp_path / "p", ["K16V16", "K4V4", "K[int8_per_token_head]V[int8_per_token_head]"])
    with pytest.raises(BudgetError, match="cannot store"):
        _search(tmp_path, profile, "9bits", target="vllm")


def test_llama_cpp_target_is_one_k_type_and_one_v_type(tmp_path):
    names = resolve_formats("llama.cpp")
    profile = _profile(tmp_path / "p", names)
    result = _search(tmp_path, profile, "5.5bits", formats="llama.cpp", target="llama.cpp")
    assert len(set(result.plan.pairs)) == 1 and result.plan.nominal_bits() <= 5.5
    table = Profile.load(profile)
    cost = table.matrix("taylor").sum(axis=0)
    bits = np.array([LayerPlan.from_pair(p).nominal_bits for p in table.pairs])
    best = min((c, p) for c, p, b in zip(cost, table.pairs, bits) if b <= 5.5)[1]
    assert result.plan.pairs[0] == best  # the exact optimum among uniform plans
    exported = export_plan(result.plan, "llama.cpp", tmp_path / "e")
    assert exported.plan.pairs == result.plan.pairs


def test_ik_llama_cpp_target_front_is_exact_and_exports_as_searched(tmp_path):
    profile = _profile(tmp_path / "p", resolve_formats("llama.cpp"))
    result = _search(tmp_path, profile, "6bits", formats="llama.cpp", target="ik-llama.cpp")
    runs = [k for k, _ in itertools.groupby(result.plan.pairs)]
    assert len(runs) <= 3 and result.plan.nominal_bits() <= 6 + 1e-9
    exported = export_plan(result.plan, "ik-llama.cpp", tmp_path / "e")
    assert exported.plan.pairs == result.plan.pairs
    uniform = _search(tmp_path, profile, "6bits", formats="llama.cpp", target="llama.cpp")
    assert result.plan.metadata["predicted_loss"] <= uniform.plan.metadata["predicted_loss"]


def test_segment_front_matches_brute_force():
    rng = np.random.default_rng(3)
    layers, cols = 5, 3
    cost, memory = rng.uniform(size=(layers, cols)), np.tile(np.array([1.0, 2.0, 4.0]), (layers, 1))
    front = segment_front(cost, memory, [0, 1, 2], layers)
    plans = set()
    for n in range(layers + 1):
        for m in range(layers - n + 1):
            for a, b, d in itertools.product(range(cols), repeat=3):
                plans.add(tuple([a] * n + [b] * (layers - n - m) + [d] * m))
    for budget in (5, 7, 11, 14, 20):
        best = min(cost[range(layers), p].sum() for p in plans if memory[range(layers), p].sum() <= budget)
        found = min(c for _, c, m in front if m <= budget)
        assert found == pytest.approx(best)


def test_a_small_space_is_enumerated_and_its_front_holds_the_exact_optimum(tmp_path):
    from kvtune.search.exact import evaluate, exact_optimum
    from kvtune.search.search import enumerate_front
    from kvtune.search.space import build_space

    profile = Profile.load(_profile(tmp_path / "p", resolve_formats("vllm-int8_per_token_head")))
    cost = profile.matrix("taylor")
    bits = np.tile(np.array([16.0, 8.0]) / 10, (10, 1))
    space = build_space([(16, 16), ("int8_per_token_head",) * 2], cost, bits, 6, fixed={0: 0})
    for budget in (9.0, 10.4, 12.0, 15.2):
        front = enumerate_front(space, budget)
        assert all(evaluate(space, x)[1] <= budget + 1e-9 for x in front)
        best = min(evaluate(space, x)[0] for x in front)
        assert best == pytest.approx(evaluate(space, exact_optimum(space, budget))[0])
    result = _search(tmp_path, tmp_path / "p", "10.4bits", formats="vllm-int8_per_token_head")
    assert result.meta["space"]["enumerated_plans"] >= 2
