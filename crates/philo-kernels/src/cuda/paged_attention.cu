// The paged KV cache's kernels (reference: src/paged_attention.rs).
// Cache layout [blocks, kv_heads, block_size, d]; slot = block * block_size + offset.
#include "mma.cuh"

// new [kvh, t, d] → cache at slots[t]; one thread per element.
template <typename T>
__device__ void write_kv(T* cache, const T* values, const uint32_t* slots, int t, int kvh, int bs, int d,
                         uint32_t num_slots) {
    size_t total = (size_t)t * kvh * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int j = i % d;
        size_t row = i / d;
        int tok = row % t, h = row / t;
        uint32_t slot = slots[tok];
        // A slot past the cache is never written: the host checks slots before launching, and
        // this keeps a bad one from corrupting memory if it ever slips through.
        if (slot >= num_slots) continue;
        size_t block = slot / bs, offset = slot % bs;
        cache[((block * kvh + h) * bs + offset) * d + j] = values[i];
    }
}

// One block of 128 threads (4 warps) per (sequence, head). Keys go in tiles of 128: one thread
// scores one key with 16-byte loads, then an online softmax rescales across tiles. For the
// weighted sum of V each warp takes every 4th key of the tile and its lanes cover the head's
// dimensions in pairs (128-byte coalesced rows); for the common head dims the tile's values are
// already in shared memory by then (copied while the scores were computed). The 4 warps'
// partial sums are added at the end. q [h, n, d], out [n, h, d].
//
// Long sequences split their keys over `splits` blocks (grid.z), as flash-decoding does, so that
// a few sequences still fill the GPU: each block writes its (max, sum, unnormalised output) to
// `partial` [n, h, splits, d + 2] and the last block of a (sequence, head) to finish — counted in
// `counters` [n, h], which it resets for the next launch — combines them.
constexpr int TILE = 128;
constexpr int WARPS = 4;
// Pairs of output dims per lane: d ≤ 2 * 32 * PAIRS = 256.
constexpr int PAIRS = 4;

// Two consecutive elements (p 4- or 8-byte aligned) as floats, in one load.
__device__ __forceinline__ float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 load_pair(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }

// D > 0 fixes the head dimension at compile time (the key loads of a score then issue together);
// D = 0 takes it from `d`.
template <typename T, int D>
__device__ void paged_decode(const T* q, const T* kc, const T* vc, const uint32_t* tables,
                             const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,
                             int max_blocks, int window, int splits, float* partial_out,
                             uint32_t* counters) {
    __shared__ float qs[256];
    __shared__ float probs[TILE];
    __shared__ float partial[WARPS][256];
    // With the head dim fixed and a tile of values within 32 KiB, the tile's values are copied
    // into shared memory (cp.async) as soon as the tile starts: they arrive while its scores
    // are computed, instead of a chain of dependent loads after the softmax.
    constexpr bool PREFETCH = D > 0 && D * sizeof(T) <= 256;
    constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte copy
    __shared__ __align__(16) T vtile[PREFETCH ? TILE * D : 1];
    pdl_allow_next();
    pdl_wait_previous();
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32;
    int kh = head / (h / kvh);
    int len = lens[seq];
    int first = len > window ? len - window : 0;
    int end = len;
    if (splits > 1) {
        int per = (len - first + splits - 1) / splits;
        first = min(len, first + (int)blockIdx.z * per);
        end = min(len, first + per);
    }
    const uint32_t* table = tables + (size_t)seq * max_blocks;
    float scale = rsqrtf((float)d);
    for (int j = tid; j < d; j += blockDim.x) qs[j] = to_f32(q[((size_t)head * n + seq) * d + j]) * scale;
    __syncthreads();

    float running_max = -INFINITY, running_sum = 0.f;
    float acc[PAIRS][2] = {};
    for (int start = first; start < end; start += TILE) {
        if constexpr (PREFETCH) {
            __syncthreads();  // the previous tile's values are read
            constexpr int CH = D / CHUNK;
            int count = min(TILE, end - start);
            for (int j = tid; j < count * CH; j += blockDim.x) {
                int i = j / CH, c = j % CH, pi = start + i;
                size_t block = table[pi / bs];
                const T* v = vc + ((block * kvh + kh) * bs + pi % bs) * D + c * CHUNK;
                cp_async16(vtile + i * D + c * CHUNK, v, true);
            }
            cp_async_commit();
        }
        int p = start + tid;
        float score = -INFINITY;
        if (p < end) {
            size_t block = table[p / bs];
            const T* k = kc + ((block * kvh + kh) * bs + p % bs) * d;
            float s = 0.f;
            constexpr int PER_LOAD = 16 / sizeof(T);
            const int dd = D > 0 ? D : d;
#pragma unroll
            for (int c = 0; c < dd; c += PER_LOAD) {
                uint4 raw = *reinterpret_cast<const uint4*>(k + c);
                const T* kv = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int e = 0; e < PER_LOAD; ++e) s += qs[c + e] * to_f32(kv[e]);
            }
            score = s;
        }
        float tile_max = block_max(score);
        float new_max = fmaxf(running_max, tile_max);
        float prob = p < end ? __expf(score - new_max) : 0.f;
        float correction = __expf(running_max - new_max);
        running_sum = running_sum * correction + block_sum(prob);
        running_max = new_max;
        __syncthreads();
        probs[tid] = prob;
        if constexpr (PREFETCH) cp_async_wait<0>();
        __syncthreads();
        int count = min(TILE, end - start);
#pragma unroll
        for (int r = 0; r < PAIRS; ++r) {
            acc[r][0] *= correction;
            acc[r][1] *= correction;
        }
#pragma unroll 8
        for (int i = warp; i < count; i += WARPS) {
            const T* v;
            if constexpr (PREFETCH) {
                v = vtile + i * D;
            } else {
                int pi = start + i;
                size_t block = table[pi / bs];
                v = vc + ((block * kvh + kh) * bs + pi % bs) * d;
            }
            float w = probs[i];
#pragma unroll
            for (int r = 0; r < PAIRS; ++r) {
                int j = 2 * lane + 64 * r;
                if (j < d) {
                    float2 pair = load_pair(v + j);
                    acc[r][0] += w * pair.x;
                    acc[r][1] += w * pair.y;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < PAIRS; ++r) {
        int j = 2 * lane + 64 * r;
        if (j < d) {
            partial[warp][j] = acc[r][0];
            partial[warp][j + 1] = acc[r][1];
        }
    }
    __syncthreads();
    T* o = out + ((size_t)seq * h + head) * d;
    if (splits == 1) {
        for (int j = tid; j < d; j += blockDim.x) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) sum += partial[w][j];
            o[j] = from_f32<T>(running_sum > 0.f ? sum / running_sum : 0.f);
        }
        return;
    }
    float* mine = partial_out + (((size_t)seq * h + head) * splits + blockIdx.z) * (d + 2);
    for (int j = tid; j < d; j += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += partial[w][j];
        mine[2 + j] = sum;
    }
    if (tid == 0) {
        mine[0] = running_max;
        mine[1] = running_sum;
    }
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        uint32_t* counter = counters + (size_t)seq * h + head;
        last = atomicAdd(counter, 1u) == (uint32_t)splits - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* all = partial_out + ((size_t)seq * h + head) * splits * (d + 2);
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s)
        if (all[s * (d + 2) + 1] > 0.f) m = fmaxf(m, all[s * (d + 2)]);
    float total = 0.f;
    for (int s = 0; s < splits; ++s) {
        float sum = all[s * (d + 2) + 1];
        if (sum > 0.f) total += sum * __expf(all[s * (d + 2)] - m);
    }
    for (int j = tid; j < d; j += blockDim.x) {
        float acc_j = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float* ps = all + s * (d + 2);
            if (ps[1] > 0.f) acc_j += ps[2 + j] * __expf(ps[0] - m);
        }
        o[j] = from_f32<T>(total > 0.f ? acc_j / total : 0.f);
    }
}

#define PAGED_DECODE(fname, T, D)                                                                          \
    extern "C" __global__ void fname(const T* q, const T* kc, const T* vc, const uint32_t* tables,            \
                                     const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,      \
                                     int max_blocks, int window, int splits, float* partial,                  \
                                     uint32_t* counters) {                                                     \
        paged_decode<T, D>(q, kc, vc, tables, lens, out, n, h, kvh, d, bs, max_blocks, window, splits,        \
                           partial, counters);                                                                \
    }
#define PAGED(name, T)                                                                                     \
    extern "C" __global__ void write_kv_##name(T* cache, const T* values, const uint32_t* slots, int t,    \
                                               int kvh, int bs, int d, uint32_t num_slots) {              \
        write_kv<T>(cache, values, slots, t, kvh, bs, d, num_slots);                                      \
    }                                                                                                      \
    PAGED_DECODE(paged_decode_##name, T, 0)                                                                \
    PAGED_DECODE(paged_decode_##name##_d64, T, 64)                                                         \
    PAGED_DECODE(paged_decode_##name##_d96, T, 96)                                                         \
    PAGED_DECODE(paged_decode_##name##_d128, T, 128)
PAGED(f32, float)
PAGED(bf16, __nv_bfloat16)
PAGED(f16, __half)
