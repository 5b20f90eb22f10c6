// SwiGLU of a fused gate_up projection [rows, 2·i] laid out [gate | up]: silu(gate)·up → [rows, i].
// Forward rounding follows torch: silu(gate) is rounded to the dtype, then the product.
// Backward (f32 inside): d gate = g·up·silu'(gate), d up = g·silu(gate),
// silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
#include "common.cuh"

template <typename T>
__device__ void swiglu(const T* gate_up, T* out, size_t rows, int i) {
    size_t total = rows * i;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t r = e / i, c = e % i;
        float g = to_f32(gate_up[r * 2 * i + c]), u = to_f32(gate_up[r * 2 * i + i + c]);
        out[e] = from_f32<T>(round_to<T>(g / (1.f + expf(-g))) * u);
    }
}

template <typename T>
__device__ void swiglu_backward(const T* gate_up, const T* grad, T* out, size_t rows, int i) {
    size_t total = rows * i;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t r = e / i, c = e % i;
        float g = to_f32(gate_up[r * 2 * i + c]), u = to_f32(gate_up[r * 2 * i + i + c]);
        float dy = to_f32(grad[e]);
        float sig = 1.f / (1.f + expf(-g));
        out[r * 2 * i + c] = from_f32<T>(dy * u * sig * (1.f + g * (1.f - sig)));
        out[r * 2 * i + i + c] = from_f32<T>(dy * g * sig);
    }
}

#define SWIGLU(name, T)                                                                        \
    extern "C" __global__ void swiglu_##name(const T* gate_up, T* out, size_t rows, int i) {   \
        swiglu<T>(gate_up, out, rows, i);                                                      \
    }                                                                                          \
    extern "C" __global__ void swiglu_backward_##name(const T* gate_up, const T* grad, T* out, \
                                                      size_t rows, int i) {                    \
        swiglu_backward<T>(gate_up, grad, out, rows, i);                                       \
    }
FOR_EACH_FLOAT(SWIGLU)
