"""Bad inputs a new user gives, one per case, and what each must get: a message naming the input
(matched by ``expect``), exit status 2, no traceback, no model loaded, and nothing written or lost.

Shared by tests/test_inputs.py (which asserts every case) and scripts/bad_inputs_table.py (which
runs them and writes docs/bad-inputs.md), so the documented table is what the code does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, as a user would describe it
    args: Callable[["Workspace"], list[str]]  # the command line, given the prepared workspace
    expect: str  # regex the message must match
    keeps: Callable[["Workspace"], list[Path]] = lambda w: []  # earlier results that must survive unchanged


class Workspace:
    """A folder with the valid inputs the cases start from: a tiny local model, a profile of it
    (synthetic numbers), a plan, and an earlier result of every command."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "tiny-llama"  # 3 attention layers, 2 KV heads, head_dim 32

    def prepare(self) -> Workspace:
        from tests.families import save_tiny
        from tests.test_search import _synthetic_profile

        save_tiny("llama", self.model)
        _synthetic_profile(self.profile, layers=3)
        _edit(self.profile / "profile.json", lambda m: m["settings"].update(model=str(self.model)) or m.update(model=str(self.model)))
        _synthetic_profile(self.other_profile, layers=5)
        _edit(self.other_profile / "profile.json", lambda m: m["settings"].update(model=str(self.model)) or m.update(model=str(self.model)))
        self.a_file.write_text("not a folder\n")
        self.export_dir.mkdir()
        return self

    # paths the cases use
    profile = property(lambda self: self.root / "profile")
    other_profile = property(lambda self: self.root / "profile-5-layers")
    a_file = property(lambda self: self.root / "a-file.txt")
    export_dir = property(lambda self: self.root / "existing-dir")

    def file(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def model_copy(self, name: str, drop: tuple[str, ...] = (), config: str | None = None) -> str:
        """The tiny model with files removed or its config replaced."""
        import shutil

        target = self.root / name
        shutil.copytree(self.model, target)
        for pattern in drop:
            for path in target.glob(pattern):
                path.unlink()
        if config is not None:
            (target / "config.json").write_text(config)
        return str(target)

    def profile_copy(self, name: str, edit: Callable[[dict], object] | None = None, table: Callable | None = None) -> str:
        import shutil

        target = self.root / name
        shutil.copytree(self.profile, target)
        if edit:
            _edit(target / "profile.json", edit)
        if table:
            import pandas as pd

            frame = pd.read_csv(target / "profile.csv")
            table(frame)
            frame.to_csv(target / "profile.csv", index=False)
        return str(target)

    def plan_file(self, name: str, edit: Callable[[dict], object]) -> str:
        from kvtune.plan import ModelShape, Plan

        plan = Plan.uniform("k4v2", 3)
        plan.shape = ModelShape(3, 2, 32)
        data = plan.to_dict()
        edit(data)
        return self.file(name, json.dumps(data))

    def earlier(self, command: str) -> Path:
        """An earlier result of ``command`` that a later run with other settings must not replace."""
        from kvtune.eval import EvalSettings
        from kvtune.files import dumps
        from kvtune.inputs import comparable
        from kvtune.search import SearchSettings

        folder = self.root / f"earlier-{command}"
        folder.mkdir(parents=True, exist_ok=True)
        if command == "search":
            settings = SearchSettings(profile=str(self.profile), budget="3.25bits", verify=0)
            (folder / "search.json").write_text(dumps({"settings": comparable(settings)}))
            (folder / "plan.json").write_text("the 3.25-bit plan\n")
            return folder / "plan.json"
        if command in ("ppl", "eval"):
            settings = EvalSettings(model=str(self.model), plans=["fp16"])
            (folder / f"{command}.json").write_text(dumps({"settings": comparable(settings)}))
            (folder / f"{command}.csv").write_text("plan,ppl\nfp16,23.1\n")
            return folder / f"{command}.csv"
        (folder / "plan.json").write_text("an earlier export\n")
        return folder / "plan.json"


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _eight_layers(plan: dict) -> None:
    plan["shape"] = None
    plan["layers"] = ["k4v2"] * 8


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


M = "--model"  # shorthand


CASES: list[Case] = [
    # ---- output locations: refused before any work ------------------------------------------
    Case("search-out-file", "search --out is an existing file",
         lambda w: ["search", "--budget", "3.25bits", "--profile", str(w.profile), "--verify", "0", "--out", str(w.a_file)],
         r"--out .*a-file.txt is a file"),
    Case("search-out-unwritable", "search --out in a read-only place",
         lambda w: ["search", "--budget", "3.25bits", "--profile", str(w.profile), "--verify", "0", "--out", "/proc/kvtune-out"],
         r"--out /proc/kvtune-out: cannot write in /proc"),
    Case("ppl-out-file", "ppl --out is an existing file",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--out", str(w.a_file)], r"--out .*a-file.txt is a file"),
    Case("eval-out-file", "eval --out is an existing file",
         lambda w: ["eval", M, str(w.model), "--out", str(w.a_file)], r"--out .*a-file.txt is a file"),
    Case("profile-out-file", "profile --out is an existing file",
         lambda w: ["profile", M, str(w.model), "--out", str(w.a_file)], r"--out .*a-file.txt is a file"),
    Case("run-out-file", "run --out is an existing file",
         lambda w: ["run", M, str(w.model), "--out", str(w.a_file)], r"--out .*a-file.txt is a file"),
    Case("export-out-dir", "export --out is an existing folder",
         lambda w: ["export", "--plan", "uniform:k4v2", "--out", str(w.export_dir)], r"--out .*existing-dir is a folder"),
    Case("run-out-unwritable", "run --out in a read-only place",
         lambda w: ["run", M, str(w.model), "--out", "/proc/kvtune-run"], r"cannot write in /proc"),
    # ---- options and their consistency: refused before the model loads ---------------------
    Case("validate-layers-range", "profile --validate-layers 99 on a 3-layer model",
         lambda w: ["profile", M, str(w.model), "--validate-layers", "99", "--out", str(w.root / "p1")],
         r"--validate-layers: layer\(s\) \[99\] outside 0\.\.2"),
    Case("validate-layers-text", "profile --validate-layers a,b",
         lambda w: ["profile", M, str(w.model), "--validate-layers", "a,b", "--out", str(w.root / "p2")],
         r"--validate-layers 'a,b': 'a' is not a layer number"),
    Case("validate-pair", "profile --validate-pair k7v7",
         lambda w: ["profile", M, str(w.model), "--validate-pair", "k7v7", "--out", str(w.root / "p3")],
         r"--validate-pair: unknown bit width 7"),
    Case("run-budget", "run --budget 2GiB (no context)",
         lambda w: ["run", M, str(w.model), "--budget", "2GiB", "--out", str(w.root / "r1")], r"cannot read budget '2GiB'"),
    Case("run-budget-too-small", "run --budget 1bits (below every candidate plan)",
         lambda w: ["run", M, str(w.model), "--budget", "1bits", "--out", str(w.root / "r2")],
         r"budget 1bits is impossible .* smallest feasible budget is 2bits"),
    Case("search-other-shape", "search --verify 0 with a 5-layer profile of a 3-layer model",
         lambda w: ["search", "--budget", "3.25bits", "--profile", str(w.other_profile), "--verify", "0", "--out", str(w.root / "s1")],
         r"profile was made for a model of 5 attention layers .* but .*tiny-llama has 3 attention layers"),
    Case("eval-tasks", "eval --tasks with an unknown task",
         lambda w: ["eval", M, str(w.model), "--tasks", "analogy,trivia", "--out", str(w.root / "e1")],
         r"unknown task\(s\) \['trivia'\]; available: \['analogy', 'needle', 'agreement'\]"),
    Case("eval-nothing", "eval with no baselines and no --plan",
         lambda w: ["eval", M, str(w.model), "--baselines", "", "--out", str(w.root / "e2")],
         r"nothing to evaluate: give at least one --plan"),
    Case("export-format", "export --format with an unknown engine",
         lambda w: ["export", "--plan", "uniform:k4v2", "--format", "tensorrt", "--out", str(w.root / "x1.json")],
         r"unknown export format 'tensorrt'; available: \['kvtune', 'hf-quantized-cache'"),
    Case("search-formats", "search --formats naming pairs the profile lacks",
         lambda w: ["search", "--budget", "3.25bits", "--profile", str(w.profile), "--verify", "0", "--formats", "vllm",
                    "--out", str(w.root / "s6")],
         r"--formats vllm asks for pairs the profile does not have"),
    Case("ppl-plan-layers", "ppl --plan with a plan file of another layer count",
         lambda w: ["ppl", "--plan", w.plan_file("seven.json", _eight_layers),
                    M, str(w.model), "--out", str(w.root / "o9")],
         r"--plan .*seven\.json: plan .* has 8 layers but .*tiny-llama has 3"),
    Case("profile-group", "profile --group-size that does not divide head_dim",
         lambda w: ["profile", M, str(w.model), "--group-size", "24", "--out", str(w.root / "p4")],
         r"--group-size 24: per-token group_size 24 does not divide head_dim 32"),
    Case("profile-mode", "profile --key-mode garbage",
         lambda w: ["profile", M, str(w.model), "--key-mode", "garbage", "--out", str(w.root / "p5")],
         r"--key-mode 'garbage': expected one of \['per-token', 'per-channel'\]"),
    Case("seq-len-positions", "ppl --seq-len longer than the model's positions",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--seq-len", "100000", "--out", str(w.root / "o10")],
         r"--seq-len 100000 is longer than the 512 positions"),
    Case("windows-too-many", "ppl --windows more than the held-out text holds",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--data", w.file("five.txt", "\n\n".join(["word " * 40] * 5)),
                    "--windows", "500", "--seq-len", "64", "--out", str(w.root / "o11")],
         r"--windows 500: the heldout text of .*five\.txt holds \d+ tokens: room for \d+ windows of 64"),
    Case("model-empty", "--model ''",
         lambda w: ["ppl", "--plan", "fp16", M, "", "--out", str(w.root / "o12")], r"--model is empty"),
    Case("data-empty", "--data ''",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--data", "", "--out", str(w.root / "o13")], r"--data is empty"),
    Case("device-map-empty", "--device-map {}",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--device-map", "{}", "--out", str(w.root / "o14")],
         r"--device-map is an empty map"),
    Case("device-map-gpu", "--device-map naming a GPU on a machine without one",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--device-map", '{"model.layers.0": 5}', "--out", str(w.root / "o15")],
         r"--device-map entry 'model.layers.0': GPU 5 does not exist here"),
    Case("max-memory-gpu", "--max-memory for a GPU that does not exist",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--device-map", "auto", "--max-memory", "7=1GiB", "--out", str(w.root / "o16")],
         r"--max-memory: GPU 7 does not exist here"),
    Case("plan-group-huge", "a plan with a huge group_size",
         lambda w: ["show-plan", w.plan_file("group-huge.json", lambda d: d["layers"][0]["key"].update(group_size=10**30))],
         r"layer 0 key: group_size must be an integer from 1 to 65536"),
    Case("plan-nominal-bits", "a plan whose stated nominal_bits contradicts its layers",
         lambda w: ["show-plan", w.plan_file("nominal.json", lambda d: d.update(nominal_bits=7.5))],
         r"'nominal_bits' says 7\.5 but its layers average 3 bits"),
    Case("device-cuda", "--device cuda on a CPU-only torch",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--device", "cuda", "--out", str(w.root / "o1")],
         r"--device cuda: (this PyTorch build has no CUDA|no GPU is visible)"),
    Case("device-bogus", "--device bogus",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--device", "bogus", "--out", str(w.root / "o2")],
         r"--device 'bogus' is not a device"),
    Case("max-memory-alone", "--max-memory without --device-map",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--max-memory", "0=1GiB", "--out", str(w.root / "o3")],
         r"--max-memory applies to --device-map"),
    Case("data-jsonl", "ppl --data with a malformed .jsonl",
         lambda w: ["ppl", "--plan", "fp16", M, str(w.model), "--data",
                    w.file("bad.jsonl", '{"text": "one"}\n{"text": "two",,}\n{"text": "three"}\n'), "--out", str(w.root / "o4")],
         r"bad\.jsonl line 2 is not valid JSON"),
    Case("model-no-weights", "a model folder with a config but no weights",
         lambda w: ["ppl", "--plan", "fp16", M, w.model_copy("no-weights", drop=("*.safetensors",)), "--out", str(w.root / "o5")],
         r"no-weights holds a config but no weights"),
    Case("model-no-tokenizer", "a model folder with weights but no tokenizer",
         lambda w: ["ppl", "--plan", "fp16", M, w.model_copy("no-tok", drop=("tokenizer*", "special_tokens_map.json")),
                    "--out", str(w.root / "o6")],
         r"no-tok holds no tokenizer"),
    Case("model-bad-config", "a malformed config.json",
         lambda w: ["ppl", "--plan", "fp16", M, w.model_copy("bad-config", config='{"model_type": "llama",'), "--out", str(w.root / "o7")],
         r"model config .*bad-config/config\.json is not valid JSON"),
    # ---- profile, progress and plan files: checked field by field ----------------------------
    Case("profile-no-settings", "profile.json without 'settings'",
         lambda w: ["search", "--budget", "3.25bits", "--verify", "0", "--out", str(w.root / "s2"),
                    "--profile", w.profile_copy("prof-nosettings", lambda m: m.pop("settings"))],
         r"profile\.json: 'settings' must be the object"),
    Case("profile-lowercase-pairs", "profile.json with lowercase pairs",
         lambda w: ["search", "--budget", "3.25bits", "--verify", "0", "--out", str(w.root / "s3"),
                    "--profile", w.profile_copy("prof-lower", lambda m: m.update(pairs=[p.lower() for p in m["pairs"]]))],
         r"'pairs' lists 'k16v16'; pairs are written 'K16V16'"),
    Case("profile-head-dim-0", "profile.json with head_dim 0",
         lambda w: ["search", "--budget", "3.25bits", "--verify", "0", "--out", str(w.root / "s4"),
                    "--profile", w.profile_copy("prof-hd0", lambda m: m["shape"].update(head_dim=0))],
         r"head_dim must be a positive integer, got 0"),
    Case("profile-huge-values", "profile.csv with huge finite values",
         lambda w: ["search", "--budget", "3.25bits", "--verify", "0", "--out", str(w.root / "s5"),
                    "--profile", w.profile_copy("prof-huge", table=lambda t: t.__setitem__("taylor", t["taylor"] * 0 + 1e300))],
         r"column 'taylor' has values above 1e\+06"),
    Case("progress-not-object", "a profile's progress.json that is not an object",
         lambda w: ["profile", M, str(w.model), "--out", str(Path(w.file("resume/state/progress.json", "[1, 2]")).parent.parent)],
         r"progress\.json: expected a JSON object, got list; rerun with --overwrite"),
    Case("plan-residual-true", 'a plan with "residual": true',
         lambda w: ["ppl", "--plan", w.plan_file("residual-true.json", lambda d: d["layers"][0].update(residual=True)),
                    M, str(w.model), "--out", str(w.root / "o8")],
         r"--plan .*residual-true\.json: layer 0: residual must be an integer from 0 to \d+, got True"),
    Case("plan-bits-float", 'a plan with "bits": 4.0',
         lambda w: ["show-plan", w.plan_file("bits-float.json", lambda d: d["layers"][0]["key"].update(bits=4.0))],
         r"layer 0 key: unknown bit width 4\.0: expected one of the integers"),
    Case("plan-negative-shape", "a plan whose shape has negative sizes",
         lambda w: ["show-plan", w.plan_file("negative.json", lambda d: d["shape"].update(num_kv_heads=-3))],
         r"num_kv_heads must be a positive integer, got -3"),
    Case("show-plan-zero-heads", "show-plan --kv-heads 0",
         lambda w: ["show-plan", "uniform:k4v2", "--kv-heads", "0"], r"Invalid value for '--kv-heads'"),
    Case("plan-deep-json", "a plan file nested 100,000 deep",
         lambda w: ["show-plan", w.file("deep.json", _nested(100_000))], r"deep\.json is nested too deeply"),
    Case("plan-nan", "a plan file with NaN",
         lambda w: ["show-plan", w.file("nan.json", '{"schema": "kvtune.plan", "nominal_bits": NaN}')],
         r"NaN is not a JSON number"),
    # ---- results are never replaced silently --------------------------------------------------
    Case("search-replaces", "search into an --out that holds a search of another budget",
         lambda w: ["search", "--budget", "6bits", "--profile", str(w.profile), "--verify", "0",
                    "--out", str(w.earlier("search").parent)],
         r"already holds a `kvtune search` result made with other settings \(budget: '3\.25bits' → '6bits'\)",
         keeps=lambda w: [w.root / "earlier-search" / "plan.json"]),
    Case("ppl-replaces", "ppl into an --out that holds another table",
         lambda w: ["ppl", "--plan", "uniform:k2v2", M, str(w.model), "--out", str(w.earlier("ppl").parent)],
         r"already holds a `kvtune ppl` result made with other settings \(plans: \['fp16'\] → \['uniform:k2v2'\]\)",
         keeps=lambda w: [w.root / "earlier-ppl" / "ppl.csv"]),
    Case("eval-replaces", "eval into an --out that holds another table",
         lambda w: ["eval", M, str(w.model), "--out", str(w.earlier("eval").parent)],
         r"already holds a `kvtune eval` result made with other settings \(plans: \['fp16'\] → \['fp16', 'uniform:k8v8'",
         keeps=lambda w: [w.root / "earlier-eval" / "eval.csv"]),
    Case("search-over-export", "search into a folder holding an exported plan.json (no search.json)",
         lambda w: ["search", "--budget", "4bits", "--profile", str(w.profile), "--verify", "0", "--out", str(w.earlier("export").parent)],
         r"holds plan\.json but no search\.json saying how they were made",
         keeps=lambda w: [w.root / "earlier-export" / "plan.json"]),
    Case("export-replaces", "export over a file that holds another export",
         lambda w: ["export", "--plan", "uniform:k4v2", "--out", str(w.earlier("export"))],
         r"already holds a different file; give another --out, or --overwrite",
         keeps=lambda w: [w.root / "earlier-export" / "plan.json"]),
]
