// What flash attention's kernels share (the mma.sync kernels of flash_attention.cu and the
// Hopper wgmma kernels of flash_attention_sm90.cu): the visibility rule of a (query, key) pair,
// and the softmax's exponential.
#pragma once
#include "common.cuh"

// 2^x on the special-function unit, subnormal results flushed to zero (what the softmax needs;
// exp2f's subnormal handling costs several instructions per call).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ bool visible(int key, int qpos, int T_, int window, const int* seg_b,
                                        int qseg) {
    if (key >= T_ || key > qpos || qpos - key >= window) return false;
    if (seg_b) {
        int ks = seg_b[key];
        return ks != 0 && ks == qseg;
    }
    return true;
}

// Whether every (query, key) pair of a tile is visible, so the tile needs no mask: queries at
// positions qpos_lo .. qpos_hi (all real rows), keys k0 .. k0 + n − 1 (all below T_), and —
// with segments — every key and query in one segment (`same_segment`, decided by the caller).
__device__ __forceinline__ bool all_visible(int k0, int n, int qpos_lo, int qpos_hi, int T_,
                                            int window, bool same_segment) {
    return same_segment && k0 + n <= T_ && k0 + n - 1 <= qpos_lo && qpos_hi - k0 < window;
}

constexpr float LOG2E = 1.4426950408889634f;
