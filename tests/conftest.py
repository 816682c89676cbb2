import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The engines live in venvs of their own (scripts/setup_engines.sh makes them under .venvs/); where
# they exist, the tests that run a plan inside an engine use them unless the variables say otherwise.
VENVS = Path(__file__).resolve().parents[1] / ".venvs"
for variable, venv in (("KVTUNE_VLLM_PYTHON", "vllm"), ("KVTUNE_LLAMA_CPP_PYTHON", "ik")):
    if (VENVS / venv / "bin" / "python").exists():
        os.environ.setdefault(variable, str(VENVS / venv / "bin" / "python"))

# Tests that need a package kept out of kvtune's install run in that package's venv
# (scripts/test_engines.sh); elsewhere they are deselected, not skipped, and counted in the summary.
NEEDS = {"needs_vllm": ("vllm", True), "needs_lm_eval": ("lm_eval", True), "without_lm_eval": ("lm_eval", False)}
ELSEWHERE = pytest.StashKey[dict]()

# The default model and data are prepared once into $KVTUNE_HOME (default ~/.cache/kvtune),
# shared with `kvtune run`, so the tests pay the GGUF conversion only on a fresh machine.


def tiny_llama(layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, vocab: int = 256, dtype=torch.float64):
    """A random-weight Llama of the default model's architecture (GQA), small enough for seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    from kvtune.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model):
    """A random tiny Llama with the default model's tokenizer, saved as a local HF directory."""
    _, tokenizer = default_model
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(vocab=len(tokenizer), dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def pytest_collection_modifyitems(config, items):
    kept, elsewhere = [], {}
    extended = os.environ.get("KVTUNE_EXTENDED") == "1"
    for item in items:
        for marker, (module, wanted) in NEEDS.items():
            if item.get_closest_marker(marker) and (importlib.util.find_spec(module) is not None) != wanted:
                elsewhere.setdefault(marker, []).append(item)
                break
        else:
            # The heavy tier (the default model's whole job, torchrun, real engines) runs in
            # scripts/test_extended.sh, which CI runs after the main suite.
            if bool(item.get_closest_marker("extended")) != extended:
                elsewhere.setdefault("extended" if not extended else "not extended", []).append(item)
            else:
                kept.append(item)
    if elsewhere:
        config.hook.pytest_deselected(items=[item for group in elsewhere.values() for item in group])
        items[:] = kept
    config.stash[ELSEWHERE] = {marker: len(group) for marker, group in elsewhere.items()}


def pytest_terminal_summary(terminalreporter, config):
    for marker, count in config.stash.get(ELSEWHERE, {}).items():
        where = {"extended": "run in the heavy tier: scripts/test_extended.sh",
                 "not extended": "run in the main suite"}.get(marker, "run in their own venv: scripts/test_engines.sh")
        terminalreporter.write_line(f"{count} tests marked {marker} {where}")


def pytest_sessionfinish(session, exitstatus):
    """With KVTUNE_NO_SKIPS=1 (CI) a skipped test fails the run, unless it needs hardware this
    machine lacks (a reason starting "hardware:")."""
    if os.environ.get("KVTUNE_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else [])
               if not str(r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr).startswith("Skipped: hardware:")]
    if skipped:
        for report in skipped:
            reporter.write_line(f"skipped without a hardware reason (KVTUNE_NO_SKIPS=1): {report.nodeid}: {report.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
