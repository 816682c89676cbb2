"""The probe: one attention implementation that, in a single forward + backward over calibration
windows, yields every layer's attention-output error for every candidate pair and the gradient
of the loss with respect to the K/V *as read from the quantized store*.

The gradient is taken at zero perturbation through a second view of K and V (``key + dk``) that
only the positions a quantized cache would serve read (see :func:`kvtune.simulate.seen_quantized`);
so ``dk.grad`` is exactly the first-order sensitivity of the loss to the rounding of those
positions, and ``<dk.grad, K_hat - K>`` is the first-order change in loss for a pair.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from kvtune.arch import attention_extras, using_attention
from kvtune.formats import CALIBRATED
from kvtune.plan import FULL_BITS, Label, LayerPlan, candidate_name, candidate_suffix, parse_candidate, spec_from_label
from kvtune.quant import QuantSpec
from kvtune.simulate import causal_softmax, fake_quantize_prefix, seen_quantized

PROBE_NAME = "kvtune_probe"
FP = QuantSpec(16)


class Side(NamedTuple):
    """How a candidate stores one of K or V: a width or engine format, and for integer widths a
    group size and window of its own (None: the candidates' shared setting)."""

    label: Label
    group: int | None = None
    residual: int | None = None

    @property
    def name(self) -> str:
        """``4``, ``fp8``, ``2g64``, ``3g64r0``: the key of this side in the profile's sums."""
        return str(self.label) + candidate_suffix(self.group, self.residual)

    @property
    def is_full(self) -> bool:
        return self.label == FULL_BITS


def _order(side: Side) -> tuple:
    label = side.label
    return (isinstance(label, str), str(label) if isinstance(label, str) else -label, side.group or 0, side.residual or 0)


@dataclass
class Candidates:
    """The candidates under study and the quantization setting the integer ones share.

    ``pairs`` lists (K label, V label) or (K label, V label, group, residual) tuples, or candidate
    names (``K4V2``, ``K2V2g64r0``); a label is an integer width or an engine format's name
    (:data:`kvtune.plan.Label`). A candidate's group or window equal to the shared one is the
    same candidate as without it, and is written without it."""

    pairs: list
    key_mode: str
    value_mode: str
    group_size: int
    residual: int
    # fp8 / nvfp4 sides: {"key": [amax per layer], "value": [...]}, their calibrated scales
    # (kvtune.profiling.calibrate); None: unit scale.
    amax: dict | None = None

    def __post_init__(self):
        entries = []
        for p in self.pairs:
            k, v, group, residual = parse_candidate(p) if isinstance(p, str) else (tuple(p) + (None, None))[:4]
            group = None if group == self.group_size else group
            residual = None if residual == self.residual else residual
            entries.append((k, v, group, residual))
        self.pairs = entries

    @property
    def names(self) -> list[str]:
        return [candidate_name(*p) for p in self.pairs]

    def sides(self, k: Label, v: Label, group: int | None = None, residual: int | None = None) -> tuple[Side, Side]:
        """Each side keeps the group and window only where they matter (integer widths)."""
        own = lambda label: Side(label, group, residual) if isinstance(label, int) and label != FULL_BITS else Side(label)  # noqa: E731
        return own(k), own(v)

    def spec(self, side: Side, which: str, layer: int | None = None) -> QuantSpec:
        """How ``side`` stores K or V; fp8 / nvfp4 with ``layer``'s calibrated amax where there is one."""
        if side.label in CALIBRATED and self.amax is not None and layer is not None:
            return QuantSpec.engine(side.label, amax=self.amax[which][layer])
        mode = self.key_mode if which == "key" else self.value_mode
        return spec_from_label(side.label, mode, self.group_size if side.group is None else side.group)

    def window(self, side: Side) -> int:
        return self.residual if side.residual is None else side.residual

    def layer_plan(self, k: Label, v: Label, group: int | None = None, residual: int | None = None,
                   layer: int | None = None) -> LayerPlan:
        key, value = self.sides(k, v, group, residual)
        return LayerPlan(self.spec(key, "key", layer), self.spec(value, "value", layer), self.residual if residual is None else residual)

    def key_spec(self, label: Label) -> QuantSpec:
        return self.spec(Side(label), "key")

    def value_spec(self, label: Label) -> QuantSpec:
        return self.spec(Side(label), "value")

    @property
    def key_sides(self) -> list[Side]:
        return sorted({self.sides(*p)[0] for p in self.pairs} - {Side(FULL_BITS)}, key=_order)

    @property
    def value_sides(self) -> list[Side]:
        return sorted({self.sides(*p)[1] for p in self.pairs} - {Side(FULL_BITS)}, key=_order)

    def pattern(self, side: Side, which: str) -> tuple[int, int, bool]:
        """Which positions each query reads from the quantized store depends only on the token
        granularity, the window and whether a token reads itself rounded, not on the width: sides of
        one pattern share a gradient view."""
        spec = self.spec(side, which)
        return spec.token_granularity, spec.window(self.window(side)), spec.reads_itself

    def seen(self, side: Side, which: str, length: int, device=None) -> torch.Tensor:
        return seen_quantized(self.spec(side, which), self.window(side), length, device)

    def shifted(self, x: torch.Tensor, side: Side, which: str, layer: int | None = None) -> torch.Tensor:
        """``x`` as the store serves it: the quantized prefix fake-quantized, the window exact."""
        return fake_quantize_prefix(x, self.spec(side, which, layer), self.window(side))


@dataclass
class LayerCapture:
    key: torch.Tensor
    value: torch.Tensor
    dk: dict  # read pattern -> zero tensor whose gradient is dLoss/dK as read through that pattern
    dv: dict


@dataclass
class ErrorSums:
    """Sums of squared attention-output deviations, so errors pool over windows exactly."""

    reference: float = 0.0
    joint: dict = field(default_factory=dict)  # candidate name -> float
    key_only: dict = field(default_factory=dict)  # key side name -> float
    value_only: dict = field(default_factory=dict)  # value side name -> float


class Probe:
    def __init__(self, candidates: Candidates, num_layers: int, plan_index: dict[int, int] | None = None,
                 recompute: bool = True):
        self.c = candidates
        # Recompute each layer's (T, T) scores and probabilities in the backward pass instead of
        # keeping them from the forward: the probe's memory then grows with T² for one layer at a
        # time, not for all of them (what lets long windows of large models fit), for one more
        # attention forward per layer.
        self.recompute = recompute
        self.captures: dict[int, LayerCapture] = {}
        self.errors = [ErrorSums() for _ in range(num_layers)]
        # model layer -> plan position; layers that share a planned layer's K/V map to its position
        self.plan_index = plan_index or {i: i for i in range(num_layers)}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        softcap, sinks = attention_extras(module, kwargs, attention_mask, dropout)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer, length = self.plan_index[module.layer_idx], query.shape[-2]
        # The read pattern depends on the token granularity and window, not on the width. At
        # dk = dv = 0 the attention is exact and linear in each view's perturbation, so one pass
        # gives every pattern's gradient.
        key_views = {self.c.pattern(s, "key"): s for s in self.c.key_sides}
        value_views = {self.c.pattern(s, "value"): s for s in self.c.value_sides}
        owner = self.captures.get(layer)
        if owner is not None:
            # Visited twice in one forward: a layer reading another layer's K/V (Gemma 3n/4). It
            # perturbs the same store, so the gradient sums both readers (.to() keeps it flowing
            # across devices), and its output errors count towards the owner's.
            if owner.key.shape != key.shape or owner.value.shape != value.shape:
                raise RuntimeError(f"layer {module.layer_idx} shares the K/V of plan layer {layer} but reads another shape")
            dk = {p: t.to(key.device) for p, t in owner.dk.items()}
            dv = {p: t.to(value.device) for p, t in owner.dv.items()}
        else:
            dk = {p: torch.zeros_like(key, requires_grad=True) for p in key_views}
            dv = {p: torch.zeros_like(value, requires_grad=True) for p in value_views}
            self.captures[layer] = LayerCapture(key.detach(), value.detach(), dk, dv)
        key_reads = [(dk[p], self.c.seen(s, "key", length, query.device)) for p, s in key_views.items()]
        value_reads = [(dv[p], self.c.seen(s, "value", length, query.device)) for p, s in value_views.items()]
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(perturbed_attention, query, key, value, key_reads, value_reads, scaling, attention_mask, softcap,
                             sinks, use_reentrant=False)
        else:
            out = perturbed_attention(query, key, value, key_reads, value_reads, scaling, attention_mask, softcap, sinks)
        with torch.no_grad():
            sinks_now = None if sinks is None else sinks.detach()
            self._accumulate_errors(layer, query.detach(), key.detach(), value.detach(), out.detach(), scaling, attention_mask,
                                    softcap, sinks_now)
        return out.transpose(1, 2).contiguous(), None

    def _accumulate_errors(self, layer, q, k, v, out, scaling, mask, softcap=None, sinks=None) -> None:
        """All one-sided and joint errors of this layer from 1 + |key sides| softmaxes.

        Same arithmetic as :func:`~kvtune.simulate.simulated_attention` for each candidate, with
        the shared parts computed once: scores per key side, then P·V + (P⊙M)·(V̂ − V) for every
        value side read through one mask M in a single product (the value sides' V̂ − V side by
        side; query heads folded onto their KV head), which is where the time goes.
        """
        length, groups = q.shape[-2], q.shape[1] // k.shape[1]
        exact_scores = torch.matmul(q, k.repeat_interleave(groups, 1).transpose(-1, -2))
        v_rep = v.repeat_interleave(groups, 1)
        value_seen, v_shift = {}, {}
        for side in self.c.value_sides:
            v_shift[side] = self.c.shifted(v, side, "value", layer) - v  # (B, Hkv, T, D)
            pattern = self.c.pattern(side, "value")
            if pattern not in value_seen:
                value_seen[pattern] = self.c.seen(side, "value", length, q.device).to(q.dtype)
        sums = self.errors[layer]
        sums.reference += out.pow(2).sum(dtype=torch.float64).item()

        def deviations(base_error, masked_probs, sides) -> list[float]:
            """‖(base − out) + (P⊙M)·(V̂_i − V)‖² for each value side i, from one matmul (squares summed in float64)."""
            b, hkv, t, d = v.shape
            shifts = torch.cat([v_shift[s] for s in sides], dim=-1)  # (B, Hkv, T, n·D)
            folded = masked_probs.reshape(b, hkv, groups * length, length)  # query heads of one KV head stacked
            change = torch.matmul(folded, shifts).reshape(b, hkv * groups, length, len(sides), d)
            return (base_error.unsqueeze(-2) + change).pow(2).sum(dim=(0, 1, 2, 4), dtype=torch.float64).tolist()

        entries = [(self.c.sides(*p), candidate_name(*p)) for p in self.c.pairs]
        for key_side in [Side(FULL_BITS)] + self.c.key_sides:
            scores = exact_scores
            if not key_side.is_full:
                k_hat = self.c.shifted(k, key_side, "key", layer).repeat_interleave(groups, 1)
                scores = torch.where(self.c.seen(key_side, "key", length, q.device), torch.matmul(q, k_hat.transpose(-1, -2)),
                                     exact_scores)
            probs = causal_softmax(scores, scaling, mask, q.dtype, softcap, sinks)
            base_error = torch.matmul(probs, v_rep) - out
            if key_side.is_full:
                wanted = [(value_side, None) for value_side in self.c.value_sides]
            else:
                sums.key_only[key_side.name] = sums.key_only.get(key_side.name, 0.0) + base_error.pow(2).sum(dtype=torch.float64).item()
                wanted = [(vs, name) for (ks, vs), name in entries if ks == key_side and not vs.is_full]
            by_pattern: dict[tuple, list] = {}
            for value_side, name in wanted:
                by_pattern.setdefault(self.c.pattern(value_side, "value"), []).append((value_side, name))
            for pattern, members in by_pattern.items():
                values = deviations(base_error, probs * value_seen[pattern], [side for side, _ in members])
                for (value_side, name), value in zip(members, values):
                    if name is None:
                        sums.value_only[value_side.name] = sums.value_only.get(value_side.name, 0.0) + value
                    else:
                        sums.joint[name] = sums.joint.get(name, 0.0) + value

    def first_order_terms(self, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        """Per window (dim 0): sum of g⊙Δ, of |g⊙Δ| and of (g⊙Δ)² for each key side and value side (by name)."""
        cap = self.captures[layer]
        terms: dict[str, dict[str, torch.Tensor]] = {"k": {}, "v": {}}
        for name, which, x, grad, sides in (("k", "key", cap.key, cap.dk, self.c.key_sides),
                                             ("v", "value", cap.value, cap.dv, self.c.value_sides)):
            for side in sides:
                grad_of_pattern = grad[self.c.pattern(side, which)].grad
                gd = (grad_of_pattern * (self.c.shifted(x, side, which, layer) - x)).double().flatten(1)
                terms[name][side.name] = torch.stack([gd.sum(1), gd.abs().sum(1), gd.pow(2).sum(1)], dim=1)
        return terms


def perturbed_attention(query, key, value, key_views, value_views, scaling, attention_mask=None, softcap=None, sinks=None):
    """Causal attention (GQA) plus, for each key view ``(dk, seen)`` and value view ``(dv, seen)``,
    the perturbation read where that view's (T, T) mask says a query reads the quantized store:
    scores = q·k + Σ seen⊙(q·dk), out = P·v + Σ (P⊙seen)·dv. With zero perturbations this is exact
    attention whose gradient w.r.t. each dk/dv is the one of that view alone."""
    groups = query.shape[1] // key.shape[1]
    rep = lambda x: x.repeat_interleave(groups, dim=1)  # noqa: E731
    scores = torch.matmul(query, rep(key).transpose(-1, -2))
    for dk, seen in key_views:
        scores = scores + seen * torch.matmul(query, rep(dk).transpose(-1, -2))
    probs = causal_softmax(scores, scaling, attention_mask, query.dtype, softcap, sinks)
    out = torch.matmul(probs, rep(value))
    for dv, seen in value_views:
        out = out + torch.matmul(probs * seen.to(probs.dtype), rep(dv))
    return out


@contextmanager
def probing(model, probe: Probe):
    """Route the model's attention through ``probe`` within the block; the model attends as before after it."""
    with using_attention(model, PROBE_NAME, probe.attention, mask="eager"):
        yield probe
