"""Measured impact of quantizing one layer: the ground truth the Taylor estimate is checked against.

Quantizing layer ``l`` changes nothing before it, so the hidden states entering every layer are
recorded once in full precision and each measurement replays only layers ``l..L-1``. The replay
assumes the common decoder layout (``decoder.layers``, ``decoder.norm``, ``lm_head``); it checks
itself once against the whole model and, for a family laid out otherwise, runs whole forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtune.plan import LayerPlan, Plan
from kvtune.simulate import simulate_quantization


class LayerReplay:
    """Full-precision inputs of every decoder layer for a batch of windows, and the reference log-probs."""

    def __init__(self, model, windows: torch.Tensor):
        from kvtune.arch import describe

        self.model, self.windows = model, windows
        self.shape = describe(model).shape
        self.decoder = model.get_decoder()
        self.layers = list(getattr(self.decoder, "layers", []))
        self.targets = windows[:, 1:]
        self.inputs: list[tuple[tuple, dict]] = []
        fp = Plan.uniform("k16v16", self.shape.num_layers)
        hooks = [layer.register_forward_pre_hook(self._record, with_kwargs=True) for layer in self.layers]
        try:
            # Inside the simulation so the recorded masks have the additive form every replay uses.
            with torch.no_grad(), simulate_quantization(model, fp):
                logits = model(input_ids=windows, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
        self.reference_logprobs = logits[:, :-1].float().log_softmax(-1)
        self.reference_nll = self._nll(self.reference_logprobs)
        self.replays = True  # until the check below says otherwise
        self.replays = self._replay_matches(fp)

    def _replay_matches(self, fp: Plan) -> bool:
        if len(self.inputs) != len(self.layers) or not self.layers or not hasattr(self.decoder, "norm"):
            return False
        try:
            replayed = self.logprobs_with(fp, 0)
        except (TypeError, RuntimeError, AttributeError):
            return False
        # A stack whose layers pass on more than one hidden state (Gemma 3n's AltUp) replays to another shape.
        return replayed.shape == self.reference_logprobs.shape and torch.allclose(replayed, self.reference_logprobs, atol=1e-4, rtol=0)

    def _record(self, module, args, kwargs):
        self.inputs.append((args, dict(kwargs)))

    def _nll(self, logprobs: torch.Tensor) -> torch.Tensor:
        return -logprobs.gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def logprobs_with(self, plan: Plan, start_layer: int) -> torch.Tensor:
        """Log-probs when ``plan`` applies, replaying from model layer ``start_layer`` (all earlier layers exact)."""
        if not self.replays:
            with simulate_quantization(self.model, plan):
                return self.model(input_ids=self.windows, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        args, kwargs = self.inputs[start_layer]
        hidden = args[0] if args else kwargs["hidden_states"]
        with simulate_quantization(self.model, plan):
            for index in range(start_layer, len(self.layers)):
                layer_args, layer_kwargs = self.inputs[index]
                if layer_args:
                    out = self.layers[index](hidden, *layer_args[1:], **layer_kwargs)
                else:
                    out = self.layers[index](**{**layer_kwargs, "hidden_states": hidden})
                hidden = out[0] if isinstance(out, tuple) else out
        logits = self.model.get_output_embeddings()(self.decoder.norm(hidden))
        return logits[:, :-1].float().log_softmax(-1)

    def single_layer_impact(self, layer: int, layer_plan: LayerPlan) -> tuple[float, float]:
        """(mean change in NLL per token, mean KL(fp ‖ quantized) per token) with only ``layer`` quantized."""
        layers = [LayerPlan.from_pair("k16v16")] * self.shape.num_layers
        layers[layer] = layer_plan
        logprobs = self.logprobs_with(Plan(tuple(layers)), self.shape.model_layer(layer))
        dnll = (self._nll(logprobs) - self.reference_nll).mean().item()
        kl = F.kl_div(logprobs, self.reference_logprobs, log_target=True, reduction="none").sum(-1).mean().item()
        return dnll, max(kl, 0.0)  # KL >= 0; a tiny negative value is round-off
