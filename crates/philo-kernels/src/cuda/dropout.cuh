// The uniform number of dropout's mask for element i (`dropout::uniform` on the Rust side):
// elements 2j and 2j + 1 share one 32-bit hash, lowbias32 of j's low 32 bits XOR a key, and
// take its low and high 16 bits / 2^16. The key mixes the 64-bit seed and j's high bits; for a
// given seed it is loop-invariant, so a mask costs one lowbias32 per pair of elements. An
// element is kept when its uniform is >= p.
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint32_t dropout_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// The key of pair j's hash: the seed's two halves mixed, then j's high bits (0 below 2^32 pairs).
__device__ __forceinline__ uint32_t dropout_key(unsigned long long seed, unsigned long long j) {
    uint32_t key = dropout_mix32(dropout_mix32((uint32_t)(seed >> 32)) ^ (uint32_t)seed);
    return key ^ (uint32_t)(j >> 32) * 0x9E3779B9u;
}

// The hash of pair j = i / 2.
__device__ __forceinline__ uint32_t dropout_pair_hash(unsigned long long seed, unsigned long long j) {
    return dropout_mix32((uint32_t)j ^ dropout_key(seed, j));
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
