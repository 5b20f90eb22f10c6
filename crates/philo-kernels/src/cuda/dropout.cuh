// The uniform number of dropout's mask for element i (`dropout::uniform` on the Rust side):
// elements 2j and 2j + 1 share one 32-bit hash of (seed, j), two rounds of lowbias32, and take
// its low and high 16 bits / 2^16. An element is kept when its uniform is >= p.
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint32_t dropout_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// The hash of pair j = i / 2.
__device__ __forceinline__ uint32_t dropout_pair_hash(unsigned long long seed, unsigned long long j) {
    uint32_t h = dropout_mix32((uint32_t)j + (uint32_t)seed);
    return dropout_mix32(h ^ (uint32_t)(seed >> 32) ^ (uint32_t)(j >> 32));
}

__device__ __forceinline__ float dropout_uniform(unsigned long long seed, unsigned long long i) {
    uint32_t h = dropout_pair_hash(seed, i >> 1);
    return (float)((i & 1) ? h >> 16 : h & 0xFFFFu) * (1.0f / 65536.0f);
}

// Whether elements i and i + 1 (i even) are dropped, from their one hash.
__device__ __forceinline__ void dropout_pair(unsigned long long seed, unsigned long long i, float p,
                                             bool& drop0, bool& drop1) {
    uint32_t h = dropout_pair_hash(seed, i >> 1);
    drop0 = (float)(h & 0xFFFFu) * (1.0f / 65536.0f) < p;
    drop1 = (float)(h >> 16) * (1.0f / 65536.0f) < p;
}
