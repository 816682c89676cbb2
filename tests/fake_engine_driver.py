"""A stand-in for an engine driver (same request and result files): the model's own unquantized
log-probabilities, every layer reported as the request asked, and a cache capacity of zero, so the
check around it must find the capacity wrong and the quantization effect missing."""

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
    layers = [{"name": f"model.layers.{i}.self_attn.attn", "kv_cache_dtype": "auto" if i in skipped else dtype,
               "tensor_dtype": "uint8"} for i in range(model.config.num_hidden_layers)]
    json.dump({"engine": "fake", "version": "0", "block_size": 16, "num_blocks": 0, "cache_tokens": 0,
               "layers": layers, "logprobs": logprobs.tolist()}, open(result_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
