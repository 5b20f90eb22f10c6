// y[m, n] = x[m, k] · W[n, k]ᵀ for a few rows m ≤ 4 (decoding): one warp per output feature n,
// 16-byte loads of W streamed once, f32 accumulation, one rounding. Needs k % 8 == 0.
#include "common.cuh"

// Loads of W in flight per lane before any arithmetic: one 16-byte load at a time leaves HBM
// idle between a warp's requests, so each lane issues UNROLL of them back to back.
constexpr int UNROLL = 4;

template <typename T>
__device__ void gemv(const T* x, const T* w, T* y, int m, int n, int k) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= n) return;
    const T* row = w + (size_t)warp * k;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int base = lane * 8; base < k; base += 32 * 8 * UNROLL) {
        uint4 wv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int c = base + u * 32 * 8;
            if (c < k) wv[u] = load_streaming(row + c);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int c = base + u * 32 * 8;
            if (c >= k) break;
            const T* wp = reinterpret_cast<const T*>(&wv[u]);
            float wf[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) wf[j] = to_f32(wp[j]);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                if (r >= m) break;
                uint4 xv = *reinterpret_cast<const uint4*>(x + (size_t)r * k + c);
                const T* xp = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[r] += wf[j] * to_f32(xp[j]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0 && r < m) y[(size_t)r * n + warp] = from_f32<T>(v);
    }
}

#define GEMV(name, T)                                                                           \
    extern "C" __global__ void gemv_##name(const T* x, const T* w, T* y, int m, int n, int k) { \
        gemv<T>(x, w, y, m, n, k);                                                              \
    }
GEMV(bf16, __nv_bfloat16)
GEMV(f16, __half)
