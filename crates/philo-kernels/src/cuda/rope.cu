// Splits a fused QKV projection into heads and applies rotary embeddings (rotate-half layout,
// partial rotary dims pass through), in one pass:
//   qkv [b, s, (h + 2·kvh)·d]  →  heads [b, h + 2·kvh, s, d]  (q heads, then k, then v; v unrotated)
// cos/sin are [b, s, rd/2] in the compute dtype. Rounding follows transformers' bf16 arithmetic:
// q·cos and rotate_half(q)·sin are each rounded, then their sum. The backward applies the
// inverse rotation and the inverse transpose in f32.
#include "common.cuh"

template <typename T>
__device__ void qkv_rope(const T* qkv, const T* cos, const T* sin, T* out, int b, int s, int heads,
                         int rotated_heads, int d, int rd) {
    size_t total = (size_t)b * s * heads * d;
    int half = rd / 2;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        int j = e % d;
        int head = (e / d) % heads;
        size_t row = e / ((size_t)d * heads);  // b·s index
        int bi = row / s, si = row % s;
        size_t dst = (((size_t)bi * heads + head) * s + si) * d + j;
        const T* src = qkv + row * heads * d + (size_t)head * d;
        if (head >= rotated_heads || j >= rd) {
            out[dst] = src[j];
            continue;
        }
        int i = j < half ? j : j - half;
        float c = to_f32(cos[row * half + i]), sn = to_f32(sin[row * half + i]);
        float x = to_f32(src[j]);
        // rotate_half(x)[j] = -x[j + half] for j < half, x[j - half] otherwise.
        float r = j < half ? -to_f32(src[j + half]) : to_f32(src[j - half]);
        out[dst] = from_f32<T>(round_to<T>(x * c) + round_to<T>(r * sn));
    }
}

template <typename T>
__device__ void qkv_rope_backward(const T* grad, const T* cos, const T* sin, T* out, int b, int s,
                                  int heads, int rotated_heads, int d, int rd) {
    size_t total = (size_t)b * s * heads * d;
    int half = rd / 2;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        int j = e % d;
        int head = (e / d) % heads;
        size_t row = e / ((size_t)d * heads);
        int bi = row / s, si = row % s;
        const T* g = grad + (((size_t)bi * heads + head) * s + si) * d;
        if (head >= rotated_heads || j >= rd) {
            out[e] = g[j];
            continue;
        }
        int i = j < half ? j : j - half;
        float c = to_f32(cos[row * half + i]), sn = to_f32(sin[row * half + i]);
        // out1 = x1·c − x2·s, out2 = x2·c + x1·s  ⇒  dx1 = g1·c + g2·s, dx2 = g2·c − g1·s.
        float v = j < half ? to_f32(g[j]) * c + to_f32(g[j + half]) * sn
                           : to_f32(g[j]) * c - to_f32(g[j - half]) * sn;
        out[e] = from_f32<T>(v);
    }
}

#define ROPE(name, T)                                                                            \
    extern "C" __global__ void qkv_rope_##name(const T* qkv, const T* cos, const T* sin, T* out, \
                                               int b, int s, int heads, int rotated_heads, int d, \
                                               int rd) {                                          \
        qkv_rope<T>(qkv, cos, sin, out, b, s, heads, rotated_heads, d, rd);                       \
    }                                                                                             \
    extern "C" __global__ void qkv_rope_backward_##name(const T* grad, const T* cos,             \
                                                        const T* sin, T* out, int b, int s,       \
                                                        int heads, int rotated_heads, int d,      \
                                                        int rd) {                                 \
        qkv_rope_backward<T>(grad, cos, sin, out, b, s, heads, rotated_heads, d, rd);             \
    }
FOR_EACH_FLOAT(ROPE)
