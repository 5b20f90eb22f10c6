// SwiGLU of a fused gate_up projection [rows, 2·i] laid out [gate | up]: silu(gate)·up → [rows, i].
// Forward rounding follows torch: silu(gate) is rounded to the dtype, then the product.
// Backward (f32 inside): d gate = g·up·silu'(gate), d up = g·silu(gate),
// silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
// One block per row (grid.x); index arithmetic in 32 bits.
#include "common.cuh"

template <typename T>
__device__ void swiglu(const T* gate_up, T* out, int i) {
    const T* gate = gate_up + (size_t)blockIdx.x * 2 * i;
    const T* up = gate + i;
    T* o = out + (size_t)blockIdx.x * i;
    for (int c = threadIdx.x; c < i; c += blockDim.x) {
        float g = to_f32(gate[c]), u = to_f32(up[c]);
        o[c] = from_f32<T>(round_to<T>(g / (1.f + __expf(-g))) * u);
    }
}

template <typename T>
__device__ void swiglu_backward(const T* gate_up, const T* grad, T* out, int i) {
    size_t row = blockIdx.x;
    const T* gate = gate_up + row * 2 * i;
    const T* up = gate + i;
    const T* dy = grad + row * i;
    T* d_gate = out + row * 2 * i;
    T* d_up = d_gate + i;
    for (int c = threadIdx.x; c < i; c += blockDim.x) {
        float g = to_f32(gate[c]), u = to_f32(up[c]), d = to_f32(dy[c]);
        float sig = 1.f / (1.f + __expf(-g));
        d_gate[c] = from_f32<T>(d * u * sig * (1.f + g * (1.f - sig)));
        d_up[c] = from_f32<T>(d * g * sig);
    }
}

#define SWIGLU(name, T)                                                                        \
    extern "C" __global__ void swiglu_##name(const T* gate_up, T* out, int i) {                \
        swiglu<T>(gate_up, out, i);                                                            \
    }                                                                                          \
    extern "C" __global__ void swiglu_backward_##name(const T* gate_up, const T* grad, T* out, \
                                                      int i) {                                 \
        swiglu_backward<T>(gate_up, grad, out, i);                                             \
    }
FOR_EACH_FLOAT(SWIGLU)
