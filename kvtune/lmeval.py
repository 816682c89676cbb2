"""lm-evaluation-harness tasks through the quantized cache (``kvtune eval --lm-eval TASKS``).

:class:`PlanLM` is lm-eval's own Hugging Face model (``HFLM``) with one change per request kind:

- log-likelihood requests (multiple choice, perplexity tasks) run their forward pass inside
  :func:`kvtune.simulate.simulate_quantization`, so every query reads K/V as the plan's cache
  would hold them (residual window, groups, formats) — the simulation the held-out PPL uses;
- generation requests decode through :func:`kvtune.cache.load_cache` with the plan: the prompt
  is prefilled into the quantized cache and every new token reads it. Each such call is counted
  (``generate_calls``) so a test can see the cache was used rather than assume it.

Any task lm-eval knows runs where its data can be had; two offline tasks are built from the
held-out Wikipedia text (never from text in this repo) into a task folder lm-eval reads:

- ``kvtune_wiki_next`` (multiple choice): two consecutive sentences of a held-out article, and
  the sentence that follows them among three sentences of other held-out articles;
- ``kvtune_wiki_needle`` (generation): the needle task of :mod:`kvtune.tasks` in lm-eval's form —
  a held-out sentence planted in a haystack of other held-out articles, answered with the four
  words after its quoted beginning (exact match of the first four generated words).

lm-eval is an optional extra (``pip install kvtune[lm-eval]``); without it these functions say so.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from kvtune.errors import KvtuneError

OFFLINE_TASKS = ("kvtune_wiki_next", "kvtune_wiki_needle")
OFFLINE_GROUP = "kvtune_wiki"
TASKS_VERSION = 1  # bump when the item construction changes: it names the task folder


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise KvtuneError("--lm-eval needs lm-evaluation-harness: pip install 'kvtune[lm-eval]' (or pip install lm-eval)") from None
    import lm_eval

    return lm_eval


@dataclass
class LmEvalSettings:
    tasks: list[str]
    limit: int | None = None  # items per task (lm-eval's --limit)
    num_fewshot: int | None = None
    batch_size: int = 1  # 1: log-likelihoods exactly as the simulation computes one sequence
    seed: int = 0
    include_path: str | None = None  # a folder of the user's own task YAMLs
    # The offline tasks' data: the held-out split by default; search verification builds them from its own split.
    data: str | None = None
    split: str = "heldout"
    next_items: int = 200
    needle_items: int = 40
    needle_context: int = 1024


# ---- the offline tasks ----------------------------------------------------------------------------


def _paragraph_sentences(text: str) -> list[list[str]]:
    """Each paragraph's sentences in order (a sentence never spans two lines)."""
    out = []
    for paragraph in text.split("\n"):
        sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", paragraph) if s.strip()]
        if len(sentences) >= 3:
            out.append(sentences)
    return out


def next_sentence_items(documents: list[str], n: int, seed: int = 0) -> list[dict]:
    """Two consecutive held-out sentences as context; the true next one among three from other articles."""
    rng = random.Random(seed)
    triples, pool = [], []
    for d, text in enumerate(documents):
        for sentences in _paragraph_sentences(text):
            ok = [6 <= len(s.split()) <= 45 for s in sentences]
            triples += [(d, sentences[i : i + 3]) for i in range(len(sentences) - 2) if all(ok[i : i + 3])]
            pool += [(d, s) for s, good in zip(sentences, ok) if good]
    if len(triples) < n or len({d for d, _ in triples}) < 2:
        raise KvtuneError(f"the held-out text gives {len(triples)} sentence triples; {n} were asked for")
    items = []
    for d, (a, b, truth) in rng.sample(triples, n):
        others = [s for doc, s in rng.sample(pool, 12) if doc != d][:3]
        choices = others + [truth]
        rng.shuffle(choices)
        items.append({"context": f"{a} {b}", "choices": choices, "label": choices.index(truth)})
    return items


def needle_task_items(tokenizer, documents: list[str], n: int, context_tokens: int, seed: int = 0) -> list[dict]:
    from kvtune import tasks

    return [{"prompt": it.prompt, "answer": it.answer} for it in tasks.needle_items(tokenizer, documents, n, context_tokens, seed)]


# Every offline task: its name, the tag, and its JSONL as lm-eval's local "json" dataset.
_HEADER = """task: {task}
tag: kvtune_wiki
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""

_NEXT_YAML = """output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_NEEDLE_YAML = """output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
filter_list:
  - name: first_words
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(\\\\S+(?:\\\\s+\\\\S+){{0,3}})"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: {version}
"""


def offline_task_dir(tokenizer, settings: LmEvalSettings, home: Path | None = None) -> Path:
    """The offline tasks' folder (YAML + JSONL) for these settings, built once from the held-out text."""
    from kvtune import files
    from kvtune.data import DEFAULT_DATA, load_corpus
    from kvtune.models import kvtune_home

    key = dict(v=TASKS_VERSION, data=settings.data or DEFAULT_DATA, split=settings.split, seed=settings.seed,
               next=settings.next_items, needle=settings.needle_items, context=settings.needle_context,
               tokenizer=getattr(tokenizer, "name_or_path", ""), vocab=len(tokenizer))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = (home or kvtune_home()) / "lm_eval_tasks" / f"{settings.split}-{digest}"
    if (folder / "kvtune_wiki_needle.yaml").is_file():  # written last: a finished folder
        return folder
    documents = [t for t in load_corpus(settings.data)[settings.split]["text"] if t and t.strip()]
    built = {
        "kvtune_wiki_next": next_sentence_items(documents, settings.next_items, settings.seed),
        "kvtune_wiki_needle": needle_task_items(tokenizer, documents, settings.needle_items, settings.needle_context, settings.seed),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, yaml in (("kvtune_wiki_next", _NEXT_YAML), ("kvtune_wiki_needle", _NEEDLE_YAML)):
        data = folder / f"{name}.jsonl"
        files.write_text(data, "".join(json.dumps(item) + "\n" for item in built[name]))
        header = _HEADER.format(task=name, data=json.dumps(str(data)))
        files.write_text(folder / f"{name}.yaml", header + yaml.format(version=TASKS_VERSION))
    return folder


# ---- lm-eval's model, reading K/V through the plan --------------------------------------------------


def plan_lm(model, tokenizer, plan, batch_size: int = 1):
    """lm-eval's HFLM over a loaded model, with ``plan``'s quantized K/V in both request kinds (None: as is)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from kvtune.cache import load_cache
    from kvtune.simulate import simulate_quantization

    class PlanLM(HFLM):
        generate_calls = 0

        def _model_call(self, inps, attn_mask=None, labels=None):
            # Batches are right-padded: the padding follows every real token, so causal attention
            # and the simulated cache (which quantizes only what precedes each query) never see it.
            with simulate_quantization(self.model, plan) if plan is not None else nullcontext():
                import torch

                with torch.no_grad():
                    return self.model(inps, use_cache=False).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if plan is not None:
                generation_kwargs["cache"] = load_cache(self.model, plan, fused_decode=False,
                                                                  attention_mask=generation_kwargs.get("attention_mask"))
                PlanLM.generate_calls += 1
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return PlanLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def task_manager(tokenizer, settings: LmEvalSettings):
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    include = []
    if any(t in OFFLINE_TASKS or t == OFFLINE_GROUP for t in settings.tasks):
        include.append(str(offline_task_dir(tokenizer, settings)))
    if settings.include_path:
        include.append(settings.include_path)
    return TaskManager(include_path=include or None)


def run_tasks(lm, manager, settings: LmEvalSettings, samples: dict | None = None, log_samples: bool = False) -> dict:
    import lm_eval

    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
                                       limit=None if samples else settings.limit, samples=samples, task_manager=manager,
                                       random_seed=settings.seed, numpy_random_seed=settings.seed,
                                       torch_random_seed=settings.seed, fewshot_random_seed=settings.seed,
                                       log_samples=log_samples, bootstrap_iters=0)
    except (KeyError, ValueError) as e:
        raise KvtuneError(f"lm-eval could not run {settings.tasks}: {e}") from None


def scores(results: dict) -> dict[str, float]:
    """``lm-eval:<task>:<metric>`` → value for every task's metrics (filters after a comma, as lm-eval names them)."""
    out = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if name == "alias" or "_stderr" in name or name.startswith("sample_len") or not isinstance(value, (int, float)):
                continue
            metric = name.split(",")[0]
            out[f"lm-eval:{task}:{metric}"] = float(value)
    return out


def evaluate_plan(model, tokenizer, plan, settings: LmEvalSettings, manager=None) -> dict[str, float]:
    """The task scores of one plan (None: the model's own attention)."""
    lm = plan_lm(model, tokenizer, plan, settings.batch_size)
    return scores(run_tasks(lm, manager or task_manager(tokenizer, settings), settings))
