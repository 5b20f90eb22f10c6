// The uniform number of dropout's mask for element i: the top 24 bits of
// splitmix64(seed + i·golden) / 2²⁴ (`dropout::uniform` on the Rust side). An element is kept
// when it is ≥ p.
#pragma once
#include "common.cuh"

__device__ __forceinline__ float dropout_uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}
