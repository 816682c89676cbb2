"""A transformers ``Cache`` whose layers each store K and V at their own precision.

Each layer keeps, for K and for V separately, a quantized prefix (packed codes + fp16 scales)
and a full-precision tail. After every update the oldest ``QuantSpec.quantized_tokens(T, residual)``
tokens are quantized, the rest wait in the tail (KIVI's residual window). Tokens passed in the
current forward call are attended in full precision by that same call, as a real kernel does with
freshly computed K/V; they are read back quantized from the next call on. Engine formats are the
exception (:attr:`~kvtune.quant.QuantSpec.reads_itself`): engines store first and attend over the
store, so there a call reads its own tokens rounded too.

Two ways to read it:

* the reference path (any device): ``update`` returns K/V dequantized in full and the model's
  usual attention runs over them;
* the fused path (CUDA, see :mod:`kvtune.fused`), inside ``with cache.fused_decoding(model):``
  (:meth:`MixedPrecisionCache.fused_decoding`): ``update`` only stores, and the attention reads the
  packed prefix and the tail directly with the Triton decode kernel. The model attends as before
  once the block ends.

On CUDA new tokens are quantized and packed by the Triton kernel, which writes the same bytes as
the PyTorch quantizer.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvtune import fused
from kvtune.arch import describe, layer_types
from kvtune.plan import LayerPlan, ModelShape, Plan, resolve_plan
from kvtune.quant import QuantizedTensor, QuantSpec, fake_quantize, quantize


def _quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    if x.is_cuda:
        from kvtune.kernels import quantize as kernel

        if kernel.supports(x.shape, spec):
            return kernel.quantize_pack(x, spec)
    return quantize(x, spec)


class _Growable:
    """A tensor that grows along dim -2 into spare capacity, so appending is not a full copy;
    dropping from the front (sliding windows) only moves a start index until the next growth."""

    def __init__(self, first: torch.Tensor):
        self.buffer, self.begin, self.end = first, 0, first.shape[-2]

    @property
    def length(self) -> int:
        return self.end - self.begin

    def append(self, chunk: torch.Tensor) -> None:
        needed = self.end + chunk.shape[-2]
        if needed > self.buffer.shape[-2]:
            length = self.length
            grown = self.buffer.new_empty(*self.buffer.shape[:-2], max(length + chunk.shape[-2], 2 * length), self.buffer.shape[-1])
            grown[..., :length, :] = self.view
            self.buffer, self.begin, self.end = grown, 0, length
            needed = length + chunk.shape[-2]
        self.buffer[..., self.end : needed, :] = chunk
        self.end = needed

    def drop_front(self, rows: int) -> None:
        self.begin += rows

    @property
    def view(self) -> torch.Tensor:
        return self.buffer[..., self.begin : self.end, :]


class _Stream:
    """One of K or V within a layer: quantized prefix + full-precision tail.

    Positions are absolute (tokens since the start): the quantized store holds ``[q_begin, q_end)``,
    the tail ``[tail_begin, total)``. Only sliding-window layers ever drop tokens (:meth:`drop_before`),
    by the rule of :func:`kvtune.plan.held_tokens`.
    """

    def __init__(self, spec: QuantSpec, residual: int):
        self.spec, self.residual = spec, residual
        self._store: tuple[_Growable, _Growable, _Growable] | None = None  # packed, scale, zero
        self._dtype: torch.dtype | None = None
        self.tail: torch.Tensor | None = None
        self.total = self.q_begin = self.q_end = self.tail_begin = 0
        # Engine formats (fp8, nvfp4, q*_*) are held as their dequantized values; bytes are counted
        # as the engine stores them. Every token is stored in the format (no window).
        self._engine: _Growable | None = None

    @property
    def quantized(self) -> QuantizedTensor | None:
        if self._store is None or self.q_end == self.q_begin:
            return None
        packed, scale, zero = (g.view for g in self._store)
        return QuantizedTensor(packed, scale, zero, self.spec, self._dtype)

    @property
    def num_quantized(self) -> int:
        if self._engine is not None:
            return self._engine.length
        return self.q_end - self.q_begin

    @property
    def num_tail(self) -> int:
        return 0 if self.tail is None else self.tail.shape[-2]

    def store(self, new: torch.Tensor) -> None:
        """Append ``new`` and quantize whatever the residual rule says is now old enough."""
        self.total += new.shape[-2]
        if self.spec.is_engine:
            chunk = fake_quantize(new, self.spec)
            if self._engine is None:
                self._engine = _Growable(chunk)
            else:
                self._engine.append(chunk)
            return
        self.tail = new if self.tail is None else torch.cat([self.tail, new], dim=-2)
        flush = self.spec.quantized_tokens(self.total, self.residual) - self.q_end
        if flush > 0:
            chunk = _quantize(self.tail[..., :flush, :], self.spec)
            parts = (chunk.packed, chunk.scale, chunk.zero)
            if self._store is None:
                self._store, self._dtype = tuple(_Growable(p) for p in parts), chunk.dtype
            else:
                for growable, part in zip(self._store, parts):
                    growable.append(part)
            self.tail = self.tail[..., flush:, :]
            self.q_end += flush
            self.tail_begin = self.q_end

    def drop_before(self, first: int) -> None:
        """Forget tokens before absolute position ``first`` (they left the sliding window)."""
        if self._engine is not None:
            n = first - (self.total - self._engine.length)
            if n > 0:
                self._engine.drop_front(n)
            return
        if not self.spec.is_quantized:
            n = first - self.tail_begin
            if n > 0 and self.tail is not None:
                self.tail, self.tail_begin = self.tail[..., n:, :].clone(), first
            return
        step = self.spec.token_granularity
        n = (min(first, self.q_end) - self.q_begin) // step * step  # whole groups: they share scales
        if n > 0:
            packed, scale, zero = self._store
            packed.drop_front(n)
            for qparams in (scale, zero):
                qparams.drop_front(n // step if self.spec.mode == "per-channel" else n)
            self.q_begin += n

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Store ``new`` and return every cached token dequantized (the reference read)."""
        self.store(new)
        return self.read(new)

    def read(self, new: torch.Tensor) -> torch.Tensor:
        """Every cached token, dequantized, with the ``new`` ones of this call unrounded (engine
        formats: rounded, as the engine stores before it attends)."""
        if self._engine is not None:
            return self._engine.view
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

    def allocated_bytes(self) -> int:
        """Bytes of the tensors this stream holds now: spare growth capacity and dropped rows
        included, the tail in the model's dtype, engine formats as their dequantized values."""
        buffers = [g.buffer for g in (self._store or ())] + ([self._engine.buffer] if self._engine is not None else [])
        return sum(b.nbytes for b in buffers) + (0 if self.tail is None else self.tail.nbytes)

    def copy(self) -> _Stream:
        """An independent stream holding the same tokens (growable buffers are written in place)."""
        twin = _Stream(self.spec, self.residual)
        twin.__dict__.update(self.__dict__)
        twin.map(lambda t: t.clone())
        return twin

    def map(self, fn) -> None:
        if self._engine is not None:
            self._engine = _Growable(fn(self._engine.view))
        if self._store is not None:
            self._store = tuple(_Growable(fn(g.view)) for g in self._store)
        if self.tail is not None:
            self.tail = fn(self.tail)


class MixedPrecisionLayer(DynamicLayer):
    """One attention layer's K/V, quantized as its :class:`LayerPlan` says.

    With a ``window`` (sliding-window or chunked attention) it holds what transformers' own sliding
    cache holds, the last ``window - 1`` tokens, give or take whole quantization groups."""

    is_croppable = False

    def __init__(self, layer_plan: LayerPlan, layer_idx: int = 0, fused_decode: bool = False, window: int = 0,
                 left_padding: list[int] | None = None):
        super().__init__()
        self.plan, self.layer_idx, self.window = layer_plan, layer_idx, window
        # Left-padded rows are stored one stream per row, from each row's first real token, so that
        # padding never enters a quantization group, a scale or a byte count.
        self.left_padding = list(left_padding) if left_padding and any(left_padding) else None
        self.fused_decode = fused_decode and not window and self.left_padding is None  # the kernel reads whole streams
        self.read_by_kernel = False  # inside MixedPrecisionCache.fused_decoding(): the fused attention reads this layer
        self.handed_over: tuple | None = None  # (tag, key streams, value streams) for this call's fused attention
        self.is_sliding = bool(window)
        self.cumulative_length = 0
        self._k = _Stream(layer_plan.key, layer_plan.residual)
        self._v = _Stream(layer_plan.value, layer_plan.residual)
        self._rows = None if self.left_padding is None else [self._new_streams() for _ in self.left_padding]

    def _new_streams(self) -> tuple[_Stream, _Stream]:
        return _Stream(self.plan.key, self.plan.residual), _Stream(self.plan.value, self.plan.residual)

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor, past: int):
        """Each row stores its tokens after its padding; reads are padded back with zeros (masked)."""
        if key_states.shape[0] != len(self._rows):
            raise ValueError(f"the cache was made for {len(self._rows)} left-padded rows, the model passed {key_states.shape[0]}")
        keys, values = [], []
        for r, (k_stream, v_stream) in enumerate(self._rows):
            skip = min(max(self.left_padding[r] - past, 0), key_states.shape[-2])  # pad positions in this call
            k_new, v_new = key_states[r : r + 1, ..., skip:, :], value_states[r : r + 1, ..., skip:, :]
            if k_new.shape[-2]:
                k_stream.store(k_new)
                v_stream.store(v_new)
            keys.append(k_stream.read(k_new) if k_stream.total else k_new)
            values.append(v_stream.read(v_new) if v_stream.total else v_new)
            if self.window:  # after the read: this call's queries still see what leaves the window now
                first = self.cumulative_length - (self.window - 1) - self.left_padding[r]
                k_stream.drop_before(first)
                v_stream.drop_before(first)
        visible = self.cumulative_length
        if self.window:
            visible = min(past, self.window - 1) + key_states.shape[-2]
        return _left_pad(keys, visible), _left_pad(values, visible)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.cumulative_length
        if self._rows is not None:
            self.cumulative_length += key_states.shape[-2]
            return self._update_rows(key_states, value_states, past)
        self.cumulative_length += key_states.shape[-2]
        new = key_states.shape[-2]
        integer = not (self.plan.key.is_engine or self.plan.value.is_engine)
        if self.read_by_kernel and integer and self.cumulative_length > new:
            self._k.store(key_states)
            self._v.store(value_states)
            if self._k.num_tail >= new and self._v.num_tail >= new:  # this call's tokens still unrounded
                self.handed_over = (key_states, (self._k.quantized, self._k.tail), (self._v.quantized, self._v.tail))
                return key_states, value_states  # the fused attention reads the cache, not these
            return self._k.read(key_states), self._v.read(value_states)
        keys, values = self._k.append(key_states), self._v.append(value_states)
        if self.window:
            visible = min(past, self.window - 1) + new  # what get_mask_sizes told the mask
            keys, values = keys[..., -visible:, :], values[..., -visible:, :]
            first = self.cumulative_length - (self.window - 1)
            self._k.drop_before(first)
            self._v.drop_before(first)
        return keys, values

    def take_handed_over(self, tag: torch.Tensor) -> tuple | None:
        """(key streams, value streams) that ``update`` kept for the attention called with ``tag``
        (the keys it returned); None for any other call. Taken once."""
        handed, self.handed_over = self.handed_over, None
        return handed[1:] if handed is not None and handed[0] is tag else None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.window:
            return self.cumulative_length + query_length, 0
        kv_offset = max(self.cumulative_length - self.window + 1, 0)
        if self.cumulative_length >= self.window:
            return self.window - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.window or -1

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        if self._rows is not None:
            return sum(k.nbytes() + v.nbytes() for k, v in self._rows)
        return self._k.nbytes() + self._v.nbytes()

    def allocated_bytes(self) -> int:
        streams = [s for pair in self._rows for s in pair] if self._rows is not None else [self._k, self._v]
        return sum(s.allocated_bytes() for s in streams)

    def reset(self) -> None:
        self.cumulative_length = 0
        self._k = _Stream(self.plan.key, self.plan.residual)
        self._v = _Stream(self.plan.value, self.plan.residual)
        self._rows = None if self.left_padding is None else [self._new_streams() for _ in self.left_padding]
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (its groups are already rounded)")

    def _map_batch(self, fn) -> None:
        self._k.map(fn)
        self._v.map(fn)

    def _pick_rows(self, order: list[int]) -> None:
        """Per-row streams in a new batch order (beam search, expansion): each pick its own copy."""
        self._rows = [tuple(s.copy() for s in self._rows[i]) for i in order]
        self.left_padding = [self.left_padding[i] for i in order]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._rows is not None:
            return self._pick_rows(beam_idx.tolist())
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._rows is not None:
            return self._pick_rows([i for i in range(len(self._rows)) for _ in range(repeats)])
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._rows is not None:
            return self._pick_rows(torch.arange(len(self._rows))[indices].tolist())
        self._map_batch(lambda t: t[indices, ...])

    def offload(self):
        for k, v in self._rows or [(self._k, self._v)]:
            k.map(lambda t: t.to("cpu", non_blocking=True))
            v.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        for k, v in self._rows or [(self._k, self._v)]:
            k.map(lambda t: t.to(self.device, non_blocking=True))
            v.map(lambda t: t.to(self.device, non_blocking=True))


def _left_pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Rows (1, H, n_r, D) of different lengths → (B, H, length, D), each right-aligned, zeros before."""
    first = rows[0]
    out = first.new_zeros(len(rows), *first.shape[1:-2], length, first.shape[-1])
    for r, row in enumerate(rows):
        n = min(row.shape[-2], length)
        if n:
            out[r, ..., length - n :, :] = row[0, ..., row.shape[-2] - n :, :]
    return out


class MixedPrecisionCache(Cache):
    """``model.generate(..., cache=load_cache(model, plan))``.

    One :class:`MixedPrecisionLayer` per planned attention layer. With ``config`` (a hybrid model),
    the layers outside the plan (linear attention, convolution, none) get the cache layers
    transformers itself would give them, at their model index.
    """

    def __init__(self, plan: Plan, fused_decode: bool = False, shape: ModelShape | None = None, config=None,
                 left_padding: list[int] | None = None, shared_owners: frozenset[int] = frozenset()):
        self.plan = plan
        shape = shape or plan.shape or ModelShape(len(plan), 1, 1)
        planned = {shape.model_layer(i): i for i in range(len(plan))}
        # The decode kernel reads K and V of one head size, and only for the layer that calls it:
        # layers whose K and V sizes differ, or whose K/V other layers read too (``shared_owners``,
        # model indices), return their K/V dequantized on the reference path.
        kernel = {i for i, p in planned.items() if fused_decode and i not in shared_owners and shape.key_dim(p) == shape.value_dim(p)}
        if config is not None:
            from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

            types, kwargs = layer_types(config)
            others = {i: DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for i, (t, kw) in enumerate(zip(types, kwargs)) if i not in planned}
            count = len(types)
        else:
            others, count = {}, len(plan)
        layers = [
            MixedPrecisionLayer(plan.layers[planned[i]], i, i in kernel, shape.window(planned[i]), left_padding)
            if i in planned else others[i]
            for i in range(count)
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Logical bytes of the tokens the planned layers hold now, as the plan counts them (packed
        codes, fp16 scales/zeros, residual tails at fp16; engine formats at the engine's size)."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, MixedPrecisionLayer))

    def allocated_bytes(self) -> int:
        """Bytes the planned layers' tensors occupy now: the store grows by doubling (up to twice
        :meth:`nbytes`), tails are in the model's dtype, and engine formats are simulated as
        dequantized values — a serving engine's packed pages are :meth:`nbytes`."""
        return sum(layer.allocated_bytes() for layer in self.layers if isinstance(layer, MixedPrecisionLayer))

    @contextmanager
    def fused_decoding(self, model):
        """Within the block ``model``'s decode steps read this cache's packed K/V with the Triton
        kernel (the layers built with ``fused_decode``), and after it the model attends as it did::

            with cache.fused_decoding(model):
                model.generate(**inputs, cache=cache)

        Outside the block, or with no such layer, the cache serves the reference path."""
        readers = {layer.layer_idx: layer for layer in self.layers if isinstance(layer, MixedPrecisionLayer) and layer.fused_decode}
        if not readers:
            yield self
            return
        for layer in readers.values():
            layer.read_by_kernel = True
        try:
            with fused.attending(model, readers):
                yield self
        finally:
            for layer in readers.values():
                layer.read_by_kernel, layer.handed_over = False, None


def left_padding_of(attention_mask: torch.Tensor | None) -> list[int] | None:
    """Pad tokens before each row's first real one, from a left-padded ``attention_mask`` (B, T)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    pads = (~mask).int().cumprod(dim=-1).sum(-1)  # leading zeros
    if int((~mask).sum()) != int(pads.sum()):
        raise ValueError("only left padding is supported: the attention mask has zeros after a row's first real token")
    return pads.tolist()


def load_cache(model, plan: Plan | str | Path, fused_decode: bool | None = None,
               attention_mask: torch.Tensor | None = None) -> MixedPrecisionCache:
    """A ready cache for ``model`` after checking that the plan fits it.

    ``plan`` is a :class:`Plan`, a plan file, or a plan name (``"uniform:k4v2"``, ``"kivi:2"``,
    ``"fp16"``), named plans sized to the model.

    ``fused_decode`` (default: whether the model is on CUDA with plain softmax attention) builds
    layers that the Triton decode kernel can read, inside ``with cache.fused_decoding(model):``.
    The model itself is left as it is.

    ``attention_mask``: the left-padded batch's mask (as ``generate`` gets it); padded rows are then
    stored from their first real token, so padding changes no group, scale or byte count.
    """
    arch = describe(model)
    if not isinstance(plan, Plan):
        plan = resolve_plan(plan, arch.shape.num_layers, arch.shape.group_dim)
    plan.check_model(arch.shape, getattr(model, "name_or_path", "the model"))
    if fused_decode is None:
        fused_decode = fused.available(model)
    left_padding = left_padding_of(attention_mask)
    if left_padding is not None and any(left_padding):
        fused_decode = False
    return MixedPrecisionCache(plan, fused_decode, arch.shape, model.config, left_padding,
                               frozenset(owner for _, owner in arch.shared))
