import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from kvtune.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_ppl_table_on_a_local_model(tmp_path, tiny_model_dir):
    out = tmp_path / "ppl"
    result = runner.invoke(
        app,
        ["ppl", "--plan", "fp16", "--plan", "uniform:k2v2", "--model", tiny_model_dir,
         "--windows", "2", "--seq-len", "96", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "ppl.csv")
    assert list(table["plan"]) == ["fp16", "uniform:k2v2"]
    assert table["nominal_bits"].tolist() == [16.0, 2.0]
    assert table["ppl"][0] != table["ppl"][1]
    assert (out / "ppl.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppl", "--plan", "uniform:k7v7"], "unknown bit width 7"),
        (["ppl", "--plan", "missing.json"], "plan file not found"),
        (["ppl", "--plan", "fp16", "--model", "./no/such/dir"], "model directory not found"),
        (["show-plan", "turbo"], "Known forms"),
    ],
)
def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, args, message):
    result = runner.invoke(app, args + (["--out", str(tmp_path / "o")] if args[0] == "ppl" else []))
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_plan_with_wrong_layer_count_is_refused(tmp_path, tiny_model_dir):
    from kvtune.plan import Plan

    Plan.uniform("k4v4", 7).save(tmp_path / "p.json")
    result = runner.invoke(app, ["ppl", "--plan", str(tmp_path / "p.json"), "--model", tiny_model_dir, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "has 7 layers but" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_profile_command_on_a_local_model(tmp_path, tiny_model_dir):
    out = tmp_path / "prof"
    args = ["profile", "--model", tiny_model_dir, "--windows", "2", "--max-tokens", "48", "--batch-size", "2",
            "--group-size", "8", "--residual", "4", "--validate-windows", "1", "--pairs", "k16v16,k4v4,k2v2",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "spearman taylor_vs_kl" in result.output
    assert (out / "profile.csv").is_file() and (out / "heatmap.png").is_file()
    bad = runner.invoke(app, ["profile", "--model", tiny_model_dir, "--pairs", "k4v7", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown bit width 7" in bad.output
    assert not (tmp_path / "bad").exists()


def test_search_command_errors(tmp_path):
    result = runner.invoke(app, ["search", "--budget", "3.25", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "accepted forms" in result.output
    result = runner.invoke(app, ["search", "--budget", "3bits", "--profile", str(tmp_path / "none"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no profile at" in result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_eval_command_on_a_local_model(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--plan", "uniform:k2v2", "--baselines", "fp16", "--tasks", "analogy,agreement",
                                 "--items", "2", "--model", tiny_model_dir, "--windows", "1", "--seq-len", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "eval.csv")
    assert list(table["plan"]) == ["fp16", "uniform:k2v2"]
    assert {"ppl", "analogy_acc", "fp16_agreement"} <= set(table.columns)
    assert table.loc[0, "fp16_agreement"] == 1.0  # the 16-bit cache reproduces FP16 generation
    assert (out / "eval.png").is_file()
    bad = runner.invoke(app, ["eval", "--tasks", "trivia", "--model", tiny_model_dir, "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown task(s) ['trivia']" in bad.output


def test_export_command(tmp_path):
    refused = runner.invoke(app, ["export", "--plan", "uniform:k4v2", "--format", "llama.cpp", "--out", str(tmp_path / "a.json")])
    assert refused.exit_code == 2 and "llama.cpp cannot express layer 0: K is 4-bit kvtune integers" in refused.output
    assert not (tmp_path / "a.json").exists()
    rounded = runner.invoke(app, ["export", "--plan", "uniform:k4v2", "--format", "llama.cpp", "--nearest", "--out", str(tmp_path / "a.json")])
    assert rounded.exit_code == 0 and "rounded up to llama.cpp types" in rounded.output
    assert json.loads((tmp_path / "a.json").read_text())["args"] == ["--cache-type-k", "q4_1", "--cache-type-v", "q4_1"]
    unknown = runner.invoke(app, ["export", "--plan", "fp16", "--format", "tgi", "--out", str(tmp_path / "b.json")])
    assert unknown.exit_code == 2 and "unknown export format" in unknown.output


@pytest.mark.extended
@pytest.mark.slow
def test_main_job_runs_end_to_end_on_a_local_model(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    command = ["run", "--model", tiny_model_dir, "--items", "2", "--needle-context", "128", "--out", str(out),
               "--windows", "4", "--validate-windows", "1", "--verify-windows", "4", "--no-verify-uniform", "--eval-windows", "3"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "profile" / "profile.json").read_text())["data"]["windows"] == 4
    assert json.loads((out / "profile" / "profile.json").read_text())["data"]["validation_windows"] == 1
    assert json.loads((out / "search" / "search.json").read_text())["settings"]["verify_windows"] == 4
    assert json.loads((out / "search" / "search.json").read_text())["settings"]["verify_uniform"] is False
    assert json.loads((out / "eval" / "eval.json").read_text())["settings"]["windows"] == 3
    for path in ("profile/profile.csv", "search/plan.json", "search/front.csv", "eval/eval.csv", "export/kvtune.json",
                 "export/hf-quantized-cache.json", "export/llama.cpp.json"):
        assert (out / path).is_file(), path
    table = pd.read_csv(out / "eval" / "eval.csv")
    assert table["plan"].iloc[-1] == "kvtune:3.25bits" and len(table) == 6
    # A rerun (a run stopped in its export step) keeps the finished search and evaluation.
    plan_before = (out / "search" / "plan.json").read_text()
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "kept: the search" in again.output and "kept: the evaluation" in again.output
    assert (out / "search" / "plan.json").read_text() == plan_before
    (out / "search" / "plan.json").touch()  # a plan newer than the table: the evaluation is redone
    redone = runner.invoke(app, command)
    assert redone.exit_code == 0 and "kept: the search" in redone.output and "kept: the evaluation" not in redone.output
