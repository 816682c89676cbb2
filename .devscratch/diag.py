import torch
from kvtune.quant import QuantSpec, quantize, choose_qparams, quantize_codes, unpack
from kvtune.kernels.quantize import quantize_pack
torch.manual_seed(4)
bad = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
  for mode, T in (("per-token", 37), ("per-channel", 64)):
    for bits in (2, 4, 8):
        torch.manual_seed(bits)
        spec = QuantSpec(bits, mode, 32)
        x = (torch.randn(2, 3, T, 64, device="cuda") * 3 - 1).to(dtype)
        x[0, 0, :32] = 1.5
        a, r = quantize_pack(x, spec), quantize(x, spec)
        rc = quantize(x.cpu(), spec)
        same = [torch.equal(getattr(a, n), getattr(r, n)) for n in ("packed", "scale", "zero")]
        same_cpu = [torch.equal(getattr(rc, n), getattr(r, n).cpu()) for n in ("packed", "scale", "zero")]
        print(dtype, mode, bits, "kernel==torch_cuda", same, "torch_cpu==torch_cuda", same_cpu, flush=True)
        if not all(same) and bad < 3:
            bad += 1
            ca, cr = unpack(a.packed, bits), unpack(r.packed, bits)
            idx = (ca != cr).nonzero()[:4]
            s, z = r.scale, r.zero
            for i in idx.tolist():
                b_, h, t, d = i
                if mode == "per-token":
                    sc, ze = s[b_, h, t, d // 32], z[b_, h, t, d // 32]
                else:
                    sc, ze = s[b_, h, t // 32, d], z[b_, h, t // 32, d]
                xv = x[b_, h, t, d].float()
                y32 = (xv - ze.float()) / sc.float()
                y64 = (xv.double() - ze.double()) / sc.double()
                print("  x", xv.item(), "zero", ze.item(), "scale", sc.item(), "y32", repr(y32.item()), "y64", repr(y64.item()),
                      "kernel", ca[b_, h, t, d].item(), "torch", cr[b_, h, t, d].item(), "cpu", unpack(rc.packed, bits)[b_, h, t, d].item())
