"""Every command refuses bad input before it loads a model or starts work, with a message that
names the input, and writes or loses nothing (issue 18). The cases are in tests/bad_inputs.py;
docs/bad-inputs.md is generated from them by scripts/bad_inputs_table.py."""

import json
import math
import re

import pytest
import transformers
from typer.testing import CliRunner

import kvtune
from kvtune.cli import app
from tests.bad_inputs import CASES, Workspace

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("bad-inputs")).prepare()


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: refusals must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    for module in ("kvtune.models", "kvtune.eval", "kvtune.profiling.profile"):
        monkeypatch.setattr(f"{module}.load_model", refuse)


def _files(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_before_any_work(case, workspace, no_model_load):
    args = case.args(workspace)  # may create the bad input itself
    before = _files(workspace.root)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert re.search(case.expect, result.output), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError), result.output
    assert _files(workspace.root) == before  # nothing written, nothing replaced, no temporary file left
    for kept in case.keeps(workspace):
        assert kept.read_bytes() == before[kept]


def test_help_shows_pair_names_and_every_export_format():
    from kvtune.export import FORMATS

    profile_help = runner.invoke(app, ["profile", "--help"], terminal_width=200).output
    assert "k8v4,k2v2g64,k3v3r128,k[fp8]v[nvfp4]" in profile_help
    export_help = runner.invoke(app, ["export", "--help"], terminal_width=400).output
    assert all(fmt in export_help for fmt in FORMATS), export_help


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvtune.profiling.run_profile", interrupted)
    result = runner.invoke(app, ["profile", "--out", str(tmp_path / "p")])
    assert result.exit_code == 130
    assert "rerun the same command to resume" in result.output


def test_budget_above_the_widest_plan_is_noted(workspace, tmp_path):
    result = runner.invoke(app, ["search", "--budget", "20bits", "--profile", str(workspace.profile), "--verify", "0",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "note: budget 20bits is above the largest plan (16bits" in result.output
    assert json.loads((tmp_path / "s" / "search.json").read_text())["notes"]


def test_same_settings_may_rerun_other_settings_need_overwrite(workspace, tmp_path):
    search = ["search", "--profile", str(workspace.profile), "--verify", "0", "--out", str(tmp_path / "s")]
    assert runner.invoke(app, search + ["--budget", "4bits"]).exit_code == 0
    first = (tmp_path / "s" / "plan.json").read_text()
    assert runner.invoke(app, search + ["--budget", "4bits"]).exit_code == 0  # the same search again
    assert (tmp_path / "s" / "plan.json").read_text() == first
    refused = runner.invoke(app, search + ["--budget", "2.5bits"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert (tmp_path / "s" / "plan.json").read_text() == first
    assert runner.invoke(app, search + ["--budget", "2.5bits", "--overwrite"]).exit_code == 0
    assert json.loads((tmp_path / "s" / "plan.json").read_text())["nominal_bits"] <= 2.5


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from kvtune import files
    from kvtune.errors import KvtuneError

    def crash(path):
        path.write_text("half")
        raise KvtuneError("crashed while writing")

    with pytest.raises(KvtuneError, match="crashed"):
        files.write_with(tmp_path / "out" / "table.csv", crash)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_load_cache_takes_a_plan_name_or_file(tmp_path, tiny_model):
    import torch

    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 11, 64]])
    plain = tiny_model.generate(ids, max_new_tokens=6, do_sample=False)
    by_name = tiny_model.generate(ids, cache=kvtune.load_cache(tiny_model, "uniform:k4v2"), max_new_tokens=6,
                                  do_sample=False)
    kvtune.Plan.uniform("k16v16", 3).save(tmp_path / "plan.json")
    by_file = tiny_model.generate(ids, cache=kvtune.load_cache(tiny_model, tmp_path / "plan.json"),
                                  max_new_tokens=6, do_sample=False)
    assert by_name.shape == plain.shape == by_file.shape
    assert torch.equal(by_file, plain)  # 16-bit plan from a file: exactly plain generate
    cache = kvtune.load_cache(tiny_model, "uniform:k4v2")
    assert cache.plan.pairs == ["K4V2"] * 3
    with pytest.raises(kvtune.KvtuneError, match="neither a plan file nor a known plan name"):
        kvtune.load_cache(tiny_model, "turbo")


def test_the_first_names_are_importable_from_kvtune():
    for name in kvtune.__all__:
        assert getattr(kvtune, name) is not None
    with pytest.raises(AttributeError):
        kvtune.not_a_name  # noqa: B018


@pytest.mark.slow
def test_profile_without_validation_writes_no_nan_and_resumes_honestly(tmp_path, capsys, monkeypatch):
    """--validate-windows 0 leaves the correlations out with the reason; a resumed profile's bar never
    counts past its total; another validation setting keeps the gradient stage."""
    from tests.families import save_tiny

    from kvtune.profiling import ProfileSettings, run_profile
    from kvtune.profiling import profile as profiling

    model = save_tiny("llama", tmp_path / "m")
    settings = ProfileSettings(model=model, windows=4, batch_size=1, seq_len=48, group_size=8, residual=4,
                               pairs=["k16v16", "k4v4", "k2v2"], validate_windows=0)
    real_batch, calls = profiling._profile_batch, []

    def stop_after_two(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_batch(*args)

    monkeypatch.setattr(profiling, "_profile_batch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_profile(settings, tmp_path / "p")
    monkeypatch.setattr(profiling, "_profile_batch", real_batch)
    capsys.readouterr()
    result = run_profile(settings, tmp_path / "p")
    bars = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)
    assert bars and all(int(done) <= int(total) for done, total in bars)
    text = (tmp_path / "p" / "profile.json").read_text()
    assert "NaN" not in text
    summary = json.loads(text)["summary"]
    assert summary["spearman"] == {} and "--validate-windows 0" in summary["spearman_note"]

    def no_gradients(*args):
        raise AssertionError("the gradient stage was redone")

    monkeypatch.setattr(profiling, "_profile_batch", no_gradients)
    measured = run_profile(ProfileSettings(**{**settings.__dict__, "validate_windows": 1, "validate_layers": [0]}),
                           tmp_path / "p", progress=False)
    assert measured.table["measured_kl"].notna().any()
    assert all(math.isfinite(v) for v in measured.meta["summary"]["spearman"].values())
    assert result.table["taylor"].tolist() == measured.table["taylor"].tolist()


def test_results_get_the_mode_a_plain_write_gives(tmp_path):
    import os

    from kvtune import files

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    files.write_text(tmp_path / "atomic.txt", "x")
    files.write_all(tmp_path / "many", {"a.txt": lambda p: p.write_text("a")})
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain) == mode(tmp_path / "many" / "a.txt")
