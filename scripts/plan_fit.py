#!/usr/bin/env python3
"""Fits philo-plan's constants (crates/philo-plan/src/train.rs and speed.rs) to the output of
scripts/plan-calibration.sh: the peak-memory factors by least squares on the bytes above the
weights and adapter state, the speed model's efficiencies by least squares on relative time.
Phi-3-mini's shape; pure Python (no numpy on the build machine)."""
import re
import sys

H, I, V, L, HEADS = 3072, 8192, 32064, 32, 32
QKV = 9216
PROJ = L * (H * QKV + H * H + H * 2 * I + I * H)
DOWN = L * I * H
EMB = 2 * V * H + (2 * L + 1) * H
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)
P, BW = 989e12, 4.8e12  # H200: dense bf16 FLOP/s, bytes/s


def lora(r):
    return L * r * (H + QKV + H + H + H + 2 * I + I + H)


def chunk(b, s):
    return min(max(8192 // s, 1), b) * s


def fixed(r, q):
    return (PROJ * NF4 if q else PROJ * 2) + EMB * 2 + (PROJ // L * 2 if q else 0) + 16 * lora(r)


def width(r):  # saved (dropout on) + backward widths of train.rs
    return (H + QKV + H + H + 2 * I + I + 4 * r + H) + (3 * I + H)


def pairs(s, window=2047):
    return sum(min(i, window) for i in range(1, s + 1))


def work(b, s, r, q):
    t = b * s
    gemm = t * (6 * PROJ - 2 * DOWN + 4 * V * H)
    attn = b * L * 3.5 * 4 * pairs(s) * H
    act = t * L * 3 * (6 * H + QKV + 3 * I) * 2
    deq = 2 * PROJ * (NF4 + 2) if q else 0
    chunks = -(-b // min(max(8192 // s, 1), b))
    return [gemm / P, attn / P, (act + deq + lora(r) * 28) / BW, L * chunks * 3]


def solve(rows, ys):
    n = len(rows[0])
    a = [[sum(x[i] * x[j] for x in rows) for j in range(n)] + [sum(x[i] * y for x, y in zip(rows, ys))] for i in range(n)]
    for i in range(n):
        p = a[i][i]
        a[i] = [v / p for v in a[i]]
        for k in range(n):
            if k != i:
                f = a[k][i]
                a[k] = [vk - f * vi for vk, vi in zip(a[k], a[i])]
    return [a[i][n] for i in range(n)]


runs = []
for line in open(sys.argv[1]):
    if " | " not in line:
        continue
    label, args, result, _ = [x.strip() for x in line.split("|")]
    f = result.split()
    b, s, tps, peak = int(f[4]), int(f[5]), float(f[7]), float(f[8])
    r = int(re.search(r"--rank (\d+)", args).group(1))
    runs.append((label, b, s, r, "--quant none" not in args, "no_gradient_offload" not in args, tps, peak))

mem = [x for x in runs if x[5]]
k = solve([[b * s, chunk(b, s) * width(r) * 2, 1.0] for _, b, s, r, _, _, _, _ in mem],
          [peak * 2**30 - fixed(r, q) for _, b, s, r, q, _, _, peak in mem])
print(f"BATCH_HIDDEN_COPIES {k[0] / (H * 2):.2f}  LAYER_ACTIVATION_FACTOR {k[1]:.3f}  WORKSPACE {k[2] / 2**20:.1f} MiB")
t = solve([[v * tps / (b * s) for v in work(b, s, r, q)] for _, b, s, r, q, _, tps, _ in runs], [1.0] * len(runs))
print(f"GEMM_EFFICIENCY {1 / t[0]:.3f}  ATTENTION_EFFICIENCY {1 / t[1]:.3f}  MEMORY_EFFICIENCY {1 / t[2]:.3f}  CHUNK_PASS_SECONDS {t[3] * 1e6:.0f}e-6")
