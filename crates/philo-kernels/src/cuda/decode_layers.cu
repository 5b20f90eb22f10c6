// Every decoder layer of a decode step of up to 16 rows in one persistent kernel (the
// launch-per-kernel step of decode.cu is its reference: same inputs, same outputs, rounded the
// same way up to the order of the sums). One block per multiprocessor runs each layer's phases
// in turn:
//
//   G0  RMSNorm + QKV GEMV                         → qkv
//   A   RoPE of q and k, k and v into the paged cache, attention over the row's positions
//       (a head's positions split over blocks at long context)  → f32 partial results
//   G1  the partials combined, O GEMV, added to the residual stream x
//   G2  RMSNorm + gate/up GEMV writing SwiGLU(gate, up)        → h
//   G3  down GEMV of h, added to x
//
// with a grid-wide barrier (a counter in global memory) between phases. What a chain of
// launches cannot do, this does: each warp streams its share of every projection's weights
// through its ring of tiles in the order it will use them, across phase and layer boundaries, so
// that while its block waits at a barrier, stages an input or runs attention, the next
// projection's tiles are already being copied in. The GEMV's tiles and arithmetic are the
// tensor-core GEMV's (gemv_tc in decode.cu).
#include "decode_common.cuh"

// Tiles each warp keeps in flight (its ring of stages): NF4's table of byte pairs (32 KiB) leaves
// room for three.
template <int FMT> constexpr int layer_stages() { return FMT == F_NF4 ? 3 : 4; }
// Attention: positions per chunk of keys and values, and chunks in flight.
constexpr int ATT_CHUNK = 32;
constexpr int ATT_BUFS = 4;
// Fewest positions one split of a head's positions takes.
constexpr int ATT_SPLIT_MIN = 128;
// Words per layer in the layer table: per projection (qkv, o, gate_up, down) five — its weights,
// its scales (INT8 absmax per row, INT4 per group of 128, NF4 per block of 64 as f32 or, double
// quantised, as 8-bit codes; 0 for dense), NF4's code book, second-level absmax and
// (offset bits << 32 | block2) (0 without double quantisation) — then the two norm weights and
// the key and value caches.
constexpr int PROJ_WORDS = 5;
constexpr int LAYER_WORDS = 4 * PROJ_WORDS + 4;
constexpr int NORM_WORDS = 4 * PROJ_WORDS;

// The model's shape and the step's fixed sizes, as the kernel's parameters give them.
struct LayerDims {
    int hidden, inter, heads, kv_heads, d, rd, bs, window, max_splits, region_bytes;
    float eps;
};

// One projection's share of work for this block and warp, as gemv_tc splits it: blocks own
// whole groups of 8 weight rows (with glu: groups of the gate half and the same groups of the
// up half), the block's warps split its tiles (8 rows × 512 bytes) evenly.
struct Share {
    const unsigned char* w;
    Scales sc;
    int n, k, glu;
    int groups, rg0, nrg, tiles, i0, i1;
    // First weight row of the block's v-th owned group.
    __device__ __forceinline__ int row_of(int v) const { return (rg0 + v + (v >= nrg ? groups - nrg : 0)) * 8; }
};

template <typename T, int FMT>
__device__ __forceinline__ Share share_of(const unsigned long long* layer, int proj, const LayerDims& dm) {
    constexpr int E = Chunk<T, FMT>::E;
    Share a;
    const unsigned long long* words = layer + proj * PROJ_WORDS;
    a.w = reinterpret_cast<const unsigned char*>(words[0]);
    const bool dq = words[2] != 0;
    a.sc.s = dq ? nullptr : reinterpret_cast<const float*>(words[1]);
    a.sc.group = 128;
    a.sc.q2 = dq ? reinterpret_cast<const uint8_t*>(words[1]) : nullptr;
    a.sc.code2 = reinterpret_cast<const float*>(words[2]);
    a.sc.absmax2 = reinterpret_cast<const float*>(words[3]);
    a.sc.offset2 = __uint_as_float((unsigned)(words[4] >> 32));
    a.sc.block2 = (int)(words[4] & 0xffffffffu);
    const int qkv_n = (dm.heads + 2 * dm.kv_heads) * dm.d;
    a.n = proj == 0 ? qkv_n : proj == 2 ? 2 * dm.inter : dm.hidden;
    a.k = proj == 1 ? dm.heads * dm.d : proj == 3 ? dm.inter : dm.hidden;
    a.glu = proj == 2;
    a.groups = a.glu ? a.n / 16 : (a.n + 7) / 8;
    const int per = a.groups / gridDim.x, extra = a.groups % gridDim.x;
    a.rg0 = blockIdx.x * per + min((int)blockIdx.x, extra);
    a.nrg = per + ((int)blockIdx.x < extra ? 1 : 0);
    a.tiles = a.k / (E * 32);
    const int total = (a.glu ? 2 * a.nrg : a.nrg) * a.tiles;
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
    a.i0 = warp * total / warps;
    a.i1 = (warp + 1) * total / warps;
    return a;
}

// A warp's copy cursor over every tile it will use in the step, in order: layer by layer,
// projection by projection, its share of each. Each `issue` copies the next tile into the next
// stage of the warp's ring of S (one cp.async group; an empty group once the step's tiles are
// done).
template <typename T, int FMT, int S>
struct TileStream {
    const unsigned long long* layers;
    int n_layers;
    unsigned char* ring;
    Share a;
    int layer, proj, i, rg, kt, stage;

    __device__ void start(const unsigned long long* table, int count, unsigned char* warp_ring, const LayerDims& dm) {
        layers = table;
        n_layers = count;
        ring = warp_ring;
        layer = 0;
        proj = 0;
        stage = 0;
        a = share_of<T, FMT>(layers, 0, dm);
        seek();
    }

    __device__ __forceinline__ void seek() {
        i = a.i0;
        rg = a.i0 / a.tiles;
        kt = a.i0 % a.tiles;
    }

    __device__ void issue(const LayerDims& dm) {
        constexpr int E = Chunk<T, FMT>::E, TILE = tc_tile_bytes<FMT>();
        const int lane = threadIdx.x % 32;
        while (layer < n_layers && i >= a.i1) {
            if (++proj == 4) {
                proj = 0;
                ++layer;
            }
            if (layer < n_layers) {
                a = share_of<T, FMT>(layers + (size_t)layer * LAYER_WORDS, proj, dm);
                seek();
            }
        }
        if (layer < n_layers) {
            unsigned char* dst = ring + stage * TILE;
            const int row0 = a.row_of(rg);
            const size_t row_bytes = (size_t)a.k * 16 / E;
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const bool ok = row0 + r < a.n;
                const unsigned char* src = a.w + (ok ? (size_t)(row0 + r) * row_bytes + (size_t)kt * 512 + lane * 16 : 0);
                cp_async16(dst + r * 512 + ((lane ^ r) * 16), src, ok);
            }
            tc_copy_scales<FMT>(dst, a.sc, row0, a.n, a.k, kt, lane);
            ++i;
            if (++kt == a.tiles) {
                kt = 0;
                ++rg;
            }
        }
        cp_async_commit();
        stage = stage + 1 == S ? 0 : stage + 1;
    }
};

// Grid-wide barrier halves, as cooperative groups' grid sync: every block adds one to the
// counter when its writes of a phase are done; a block waits until the counter reaches the
// phase's target (blocks × phases completed). Data other blocks wrote is then read through L2
// (__ldcg): L1 is not coherent between multiprocessors.
__device__ __forceinline__ void grid_arrive(unsigned* counter) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
    }
}

// A wait past about two seconds means some block never arrived (not resident beside the others,
// or faulted): the kernel traps, an error for the host, instead of hanging the GPU.
__device__ __forceinline__ void grid_wait(const unsigned* counter, unsigned target) {
    if (threadIdx.x == 0) {
        const long long start = clock64();
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
            if (v < target && clock64() - start > 4000000000LL) __trap();
        } while (v < target);
        __threadfence();
    }
    __syncthreads();
}

// The step's rows: each one token of a sequence at position lens[r] − 1, with its LongRoPE
// choice and block table (a verify step's rows share one sequence's table).
struct StepRows {
    const uint32_t* lens;
    const uint32_t* long_rows;
    const uint32_t* tables;
    int max_blocks, m;
};

// One projection for the staged input rows xs (row r at r · (k + XPAD)): the block's tiles,
// then its outputs [m, n]. RS: the row sums' stride per weight row (the most rows, 1, 8 or 16;
// past 8 the mma's second half of rows carries rows 8-15). `out` by projection: qkv (stored), x
// (added to in place), h (SwiGLU of gate and up).
template <typename T, int FMT, int S, int RS>
__device__ void gemv_phase(TileStream<T, FMT, S>& st, int& cstage, const Share& a, const T* xs, int m, float* red,
                           T* out, bool add, const uint32_t* nf4_pairs, const LayerDims& dm) {
    constexpr int E = Chunk<T, FMT>::E, TILE = tc_tile_bytes<FMT>();
    constexpr bool HI = RS > 8;
    const int lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const unsigned char* ring = st.ring;
    const bool live = gq < m, live_hi = HI && gq + 8 < m;
    const T* xrow = xs + (size_t)(live ? gq : 0) * (a.k + XPAD);
    const T* xhi = xs + (size_t)(live_hi ? gq + 8 : 0) * (a.k + XPAD);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int c_rg = a.i0 / a.tiles, c_kt = a.i0 % a.tiles;
    // Lane (g, t) holds the sums of weight rows 2t and 2t + 1 of the group for input row g (and
    // g + 8 in acc[2], acc[3]).
    auto flush = [&]() {
        if (live) {
            atomicAdd(&red[(c_rg * 8 + 2 * t) * RS + gq], acc[0]);
            atomicAdd(&red[(c_rg * 8 + 2 * t + 1) * RS + gq], acc[1]);
        }
        if (live_hi) {
            atomicAdd(&red[(c_rg * 8 + 2 * t) * RS + gq + 8], acc[2]);
            atomicAdd(&red[(c_rg * 8 + 2 * t + 1) * RS + gq + 8], acc[3]);
        }
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    };
    for (int i = a.i0; i < a.i1; ++i) {
        __syncwarp();  // every lane is done with the stage the next copy overwrites
        st.issue(dm);
        cp_async_wait<S - 1>();
        __syncwarp();
        const unsigned char* tile = ring + cstage * TILE;
        const Nf4Tile nf = nf4_tile<FMT>(a.sc, a.row_of(c_rg), a.n, a.k, c_kt, t);
        tc_tile_product<T, FMT, HI>(tile, xrow, live, c_kt * 32 * E, nf, nf4_pairs, acc, xhi, live_hi);
        cstage = cstage + 1 == S ? 0 : cstage + 1;
        if (++c_kt == a.tiles) {
            flush();
            c_kt = 0;
            ++c_rg;
        }
    }
    if (c_kt != 0) flush();
    __syncthreads();
    if (a.glu) {
        const int half = a.n / 2;
        for (int tt = threadIdx.x; tt < a.nrg * 8 * m; tt += blockDim.x) {
            const int i = tt / m, r = tt % m, row = a.rg0 * 8 + i;
            float gate = red[i * RS + r], up = red[(a.nrg * 8 + i) * RS + r];
            if (FMT == F_INT8) {
                gate = gate * a.sc.s[row] * (1.f / 127.f);
                up = up * a.sc.s[row + half] * (1.f / 127.f);
            }
            gate = round_to<T>(gate);
            up = round_to<T>(up);
            out[(size_t)r * half + row] = from_f32<T>(round_to<T>(gate / (1.f + __expf(-gate))) * up);
        }
        return;
    }
    for (int tt = threadIdx.x; tt < a.nrg * 8 * m; tt += blockDim.x) {
        const int i = tt / m, r = tt % m, row = a.rg0 * 8 + i;
        if (row >= a.n) continue;
        float v = red[i * RS + r];
        if (FMT == F_INT8) v = v * a.sc.s[row] * (1.f / 127.f);
        T* o = out + (size_t)r * a.n + row;
        *o = add ? from_f32<T>(to_f32(__ldcg(o)) + round_to<T>(v)) : from_f32<T>(v);
    }
}

// Element j of one head's row x rotated at the table rows cs / sn (as rope_write_kv rounds).
template <typename T>
__device__ __forceinline__ float rotate(const T* x, int j, int rd, const T* cs, const T* sn) {
    const int half = rd / 2;
    const float xj = to_f32(__ldcg(x + j));
    if (j >= rd) return xj;
    if (j < half) return round_to<T>(xj * to_f32(cs[j])) + round_to<T>(-to_f32(__ldcg(x + j + half)) * to_f32(sn[j]));
    const int i = j - half;
    return round_to<T>(xj * to_f32(cs[i])) + round_to<T>(to_f32(__ldcg(x + i)) * to_f32(sn[i]));
}

// Splits of a head's positions: at most `splits` (what the grid holds beside the step's rows
// and heads), one per ATT_SPLIT_MIN positions. The attention and the combine in the next phase
// both compute it from the row's length.
__device__ __forceinline__ int attention_splits(int span, int splits) {
    return max(1, min(splits, (span + ATT_SPLIT_MIN - 1) / ATT_SPLIT_MIN));
}

// Splits the grid gives each (row, head) this step (dm.max_splits for one row).
__device__ __forceinline__ int grid_splits(const LayerDims& dm, int m) {
    return max(1, min(dm.max_splits, (int)gridDim.x / (m * dm.heads)));
}

// The rows' RoPE tables at their positions.
template <typename T>
struct RowRope {
    const T* cos_short;
    const T* sin_short;
    const T* cos_long;
    const T* sin_long;
    __device__ __forceinline__ const T* cs(const StepRows& rows, int r, int rd) const {
        const size_t at = (size_t)(rows.lens[r] - 1) * (rd / 2);
        return (rows.long_rows[r] != 0 ? cos_long : cos_short) + at;
    }
    __device__ __forceinline__ const T* sn(const StepRows& rows, int r, int rd) const {
        const size_t at = (size_t)(rows.lens[r] - 1) * (rd / 2);
        return (rows.long_rows[r] != 0 ? sin_long : sin_short) + at;
    }
};

// The attention phase's work of this block: (row, head, split) items. A split's keys and values
// stream through a ring of chunks in shared memory (the first before the wait for the QKV
// phase); the positions this step writes — the rows' own, where they fall in the same cache
// slots as the item's row (a verify step's rows of one sequence) — come from the QKV output
// instead, rotated here. The item's own row also writes its key and value into the cache (one
// block per row and key/value head). An online softmax over the chunks leaves (max, sum,
// unnormalised output) in `partial`, per (row, head, split) d + 4 floats: max, sum, two unused,
// then the d outputs.
template <typename T>
__device__ void attention_phase(const T* qkv, T* k_cache, T* v_cache, const StepRows& rows, const RowRope<T>& rope,
                                float* partial, unsigned char* region, const LayerDims& dm, const unsigned* sync,
                                unsigned target) {
    const int d = dm.d, m = rows.m, splits = grid_splits(dm, m);
    const int items = m * dm.heads * splits, group = dm.heads / dm.kv_heads, qkv_row = (dm.heads + 2 * dm.kv_heads) * d;
    T* ring = reinterpret_cast<T*>(region);
    float* qf = reinterpret_cast<float*>(region + (size_t)ATT_BUFS * 2 * ATT_CHUNK * d * sizeof(T));
    float* sc = qf + d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const float scale = rsqrtf((float)d);
    const int vecs = d / 8;
    bool waited = false;
    for (int it = blockIdx.x; it < items; it += gridDim.x) {
        const int r = it / (dm.heads * splits), head = it / splits % dm.heads, split = it % splits;
        const int len = rows.lens[r], pos = len - 1;
        const int first = len > dm.window ? len - dm.window : 0, span = len - first;
        const int nsplit = attention_splits(span, splits);
        if (split >= nsplit) continue;
        const int per = (span + nsplit - 1) / nsplit, kh = head / group;
        const int p0 = first + split * per, p1 = min(len, p0 + per);
        const int chunks = (p1 - p0 + ATT_CHUNK - 1) / ATT_CHUNK;
        const uint32_t* table = rows.tables + (size_t)r * rows.max_blocks;
        // Rows whose new position lies in this split, in this row's cache slots.
        unsigned fresh = 0;
        for (int q = 0; q < m; ++q) {
            const int pq = (int)rows.lens[q] - 1;
            if (pq >= p0 && pq < p1 && rows.tables[(size_t)q * rows.max_blocks + pq / dm.bs] == table[pq / dm.bs])
                fresh |= 1u << q;
        }
        auto written = [&](int p) {
            for (unsigned f = fresh; f != 0; f &= f - 1)
                if ((int)rows.lens[__ffs(f) - 1] - 1 == p) return true;
            return false;
        };
        auto issue_chunk = [&](int c) {
            if (c < chunks) {
                T* kb = ring + (size_t)(c % ATT_BUFS) * 2 * ATT_CHUNK * d;
                for (int e = threadIdx.x; e < 2 * ATT_CHUNK * vecs; e += blockDim.x) {
                    const int which = e / (ATT_CHUNK * vecs), rem = e % (ATT_CHUNK * vecs);
                    const int row = rem / vecs, v = rem % vecs, p = p0 + c * ATT_CHUNK + row;
                    T* dst = kb + (size_t)which * ATT_CHUNK * d + row * d + v * 8;
                    if (p >= p1) {
                        // Zeros past the split: their weight is 0, and 0 × whatever the shared
                        // memory held (Inf or NaN from another kernel's bytes) would not be.
                        cp_async16(dst, k_cache, false);
                    } else if (!written(p)) {
                        const size_t block = table[p / dm.bs];
                        const T* src = (which ? v_cache : k_cache) + ((block * dm.kv_heads + kh) * dm.bs + p % dm.bs) * d + v * 8;
                        cp_async16(dst, src, true);
                    }
                }
            }
            cp_async_commit();
        };
        for (int c = 0; c < ATT_BUFS - 1; ++c) issue_chunk(c);
        if (!waited) {
            grid_wait(sync, target);
            waited = true;
        }
        const T* own = qkv + (size_t)r * qkv_row;
        const T* cs = rope.cs(rows, r, dm.rd);
        const T* sn = rope.sn(rows, r, dm.rd);
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            qf[j] = round_to<T>(rotate<T>(own + (size_t)head * d, j, dm.rd, cs, sn));
            if (head % group == 0 && pos >= p0 && pos < p1) {
                const size_t at = (((size_t)table[pos / dm.bs] * dm.kv_heads + kh) * dm.bs + pos % dm.bs) * d + j;
                k_cache[at] = from_f32<T>(rotate<T>(own + (size_t)(dm.heads + kh) * d, j, dm.rd, cs, sn));
                v_cache[at] = __ldcg(own + (size_t)(dm.heads + dm.kv_heads + kh) * d + j);
            }
        }
        float m_run = -INFINITY, l_run = 0.f, acc = 0.f;
        const int j = threadIdx.x;
        for (int c = 0; c < chunks; ++c) {
            issue_chunk(c + ATT_BUFS - 1);
            cp_async_wait<ATT_BUFS - 1>();
            __syncthreads();
            T* kb = ring + (size_t)(c % ATT_BUFS) * 2 * ATT_CHUNK * d;
            T* vb = kb + ATT_CHUNK * d;
            const int c0 = p0 + c * ATT_CHUNK;
            // The positions written this step, from the QKV output of the row that writes each.
            bool filled = false;
            for (unsigned f = fresh; f != 0; f &= f - 1) {
                const int q = __ffs(f) - 1, pq = (int)rows.lens[q] - 1;
                if (pq < c0 || pq >= c0 + ATT_CHUNK) continue;
                const T* src = qkv + (size_t)q * qkv_row;
                const T* qcs = rope.cs(rows, q, dm.rd);
                const T* qsn = rope.sn(rows, q, dm.rd);
                for (int e = threadIdx.x; e < d; e += blockDim.x) {
                    kb[(pq - c0) * d + e] = from_f32<T>(rotate<T>(src + (size_t)(dm.heads + kh) * d, e, dm.rd, qcs, qsn));
                    vb[(pq - c0) * d + e] = __ldcg(src + (size_t)(dm.heads + dm.kv_heads + kh) * d + e);
                }
                filled = true;
            }
            if (filled) __syncthreads();
            for (int row = warp; row < ATT_CHUNK; row += warps) {
                float dot = 0.f;
                if (c0 + row < p1)
                    for (int e = lane; e < d; e += 32) dot += qf[e] * to_f32(kb[row * d + e]);
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
                if (lane == 0) sc[row] = c0 + row < p1 ? dot * scale : -INFINITY;
            }
            __syncthreads();
            float cmax = -INFINITY;
            for (int row = 0; row < ATT_CHUNK; ++row) cmax = fmaxf(cmax, sc[row]);
            const float m_new = fmaxf(m_run, cmax), corr = __expf(m_run - m_new);
            float lsum = 0.f, part = 0.f;
            for (int row = 0; row < ATT_CHUNK; ++row) {
                const float e = __expf(sc[row] - m_new);
                lsum += e;
                if (j < d) part += e * to_f32(vb[row * d + j]);
            }
            acc = acc * corr + part;
            l_run = l_run * corr + lsum;
            m_run = m_new;
            __syncthreads();  // the chunk's buffer and scores are written again next
        }
        float* out = partial + (((size_t)r * dm.heads + head) * dm.max_splits + split) * (d + 4);
        if (j < d) out[4 + j] = acc;
        if (j == 0) {
            out[0] = m_run;
            out[1] = l_run;
        }
        cp_async_wait<0>();
        __syncthreads();
    }
    // A block without an item still waits for the QKV phase before it counts itself done with
    // this one: otherwise its count could complete the attention's target while blocks are
    // still writing qkv.
    if (!waited) grid_wait(sync, target);
}

// Stages the attention's output for the O projection: each (row, head)'s split results combined
// (rescaled to the largest max), divided by the sum and rounded to T, as the attention kernel's
// output would be stored; row r at xs + r · (heads · d + XPAD); PAIRS as stage_row orders
// INT4's input.
template <typename T, bool PAIRS>
__device__ void stage_attention(const float* partial, const StepRows& rows, const LayerDims& dm, T* xs) {
    const int d = dm.d, width = dm.heads * d, per_row = width / 8, splits = grid_splits(dm, rows.m);
    for (int v = threadIdx.x; v < rows.m * per_row; v += blockDim.x) {
        const int r = v / per_row, head = v % per_row * 8 / d, j0 = v % per_row * 8 % d;
        const int len = rows.lens[r], first = len > dm.window ? len - dm.window : 0;
        const int nsplit = attention_splits(len - first, splits);
        const float* base = partial + ((size_t)r * dm.heads + head) * dm.max_splits * (d + 4);
        float mx = -INFINITY;
        for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, __ldcg(base + (size_t)s * (d + 4)));
        float l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int s = 0; s < nsplit; ++s) {
            const float* e = base + (size_t)s * (d + 4);
            const float w = __expf(__ldcg(e) - mx);
            l += __ldcg(e + 1) * w;
            const float4 lo = __ldcg(reinterpret_cast<const float4*>(e + 4 + j0));
            const float4 hi = __ldcg(reinterpret_cast<const float4*>(e + 4 + j0 + 4));
            o[0] += lo.x * w;
            o[1] += lo.y * w;
            o[2] += lo.z * w;
            o[3] += lo.w * w;
            o[4] += hi.x * w;
            o[5] += hi.y * w;
            o[6] += hi.z * w;
            o[7] += hi.w * w;
        }
        float out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = o[e] / l;
        uint4 packed;
        store8(reinterpret_cast<T*>(&packed), out);
        stage_vector<T, PAIRS>(packed, packed, 1.f, IN_PLAIN, xs + (size_t)r * (width + XPAD) + (size_t)(v % per_row) * 8);
    }
    __syncthreads();
}

// The input rows of a projection staged as its GEMV wants them (one row in registers, several
// by groups of warps), read through L2.
template <typename T, bool PAIRS, int ROWS>
__device__ __forceinline__ void stage_input(const T* x, const T* g, float eps, int mode, int m, int k, T* xs) {
    if (ROWS > 1) stage_rows<T, PAIRS, true>(x, g, eps, mode, m, k, xs);
    else stage_row<T, PAIRS, true>(x, g, eps, mode, k, xs);
}

// ROWS: the most rows the instance takes (1, 8 or 16).
template <typename T, int FMT, int ROWS>
__device__ void decode_layers(const unsigned long long* layers, int n_layers, T* x, T* qkv, T* h, float* partial,
                              const RowRope<T> rope, const StepRows rows, const LayerDims dm, unsigned* sync) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ uint32_t nf4_pairs[FMT == F_NF4 ? NF4_PAIR_WORDS : 1];
    // Several rows' staged inputs leave room for two tiles a warp.
    constexpr int TILE = tc_tile_bytes<FMT>(), S = ROWS > 1 ? 2 : layer_stages<FMT>(), RS = ROWS;
    constexpr bool PAIRS = FMT == F_INT4;
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, m = ROWS > 1 ? rows.m : 1;
    unsigned char* region = smem + (size_t)warps * S * TILE;
    T* xs = reinterpret_cast<T*>(region);
    float* red = reinterpret_cast<float*>(region + dm.region_bytes);
    const unsigned grid = gridDim.x;

    TileStream<T, FMT, S> st;
    st.start(layers, n_layers, smem + (size_t)warp * S * TILE, dm);
    // Layer 0's first tiles stream in while the embedding finishes.
    for (int s = 0; s < S - 1; ++s) st.issue(dm);
    if (FMT == F_NF4) fill_nf4_pairs<T>(nf4_pairs);  // the first staging's barrier publishes it
    int cstage = 0;
    pdl_allow_next();
    pdl_wait_previous();
    unsigned done = 0;  // phases the whole grid has finished, once waited for
    // One projection of layer L: once the grid's previous phase is done, zero the block's row
    // sums, stage the input (`stage`, which ends with a block barrier) and multiply; then count
    // the block's part of the phase done, unless it is the step's last.
    auto project = [&](const unsigned long long* L, int proj, auto stage, T* out, bool add, bool last) {
        grid_wait(sync, done * grid);
        const Share a = share_of<T, FMT>(L, proj, dm);
        for (int i = threadIdx.x; i < (a.glu ? 2 * a.nrg : a.nrg) * 8 * RS; i += blockDim.x) red[i] = 0.f;
        stage();
        gemv_phase<T, FMT, S, RS>(st, cstage, a, xs, m, red, out, add, nf4_pairs, dm);
        if (!last) {
            grid_arrive(sync);
            ++done;
        }
    };
    for (int l = 0; l < n_layers; ++l) {
        const unsigned long long* L = layers + (size_t)l * LAYER_WORDS;
        const T* input_norm = reinterpret_cast<const T*>(L[NORM_WORDS]);
        const T* post_norm = reinterpret_cast<const T*>(L[NORM_WORDS + 1]);
        T* k_cache = reinterpret_cast<T*>(L[NORM_WORDS + 2]);
        T* v_cache = reinterpret_cast<T*>(L[NORM_WORDS + 3]);
        // G0: norm + QKV.
        project(L, 0, [&] { stage_input<T, PAIRS, ROWS>(x, input_norm, dm.eps, IN_RMSNORM, m, dm.hidden, xs); }, qkv,
                false, false);
        // A: RoPE, KV write, attention (every block waits for G0 first, with an item or without).
        attention_phase<T>(qkv, k_cache, v_cache, rows, rope, partial, region, dm, sync, done * grid);
        grid_arrive(sync);
        ++done;
        // G1: O projection into the residual stream.
        project(L, 1, [&] { stage_attention<T, PAIRS>(partial, rows, dm, xs); }, x, true, false);
        // G2: norm + gate/up, SwiGLU.
        project(L, 2, [&] { stage_input<T, PAIRS, ROWS>(x, post_norm, dm.eps, IN_RMSNORM, m, dm.hidden, xs); }, h,
                false, false);
        // G3: down projection into the residual stream.
        project(L, 3, [&] { stage_input<T, PAIRS, ROWS>(h, nullptr, 0.f, IN_PLAIN, m, dm.inter, xs); }, x, true,
                l + 1 == n_layers);
    }
    cp_async_wait<0>();
    // The last block out resets the counters for the next step: every block has passed its last
    // wait by the time it counts itself here.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&sync[1], 1u) == grid - 1) {
            atomicExch(&sync[0], 0u);
            atomicExch(&sync[1], 0u);
        }
    }
}

// Three instances per format: one row (its ring of layer_stages tiles), up to 8 rows, and up to
// 16 (a verify step of 8 proposals; the mma's second half of rows).
#define DECODE_LAYERS_ROWS(fname, T, FMT, ROWS, suffix)                                                      \
    extern "C" __global__ void __launch_bounds__(256, 1) decode_layers_##fname##suffix(                      \
        const unsigned long long* layers, int n_layers, T* x, T* qkv, T* h, float* partial,                  \
        const T* cos_short, const T* sin_short, const T* cos_long, const T* sin_long, const uint32_t* lens,   \
        const uint32_t* long_rows, const uint32_t* tables, int max_blocks, int m, int hidden, int inter,      \
        int heads, int kv_heads, int d, int rd, int bs, int window, int max_splits, int region_bytes,         \
        float eps, unsigned* sync) {                                                                         \
        const LayerDims dm{hidden, inter, heads, kv_heads, d, rd, bs, window, max_splits, region_bytes, eps}; \
        const RowRope<T> rope{cos_short, sin_short, cos_long, sin_long};                                     \
        const StepRows rows{lens, long_rows, tables, max_blocks, m};                                         \
        decode_layers<T, FMT, ROWS>(layers, n_layers, x, qkv, h, partial, rope, rows, dm, sync);             \
    }
#define DECODE_LAYERS(fname, T, FMT)                                              \
    DECODE_LAYERS_ROWS(fname, T, FMT, 1, ) DECODE_LAYERS_ROWS(fname, T, FMT, 8, _rows) \
    DECODE_LAYERS_ROWS(fname, T, FMT, 16, _rows16)
DECODE_LAYERS(dense_bf16, __nv_bfloat16, F_DENSE)
DECODE_LAYERS(int8_bf16, __nv_bfloat16, F_INT8)
DECODE_LAYERS(int4_bf16, __nv_bfloat16, F_INT4)
DECODE_LAYERS(nf4_bf16, __nv_bfloat16, F_NF4)
DECODE_LAYERS(dense_f16, __half, F_DENSE)
DECODE_LAYERS(int8_f16, __half, F_INT8)
DECODE_LAYERS(int4_f16, __half, F_INT4)
DECODE_LAYERS(nf4_f16, __half, F_NF4)
