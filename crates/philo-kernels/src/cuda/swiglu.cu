// SwiGLU of a fused gate_up projection [rows, 2·i] laid out [gate | up]: silu(gate)·up → [rows, i].
// Forward rounding follows torch: silu(gate) is rounded to the dtype, then the product.
// Backward (f32 inside): d gate = g·up·silu'(gate), d up = g·silu(gate),
// silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
// One block per row (grid.x); index arithmetic in 32 bits.
#include "common.cuh"

// Whether a row walk can move eight elements at a time: i a multiple of 8 and every pointer
// aligned for load8/store8 (16 bytes for bf16/f16, 32 for f32).
template <typename T>
__device__ __forceinline__ bool eight_wide(int i, const void* a, const void* b, const void* c = nullptr) {
    uintptr_t bytes = 8 * sizeof(T);
    return i % 8 == 0 && ((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) % bytes == 0;
}

__device__ __forceinline__ float silu_of(float g) { return g / (1.f + __expf(-g)); }

// Output rows are ld_out apart (ld_out ≥ i: a caller may keep columns after each row).
template <typename T>
__device__ void swiglu(const T* gate_up, T* out, int i, int ld_out) {
    const T* gate = gate_up + (size_t)blockIdx.x * 2 * i;
    const T* up = gate + i;
    T* o = out + (size_t)blockIdx.x * ld_out;
    if (eight_wide<T>(i, gate_up, out) && ld_out % 8 == 0) {
        // 16-byte accesses: the scalar loop reached about 70 % of the bandwidth.
        for (int c = threadIdx.x * 8; c < i; c += blockDim.x * 8) {
            float g[8], u[8], y[8];
            load8(gate + c, g);
            load8(up + c, u);
#pragma unroll
            for (int e = 0; e < 8; ++e) y[e] = round_to<T>(silu_of(g[e])) * u[e];
            store8(o + c, y);
        }
        return;
    }
    for (int c = threadIdx.x; c < i; c += blockDim.x) {
        float g = to_f32(gate[c]), u = to_f32(up[c]);
        o[c] = from_f32<T>(round_to<T>(silu_of(g)) * u);
    }
}

// d gate and d up of one element.
__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float& dg, float& du) {
    float sig = 1.f / (1.f + __expf(-g));
    dg = d * u * sig * (1.f + g * (1.f - sig));
    du = d * g * sig;
}

template <typename T>
__device__ void swiglu_backward(const T* gate_up, const T* grad, T* out, int i) {
    size_t row = blockIdx.x;
    const T* gate = gate_up + row * 2 * i;
    const T* up = gate + i;
    const T* dy = grad + row * i;
    T* d_gate = out + row * 2 * i;
    T* d_up = d_gate + i;
    if (eight_wide<T>(i, gate_up, grad, out)) {
        for (int c = threadIdx.x * 8; c < i; c += blockDim.x * 8) {
            float g[8], u[8], d[8], dg[8], du[8];
            load8(gate + c, g);
            load8(up + c, u);
            load8(dy + c, d);
#pragma unroll
            for (int e = 0; e < 8; ++e) swiglu_grad(g[e], u[e], d[e], dg[e], du[e]);
            store8(d_gate + c, dg);
            store8(d_up + c, du);
        }
        return;
    }
    for (int c = threadIdx.x; c < i; c += blockDim.x) {
        float dg, du;
        swiglu_grad(to_f32(gate[c]), to_f32(up[c]), to_f32(dy[c]), dg, du);
        d_gate[c] = from_f32<T>(dg);
        d_up[c] = from_f32<T>(du);
    }
}

#define SWIGLU(name, T)                                                                        \
    extern "C" __global__ void swiglu_##name(const T* gate_up, T* out, int i, int ld_out) {    \
        swiglu<T>(gate_up, out, i, ld_out);                                                    \
    }                                                                                          \
    extern "C" __global__ void swiglu_backward_##name(const T* gate_up, const T* grad, T* out, \
                                                      int i) {                                 \
        swiglu_backward<T>(gate_up, grad, out, i);                                             \
    }
FOR_EACH_FLOAT(SWIGLU)
