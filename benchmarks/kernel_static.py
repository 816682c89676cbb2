"""What the decode kernel compiles to on a Hopper GPU, without one: SASS of its fast-path loop.

    python -m benchmarks.kernel_static > benchmarks/results/kernel_static_sm90_triton-<version>.jsonl

Triton compiles for a target it is given (here sm_90, the H100/H200) with the ptxas and nvdisasm it
ships, so this runs on any machine. For each launch variant of benchmarks/decode_sweep.py and each
bit pair (Llama-3-8B layer shape, as benchmarks/decode_attention.py) it reports the main loop's
instructions per thread, the warp-instructions the whole program issues per cached token, and how
many of the loop's instructions are register spills (local-memory loads and stores). These are
static counts, not times: they say where time may go, a GPU run says whether it does. The code
Triton emits changes between versions, so the file names the Triton that compiled it.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.decode_attention import GROUP_SIZE, HEAD_DIM, KV_HEADS, Q_HEADS
from benchmarks.decode_sweep import SETTINGS
from kvtune.kernels.decode_attention import _decode_split_kernel, split_kernel_constexprs

PAIRS = ((16, 16), (8, 8), (4, 4), (2, 2))
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
POINTERS = {"q_ptr": "*fp16", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "mask_ptr": "*i8",
            "kp_ptr": "*u8", "vp_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "kt_ptr": "*fp16",
            "vs_ptr": "*fp16", "vz_ptr": "*fp16", "vt_ptr": "*fp16", "qk_scale": "fp32"}


def compile_split_kernel(k_bits: int, v_bits: int, setting: dict, arch: int = 90):
    meta = lambda bits, per_channel: dict(BITS=bits, PER_CHANNEL=per_channel and bits < 16, G=GROUP_SIZE if bits < 16 else 1)  # noqa: E731
    constexprs = split_kernel_constexprs(meta(k_bits, True), meta(v_bits, False), KV_HEADS, Q_HEADS // KV_HEADS, 1, HEAD_DIM,
                                         torch.float16, False, setting["block_n"], setting["gather_codes"], setting["gather_scales"])
    names = _decode_split_kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "i32") for n in names}
    source = ASTSource(_decode_split_kernel, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    options = {"num_warps": setting["num_warps"], "num_stages": setting["num_stages"]}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def sass(cubin: bytes) -> list[tuple[str | None, str]]:
    """(label or None, instruction) in program order."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    out, label = [], None
    for line in text.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            label = m.group(1)
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            out.append((label, m.group(1)))
            label = None
    return out


def first_loop(instructions: list[tuple[str | None, str]]) -> list[str]:
    """The body of the first backward branch: the whole-block fast path (the kernel's first loop)."""
    where = {label: i for i, (label, _) in enumerate(instructions) if label}
    for i, (_, ins) in enumerate(instructions):
        m = re.search(r"\bBRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and where.get(m.group(1), i + 1) <= i:
            return [text for _, text in instructions[where[m.group(1)] : i + 1]]
    raise RuntimeError("no loop found in the kernel's SASS")


def opcode(instruction: str) -> str:
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main() -> None:
    for (k_bits, v_bits), values in itertools.product(PAIRS, itertools.product(*SETTINGS.values())):
        setting = dict(zip(SETTINGS, values))
        if k_bits == 16 and (setting["gather_codes"] or not setting["gather_scales"]):
            continue  # the variants only differ in how packed codes and scales are read
        loop = first_loop(sass(compile_split_kernel(k_bits, v_bits, setting).asm["cubin"]))
        ops = collections.Counter(opcode(i) for i in loop)
        print(json.dumps(dict(
            arch="sm_90", triton=triton.__version__, pair=f"k{k_bits}v{v_bits}", **setting,
            loop_instructions=len(loop),
            warp_instructions_per_token=round(len(loop) * setting["num_warps"] / setting["block_n"], 2),
            spill_instructions=ops["LDL"] + ops["STL"], global_loads=ops["LDG"], mma=ops["HMMA"],
            int_to_float=ops["I2F"] + ops["I2FP"],
        )), flush=True)


if __name__ == "__main__":
    main()
