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

// The backward's masking rule for query i (of S; position past + i) and key `key` in segment
// `kseg` (qseg: the query's), the same as `visible` with the key's segment already read.
__device__ __forceinline__ bool backward_visible(int i, int key, int kseg, int qseg, bool segments,
                                                 int S, int T_, int past, int window) {
    return i < S && key < T_ && key <= past + i && past + i - key < window &&
           (!segments || (kseg != 0 && kseg == qseg));
}

// The backward's dK and dV of one thread's keys r0 and r0 + 8 (rows at or past T_ skipped), per
// query head into f32 [B, H, T, D] from row `base`: n8 block dn at dka[dn] (mma.sync's
// accumulator layout, columns dn·8 + 2t and + 1).
template <int D>
__device__ __forceinline__ void backward_store_dkv(const float (*dka)[4], const float (*dva)[4], float* dk,
                                                   float* dv, size_t base, int r0, int T_, int t) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        int c = dn * 8 + 2 * t;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            int r = r0 + 8 * hi;
            if (r >= T_) continue;
            *reinterpret_cast<float2*>(dk + (base + r) * D + c) = make_float2(dka[dn][2 * hi], dka[dn][2 * hi + 1]);
            *reinterpret_cast<float2*>(dv + (base + r) * D + c) = make_float2(dva[dn][2 * hi], dva[dn][2 * hi + 1]);
        }
    }
}

// Bytes of shared memory that backward_write_dkv stages dK/dV through: [128][D + 4] f32.
template <int D>
constexpr int backward_dkv_staging() { return 128 * (D + 4) * 4; }

// The backward's dK and dV of a block's 128 keys written straight into the fused QKV
// projection's gradient `dkv` [B, T, (H + 2·KVH)·D] (one query head per KV head, queries at every
// key position), dK through RoPE's inverse rotation (rotate-half, the first rd dims; cos/sin
// [B, T, rd/2]; none when cos is null). The accumulators pass through shared memory (reused:
// the main loop is over) so that each thread can pair dimension j with j ± rd/2 and store 16
// bytes at a time. `acc`: shared memory for [128][D + 4] f32 (backward_dkv_staging bytes),
// free by the time all threads arrive here. Warp w holds keys w·16 .. w·16 + 15 of the block,
// in mma.sync's accumulator layout (n8 block dn in dka[dn]).
template <typename T, int D>
__device__ __forceinline__ void backward_write_dkv(const float (*dka)[4], const float (*dva)[4],
                                                   float* acc, T* dkv, const T* cos, const T* sin,
                                                   int rd, int b, int h, int H, int KVH, int T_,
                                                   int k0, int warp, int g, int t) {
    constexpr int BK = 128, LDF = D + 4;
    size_t row_stride = (size_t)(H + 2 * KVH) * D;
    int half = rd / 2;
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
        const float (*a)[4] = pass == 0 ? dka : dva;
        __syncthreads();  // every warp is done with what the shared memory held before
        int kl0 = warp * 16 + g;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            int c = dn * 8 + 2 * t;
            acc[kl0 * LDF + c] = a[dn][0];
            acc[kl0 * LDF + c + 1] = a[dn][1];
            acc[(kl0 + 8) * LDF + c] = a[dn][2];
            acc[(kl0 + 8) * LDF + c + 1] = a[dn][3];
        }
        __syncthreads();
        int col0 = (pass == 0 ? H + h : H + KVH + h) * D;
        bool rotate = pass == 0 && cos;
        for (int i = threadIdx.x; i < BK * (D / 8); i += blockDim.x) {
            int r = i / (D / 8), c8 = (i - r * (D / 8)) * 8, key = k0 + r;
            if (key >= T_) continue;
            const float* src = acc + r * LDF;
            float val[8];
            size_t pos = (size_t)b * T_ + key;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                int j = c8 + e;
                if (rotate && j < rd) {
                    // out1 = x1·c − x2·s, out2 = x2·c + x1·s  ⇒  dx1 = g1·c + g2·s, dx2 = g2·c − g1·s.
                    int f = j < half ? j : j - half;
                    float cs = to_f32(cos[pos * half + f]), sn = to_f32(sin[pos * half + f]);
                    val[e] = j < half ? src[j] * cs + src[j + half] * sn : src[j] * cs - src[j - half] * sn;
                } else {
                    val[e] = src[j];
                }
            }
            store8(dkv + pos * row_stride + col0 + c8, val);
        }
    }
}
