"""Compare plans on held-out text and tasks: the table behind ``kvtune eval``, ``ppl`` and ``run``.

Perplexity uses simulated quantization (exactly what decoding through the cache would see);
task answers are generated through :class:`~kvtune.cache.MixedPrecisionCache`, so they really
read quantized K/V.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kvtune import tasks
from kvtune.cache import load_cache
from kvtune.data import DEFAULT_DATA, load_corpus, load_windows
from kvtune.distributed import ranks
from kvtune.errors import KvtuneError
from kvtune.models import DEFAULT_MODEL, canonical_name, load_model, load_tokenizer, model_shape
from kvtune.perplexity import token_nll
from kvtune.plan import Plan, resolve_plan

UNIFORM_BASELINES = ("fp16", "uniform:k8v8", "uniform:k4v4", "uniform:k2v2")
EVAL_BASELINES = ("fp16", "uniform:k8v8", "uniform:k4v4", "uniform:k4v2", "uniform:k2v2")


@dataclass
class EvalSettings:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    split: str = "heldout"
    seq_len: int = 512
    windows: int = 8
    seed: int = 0
    batch_size: int = 4
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's own on GPUs
    device_map: str | None = None  # accelerate placement (see kvtune.models.load_model)
    max_memory: str | None = None
    context_for_bytes: int = 32768  # memory column: the cache at this context, batch 1
    plans: list[str] = field(default_factory=lambda: list(UNIFORM_BASELINES))
    tasks: list[str] = field(default_factory=list)  # subset of kvtune.tasks.TASKS
    task_items: int = 24
    needle_context: int = 1536  # tokens of haystack; SmolLM2 reads 8192
    agreement_prompt: int = 256
    agreement_tokens: int = 32
    lm_eval: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (kvtune.lmeval)
    lm_eval_limit: int | None = None
    lm_eval_fewshot: int | None = None
    lm_eval_batch_size: int = 1
    lm_eval_include: str | None = None  # a folder of the user's own lm-eval task YAMLs

    def lm_eval_settings(self):
        from kvtune.lmeval import LmEvalSettings

        return LmEvalSettings(tasks=list(self.lm_eval), limit=self.lm_eval_limit, num_fewshot=self.lm_eval_fewshot,
                              batch_size=self.lm_eval_batch_size, seed=self.seed, include_path=self.lm_eval_include,
                              data=self.data, split=self.split)


def _build_tasks(settings: EvalSettings, tokenizer) -> dict:
    built = {}
    if "analogy" in settings.tasks:
        built["analogy"] = tasks.analogy_items(settings.task_items, settings.seed)
    if "needle" in settings.tasks:
        documents = load_corpus(settings.data)[settings.split]["text"]
        built["needle"] = tasks.needle_items(tokenizer, documents, settings.task_items, settings.needle_context, settings.seed)
    if "agreement" in settings.tasks:
        prompts = load_windows(tokenizer, settings.split, settings.agreement_prompt, settings.task_items, settings.seed + 1, settings.data)
        built["agreement"] = [tokenizer.decode(p) for p in prompts]
    return built


def check_settings(settings: EvalSettings, out: str | Path | None = None, stem: str = "ppl", overwrite: bool = False) -> None:
    """Every input checked before the model loads: tasks, sizes, placement, the model's files,
    every plan against the model's shape (from its config), the data, and the output folder."""
    from kvtune import inputs
    from kvtune.data import check_data

    if not settings.plans:
        raise KvtuneError("nothing to evaluate: give at least one --plan")
    unknown = sorted(set(settings.tasks) - set(tasks.TASKS))
    if unknown:
        raise KvtuneError(f"unknown task(s) {unknown}; available: {list(tasks.TASKS)}")
    inputs.check_counts((("--seq-len", settings.seq_len, 1), ("--windows", settings.windows, 1), ("--items", settings.task_items, 1)))
    if settings.lm_eval:
        from kvtune.lmeval import require_lm_eval

        require_lm_eval()
    if out is not None:
        inputs.check_out_dir(out, "eval" if stem == "eval" else "ppl", f"{stem}.json", settings, overwrite,
                             result_files=(f"{stem}.csv", f"{stem}.png"))
    lengths = {"--seq-len": settings.seq_len}
    if "needle" in settings.tasks:
        lengths["--needle-context"] = settings.needle_context
    shape = inputs.model_shape(settings.model, settings.device, settings.dtype, settings.device_map, settings.max_memory,
                               tokens=lengths)
    inputs.check_plans(settings.plans, shape, settings.model)
    check_data(settings.data)


def evaluate_plans(settings: EvalSettings, progress: bool = True, out: str | Path | None = None, stem: str = "ppl",
                   overwrite: bool = False) -> pd.DataFrame:
    """One row per plan: nominal bits, real cache bytes at ``context_for_bytes``, held-out PPL,
    and each task's accuracy. With ``out`` the table is also saved there (:func:`save_table`),
    which is checked, like every other input, before the model loads."""
    group = ranks()  # under torchrun: every rank checks, windows are split, rank 0 writes
    group.checked(check_settings, settings, out, stem, overwrite)
    if settings.lm_eval and group.size > 1:
        raise KvtuneError("--lm-eval runs in one process (lm-eval splits its own work with accelerate); start it without torchrun")
    progress = progress and group.is_main
    tokenizer = load_tokenizer(settings.model)
    windows = load_windows(tokenizer, settings.split, settings.seq_len, settings.windows, settings.seed, settings.data,
                           option="--windows")
    model, _ = load_model(settings.model, settings.device, settings.dtype, settings.device_map, settings.max_memory)
    shape = model_shape(model)
    plans: list[Plan] = [resolve_plan(p, shape.num_layers, shape.group_dim) for p in settings.plans]
    for plan in plans:  # refuse a bad plan before spending time on the others
        plan.check_model(shape, settings.model)
    built = _build_tasks(settings, tokenizer)
    if settings.lm_eval:
        from kvtune import lmeval

        lm_settings = settings.lm_eval_settings()
        manager = lmeval.task_manager(tokenizer, lm_settings)
    fp_plan = Plan.uniform("k16v16", shape.num_layers)
    reference = None
    if "agreement" in built:
        reference = tasks.generate(model, tokenizer, built["agreement"], lambda mask: load_cache(model, fp_plan, fused_decode=False, attention_mask=mask), settings.agreement_tokens)
    rows = []
    for spec, plan in zip(tqdm(settings.plans, desc="eval", disable=not progress), plans):
        start = time.perf_counter()
        cache_bytes = plan.cache_bytes(shape, settings.context_for_bytes)
        row = {
            "plan": plan.name or spec,
            "nominal_bits": plan.nominal_bits(),
            f"cache_MiB@{settings.context_for_bytes // 1024}k": cache_bytes / 2**20,
            "effective_bits": plan.effective_bits(shape, settings.context_for_bytes),
            "ppl": math.exp(token_nll(model, windows, plan, settings.batch_size).mean().item()),
        }

        def new_cache(mask, plan=plan):
            return load_cache(model, plan, fused_decode=False, attention_mask=mask)

        if "analogy" in built:
            row["analogy_acc"] = tasks.accuracy(model, tokenizer, built["analogy"], new_cache, max_new_tokens=4, batch_size=8)
        if "needle" in built:
            row["needle_acc"] = tasks.accuracy(model, tokenizer, built["needle"], new_cache, max_new_tokens=8, batch_size=4)
        if "agreement" in built:
            generated = tasks.generate(model, tokenizer, built["agreement"], new_cache, settings.agreement_tokens)
            row["fp16_agreement"] = tasks.agreement(reference, generated)
        if settings.lm_eval:  # log-likelihoods through the simulated cache, generations through load_cache
            row.update(lmeval.evaluate_plan(model, tokenizer, plan, lm_settings, manager))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    table = pd.DataFrame(rows)
    if out is not None and group.is_main:
        save_table(table, settings, out, stem, world_size=group.size)
    return table


def save_table(table: pd.DataFrame, settings: EvalSettings, out_dir: str | Path, stem: str = "ppl", world_size: int = 1) -> Path:
    import transformers

    from kvtune import files

    out_dir = Path(out_dir)
    meta = {
        "model": canonical_name(settings.model),
        "settings": asdict(settings),
        "ppl_tokens_per_plan": settings.windows * (settings.seq_len - 1),
        "world_size": world_size,  # data-parallel processes (torchrun) that made it
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }
    writers = {f"{stem}.csv": lambda p: table.to_csv(p, index=False)}
    if len(table) > 1:
        writers[f"{stem}.png"] = lambda p: save_plot(table, p)
    writers[f"{stem}.json"] = lambda p: p.write_text(files.dumps(meta))  # last: marks a finished result
    files.write_all(out_dir, writers)
    return out_dir / f"{stem}.csv"


def save_plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["ppl"] + [c for c in ("analogy_acc", "needle_acc", "fp16_agreement") if c in table.columns]
    metrics += [c for c in table.columns if c.startswith("lm-eval:") and c.rsplit(":", 1)[1] in ("acc", "exact_match", "acc_norm")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.scatter(table["nominal_bits"], table[metric])
        for _, row in table.iterrows():
            ax.annotate(row["plan"].replace("uniform:", ""), (row["nominal_bits"], row[metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("mean nominal bits")
        ax.set_ylabel(metric)
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
