import json

import numpy as np
import pandas as pd
import pytest

import kvtune.profiling.profile as profile_module
from kvtune.errors import ProfileError
from kvtune.formats import FORMAT_SETS
from kvtune.plan import ModelShape, pair_name
from kvtune.profiling import Profile, ProfileSettings, run_profile
from kvtune.profiling.measure import LayerReplay


def _settings(model_dir, **kw):
    base = dict(model=model_dir, seq_len=64, windows=2, batch_size=1, group_size=8, residual=4, validate_windows=1,
                pairs=list(FORMAT_SETS["int"]), validate_layers=[0, 1, 2])
    base.update(kw)
    return ProfileSettings(**base)


@pytest.fixture(scope="module")
def tiny_profile(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    return run_profile(_settings(tiny_model_dir), out, progress=False), out


def test_profile_writes_table_metadata_and_heatmap(tiny_profile):
    profile, out = tiny_profile
    assert (out / "profile.csv").is_file() and (out / "profile.json").is_file() and (out / "heatmap.png").is_file()
    assert len(profile.table) == 3 * 8
    meta = json.loads((out / "profile.json").read_text())
    assert meta["tokens"] == 2 * 63 and meta["shape"]["num_layers"] == 3
    assert set(meta["summary"]["spearman"]) >= {"taylor_vs_kl", "taylor_vs_dnll"}
    reloaded = Profile.load(out)
    pd.testing.assert_frame_equal(reloaded.table, profile.table, check_exact=False, rtol=1e-12)


def test_error_is_zero_at_16_bits_and_grows_as_bits_drop(tiny_profile):
    profile, _ = tiny_profile
    t = profile.table.set_index(["layer", "pair"])
    for layer in range(3):
        assert t.loc[(layer, "K16V16"), ["attn_err", "taylor", "attn_err_k", "attn_err_v"]].eq(0).all()
        for column in ("attn_err", "taylor"):
            chain = [t.loc[(layer, p), column] for p in ("K8V8", "K4V4", "K2V2")]
            assert 0 < chain[0] < chain[1] < chain[2], (layer, column, chain)
        k_only = [t.loc[(layer, p), "attn_err_k"] for p in ("K8V8", "K4V4", "K2V2")]
        v_only = [t.loc[(layer, p), "attn_err_v"] for p in ("K8V8", "K4V4", "K2V2")]
        assert k_only == sorted(k_only) and v_only == sorted(v_only)
    measured = profile.table.dropna(subset=["measured_kl"])
    assert set(measured["layer"]) == {0, 1, 2}  # every layer at the aggressive pair


def test_profile_is_deterministic(tiny_model_dir, tiny_profile, tmp_path):
    again = run_profile(_settings(tiny_model_dir), tmp_path, progress=False)
    pd.testing.assert_frame_equal(again.table, tiny_profile[0].table)


def test_recomputed_attention_gives_the_same_profile_without_keeping_the_score_matrices(tiny_model_dir, tiny_model,
                                                                                    tiny_profile, tmp_path):
    import torch

    from kvtune.arch import describe
    from kvtune.profiling.probe import Candidates, Probe, probing

    kept = run_profile(_settings(tiny_model_dir, recompute_attention=False), tmp_path, progress=False)
    pd.testing.assert_frame_equal(kept.table, tiny_profile[0].table)  # recompute (the default) changes nothing
    model = tiny_model
    ids = torch.randint(0, 200, (1, 48))
    square = []  # per-head (T, T) tensors autograd keeps for the backward pass, outside any recomputed region

    def pack(t):  # (the causal mask, one for all heads, is kept either way)
        square.append(t.dim() == 4 and t.shape[1] > 1 and t.shape[-2:] == (48, 48))
        return t

    for recompute in (False, True):
        square.clear()
        probe = Probe(Candidates(["k4v2", "k2v4"], "per-channel", "per-token", 8, 4), 3, describe(model).attending_index,
                      recompute)
        with probing(model, probe), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False).logits.sum().backward()
        assert any(square) != recompute, recompute


def test_resume_skips_finished_work(tiny_model_dir, tmp_path, monkeypatch):
    settings = _settings(tiny_model_dir)
    real_batch, real_measure = profile_module._profile_batch, LayerReplay.single_layer_impact
    calls = {"batch": 0, "measure": 0}

    def counting_batch(*a, **k):
        calls["batch"] += 1
        return real_batch(*a, **k)

    def interrupted_measure(self, *a, **k):
        calls["measure"] += 1
        if calls["measure"] == 3:
            raise KeyboardInterrupt
        return real_measure(self, *a, **k)

    monkeypatch.setattr(profile_module, "_profile_batch", counting_batch)
    monkeypatch.setattr(LayerReplay, "single_layer_impact", interrupted_measure)
    with pytest.raises(KeyboardInterrupt):
        run_profile(settings, tmp_path, progress=False)
    assert calls == {"batch": 2, "measure": 3}
    total = len(profile_module._validation_targets(settings, 3))

    calls.update(batch=0, measure=0)
    monkeypatch.setattr(LayerReplay, "single_layer_impact", lambda self, *a, **k: (calls.__setitem__("measure", calls["measure"] + 1), real_measure(self, *a, **k))[1])
    run_profile(settings, tmp_path, progress=False)
    assert calls == {"batch": 0, "measure": total - 2}  # the two finished layers are not measured again


def test_resume_with_other_settings_is_refused(tiny_model_dir, tiny_profile):
    _, out = tiny_profile
    with pytest.raises(ProfileError, match="other settings \\(seed: 0 → 5\\); use --overwrite"):
        run_profile(_settings(tiny_model_dir, seed=5), out, progress=False)


def test_bad_pairs_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown bit width 7"):
        run_profile(ProfileSettings(model="/no/such/model", pairs=["k7v7"]), tmp_path)
    with pytest.raises(ProfileError, match="listed twice"):
        run_profile(ProfileSettings(model="/no/such/model", pairs=["k4v4", "K4V4"]), tmp_path)


def _copy(profile: Profile, folder):
    profile.save(folder)
    return folder


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: (f / "profile.csv").write_text("\n".join((f / "profile.csv").read_text().splitlines()[:-3])), "truncated"),
        (lambda f: (f / "profile.json").write_text("{oops"), "not valid JSON"),
        (lambda f: (f / "profile.csv").unlink(), "no profile at"),
        (lambda f: (f / "profile.csv").write_text(""), "not a readable CSV"),
        (lambda f: _edit_meta(f, schema_version=9), "schema_version 9 is not supported"),
        (lambda f: _edit_meta(f, schema="kvtune.plan"), "not a kvtune profile"),
        (lambda f: _edit_table(f, "taylor", np.nan), "non-finite"),
        (lambda f: _edit_table(f, "attn_err", -1.0), "negative"),
        (lambda f: _edit_table(f, "taylor", "abc"), "not numeric"),
        (lambda f: _edit_table(f, "layer", 0), "every layer × pair once"),
    ],
)
def test_corrupt_profiles_are_rejected(tiny_profile, tmp_path, corrupt, message):
    folder = _copy(tiny_profile[0], tmp_path / "p")
    corrupt(folder)
    with pytest.raises(ProfileError, match=message):
        Profile.load(folder)


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "profile.json").read_text())
    meta.update(changes)
    (folder / "profile.json").write_text(json.dumps(meta))


def _edit_table(folder, column, value):
    table = pd.read_csv(folder / "profile.csv")
    table[column] = table[column].astype(object)
    table.loc[len(table) // 2, column] = value  # a row of a middle layer
    table.to_csv(folder / "profile.csv", index=False)


def test_profile_for_another_model_is_refused(tiny_profile):
    with pytest.raises(ProfileError, match="was made for"):
        tiny_profile[0].check_model(ModelShape(30, 3, 64))


def test_layer_replay_matches_the_full_forward(tiny_model):
    import torch

    from kvtune.perplexity import token_nll
    from kvtune.plan import LayerPlan, Plan

    torch.manual_seed(0)
    windows = torch.randint(3, 256, (2, 40))
    replay = LayerReplay(tiny_model, windows)
    plan = Plan((LayerPlan.from_pair("k16v16"), LayerPlan.from_pair("k2v2", group_size=8, residual=2), LayerPlan.from_pair("k16v16")))
    logprobs = replay.logprobs_with(plan, start_layer=1)
    nll = -logprobs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert torch.allclose(nll, token_nll(tiny_model, windows, plan), atol=1e-9)


def test_probe_errors_equal_simulated_attention_per_pair():
    """The probe shares work between pairs; each number must still be what simulation gives."""
    import torch

    from kvtune.profiling.probe import Candidates, Probe
    from kvtune.simulate import simulated_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 32, dtype=torch.float64)
    k, v = torch.randn(2, 2, 40, 32, dtype=torch.float64), torch.randn(2, 2, 40, 32, dtype=torch.float64)
    engine = [("fp8", "nvfp4"), ("q8_0", 2), (4, "q4_1"), ("fp8", 16)]
    c = Candidates([(16, 16), (8, 4), (4, 4), (4, 2), (2, 4), (2, 2), (16, 2), (2, 16)] + engine, "per-channel", "per-token", 8, 4)
    probe = Probe(c, 1)
    exact = simulated_attention(q, k, v, c.layer_plan(16, 16), 0.3)
    probe._accumulate_errors(0, q, k, v, exact, 0.3, None)
    sums = probe.errors[0]

    def direct(kb, vb):
        return (simulated_attention(q, k, v, c.layer_plan(kb, vb), 0.3) - exact).pow(2).sum().item()

    assert sums.reference == pytest.approx(exact.pow(2).sum().item())
    for kb in (8, 4, 2):
        assert sums.key_only[str(kb)] == pytest.approx(direct(kb, 16), rel=1e-9)
    for vb in (4, 2):
        assert sums.value_only[str(vb)] == pytest.approx(direct(16, vb), rel=1e-9)
    for pair in [(8, 4), (4, 4), (4, 2), (2, 4), (2, 2)] + engine[:3]:
        assert sums.joint[pair_name(*pair)] == pytest.approx(direct(*pair), rel=1e-9)
    assert sums.key_only["fp8"] == pytest.approx(direct("fp8", 16), rel=1e-9)


def test_probe_errors_of_candidates_with_their_own_group_and_window():
    """Candidates differing only in group size or window get their own errors, equal to simulation
    of the layer plan they stand for (per-channel keys of group 16 read in steps of 16 tokens)."""
    import torch

    from kvtune.profiling.probe import Candidates, Probe
    from kvtune.simulate import simulated_attention

    torch.manual_seed(1)
    q = torch.randn(1, 4, 48, 32, dtype=torch.float64)
    k, v = torch.randn(1, 2, 48, 32, dtype=torch.float64), torch.randn(1, 2, 48, 32, dtype=torch.float64)
    names = ["k16v16", "k4v2", "k4v2g16", "k2v2r0", "k2v2g16r12", "k16v2g16", "k[fp8]v2g16"]
    c = Candidates(names, "per-channel", "per-token", 8, 4)
    assert c.names == ["K16V16", "K4V2", "K4V2g16", "K2V2r0", "K2V2g16r12", "K16V2g16", "K[fp8]V2g16"]
    assert Candidates(["k4v2g8r4", "k4v2g8r5"], "per-channel", "per-token", 8, 4).names == ["K4V2", "K4V2r5"]
    probe = Probe(c, 1)
    exact = simulated_attention(q, k, v, c.layer_plan(16, 16), 0.3)
    probe._accumulate_errors(0, q, k, v, exact, 0.3, None)
    sums = probe.errors[0]

    def direct(p):
        return (simulated_attention(q, k, v, c.layer_plan(*p), 0.3) - exact).pow(2).sum().item()

    assert c.layer_plan(*c.pairs[4]).key.group_size == 16 and c.layer_plan(*c.pairs[4]).residual == 12
    for name, p in zip(c.names, c.pairs):
        if not name.startswith("K16"):  # one side only: the value_only sums
            assert sums.joint[name] == pytest.approx(direct(p), rel=1e-9), name
    assert sums.key_only["4g16"] == pytest.approx(direct((4, 16, 16, None)), rel=1e-9)
    assert sums.value_only["2g16r12"] == pytest.approx(direct((16, 2, 16, 12)), rel=1e-9)
    assert sums.joint["K4V2g16"] != pytest.approx(sums.joint["K4V2"], rel=1e-3)
    assert sums.value_only["2g16"] == pytest.approx(direct((16, 2, 16, None)), rel=1e-9)


def test_taylor_terms_of_each_format_family_do_not_depend_on_the_other():
    """One backward pass serves integer formats (residual window) and engine formats (no window)."""
    from types import SimpleNamespace

    import torch

    from kvtune.profiling.probe import Candidates, Probe

    torch.manual_seed(0)
    q = torch.randn(1, 4, 24, 32, dtype=torch.float64)
    k, v = torch.randn(1, 2, 24, 32, dtype=torch.float64), torch.randn(1, 2, 24, 32, dtype=torch.float64)
    target = torch.randn(1, 24, 4, 32, dtype=torch.float64)

    def terms(pairs):
        probe = Probe(Candidates(pairs, "per-channel", "per-token", 8, 4), 1)
        out, _ = probe.attention(SimpleNamespace(layer_idx=0), q, k, v, None, 0.3)
        (out - target).pow(2).sum().backward()
        return probe.first_order_terms(0)

    both = terms([(4, 2), ("fp8", "nvfp4"), (4, 2, 16, 0)])
    ints, engines = terms([(4, 2)]), terms([("fp8", "nvfp4")])
    variant = terms([(4, 2, 16, 0)])
    assert torch.allclose(both["k"]["4"], ints["k"]["4"]) and torch.allclose(both["v"]["2"], ints["v"]["2"])
    assert torch.allclose(both["k"]["fp8"], engines["k"]["fp8"]) and torch.allclose(both["v"]["nvfp4"], engines["v"]["nvfp4"])
    assert torch.allclose(both["k"]["4g16r0"], variant["k"]["4g16r0"]) and torch.allclose(both["v"]["2g16r0"], variant["v"]["2g16r0"])
    assert not torch.allclose(both["k"]["4"], 0 * both["k"]["4"])
    assert not torch.allclose(both["k"]["4"], both["k"]["4g16r0"])


def test_default_set_fits_candidate_groups_to_the_head_size(tiny_model_dir, tmp_path, capsys):
    """int+g's group-64 candidates on head_dim 32: per-token groups of 32, printed; one equal to
    another after fitting would be dropped."""
    settings, shape = ProfileSettings(model=tiny_model_dir, group_size=8, residual=4, seq_len=128).check(tmp_path / "p")
    assert shape.head_dim == 32 and len(settings.pairs) == len(FORMAT_SETS["int+g"])
    assert "K2V2g32" in settings.pairs and "K2V2g64" not in settings.pairs
    assert "per-token groups of 32 are used" in capsys.readouterr().out
    fitted, _ = ProfileSettings(model=tiny_model_dir, group_size=32, residual=4, seq_len=128,
                                pairs=["k2v2", "k2v2g64"]).check(tmp_path / "q")
    assert fitted.pairs == ["K2V2"]
    with pytest.raises(ProfileError, match="candidate K2V2r124: windows of 128 tokens leave nothing"):
        ProfileSettings(model=tiny_model_dir, group_size=8, residual=4, seq_len=128, pairs=["k2v2r124"]).check(tmp_path / "r")


def test_candidates_equal_to_the_profiles_own_setting_are_dropped_not_refused(capsys):
    from kvtune.profiling.profile import _fit_candidate_groups

    settings = _fit_candidate_groups(ProfileSettings(group_size=64), 128)  # int+g's g64 candidates are the plain pairs
    assert settings.pairs == [p.upper() for p in FORMAT_SETS["int+"]]
    assert "9 candidate(s) dropped" in capsys.readouterr().out
    assert _fit_candidate_groups(ProfileSettings(), 96).pairs[-1] == "K2V2g48"
    with pytest.raises(ProfileError, match="listed twice"):
        ProfileSettings(pairs=["k2v2g64", "K2V2G64"]).candidates()


def test_probe_errors_of_engine_formats_with_calibrated_scales_equal_simulation():
    """vLLM's per-token-head and TurboQuant formats, and fp8/nvfp4 at the layer's calibrated amax:
    the probe's errors are what simulated attention with that layer's plan gives."""
    import torch

    from kvtune.profiling.probe import Candidates, Probe
    from kvtune.simulate import simulated_attention

    torch.manual_seed(4)
    q = torch.randn(1, 4, 24, 32, dtype=torch.float64)
    k, v = torch.randn(1, 2, 24, 32, dtype=torch.float64), torch.randn(1, 2, 24, 32, dtype=torch.float64)
    pairs = [(16, 16), ("fp8", "fp8"), ("nvfp4", "nvfp4"), ("int4_per_token_head", "int8_per_token_head"),
             ("turboquant_k3", "turboquant_v4")]
    c = Candidates(pairs, "per-channel", "per-token", 8, 4, amax={"key": [9.0, 2.5], "value": [7.0, 3.0]})
    probe = Probe(c, 2)
    exact = simulated_attention(q, k, v, c.layer_plan(16, 16), 0.3)
    probe._accumulate_errors(1, q, k, v, exact, 0.3, None)
    for pair in pairs[1:]:
        plan = c.layer_plan(*pair, layer=1)
        direct = (simulated_attention(q, k, v, plan, 0.3) - exact).pow(2).sum().item()
        assert probe.errors[1].joint[pair_name(*pair)] == pytest.approx(direct, rel=1e-9)
    assert c.layer_plan("fp8", "fp8", layer=1).key.amax == 2.5 and c.layer_plan("fp8", "fp8", layer=0).value.amax == 7.0


def test_fp8_and_nvfp4_profiles_calibrate_once_and_plans_carry_the_constants(tiny_model_dir, tmp_path):
    from kvtune.search import SearchSettings, run_search

    pairs = ["k16v16", "k[fp8]v[fp8]", "k[nvfp4]v[nvfp4]"]
    profile = run_profile(_settings(tiny_model_dir, pairs=pairs, validate_windows=0), tmp_path / "p", progress=False)
    amax = profile.meta["amax"]
    assert len(amax["key"]) == 3 and all(a > 0 for a in amax["key"] + amax["value"])
    plan = run_search(SearchSettings(profile=str(tmp_path / "p"), budget="6bits", verify=0, generations=20),
                      tmp_path / "s", progress=False).plan
    for i, layer in enumerate(plan.layers):
        for which, spec in (("key", layer.key), ("value", layer.value)):
            assert spec.amax == (amax[which][i] if spec.format in ("fp8", "nvfp4") else None)
    saved = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert any("amax" in entry["key"] for entry in saved["layers"])
