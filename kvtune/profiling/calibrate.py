"""Calibrated per-tensor scales: the amax of every layer's K and V over calibration text.

An engine's FP8 or NVFP4 cache divides K and V by one constant per layer (a checkpoint's
``k_scale`` / ``v_scale``, which ModelOpt's max calibration sets to amax / 448). kvtune takes the
same constant once, from the calibration split, and every later step uses it: the probe, the
simulation, the cache and the exported plan (``QuantSpec.amax``). It is never taken from the text
being evaluated, which would read future tokens and the other sequences of a batch.
"""

from __future__ import annotations

import torch

from kvtune.arch import describe


def calibrate_amax(model, windows: torch.Tensor, batch_size: int = 4) -> dict[str, list[float]]:
    """``{"key": [amax per planned layer], "value": [...]}`` over ``windows`` (N, T) token ids, of K
    and V as transformers' own cache holds them (after the rotary embedding)."""
    from transformers import DynamicCache

    plan_index = describe(model).plan_index
    amax = {"key": [0.0] * len(plan_index), "value": [0.0] * len(plan_index)}
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            cache = DynamicCache(config=model.config)
            model(input_ids=windows[start : start + batch_size].to(device), cache=cache, use_cache=True)
            for model_layer, layer in plan_index.items():
                held = cache.layers[model_layer]
                amax["key"][layer] = max(amax["key"][layer], held.keys.abs().max().item())
                amax["value"][layer] = max(amax["value"][layer], held.values.abs().max().item())
    return amax


def amax_problem(data, num_layers: int) -> str | None:
    """What is wrong with a stored ``{"key": [...], "value": [...]}`` of ``num_layers`` positive
    finite numbers each, or None."""
    if not isinstance(data, dict) or set(data) != {"key", "value"}:
        return "'amax' must be an object with 'key' and 'value' lists"
    for which, values in data.items():
        if not isinstance(values, list) or len(values) != num_layers or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < float("inf") for a in values):
            return f"'amax' {which} must list {num_layers} positive finite numbers, one per layer"
    return None
