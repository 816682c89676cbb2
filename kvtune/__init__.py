"""kvtune: layer-wise mixed-precision KV cache quantization.

The names a user reaches for first, importable from ``kvtune`` itself::

    import kvtune
    model, tokenizer = kvtune.load_model()                       # the embedded default, or a path / hub id
    cache = kvtune.load_cache(model, "uniform:k4v2")             # a Plan, a plan file, or a plan name
    model.generate(**inputs, cache=cache)

They are loaded on first use, so ``import kvtune`` (and the CLI's help) stays fast. A name that
is also a submodule's (``perplexity``) is left out: importing the submodule would replace it.
"""

from importlib import import_module

_EXPORTS = {
    "load_cache": "kvtune.cache",
    "MixedPrecisionCache": "kvtune.cache",
    "Plan": "kvtune.plan",
    "LayerPlan": "kvtune.plan",
    "ModelShape": "kvtune.plan",
    "resolve_plan": "kvtune.plan",
    "QuantSpec": "kvtune.quant",
    "load_model": "kvtune.models",
    "model_shape": "kvtune.models",
    "load_windows": "kvtune.data",
    "ProfileSettings": "kvtune.profiling",
    "run_profile": "kvtune.profiling",
    "Profile": "kvtune.profiling",
    "SearchSettings": "kvtune.search",
    "run_search": "kvtune.search",
    "EvalSettings": "kvtune.eval",
    "evaluate_plans": "kvtune.eval",
    "export_plan": "kvtune.export",
    "export_formats": "kvtune.export",
    "KvtuneError": "kvtune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvtune' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
