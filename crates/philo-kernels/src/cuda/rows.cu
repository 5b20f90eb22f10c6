// Row scatter: dst row index[i] ← src row i, for rows of `row_bytes` bytes (any dtype). One block
// per source row; 16-byte copies when both rows allow them, 2-byte copies otherwise (every
// dtype philo scatters is a whole number of 2-byte units). The reference is
// `rows::reference_scatter` on the Rust side.
#include <stdint.h>

extern "C" __global__ void scatter_rows(unsigned char* dst, const uint32_t* index,
                                        const unsigned char* src, long long row_bytes) {
    const unsigned char* s = src + (size_t)blockIdx.x * row_bytes;
    unsigned char* d = dst + (size_t)index[blockIdx.x] * row_bytes;
    if (((uintptr_t)s | (uintptr_t)d | (uintptr_t)row_bytes) % 16 == 0) {
        const uint4* s4 = reinterpret_cast<const uint4*>(s);
        uint4* d4 = reinterpret_cast<uint4*>(d);
        for (long long i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) d4[i] = s4[i];
        return;
    }
    const uint16_t* s2 = reinterpret_cast<const uint16_t*>(s);
    uint16_t* d2 = reinterpret_cast<uint16_t*>(d);
    for (long long i = threadIdx.x; i < row_bytes / 2; i += blockDim.x) d2[i] = s2[i];
}
