"""Run token windows through a llama.cpp build and report what it did: ``python llama_cpp_driver.py REQUEST RESULT``.

Runs inside the engine's own environment and imports nothing from kvtune. The build is
ik_llama.cpp's prebuilt Python wheel (``ik-llama-cpp-python``), which takes llama.cpp's
``--cache-type-k/-v`` and ik_llama.cpp's first/last-N layer types through the same context
parameters. The library's own log (cache types per layer, cache sizes) is written to ``LOG`` for
kvtune to read back: the proof the types were taken.
"""

import json
import os
import sys

# ggml_type numbers of the cache types kvtune exports.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}


def _log_to(path: str):
    """Point this process's stdout and stderr (where the C library logs) at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main(request_path: str, result_path: str) -> None:
    import numpy as np
    import ik_llama_cpp
    from ik_llama_cpp import _ctypes_api as C
    from ik_llama_cpp._internals import make_batch_range

    with open(request_path) as f:
        request = json.load(f)
    _log_to(request["log"])
    C.llama_backend_init()
    model = C.llama_model_load_from_file(request["gguf"].encode(), C.llama_model_default_params())
    if not model:
        raise SystemExit(f"could not load {request['gguf']}")
    params = C.llama_context_default_params()
    params.n_ctx = params.n_batch = request["n_ctx"]
    params.n_ubatch = request["n_ubatch"]  # this wheel's logits are wrong for n_ubatch >= 32
    params.n_threads = params.n_threads_batch = request["threads"]
    params.flash_attn = request.get("flash_attn", True)  # a quantized V cache needs flash attention
    params.logits_all = True
    params.type_k, params.type_v = GGML_TYPES[request["type_k"]], GGML_TYPES[request["type_v"]]
    for which in ("k_first", "k_last", "v_first", "v_last"):
        if request.get(which):
            name, count = request[which]
            setattr(params, f"type_{which}", GGML_TYPES[name])
            setattr(params, f"n_{which}", int(count))
    ctx = C.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit("llama_init_from_model failed (see the log)")
    n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
    step = request["n_ubatch"]
    logprobs = []
    for window in request["windows"]:
        C.llama_kv_cache_clear(ctx)
        rows = []
        for start in range(0, len(window), step):
            chunk = window[start : start + step]
            batch = make_batch_range(chunk, pos_start=start, logits_last=False)
            for j in range(len(chunk)):
                batch.logits[j] = 1
            status = C.llama_decode(ctx, batch)
            C.llama_batch_free(batch)
            if status != 0:
                raise SystemExit(f"llama_decode returned {status}")
            for j in range(len(chunk)):
                rows.append(np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, j), shape=(n_vocab,)).astype(np.float64))
        logits = np.stack(rows[:-1])
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        targets = np.array(window[1:])
        logprobs.append((logits[np.arange(len(targets)), targets] - log_z).tolist())
    result = {"engine": "ik_llama.cpp", "version": f"ik-llama-cpp-python {ik_llama_cpp.__version__}", "logprobs": logprobs}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
