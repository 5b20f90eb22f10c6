// INT8 and INT4 weights into the compute dtype in one pass (reference: philo_quant's
// Int8Tensor::dequantize and Int4Tensor::dequantize, rounded once to T as their to_tensor does):
// the dense copy a many-row matmul on a quantised base multiplies by. One thread writes 8
// consecutive elements of a row (rows of whole 8s; INT4 groups of a multiple of 8).
#include "common.cuh"

// (code − 128) · absmax · (1/127), as the reference multiplies (two roundings, left to right).
template <typename T>
__device__ void int8_dequantize(const uint8_t* codes, const float* absmax, T* out, size_t n8, int cols) {
    const float inv_127 = 1.f / 127.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * 8;
        const uint2 c = *reinterpret_cast<const uint2*>(codes + e);
        const uint8_t* b = reinterpret_cast<const uint8_t*>(&c);
        const float s = absmax[e / cols];
        float f[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = __fmul_rn(__fmul_rn((float)b[j] - 128.f, s), inv_127);
        store8(out + e, f);
    }
}

// (nibble − 8) · the (row, group) scale; the even element in the low nibble.
template <typename T>
__device__ void int4_dequantize(const uint8_t* packed, const float* scales, T* out, size_t n8, int cols,
                                int group) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * 8;
        const uint32_t p = *reinterpret_cast<const uint32_t*>(packed + e / 2);
        const size_t row = e / cols;
        const int col = (int)(e % cols);
        const float s = scales[row * (cols / group) + col / group];
        float f[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            f[2 * j] = __fmul_rn((float)((p >> (8 * j)) & 15u) - 8.f, s);
            f[2 * j + 1] = __fmul_rn((float)((p >> (8 * j + 4)) & 15u) - 8.f, s);
        }
        store8(out + e, f);
    }
}

#define DEQUANTIZE(name, T)                                                                           \
    extern "C" __global__ void int8_dequantize_##name(const uint8_t* codes, const float* absmax, T* out, \
                                                      size_t n8, int cols) {                          \
        int8_dequantize<T>(codes, absmax, out, n8, cols);                                             \
    }                                                                                                 \
    extern "C" __global__ void int4_dequantize_##name(const uint8_t* packed, const float* scales, T* out, \
                                                      size_t n8, int cols, int group) {               \
        int4_dequantize<T>(packed, scales, out, n8, cols, group);                                     \
    }
FOR_EACH_FLOAT(DEQUANTIZE)
