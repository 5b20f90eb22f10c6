// Flash attention on Hopper's warp-group MMA (wgmma, sm_90a): the same passes, arguments and
// results as flash_attention.cu's mma.sync kernels (see its header for the layouts and the
// masking rule): the forward and the backward's main pass, for head dims 64 and 96. Built only
// for sm_90a; the host side uses the mma.sync kernels on other GPUs and for other head dims.
//
// Shared-memory tiles. A [rows][D] tile is stored as D / 32 column blocks, each [rows][32]
// elements with 64-byte rows and the 64-byte swizzle (16-byte chunk c of row r at chunk
// c ^ ((r / 2) % 4)). Read through a wgmma descriptor the same bytes serve as a K-major operand
// (rows = M or N, the 32 columns = k: 8-row groups 512 bytes apart) and as an MN-major one
// (rows = k, columns = M or N: 32-column blocks `rows · 64` bytes apart): K and V are copied
// the same way, and V is read MN-major by P·V.
#include "flash_common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

// Byte offset of 16-byte chunk `cc` (0 .. D/8 − 1) of row r in a tile of `rows` rows, stored
// as column blocks of SW-byte rows with the SW-byte swizzle (SW 64 as above; SW 32: 16-column
// blocks, chunk c of row r at c ^ ((r / 4) % 2)).
template <int SW = 64>
__device__ __forceinline__ uint32_t tile_offset(int r, int cc, int rows) {
    constexpr int C = SW / 16;  // chunks per row of a block
    int block = cc / C, c = cc % C, x = ((r * SW) >> 7) & (C - 1);
    return (uint32_t)(block * rows * SW + r * SW + ((c ^ x) << 4));
}

// Starts copying a [ROWS][D] tile (global row stride `stride`) into the swizzled layout at
// shared address `dst` with the block's NT threads; rows at or past `valid` are zero-filled.
// Each thread copies one 16-byte column chunk of every RP-th row (RP a multiple of 8, so the
// swizzle, and the thread's shared-memory step, stay the same from row to row).
template <typename T, int D, int ROWS, int NT, int SW = 64>
__device__ __forceinline__ void load_tile_sw(unsigned char* dst, const T* src, size_t stride, int valid) {
    constexpr int V = D / 8, RP = (NT / V) >= 32 ? 32 : (NT / V) >= 16 ? 16 : 8;
    static_assert(ROWS % RP == 0 && RP * V <= NT, "tile rows must split evenly over the threads");
    int r = threadIdx.x / V, cc = threadIdx.x - r * V;
    if (r >= RP) return;
    unsigned char* d = dst + tile_offset<SW>(r, cc, ROWS);
    const T* p = src + (size_t)r * stride + cc * 8;
#pragma unroll
    for (int i = 0; i < ROWS / RP; ++i) {
        bool ok = r + i * RP < valid;
        cp_async16(d + i * RP * SW, ok ? p + (size_t)i * RP * stride : src, ok);
    }
}

// wgmma descriptor of an SW-byte-swizzled operand at shared address `p` (every tile starts on
// a 512-byte boundary, so the base-offset field stays 0; layout type 2 = 64-byte, 3 = 32-byte).
template <int SW>
__device__ __forceinline__ uint64_t sw_desc(const void* p, uint32_t lbo, uint32_t sbo) {
    static_assert(SW == 32 || SW == 64, "32- or 64-byte swizzle");
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | ((SW == 64 ? 2ull : 3ull) << 62);
}

// K-major operand: rows `row0 ..` of a tile of `rows` rows, the k16 step kc of its columns.
template <int SW = 64>
__device__ __forceinline__ uint64_t kmajor(const unsigned char* tile, int rows, int row0, int kc) {
    int block = kc * 32 / SW, within = kc * 32 % SW;
    return sw_desc<SW>(tile + block * rows * SW + row0 * SW + within, 16, 8 * SW);
}

// MN-major operand: the k16 step kc of a tile's rows (k), its columns (M or N) from col0 (a
// multiple of the SW / 2 columns of a block).
template <int SW = 64>
__device__ __forceinline__ uint64_t mnmajor(const unsigned char* tile, int rows, int kc, int col0 = 0) {
    return sw_desc<SW>(tile + col0 / (SW / 2) * rows * SW + kc * 16 * SW, rows * SW, 8 * SW);
}

// mbarriers (64-bit, in shared memory) for the copy pipeline: `full` completes when every
// thread's copies into a stage have landed, `empty` when every warp is done reading it.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Arrives on `bar` once all of this thread's earlier cp.async copies have completed.
__device__ __forceinline__ void mbar_arrive_copies(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar)) : "memory");
}
// Waits for the completion of the barrier's phase with parity `parity`.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    } while (!done);
}
// 4-byte asynchronous copy global → shared; with `valid` false the destination is zero-filled.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}

// The first 1024-byte boundary at or after `p` (the dynamic shared memory's start is only
// guaranteed 16-byte alignment; the swizzled tiles need their pattern's).
__device__ __forceinline__ unsigned char* align_smem(unsigned char* p) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return p + ((1024 - (a & 1023)) & 1023);
}

// Makes this thread's completed shared-memory writes (st.shared, cp.async) visible to wgmma's
// reads; a barrier must follow before other threads' wgmmas read them.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// Forward: one block = 3 warp groups = 192 queries of one (batch, head); key tiles of 128 copied
// one stage ahead by all threads and handed over through mbarriers (`full`: the copies have
// landed; `empty`: every warp is done with the stage) rather than block-wide barriers, so one
// group's softmax can overlap another's products on the tensor cores. Each warp group computes
// S = Q·Kᵀ (m64 n128, both operands from shared memory), the softmax in registers (maxima and
// sums in four partial chains per row: with three warps per scheduler, dependency latency is
// what the softmax spends its time on), then O += P·V with P as the register operand and V
// MN-major. Measured on the H200 (b4 h32 s2048 d96 causal, a throwaway harness): 0.353 ms
// against the mma.sync kernel's 0.692. Issuing the next tile's S before the softmax
// (FlashAttention-3's overlap within a group: 0.482 ms), two groups or 64-key tiles, a third
// stage, and turns passed between the groups through named barriers were all slower.
constexpr int WG_FORWARD_GROUPS = 3, WG_FORWARD_KEYS = 128, WG_FORWARD_STAGES = 2;

// Dynamic shared memory of the forward (Q, K and V tiles, segment ids, mbarriers; + 1024: the
// kernel aligns its tiles to the swizzle pattern itself). `attention.rs` computes the same.
template <typename T, int D>
constexpr int wg_forward_smem() {
    return (64 * WG_FORWARD_GROUPS + WG_FORWARD_STAGES * 2 * WG_FORWARD_KEYS) * D * (int)sizeof(T) +
           WG_FORWARD_STAGES * (WG_FORWARD_KEYS * 4 + 16) + 1024;
}

template <typename T, int D>
__device__ void flash_forward_wg(const T* q, const T* k, const T* v, const int* seg, T* out,
                                 float* lse, int B, int H, int KVH, int S, int T_, long q_b, long q_h,
                                 long q_s, long k_b, long k_h, long k_t, int window, float scale) {
    constexpr int NWG = WG_FORWARD_GROUPS, BM = 64 * NWG, BN = WG_FORWARD_KEYS, NS = WG_FORWARD_STAGES;
    constexpr int TILE_Q = BM * D * (int)sizeof(T), TILE_K = BN * D * (int)sizeof(T);
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* qs = align_smem(smem_raw);        // [BM][D]
    unsigned char* ks = qs + TILE_Q;                 // [NS][BN][D]
    unsigned char* vs = ks + NS * TILE_K;            // [NS][BN][D]
    int* kseg = reinterpret_cast<int*>(vs + NS * TILE_K);  // [NS][BN]
    uint64_t* full = reinterpret_cast<uint64_t*>(kseg + NS * BN);  // [NS]
    uint64_t* empty = full + NS;                                   // [NS]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int wg = warp / 4;
    int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    int q0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest rows first
    int gq0 = q0 + wg * 64, wq0 = gq0 + (warp % 4) * 16;
    int past = T_ - S;
    const T* qp = q + b * q_b + h * q_h;
    const T* kp = k + b * k_b + kvh * k_h;
    const T* vp = v + b * k_b + kvh * k_h;
    const int* seg_b = seg ? seg + (size_t)b * T_ : nullptr;

    int rows[2] = {wq0 + g, wq0 + g + 8};
    int qseg[2];
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) qseg[hi] = (seg_b && rows[hi] < S) ? seg_b[past + rows[hi]] : 0;
    int warp_seg = __shfl_sync(0xffffffff, qseg[0], 0);
    bool rows_one_segment = __all_sync(0xffffffff, qseg[0] == warp_seg && qseg[1] == warp_seg);
    bool rows_real = wq0 + 15 < S;

    float o[D / 2], s[BN / 2];
    uint32_t pf[BN / 16][4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f}, rescale[2] = {1.f, 1.f};
    float sl2 = scale * LOG2E;

    int last_q = min(q0 + BM, S) - 1 + past;
    long first_key = (long)past + q0 - window + 1;
    int kt0 = first_key > 0 ? (int)(first_key / BN) : 0;
    int kt1 = min(last_q, T_ - 1) / BN;
    auto stage_of = [&](int kt) { return (kt - kt0) % NS; };
    // Copies tile kt into its stage once every warp has released the stage's previous tile.
    auto issue = [&](int kt) {
        int k0 = kt * BN, st = stage_of(kt), round = (kt - kt0) / NS;
        if (round > 0) mbar_wait(&empty[st], (round - 1) & 1);
        load_tile_sw<T, D, BN, 128 * NWG>(ks + st * TILE_K, kp + (size_t)k0 * k_t, k_t, T_ - k0);
        load_tile_sw<T, D, BN, 128 * NWG>(vs + st * TILE_K, vp + (size_t)k0 * k_t, k_t, T_ - k0);
        if (threadIdx.x < BN) {
            bool ok = seg_b && k0 + threadIdx.x < T_;
            cp_async4(&kseg[st * BN + threadIdx.x], ok ? seg_b + k0 + threadIdx.x : seg, ok);
        }
        mbar_arrive_copies(&full[st]);
    };
    auto arrived = [&](int kt) {
        mbar_wait(&full[stage_of(kt)], ((kt - kt0) / NS) & 1);
        fence_async_shared();
    };
    auto release = [&](int kt) {
        if (lane == 0) mbar_arrive(&empty[stage_of(kt)]);
    };
    // Whether this warp group's rows see a key of tile kt (wgmma is issued per warp group).
    int glast = past + min(gq0 + 64, S) - 1;
    auto seen = [&](int kt) {
        int k0 = kt * BN;
        return kt <= kt1 && gq0 < S && glast >= k0 && (long)past + gq0 - (k0 + BN - 1) < window;
    };
    auto issue_scores = [&](int kt) {
        const unsigned char* kst = ks + stage_of(kt) * TILE_K;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
            Wgmma<T, BN>::template ss<0, 0>(s, kmajor(qs, BM, wg * 64, kc), kmajor(kst, BN, 0, kc), kc > 0);
        wgmma_commit();
    };
    // Softmax of tile kt's scores (in place: s becomes the unnormalised probabilities), the
    // running max and sums; `rescale` is what O must be multiplied by before P·V of tile kt.
    auto softmax = [&](int kt) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) wgmma_pin(s[i]);
        int k0 = kt * BN;
        const int* ksg = kseg + stage_of(kt) * BN;
        bool same_segment = true;
        if (seg_b) {
            bool keys_one = true;
#pragma unroll
            for (int i = 0; i < BN / 32; ++i) keys_one = keys_one && ksg[lane + 32 * i] == warp_seg;
            same_segment = rows_one_segment && warp_seg != 0 && __all_sync(0xffffffff, keys_one);
        }
        bool unmasked = rows_real && all_visible(k0, BN, past + wq0, past + wq0 + 15, T_, window, same_segment);
        if (!unmasked) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int hi = e >> 1, key = k0 + j * 8 + 2 * t + (e & 1);
                    bool ok = rows[hi] < S && visible(key, past + rows[hi], T_, window,
                                                       seg_b ? ksg - k0 : nullptr, qseg[hi]);
                    if (!ok) s[4 * j + e] = -INFINITY;
                }
            }
        }
        // Four partial maxima (and sums below) per row: short dependency chains.
        float part[2][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) part[i / 4][i % 4] = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[e >> 1][(j & 1) * 2 + (e & 1)] = fmaxf(part[e >> 1][(j & 1) * 2 + (e & 1)], s[4 * j + e]);
        float mx[2];
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) mx[hi] = fmaxf(fmaxf(part[hi][0], part[hi][1]), fmaxf(part[hi][2], part[hi][3]));
        float u[2];
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            mx[hi] = fmaxf(mx[hi], __shfl_xor_sync(0xffffffff, mx[hi], 1));
            mx[hi] = fmaxf(mx[hi], __shfl_xor_sync(0xffffffff, mx[hi], 2));
            float n = fmaxf(mrow[hi], mx[hi] * sl2);
            // A row that has seen no key yet keeps exponent base 0 so that exp2 stays finite.
            u[hi] = n == -INFINITY ? 0.f : n;
            rescale[hi] = fast_exp2(mrow[hi] - u[hi]);
            mrow[hi] = n;
            lrow[hi] *= rescale[hi];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) part[i / 4][i % 4] = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[4 * j + e] = fast_exp2(fmaf(s[4 * j + e], sl2, -u[e >> 1]));
                part[e >> 1][(j & 1) * 2 + (e & 1)] += s[4 * j + e];
            }
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) lrow[hi] += (part[hi][0] + part[hi][1]) + (part[hi][2] + part[hi][3]);
    };
    // Once no P·V is in flight: O *= rescale, and the probabilities packed as P·V's A operand.
    auto apply = [&]() {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) wgmma_pin(o[i]);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[4 * i] *= rescale[0]; o[4 * i + 1] *= rescale[0];
            o[4 * i + 2] *= rescale[1]; o[4 * i + 3] *= rescale[1];
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            pf[j / 2][(j % 2) * 2] = Mma<T>::pack(s[4 * j], s[4 * j + 1]);
            pf[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(s[4 * j + 2], s[4 * j + 3]);
        }
    };

    if (threadIdx.x < NS) {
        mbar_init(&full[threadIdx.x], blockDim.x);
        mbar_init(&empty[threadIdx.x], blockDim.x / 32);
    }
    load_tile_sw<T, D, BM, 128 * NWG>(qs, qp + (size_t)q0 * q_s, q_s, S - q0);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();
    for (int kt = kt0; kt <= min(kt0 + NS - 2, kt1); ++kt) issue(kt);
    for (int kt = kt0; kt <= kt1; ++kt) {
        if (kt + NS - 1 <= kt1) issue(kt + NS - 1);
        if (seen(kt)) {
            arrived(kt);
            wgmma_fence();
            issue_scores(kt);
            wgmma_wait<0>();
            softmax(kt);
            apply();
            const unsigned char* vst = vs + stage_of(kt) * TILE_K;
            wgmma_fence();
#pragma unroll
            for (int kc = 0; kc < BN / 16; ++kc) Wgmma<T, D>::template rs<1>(o, pf[kc], mnmajor(vst, BN, kc), true);
            wgmma_commit();
            wgmma_wait<0>();
        }
        release(kt);
    }
    float inv[2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) wgmma_pin(o[i]);
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
        float l = lrow[hi];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        lrow[hi] = l;
        inv[hi] = l > 0.f ? 1.f / l : 0.f;
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        int c = dn * 8 + 2 * t;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            if (rows[hi] < S)
                *reinterpret_cast<uint32_t*>(out + (((size_t)b * S + rows[hi]) * H + h) * D + c) =
                    Mma<T>::pack(o[4 * dn + 2 * hi] * inv[hi], o[4 * dn + 2 * hi + 1] * inv[hi]);
        }
    }
    if (t == 0) {
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            if (rows[hi] < S)
                lse[((size_t)b * H + h) * S + rows[hi]] =
                    lrow[hi] > 0.f ? (mrow[hi] + log2f(lrow[hi])) / LOG2E : INFINITY;
        }
    }
}

#define FLASH_WG(name, T, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128 * WG_FORWARD_GROUPS, 1)                         \
        flash_forward_wg_##name##_d##D(const T* q, const T* k, const T* v, const int* seg, T* out,   \
                                       float* lse, int B, int H, int KVH, int S, int T_, long q_b,   \
                                       long q_h, long q_s, long k_b, long k_h, long k_t, int window, \
                                       float scale) {                                                \
        flash_forward_wg<T, D>(q, k, v, seg, out, lse, B, H, KVH, S, T_, q_b, q_h, q_s, k_b, k_h,    \
                               k_t, window, scale);                                                  \
    }
// Head dims 64 and 96 (Phi-3's); 128 would spill with three groups' registers.
FLASH_WG(bf16, __nv_bfloat16, 64)
FLASH_WG(bf16, __nv_bfloat16, 96)
FLASH_WG(f16, __half, 64)
FLASH_WG(f16, __half, 96)

// ---------------------------------------------------------------------------------------------
// Backward (step 2 of flash_attention.cu's three): one block = 2 warp groups = 128 keys of one
// (batch, query head), group g owning keys g·64 .. g·64 + 63; query tiles of 64 copied one
// stage ahead behind mbarriers, as in the forward. Per tile, each group computes
// Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (m64 n64, operands from shared memory), Pᵀ and
// dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale in registers, then dV += Pᵀ·dO and dK += dSᵀ·Q (Pᵀ and dSᵀ
// as register operands, dO and Q MN-major). dQ = dS·K needs all 128 keys: both groups store
// their dSᵀ (two buffers, alternating by tile), and after one block-wide barrier group g
// computes dQ's columns g·D/2 .. (g + 1)·D/2 − 1 (dSᵀ read as an MN-major A; K in the 32-byte
// swizzle, so that the split falls on a swizzle atom) and adds them atomically into the f32 dQ.
// Measured on the H200 (b4 h32 s2048 d96 causal, a throwaway harness): 1.12 ms against the
// mma.sync kernel's 1.79; without the atomics (wrong dQ) it would take 0.94, but staging dQ in
// shared memory for bulk asynchronous reductions (cp.reduce.async.bulk, one per query row) took
// 1.23. Skipping the products of a group whose keys no query of the tile sees changed nothing.
constexpr int WG_BACKWARD_KEYS = 128, WG_BACKWARD_QUERIES = 64, WG_BACKWARD_STAGES = 2;

// Dynamic shared memory of the backward (K, V; Q and dO stages; two dSᵀ buffers; per-query
// logsumexp, delta and segment per stage; mbarriers; + 1024 for alignment). `attention.rs`
// computes the same.
template <typename T, int D>
constexpr int wg_backward_smem() {
    constexpr int BK = WG_BACKWARD_KEYS, BQ = WG_BACKWARD_QUERIES, NS = WG_BACKWARD_STAGES;
    constexpr int bytes = (2 * BK * D + NS * 2 * BQ * D + 2 * BK * BQ) * (int)sizeof(T) + NS * (3 * BQ * 4 + 16) + 1024;
    return bytes > backward_dkv_staging<D>() + 1024 ? bytes : backward_dkv_staging<D>() + 1024;
}

template <typename T, int D>
__device__ void flash_backward_wg(const T* q, const T* k, const T* v, const int* seg, const T* dout,
                                  const float* lse, const float* delta, float* dq, float* dk, float* dv,
                                  T* dkv, const T* cos, const T* sin, int rd, int B, int H, int KVH,
                                  int S, int T_, long q_b, long q_h, long q_s, long k_b, long k_h,
                                  long k_t, int window, float scale) {
    constexpr int BK = WG_BACKWARD_KEYS, BQ = WG_BACKWARD_QUERIES, NS = WG_BACKWARD_STAGES, NQ = D / 2;
    constexpr int TILE_K = BK * D * (int)sizeof(T), TILE_Q = BQ * D * (int)sizeof(T);
    constexpr int TILE_DS = BK * BQ * (int)sizeof(T);
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* base = align_smem(smem_raw);
    unsigned char* ks = base;                    // [BK][D], 32-byte swizzle
    unsigned char* vs = ks + TILE_K;             // [BK][D]
    unsigned char* qs = vs + TILE_K;             // [NS][BQ][D]
    unsigned char* dos = qs + NS * TILE_Q;       // [NS][BQ][D]
    unsigned char* dss = dos + NS * TILE_Q;      // [2][BK][BQ]: dSᵀ, keys × queries
    float* qlse = reinterpret_cast<float*>(dss + 2 * TILE_DS);  // [NS][BQ]
    float* qdelta = qlse + NS * BQ;                              // [NS][BQ]
    int* qseg = reinterpret_cast<int*>(qdelta + NS * BQ);        // [NS][BQ]
    uint64_t* full = reinterpret_cast<uint64_t*>(qseg + NS * BQ);  // [NS]
    uint64_t* empty = full + NS;                                   // [NS]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int wg = warp / 4, wl = warp % 4;
    int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    // Earliest keys first: causal blocks near the start see the most queries.
    int k0 = blockIdx.x * BK, wk0 = k0 + wg * 64 + wl * 16;
    int past = T_ - S;
    const T* qp = q + b * q_b + h * q_h;
    const T* kp = k + b * k_b + kvh * k_h;
    const T* vp = v + b * k_b + kvh * k_h;
    const T* dop = dout + (size_t)b * S * H * D + (size_t)h * D;  // row stride H·D
    const int* seg_b = seg ? seg + (size_t)b * T_ : nullptr;

    int r0 = wk0 + g, r1 = wk0 + g + 8;
    int kseg0 = (seg_b && r0 < T_) ? seg_b[r0] : 0, kseg1 = (seg_b && r1 < T_) ? seg_b[r1] : 0;
    bool keys_real = wk0 + 16 <= T_;
    int warp_seg = __shfl_sync(0xffffffff, kseg0, 0);
    bool keys_one_segment = __all_sync(0xffffffff, kseg0 == warp_seg && kseg1 == warp_seg);
    float dka[D / 2], dva[D / 2], sa[BQ / 2], dpa[BQ / 2], dqa[NQ / 2];
    uint32_t pf[BQ / 16][4], dsf[BQ / 16][4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dka[i] = dva[i] = 0.f;
    float sl2 = scale * LOG2E;

    // Queries that can see a key of this block: positions k0 .. last key + window − 1.
    int first_q = max(k0 - past, 0);
    long last_pos = (long)min(k0 + BK, T_) - 1 + window - 1;
    int last_q = (int)min((long)S - 1, last_pos - past);
    int qt0 = first_q / BQ, qt1 = last_q / BQ;
    auto stage_of = [&](int qt) { return (qt - qt0) % NS; };
    auto issue = [&](int qt) {
        int q0 = qt * BQ, st = stage_of(qt), round = (qt - qt0) / NS;
        if (round > 0) mbar_wait(&empty[st], (round - 1) & 1);
        load_tile_sw<T, D, BQ, 2 * 128, 64>(qs + st * TILE_Q, qp + (size_t)q0 * q_s, q_s, S - q0);
        load_tile_sw<T, D, BQ, 2 * 128, 64>(dos + st * TILE_Q, dop + (size_t)q0 * H * D, (size_t)H * D, S - q0);
        if (threadIdx.x < BQ) {
            int i = q0 + threadIdx.x, at = st * BQ + threadIdx.x;
            bool ok = i < S;
            size_t row = ((size_t)b * H + h) * S + i;
            cp_async4(&qlse[at], ok ? lse + row : lse, ok);
            cp_async4(&qdelta[at], ok ? delta + row : delta, ok);
            if (seg_b) cp_async4(&qseg[at], ok ? seg_b + past + i : seg, ok);
        }
        mbar_arrive_copies(&full[st]);
    };

    if (threadIdx.x < NS) {
        mbar_init(&full[threadIdx.x], blockDim.x);
        mbar_init(&empty[threadIdx.x], blockDim.x / 32);
    }
    __syncthreads();
    // K and V ride with the first stage's copies (its `full` barrier covers them).
    load_tile_sw<T, D, BK, 2 * 128, 32>(ks, kp + (size_t)k0 * k_t, k_t, T_ - k0);
    load_tile_sw<T, D, BK, 2 * 128, 64>(vs, vp + (size_t)k0 * k_t, k_t, T_ - k0);
    if (qt0 <= qt1) issue(qt0);
    for (int qt = qt0; qt <= qt1; ++qt) {
        int st = stage_of(qt), q0 = qt * BQ;
        if (qt + 1 <= qt1) issue(qt + 1);
        mbar_wait(&full[st], ((qt - qt0) / NS) & 1);
        fence_async_shared();
        const unsigned char* qst = qs + st * TILE_Q;
        const unsigned char* dost = dos + st * TILE_Q;
        const float* sl = qlse + st * BQ;
        const float* sd = qdelta + st * BQ;
        const int* sq = qseg + st * BQ;
        unsigned char* dsb = dss + ((qt - qt0) & 1) * TILE_DS;
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
            Wgmma<T, BQ>::template ss<0, 0>(sa, kmajor<32>(ks, BK, wg * 64, kc), kmajor<64>(qst, BQ, 0, kc), kc > 0);
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
            Wgmma<T, BQ>::template ss<0, 0>(dpa, kmajor<64>(vs, BK, wg * 64, kc), kmajor<64>(dost, BQ, 0, kc), kc > 0);
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < BQ / 2; ++i) {
            wgmma_pin(sa[i]);
            wgmma_pin(dpa[i]);
        }
        bool same_segment = true;
        if (seg_b)
            same_segment = keys_one_segment && warp_seg != 0 &&
                           __all_sync(0xffffffff, sq[lane] == warp_seg && sq[lane + 32] == warp_seg);
        bool unmasked = keys_real && q0 + BQ <= S &&
                        all_visible(wk0, 16, past + q0, past + q0 + BQ - 1, T_, window, same_segment);
        // Pᵀ = exp(S·scale − lse) where visible; dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale. Thread holds
        // keys r0 (e < 2) and r1, queries j·8 + 2t + (e & 1).
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int ql = j * 8 + 2 * t + (e & 1), i = q0 + ql;
                bool ok = true;
                if (!unmasked)
                    ok = backward_visible(i, e >= 2 ? r1 : r0, e >= 2 ? kseg1 : kseg0, seg_b ? sq[ql] : 0,
                                          seg_b != nullptr, S, T_, past, window);
                p[e] = ok ? fast_exp2(fmaf(sa[4 * j + e], sl2, -sl[ql] * LOG2E)) : 0.f;
                ds[e] = p[e] * (dpa[4 * j + e] - sd[ql]) * scale;
            }
            pf[j / 2][(j % 2) * 2] = Mma<T>::pack(p[0], p[1]);
            pf[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
            dsf[j / 2][(j % 2) * 2] = Mma<T>::pack(ds[0], ds[1]);
            dsf[j / 2][(j % 2) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
            // dSᵀ rows (keys) of this thread, queries j·8 + 2t and + 1: 4 bytes of chunk j.
            int kl = wg * 64 + wl * 16 + g;
            *reinterpret_cast<uint32_t*>(dsb + tile_offset<64>(kl, j, BK) + 4 * t) = dsf[j / 2][(j % 2) * 2];
            *reinterpret_cast<uint32_t*>(dsb + tile_offset<64>(kl + 8, j, BK) + 4 * t) = dsf[j / 2][(j % 2) * 2 + 1];
        }
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < BQ / 16; ++kc) Wgmma<T, D>::template rs<1>(dva, pf[kc], mnmajor<64>(dost, BQ, kc), true);
#pragma unroll
        for (int kc = 0; kc < BQ / 16; ++kc) Wgmma<T, D>::template rs<1>(dka, dsf[kc], mnmajor<64>(qst, BQ, kc), true);
        wgmma_commit();
        fence_async_shared();
        __syncthreads();  // both groups' dSᵀ are in place
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc)
            Wgmma<T, NQ>::template ss<1, 1>(dqa, mnmajor<64>(dsb, BK, kc), mnmajor<32>(ks, BK, kc, wg * NQ), kc > 0);
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < NQ / 2; ++i) wgmma_pin(dqa[i]);
#pragma unroll
        for (int i = 0; i < D / 2; ++i) {
            wgmma_pin(dka[i]);
            wgmma_pin(dva[i]);
        }
        if (lane == 0) mbar_arrive(&empty[st]);
        int i0 = q0 + wl * 16 + g;
        float* dqr = dq + (((size_t)b * H + h) * S) * D + wg * NQ;
#pragma unroll
        for (int n = 0; n < NQ / 8; ++n) {
            int c = n * 8 + 2 * t;
            if (i0 < S) atomic_add2(dqr + (size_t)i0 * D + c, dqa[4 * n], dqa[4 * n + 1]);
            if (i0 + 8 < S) atomic_add2(dqr + (size_t)(i0 + 8) * D + c, dqa[4 * n + 2], dqa[4 * n + 3]);
        }
    }
    cp_async_wait<0>();  // with no query tile, K and V may still be landing
    if (dkv) {
        __syncthreads();  // every group is done with the tiles the staging overwrites
        backward_write_dkv<T, D>(reinterpret_cast<const float(*)[4]>(dka), reinterpret_cast<const float(*)[4]>(dva),
                                 reinterpret_cast<float*>(base), dkv, cos, sin, rd, b, h, H, KVH, T_, k0, warp, g, t);
        return;
    }
    // dK, dV of this warp's keys, per query head: [B, H, T, D] f32.
    backward_store_dkv<D>(reinterpret_cast<const float(*)[4]>(dka), reinterpret_cast<const float(*)[4]>(dva), dk, dv,
                          ((size_t)b * H + h) * T_, r0, T_, t);
}

#define FLASH_WG_BACKWARD(name, T, D)                                                              \
    extern "C" __global__ void __launch_bounds__(256, 1) flash_backward_wg_##name##_d##D(          \
        const T* q, const T* k, const T* v, const int* seg, const T* dout, const float* lse,       \
        const float* delta, float* dq, float* dk, float* dv, T* dkv, const T* cos, const T* sin,   \
        int rd, int B, int H, int KVH, int S, int T_, long q_b, long q_h, long q_s, long k_b,      \
        long k_h, long k_t, int window, float scale) {                                             \
        flash_backward_wg<T, D>(q, k, v, seg, dout, lse, delta, dq, dk, dv, dkv, cos, sin, rd, B,  \
                                H, KVH, S, T_, q_b, q_h, q_s, k_b, k_h, k_t, window, scale);       \
    }
FLASH_WG_BACKWARD(bf16, __nv_bfloat16, 64)
FLASH_WG_BACKWARD(bf16, __nv_bfloat16, 96)
FLASH_WG_BACKWARD(f16, __half, 64)
FLASH_WG_BACKWARD(f16, __half, 96)
