"""A transformers ``Cache`` whose layers each store K and V at their own precision.

Each layer keeps, for K and for V separately, a quantized prefix (packed codes + fp16 scales)
and a full-precision tail. After every update the oldest ``QuantSpec.quantized_tokens(T, residual)``
tokens are quantized, the rest wait in the tail (KIVI's residual window). Tokens passed in the
current forward call are attended in full precision by that same call, as a real kernel does with
freshly computed K/V; they are read back quantized from the next call on.

Two ways to read it:

* the reference path (any device): ``update`` returns K/V dequantized in full and the model's
  usual attention runs over them;
* the fused path (CUDA, see :mod:`kvtune.fused`): ``update`` only stores, and the attention reads
  the packed prefix and the tail directly with the Triton decode kernel.

On CUDA new tokens are quantized and packed by the Triton kernel, which writes the same bytes as
the PyTorch quantizer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvtune import fused
from kvtune.plan import LayerPlan, Plan
from kvtune.quant import QuantizedTensor, QuantSpec, fake_quantize, quantize


def _quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    if x.is_cuda:
        from kvtune.kernels import quantize as kernel

        if kernel.supports(x.shape, spec):
            return kernel.quantize_pack(x, spec)
    return quantize(x, spec)


class _Growable:
    """A tensor that grows along dim -2 into spare capacity, so appending is not a full copy."""

    def __init__(self, first: torch.Tensor):
        self.buffer, self.length = first, first.shape[-2]

    def append(self, chunk: torch.Tensor) -> None:
        needed = self.length + chunk.shape[-2]
        if needed > self.buffer.shape[-2]:
            grown = self.buffer.new_empty(*self.buffer.shape[:-2], max(needed, 2 * self.buffer.shape[-2]), self.buffer.shape[-1])
            grown[..., : self.length, :] = self.view
            self.buffer = grown
        self.buffer[..., self.length : needed, :] = chunk
        self.length = needed

    @property
    def view(self) -> torch.Tensor:
        return self.buffer[..., : self.length, :]


class _Stream:
    """One of K or V within a layer: quantized prefix + full-precision tail."""

    def __init__(self, spec: QuantSpec, residual: int):
        self.spec, self.residual = spec, residual
        self._store: tuple[_Growable, _Growable, _Growable] | None = None  # packed, scale, zero
        self._dtype: torch.dtype | None = None
        self.tail: torch.Tensor | None = None
        # Engine formats (fp8, nvfp4, q*_*) are held as their dequantized values; bytes are counted
        # as the engine stores them. Every token is stored in the format (no window).
        self._engine: _Growable | None = None

    @property
    def quantized(self) -> QuantizedTensor | None:
        if self._store is None:
            return None
        packed, scale, zero = (g.view for g in self._store)
        return QuantizedTensor(packed, scale, zero, self.spec, self._dtype)

    @property
    def num_quantized(self) -> int:
        if self._engine is not None:
            return self._engine.length
        return 0 if self._store is None else self._store[0].length

    @property
    def num_tail(self) -> int:
        return 0 if self.tail is None else self.tail.shape[-2]

    def store(self, new: torch.Tensor) -> None:
        """Append ``new`` and quantize whatever the residual rule says is now old enough."""
        if self.spec.is_engine:
            chunk = fake_quantize(new, self.spec)
            if self._engine is None:
                self._engine = _Growable(chunk)
            else:
                self._engine.append(chunk)
            return
        self.tail = new if self.tail is None else torch.cat([self.tail, new], dim=-2)
        total = self.num_quantized + self.tail.shape[-2]
        flush = self.spec.quantized_tokens(total, self.residual) - self.num_quantized
        if flush > 0:
            chunk = _quantize(self.tail[..., :flush, :], self.spec)
            parts = (chunk.packed, chunk.scale, chunk.zero)
            if self._store is None:
                self._store, self._dtype = tuple(_Growable(p) for p in parts), chunk.dtype
            else:
                for growable, part in zip(self._store, parts):
                    growable.append(part)
            self.tail = self.tail[..., flush:, :]

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Store ``new`` and return every cached token dequantized (the reference read)."""
        self.store(new)
        return self.read(new)

    def read(self, new: torch.Tensor) -> torch.Tensor:
        """Every cached token, dequantized, with the ``new`` ones of this call unrounded."""
        if self.num_quantized + self.num_tail == new.shape[-2]:
            return new  # a prefill into an empty cache attends to exactly its own tokens
        quantized = self.quantized
        parts = [quantized.dequantize()] if quantized is not None else []
        if self._engine is not None:
            parts = [self._engine.view]
        tail = [] if self.tail is None else [self.tail]
        full = torch.cat(parts + tail, dim=-2) if parts else self.tail
        if self.num_tail < new.shape[-2]:
            full = full.clone()
            full[..., -new.shape[-2] :, :] = new  # the current call reads its own tokens unrounded
        return full

    def nbytes(self) -> int:
        if self._engine is not None:
            values = self._engine.view
            return self.spec.nbytes(values.shape[-2], values.shape[-1], values[..., 0, 0].numel())
        quantized = self.quantized
        q = 0 if quantized is None else quantized.nbytes
        # The tail is counted at fp16 whatever dtype the model runs in, so figures compare across devices.
        t = 0 if self.tail is None else self.tail.numel() * 2
        return q + t

    def map(self, fn) -> None:
        if self._engine is not None:
            self._engine = _Growable(fn(self._engine.view))
        quantized = self.quantized
        if quantized is not None:
            self._store = tuple(_Growable(fn(t)) for t in (quantized.packed, quantized.scale, quantized.zero))
        if self.tail is not None:
            self.tail = fn(self.tail)


class MixedPrecisionLayer(DynamicLayer):
    """One decoder layer's K/V, quantized as its :class:`LayerPlan` says."""

    is_croppable = False

    def __init__(self, layer_plan: LayerPlan, layer_idx: int = 0, fused_decode: bool = False):
        super().__init__()
        self.plan, self.layer_idx, self.fused_decode = layer_plan, layer_idx, fused_decode
        self.cumulative_length = 0
        self._k = _Stream(layer_plan.key, layer_plan.residual)
        self._v = _Stream(layer_plan.value, layer_plan.residual)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        new = key_states.shape[-2]
        integer = not (self.plan.key.is_engine or self.plan.value.is_engine)
        if self.fused_decode and integer and self.cumulative_length > new:
            self._k.store(key_states)
            self._v.store(value_states)
            if self._k.num_tail >= new and self._v.num_tail >= new:  # this call's tokens still unrounded
                fused.hand_over(self.layer_idx, key_states, (self._k.quantized, self._k.tail), (self._v.quantized, self._v.tail))
                return key_states, value_states  # the fused attention reads the cache, not these
            return self._k.read(key_states), self._v.read(value_states)
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

    def __init__(self, plan: Plan, fused_decode: bool = False):
        self.plan = plan
        layers = [MixedPrecisionLayer(layer, i, fused_decode) for i, layer in enumerate(plan.layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held now: packed codes, fp16 scales/zeros and the residual tails at fp16."""
        return sum(layer.nbytes() for layer in self.layers)


def load_cache(model, plan: Plan, fused_decode: bool | None = None) -> MixedPrecisionCache:
    """A ready cache for ``model`` after checking that the plan fits it.

    ``fused_decode`` (default: whether the model is on CUDA) switches the model to the
    ``kvtune_fused`` attention so decode steps read the packed cache with the Triton kernel.
    """
    from kvtune.models import check_supported, model_shape

    check_supported(model)
    plan.check_model(model_shape(model), getattr(model, "name_or_path", "the model"))
    if fused_decode is None:
        fused_decode = fused.available(model)
    if fused_decode:
        fused.enable(model)
    return MixedPrecisionCache(plan, fused_decode)
