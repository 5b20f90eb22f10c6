// The paged KV cache's kernels (reference: src/paged_attention.rs).
// Cache layout [blocks, kv_heads, block_size, d]; slot = block * block_size + offset.
#include "common.cuh"

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
// dimensions in pairs (128-byte coalesced rows), so the chain of dependent loads per thread is a
// quarter of the tile; the 4 warps' partial sums are added at the end. q [h, n, d], out [n, h, d].
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

template <typename T>
__device__ void paged_decode(const T* q, const T* kc, const T* vc, const uint32_t* tables,
                             const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,
                             int max_blocks, int window) {
    __shared__ float qs[256];
    __shared__ float probs[TILE];
    __shared__ float partial[WARPS][256];
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32;
    int kh = head / (h / kvh);
    int len = lens[seq];
    int first = len > window ? len - window : 0;
    const uint32_t* table = tables + (size_t)seq * max_blocks;
    float scale = rsqrtf((float)d);
    for (int j = tid; j < d; j += blockDim.x) qs[j] = to_f32(q[((size_t)head * n + seq) * d + j]) * scale;
    __syncthreads();

    float running_max = -INFINITY, running_sum = 0.f;
    float acc[PAIRS][2] = {};
    for (int start = first; start < len; start += TILE) {
        int p = start + tid;
        float score = -INFINITY;
        if (p < len) {
            size_t block = table[p / bs];
            const T* k = kc + ((block * kvh + kh) * bs + p % bs) * d;
            float s = 0.f;
            constexpr int PER_LOAD = 16 / sizeof(T);
            for (int c = 0; c < d; c += PER_LOAD) {
                uint4 raw = *reinterpret_cast<const uint4*>(k + c);
                const T* kv = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int e = 0; e < PER_LOAD; ++e) s += qs[c + e] * to_f32(kv[e]);
            }
            score = s;
        }
        float tile_max = block_max(score);
        float new_max = fmaxf(running_max, tile_max);
        float prob = p < len ? __expf(score - new_max) : 0.f;
        float correction = __expf(running_max - new_max);
        running_sum = running_sum * correction + block_sum(prob);
        running_max = new_max;
        __syncthreads();
        probs[tid] = prob;
        __syncthreads();
        int count = min(TILE, len - start);
#pragma unroll
        for (int r = 0; r < PAIRS; ++r) {
            acc[r][0] *= correction;
            acc[r][1] *= correction;
        }
#pragma unroll 2
        for (int i = warp; i < count; i += WARPS) {
            int pi = start + i;
            size_t block = table[pi / bs];
            const T* v = vc + ((block * kvh + kh) * bs + pi % bs) * d;
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
    for (int j = tid; j < d; j += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += partial[w][j];
        out[((size_t)seq * h + head) * d + j] = from_f32<T>(running_sum > 0.f ? sum / running_sum : 0.f);
    }
}

#define PAGED(name, T)                                                                                     \
    extern "C" __global__ void write_kv_##name(T* cache, const T* values, const uint32_t* slots, int t,    \
                                               int kvh, int bs, int d, uint32_t num_slots) {              \
        write_kv<T>(cache, values, slots, t, kvh, bs, d, num_slots);                                      \
    }                                                                                                      \
    extern "C" __global__ void paged_decode_##name(const T* q, const T* kc, const T* vc,                  \
                                                   const uint32_t* tables, const uint32_t* lens, T* out,  \
                                                   int n, int h, int kvh, int d, int bs, int max_blocks,  \
                                                   int window) {                                          \
        paged_decode<T>(q, kc, vc, tables, lens, out, n, h, kvh, d, bs, max_blocks, window);              \
    }
PAGED(f32, float)
PAGED(bf16, __nv_bfloat16)
PAGED(f16, __half)
