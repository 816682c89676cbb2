"""What the decode kernel compiles to on a Hopper GPU, without one: SASS of its fast-path loop.

    python -m benchmarks.kernel_static > benchmarks/results/kernel_static_sm90_triton-<version>.jsonl

Triton compiles for a target it is given (here sm_90, the H100/H200) with the ptxas and nvdisasm it
ships, so this runs on any machine. For each launch variant of benchmarks/decode_sweep.py and each
bit pair (Llama-3-8B layer shape, as benchmarks/decode_attention.py) it reports the main loop's
instructions per thread, the warp-instructions the whole program issues per cached token, how
many of those go to the slow pipes (conversions, exp2), how many of the loop's instructions
are register spills (local-memory loads and stores), and the registers and shared memory a
program takes, with the warps an SM can then hold at once. The kernel gets the arguments
``decode_attention`` would pass at 32K tokens, batch 1, and Triton's own binder decides what to
specialise (integers divisible by 16, aligned pointers): without that, loads are not vectorised
and the counts describe a kernel no launch runs. These are static counts, not times: they say
where time may go, a GPU run says whether it does. The code Triton emits changes between versions,
so the file names the Triton that compiled it.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from benchmarks.decode_attention import HEAD_DIM, KV_HEADS, Q_HEADS, stream
from benchmarks.decode_sweep import SETTINGS
from kvtune.kernels.decode_attention import _decode_split_kernel, plan_split_launch

PAIRS = ((16, 16), (8, 8), (4, 4), (2, 2))
CONTEXT, BATCH, H100_SMS = 32768, 1, 132
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


@functools.lru_cache(maxsize=None)
def _streams(k_bits: int, v_bits: int):
    """Query and (prefix, tail) streams shaped as benchmarks/decode_attention.py builds them, on the CPU:
    their strides and counts decide which arguments Triton may assume divisible by 16."""
    gen = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(BATCH, KV_HEADS, CONTEXT, HEAD_DIM, generator=gen).half()  # noqa: E731
    q = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM, generator=gen).half()
    return q, stream(x(), k_bits, "per-channel"), stream(x(), v_bits, "per-token")


def compile_split_kernel(k_bits: int, v_bits: int, setting: dict, arch: int = 90):
    """The split kernel as ``decode_attention`` would launch it on an H100 at 32K tokens, batch 1,
    compiled for sm_``arch``: Triton's own argument binder decides the specialisation."""
    q, key, value = _streams(k_bits, v_bits)
    splits = max(1, min(triton.cdiv(CONTEXT, setting["block_n"]), triton.cdiv(4 * H100_SMS, BATCH * KV_HEADS)))
    launch = plan_split_launch(q, key, value, num_splits=splits, **setting)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = _decode_split_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constexprs, **launch.options}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _cubin_tool(tool: str, flag: str, cubin: bytes) -> str:
    """The text output of one of the CUDA binary tools Triton ships, run on ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(NVDISASM.parent / tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def sass(cubin: bytes) -> list[tuple[str | None, str]]:
    """(label or None, instruction) in program order."""
    text = _cubin_tool("nvdisasm", "-c", cubin)
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


def registers(cubin: bytes) -> int:
    """Registers per thread, as ptxas allocated them."""
    return int(re.search(r"REG:(\d+)", _cubin_tool("cuobjdump", "-res-usage", cubin)).group(1))


def resident_warps(regs: int, shared: int, num_warps: int) -> int:
    """Warps an H100 SM holds at once for this kernel: registers (64K per SM, allocated per warp
    in units of 256), shared memory (228 KiB per SM, 1 KiB reserved per program), at most 32
    programs and 64 warps. Few warps leave memory latency unhidden in a loop that waits on loads."""
    per_warp = -(-regs * 32 // 256) * 256
    programs = min(65536 // per_warp // num_warps, 228 * 1024 // (shared + 1024), 32, 64 // num_warps)
    return programs * num_warps


def opcode(instruction: str) -> str:
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main() -> None:
    for (k_bits, v_bits), values in itertools.product(PAIRS, itertools.product(*SETTINGS.values())):
        setting = dict(zip(SETTINGS, values))
        if k_bits == 16 and (setting["gather_codes"] or not setting["gather_scales"]):
            continue  # the variants only differ in how packed codes and scales are read
        kernel = compile_split_kernel(k_bits, v_bits, setting)
        loop = first_loop(sass(kernel.asm["cubin"]))
        regs, shared = registers(kernel.asm["cubin"]), kernel.metadata.shared
        ops = collections.Counter(opcode(i) for i in loop)
        print(json.dumps(dict(
            arch="sm_90", triton=triton.__version__, pair=f"k{k_bits}v{v_bits}", **setting,
            loop_instructions=len(loop),
            warp_instructions_per_token=round(len(loop) * setting["num_warps"] / setting["block_n"], 2),
            spill_instructions=ops["LDL"] + ops["STL"], global_loads=ops["LDG"], mma=ops["HMMA"],
            int_to_float=ops["I2F"] + ops["I2FP"],
            # Conversions and MUFU (exp2) run on pipes of 16 lanes per clock per SM, an eighth of FMA's 128.
            slow_pipe_per_token=round(sum(ops[o] for o in ("I2F", "I2FP", "F2F", "F2I", "MUFU")) * setting["num_warps"] / setting["block_n"], 2),
            registers=regs, shared_bytes=shared, resident_warps_per_sm=resident_warps(regs, shared, setting["num_warps"]),
        )), flush=True)


if __name__ == "__main__":
    main()
