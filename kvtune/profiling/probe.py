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

import torch

from kvtune.plan import Label, LayerPlan, spec_from_label
from kvtune.quant import QuantSpec
from kvtune.simulate import causal_softmax, fake_quantize_prefix, seen_quantized

PROBE_NAME = "kvtune_probe"
FP = QuantSpec(16)


def _order(label) -> tuple:
    return (isinstance(label, str), str(label) if isinstance(label, str) else -label)


@dataclass
class Candidates:
    """The pairs under study and the quantization setting the integer ones share.

    A pair is two labels (:data:`kvtune.plan.Label`): an integer width, or an engine format name.
    The attributes named ``*_bits`` hold labels (historical name: they were widths only)."""

    pairs: list[tuple[Label, Label]]
    key_mode: str
    value_mode: str
    group_size: int
    residual: int

    def key_spec(self, label: Label) -> QuantSpec:
        return spec_from_label(label, self.key_mode, self.group_size)

    def value_spec(self, label: Label) -> QuantSpec:
        return spec_from_label(label, self.value_mode, self.group_size)

    def layer_plan(self, k: Label, v: Label) -> LayerPlan:
        return LayerPlan(self.key_spec(k), self.value_spec(v), self.residual)

    @property
    def key_bits(self) -> list[Label]:
        return sorted({k for k, _ in self.pairs if k != 16}, key=_order)

    @property
    def value_bits(self) -> list[Label]:
        return sorted({v for _, v in self.pairs if v != 16}, key=_order)

    @property
    def families(self) -> list[str]:
        """Which read patterns occur: ``int`` (residual window) and/or ``engine`` (every token)."""
        labels = self.key_bits + self.value_bits
        return [f for f, present in (("int", any(isinstance(x, int) for x in labels)),
                                     ("engine", any(isinstance(x, str) for x in labels))) if present]


def family(label: Label) -> str:
    return "engine" if isinstance(label, str) else "int"


@dataclass
class LayerCapture:
    key: torch.Tensor
    value: torch.Tensor
    dk: dict  # family -> zero tensor whose gradient is dLoss/dK as read quantized by that family
    dv: dict


@dataclass
class ErrorSums:
    """Sums of squared attention-output deviations, so errors pool over windows exactly."""

    reference: float = 0.0
    joint: dict = field(default_factory=dict)  # (k_bits, v_bits) -> float
    key_only: dict = field(default_factory=dict)  # k_bits -> float
    value_only: dict = field(default_factory=dict)  # v_bits -> float


class Probe:
    def __init__(self, candidates: Candidates, num_layers: int, plan_index: dict[int, int] | None = None):
        self.c = candidates
        self.captures: dict[int, LayerCapture] = {}
        self.errors = [ErrorSums() for _ in range(num_layers)]
        self.plan_index = plan_index or {i: i for i in range(num_layers)}  # model layer -> plan position

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from kvtune.arch import attention_extras

        softcap, sinks = attention_extras(module, kwargs, attention_mask, dropout)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer, length = self.plan_index[module.layer_idx], query.shape[-2]
        families = self.c.families or ["int"]
        dk = {f: torch.zeros_like(key, requires_grad=True) for f in families}
        dv = {f: torch.zeros_like(value, requires_grad=True) for f in families}
        self.captures[layer] = LayerCapture(key.detach(), value.detach(), dk, dv)
        # The read pattern depends on the family (mode, group and residual for integers; every
        # earlier token for engine formats), not on the width. At dk = dv = 0 the attention is
        # exact and linear in each view's perturbation, so one pass gives every family's gradient.
        views = [(dk[f], dv[f], self._seen(f, "key", length, query.device), self._seen(f, "value", length, query.device))
                 for f in families]
        out = perturbed_attention(query, key, value, views, scaling, attention_mask, softcap, sinks)
        with torch.no_grad():
            sinks_now = None if sinks is None else sinks.detach()
            self._accumulate_errors(layer, query.detach(), key.detach(), value.detach(), out.detach(), scaling, attention_mask,
                                    softcap, sinks_now)
        return out.transpose(1, 2).contiguous(), None

    def _seen(self, fam: str, which: str, length: int, device) -> torch.Tensor:
        label = "fp8" if fam == "engine" else 8  # any member of the family reads the same way
        spec = self.c.key_spec(label) if which == "key" else self.c.value_spec(label)
        return seen_quantized(spec, self.c.residual, length, device)

    def _accumulate_errors(self, layer, q, k, v, out, scaling, mask, softcap=None, sinks=None) -> None:
        """All one-sided and joint errors of this layer from 1 + |K widths| softmaxes.

        Same arithmetic as :func:`~kvtune.simulate.simulated_attention` for each pair, with the
        shared parts computed once: scores per K width, and P·V + (P⊙M)·(V̂ − V) per V width.
        """
        length, groups = q.shape[-2], q.shape[1] // k.shape[1]
        residual = self.c.residual
        key_seen = {f: self._seen(f, "key", length, q.device) for f in ("int", "engine")}
        value_seen = {f: self._seen(f, "value", length, q.device).to(q.dtype) for f in ("int", "engine")}
        exact_scores = torch.matmul(q, k.repeat_interleave(groups, 1).transpose(-1, -2))
        v_rep = v.repeat_interleave(groups, 1)
        v_shift = {
            b: (fake_quantize_prefix(v, self.c.value_spec(b), residual) - v).repeat_interleave(groups, 1)
            for b in self.c.value_bits
        }
        sums = self.errors[layer]
        sums.reference += out.double().pow(2).sum().item()

        def deviation(approx) -> float:
            return (approx.double() - out.double()).pow(2).sum().item()

        for k_bits in [16] + self.c.key_bits:
            scores = exact_scores
            if k_bits != 16:
                k_hat = fake_quantize_prefix(k, self.c.key_spec(k_bits), residual).repeat_interleave(groups, 1)
                scores = torch.where(key_seen[family(k_bits)], torch.matmul(q, k_hat.transpose(-1, -2)), exact_scores)
            probs = causal_softmax(scores, scaling, mask, q.dtype, softcap, sinks)
            base = torch.matmul(probs, v_rep)
            if k_bits != 16:
                sums.key_only[k_bits] = sums.key_only.get(k_bits, 0.0) + deviation(base)
            wanted = self.c.value_bits if k_bits == 16 else [vb for kb, vb in self.c.pairs if kb == k_bits and vb != 16]
            masked = {f: probs * value_seen[f] for f in {family(vb) for vb in wanted}}
            for v_bits in wanted:
                approx = base + torch.matmul(masked[family(v_bits)], v_shift[v_bits])
                if k_bits == 16:
                    sums.value_only[v_bits] = sums.value_only.get(v_bits, 0.0) + deviation(approx)
                else:
                    sums.joint[(k_bits, v_bits)] = sums.joint.get((k_bits, v_bits), 0.0) + deviation(approx)

    def first_order_terms(self, layer: int) -> dict[str, dict[int, torch.Tensor]]:
        """Per window (dim 0): sum of g⊙Δ, of |g⊙Δ| and of (g⊙Δ)² for each K width and V width."""
        cap = self.captures[layer]
        terms: dict[str, dict[int, torch.Tensor]] = {"k": {}, "v": {}}
        for name, x, grad, bits_list, spec_of in (
            ("k", cap.key, cap.dk, self.c.key_bits, self.c.key_spec),
            ("v", cap.value, cap.dv, self.c.value_bits, self.c.value_spec),
        ):
            for b in bits_list:
                grad_of_family = grad[family(b)].grad
                gd = (grad_of_family * (fake_quantize_prefix(x, spec_of(b), self.c.residual) - x)).double().flatten(1)
                terms[name][b] = torch.stack([gd.sum(1), gd.abs().sum(1), gd.pow(2).sum(1)], dim=1)
        return terms


def perturbed_attention(query, key, value, views, scaling, attention_mask=None, softcap=None, sinks=None):
    """Causal attention (GQA) plus, for each view ``(dk, dv, key_seen, value_seen)``, the
    perturbation read where that view's (T, T) masks say a query reads the quantized store:
    scores = q·k + Σ seen⊙(q·dk), out = P·v + Σ (P⊙seen)·dv. With zero perturbations this is exact
    attention whose gradient w.r.t. each dk/dv is the one of that view alone."""
    groups = query.shape[1] // key.shape[1]
    rep = lambda x: x.repeat_interleave(groups, dim=1)  # noqa: E731
    scores = torch.matmul(query, rep(key).transpose(-1, -2))
    for dk, _, key_seen, _ in views:
        scores = scores + key_seen * torch.matmul(query, rep(dk).transpose(-1, -2))
    probs = causal_softmax(scores, scaling, attention_mask, query.dtype, softcap, sinks)
    out = torch.matmul(probs, rep(value))
    for _, dv, _, value_seen in views:
        out = out + torch.matmul(probs * value_seen.to(probs.dtype), rep(dv))
    return out


@contextmanager
def probing(model, probe: Probe):
    """Route the model's attention through ``probe`` (registered once with transformers)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PROBE_NAME, probe.attention)
    AttentionMaskInterface.register(PROBE_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    try:
        yield probe
    finally:
        model.set_attn_implementation(previous)
