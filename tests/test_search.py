import json

import numpy as np
import pandas as pd
import pytest

from kvtune.errors import DataError, ProfileError
from kvtune.plan import Plan
from kvtune.profiling.artifact import SCHEMA, SCHEMA_VERSION, Profile
from kvtune.search import BudgetError, SearchSettings, parse_budget, run_search
from kvtune.search.exact import evaluate, exact_optimum
from kvtune.search.nsga import nsga2_front
from kvtune.search.space import build_space, cluster_layers, nondominated, prune_layers

PAIRS = ["K16V16", "K8V8", "K8V4", "K4V8", "K4V4", "K4V2", "K2V4", "K2V2"]


def test_budgets_parse():
    assert parse_budget("3.25bits").value == 3.25 and parse_budget("3.25bits").kind == "bits"
    b = parse_budget("2GiB@32k", batch=4)
    assert (b.kind, b.value, b.context, b.batch) == ("bytes", 2 * 2**30, 32768, 4)
    assert parse_budget("512MB@8192").value == 512e6 and parse_budget("512MB@8192").context == 8192


@pytest.mark.parametrize("text", ["3.25", "bits", "-1bits", "2GB@", "0bits", "", "2GiB", "3 apples", "1GiB@0"])
def test_bad_budgets_fail_clearly(text):
    with pytest.raises(BudgetError, match="accepted forms"):
        parse_budget(text)


def test_pruning_removes_exactly_the_dominated_pairs():
    # memory (bits) and estimated impact for one layer, by hand:
    #          K16V16 K8V8  K8V4  K4V8  K4V4  K4V2  K2V4  K2V2
    memory = np.array([16, 8, 6, 6, 4, 3, 3, 2.0])
    cost = np.array([0, 1, 5, 3, 6, 9, 20, 8.0])
    # K8V4 (6, 5) is dominated by K4V8 (6, 3); K4V4 (4, 6) is not; K2V4 (3, 20) by K4V2 (3, 9);
    # K4V2 (3, 9) by K2V2 (2, 8).
    assert nondominated(cost, memory) == [0, 1, 3, 4, 7]
    assert prune_layers(np.stack([cost, cost]), np.stack([memory, memory])) == [[0, 1, 3, 4, 7]] * 2
    # exact ties keep one
    assert nondominated(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == [0]


def test_clustering_is_deterministic_and_outliers_stand_alone():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(3, 0.1, (10, 4))])
    groups = cluster_layers(features, 2)
    assert groups == cluster_layers(features, 2)
    assert sorted(map(sorted, groups)) == [list(range(10)), list(range(10, 20))]
    with_outlier = cluster_layers(features, 3, outliers=[5])
    assert [5] in with_outlier and len(with_outlier) == 3


def _synthetic_profile(folder, layers=12, seed=0, variants=()):
    """A profile table with a realistic shape: cost rises as bits drop, layers differ in scale.
    ``variants``: candidates with a group of 32 (the profile's is 8), 10 % costlier than their pair."""
    rng = np.random.default_rng(seed)
    rows = []
    scale = np.exp(rng.normal(0, 1.0, layers))
    pairs = PAIRS + list(variants)
    for layer in range(layers):
        costs = {}
        for pair in pairs:
            k, v = int(pair[1:].split("V")[0]), int(pair.split("V")[1].split("g")[0])
            if "g" in pair:
                base = 1.1 * costs[pair.split("g")[0]]
            else:
                base = 0.0 if (k, v) == (16, 16) else (2.0 ** (-k) * 3 + 2.0 ** (-v)) * scale[layer] * rng.uniform(0.8, 1.2)
            costs[pair] = base
            rows.append({"layer": layer, "pair": pair, "k_bits": k, "v_bits": v, "nominal_bits": (k + v) / 2,
                         "attn_err": base, "attn_err_k": base, "attn_err_v": base, "taylor": base,
                         "taylor_signed": base, "taylor_abs": base, "taylor_elem": base, "taylor_fisher": base,
                         "measured_dnll": np.nan, "measured_kl": np.nan})
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": "synthetic",
            "shape": {"num_layers": layers, "num_kv_heads": 2, "head_dim": 32}, "pairs": pairs,
            "settings": {"key_mode": "per-channel", "value_mode": "per-token", "group_size": 8, "residual": 4,
                         "model": "synthetic", "data": "enwiki"}}
    Profile(pd.DataFrame(rows), meta).save(folder)
    return folder


def test_search_front_is_nondominated_and_within_budget(tmp_path):
    profile = _synthetic_profile(tmp_path / "profile")
    result = run_search(SearchSettings(profile=str(profile), budget="4bits", groups=5, verify=0, generations=60), tmp_path / "s", progress=False)
    front = result.front
    assert (front["nominal_bits"] <= 4 + 1e-9).all()
    values = front[["predicted_loss", "nominal_bits"]].to_numpy()
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            assert i == j or not (b[0] <= a[0] and b[1] <= a[1] and (b < a).any())
    plan = Plan.load(tmp_path / "s" / "plan.json")
    assert plan.nominal_bits() <= 4 and len(set(plan.pairs)) > 1
    assert plan.metadata["cache_bytes"] > 0 and plan.metadata["context"] == 32768
    assert {"nominal_bits", "cache_bytes", "effective_bits"} <= set(front.columns)
    assert (tmp_path / "s" / "front.png").is_file()
    meta = json.loads((tmp_path / "s" / "search.json").read_text())
    assert meta["exact_check"]["max_gap"] <= 0.02
    assert meta["space"]["log10_after_clustering"] < meta["space"]["log10_after_pruning"] < meta["space"]["log10_full"]


def test_search_is_deterministic(tmp_path):
    profile = _synthetic_profile(tmp_path / "profile")
    settings = SearchSettings(profile=str(profile), budget="3.25bits", groups=4, verify=0, generations=40)
    a = run_search(settings, tmp_path / "a", progress=False).front
    b = run_search(settings, tmp_path / "b", progress=False).front
    pd.testing.assert_frame_equal(a, b)


def test_nsga2_matches_the_exact_optimum_on_a_small_space(tmp_path):
    profile = Profile.load(_synthetic_profile(tmp_path / "p", layers=8))
    cost = profile.matrix("taylor")
    bits = np.tile(np.array([(int(p[1:].split("V")[0]) + int(p.split("V")[1])) / 2 for p in PAIRS]) / 8, (8, 1))
    space = build_space([tuple(map(int, p[1:].split("V"))) for p in PAIRS], cost, bits, 8)
    X, F, _ = nsga2_front(space, 5.0, seed=1)
    for budget in (2.5, 3.0, 4.0, 5.0):
        optimum = evaluate(space, exact_optimum(space, budget))[0]
        assert F[F[:, 1] <= budget + 1e-9][:, 0].min() <= optimum * 1.02


def test_nsga2_grows_a_population_the_front_fills(tmp_path):
    profile = Profile.load(_synthetic_profile(tmp_path / "p", layers=8))
    bits = np.tile(np.array([(int(p[1:].split("V")[0]) + int(p.split("V")[1])) / 2 for p in PAIRS]) / 8, (8, 1))
    space = build_space([tuple(map(int, p[1:].split("V"))) for p in PAIRS], profile.matrix("taylor"), bits, 8)
    X, F, pop_size = nsga2_front(space, 16.0, seed=0, pop_size=8)
    assert pop_size > 8 and len(X) < 0.9 * pop_size  # it grew until the front no longer filled it
    X_capped, _, capped = nsga2_front(space, 16.0, seed=0, pop_size=8, max_pop_size=8)
    assert capped == 8 and len(X_capped) <= 8 < len(X)


def test_impossible_and_bad_budgets_write_nothing(tmp_path):
    profile = _synthetic_profile(tmp_path / "profile")
    with pytest.raises(BudgetError, match="smallest feasible budget is 2bits"):
        run_search(SearchSettings(profile=str(profile), budget="1.5bits", verify=0), tmp_path / "o", progress=False)
    with pytest.raises(BudgetError, match="accepted forms"):
        run_search(SearchSettings(profile=str(profile), budget="3.25", verify=0), tmp_path / "o", progress=False)
    with pytest.raises(ProfileError, match="no profile at"):
        run_search(SearchSettings(profile=str(tmp_path / "none"), budget="3bits", verify=0), tmp_path / "o", progress=False)
    with pytest.raises(BudgetError, match="--verify-metric 'accuracy'.*lm-eval:TASK"):
        run_search(SearchSettings(profile=str(profile), budget="3bits", verify=0, verify_metric="accuracy"), tmp_path / "o",
                   progress=False)
    assert not (tmp_path / "o").exists()


def test_bytes_budget(tmp_path):
    profile = _synthetic_profile(tmp_path / "profile")
    fp = Plan.uniform("k16v16", 12).cache_bytes(Profile.load(profile).shape, 4096)
    result = run_search(SearchSettings(profile=str(profile), budget=f"{fp / 2 / 2**20:.3f}MiB@4096", verify=0, generations=40),
                        tmp_path / "s", progress=False)
    assert (result.front["cache_bytes"] <= fp / 2 * 1.0001).all()
    assert result.plan.metadata["context"] == 4096


def test_larger_groups_compete_on_real_memory_only(tmp_path):
    """A candidate with its own (larger) group has the pair's nominal bits and fewer bytes: a bits
    budget never picks it (same bits, more loss), a bytes budget between the two does."""
    from kvtune.search.search import allowed_pairs

    profile = _synthetic_profile(tmp_path / "profile", variants=["K2V2g32", "K4V2g32"])
    loaded = Profile.load(profile)
    assert [loaded.pairs[j] for j in allowed_pairs(loaded, "k2v2g8,k2v2g32,k2v2")] == ["K2V2", "K2V2g32"]  # g8 is the profile's own
    assert [loaded.pairs[j] for j in allowed_pairs(loaded, "k2v2g64")] == ["K2V2g32"]  # fitted to head_dim 32, as profiled
    by_bits = run_search(SearchSettings(profile=str(profile), budget="2.5bits", verify=0, generations=40), tmp_path / "b", progress=False)
    assert all(layer.key.group_size == 8 for layer in by_bits.plan.layers)
    shape = loaded.shape
    small, large = (Plan.uniform("k2v2", 12, group_size=g, residual=4).cache_bytes(shape, 4096) for g in (8, 32))
    assert large < small
    budget = f"{(large + small) / 2 / 2**20:.4f}MiB@4096"
    result = run_search(SearchSettings(profile=str(profile), budget=budget, verify=0, generations=60), tmp_path / "s", progress=False)
    groups = {layer.key.group_size for layer in result.plan.layers}
    assert 32 in groups and result.plan.cache_bytes(shape, 4096) <= (large + small) / 2 * 1.0001
    assert {layer.value.group_size for layer in result.plan.layers} == groups  # a candidate's group is K's and V's
    chosen = result.front.loc[result.front["chosen"]].iloc[0]
    assert "g32" in chosen["pairs"] and Plan.load(tmp_path / "s" / "plan.json").layers == result.plan.layers


@pytest.mark.slow
def test_searched_plan_is_verified_and_runs_generate(tiny_model_dir, tmp_path):
    from kvtune.cache import load_cache
    from kvtune.models import load_model
    from kvtune.profiling import run_profile
    from tests.test_profile import _settings

    run_profile(_settings(tiny_model_dir), tmp_path / "p", progress=False)
    settings = SearchSettings(profile=str(tmp_path / "p"), budget="5bits", groups=2, verify=2, verify_windows=2, verify_seq_len=64)
    result = run_search(settings, tmp_path / "s", progress=False)
    verified = result.front.dropna(subset=["verified_nll"])
    assert len(verified) >= 2
    uniform = result.front[result.front["source"] == "uniform"]
    assert len(uniform) and uniform["verified_nll"].notna().all() and (uniform["nominal_bits"] <= 5).all()
    assert (verified["verified_windows"] == 2).all()  # one round of two windows: nobody dropped early
    chosen = result.front.loc[result.front["chosen"]].iloc[0]
    race = result.meta["race"]
    assert race["chosen"] == chosen["id"] and chosen["verified_gap"] == 0 and (verified["verified_gap_se"] >= 0).all()
    # Two windows cannot overturn the profile's best prediction: it is the plan chosen.
    assert not race["overturned"] and chosen["predicted_loss"] == verified["predicted_loss"].min()
    assert race["measured_best"] == verified["verified_nll"].idxmin()
    assert (race["note"] is None) == (race["measured_best"] == race["chosen"])
    too_many = SearchSettings(profile=str(tmp_path / "p"), budget="5bits", groups=2, verify_windows=10**6, verify_seq_len=64)
    with pytest.raises(DataError, match="--verify-windows"):
        run_search(too_many, tmp_path / "s2", progress=False)
    assert not (tmp_path / "s2").exists()  # nothing written
    plan = Plan.load(tmp_path / "s" / "plan.json")
    model, tokenizer = load_model(tiny_model_dir)
    ids = tokenizer(["The river", "A long time ago in"], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**ids, cache=load_cache(model, plan), max_new_tokens=12, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 12


def test_uniform_ties_name_the_uniform_plans_the_race_could_not_separate():
    from kvtune.search.search import uniform_ties

    mixed, k8v4, k4v4 = "K4V4,K8V8", "K8V4,K8V4", "K4V4,K4V4"
    front = pd.DataFrame({
        "source": ["nsga2", "uniform", "uniform", "uniform"],
        "pairs": [mixed, k8v4, k4v4, "K8V8,K8V8"],
        "nominal_bits": [6.0, 6.0, 4.0, 8.0],
        "verified_windows": [16, 16, 16, 4],  # K8V8 dropped out of the race after 4 windows
        "verified_gap": [0.0, 0.0013, 0.0030, 0.0001],
        "verified_gap_se": [0.0, 0.00075, 0.0010, 0.0001],
        "finished_race": [True, True, False, False],  # K4V4 dropped at the last look
        "chosen": [True, False, False, False],
    })
    ties = uniform_ties(front)
    assert [t["pair"] for t in ties] == ["K8V4"]
    assert ties[0]["gap"] == 0.0013 and ties[0]["windows"] == 16
    front["chosen"] = [False, True, False, False]  # a uniform choice needs no note
    assert uniform_ties(front) == []
