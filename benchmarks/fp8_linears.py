"""How much FP8 could buy DiT-XL/2: one linear layer's forward + backward at the model's shapes, bf16 vs FP8.

DiT-XL/2 at 256 px and B=128 multiplies M = 128 x 256 = 32,768 tokens by width-1152 weights: per block
four 1152x1152 projections (q, k, v, out), the MLP's 1152->4608 and 4608->1152, 28 blocks. This script
times `F.linear` fwd+bwd in bf16 against an FP8 linear (tensor-wise dynamic scales, e4m3 activations and
weights, e5m2 gradients, `torch._scaled_mm` for the three GEMMs, the casts and transposes in eager or
under `torch.compile`), and sums the per-step time of the blocks' linears. Needs an sm_89+ GPU.

    python3 benchmarks/fp8_linears.py results/stack_h100_raw/fp8_linears_h100.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

E4, E5, BF = torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16
M, BLOCKS = 32768, 28
# (name, in, out, per block)
SHAPES = [
    ("qkv/out 1152x1152", 1152, 1152, 4),
    ("fc1 1152->4608", 1152, 4608, 1),
    ("fc2 4608->1152", 4608, 1152, 1),
    ("qkv fused 1152->3456", 1152, 3456, 0),
]


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so its absolute maximum is the format's largest value, and the inverse scale."""
    top = torch.finfo(dtype).max
    scale = top / x.abs().amax().float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


class FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        x8, sx = to_fp8(x, E4)
        w8, sw = to_fp8(w, E4)
        ctx.save_for_backward(x8, sx, w8, sw)
        return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=BF)

    @staticmethod
    def backward(ctx, g):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = to_fp8(g, E5)
        # _scaled_mm takes a row-major first and a column-major second operand
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=BF)
        dw = torch._scaled_mm(
            g8.t().contiguous(), x8.t().contiguous().t(), scale_a=sg, scale_b=sx, out_dtype=BF
        )
        return dx, dw


def bf16_linear(x, w):
    return F.linear(x, w)


def fp8_linear(x, w):
    return FP8Linear.apply(x, w)


def time_ms(fn, x, w, g, iters: int = 30) -> float:
    for _ in range(5):
        x.grad = w.grad = None
        fn(x, w).backward(g)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        x.grad = w.grad = None
        fn(x, w).backward(g)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(out: str) -> None:
    rows = []
    configs = [("bf16", bf16_linear), ("fp8_eager", fp8_linear), ("fp8_compiled", torch.compile(fp8_linear))]
    for name, k, n, per_block in SHAPES:
        x = torch.randn(M, k, device="cuda", dtype=BF, requires_grad=True)
        w = (torch.randn(n, k, device="cuda", dtype=BF) / k**0.5).requires_grad_()
        g = torch.randn(M, n, device="cuda", dtype=BF)
        flop = 3 * 2 * M * k * n  # forward, grad input, grad weight
        row = {"shape": name, "M": M, "K": k, "N": n, "per_block": per_block}
        for label, fn in configs:
            ms = time_ms(fn, x, w, g)
            row[f"{label}_ms"], row[f"{label}_tflops"] = round(ms, 4), round(flop / ms / 1e9, 1)
        with torch.no_grad():
            ref = F.linear(x, w).float()
            row["fp8_rel_err"] = float((FP8Linear.apply(x, w).float() - ref).norm() / ref.norm())
        rows.append(row)
        print(json.dumps(row), flush=True)
    per_step = {
        label: round(BLOCKS * sum(r[f"{label}_ms"] * r["per_block"] for r in rows), 2) for label, _ in configs
    }
    print(json.dumps(per_step))
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rows": rows,
        "dit_xl2_block_linears_ms_per_step": per_step,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
