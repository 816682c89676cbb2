"""Data-parallel runs under torchrun (kvtune.distributed): two CPU processes with gloo give what one
process gives — the same profile sums (float64, 1e-9 relative), the same perplexities, the same plan
and race — and a rank that dies ends the run with a message naming it and no result in --out."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.families import save_tiny

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.extended  # torchrun processes: the heavy tier (scripts/test_extended.sh)


def torchrun(args: list[str], tmp_path: Path, nproc: int = 2, module: str = "kvtune", timeout: int = 600):
    """``python -m torch.distributed.run --nproc_per_node N -m kvtune ARGS`` on CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--max_restarts", "0", "-m", module, *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def single(args: list[str], tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kvtune", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _same_table(a: Path, b: Path) -> None:
    one, two = pd.read_csv(a / "profile.csv"), pd.read_csv(b / "profile.csv")
    assert list(one["pair"]) == list(two["pair"])
    numbers = one.select_dtypes("number").columns
    pd.testing.assert_frame_equal(one[numbers], two[numbers], rtol=1e-9, atol=1e-15)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("model") / "llama")


def test_two_ranks_profile_ppl_and_search_as_one(model_dir, tmp_path):
    profile = ["profile", "--model", model_dir, "--windows", "6", "--batch-size", "2", "--max-tokens", "128",
               "--validate-windows", "2", "--validate-layers", "0", "--formats", "int"]
    ok(single([*profile, "--out", "one"], tmp_path))
    two = ok(torchrun([*profile, "--out", "two"], tmp_path))
    _same_table(tmp_path / "one", tmp_path / "two")
    meta_one, meta_two = (json.loads((tmp_path / d / "profile.json").read_text()) for d in ("one", "two"))
    assert meta_one["tokens"] == meta_two["tokens"] and meta_one["world_size"] == 1 and meta_two["world_size"] == 2
    assert two.stdout.count("profile written") <= 1  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two" / "state").iterdir()) == [
        "progress-rank0-of-2.json", "progress-rank1-of-2.json"]  # each rank resumes its own share

    ppl = ["ppl", "--model", model_dir, "--plan", "fp16", "--plan", "uniform:k2v2", "--windows", "5", "--seq-len", "128"]
    ok(single([*ppl, "--out", "ppl-one"], tmp_path))
    ok(torchrun([*ppl, "--out", "ppl-two"], tmp_path))
    one, two = (pd.read_csv(tmp_path / d / "ppl.csv") for d in ("ppl-one", "ppl-two"))
    assert list(one["ppl"]) == pytest.approx(list(two["ppl"]), rel=1e-9) and one["ppl"].nunique() == 2
    assert json.loads((tmp_path / "ppl-two" / "ppl.json").read_text())["world_size"] == 2

    search = ["search", "--profile", "one", "--budget", "3.25bits", "--verify", "3", "--verify-windows", "6",
              "--generations", "20"]
    ok(single([*search, "--out", "search-one"], tmp_path))
    ok(torchrun([*search, "--out", "search-two"], tmp_path))
    plan_one, plan_two = ((tmp_path / d / "plan.json").read_text() for d in ("search-one", "search-two"))
    assert json.loads(plan_one)["layers"] == json.loads(plan_two)["layers"]
    front_one, front_two = (pd.read_csv(tmp_path / d / "front.csv") for d in ("search-one", "search-two"))
    assert list(front_one["chosen"]) == list(front_two["chosen"])
    pd.testing.assert_series_equal(front_one["verified_nll"], front_two["verified_nll"], rtol=1e-9)


def test_every_rank_stops_with_the_same_message_on_bad_input(tmp_path):
    done = torchrun(["ppl", "--model", str(tmp_path / "missing"), "--plan", "fp16"], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("error: rank 0 of 2:") == 2, done.stderr[-2000:]  # both ranks, one message
    assert f'File "{ROOT / "kvtune"}' not in done.stderr  # torchrun prints its own traceback; none comes from kvtune


def test_a_killed_rank_ends_the_run_and_leaves_no_result(model_dir, tmp_path):
    """Rank 1 dies (SIGKILL) in its second batch: torchrun ends rank 0 too and names rank 1; no
    profile result is written, and each rank's resume state stays, so a rerun continues to the
    result one process gives."""
    (tmp_path / "die.py").write_text(textwrap.dedent("""
        import os, signal
        from kvtune.profiling import profile
        batch, calls = profile._profile_batch, []
        def dying(*args, **kwargs):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 2:  # its first batch is saved, the second never ends
                os.kill(os.getpid(), signal.SIGKILL)
            batch(*args, **kwargs)
        profile._profile_batch = dying
        from kvtune.cli import app
        app(prog_name="kvtune")
    """))
    done = torchrun(["profile", "--model", model_dir, "--windows", "8", "--batch-size", "2", "--max-tokens", "128",
                     "--validate-windows", "0", "--formats", "int", "--out", "out"], tmp_path, module="die")
    assert done.returncode != 0
    assert "rank: 1" in done.stderr and "Signal 9" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "profile.json").exists() and not (tmp_path / "out" / "profile.csv").exists()
    # Rerun: each rank resumes its own share and the result is one process's.
    state = json.loads((tmp_path / "out" / "state" / "progress-rank1-of-2.json").read_text())
    assert state["batches_done"] == 1  # rank 1 had saved its first batch before it died
    ok(torchrun(["profile", "--model", model_dir, "--windows", "8", "--batch-size", "2", "--max-tokens", "128",
                 "--validate-windows", "0", "--formats", "int", "--out", "out"], tmp_path))
    ok(single(["profile", "--model", model_dir, "--windows", "8", "--batch-size", "2", "--max-tokens", "128",
               "--validate-windows", "0", "--formats", "int", "--out", "one"], tmp_path))
    _same_table(tmp_path / "one", tmp_path / "out")


@pytest.mark.slow
def test_default_model_profile_two_ranks_as_one(tmp_path):
    """The default model (30 layers, GQA) at small settings: the same sums from 2 ranks as from 1."""
    profile = ["profile", "--windows", "3", "--batch-size", "1", "--max-tokens", "96", "--validate-windows", "0",
               "--formats", "int"]
    ok(single([*profile, "--out", "one"], tmp_path))
    ok(torchrun([*profile, "--out", "two"], tmp_path))
    _same_table(tmp_path / "one", tmp_path / "two")
