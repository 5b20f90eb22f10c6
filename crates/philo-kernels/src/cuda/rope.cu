// Splits a fused QKV projection into heads and applies rotary embeddings (rotate-half layout,
// partial rotary dims pass through), in one pass:
//   qkv [b, s, (h + 2·kvh)·d]  →  heads [b, h + 2·kvh, s, d]  (q heads, then k, then v; v unrotated)
// cos/sin are [b, s, rd/2] in the compute dtype. Rounding follows transformers' bf16 arithmetic:
// q·cos and rotate_half(q)·sin are each rounded, then their sum. The backward applies the
// inverse rotation and the inverse transpose in f32.
//
// One block per token row (b·s of them, in grid.x); its threads walk the row's heads·d
// elements. Index arithmetic stays in 32 bits, once per element pair, and each thread handles
// an element and its rotation partner (j and j + rd/2) together: eight of each as 16-byte
// loads and stores when rd/2 and d − rd are multiples of 8 (Phi-3: 48 and 0), one at a time
// otherwise.
#include "common.cuh"

// The 8-wide walk of both passes: for each head of the row, `pair(x1, x2, c, s, head < rotated)`
// maps eight elements j .. j + 8 and their partners j + half .. (in f32) to what is stored at j
// and j + half; pass-through dims are copied. `src`/`dst` give a head's start in the input and
// the output.
template <typename T, typename Src, typename Dst, typename Pair>
__device__ __forceinline__ void rope_row_by_8(int heads, int rotated_heads, int d, int rd,
                                              const T* c, const T* sn, Src src, Dst dst, Pair pair) {
    int half = rd / 2, per_head = half / 8 + (d - rd) / 8;
    for (int e = threadIdx.x; e < heads * per_head; e += blockDim.x) {
        int head = e / per_head, v = e - head * per_head;
        const T* x = src(head);
        T* y = dst(head);
        float a[8], b[8];
        if (v >= half / 8) {  // beyond the rotary dims
            int j = rd + (v - half / 8) * 8;
            load8(x + j, a);
            store8(y + j, a);
            continue;
        }
        int i = v * 8;
        load8(x + i, a);
        load8(x + i + half, b);
        if (head < rotated_heads) {
            float cs[8], sn8[8];
            load8(c + i, cs);
            load8(sn + i, sn8);
            pair(a, b, cs, sn8);
        }
        store8(y + i, a);
        store8(y + i + half, b);
    }
}

template <typename T>
__device__ void qkv_rope(const T* qkv, const T* cos, const T* sin, T* out, int s, int heads,
                         int rotated_heads, int d, int rd) {
    int row = blockIdx.x, bi = row / s, si = row - bi * s;
    int half = rd / 2;
    if (half % 8 == 0 && (d - rd) % 8 == 0) {
        rope_row_by_8<T>(
            heads, rotated_heads, d, rd, cos + (size_t)row * half, sin + (size_t)row * half,
            [&](int head) { return qkv + ((size_t)row * heads + head) * d; },
            [&](int head) { return out + (((size_t)bi * heads + head) * s + si) * d; },
            [](float* x1, float* x2, const float* c, const float* sn) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    float a = x1[k], b = x2[k];
                    // rotate_half(x) = [-x2, x1].
                    x1[k] = round_to<T>(a * c[k]) + round_to<T>(-b * sn[k]);
                    x2[k] = round_to<T>(b * c[k]) + round_to<T>(a * sn[k]);
                }
            });
        return;
    }
    // Per head: `half` rotation pairs plus d − rd pass-through elements.
    int per_head = half + (d - rd);
    const T* src = qkv + (size_t)row * heads * d;
    const T* c = cos + (size_t)row * half;
    const T* sn = sin + (size_t)row * half;
    for (int e = threadIdx.x; e < heads * per_head; e += blockDim.x) {
        int head = e / per_head, i = e - head * per_head;
        const T* x = src + head * d;
        T* dst = out + (((size_t)bi * heads + head) * s + si) * d;
        if (i >= half) {  // beyond the rotary dims
            int j = rd + (i - half);
            dst[j] = x[j];
            continue;
        }
        float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
        if (head >= rotated_heads) {
            dst[i] = x[i];
            dst[i + half] = x[i + half];
            continue;
        }
        float ci = to_f32(c[i]), si_ = to_f32(sn[i]);
        // rotate_half(x) = [-x2, x1].
        dst[i] = from_f32<T>(round_to<T>(x1 * ci) + round_to<T>(-x2 * si_));
        dst[i + half] = from_f32<T>(round_to<T>(x2 * ci) + round_to<T>(x1 * si_));
    }
}

template <typename T>
__device__ void qkv_rope_backward(const T* grad, const T* cos, const T* sin, T* out, int s,
                                  int heads, int rotated_heads, int d, int rd) {
    int row = blockIdx.x, bi = row / s, si = row - bi * s;
    int half = rd / 2;
    if (half % 8 == 0 && (d - rd) % 8 == 0) {
        rope_row_by_8<T>(
            heads, rotated_heads, d, rd, cos + (size_t)row * half, sin + (size_t)row * half,
            [&](int head) { return grad + (((size_t)bi * heads + head) * s + si) * d; },
            [&](int head) { return out + ((size_t)row * heads + head) * d; },
            [](float* g1, float* g2, const float* c, const float* sn) {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    float a = g1[k], b = g2[k];
                    // out1 = x1·c − x2·s, out2 = x2·c + x1·s  ⇒  dx1 = g1·c + g2·s, dx2 = g2·c − g1·s.
                    g1[k] = a * c[k] + b * sn[k];
                    g2[k] = b * c[k] - a * sn[k];
                }
            });
        return;
    }
    int per_head = half + (d - rd);
    T* dst_row = out + (size_t)row * heads * d;
    const T* c = cos + (size_t)row * half;
    const T* sn = sin + (size_t)row * half;
    for (int e = threadIdx.x; e < heads * per_head; e += blockDim.x) {
        int head = e / per_head, i = e - head * per_head;
        const T* g = grad + (((size_t)bi * heads + head) * s + si) * d;
        T* dst = dst_row + head * d;
        if (i >= half) {
            int j = rd + (i - half);
            dst[j] = g[j];
            continue;
        }
        if (head >= rotated_heads) {
            dst[i] = g[i];
            dst[i + half] = g[i + half];
            continue;
        }
        float g1 = to_f32(g[i]), g2 = to_f32(g[i + half]);
        float ci = to_f32(c[i]), si_ = to_f32(sn[i]);
        // out1 = x1·c − x2·s, out2 = x2·c + x1·s  ⇒  dx1 = g1·c + g2·s, dx2 = g2·c − g1·s.
        dst[i] = from_f32<T>(g1 * ci + g2 * si_);
        dst[i + half] = from_f32<T>(g2 * ci - g1 * si_);
    }
}

#define ROPE(name, T)                                                                            \
    extern "C" __global__ void qkv_rope_##name(const T* qkv, const T* cos, const T* sin, T* out, \
                                               int s, int heads, int rotated_heads, int d,        \
                                               int rd) {                                          \
        qkv_rope<T>(qkv, cos, sin, out, s, heads, rotated_heads, d, rd);                          \
    }                                                                                             \
    extern "C" __global__ void qkv_rope_backward_##name(const T* grad, const T* cos,             \
                                                        const T* sin, T* out, int s, int heads,   \
                                                        int rotated_heads, int d, int rd) {       \
        qkv_rope_backward<T>(grad, cos, sin, out, s, heads, rotated_heads, d, rd);                \
    }
FOR_EACH_FLOAT(ROPE)
