// RMSNorm as transformers' Phi3RMSNorm computes it: the mean square in f32, x·rsqrt(ms + eps)
// rounded to the input dtype, then multiplied by the weight in that dtype.
// One block per row. The normed output's rows are `out_ld` apart (≥ n): a caller can leave
// columns after each row for something else (the training layer puts LoRA's down projection
// there, so that one GEMM over [x | down] adds the adapter to the base projection).
// `add_rms_norm` first forms residual = x + y (rounded to the dtype, as a separate `x + y` would
// be) and writes both the sum and its norm: one pass instead of three.
//
// Rows whose length is a multiple of 8 take the `_vec` kernels: 16-byte loads and stores, each
// thread keeping its (at most VPT) pieces of the row in registers between the two passes.
#include "common.cuh"

constexpr int VPT = 4;  // 8-element pieces per thread in the `_vec` kernels

// ---------------------------------------------------------------------------------------------
// Scalar kernels (any row length).

template <typename T>
__device__ void rms_norm_row(const T* x, const T* w, T* out, int n, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float v = to_f32(x[i]); ss += v * v; }
    float inv = rsqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[i] = from_f32<T>(to_f32(w[i]) * round_to<T>(to_f32(x[i]) * inv));
}

template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* out, int n, int out_ld, float eps) {
    size_t row = blockIdx.x;
    rms_norm_row(x + row * n, w, out + row * out_ld, n, eps);
}

template <typename T>
__device__ void add_rms_norm(const T* x, const T* y, const T* w, T* sum, T* out, int n, int out_ld,
                             float eps) {
    size_t row = blockIdx.x;
    x += row * n; y += row * n; sum += row * n; out += row * out_ld;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
    // Each thread reads back only what it wrote itself, so no barrier is needed here.
    rms_norm_row<T>(sum, w, out, n, eps);
}

// Backward for x (the weight is frozen): with r = rsqrt(mean(x²) + eps) and g = w·dy,
// dx = r·g − x·r³·mean(x·g), plus `add` (a gradient arriving by the residual path) when not
// null. All in f32, rounded once. dy's rows are dy_ld apart (≥ n: dy may be the first columns
// of a wider GEMM output).
template <typename T>
__device__ void rms_norm_backward(const T* x, const T* w, const T* dy, const T* add, T* dx, int n,
                                  int dy_ld, float eps) {
    size_t row = blockIdx.x;
    x += row * n; dy += row * dy_ld; dx += row * n;
    if (add) add += row * n;
    float ss = 0.f, xg = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = to_f32(x[i]);
        ss += v * v;
        xg += v * to_f32(w[i]) * to_f32(dy[i]);
    }
    ss = block_sum(ss);
    xg = block_sum(xg);
    float r = rsqrtf(ss / n + eps);
    float k = r * r * r * xg / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        dx[i] = from_f32<T>((add ? to_f32(add[i]) : 0.f) + r * to_f32(w[i]) * to_f32(dy[i]) -
                            to_f32(x[i]) * k);
}

// ---------------------------------------------------------------------------------------------
// Vectorised kernels (n % 8 == 0, n ≤ 8·VPT·blockDim).

template <typename T, bool ADD>
__device__ void rms_norm_vec(const T* x, const T* y, const T* w, T* sum, T* out, int n, int out_ld,
                             float eps) {
    size_t row = blockIdx.x;
    x += row * n; out += row * out_ld;
    if (ADD) { y += row * n; sum += row * n; }
    float v[VPT][8];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < n) {
            load8(x + c, v[k]);
            if (ADD) {
                float yv[8];
                load8(y + c, yv);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[k][j] = round_to<T>(v[k][j] + yv[j]);
                store8(sum + c, v[k]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += v[k][j] * v[k][j];
        }
    }
    float inv = rsqrtf(block_sum(ss) / n + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < n) {
            float wv[8], o[8];
            load8(w + c, wv);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = wv[j] * round_to<T>(v[k][j] * inv);
            store8(out + c, o);
        }
    }
}

template <typename T>
__device__ void rms_norm_backward_vec(const T* x, const T* w, const T* dy, const T* add, T* dx,
                                      int n, int dy_ld, float eps) {
    size_t row = blockIdx.x;
    x += row * n; dy += row * dy_ld; dx += row * n;
    if (add) add += row * n;
    float xv[VPT][8], gv[VPT][8];
    float ss = 0.f, xg = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < n) {
            float wv[8];
            load8(x + c, xv[k]);
            load8(dy + c, gv[k]);
            load8(w + c, wv);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                gv[k][j] *= wv[j];
                ss += xv[k][j] * xv[k][j];
                xg += xv[k][j] * gv[k][j];
            }
        }
    }
    ss = block_sum(ss);
    xg = block_sum(xg);
    float r = rsqrtf(ss / n + eps);
    float kk = r * r * r * xg / n;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        int c = (threadIdx.x + k * blockDim.x) * 8;
        if (c < n) {
            float av[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, o[8];
            if (add) load8(add + c, av);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = av[j] + r * gv[k][j] - xv[k][j] * kk;
            store8(dx + c, o);
        }
    }
}

#define RMS(name, T)                                                                           \
    extern "C" __global__ void rms_norm_##name(const T* x, const T* w, T* out, int n, int out_ld,  \
                                               float eps) {                                    \
        rms_norm<T>(x, w, out, n, out_ld, eps);                                                \
    }                                                                                          \
    extern "C" __global__ void add_rms_norm_##name(const T* x, const T* y, const T* w, T* sum,  \
                                                   T* out, int n, int out_ld, float eps) {     \
        add_rms_norm<T>(x, y, w, sum, out, n, out_ld, eps);                                    \
    }                                                                                          \
    extern "C" __global__ void rms_norm_backward_##name(const T* x, const T* w, const T* dy,    \
                                                        const T* add, T* dx, int n, int dy_ld,  \
                                                        float eps) {                           \
        rms_norm_backward<T>(x, w, dy, add, dx, n, dy_ld, eps);                                \
    }                                                                                          \
    extern "C" __global__ void rms_norm_vec_##name(const T* x, const T* w, T* out, int n,       \
                                                   int out_ld, float eps) {                    \
        rms_norm_vec<T, false>(x, nullptr, w, nullptr, out, n, out_ld, eps);                   \
    }                                                                                          \
    extern "C" __global__ void add_rms_norm_vec_##name(const T* x, const T* y, const T* w,      \
                                                       T* sum, T* out, int n, int out_ld,      \
                                                       float eps) {                            \
        rms_norm_vec<T, true>(x, y, w, sum, out, n, out_ld, eps);                              \
    }                                                                                          \
    extern "C" __global__ void rms_norm_backward_vec_##name(const T* x, const T* w, const T* dy, \
                                                            const T* add, T* dx, int n,        \
                                                            int dy_ld, float eps) {            \
        rms_norm_backward_vec<T>(x, w, dy, add, dx, n, dy_ld, eps);                            \
    }
FOR_EACH_FLOAT(RMS)
