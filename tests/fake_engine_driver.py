"""A stand-in for an engine driver (same request and result files) that echoes the request: every
layer reported at the dtype asked for, but computed as the model is, in float32 with no quantized
cache, and that cache tensor (its dtype) reported as what it built; a cache capacity of zero. The
check around it must find the tensors and the capacity wrong and the quantization effect missing."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main(request_path, result_path):
    request = json.load(open(request_path))
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    ids = torch.tensor(request["windows"])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    kwargs = request["llm_kwargs"]
    skipped = set(map(int, kwargs.get("kv_cache_dtype_skip_layers", [])))
    dtype = kwargs.get("kv_cache_dtype", "auto")
    built = str(model.dtype).removeprefix("torch.")  # the K/V it attends to: the model's own, unquantized
    layers = [{"name": f"model.layers.{i}.self_attn.attn", "kv_cache_dtype": "auto" if i in skipped else dtype,
               "tensor_dtype": built, "k_scale": 1.0, "v_scale": 1.0} for i in range(model.config.num_hidden_layers)]
    json.dump({"engine": "fake", "version": "0", "block_size": 16, "num_blocks": 0, "cache_tokens": 0,
               "layers": layers, "logprobs": logprobs.tolist()}, open(result_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
