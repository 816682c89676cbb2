"""Run token windows through vLLM and report what it did: ``python vllm_driver.py REQUEST RESULT``.

Runs inside vLLM's own environment, so it imports nothing from kvtune (the request and result are
JSON files; kvtune.engines writes one and reads the other). The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that each attention layer's cache dtype and cache tensor can
be read back: that is the proof the per-layer setting was taken, beside the cache capacity.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _attention_layers(model):
    rows = []
    for name, module in model.named_modules():
        if type(module).__name__ != "Attention":
            continue
        cache = getattr(module, "kv_cache", None)
        tensor = cache[0] if isinstance(cache, (list, tuple)) and cache else cache
        # What vLLM built, never a default: a missing tensor or scale reads as None and fails the check.
        k_scale, v_scale = getattr(module, "_k_scale_float", None), getattr(module, "_v_scale_float", None)
        rows.append({"name": name, "kv_cache_dtype": str(module.kv_cache_dtype),
                     "tensor_dtype": str(tensor.dtype).removeprefix("torch.") if hasattr(tensor, "dtype") else None,
                     "k_scale": None if k_scale is None else float(k_scale),
                     "v_scale": None if v_scale is None else float(v_scale)})
    return rows


def main(request_path: str, result_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    with open(request_path) as f:
        request = json.load(f)
    windows = request["windows"]
    llm = LLM(model=request["model"], dtype=request["dtype"], max_model_len=request["max_model_len"], enforce_eager=True,
              seed=0, kv_cache_memory_bytes=request["kv_cache_memory_bytes"], enable_prefix_caching=False,
              **request["llm_kwargs"])
    cache = llm.llm_engine.vllm_config.cache_config
    layers = llm.apply_model(_attention_layers)[0]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=True)
    logprobs = []
    for window, output in zip(windows, outputs):
        # prompt_logprobs[t] holds log p(token t | tokens < t); position 0 has none.
        logprobs.append([output.prompt_logprobs[t][window[t]].logprob for t in range(1, len(window))])
    result = {"engine": "vllm", "version": vllm.__version__, "device": current_platform.device_type, "cache_dtype": cache.cache_dtype,
              "block_size": cache.block_size, "num_blocks": cache.num_gpu_blocks,
              "cache_tokens": cache.num_gpu_blocks * cache.block_size, "layers": layers, "logprobs": logprobs}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
