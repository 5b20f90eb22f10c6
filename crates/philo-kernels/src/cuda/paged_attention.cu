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

// Every decode kernel runs one block of 128 threads (4 warps) per (sequence, head, split): a
// sequence's keys may be split over `splits` blocks (grid.z), as flash-decoding does, so that a
// few sequences still fill the GPU. q [h, n, d], out [n, h, d].
constexpr int WARPS = 4;

// Two consecutive elements (p 4- or 8-byte aligned) as floats, in one load.
__device__ __forceinline__ float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 load_pair(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }

// The keys [first, end) a block attends to: the window's, or the block's share of them.
struct KeyRange {
    int first, end;
};
__device__ __forceinline__ KeyRange key_range(int len, int window, int splits) {
    int first = len > window ? len - window : 0;
    int end = len;
    if (splits > 1) {
        int per = (len - first + splits - 1) / splits;
        first = min(len, first + (int)blockIdx.z * per);
        end = min(len, first + per);
    }
    return {first, end};
}

// The end of every decode block, called by all its threads: `acc` [d] (shared memory) is its
// unnormalised output relative to the score maximum `m`, `total` the softmax sum. Unsplit, the
// row is written; split, each block writes (m, total, acc) to `partial_out` [n, h, splits, d + 2]
// and the last block of a (sequence, head) to finish — counted in `counters` [n, h], which it
// resets for the next launch — combines them.
template <typename T>
__device__ void finish_decode(const float* acc, float m, float total, T* out, int h, int d, int splits,
                              float* partial_out, uint32_t* counters) {
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    T* o = out + ((size_t)seq * h + head) * d;
    if (splits == 1) {
        for (int j = tid; j < d; j += blockDim.x) o[j] = from_f32<T>(total > 0.f ? acc[j] / total : 0.f);
        return;
    }
    float* mine = partial_out + (((size_t)seq * h + head) * splits + blockIdx.z) * (d + 2);
    for (int j = tid; j < d; j += blockDim.x) mine[2 + j] = acc[j];
    if (tid == 0) {
        mine[0] = m;
        mine[1] = total;
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
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s)
        if (all[s * (d + 2) + 1] > 0.f) mx = fmaxf(mx, all[s * (d + 2)]);
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) {
        float part = all[s * (d + 2) + 1];
        if (part > 0.f) sum += part * __expf(all[s * (d + 2)] - mx);
    }
    for (int j = tid; j < d; j += blockDim.x) {
        float acc_j = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float* ps = all + s * (d + 2);
            if (ps[1] > 0.f) acc_j += ps[2 + j] * __expf(ps[0] - mx);
        }
        o[j] = from_f32<T>(sum > 0.f ? acc_j / sum : 0.f);
    }
}

// Many rows (`*_many`: the serving engine's steps of more than 8), head dims 64, 96, 128. Keys and
// values stream through shared memory in stages of 16 positions, `STAGES − 1` of them in flight (cp.async) while one is computed, so the
// block keeps loads outstanding for its whole life instead of one round trip per tile. Each warp
// takes 4 positions of a stage (8 lanes per key's score) and keeps its own running max, sum and
// output: no block-wide reduction per stage, only the stage's barrier; the warps combine at the end.
// At 64 rows of ~190 positions (bench decode) attention took 2.31 ms a step against 2.83 ms tiled.
constexpr int STAGE_KEYS = 16;

template <typename T, int D>
__device__ void paged_decode_staged(const T* q, const T* kc, const T* vc, const uint32_t* tables,
                                    const uint32_t* lens, T* out, int n, int h, int kvh, int bs, int max_blocks,
                                    int window, int splits, float* partial_out, uint32_t* counters) {
    constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte copy
    constexpr int STAGES = sizeof(T) == 4 ? 2 : 4;
    constexpr int KEY_LANES = 32 * WARPS / STAGE_KEYS;  // lanes per key's score
    constexpr int KEYS_PER_WARP = 32 / KEY_LANES;
    constexpr int SCORE_PAIRS = D / 2 / KEY_LANES;  // pairs of dims per lane in a score
    constexpr int OUT_PAIRS = (D / 2 + 31) / 32;    // pairs of output dims per lane
    static_assert(D % (2 * KEY_LANES) == 0 && D % CHUNK == 0, "head dim");
    __shared__ __align__(16) T keys[STAGES][STAGE_KEYS * D];
    __shared__ __align__(16) T values[STAGES][STAGE_KEYS * D];
    __shared__ float qs[D];
    __shared__ float warp_max[WARPS], warp_sum[WARPS];
    __shared__ float warp_acc[WARPS][D];
    pdl_allow_next();
    pdl_wait_previous();
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32;
    int kh = head / (h / kvh);
    KeyRange range = key_range(lens[seq], window, splits);
    int first = range.first, end = range.end;
    int stages_used = end > first ? (end - first + STAGE_KEYS - 1) / STAGE_KEYS : 0;
    const uint32_t* table = tables + (size_t)seq * max_blocks;
    // The block's cache blocks are read once into shared memory (up to TABLE_CACHE of them, the
    // rest from the table), so that no stage's copies wait on a load of its block ids.
    constexpr int TABLE_CACHE = 128;
    __shared__ uint32_t block_ids[TABLE_CACHE];
    int first_block = first / bs;
    int named = stages_used > 0 ? (end - 1) / bs - first_block + 1 : 0;
    for (int j = tid; j < min(named, TABLE_CACHE); j += blockDim.x) block_ids[j] = table[first_block + j];
    for (int j = tid; j < D; j += blockDim.x) qs[j] = to_f32(q[((size_t)head * n + seq) * D + j]) * rsqrtf((float)D);
    __syncthreads();
    auto block_of = [&](int p) {
        int j = p / bs - first_block;
        return j < TABLE_CACHE ? block_ids[j] : table[p / bs];
    };
    // Copies stage `s` of the keys and values (positions past `end` zero-filled); always commits
    // a group, so that waiting for "all but the newest STAGES − 2" means stage s has landed.
    auto load_stage = [&](int s) {
        if (s < stages_used) {
            constexpr int ROW_CHUNKS = D / CHUNK, PER = STAGE_KEYS * ROW_CHUNKS;
            int base = first + s * STAGE_KEYS;
            for (int j = tid; j < 2 * PER; j += blockDim.x) {
                int r = j % PER, i = r / ROW_CHUNKS, c = r % ROW_CHUNKS;
                int p = base + i;
                bool valid = p < end;
                int at = valid ? p : base;
                size_t row = ((size_t)block_of(at) * kvh + kh) * bs + at % bs;
                bool is_key = j < PER;
                const T* src = (is_key ? kc : vc) + row * D + c * CHUNK;
                T* dst = (is_key ? keys[s % STAGES] : values[s % STAGES]) + i * D + c * CHUNK;
                cp_async16(dst, src, valid);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) load_stage(s);
    int key = lane / KEY_LANES, sub = lane % KEY_LANES;
    float2 qr[SCORE_PAIRS];
#pragma unroll
    for (int i = 0; i < SCORE_PAIRS; ++i) qr[i] = make_float2(qs[2 * (sub + KEY_LANES * i)], qs[2 * (sub + KEY_LANES * i) + 1]);

    float running_max = -INFINITY, running_sum = 0.f;
    float acc[OUT_PAIRS][2] = {};
    for (int s = 0; s < stages_used; ++s) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage s is visible to all; stage s − 1 is read by all
        load_stage(s + STAGES - 1);
        const T* ks = keys[s % STAGES];
        const T* vs = values[s % STAGES];
        int i = warp * KEYS_PER_WARP + key;
        int p = first + s * STAGE_KEYS + i;
        float score = 0.f;
#pragma unroll
        for (int c = 0; c < SCORE_PAIRS; ++c) {
            float2 k = load_pair(ks + i * D + 2 * (sub + KEY_LANES * c));
            score += qr[c].x * k.x + qr[c].y * k.y;
        }
#pragma unroll
        for (int o = KEY_LANES / 2; o > 0; o >>= 1) score += __shfl_xor_sync(0xffffffff, score, o);
        if (p >= end) score = -INFINITY;
        float tile_max = score;
#pragma unroll
        for (int o = KEY_LANES; o < 32; o <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, o));
        float new_max = fmaxf(running_max, tile_max);
        if (new_max == -INFINITY) continue;  // the warp has seen no key yet (uniform in the warp)
        float prob = p < end ? __expf(score - new_max) : 0.f;
        float correction = __expf(running_max - new_max);
        float probs = prob;
#pragma unroll
        for (int o = KEY_LANES; o < 32; o <<= 1) probs += __shfl_xor_sync(0xffffffff, probs, o);
        running_sum = running_sum * correction + probs;
        running_max = new_max;
#pragma unroll
        for (int r = 0; r < OUT_PAIRS; ++r) {
            acc[r][0] *= correction;
            acc[r][1] *= correction;
        }
#pragma unroll
        for (int kk = 0; kk < KEYS_PER_WARP; ++kk) {
            float w = __shfl_sync(0xffffffff, prob, kk * KEY_LANES);
            const T* v = vs + (warp * KEYS_PER_WARP + kk) * D;
#pragma unroll
            for (int r = 0; r < OUT_PAIRS; ++r) {
                int j = 2 * (lane + 32 * r);
                if (j < D) {
                    float2 pair = load_pair(v + j);
                    acc[r][0] += w * pair.x;
                    acc[r][1] += w * pair.y;
                }
            }
        }
    }
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_sum[warp] = running_sum;
    }
#pragma unroll
    for (int r = 0; r < OUT_PAIRS; ++r) {
        int j = 2 * (lane + 32 * r);
        if (j < D) {
            warp_acc[warp][j] = acc[r][0];
            warp_acc[warp][j + 1] = acc[r][1];
        }
    }
    __syncthreads();
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w)
        if (warp_sum[w] > 0.f) m = fmaxf(m, warp_max[w]);
    float total = 0.f;
    float weight[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        weight[w] = warp_sum[w] > 0.f ? __expf(warp_max[w] - m) : 0.f;
        total += warp_sum[w] * weight[w];
    }
    // Each output dim is read and then written by the same thread: warp_acc[0] can take the sum.
    for (int j = tid; j < D; j += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += weight[w] * warp_acc[w][j];
        warp_acc[0][j] = sum;
    }
    __syncthreads();
    finish_decode<T>(warp_acc[0], m, total, out, h, D, splits, partial_out, counters);
}

// One sequence (or a few) at a time: keys in tiles of 128, one thread scoring one key with
// 16-byte loads and an online softmax across tiles; for the weighted sum of V each warp takes
// every 4th key of the tile and its lanes cover the head's dimensions in pairs (128-byte
// coalesced rows). D > 0 fixes the head dimension at compile time (a score's key loads then issue
// together, and a tile's values within 32 KiB are copied into shared memory with cp.async as the
// tile starts, arriving while its scores are computed); D = 0 takes any d ≤ 256 (a multiple of
// 8). At up to 8 rows this is faster than the staged kernel (one sequence, bf16: 381 against
// 366 tokens/s on the H200), whose copies and barriers cost latency that few blocks cannot hide.
constexpr int TILE = 128;
// Pairs of output dims per lane: d ≤ 2 * 32 * PAIRS = 256.
constexpr int PAIRS = 4;

template <typename T, int D>
__device__ void paged_decode_tiled(const T* q, const T* kc, const T* vc, const uint32_t* tables,
                                   const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,
                                   int max_blocks, int window, int splits, float* partial_out,
                                   uint32_t* counters) {
    __shared__ float qs[256];
    __shared__ float probs[TILE];
    __shared__ float partial[WARPS][256];
    constexpr bool PREFETCH = D > 0 && D * sizeof(T) <= 256;
    constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte copy
    __shared__ __align__(16) T vtile[PREFETCH ? TILE * D : 1];
    pdl_allow_next();
    pdl_wait_previous();
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32;
    int kh = head / (h / kvh);
    KeyRange range = key_range(lens[seq], window, splits);
    int first = range.first, end = range.end;
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
    // The warps share the running max: their sums add; partial[0] takes them (same thread).
    for (int j = tid; j < d; j += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += partial[w][j];
        partial[0][j] = sum;
    }
    __syncthreads();
    finish_decode<T>(partial[0], running_max, running_sum, out, h, d, splits, partial_out, counters);
}

// Both kinds take the same arguments (`d` unused by the staged one, which fixes it).
#define PAGED_DECODE(fname, T, D)                                                                          \
    extern "C" __global__ void fname(const T* q, const T* kc, const T* vc, const uint32_t* tables,            \
                                     const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,      \
                                     int max_blocks, int window, int splits, float* partial,                  \
                                     uint32_t* counters) {                                                     \
        paged_decode_tiled<T, D>(q, kc, vc, tables, lens, out, n, h, kvh, d, bs, max_blocks, window, splits,  \
                                 partial, counters);                                                          \
    }                                                                                                          \
    extern "C" __global__ void fname##_many(const T* q, const T* kc, const T* vc, const uint32_t* tables,     \
                                            const uint32_t* lens, T* out, int n, int h, int kvh, int d,       \
                                            int bs, int max_blocks, int window, int splits, float* partial,   \
                                            uint32_t* counters) {                                              \
        paged_decode_staged<T, D>(q, kc, vc, tables, lens, out, n, h, kvh, bs, max_blocks, window, splits,     \
                                  partial, counters);                                                          \
    }
#define PAGED_DECODE_ANY(fname, T)                                                                         \
    extern "C" __global__ void fname(const T* q, const T* kc, const T* vc, const uint32_t* tables,            \
                                     const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,      \
                                     int max_blocks, int window, int splits, float* partial,                  \
                                     uint32_t* counters) {                                                     \
        paged_decode_tiled<T, 0>(q, kc, vc, tables, lens, out, n, h, kvh, d, bs, max_blocks, window, splits,  \
                                 partial, counters);                                                          \
    }
#define PAGED(name, T)                                                                                     \
    extern "C" __global__ void write_kv_##name(T* cache, const T* values, const uint32_t* slots, int t,    \
                                               int kvh, int bs, int d, uint32_t num_slots) {              \
        write_kv<T>(cache, values, slots, t, kvh, bs, d, num_slots);                                      \
    }                                                                                                      \
    PAGED_DECODE_ANY(paged_decode_##name, T)                                                               \
    PAGED_DECODE(paged_decode_##name##_d64, T, 64)                                                         \
    PAGED_DECODE(paged_decode_##name##_d96, T, 96)                                                         \
    PAGED_DECODE(paged_decode_##name##_d128, T, 128)
PAGED(f32, float)
PAGED(bf16, __nv_bfloat16)
PAGED(f16, __half)
