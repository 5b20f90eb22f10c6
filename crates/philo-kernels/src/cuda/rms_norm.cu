// RMSNorm as transformers' Phi3RMSNorm computes it: the mean square in f32, x·rsqrt(ms + eps)
// rounded to the input dtype, then multiplied by the weight in that dtype.
// One block per row. `add_rms_norm` first forms residual = x + y (rounded to the dtype, as a
// separate `x + y` would be) and writes both the sum and its norm: one pass instead of three.
#include "common.cuh"

template <typename T>
__device__ void rms_norm_row(const T* x, const T* w, T* out, int n, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float v = to_f32(x[i]); ss += v * v; }
    float inv = rsqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[i] = from_f32<T>(to_f32(w[i]) * round_to<T>(to_f32(x[i]) * inv));
}

template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* out, int n, float eps) {
    size_t row = blockIdx.x;
    rms_norm_row(x + row * n, w, out + row * n, n, eps);
}

template <typename T>
__device__ void add_rms_norm(const T* x, const T* y, const T* w, T* sum, T* out, int n, float eps) {
    size_t row = blockIdx.x;
    x += row * n; y += row * n; sum += row * n; out += row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
    // Each thread reads back only what it wrote itself, so no barrier is needed here.
    rms_norm_row<T>(sum, w, out, n, eps);
}

#define RMS(name, T)                                                                          \
    extern "C" __global__ void rms_norm_##name(const T* x, const T* w, T* out, int n, float eps) { \
        rms_norm<T>(x, w, out, n, eps);                                                       \
    }                                                                                         \
    extern "C" __global__ void add_rms_norm_##name(const T* x, const T* y, const T* w, T* sum, \
                                                   T* out, int n, float eps) {                \
        add_rms_norm<T>(x, y, w, sum, out, n, eps);                                           \
    }
FOR_EACH_FLOAT(RMS)

// Backward for x (the weight is frozen): with r = rsqrt(mean(x²) + eps) and g = w·dy,
// dx = r·g − x·r³·mean(x·g). All in f32, rounded once.
template <typename T>
__device__ void rms_norm_backward(const T* x, const T* w, const T* dy, T* dx, int n, float eps) {
    size_t row = blockIdx.x;
    x += row * n; dy += row * n; dx += row * n;
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
        dx[i] = from_f32<T>(r * to_f32(w[i]) * to_f32(dy[i]) - to_f32(x[i]) * k);
}

#define RMS_BWD(name, T)                                                                       \
    extern "C" __global__ void rms_norm_backward_##name(const T* x, const T* w, const T* dy,   \
                                                        T* dx, int n, float eps) {             \
        rms_norm_backward<T>(x, w, dy, dx, n, eps);                                            \
    }
FOR_EACH_FLOAT(RMS_BWD)
