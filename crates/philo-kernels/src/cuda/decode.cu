// The kernels of the graph-captured decode step (reference: src/decode.rs). A step for a few
// rows (one token each of up to MAXM sequences) is: embed → per layer [norm+QKV GEMV → RoPE and
// KV write → paged split-K attention → O GEMV + residual → norm+gate/up GEMV → SwiGLU+down GEMV
// + residual] → norm+LM head GEMV → argmax. Per-step state (token ids, sequence lengths, block
// tables) lives in device buffers the kernels read, so one captured graph replays every step.
#include "decode_common.cuh"

// y[r, row] = xin[r] · W[row]ᵀ for m ≤ MAXM input rows, W [n, k] in format FMT. Threads form
// groups of `tpg` (a multiple of 32); a group computes R consecutive output rows at a time, its
// threads walking the rows' 16-byte chunks, and the block's groups stride over all row groups
// (a grid of about what fits on the GPU at once), so each block stages its input once. Loads
// run one batch ahead of the arithmetic, the first batch before the staging. M (1, 2, 4 or 8 ≥ m)
// sizes the accumulators. The epilogue writes T (optionally adding `residual` in place, as
// `x + y` rounds), or f32 rounded through T (logits).
template <typename T, int FMT, int M>
__device__ void gemv_fused(const T* x, const T* g, float eps, int mode, int m, int n, int k,
                           const void* w, Scales sc, int tpg, T* out, float* out_f32,
                           const T* residual) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* xs = reinterpret_cast<T*>(smem);
    __shared__ float nf4[16];
    __shared__ float red[8][R * MAXM];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4[threadIdx.x];

    constexpr int E = Chunk<T, FMT>::E;
    const int groups_per_block = blockDim.x / tpg;
    const int gi = threadIdx.x / tpg, t = threadIdx.x % tpg;
    const int chunks = k / E;
    const int row_groups = (n + R - 1) / R;
    const int stride = gridDim.x * groups_per_block;
    const size_t row_bytes = (size_t)k * 16 / E;
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    // A thread's next loads (of a row group and chunk), issued ahead of their use.
    uint4 wv[R];
    auto load = [&](int grp_, int c_) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            int row = grp_ * R + i;
            if (grp_ < row_groups && c_ < chunks && row < n)
                wv[i] = load_streaming(wb + (size_t)row * row_bytes + (size_t)c_ * 16);
        }
    };
    // The first weights stream in while the previous kernel finishes.
    load(blockIdx.x * groups_per_block + gi, t);
    pdl_allow_next();
    pdl_wait_previous();
    // One row's staging takes fewer registers than several rows' (kernel-wide, in the loop too).
    if (M == 1) stage_row<T>(x, g, eps, mode, k, xs);
    else stage_rows<T>(x, g, eps, mode, m, k, xs);

    // Every thread runs the same number of rounds (the block synchronises in each).
    for (int base = blockIdx.x * groups_per_block; base < row_groups; base += stride) {
        const int grp = base + gi, row0 = grp * R;
        float acc[R][M];
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int r = 0; r < M; ++r) acc[i][r] = 0.f;
        for (int c0 = t; c0 < chunks; c0 += tpg) {
            uint4 cur[R];
#pragma unroll
            for (int i = 0; i < R; ++i) cur[i] = wv[i];
            // Next loads: the next chunk, or the first chunk of the next row group.
            if (c0 + tpg < chunks) {
                load(grp, c0 + tpg);
            } else {
                load(grp + stride, t);
            }
            if (row0 >= n) continue;
            int col = c0 * E;
            float part[R][M];
#pragma unroll
            for (int i = 0; i < R; ++i)
#pragma unroll
                for (int r = 0; r < M; ++r) part[i][r] = 0.f;
            // Eight columns at a time: their inputs for every x row, then every output row.
#pragma unroll
            for (int q = 0; q < E / 8; ++q) {
                float xf[M][8];
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    if (r >= m) break;
                    uint4 raw = *reinterpret_cast<const uint4*>(xs + r * (k + XPAD) + col + q * 8);
                    const T* tv = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int j = 0; j < 8; ++j) xf[r][j] = to_f32(tv[j]);
                }
#pragma unroll
                for (int i = 0; i < R; ++i) {
                    float wf[8];
                    unpack8<T, FMT>(cur[i], q, wf, nf4);
#pragma unroll
                    for (int r = 0; r < M; ++r) {
                        if (r >= m) break;
#pragma unroll
                        for (int j = 0; j < 8; ++j) part[i][r] += wf[j] * xf[r][j];
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < R; ++i) {
                if (row0 + i >= n) break;
                float scale = chunk_scale<FMT>(sc, row0 + i, col, k);
#pragma unroll
                for (int r = 0; r < M; ++r) acc[i][r] += FMT == F_INT4 || FMT == F_NF4 ? part[i][r] * scale : part[i][r];
            }
        }
        // Sum over the group: lanes by shuffle, then the group's warps through shared memory.
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int r = 0; r < M; ++r) {
                float v = acc[i][r];
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
                if (lane == 0) red[warp][i * MAXM + r] = v;
            }
        __syncthreads();
        int warps_per_group = tpg / 32;
        if (t < R * m) {
            int i = t / m, r = t % m, row = row0 + i;
            if (row < n) {
                float v = 0.f;
                for (int wi = 0; wi < warps_per_group; ++wi) v += red[gi * warps_per_group + wi][i * MAXM + r];
                store_output<T, FMT>(v, r, row, n, sc.s, out, out_f32, residual);
            }
        }
        __syncthreads();
    }
}

#define GEMV_FUSED_M(fname, T, FMT, M)                                                                 \
    extern "C" __global__ void gemv_fused_##fname##_m##M(                                               \
        const T* x, const T* g, float eps, int mode, int m, int n, int k, const void* w, const float* s, \
        int group, const uint8_t* q2, const float* code2, const float* absmax2, float offset2,          \
        int block2, int tpg, T* out, float* out_f32, const T* residual) {                              \
        Scales sc{s, group, q2, code2, absmax2, offset2, block2};                                       \
        gemv_fused<T, FMT, M>(x, g, eps, mode, m, n, k, w, sc, tpg, out, out_f32, residual);            \
    }
#define GEMV_FUSED(fname, T, FMT) \
    GEMV_FUSED_M(fname, T, FMT, 1) GEMV_FUSED_M(fname, T, FMT, 2) GEMV_FUSED_M(fname, T, FMT, 4) GEMV_FUSED_M(fname, T, FMT, 8)
GEMV_FUSED(dense_bf16, __nv_bfloat16, F_DENSE)
GEMV_FUSED(int8_bf16, __nv_bfloat16, F_INT8)
GEMV_FUSED(int4_bf16, __nv_bfloat16, F_INT4)
GEMV_FUSED(nf4_bf16, __nv_bfloat16, F_NF4)
GEMV_FUSED(dense_f16, __half, F_DENSE)
GEMV_FUSED(int8_f16, __half, F_INT8)
GEMV_FUSED(int4_f16, __half, F_INT4)
GEMV_FUSED(nf4_f16, __half, F_NF4)

// ---------------------------------------------------------------------------------------------
// The same GEMV on tensor cores, for dense, INT8, INT4 and NF4 weights (n any, k a multiple of
// 32·E; INT4 in groups of 128; NF4 through a table of byte pairs, see fill_nf4_pairs). A
// warp's tile is 8 weight rows × 512 bytes: cp.async copies it with one instruction per row
// (512 contiguous bytes, what DRAM streams best), S tiles in flight per warp, storing chunk c
// of row r at c ^ r so that ldmatrix reads without bank conflicts.
// ldmatrix turns four chunks of the 8 rows into B fragments of mma.m16n8k16 (column g = row
// g); the input rows are the A operand (rows 0..m−1, the rest zero). k may be permuted freely
// as long as x and W agree: each lane's weight pairs stay in its own fragment slots, and the
// input is staged in the matching order (INT4 nibbles unpack as pairs (0,4), (1,5), …).
// Dequantising is then a few integer operations per pair, with no float conversion per weight:
// the FMA path's per-weight work is what held INT4 and INT8 below the bandwidth.
// Blocks own whole groups of 8 rows (balanced); the block's warps split its tiles evenly and
// add their row sums into shared memory; the epilogue is gemv_fused's. With `glu`, W is the
// MLP's [gate | up] (n = 2·half) and the output is SwiGLU(gate, up), [m, half], exactly as
// storing gate and up then staging them with IN_SWIGLU rounds: a block owns row groups of the
// gate half and the same groups of the up half, so its epilogue holds both. The down
// projection then stages plain rows instead of computing every row's SwiGLU in every block.


template <typename T, int FMT, bool ROWS>
__device__ void gemv_tc(const T* x, const T* g, float eps, int mode, int m, int n, int k,
                        const void* w, const Scales sc, int stages, T* out, float* out_f32,
                        const T* residual, int glu) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ uint32_t nf4_pairs[FMT == F_NF4 ? NF4_PAIR_WORDS : 1];
    const float* scales = sc.s;
    constexpr int E = Chunk<T, FMT>::E, TILE = tc_tile_bytes<FMT>();
    const int warps = blockDim.x / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const int tiles_per_group = k / (E * 32);
    // Row groups shared out among the blocks (with glu, those of the gate half).
    const int groups = glu ? n / 16 : (n + 7) / 8;
    const int per = groups / gridDim.x, extra = groups % gridDim.x;
    const int rg0 = blockIdx.x * per + min((int)blockIdx.x, extra);
    const int nrg = per + ((int)blockIdx.x < extra ? 1 : 0);
    // The block's groups: its own nrg, and with glu the up half's nrg after them.
    const int owned = glu ? 2 * nrg : nrg;
    auto group_row = [&](int v) { return (rg0 + v + (v >= nrg ? groups - nrg : 0)) * 8; };
    unsigned char* tiles = smem + (size_t)warp * stages * TILE;
    T* xs = reinterpret_cast<T*>(smem + (size_t)warps * stages * TILE);
    float* red = reinterpret_cast<float*>(smem + (size_t)warps * stages * TILE + (size_t)m * (k + XPAD) * sizeof(T));
    const int total = owned * tiles_per_group;
    const int i0 = warp * total / warps, i1 = (warp + 1) * total / warps;
    const size_t row_bytes = (size_t)k * 16 / E;
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);

    // The copy cursor runs stages − 1 tiles ahead of the compute cursor.
    int f_rg = i0 / tiles_per_group, f_kt = i0 % tiles_per_group, fi = i0, fstage = 0;
    auto issue = [&]() {
        if (fi < i1) {
            unsigned char* dst = tiles + fstage * TILE;
            int row0 = group_row(f_rg);
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                bool ok = row0 + r < n;
                const unsigned char* src = wb + (ok ? (size_t)(row0 + r) * row_bytes + (size_t)f_kt * 512 + lane * 16 : 0);
                cp_async16(dst + r * 512 + ((lane ^ r) * 16), src, ok);
            }
            tc_copy_scales<FMT>(dst, sc, row0, n, k, f_kt, lane);
        }
        cp_async_commit();
        ++fi;
        fstage = fstage + 1 == stages ? 0 : fstage + 1;
        if (++f_kt == tiles_per_group) {
            f_kt = 0;
            ++f_rg;
        }
    };
    // The first tiles stream in while the previous kernel finishes.
    for (int s = 0; s < stages - 1; ++s) issue();
    for (int i = threadIdx.x; i < owned * 8 * MAXM; i += blockDim.x) red[i] = 0.f;
    if (FMT == F_NF4) fill_nf4_pairs<T>(nf4_pairs);
    pdl_allow_next();
    pdl_wait_previous();
    if (ROWS) stage_rows<T, FMT == F_INT4>(x, g, eps, mode, m, k, xs);
    else stage_row<T, FMT == F_INT4>(x, g, eps, mode, k, xs);

    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int c_rg = i0 / tiles_per_group, c_kt = i0 % tiles_per_group, cstage = 0;
    const T* xrow = xs + (size_t)(gq < m ? gq : 0) * (k + XPAD);
    // Lane (g, t) holds the sums of rows 2t and 2t + 1 of the group for input row g.
    auto flush = [&]() {
        if (gq < m) {
            atomicAdd(&red[(c_rg * 8 + 2 * t) * MAXM + gq], acc[0]);
            atomicAdd(&red[(c_rg * 8 + 2 * t + 1) * MAXM + gq], acc[1]);
        }
        acc[0] = acc[1] = 0.f;
    };
    for (int i = i0; i < i1; ++i) {
        __syncwarp();  // every lane is done with the stage the next copy overwrites
        issue();
        if (stages == 3) cp_async_wait<2>();
        else cp_async_wait<1>();
        __syncwarp();
        const unsigned char* tile = tiles + cstage * TILE;
        const Nf4Tile nf = nf4_tile<FMT>(sc, group_row(c_rg), n, k, c_kt, t);
        tc_tile_product<T, FMT>(tile, xrow, gq < m, c_kt * 32 * E, nf, nf4_pairs, acc);
        cstage = cstage + 1 == stages ? 0 : cstage + 1;
        if (++c_kt == tiles_per_group) {
            flush();
            c_kt = 0;
            ++c_rg;
        }
    }
    if (c_kt != 0) flush();
    cp_async_wait<0>();
    __syncthreads();
    if (glu) {
        const int half = n / 2;
        for (int tt = threadIdx.x; tt < nrg * 8 * m; tt += blockDim.x) {
            int i = tt / m, rr = tt % m, row = rg0 * 8 + i;
            float gate = red[i * MAXM + rr], up = red[(nrg * 8 + i) * MAXM + rr];
            if (FMT == F_INT8) {
                gate = gate * scales[row] * (1.f / 127.f);
                up = up * scales[row + half] * (1.f / 127.f);
            }
            // As stored (T), then as stage_vector's IN_SWIGLU transforms them.
            gate = round_to<T>(gate);
            up = round_to<T>(up);
            out[(size_t)rr * half + row] = from_f32<T>(round_to<T>(gate / (1.f + __expf(-gate))) * up);
        }
        return;
    }
    for (int tt = threadIdx.x; tt < nrg * 8 * m; tt += blockDim.x) {
        int i = tt / m, rr = tt % m, row = rg0 * 8 + i;
        if (row >= n) continue;
        store_output<T, FMT>(red[i * MAXM + rr], rr, row, n, scales, out, out_f32, residual);
    }
}

// Two instances: one row, and several. Several rows' staging takes more registers (108-128 in
// all, against 64-80 for one row), which the one-row kernel then does not carry.
#define GEMV_TC_ROWS(fname, T, FMT, ROWS, suffix)                                                          \
    extern "C" __global__ void __launch_bounds__(256) gemv_tc_##fname##suffix(                             \
        const T* x, const T* g, float eps, int mode, int m, int n, int k, const void* w,                   \
        const float* scales, int stages, T* out, float* out_f32, const T* residual, int glu,               \
        const uint8_t* q2, const float* code2, const float* absmax2, float offset2, int block2) {          \
        const Scales sc{scales, 128, q2, code2, absmax2, offset2, block2};                                 \
        gemv_tc<T, FMT, ROWS>(x, g, eps, mode, m, n, k, w, sc, stages, out, out_f32, residual, glu);       \
    }
#define GEMV_TC(fname, T, FMT) GEMV_TC_ROWS(fname, T, FMT, false, ) GEMV_TC_ROWS(fname, T, FMT, true, _rows)
GEMV_TC(dense_bf16, __nv_bfloat16, F_DENSE)
GEMV_TC(int8_bf16, __nv_bfloat16, F_INT8)
GEMV_TC(int4_bf16, __nv_bfloat16, F_INT4)
GEMV_TC(nf4_bf16, __nv_bfloat16, F_NF4)
GEMV_TC(dense_f16, __half, F_DENSE)
GEMV_TC(int8_f16, __half, F_INT8)
GEMV_TC(int4_f16, __half, F_INT4)
GEMV_TC(nf4_f16, __half, F_NF4)

// x[b] = embed[tokens[b]]; one block per row.
template <typename T>
__device__ void embed_rows(const T* table, const uint32_t* tokens, T* x, int hidden) {
    pdl_allow_next();
    pdl_wait_previous();
    const T* src = table + (size_t)tokens[blockIdx.x] * hidden;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) x[(size_t)blockIdx.x * hidden + j] = src[j];
}

// Row r of x transformed as the GEMV stages its input (plain, RMSNorm, SwiGLU), written to
// out [m, k]: the input of a cuBLAS GEMM when more rows decode together than the GEMV takes.
// One block per row.
template <typename T>
__device__ void transform_rows(const T* x, const T* g, float eps, int mode, int k, T* out) {
    pdl_allow_next();
    pdl_wait_previous();
    const size_t r = blockIdx.x;
    stage_row<T>(x + r * (mode == IN_SWIGLU ? 2 * k : k), g, eps, mode, k, out + r * k);
}

// One LoRA adapter's weights at one (layer, projection): A [rank, in] and scale·B [out, rank] in
// the compute dtype. rank 0: the adapter leaves this projection alone.
struct LoraEntry {
    const void* a;
    const void* b;
    unsigned long long rank;
};

// Rows without an adapter in the per-row adapter indices.
constexpr uint32_t NO_ADAPTER = 0xFFFFFFFFu;

// Batched LoRA (as Punica's BGMV shrink and expand) on tensor cores. Rows go in tiles of 16 (the
// rows of mma.m16n8k16's A); a tile's rows may name different adapters (the decode step sorts
// its rows by adapter, so mostly one or two): each pass takes one adapter and masks the tile's
// other rows out. Within each 32-wide slice of the reduced dimension lane (g, t) holds elements
// 8t .. 8t + 7 of both operands, one 16-byte load each: a permutation of the reduction order,
// the same on both sides. Adapter weights (and the per-row adapter indices, written by the host
// before the step) load before the wait for the previous kernel; activations after it.
constexpr int LORA_ROWS = 16;
// Shrink: each warp reduces 64 inputs (two slices), a block 256, for up to 64 ranks a pass.
constexpr int LORA_SHRINK_WARP_K = 64, LORA_SHRINK_BLOCK_K = 4 * LORA_SHRINK_WARP_K, LORA_SHRINK_RANKS = 64;
// Expand: each warp writes NT n8 tiles of columns, a block four warps' (NT 2 where that gives
// too few blocks to fill the GPU, else 8: a tile of t is read by fewer warps).

// Lane i < 16 gets the adapter of the tile's row i (`mine`); returns the rows with one, as bits.
__device__ __forceinline__ uint32_t lora_tile_rows(const uint32_t* adapter, int row0, int m, uint32_t& mine) {
    const int lane = threadIdx.x % 32;
    mine = (lane < LORA_ROWS && row0 + lane < m) ? adapter[row0 + lane] : NO_ADAPTER;
    return __ballot_sync(0xffffffffu, mine != NO_ADAPTER) & 0xFFFFu;
}

// The adapter of the first pending row (into `a`) and the pending rows that name it.
__device__ __forceinline__ uint32_t lora_next_adapter(uint32_t pending, uint32_t mine, uint32_t& a) {
    a = __shfl_sync(0xffffffffu, mine, __ffs(pending) - 1);
    return __ballot_sync(0xffffffffu, mine == a) & pending;
}

// Eight consecutive elements at p as one 16-byte word: a vector load where all `valid` (≥ 8)
// and p is 16-byte aligned, else element by element, zero from element `valid` on.
template <typename T>
__device__ __forceinline__ uint4 load8_or_zero(const T* p, int valid, bool aligned) {
    if (valid >= 8 && aligned) return *reinterpret_cast<const uint4*>(p);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    unsigned short* dst = reinterpret_cast<unsigned short*>(&v);
    const unsigned short* src = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
    for (int i = 0; i < 8; ++i)
        if (i < valid) dst[i] = src[i];
    return v;
}

// First product: t[r, j] += in(x[r]) · A[j] (f32, over this block's 256 inputs) for each row r
// with an adapter (entries[adapter[r]]) and j < its rank, where in is the projection's input
// transform (mode, g, eps as the GEMV's: x [m, k], or [m, 2k] for SwiGLU), applied here so that
// the GEMV beside it stages its own input and no transform kernel runs before either; t [m, max_rank] must be zero before the
// first block adds (the expand rounds the sums to T). Grid (row tiles, input slices of 256).
// Also zeroes t_next [m, max_rank]: the next projection's t, which the step's previous expand
// read (finished: every kernel before this one has, once it has waited).
template <typename T>
__device__ void lora_shrink(const T* x, const T* gw, float eps, int mode, int m, int k, const uint32_t* adapter,
                            const LoraEntry* entries, float* t, float* t_next, int max_rank) {
    __shared__ float red[4][LORA_ROWS][LORA_SHRINK_RANKS + 8];
    __shared__ float inv[LORA_ROWS];
    const size_t stride = mode == IN_SWIGLU ? 2 * (size_t)k : k;
    pdl_allow_next();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const int row0 = blockIdx.x * LORA_ROWS;
    const int k0 = blockIdx.y * LORA_SHRINK_BLOCK_K + warp * LORA_SHRINK_WARP_K;
    uint32_t mine;
    uint32_t pending = lora_tile_rows(adapter, row0, m, mine);
    bool waited = false;
    while (pending) {
        uint32_t a;
        const uint32_t rows = lora_next_adapter(pending, mine, a);
        pending &= ~rows;
        const LoraEntry e = entries[a];
        const int rank = (int)e.rank;
        const T* A = reinterpret_cast<const T*>(e.a);
        for (int r0 = 0; r0 < rank; r0 += LORA_SHRINK_RANKS) {
            uint4 w[2][8];
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int kk = k0 + 32 * s + 8 * q;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int r = r0 + 8 * j + g;
                    w[s][j] = r < rank ? load8_or_zero(A + (size_t)r * k + kk, k - kk, true)
                                       : make_uint4(0u, 0u, 0u, 0u);
                }
            }
            if (!waited) {
                pdl_wait_previous();
                waited = true;
                if (mode == IN_RMSNORM) {
                    // 1/rms of the tile's rows, a warp per row.
                    for (int row = warp; row < LORA_ROWS; row += 4) {
                        float ss = 0.f;
                        if (row0 + row < m)
                            for (int v = lane; v < k / 8; v += 32) {
                                float f[8];
                                load8(x + (size_t)(row0 + row) * stride + 8 * v, f);
#pragma unroll
                                for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
                            }
                        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
                        if (lane == 0) inv[row] = rsqrtf(ss / k + eps);
                    }
                    __syncthreads();
                }
            }
            float acc[8][4] = {};
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int kk = k0 + 32 * s + 8 * q;
                uint4 xv[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = g + 8 * h;
                    xv[h] = make_uint4(0u, 0u, 0u, 0u);
                    if (!((rows >> row) & 1u) || kk >= k) continue;
                    // k % 8 == 0: the 8 inputs are all in the row.
                    const T* xr = x + (size_t)(row0 + row) * stride + kk;
                    const uint4 a = *reinterpret_cast<const uint4*>(xr);
                    const uint4 b = mode == IN_SWIGLU    ? *reinterpret_cast<const uint4*>(xr + k)
                                    : mode == IN_RMSNORM ? *reinterpret_cast<const uint4*>(gw + kk)
                                                         : a;
                    stage_vector<T, false>(a, b, mode == IN_RMSNORM ? inv[row] : 1.f, mode, reinterpret_cast<T*>(&xv[h]));
                }
                const uint32_t lo[4] = {xv[0].x, xv[1].x, xv[0].y, xv[1].y};
                const uint32_t hi[4] = {xv[0].z, xv[1].z, xv[0].w, xv[1].w};
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    Mma<T>::run(acc[j], lo, w[s][j].x, w[s][j].y);
                    Mma<T>::run(acc[j], hi, w[s][j].z, w[s][j].w);
                }
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                *reinterpret_cast<float2*>(&red[warp][g][8 * j + 2 * q]) = make_float2(acc[j][0], acc[j][1]);
                *reinterpret_cast<float2*>(&red[warp][g + 8][8 * j + 2 * q]) = make_float2(acc[j][2], acc[j][3]);
            }
            __syncthreads();
            for (int i = threadIdx.x; i < LORA_ROWS * LORA_SHRINK_RANKS; i += blockDim.x) {
                const int row = i / LORA_SHRINK_RANKS, r = r0 + i % LORA_SHRINK_RANKS;
                if (!((rows >> row) & 1u) || r >= rank) continue;
                const int c = i % LORA_SHRINK_RANKS;
                atomicAdd(&t[(size_t)(row0 + row) * max_rank + r], red[0][row][c] + red[1][row][c] + red[2][row][c] + red[3][row][c]);
            }
            __syncthreads();
        }
    }
    if (!waited) pdl_wait_previous();
    const int blocks = gridDim.x * gridDim.y, block = blockIdx.y * gridDim.x + blockIdx.x;
    for (int i = block * blockDim.x + threadIdx.x; i < m * max_rank; i += blocks * blockDim.x) t_next[i] = 0.f;
}

// Second product: y[r, c] = y[r, c] + T(T(t[r]) · (scale·B)[c]) for the rows with an adapter, y
// [m, n] in place (the projection's output or the residual stream). Grid (column blocks of
// 32·NT, row tiles); t's ranks past an adapter's own are zero (max_rank a multiple of 32, and ranks
// past it read as zero).
template <typename T, int NT>
__device__ void lora_expand(const float* t, int max_rank, const uint32_t* adapter, const LoraEntry* entries,
                            T* y, int n, int m) {
    pdl_allow_next();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const int row0 = blockIdx.y * LORA_ROWS;
    const int col0 = (blockIdx.x * 4 + warp) * 8 * NT;
    uint32_t mine;
    uint32_t pending = lora_tile_rows(adapter, row0, m, mine);
    bool waited = false;
    while (pending) {
        uint32_t a;
        const uint32_t rows = lora_next_adapter(pending, mine, a);
        pending &= ~rows;
        const LoraEntry e = entries[a];
        const int rank = (int)e.rank;
        const T* B = reinterpret_cast<const T*>(e.b);
        const bool aligned = rank % 8 == 0;
        float acc[NT][4] = {};
        // The output's pairs of columns this lane adds to (read with t, not after the products).
        const bool pairs = n % 2 == 0;
        uint32_t yv[NT][2] = {};
        auto load_y = [&]() {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = g + 8 * h, c = col0 + 8 * j + 2 * q;
                    if (pairs && ((rows >> row) & 1u) && c < n)
                        yv[j][h] = *reinterpret_cast<const uint32_t*>(y + (size_t)(row0 + row) * n + c);
                }
        };
        // 64 ranks a round (two slices of 32), every load of the round issued before the first
        // is used.
        for (int r0 = 0; r0 < rank; r0 += 64) {
            uint4 w[2][NT];
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int kk = r0 + 32 * s + 8 * q;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int c = col0 + 8 * j + g;
                    w[s][j] = c < n ? load8_or_zero(B + (size_t)c * rank + kk, rank - kk, aligned)
                                    : make_uint4(0u, 0u, 0u, 0u);
                }
            }
            if (!waited) {
                pdl_wait_previous();
                waited = true;
            }
            if (r0 == 0) load_y();
            // Rows g and g + 8 of t at ranks kk .. kk + 7 of each slice (past max_rank: zero).
            float4 tv[2][2][2] = {};
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int kk = r0 + 32 * s + 8 * q;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = g + 8 * h;
                    if (((rows >> row) & 1u) && kk < max_rank) {
                        const float4* src = reinterpret_cast<const float4*>(t + (size_t)(row0 + row) * max_rank + kk);
                        tv[s][h][0] = src[0];
                        tv[s][h][1] = src[1];
                    }
                }
            }
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                // Rounded to T, as the reference rounds x·Aᵀ.
                uint32_t p[2][4];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float4 lo = tv[s][h][0], hi = tv[s][h][1];
                    p[h][0] = Mma<T>::pack(round_to<T>(lo.x), round_to<T>(lo.y));
                    p[h][1] = Mma<T>::pack(round_to<T>(lo.z), round_to<T>(lo.w));
                    p[h][2] = Mma<T>::pack(round_to<T>(hi.x), round_to<T>(hi.y));
                    p[h][3] = Mma<T>::pack(round_to<T>(hi.z), round_to<T>(hi.w));
                }
                const uint32_t lo[4] = {p[0][0], p[1][0], p[0][1], p[1][1]};
                const uint32_t hi[4] = {p[0][2], p[1][2], p[0][3], p[1][3]};
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    Mma<T>::run(acc[j], lo, w[s][j].x, w[s][j].y);
                    Mma<T>::run(acc[j], hi, w[s][j].z, w[s][j].w);
                }
            }
        }
        if (!waited) {
            pdl_wait_previous();
            waited = true;
        }
        if (rank == 0) continue;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = g + 8 * h, c = col0 + 8 * j + 2 * q;
                if (!((rows >> row) & 1u) || c >= n) continue;
                const size_t at = (size_t)(row0 + row) * n + c;
                if (pairs) {
                    // Both columns in one 4-byte word (n even: c + 1 < n).
                    uint32_t pair = yv[j][h];
                    const T* v = reinterpret_cast<const T*>(&pair);
                    pair = Mma<T>::pack(round_to<T>(to_f32(v[0]) + round_to<T>(acc[j][2 * h])),
                                        round_to<T>(to_f32(v[1]) + round_to<T>(acc[j][2 * h + 1])));
                    *reinterpret_cast<uint32_t*>(y + at) = pair;
                } else {
#pragma unroll
                    for (int i = 0; i < 2; ++i)
                        if (c + i < n) y[at + i] = from_f32<T>(to_f32(y[at + i]) + round_to<T>(acc[j][2 * h + i]));
                }
            }
        }
    }
    if (!waited) pdl_wait_previous();
}

// out[i] = x[i] as f32 for n elements: logits that cuBLAS wrote in T (cuBLAS's f32-output
// GEMM of a skinny batch was 40× slower than its T output on the H200).
template <typename T>
__device__ void widen_rows(const T* x, float* out, int n) {
    pdl_allow_next();
    pdl_wait_previous();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = to_f32(x[i]);
}

// One block per (row, head), one thread per element of the head.
// Rotates row b's q and k at position lens[b] − 1 (rotate-half layout, rounding as rope.cu),
// writes q to q_out [h, m, d] and k, v into the paged caches at that position's slot. Rows with
// long_rows[b] ≠ 0 rotate with LongRoPE's long table (the host decides per sequence, and
// recomputes a sequence's cache when it switches, as transformers does). cos/sin: [positions, rd/2].
template <typename T>
__device__ void rope_write_kv(const T* qkv, const T* cos_short, const T* sin_short, const T* cos_long,
                              const T* sin_long, const uint32_t* long_rows, const uint32_t* lens,
                              const uint32_t* tables, int max_blocks, T* q_out, T* kc, T* vc, int m,
                              int h, int kvh, int d, int rd, int bs) {
    pdl_allow_next();
    pdl_wait_previous();
    int b = blockIdx.x, head = blockIdx.y, j = threadIdx.x;
    if (j >= d) return;
    int len = lens[b], pos = len - 1, half = rd / 2;
    bool long_rope = long_rows[b] != 0;
    const T* cs = (long_rope ? cos_long : cos_short) + (size_t)pos * half;
    const T* sn = (long_rope ? sin_long : sin_short) + (size_t)pos * half;
    const T* row = qkv + (size_t)b * (h + 2 * kvh) * d;
    size_t slot_block = tables[(size_t)b * max_blocks + pos / bs];
    int offset = pos % bs;
    {
        const T* x = row + head * d;
        float v;
        if (head >= h + kvh || j >= rd) {
            v = to_f32(x[j]);
        } else if (j < half) {
            v = round_to<T>(to_f32(x[j]) * to_f32(cs[j])) + round_to<T>(-to_f32(x[j + half]) * to_f32(sn[j]));
        } else {
            int i = j - half;
            v = round_to<T>(to_f32(x[j]) * to_f32(cs[i])) + round_to<T>(to_f32(x[i]) * to_f32(sn[i]));
        }
        T out = from_f32<T>(v);
        if (head < h) {
            q_out[((size_t)head * m + b) * d + j] = out;
        } else {
            int kh = head < h + kvh ? head - h : head - h - kvh;
            T* cache = head < h + kvh ? kc : vc;
            cache[((slot_block * kvh + kh) * bs + offset) * d + j] = out;
        }
    }
}

// out[b] = argmax of logits row b (lowest index on ties, NaN ignored); one block per row.
extern "C" __global__ void argmax_rows(const float* logits, int vocab, uint32_t* out) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    pdl_allow_next();
    pdl_wait_previous();
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = row[j];
        if (v > bv) { bv = v; bi = j; }  // NaN compares false; j grows, so ties keep the lowest
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, bv, o);
        int oi = __shfl_xor_sync(0xffffffff, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x / 32;
        bv = lane < warps ? best_v[lane] : -INFINITY;
        bi = lane < warps ? best_i[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffff, bv, o);
            int oi = __shfl_xor_sync(0xffffffff, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

#define DECODE(name, T)                                                                                 \
    extern "C" __global__ void embed_rows_##name(const T* table, const uint32_t* tokens, T* x, int hidden) { \
        embed_rows<T>(table, tokens, x, hidden);                                                          \
    }                                                                                                     \
    extern "C" __global__ void rope_write_kv_##name(                                                     \
        const T* qkv, const T* cos_short, const T* sin_short, const T* cos_long, const T* sin_long,       \
        const uint32_t* long_rows, const uint32_t* lens, const uint32_t* tables, int max_blocks,         \
        T* q_out, T* kc, T* vc, int m, int h, int kvh, int d, int rd, int bs) {                           \
        rope_write_kv<T>(qkv, cos_short, sin_short, cos_long, sin_long, long_rows, lens, tables,         \
                         max_blocks, q_out, kc, vc, m, h, kvh, d, rd, bs);                                \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) lora_shrink_##name(                               \
        const T* x, const T* g, float eps, int mode, int m, int k, const uint32_t* adapter,               \
        const LoraEntry* entries, float* t, float* t_next, int max_rank) {                                \
        lora_shrink<T>(x, g, eps, mode, m, k, adapter, entries, t, t_next, max_rank);                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) lora_expand_##name(                               \
        const float* t, int max_rank, const uint32_t* adapter, const LoraEntry* entries, T* y, int n,     \
        int m) {                                                                                          \
        lora_expand<T, 2>(t, max_rank, adapter, entries, y, n, m);                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) lora_expand_wide_##name(                          \
        const float* t, int max_rank, const uint32_t* adapter, const LoraEntry* entries, T* y, int n,     \
        int m) {                                                                                          \
        lora_expand<T, 8>(t, max_rank, adapter, entries, y, n, m);                                        \
    }                                                                                                     \
    extern "C" __global__ void widen_rows_##name(const T* x, float* out, int n) {                     \
        widen_rows<T>(x, out, n);                                                                         \
    }                                                                                                     \
    extern "C" __global__ void transform_rows_##name(const T* x, const T* g, float eps, int mode, int k, \
                                                     T* out) {                                            \
        transform_rows<T>(x, g, eps, mode, k, out);                                                       \
    }
DECODE(bf16, __nv_bfloat16)
DECODE(f16, __half)
