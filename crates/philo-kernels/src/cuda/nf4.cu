// NF4 dequantisation (bitsandbytes layout): two 4-bit indices per byte, the first element in the
// high nibble, one scale per 64-weight block. The block scales are either plain f32 or
// double-quantised: scale = code[q]·absmax2[block / 256] + offset, each step rounded to f32 as
// bitsandbytes does. The value NF4[index]·scale is computed in f32, then rounded once.
#include "common.cuh"
#include "nf4_code.cuh"

// One thread per packed byte (two weights); `block` weights per scale (64). The general case.
template <typename T>
__device__ void nf4_dequantize(const uint8_t* packed, const float* absmax, T* out, size_t n,
                               int block) {
    size_t bytes = (n + 1) / 2;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < bytes;
         p += (size_t)gridDim.x * blockDim.x) {
        uint8_t byte = packed[p];
        size_t e = 2 * p;
        out[e] = from_f32<T>(NF4[byte >> 4] * absmax[e / block]);
        if (e + 1 < n) out[e + 1] = from_f32<T>(NF4[byte & 15] * absmax[(e + 1) / block]);
    }
}

template <typename T> __device__ __forceinline__ void store16(T* p, const float (&f)[16]);
template <> __device__ __forceinline__ void store16<float>(float* p, const float (&f)[16]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
        reinterpret_cast<float4*>(p)[i] = make_float4(f[4 * i], f[4 * i + 1], f[4 * i + 2], f[4 * i + 3]);
}
template <> __device__ __forceinline__ void store16<__nv_bfloat16>(__nv_bfloat16* p, const float (&f)[16]) {
    uint4 u[2];
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    reinterpret_cast<uint4*>(p)[0] = u[0];
    reinterpret_cast<uint4*>(p)[1] = u[1];
}
template <> __device__ __forceinline__ void store16<__half>(__half* p, const float (&f)[16]) {
    uint4 u[2];
    __half2* h = reinterpret_cast<__half2*>(u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    reinterpret_cast<uint4*>(p)[0] = u[0];
    reinterpret_cast<uint4*>(p)[1] = u[1];
}

// Groups of 16 weights (8 packed bytes, one scale: 16 divides the block): one 8-byte load and
// 16-byte stores per thread, the code book in shared memory (lanes index it at random, which
// the constant cache would serialise). `shift` = log2(block / 16). Output rows of `cols`
// (a multiple of 16) are `ld` apart, so a caller can keep columns beside the matrix.
template <typename T>
__device__ void nf4_dequantize16(const uint8_t* packed, const float* absmax, T* out, size_t groups,
                                 int shift, int cols, int ld) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4[threadIdx.x];
    __syncthreads();
    for (size_t gi = blockIdx.x * (size_t)blockDim.x + threadIdx.x; gi < groups;
         gi += (size_t)gridDim.x * blockDim.x) {
        uint2 word = reinterpret_cast<const uint2*>(packed)[gi];
        float scale = absmax[gi >> shift];
        const uint8_t* by = reinterpret_cast<const uint8_t*>(&word);
        float f[16];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            f[2 * k] = code[by[k] >> 4] * scale;
            f[2 * k + 1] = code[by[k] & 15] * scale;
        }
        size_t e = gi * 16;
        store16(out + (ld == cols ? e : e / cols * ld + e % cols), f);
    }
}

// Scales of a double-quantised tensor: one thread per 4-bit block.
extern "C" __global__ void nf4_double_scales(const uint8_t* quantized, const float* code,
                                             const float* absmax2, float offset, float* out,
                                             size_t blocks, int block2) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < blocks;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __fadd_rn(__fmul_rn(code[quantized[i]], absmax2[i / block2]), offset);
}

#define NF4_DQ(name, T)                                                                           \
    extern "C" __global__ void nf4_dequantize_##name(const uint8_t* packed, const float* absmax, \
                                                     T* out, size_t n, int block) {               \
        nf4_dequantize<T>(packed, absmax, out, n, block);                                         \
    }                                                                                             \
    extern "C" __global__ void nf4_dequantize16_##name(const uint8_t* packed,                    \
                                                       const float* absmax, T* out,              \
                                                       size_t groups, int shift, int cols,        \
                                                       int ld) {                                  \
        nf4_dequantize16<T>(packed, absmax, out, groups, shift, cols, ld);                        \
    }
FOR_EACH_FLOAT(NF4_DQ)

// Quantisation, blocks of 64: one warp per block, each lane owns one byte (two weights). The
// block's absmax is its largest |w|; each weight maps to the number of NF4 midpoints that
// w·(1/absmax) is strictly above (bitsandbytes' decision tree; NaN of an all-zero block → 0).
template <typename T>
__device__ void nf4_quantize(const T* w, uint8_t* packed, float* absmax, size_t blocks) {
    size_t block = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    if (block >= blocks) return;
    int lane = threadIdx.x % 32;
    float a = to_f32(w[block * 64 + 2 * lane]), b = to_f32(w[block * 64 + 2 * lane + 1]);
    float mx = fmaxf(fabsf(a), fabsf(b));
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    float inv = __frcp_rn(mx);
    uint8_t qa = 0, qb = 0;
    float xa = __fmul_rn(a, inv), xb = __fmul_rn(b, inv);
#pragma unroll
    for (int k = 0; k < 15; ++k) {
        float t = __fmul_rn(__fadd_rn(NF4[k], NF4[k + 1]), 0.5f);
        qa += xa > t;
        qb += xb > t;
    }
    packed[block * 32 + lane] = (qa << 4) | qb;
    if (lane == 0) absmax[block] = mx;
}

#define NF4_Q(name, T)                                                                       \
    extern "C" __global__ void nf4_quantize_##name(const T* w, uint8_t* packed, float* absmax, \
                                                   size_t blocks) {                          \
        nf4_quantize<T>(w, packed, absmax, blocks);                                          \
    }
FOR_EACH_FLOAT(NF4_Q)
