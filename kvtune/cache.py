"""A transformers ``Cache`` whose layers each store K and V at their own precision.

Each layer keeps, for K and for V separately, a quantized prefix (packed codes + fp16 scales)
and a full-precision tail. After every update the oldest ``QuantSpec.quantized_tokens(T, residual)``
tokens are quantized, the rest wait in the tail (KIVI's residual window). Tokens passed in the
current forward call are attended in full precision by that same call, as a real kernel does with
freshly computed K/V; they are read back quantized from the next call on.

This is the reference path (dequantize everything, then the model's usual attention).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvtune.plan import LayerPlan, Plan
from kvtune.quant import QuantizedTensor, QuantSpec, quantize


class _Stream:
    """One of K or V within a layer: quantized prefix + full-precision tail."""

    def __init__(self, spec: QuantSpec, residual: int):
        self.spec, self.residual = spec, residual
        self.quantized: QuantizedTensor | None = None
        self.tail: torch.Tensor | None = None

    @property
    def num_quantized(self) -> int:
        return 0 if self.quantized is None else self.quantized.num_tokens

    def append(self, new: torch.Tensor) -> torch.Tensor:
        self.tail = new if self.tail is None else torch.cat([self.tail, new], dim=-2)
        total = self.num_quantized + self.tail.shape[-2]
        flush = self.spec.quantized_tokens(total, self.residual) - self.num_quantized
        if flush > 0:
            chunk = quantize(self.tail[..., :flush, :], self.spec)
            self.quantized = chunk if self.quantized is None else self.quantized.cat(chunk)
            self.tail = self.tail[..., flush:, :]
        parts = [self.quantized.dequantize()] if self.quantized is not None else []
        full = torch.cat(parts + [self.tail], dim=-2)
        if flush > 0:
            full[..., -new.shape[-2] :, :] = new  # the current call reads its own tokens unrounded
        return full

    def nbytes(self) -> int:
        q = 0 if self.quantized is None else self.quantized.nbytes
        # The tail is counted at fp16 whatever dtype the model runs in, so figures compare across devices.
        t = 0 if self.tail is None else self.tail.numel() * 2
        return q + t

    def map(self, fn) -> None:
        if self.quantized is not None:
            self.quantized = self.quantized.map(fn)
        if self.tail is not None:
            self.tail = fn(self.tail)


class MixedPrecisionLayer(DynamicLayer):
    """One decoder layer's K/V, quantized as its :class:`LayerPlan` says."""

    is_croppable = False

    def __init__(self, layer_plan: LayerPlan):
        super().__init__()
        self.plan = layer_plan
        self.cumulative_length = 0
        self._k = _Stream(layer_plan.key, layer_plan.residual)
        self._v = _Stream(layer_plan.value, layer_plan.residual)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return self._k.append(key_states), self._v.append(value_states)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        return self._k.nbytes() + self._v.nbytes()

    def reset(self) -> None:
        self.cumulative_length = 0
        self._k = _Stream(self.plan.key, self.plan.residual)
        self._v = _Stream(self.plan.value, self.plan.residual)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (its groups are already rounded)")

    def _map_batch(self, fn) -> None:
        self._k.map(fn)
        self._v.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self):
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map_batch(lambda t: t.to(self.device, non_blocking=True))


class MixedPrecisionCache(Cache):
    """``model.generate(..., past_key_values=MixedPrecisionCache(plan))``."""

    def __init__(self, plan: Plan):
        self.plan = plan
        super().__init__(layers=[MixedPrecisionLayer(layer) for layer in plan.layers])

    def nbytes(self) -> int:
        """Bytes held now: packed codes, fp16 scales/zeros and the residual tails at fp16."""
        return sum(layer.nbytes() for layer in self.layers)


def load_cache(model, plan: Plan) -> MixedPrecisionCache:
    """A ready cache for ``model`` after checking that the plan fits it."""
    from kvtune.models import check_supported, model_shape

    check_supported(model)
    plan.check_model(model_shape(model), getattr(model, "name_or_path", "the model"))
    return MixedPrecisionCache(plan)
