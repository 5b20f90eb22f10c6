// Flash attention, forward and backward, on tensor cores (mma.sync m16n8k16, bf16 or f16 inputs,
// f32 accumulation), for head dims that are multiples of 16.
//
// Layouts (d contiguous everywhere):
//   q       [B, H, S, D]   strides q_b, q_h, q_s
//   k, v    [B, KVH, T, D] strides k_b, k_h, k_t (shared by k and v); query head h reads KV head
//           h / (H / KVH)
//   out     [B, S, H, D]   contiguous (what o_proj reads as [B, S, H·D])
//   lse     [B, H, S]      f32, natural log of the softmax denominator (+inf for a query that
//           sees no key, so that its backward terms vanish)
//   seg     [B, T] int32 or null: 0 marks padding; a query attends only to keys of its own
//           segment. Query i sits at key position past + i, past = T − S.
// A key j is visible to query position i when j ≤ i, i − j < window and the segments allow it.
// The plain reference of both passes is `attention::reference` on the Rust side.
#include "flash_common.cuh"
#include "mma.cuh"

// The backward's two products of one query tile at once, interleaved so that consecutive MMAs
// never share an accumulator: acc1 += A1·X1ᵀ and acc2 += A2·X2ᵀ (16 rows of A each, as in
// mma_a_xt with MT = 1).
template <typename T, int D, int NJ>
__device__ __forceinline__ void mma_a_xt_pair(float (*acc1)[4], const uint32_t (*a1)[4], const T* x1,
                                              float (*acc2)[4], const uint32_t (*a2)[4], const T* x2,
                                              int ld) {
    if constexpr ((D / 16) % 2 == 0) {
#pragma unroll
        for (int kc = 0; kc < D / 16; kc += 2) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                uint32_t b1[4], b2[4];
                load_bt_x4<T>(x1 + j * 8 * ld + kc * 16, ld, b1);
                load_bt_x4<T>(x2 + j * 8 * ld + kc * 16, ld, b2);
                Mma<T>::run(acc1[j], a1[kc], b1[0], b1[1]);
                Mma<T>::run(acc2[j], a2[kc], b2[0], b2[1]);
                Mma<T>::run(acc1[j], a1[kc + 1], b1[2], b1[3]);
                Mma<T>::run(acc2[j], a2[kc + 1], b2[2], b2[3]);
            }
        }
    } else {
        mma_a_xt<T, D, NJ>(acc1, a1, x1, ld);
        mma_a_xt<T, D, NJ>(acc2, a2, x2, ld);
    }
}

// Starts copying a [rows][D] tile (global row stride `stride`) to shared memory (row stride
// D + 8); rows at or past `valid` are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, size_t stride, int rows, int valid) {
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < rows * V; i += blockDim.x) {
        int r = i / V, c = (i - r * V) * 8;
        bool ok = r < valid;
        cp_async16(dst + r * (D + 8) + c, ok ? src + r * stride + c : src, ok);
    }
}

// Copies a [rows][D] tile (global row stride `stride`) to shared memory (row stride D + 8) in
// 16-byte pieces; rows at or past `valid` are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, size_t stride, int rows, int valid) {
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < rows * V; i += blockDim.x) {
        int r = i / V, c = (i % V) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
        *reinterpret_cast<uint4*>(dst + r * (D + 8) + c) = val;
    }
}

// 16-row MMA tiles per warp in the forward: two up to head dim 96 (each K and V fragment read
// from shared memory then serves both), one above (two would not fit in the registers).
constexpr int forward_row_tiles(int d) { return d <= 96 ? 2 : 1; }

// ---------------------------------------------------------------------------------------------
// Forward: one block = 4 warps = 64 · forward_row_tiles(D) queries of one (batch, head), each
// warp 16 or 32 consecutive query rows; key tiles of 64, loaded two stages deep with cp.async (the next tile arrives while this
// one is computed). Dynamic shared memory: K and V stages plus their segment ids.
template <typename T, int D>
__device__ void flash_forward(const T* q, const T* k, const T* v, const int* seg, T* out,
                              float* lse, int B, int H, int KVH, int S, int T_, long q_b, long q_h,
                              long q_s, long k_b, long k_h, long k_t, int window, float scale) {
    constexpr int MT = forward_row_tiles(D), BM = 64 * MT, BN = 64, LD = D + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T* ks = reinterpret_cast<T*>(smem);  // [2][BN][LD]
    T* vs = ks + 2 * BN * LD;            // [2][BN][LD]
    int* kseg = reinterpret_cast<int*>(vs + 2 * BN * LD);  // [2][BN]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    // Longest rows first: causal blocks near the end see the most keys.
    int q0 = (gridDim.x - 1 - blockIdx.x) * BM, wq0 = q0 + warp * 16 * MT;
    int past = T_ - S;
    const T* qp = q + b * q_b + h * q_h;
    const T* kp = k + b * k_b + kvh * k_h;
    const T* vp = v + b * k_b + kvh * k_h;
    const int* seg_b = seg ? seg + (size_t)b * T_ : nullptr;

    // Tile m of this warp: rows wq0 + 16·m + g (e = 0, 1) and + 8 (e = 2, 3), as A fragments.
    // (Row indices are recomputed where needed rather than kept: registers are the limit.)
    auto row_of = [&](int m, int hi) { return wq0 + 16 * m + 8 * hi + g; };
    uint32_t qf[MT][D / 16][4];
    int qseg[MT][2];
    bool one_segment = true;
    int warp_seg = 0;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        int r0 = row_of(m, 0), r1 = row_of(m, 1);
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            int c = kc * 16 + 2 * t;
            qf[m][kc][0] = r0 < S ? ld32(qp + r0 * q_s + c) : 0;
            qf[m][kc][1] = r1 < S ? ld32(qp + r1 * q_s + c) : 0;
            qf[m][kc][2] = r0 < S ? ld32(qp + r0 * q_s + c + 8) : 0;
            qf[m][kc][3] = r1 < S ? ld32(qp + r1 * q_s + c + 8) : 0;
        }
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            int row = row_of(m, hi);
            qseg[m][hi] = (seg_b && row < S) ? seg_b[past + row] : 0;
        }
        if (m == 0) warp_seg = __shfl_sync(0xffffffff, qseg[0][0], 0);
        one_segment = one_segment && qseg[m][0] == warp_seg && qseg[m][1] == warp_seg;
    }
    // The warp's rows all real and, with segments, all in one segment (then a key tile of that
    // segment alone needs no mask).
    constexpr int WR = 16 * MT;  // rows per warp
    bool rows_real = wq0 + WR - 1 < S;
    bool rows_one_segment = __all_sync(0xffffffff, one_segment);

    float o[MT][D / 8][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[m][i][0] = o[m][i][1] = o[m][i][2] = o[m][i][3] = 0.f;
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) mrow[m][0] = mrow[m][1] = -INFINITY, lrow[m][0] = lrow[m][1] = 0.f;
    float sl2 = scale * LOG2E;

    // Keys this block can see: from the window's start for its first query to its last query.
    int last_q = min(q0 + BM, S) - 1 + past;
    long first_key = (long)past + q0 - window + 1;
    int kt0 = first_key > 0 ? (int)(first_key / BN) : 0;
    int kt1 = min(last_q, T_ - 1) / BN;
    auto issue = [&](int kt, int stage) {
        int k0 = kt * BN;
        load_tile_async<T, D>(ks + stage * BN * LD, kp + (size_t)k0 * k_t, k_t, BN, T_ - k0);
        load_tile_async<T, D>(vs + stage * BN * LD, vp + (size_t)k0 * k_t, k_t, BN, T_ - k0);
        if (threadIdx.x < BN)
            kseg[stage * BN + threadIdx.x] =
                (seg_b && k0 + threadIdx.x < T_) ? seg_b[k0 + threadIdx.x] : 0;
    };
    if (kt0 <= kt1) issue(kt0, 0);
    cp_async_commit();
    for (int kt = kt0; kt <= kt1; ++kt) {
        int stage = (kt - kt0) & 1, k0 = kt * BN;
        if (kt + 1 <= kt1) issue(kt + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* kst = ks + stage * BN * LD;
        const T* vst = vs + stage * BN * LD;
        const int* ksg = kseg + stage * BN;
        // A warp whose rows see no key of this tile (all before it, or all past the window)
        // skips it; its running max and sums stay as they are.
        int wlast = past + min(wq0 + WR, S) - 1;
        bool unseen = wq0 >= S || wlast < k0 || (long)past + wq0 - (k0 + BN - 1) >= window;
        if (!unseen) {
            float s[MT][BN / 8][4];
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) s[m][j][0] = s[m][j][1] = s[m][j][2] = s[m][j][3] = 0.f;
            mma_a_xt<T, D, BN / 8, MT>(s[0], qf[0], kst, LD);
            bool same_segment = true;
            if (seg_b) {
                bool keys_one = ksg[lane] == warp_seg && ksg[lane + 32] == warp_seg;
                same_segment = rows_one_segment && warp_seg != 0 && __all_sync(0xffffffff, keys_one);
            }
            bool full = rows_real && all_visible(k0, BN, past + wq0, past + wq0 + WR - 1, T_, window,
                                                 same_segment);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                // Mask where needed; running max (in log2 units: the scale is positive).
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int hi = e >> 1;
                        float val = s[m][j][e];
                        if (!full) {
                            int key = k0 + j * 8 + 2 * t + (e & 1);
                            int row = row_of(m, hi);
                            bool ok = row < S && visible(key, past + row, T_, window,
                                                         seg_b ? ksg - k0 : nullptr, qseg[m][hi]);
                            if (!ok) val = -INFINITY;
                        }
                        s[m][j][e] = val;
                        mx[hi] = fmaxf(mx[hi], val);
                    }
                }
                float a[2], u[2];
#pragma unroll
                for (int hi = 0; hi < 2; ++hi) {
                    mx[hi] = fmaxf(mx[hi], __shfl_xor_sync(0xffffffff, mx[hi], 1));
                    mx[hi] = fmaxf(mx[hi], __shfl_xor_sync(0xffffffff, mx[hi], 2));
                    float n = fmaxf(mrow[m][hi], mx[hi] * sl2);
                    // A row that has seen no key yet keeps exponent base 0 so that exp2 stays finite.
                    u[hi] = n == -INFINITY ? 0.f : n;
                    a[hi] = fast_exp2(mrow[m][hi] - u[hi]);
                    mrow[m][hi] = n;
                    lrow[m][hi] *= a[hi];
                }
#pragma unroll
                for (int i = 0; i < D / 8; ++i) {
                    o[m][i][0] *= a[0]; o[m][i][1] *= a[0]; o[m][i][2] *= a[1]; o[m][i][3] *= a[1];
                }
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    s[m][j][0] = fast_exp2(fmaf(s[m][j][0], sl2, -u[0]));
                    s[m][j][1] = fast_exp2(fmaf(s[m][j][1], sl2, -u[0]));
                    s[m][j][2] = fast_exp2(fmaf(s[m][j][2], sl2, -u[1]));
                    s[m][j][3] = fast_exp2(fmaf(s[m][j][3], sl2, -u[1]));
                    lrow[m][0] += s[m][j][0] + s[m][j][1];
                    lrow[m][1] += s[m][j][2] + s[m][j][3];
                }
            }
            // O += P·V: each V fragment serves both row tiles.
#pragma unroll
            for (int kc = 0; kc < BN / 16; ++kc) {
                uint32_t pf[MT][4];
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    pf[m][0] = Mma<T>::pack(s[m][2 * kc][0], s[m][2 * kc][1]);
                    pf[m][1] = Mma<T>::pack(s[m][2 * kc][2], s[m][2 * kc][3]);
                    pf[m][2] = Mma<T>::pack(s[m][2 * kc + 1][0], s[m][2 * kc + 1][1]);
                    pf[m][3] = Mma<T>::pack(s[m][2 * kc + 1][2], s[m][2 * kc + 1][3]);
                }
#pragma unroll
                for (int dn = 0; dn < D / 8; dn += 2) {
                    uint32_t bb[4];
                    load_b_trans_x4<T>(vst + kc * 16 * LD + dn * 8, LD, bb);
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        Mma<T>::run(o[m][dn], pf[m], bb[0], bb[1]);
                        Mma<T>::run(o[m][dn + 1], pf[m], bb[2], bb[3]);
                    }
                }
            }
        }
        // Every warp is done with this stage before the next iteration's copy overwrites it.
        __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        float inv[2];
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            float l = lrow[m][hi];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            lrow[m][hi] = l;
            inv[hi] = l > 0.f ? 1.f / l : 0.f;
        }
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            int c = dn * 8 + 2 * t;
#pragma unroll
            for (int hi = 0; hi < 2; ++hi) {
                int row = row_of(m, hi);
                if (row < S)
                    *reinterpret_cast<uint32_t*>(out + (((size_t)b * S + row) * H + h) * D + c) =
                        Mma<T>::pack(o[m][dn][2 * hi] * inv[hi], o[m][dn][2 * hi + 1] * inv[hi]);
            }
        }
        if (t == 0) {
#pragma unroll
            for (int hi = 0; hi < 2; ++hi) {
                float l = lrow[m][hi];
                int row = row_of(m, hi);
                if (row < S)
                    lse[((size_t)b * H + h) * S + row] =
                        l > 0.f ? (mrow[m][hi] + log2f(l)) / LOG2E : INFINITY;
            }
        }
    }
}

// Dynamic shared memory of the forward for head dim D (K and V two stages deep, segment ids).
template <typename T, int D>
constexpr int forward_smem() { return 2 * 2 * 64 * (D + 8) * (int)sizeof(T) + 2 * 64 * (int)sizeof(int); }

// ---------------------------------------------------------------------------------------------
// Backward, step 1: delta[b, h, i] = Σ_d dO·O (f32) for every query row, and that row of the
// f32 dQ accumulator zeroed (the backward adds into it). 16 lanes per row, 8 elements each
// (D ≤ 128, a multiple of 8).
template <typename T>
__device__ void flash_delta(const T* out, const T* dout, float* delta, float* dq, int B, int H,
                            int S, int D) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 16;  // over B·S·H
    int lane = threadIdx.x % 16, c = lane * 8;
    bool live = row < (size_t)B * S * H;
    float acc = 0.f;
    if (live && c < D) {
        float o[8], g[8];
        load8(out + row * D + c, o);
        load8(dout + row * D + c, g);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += o[e] * g[e];
    }
    for (int o = 8; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (!live) return;
    int h = row % H;
    size_t bs = row / H;
    int b = bs / S, i = bs % S;
    size_t at = ((size_t)b * H + h) * S + i;
    if (lane == 0) delta[at] = acc;
    float4* z = reinterpret_cast<float4*>(dq + at * D);
    for (int v = lane; v < D / 4; v += 16) z[v] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// Dynamic shared memory of the backward for head dim D.
template <typename T, int D>
constexpr int backward_smem() {
    return (2 * 2 * 32 * (D + 8) + 128 * (D + 8) + 32 * 136) * (int)sizeof(T) + 2 * 3 * 32 * 4;
}

// Backward, step 2: one block = 8 warps = 128 keys of one (batch, query head); query tiles of 32,
// loaded two stages deep with cp.async (128 keys a block halve dQ's atomic additions against
// 64). dK and dV (per query head, f32) are written directly; dQ
// is accumulated atomically into a zeroed f32 buffer [B, H, S, D]. Dynamic shared memory (see
// backward_smem).
template <typename T, int D>
__device__ void flash_backward(const T* q, const T* k, const T* v, const int* seg, const T* dout,
                               const float* lse, const float* delta, float* dq, float* dk, float* dv,
                               T* dkv, const T* cos, const T* sin, int rd, int B, int H, int KVH,
                               int S, int T_, long q_b, long q_h, long q_s, long k_b, long k_h,
                               long k_t, int window, float scale) {
    constexpr int BK = 128, BQ = 32, LD = D + 8, LDS = BK + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem);      // [2][BQ][LD]
    T* dos = qs + 2 * BQ * LD;                // [2][BQ][LD]
    T* kst = dos + 2 * BQ * LD;               // [BK][LD]
    T* dss = kst + BK * LD;                   // [BQ][LDS]
    float* qlse = reinterpret_cast<float*>(dss + BQ * LDS);  // [2][BQ]
    float* qdelta = qlse + 2 * BQ;                            // [2][BQ]
    int* qseg = reinterpret_cast<int*>(qdelta + 2 * BQ);      // [2][BQ]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    // Earliest keys first: causal blocks near the start see the most queries.
    int k0 = blockIdx.x * BK, wk0 = k0 + warp * 16;
    int past = T_ - S;
    const T* qp = q + b * q_b + h * q_h;
    const T* kp = k + b * k_b + kvh * k_h;
    const T* vp = v + b * k_b + kvh * k_h;
    const T* dop = dout + (size_t)b * S * H * D + (size_t)h * D;  // row stride H·D
    const int* seg_b = seg ? seg + (size_t)b * T_ : nullptr;

    load_tile<T, D>(kst, kp + (size_t)k0 * k_t, k_t, BK, T_ - k0);
    // This warp's 16 keys as A fragments of K and V.
    uint32_t kf[D / 16][4], vf[D / 16][4];
    int r0 = wk0 + g, r1 = wk0 + g + 8;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        int c = kc * 16 + 2 * t;
        kf[kc][0] = r0 < T_ ? ld32(kp + r0 * k_t + c) : 0;
        kf[kc][1] = r1 < T_ ? ld32(kp + r1 * k_t + c) : 0;
        kf[kc][2] = r0 < T_ ? ld32(kp + r0 * k_t + c + 8) : 0;
        kf[kc][3] = r1 < T_ ? ld32(kp + r1 * k_t + c + 8) : 0;
        vf[kc][0] = r0 < T_ ? ld32(vp + r0 * k_t + c) : 0;
        vf[kc][1] = r1 < T_ ? ld32(vp + r1 * k_t + c) : 0;
        vf[kc][2] = r0 < T_ ? ld32(vp + r0 * k_t + c + 8) : 0;
        vf[kc][3] = r1 < T_ ? ld32(vp + r1 * k_t + c + 8) : 0;
    }
    int kseg0 = (seg_b && r0 < T_) ? seg_b[r0] : 0, kseg1 = (seg_b && r1 < T_) ? seg_b[r1] : 0;
    bool keys_real = wk0 + 16 <= T_;
    int warp_seg = __shfl_sync(0xffffffff, kseg0, 0);
    bool keys_one_segment = __all_sync(0xffffffff, kseg0 == warp_seg && kseg1 == warp_seg);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
        dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.f;
    float sl2 = scale * LOG2E;

    // Queries that can see a key of this block: positions k0 .. last key + window − 1.
    int first_q = max(k0 - past, 0);
    long last_pos = (long)min(k0 + BK, T_) - 1 + window - 1;
    int last_q = (int)min((long)S - 1, last_pos - past);
    int qt0 = first_q / BQ, qt1 = last_q / BQ;
    auto issue = [&](int qt, int stage) {
        int q0 = qt * BQ;
        load_tile_async<T, D>(qs + stage * BQ * LD, qp + (size_t)q0 * q_s, q_s, BQ, S - q0);
        load_tile_async<T, D>(dos + stage * BQ * LD, dop + (size_t)q0 * H * D, (size_t)H * D, BQ, S - q0);
        if (threadIdx.x < BQ) {
            int i = q0 + threadIdx.x, at = stage * BQ + threadIdx.x;
            qlse[at] = i < S ? lse[((size_t)b * H + h) * S + i] * LOG2E : INFINITY;
            qdelta[at] = i < S ? delta[((size_t)b * H + h) * S + i] : 0.f;
            qseg[at] = (seg_b && i < S) ? seg_b[past + i] : 0;
        }
    };
    if (qt0 <= qt1) issue(qt0, 0);
    cp_async_commit();
    for (int qt = qt0; qt <= qt1; ++qt) {
        int stage = (qt - qt0) & 1, q0 = qt * BQ;
        if (qt + 1 <= qt1) issue(qt + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* qst = qs + stage * BQ * LD;
        const T* dost = dos + stage * BQ * LD;
        const float* sl = qlse + stage * BQ;
        const float* sd = qdelta + stage * BQ;
        const int* sq = qseg + stage * BQ;
        // Sᵀ (16 keys × 32 queries) and dPᵀ = V·dOᵀ.
        float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
            st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
            dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
        }
        mma_a_xt_pair<T, D, BQ / 8>(st, kf, qst, dpt, vf, dost, LD);
        bool same_segment = true;
        if (seg_b) same_segment = keys_one_segment && warp_seg != 0 && __all_sync(0xffffffff, sq[lane] == warp_seg);
        bool full = keys_real && q0 + BQ <= S &&
                    all_visible(wk0, 16, past + q0, past + q0 + BQ - 1, T_, window, same_segment);
        // Pᵀ = exp(S·scale − lse) where visible; dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale.
        uint32_t pa[BQ / 16][4], dsa[BQ / 16][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int ql = j * 8 + 2 * t + (e & 1), i = q0 + ql;
                bool ok = true;
                if (!full)
                    ok = backward_visible(i, e >= 2 ? r1 : r0, e >= 2 ? kseg1 : kseg0, seg_b ? sq[ql] : 0,
                                          seg_b != nullptr, S, T_, past, window);
                p[e] = ok ? fast_exp2(st[j][e] * sl2 - sl[ql]) : 0.f;
                ds[e] = p[e] * (dpt[j][e] - sd[ql]) * scale;
            }
            pa[j / 2][(j % 2) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
            pa[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
            dsa[j / 2][(j % 2) * 2 + 0] = Mma<T>::pack(ds[0], ds[1]);
            dsa[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
            // dS (queries × keys) for dQ = dS·K, through shared memory.
            int ql = j * 8 + 2 * t, kl0 = warp * 16 + g;
            dss[ql * LDS + kl0] = from_f32<T>(ds[0]);
            dss[(ql + 1) * LDS + kl0] = from_f32<T>(ds[1]);
            dss[ql * LDS + kl0 + 8] = from_f32<T>(ds[2]);
            dss[(ql + 1) * LDS + kl0 + 8] = from_f32<T>(ds[3]);
        }
        // dV += Pᵀ·dO, dK += dSᵀ·Q.
#pragma unroll
        for (int kc = 0; kc < BQ / 16; ++kc) {
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t bb[4];
                load_b_trans_x4<T>(dost + kc * 16 * LD + dn * 8, LD, bb);
                Mma<T>::run(dva[dn], pa[kc], bb[0], bb[1]);
                Mma<T>::run(dva[dn + 1], pa[kc], bb[2], bb[3]);
                load_b_trans_x4<T>(qst + kc * 16 * LD + dn * 8, LD, bb);
                Mma<T>::run(dka[dn], dsa[kc], bb[0], bb[1]);
                Mma<T>::run(dka[dn + 1], dsa[kc], bb[2], bb[3]);
            }
        }
        __syncthreads();
        // dQ[q0 .. q0+32) += dS·K: warp w takes query rows (w / 4)·16 and a quarter of the d
        // columns (n8 tiles), with the keys (k) as the outer loop.
        {
            constexpr int NT = (D / 8 + 3) / 4;
            int mt = warp / 4, n_begin = (warp % 4) * NT;
            uint32_t af[BK / 16][4];
#pragma unroll
            for (int kc = 0; kc < BK / 16; ++kc) {
                const T* a = dss + (mt * 16 + g) * LDS + kc * 16 + 2 * t;
                af[kc][0] = ld32(a);
                af[kc][1] = ld32(a + 8 * LDS);
                af[kc][2] = ld32(a + 8);
                af[kc][3] = ld32(a + 8 * LDS + 8);
            }
            float acc[NT][4];
#pragma unroll
            for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < BK / 16; ++kc) {
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    if (n_begin + n < D / 8) {
                        uint32_t b0, b1;
                        load_b_trans<T>(kst + kc * 16 * LD + (n_begin + n) * 8, LD, b0, b1);
                        Mma<T>::run(acc[n], af[kc], b0, b1);
                    }
                }
            }
            int i0 = q0 + mt * 16 + g;
            float* dqr = dq + (((size_t)b * H + h) * S) * D;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                int c = (n_begin + n) * 8 + 2 * t;
                if (n_begin + n >= D / 8) continue;
                if (i0 < S) atomic_add2(dqr + (size_t)i0 * D + c, acc[n][0], acc[n][1]);
                if (i0 + 8 < S) atomic_add2(dqr + (size_t)(i0 + 8) * D + c, acc[n][2], acc[n][3]);
            }
        }
    }
    if (dkv) {
        static_assert(backward_dkv_staging<D>() <= backward_smem<T, D>(), "dK/dV staging exceeds the shared memory");
        backward_write_dkv<T, D>(dka, dva, reinterpret_cast<float*>(smem), dkv, cos, sin, rd, b, h, H, KVH, T_, k0,
                                 warp, g, t);
        return;
    }
    // dK, dV of this warp's keys, per query head: [B, H, T, D] f32.
    backward_store_dkv<D>(dka, dva, dk, dv, ((size_t)b * H + h) * T_, r0, T_, t);
}

#define FLASH(name, T, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(128, forward_row_tiles(D) == 2 ? 2 : 3) flash_forward_##name##_d##D(                 \
        const T* q, const T* k, const T* v, const int* seg, T* out, float* lse, int B, int H,      \
        int KVH, int S, int T_, long q_b, long q_h, long q_s, long k_b, long k_h, long k_t,        \
        int window, float scale) {                                                                 \
        flash_forward<T, D>(q, k, v, seg, out, lse, B, H, KVH, S, T_, q_b, q_h, q_s, k_b, k_h,     \
                            k_t, window, scale);                                                   \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) flash_backward_##name##_d##D(                \
        const T* q, const T* k, const T* v, const int* seg, const T* dout, const float* lse,       \
        const float* delta, float* dq, float* dk, float* dv, T* dkv, const T* cos, const T* sin,   \
        int rd, int B, int H, int KVH, int S, int T_, long q_b, long q_h, long q_s, long k_b,      \
        long k_h, long k_t, int window, float scale) {                                             \
        flash_backward<T, D>(q, k, v, seg, dout, lse, delta, dq, dk, dv, dkv, cos, sin, rd, B, H,  \
                             KVH, S, T_, q_b, q_h, q_s, k_b, k_h, k_t, window, scale);             \
    }
#define FLASH_ALL(name, T) \
    FLASH(name, T, 16) FLASH(name, T, 32) FLASH(name, T, 64) FLASH(name, T, 96) FLASH(name, T, 128)
FLASH_ALL(bf16, __nv_bfloat16)
FLASH_ALL(f16, __half)

// The gradient of the fused QKV projection from the backward's f32 results: one block per token
// row (b, s), its threads walking the first heads_out·d of the (h + 2·kvh)·d outputs (heads_out
// = h when the backward wrote dK and dV itself). q heads read dq; k and v heads sum dk / dv over
// the query heads of their group; q and k get RoPE's inverse rotation (rotate-half layout, the
// first rd dims; cos/sin [b, s, rd/2]; none when cos is null).
template <typename T>
__device__ void flash_qkv_grad(const float* dq, const float* dk, const float* dv, const T* cos,
                               const T* sin, T* out, int S, int H, int KVH, int D, int rd,
                               int heads_out) {
    int row = blockIdx.x, bi = row / S, si = row - bi * S;
    int heads = H + 2 * KVH, rep = H / KVH, half = rd / 2;
    T* dst = out + (size_t)row * heads * D;
    if (D % 8 == 0 && half % 8 == 0 && ((uintptr_t)cos | (uintptr_t)sin) % 16 == 0) {
        // 8 consecutive outputs a thread (16-byte stores; a rotated chunk's partner chunk is
        // 8-aligned too): the scalar loop below took 0.76 ms at b12 s2048 h32 d96.
        for (int e = threadIdx.x * 8; e < heads_out * D; e += blockDim.x * 8) {
            int hh = e / D, j = e - hh * D;
            bool is_q = hh < H, is_k = !is_q && hh < H + KVH;
            const float* src = is_q ? dq : is_k ? dk : dv;
            int first = is_q ? hh : (hh - (is_k ? H : H + KVH)) * rep, count = is_q ? 1 : rep;
            auto grad8 = [&](int c, float (&acc)[8]) {
                for (int i = 0; i < 8; ++i) acc[i] = 0.f;
                for (int g = 0; g < count; ++g) {
                    float x[8];
                    load8(src + (((size_t)bi * H + first + g) * S + si) * D + c, x);
                    for (int i = 0; i < 8; ++i) acc[i] += x[i];
                }
            };
            float val[8];
            grad8(j, val);
            if (cos && (is_q || is_k) && j < rd) {
                bool low = j < half;
                int f = low ? j : j - half;
                float other[8], c[8], sn[8];
                grad8(low ? j + half : j - half, other);
                load8(cos + (size_t)row * half + f, c);
                load8(sin + (size_t)row * half + f, sn);
                // out1 = x1·c − x2·s, out2 = x2·c + x1·s  ⇒  dx1 = g1·c + g2·s, dx2 = g2·c − g1·s.
#pragma unroll
                for (int i = 0; i < 8; ++i) val[i] = low ? val[i] * c[i] + other[i] * sn[i] : val[i] * c[i] - other[i] * sn[i];
            }
            store8(dst + e, val);
        }
        return;
    }
    for (int e = threadIdx.x; e < heads_out * D; e += blockDim.x) {
        int hh = e / D, j = e - hh * D;
        bool is_q = hh < H, is_k = !is_q && hh < H + KVH;
        const float* src = is_q ? dq : is_k ? dk : dv;
        int first = is_q ? hh : (hh - (is_k ? H : H + KVH)) * rep, count = is_q ? 1 : rep;
        auto grad = [&](int c) {
            float acc = 0.f;
            for (int g = 0; g < count; ++g) acc += src[(((size_t)bi * H + first + g) * S + si) * D + c];
            return acc;
        };
        float val;
        if (cos && (is_q || is_k) && j < rd) {
            int i = j < half ? j : j - half;
            float c = to_f32(cos[(size_t)row * half + i]), sn = to_f32(sin[(size_t)row * half + i]);
            // out1 = x1·c − x2·s, out2 = x2·c + x1·s  ⇒  dx1 = g1·c + g2·s, dx2 = g2·c − g1·s.
            val = j < half ? grad(j) * c + grad(j + half) * sn : grad(j) * c - grad(j - half) * sn;
        } else {
            val = grad(j);
        }
        dst[e] = from_f32<T>(val);
    }
}

#define QKV_GRAD(name, T)                                                                        \
    extern "C" __global__ void flash_qkv_grad_##name(const float* dq, const float* dk,          \
                                                     const float* dv, const T* cos, const T* sin, \
                                                     T* out, int S, int H, int KVH, int D, int rd, \
                                                     int heads_out) {                             \
        flash_qkv_grad<T>(dq, dk, dv, cos, sin, out, S, H, KVH, D, rd, heads_out);               \
    }
QKV_GRAD(bf16, __nv_bfloat16)
QKV_GRAD(f16, __half)

#define DELTA(name, T)                                                                            \
    extern "C" __global__ void flash_delta_##name(const T* out, const T* dout, float* delta,     \
                                                  float* dq, int B, int H, int S, int D) {        \
        flash_delta<T>(out, dout, delta, dq, B, H, S, D);                                         \
    }
DELTA(bf16, __nv_bfloat16)
DELTA(f16, __half)
