#!/usr/bin/env python3
"""What PyTorch's own kernels reach at Moondream 2's large shapes, beside
albedo's (docs/CUDA.md, "Ceilings"): scaled_dot_product_attention through
each backend at the vision encoder's attention (crops x 16 heads x 729 x 72,
bidirectional) and the image prefix's (32 heads x 730 x 64), and torch.matmul
at the vision and prefix linears, first with cuBLASLt's heuristic, then with
TunableOp (which times cuBLASLt's candidates and keeps the fastest).

    python3 bench/cuda/torch_ceilings.py        (on a GPU machine with PyTorch)

Medians of 50 runs after 5 warm-up runs, CUDA events, bf16 random data.
"""
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


ATTN = [("vision, 9 crops", 9, 16, 729, 72), ("vision, 18 crops", 18, 16, 729, 72), ("prefix 730", 1, 32, 730, 64)]
GEMM = [("vision qkv", 6561, 3456, 1152), ("vision proj", 6561, 1152, 1152), ("vision fc1", 6561, 4304, 1152),
        ("vision fc2", 6561, 1152, 4304), ("prefix qkv", 730, 6144, 2048), ("prefix proj", 730, 2048, 2048),
        ("prefix fc1", 730, 8192, 2048), ("prefix fc2", 730, 2048, 8192)]


def gemm_table():
    out = {}
    for name, m, n, k in GEMM:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        out[name] = median_ms(lambda: a @ w.t())
    return out


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; medians, microseconds (TFLOP/s)\n")
    print("scaled_dot_product_attention (4·B·H·N²·D flops; x27 or x24 layers)")
    for name, b, h, n, d in ATTN:
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        flops = 4.0 * b * h * n * n * d
        layers = 24 if name.startswith("prefix") else 27
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(be):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                print(f"  {name:18s} {be.name:20s} {ms * 1e3:8.1f} ({flops / ms / 1e9:4.0f})   "
                      f"x{layers} = {ms * layers:.2f} ms")
            except RuntimeError as ex:
                print(f"  {name:18s} {be.name:20s} not available: {str(ex).splitlines()[0][:80]}")
    print("\ntorch.matmul (bf16): cuBLASLt's heuristic, then TunableOp")
    plain = gemm_table()
    tuned = None
    if hasattr(torch.cuda, "tunable"):
        torch.cuda.tunable.set_filename(os.path.join(tempfile.mkdtemp(), "tunableop.csv"))
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        tuned = gemm_table()
    for name, m, n, k in GEMM:
        flops = 2.0 * m * n * k
        line = f"  {name:12s} {plain[name] * 1e3:8.1f} ({flops / plain[name] / 1e9:4.0f})"
        if tuned:
            gain = 100 * (plain[name] - tuned[name]) / plain[name]
            line += f"   tuned {tuned[name] * 1e3:8.1f} ({flops / tuned[name] / 1e9:4.0f})  {gain:+.1f}%"
        print(line)


if __name__ == "__main__":
    main()
