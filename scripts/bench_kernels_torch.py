"""torch's side of philo's kernel benchmarks, on the GPU machine: SDPA (flash) forward and
backward at Phi-3's attention shape, and cuBLAS bf16 GEMMs at the shapes of a training step's
row chunk. Prints one JSON line per measurement; compare with `philo bench attention`.

  python3 scripts/bench_kernels_torch.py [--batch 4] [--seq 2048]
"""
import argparse, json
import torch
import torch.nn.functional as F


def median_ms(fn, repeats=20):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    a = ap.parse_args()
    b, h, s, d = a.batch, 32, a.seq, 96
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flops = 2.0 * b * h * s * s * d  # causal forward: half of 4·b·h·s²·d
    fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.randn_like(out)
    bwd = median_ms(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
    print(json.dumps(dict(what="torch sdpa", batch=b, heads=h, seq=s, head_dim=d, forward_ms=round(fwd, 3),
                          forward_tflops=round(flops / fwd / 1e9, 1), backward_ms=round(bwd, 3),
                          backward_tflops=round(2.5 * flops / bwd / 1e9, 1))))
    rows = b * s
    for name, n, k_ in [("qkv", 9216, 3072), ("o", 3072, 3072), ("gate_up", 16384, 3072), ("down", 3072, 8192),
                        ("qkv dx", 3072, 9216), ("gate_up dx", 3072, 16384)]:
        x = torch.randn(rows, k_, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k_, device="cuda", dtype=torch.bfloat16)
        ms = median_ms(lambda: x @ w.t())
        print(json.dumps(dict(what="torch gemm " + name, m=rows, n=n, k=k_, ms=round(ms, 3),
                              tflops=round(2.0 * rows * n * k_ / ms / 1e9, 1))))


if __name__ == "__main__":
    main()
