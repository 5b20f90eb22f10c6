// Inverted dropout whose mask is a pure function of (seed, element index): the backward
// regenerates the same mask instead of storing it. keep = uniform(seed, i) ≥ p, the uniform
// being the top 24 bits of splitmix64(seed + i·golden) / 2²⁴.
#include "dropout.cuh"

template <typename T>
__device__ void dropout(const T* x, T* out, size_t n, unsigned long long seed, float p) {
    float keep = 1.f / (1.f - p);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(dropout_uniform(seed, i) >= p ? to_f32(x[i]) * keep : 0.f);
}

#define DROPOUT(name, T)                                                                       \
    extern "C" __global__ void dropout_##name(const T* x, T* out, size_t n,                    \
                                              unsigned long long seed, float p) {              \
        dropout<T>(x, out, n, seed, p);                                                        \
    }
FOR_EACH_FLOAT(DROPOUT)
