// One token per row of f32 logits, drawn on the GPU (reference: src/sampling.rs): greedy, or
// temperature, top-k, top-p, min-p and typical-p in Hugging Face's order, then a draw with a uniform number
// that is a hash of the row's seed and draw counter. Only the token id leaves the device.
//
// One block of 1,024 threads per row; each thread holds 32 consecutive logits in registers
// (vocabularies up to 32,768). The thresholds of top-k and top-p are found by binary search
// over the logits' order-preserving 32-bit keys (32 block reductions each, in a fixed order, so
// a row samples the same token every time). Masses are summed in f64: with f32 sums over 32k
// tokens, the draw would land on a neighbour of the exact token in a few percent of draws.
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024;
constexpr int PER_THREAD = 32;

// Temperatures below this decode greedily (as the host sampler).
constexpr float GREEDY_TEMPERATURE = 1e-5f;

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// The uniform number in [0, 1) of draw `counter` of a row seeded with `seed`: 24 bits.
__device__ __forceinline__ float draw_uniform(uint64_t seed, uint32_t counter) {
    uint64_t h = splitmix64(seed ^ splitmix64(counter));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

// x's bits as an integer that orders like a total order of floats.
__device__ __forceinline__ uint32_t ascending_key(float x) {
    uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Exclusive prefix sum of v over the threads in order (and the block's total).
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* total) {
    __shared__ V warp_sums[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    V inclusive = v;
    for (int o = 1; o < 32; o <<= 1) {
        V up = __shfl_up_sync(0xffffffff, inclusive, o);
        if (lane >= o) inclusive += up;
    }
    __syncthreads();
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        V s = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : V(0);
        for (int o = 1; o < 32; o <<= 1) {
            V up = __shfl_up_sync(0xffffffff, s, o);
            if (lane >= o) s += up;
        }
        warp_sums[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    V before = warp == 0 ? V(0) : warp_sums[warp - 1];
    *total = warp_sums[blockDim.x / 32 - 1];
    return before + inclusive - v;
}

// The logit bias and penalties of the rows to sample (reference: LogitAdjustment in
// src/sampling.rs), one thread per entry: 4 words each, the logit's index then bias, penalty
// and subtract as f32 bits, `*count` entries (a device word, so a captured graph takes any
// number). Entries of one row name distinct tokens, so no two threads write one logit.
extern "C" __global__ void adjust_logits(float* logits, const uint32_t* entries, const uint32_t* count) {
    pdl_allow_next();
    pdl_wait_previous();
    const uint32_t n = *count;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const uint32_t* e = entries + 4 * (size_t)i;
        float x = logits[e[0]] + __uint_as_float(e[1]);
        const float penalty = __uint_as_float(e[2]);
        x = x < 0.f ? x * penalty : x / penalty;
        logits[e[0]] = x - __uint_as_float(e[3]);
    }
}

// Row parameters, `stride` rows apart, as u32 words: temperature (f32 bits), top_k (0: off),
// top_p (f32, 1: off), min_p (f32, 0: off), seed low, seed high, draw counter, typical_p (f32,
// 1: off).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const float* logits, int vocab, const uint32_t* params, int stride, uint32_t* out) {
    __shared__ uint32_t chosen;
    pdl_allow_next();
    pdl_wait_previous();
    const int row = blockIdx.x, first = threadIdx.x * PER_THREAD;
    const float temperature = __uint_as_float(params[row]);
    const uint32_t top_k = params[stride + row];
    const float top_p = __uint_as_float(params[2 * stride + row]);
    const float min_p = __uint_as_float(params[3 * stride + row]);
    const uint64_t seed = params[4 * stride + row] | ((uint64_t)params[5 * stride + row] << 32);
    const uint32_t counter = params[6 * stride + row];
    const float typical_p = __uint_as_float(params[7 * stride + row]);
    const float* x = logits + (size_t)row * vocab;

    float v[PER_THREAD];
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        int id = first + i;
        float f = id < vocab ? x[id] : -INFINITY;
        v[i] = isnan(f) ? -INFINITY : f;
    }

    if (temperature < GREEDY_TEMPERATURE) {
        // The largest logit, lowest id among equals; 0 when none is above -inf.
        float bv = -INFINITY;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i)
            if (v[i] > bv) { bv = v[i]; bi = first + i; }
        float m = block_max(bv);
        int candidate = bv == m && m > -INFINITY ? bi : 0x7fffffff;
        if (threadIdx.x == 0) chosen = 0x7fffffff;
        __syncthreads();
        atomicMin(&chosen, (uint32_t)candidate);
        __syncthreads();
        if (threadIdx.x == 0) out[row] = chosen == 0x7fffffffu ? 0u : chosen;
        return;
    }

    if (temperature != 1.f) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) v[i] = v[i] / temperature;
    }

    if (top_k > 0 && top_k < (uint32_t)vocab) {
        // The k-th largest value: the largest key K with at least k keys >= K.
        uint32_t lo = 0, hi = 0xFFFFFFFFu;
        while (lo < hi) {
            uint32_t mid = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);
            uint32_t n = 0;
#pragma unroll
            for (int i = 0; i < PER_THREAD; ++i) n += first + i < vocab && ascending_key(v[i]) >= mid;
            if (block_total<uint32_t>(n) >= top_k) lo = mid;
            else hi = mid - 1;
        }
        float kth = key_value(lo);
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i)
            if (v[i] < kth) v[i] = -INFINITY;
    }

    // Unnormalised probabilities: the largest logit weighs 1.
    float thread_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) thread_max = fmaxf(thread_max, v[i]);
    const float m = block_max(thread_max);
    float e[PER_THREAD];
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        bool real = first + i < vocab;
        // Every logit -inf: all equally likely, as the host's softmax makes them.
        e[i] = !real ? 0.f : (v[i] == m || m == -INFINITY) ? 1.f : expf(v[i] - m);
    }

    if (top_p < 1.f) {
        // Keep a token when the mass of the tokens before it (larger logits first, lower id
        // first among equals) is below top_p: every key above K*, the smallest key whose
        // larger keys weigh less than top_p, and as many of K*'s ties as still fit.
        double s = 0.0;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) s += e[i];
        const double target = (double)top_p * block_total<double>(s);
        uint32_t lo = 0, hi = 0xFFFFFFFFu;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            double g = 0.0;
#pragma unroll
            for (int i = 0; i < PER_THREAD; ++i) g += ascending_key(v[i]) > mid ? e[i] : 0.f;
            if (block_total<double>(g) < target) hi = mid;
            else lo = mid + 1;
        }
        double above = 0.0;
        float tie_weight = 0.f;
        uint32_t ties = 0;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            uint32_t k = ascending_key(v[i]);
            if (first + i >= vocab) continue;
            if (k > lo) above += e[i];
            if (k == lo) { ++ties; tie_weight = e[i]; }
        }
        const double g = block_total<double>(above);
        uint32_t all_ties;
        uint32_t rank = block_exclusive_scan<uint32_t>(ties, &all_ties);
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            uint32_t k = ascending_key(v[i]);
            if (k < lo) e[i] = 0.f;
            else if (k == lo && first + i < vocab) {
                if (!(g + (double)rank * tie_weight < target)) e[i] = 0.f;
                ++rank;
            }
        }
    }

    if (min_p > 0.f) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i)
            if (e[i] < min_p) e[i] = 0.f;
    }

    if (typical_p < 1.f && m > -INFINITY) {
        // Locally typical sampling over the tokens still possible: log-probabilities in f64
        // (as the host's filter computes them), the entropy H, and each token's distance
        // |−lp − H|; keep those within the smallest distance whose tokens weigh at least
        // typical_p, found by binary search over the distances' bits (non-negative doubles
        // order as their bits). With one token or none left nothing changes.
        uint32_t count = 0;
        double z = 0.0;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            if (e[i] > 0.f) {
                ++count;
                z += exp((double)v[i] - (double)m);
            }
        }
        if (block_total<uint32_t>(count) > 1) {
            const double log_z = log(block_total<double>(z));
            double h = 0.0;
#pragma unroll
            for (int i = 0; i < PER_THREAD; ++i) {
                if (e[i] > 0.f) {
                    double lp = (double)v[i] - (double)m - log_z;
                    h -= exp(lp) * lp;
                }
            }
            h = block_total<double>(h);
            auto distance_bits = [&](int i) {
                double lp = (double)v[i] - (double)m - log_z;
                return (unsigned long long)__double_as_longlong(fabs(-lp - h));
            };
            // The smallest key whose tokens at or below it weigh at least typical_p; infinity's
            // bits (all kept) when rounding leaves even the whole set short of it.
            unsigned long long lo = 0, hi = 0x7FF0000000000000ull;
            while (lo < hi) {
                unsigned long long mid = lo + (hi - lo) / 2;
                double w = 0.0;
#pragma unroll
                for (int i = 0; i < PER_THREAD; ++i)
                    if (e[i] > 0.f && distance_bits(i) <= mid) w += exp((double)v[i] - (double)m - log_z);
                if (block_total<double>(w) >= (double)typical_p) hi = mid;
                else lo = mid + 1;
            }
#pragma unroll
            for (int i = 0; i < PER_THREAD; ++i)
                if (e[i] > 0.f && distance_bits(i) > lo) e[i] = 0.f;
        }
    }

    // The draw: the first id whose running sum passes u · total.
    double s = 0.0;
    int last = -1;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        s += e[i];
        if (e[i] > 0.f) last = first + i;
    }
    double total;
    double acc = block_exclusive_scan<double>(s, &total);
    const double target = (double)draw_uniform(seed, counter) * total;
    if (threadIdx.x == 0) chosen = 0x7fffffff;
    __syncthreads();
    if (acc <= target && target < acc + s) {
        // This thread's ids hold the target; if rounding walks past them, its last one.
        int pick = last;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            if (e[i] > 0.f) {
                acc += e[i];
                if (acc > target) { pick = first + i; break; }
            }
        }
        atomicMin(&chosen, (uint32_t)pick);
    }
    __syncthreads();
    if (chosen == 0x7fffffffu) {
        // Rounding put the target at the very top: the last possible token.
        int top = block_max(last >= 0 ? (float)last : -1.f);
        if (threadIdx.x == 0) out[row] = top >= 0 ? (uint32_t)top : 0u;
        return;
    }
    if (threadIdx.x == 0) out[row] = chosen;
}
