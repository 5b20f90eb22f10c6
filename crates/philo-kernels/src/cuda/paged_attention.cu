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
// row is written; split, each of the row's `splits` blocks writes (m, total, acc) to
// `partial_out` [n, h, stride, d + 2] (stride: the grid's splits, at least `splits`) and the last
// block of a (sequence, head) to finish — counted in `counters` [n, h], which it resets for the
// next launch — combines them.
template <typename T>
__device__ void finish_decode(const float* acc, float m, float total, T* out, int h, int d, int splits,
                              int stride, float* partial_out, uint32_t* counters) {
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    T* o = out + ((size_t)seq * h + head) * d;
    if (splits == 1) {
        for (int j = tid; j < d; j += blockDim.x) o[j] = from_f32<T>(total > 0.f ? acc[j] / total : 0.f);
        return;
    }
    float* mine = partial_out + (((size_t)seq * h + head) * stride + blockIdx.z) * (d + 2);
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
    const float* all = partial_out + ((size_t)seq * h + head) * stride * (d + 2);
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

// Any head dim, and f32 (the general forward's `paged_decode_attention`; the decode step runs the
// tensor-core kernel below where it can): keys in tiles of 128, one thread scoring one key with
// 16-byte loads and an online softmax across tiles; for the weighted sum of V each warp takes
// every 4th key of the tile and its lanes cover the head's dimensions in pairs (128-byte
// coalesced rows). D > 0 fixes the head dimension at compile time (a score's key loads then issue
// together, and a tile's values within 32 KiB are copied into shared memory with cp.async as the
// tile starts, arriving while its scores are computed); D = 0 takes any d ≤ 256 (a multiple of
// 8).
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
    finish_decode<T>(partial[0], running_max, running_sum, out, h, d, splits, splits, partial_out, counters);
}

// The decode step's kernel (`*_tc`: bf16/f16, head dims 64, 96, 128, cache blocks a multiple of
// 16 positions), any row count and context. The key range is cut into stages of 16 positions
// (16-aligned, so a stage lies in one cache block: 16 contiguous keys and values) and each warp
// streams every WARPS-th stage through a ring of its own, RING − 1 stages in flight (cp.async; a
// __syncwarp, no block barrier, per stage). Scores and the weighted sum are tensor-core products
// with the query as row 0 of the A operand (the other 15 rows zero), the probabilities rounded to
// T as flash attention does: per 16 positions a warp issues 12 + 12 MMAs (head dim 96) where
// scalar lanes would issue hundreds of operations, so the kernel keeps up with the memory. Each
// warp keeps its own running softmax; the warps combine at the end. Shared rows are padded by 16
// bytes so that ldmatrix's 8 rows hit distinct banks. On the H200 it replaced a tiled kernel for
// up to 8 rows and a staged one (scalar, block-wide stages) beyond: one sequence at 16,384
// positions 170 → 251 tokens/s, at 128 positions 386 → 423; 64 rows 12,065 → 13,418.
constexpr int TC_KEYS = 16;

// RING: stages per warp. The deep ring (4, or 3 past head dim 96) gives two blocks per H200
// multiprocessor; the shallow one (2) four, for grids past one wave of the deep kernel: many
// rows (a verify step of 9, 16 sequences), where blocks rather than stages in flight keep the
// memory busy. decode.rs computes the same sizes.
template <typename T, int D, int RING_>
struct TcShape {
    static constexpr int LD = D + 16 / sizeof(T);     // padded row, elements
    static constexpr int STAGE = 2 * TC_KEYS * LD;  // keys then values, elements
    static constexpr int RING = RING_;
    static constexpr int SMEM = WARPS * RING * STAGE * sizeof(T);
};
template <int D> constexpr int tc_deep_ring() { return D <= 96 ? 4 : 3; }

template <typename T, int D, int RING_>
__device__ void paged_decode_tc(const T* q, const T* kc, const T* vc, const uint32_t* tables,
                                  const uint32_t* lens, T* out, int n, int h, int kvh, int bs, int max_blocks,
                                  int window, int splits, float* partial_out, uint32_t* counters) {
    using S = TcShape<T, D, RING_>;
    constexpr int LD = S::LD, RING = S::RING;
    constexpr int CHUNK = 16 / sizeof(T);          // elements per 16-byte copy
    constexpr int CH = D / CHUNK;                   // copies per row
    constexpr int PER_LANE = TC_KEYS * CH / 32;  // copies per lane per stage, keys and values each
    static_assert(D % 16 == 0 && TC_KEYS * CH % 32 == 0, "head dim");
    extern __shared__ __align__(16) unsigned char tc_smem[];
    pdl_allow_next();
    int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32, t = lane % 4;
    int kh = head / (h / kvh);
    T* ring = reinterpret_cast<T*>(tc_smem) + warp * RING * S::STAGE;
    // Lengths and block tables are the host's, written before the step: read before the wait.
    int len = lens[seq];
    int lo = len > window ? len - window : 0;
    int stage_lo = lo / TC_KEYS, stage_hi = (len + TC_KEYS - 1) / TC_KEYS;
    // Splits in use for this row: only as many as give every warp a full ring of stages (at
    // 128 positions one block, without the combining round trip through global memory), up to
    // the grid's; the others leave.
    constexpr int PER_BLOCK = WARPS * (RING - 1);
    int used = min(splits, max(1, (stage_hi - stage_lo + PER_BLOCK - 1) / PER_BLOCK));
    if ((int)blockIdx.z >= used) return;
    // The split's share of the stages, then the warp's: every WARPS-th from its own.
    int per = (stage_hi - stage_lo + used - 1) / used;
    int first = min(stage_hi, stage_lo + (int)blockIdx.z * per) + warp;
    int last = min(stage_hi, stage_lo + ((int)blockIdx.z + 1) * per);
    int mine = last > first ? (last - first + WARPS - 1) / WARPS : 0;
    const uint32_t* table = tables + (size_t)seq * max_blocks;
    // Positions from `fresh` on may be written by this step (each of the n rows writes its own
    // position, rows of one sequence consecutive ones): the stages loaded before the wait leave
    // them for after it. Earlier positions were written by earlier steps.
    int fresh = max(lo, len - n);
    // Copies the warp's i-th stage into ring slot i % RING, positions outside [lo, len)
    // zero-filled: ALL of them, all but the fresh ones (BEFORE the wait), or ONLY_FRESH (after
    // it; no two copies land on one address).
    enum { ALL, BEFORE, ONLY_FRESH };
    auto copy = [&](int i, int which) {
        if (i >= mine) return;
        int p0 = (first + i * WARPS) * TC_KEYS;
        size_t row0 = ((size_t)table[p0 / bs] * kvh + kh) * bs + p0 % bs;
        const T* ks = kc + row0 * D;
        const T* vs = vc + row0 * D;
        T* dk = ring + (i % RING) * S::STAGE;
        T* dv = dk + TC_KEYS * LD;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) {
            int j = lane + 32 * c, r = j / CH, col = (j % CH) * CHUNK;
            int p = p0 + r;
            bool is_fresh = p >= fresh && p < len;
            if ((which == BEFORE && is_fresh) || (which == ONLY_FRESH && !is_fresh)) continue;
            bool valid = p >= lo && p < len;
            cp_async16(dk + r * LD + col, ks + j * CHUNK, valid);
            cp_async16(dv + r * LD + col, vs + j * CHUNK, valid);
        }
    };
    // One commit group per stage, so that "all but the newest RING − 2" means stage i landed.
    auto load = [&](int i) {
        copy(i, ALL);
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < RING - 1; ++i) {
        copy(i, BEFORE);
        cp_async_commit();
    }
    pdl_wait_previous();
    // The fresh positions of those stages in one more group: a stage holding one waits for all.
#pragma unroll
    for (int i = 0; i < RING - 1; ++i) copy(i, ONLY_FRESH);
    cp_async_commit();
    int to_fresh = fresh / TC_KEYS - first;  // the warp's first stage that may hold one
    int fresh_stage = to_fresh <= 0 ? 0 : (to_fresh + WARPS - 1) / WARPS;
    // A fragments of the query: row 0 (lanes 0-3, dims 16k + 2t, +1 and 16k + 8 + 2t, +1), rows
    // 1-15 zero.
    uint32_t qa[D / 16][4];
    const T* qrow = q + ((size_t)head * n + seq) * D;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
        qa[k][0] = lane < 4 ? ld32(qrow + 16 * k + 2 * t) : 0u;
        qa[k][2] = lane < 4 ? ld32(qrow + 16 * k + 8 + 2 * t) : 0u;
        qa[k][1] = qa[k][3] = 0u;
    }
    float scale = rsqrtf((float)D);
    float running_max = -INFINITY, running_sum = 0.f;
    float acc[D / 8][4] = {};  // row 0 in lanes 0-3: dims 8j + 2t, +1
    for (int i = 0; i < mine; ++i) {
        if (i < RING - 1 && i >= fresh_stage) cp_async_wait<0>();
        else cp_async_wait<RING - 2>();
        __syncwarp();  // stage i landed for every lane; stage i − 1's slot read by every lane
        load(i + RING - 1);
        const T* ks = ring + (i % RING) * S::STAGE;
        const T* vs = ks + TC_KEYS * LD;
        float sc[2][4] = {};
        mma_a_xt<T, D, 2>(sc, qa, ks, LD);
        // Row 0's scores: keys 2t, 2t + 1 (tile 0) and 8 + 2t, 9 + 2t (tile 1).
        int p0 = (first + i * WARPS) * TC_KEYS;
        float x[4] = {sc[0][0], sc[0][1], sc[1][0], sc[1][1]};
        float tile_max = -INFINITY;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int p = p0 + (e / 2) * 8 + 2 * t + e % 2;
            x[e] = p >= lo && p < len ? x[e] * scale : -INFINITY;
            tile_max = fmaxf(tile_max, x[e]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
        float new_max = fmaxf(running_max, __shfl_sync(0xffffffff, tile_max, 0));
        if (new_max == -INFINITY) continue;  // nothing seen yet (uniform in the warp)
        float prob[4], tile_sum = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            prob[e] = __expf(x[e] - new_max);
            tile_sum += prob[e];
        }
        tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, 1);
        tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, 2);
        float correction = __expf(running_max - new_max);
        running_sum = running_sum * correction + __shfl_sync(0xffffffff, tile_sum, 0);
        running_max = new_max;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            acc[j][0] *= correction;
            acc[j][1] *= correction;
        }
        // The probabilities as row 0 of the A operand (keys 2t, 2t + 1 and 8 + 2t, 9 + 2t).
        uint32_t pa[4] = {lane < 4 ? Mma<T>::pack(prob[0], prob[1]) : 0u, 0u,
                          lane < 4 ? Mma<T>::pack(prob[2], prob[3]) : 0u, 0u};
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
            uint32_t b[4];
            load_b_trans_x4<T>(vs + 16 * j, LD, b);
            Mma<T>::run(acc[2 * j], pa, b[0], b[1]);
            Mma<T>::run(acc[2 * j + 1], pa, b[2], b[3]);
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every ring is done with: its memory takes the warps' results
    float* warp_acc = reinterpret_cast<float*>(tc_smem);  // [WARPS][D]
    float* warp_max = warp_acc + WARPS * D;
    float* warp_sum = warp_max + WARPS;
    if (lane < 4) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            warp_acc[warp * D + 8 * j + 2 * t] = acc[j][0];
            warp_acc[warp * D + 8 * j + 2 * t + 1] = acc[j][1];
        }
    }
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_sum[warp] = running_sum;
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
    // Each output dim is read and then written by the same thread: row 0 can take the sum.
    for (int j = tid; j < D; j += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += weight[w] * warp_acc[w * D + j];
        warp_acc[j] = sum;
    }
    __syncthreads();
    finish_decode<T>(warp_acc, m, total, out, h, D, used, splits, partial_out, counters);
}

#define PAGED_DECODE(fname, T, D)                                                                          \
    extern "C" __global__ void fname(const T* q, const T* kc, const T* vc, const uint32_t* tables,            \
                                     const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,      \
                                     int max_blocks, int window, int splits, float* partial,                  \
                                     uint32_t* counters) {                                                     \
        paged_decode_tiled<T, D>(q, kc, vc, tables, lens, out, n, h, kvh, d, bs, max_blocks, window, splits,  \
                                 partial, counters);                                                          \
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
#define PAGED_DECODE_TC_RING(fname, T, D, RING)                                                          \
    extern "C" __global__ void fname(const T* q, const T* kc, const T* vc, const uint32_t* tables,          \
                                     const uint32_t* lens, T* out, int n, int h, int kvh, int d, int bs,      \
                                     int max_blocks, int window, int splits, float* partial,                  \
                                     uint32_t* counters) {                                                     \
        paged_decode_tc<T, D, RING>(q, kc, vc, tables, lens, out, n, h, kvh, bs, max_blocks, window, splits, \
                                    partial, counters);                                                       \
    }
#define PAGED_DECODE_TC(fname, T, D)                                   \
    PAGED_DECODE_TC_RING(fname##_tc, T, D, tc_deep_ring<D>())          \
    PAGED_DECODE_TC_RING(fname##_tc_shallow, T, D, 2)
#define PAGED_TC(name, T)                                                                                \
    PAGED_DECODE_TC(paged_decode_##name##_d64, T, 64)                                                    \
    PAGED_DECODE_TC(paged_decode_##name##_d96, T, 96)                                                    \
    PAGED_DECODE_TC(paged_decode_##name##_d128, T, 128)
PAGED(f32, float)
PAGED(bf16, __nv_bfloat16)
PAGED(f16, __half)
PAGED_TC(bf16, __nv_bfloat16)
PAGED_TC(f16, __half)
