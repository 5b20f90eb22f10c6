// Flash attention on Hopper's warp-group MMA (wgmma, sm_90a): the same passes, arguments and
// results as flash_attention.cu's mma.sync kernels (see its header for the layouts and the
// masking rule): the forward, for head dims 64 and 96. Built only for sm_90a; the host side
// uses the mma.sync kernels on other GPUs and for other head dims.
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

// Byte offset of 16-byte chunk `cc` (0 .. D/8 − 1) of row r in a tile of `rows` rows.
__device__ __forceinline__ uint32_t tile_offset(int r, int cc, int rows) {
    int block = cc >> 2, c = cc & 3;
    return (uint32_t)(block * rows * 64 + r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

// Starts copying a [ROWS][D] tile (global row stride `stride`) into the swizzled layout at
// shared address `dst` with the block's NT threads; rows at or past `valid` are zero-filled.
// Each thread copies one 16-byte column chunk of every RP-th row (RP a multiple of 8, so the
// swizzle, and the thread's shared-memory step, stay the same from row to row).
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile_sw(unsigned char* dst, const T* src, size_t stride, int valid) {
    constexpr int V = D / 8, RP = (NT / V) >= 32 ? 32 : (NT / V) >= 16 ? 16 : 8;
    static_assert(ROWS % RP == 0 && RP * V <= NT, "tile rows must split evenly over the threads");
    int r = threadIdx.x / V, cc = threadIdx.x - r * V;
    if (r >= RP) return;
    unsigned char* d = dst + tile_offset(r, cc, ROWS);
    const T* p = src + (size_t)r * stride + cc * 8;
#pragma unroll
    for (int i = 0; i < ROWS / RP; ++i) {
        bool ok = r + i * RP < valid;
        cp_async16(d + i * RP * 64, ok ? p + (size_t)i * RP * stride : src, ok);
    }
}

// wgmma descriptor of a 64-byte-swizzled operand at shared address `p` (every tile starts on a
// 512-byte boundary, so the base-offset field stays 0).
__device__ __forceinline__ uint64_t sw64_desc(const void* p, uint32_t lbo, uint32_t sbo) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | (2ull << 62);
}

// K-major operand: rows `row0 ..` of a tile of `rows` rows, the k16 step kc of its columns.
__device__ __forceinline__ uint64_t kmajor(const unsigned char* tile, int rows, int row0, int kc) {
    return sw64_desc(tile + (kc >> 1) * rows * 64 + row0 * 64 + (kc & 1) * 32, 16, 512);
}

// MN-major operand: the k16 step kc of a tile's rows (k), all its columns (M or N).
__device__ __forceinline__ uint64_t mnmajor(const unsigned char* tile, int rows, int kc) {
    return sw64_desc(tile + kc * 16 * 64, rows * 64, 512);
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
