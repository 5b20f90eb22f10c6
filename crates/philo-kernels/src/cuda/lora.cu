// LoRA's rank-r products with the adapter's dropout applied inside them, so that the dropped-out
// input is never written: the mask of element (row, col) of a [rows, K] input is
// dropout_uniform(seed, row·K + col) ≥ p, exactly the mask of `dropout` on that input, and the
// 1/(1 − p) scale is applied to the f32 accumulators. p = 0 means no dropout (no hashing).
// The references are `lora::reference_*` on the Rust side.
//
//   lora_down:   down[rows, R]  = keep · (mask ∘ x)[rows, K] · Aᵀ        (A [R, K]), split over K
//                when rows are few, the f32 partial sums then added by lora_down_sum
//   lora_grad_a: gA[R, K]      += keep · d_downᵀ[R, rows] · (mask ∘ x)   (f32, atomics)
//   lora_up:     dx[rows, K]    = keep · mask ∘ (d_down[rows, R] · A), or += when accumulating
// K is a multiple of 64 and R one of 16, 32, 64, 128 (the host checks and otherwise falls back
// to dropout + cuBLAS). x's rows are ldx apart and down's ld_out apart (a caller may keep x and
// down side by side in one [rows, K + R] buffer), d_down's ldd apart and dx's ld_dx apart (the
// backward may get dx and d_down side by side from one GEMM); the mask is that of the logical
// [rows, K].
#include "dropout.cuh"
#include "mma.cuh"

// Zeroes the halves of a packed pair of adjacent elements i and i + 1 (i even) that dropout
// drops: one hash for both.
__device__ __forceinline__ uint32_t mask_adjacent(uint32_t v, unsigned long long seed, float p,
                                                  unsigned long long i) {
    bool drop0, drop1;
    dropout_pair(seed, i, p, drop0, drop1);
    if (drop0) v &= 0xFFFF0000u;
    if (drop1) v &= 0x0000FFFFu;
    return v;
}

// Starts copying a [rows][cols] tile (global row stride `stride`, cols a multiple of 8) to
// shared memory with row stride ld; rows at or past `valid` are zero-filled.
template <typename T>
__device__ __forceinline__ void tile_async(T* dst, int ld, const T* src, size_t stride, int rows,
                                           int cols, int valid) {
    int v = cols / 8;
    for (int i = threadIdx.x; i < rows * v; i += blockDim.x) {
        int r = i / v, c = (i - r * v) * 8;
        bool ok = r < valid;
        cp_async16(dst + r * ld + c, ok ? src + r * stride + c : src, ok);
    }
}

// ---------------------------------------------------------------------------------------------
// down = keep · (mask ∘ x) · Aᵀ: one block = 4 warps = 64 rows × all R columns over the input
// columns [blockIdx.y · split_len, + split_len) in tiles of 64, three stages of cp.async. Each x
// element is read (and hashed) once. With one split the block writes `out` (T [rows, R]);
// with several, its f32 partial sum without the keep scale goes to out = float [splits][rows][R]
// and `lora_down_sum` adds them (splitting K keeps the machine busy when rows are few).
template <typename T, int R>
__device__ void lora_down(const T* x, const T* a, void* out, int rows, int K, int ldx, int ld_out,
                          int split_len, unsigned long long seed, float p) {
    constexpr int BM = 64, BK = 64, LD = BK + 8, STAGES = 3, NJ = R / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T* xs = reinterpret_cast<T*>(smem);  // [STAGES][BM][LD]
    T* as = xs + STAGES * BM * LD;       // [STAGES][R][LD]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int row0 = blockIdx.x * BM, k_begin = blockIdx.y * split_len;
    int tiles = (min(K, k_begin + split_len) - k_begin) / BK;
    auto issue = [&](int kt, int stage) {
        int k0 = k_begin + kt * BK;
        tile_async<T>(xs + stage * BM * LD, LD, x + (size_t)row0 * ldx + k0, ldx, BM, BK, rows - row0);
        tile_async<T>(as + stage * R * LD, LD, a + k0, K, R, BK, R);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) issue(s, s);
        cp_async_commit();
    }
    float acc[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    int wrow = row0 + warp * 16 + g;  // this lane's first row
    for (int kt = 0; kt < tiles; ++kt) {
        int stage = kt % STAGES;
        if (kt + STAGES - 1 < tiles) issue(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        uint32_t af[BK / 16][4];
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc) {
            load_a_x4<T>(xs + stage * BM * LD + warp * 16 * LD + kc * 16, LD, af[kc]);
            if (p > 0.f) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    // a0: (row g, cols 2t, 2t+1), a1: row g + 8, a2: cols + 8, a3: both.
                    unsigned long long i = (unsigned long long)(wrow + (e & 1) * 8) * K + k_begin +
                                           kt * BK + kc * 16 + (e >> 1) * 8 + 2 * t;
                    af[kc][e] = mask_adjacent(af[kc][e], seed, p, i);
                }
            }
        }
        mma_a_xt<T, BK, NJ>(acc, af, as + stage * R * LD, LD);
        __syncthreads();  // the stage is free for the copy issued next iteration
    }
    if (gridDim.y > 1) {
        float* part = reinterpret_cast<float*>(out) + (size_t)blockIdx.y * rows * R;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            int c = j * 8 + 2 * t;
            if (wrow < rows)
                *reinterpret_cast<float2*>(part + (size_t)wrow * R + c) = make_float2(acc[j][0], acc[j][1]);
            if (wrow + 8 < rows)
                *reinterpret_cast<float2*>(part + (size_t)(wrow + 8) * R + c) = make_float2(acc[j][2], acc[j][3]);
        }
        return;
    }
    T* down = reinterpret_cast<T*>(out);
    float keep = p > 0.f ? 1.f / (1.f - p) : 1.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        int c = j * 8 + 2 * t;
        if (wrow < rows)
            *reinterpret_cast<uint32_t*>(down + (size_t)wrow * ld_out + c) =
                Mma<T>::pack(acc[j][0] * keep, acc[j][1] * keep);
        if (wrow + 8 < rows)
            *reinterpret_cast<uint32_t*>(down + (size_t)(wrow + 8) * ld_out + c) =
                Mma<T>::pack(acc[j][2] * keep, acc[j][3] * keep);
    }
}

// down[row, c] (rows ld_out apart) = keep · Σ_s part[s][row][c] over [rows, r].
template <typename T>
__device__ void lora_down_sum(const float* part, T* down, int rows, int r, int ld_out, int splits,
                              float keep) {
    int n = rows * r;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < splits; ++s) v += part[(size_t)s * n + e];
        down[(size_t)(e / r) * ld_out + e % r] = from_f32<T>(v * keep);
    }
}

// ---------------------------------------------------------------------------------------------
// gA += keep · d_downᵀ · (mask ∘ x): one block = 4 warps = all R rows × 64 columns of gA, over
// `rows_per_block` input rows (blockIdx.y picks which) in steps of 32, three stages of cp.async;
// warp w owns columns 16w .. 16w + 16. The partial sums are added to gA atomically.
template <typename T, int R>
__device__ void lora_grad_a(const T* x, const T* dd, float* ga, int rows, int K, int ldx, int ldd,
                            int rows_per_block, unsigned long long seed, float p) {
    constexpr int BN = 64, BR = 32, LDX = BN + 8, LDD = R + 8, STAGES = 3, MT = R / 16;
    extern __shared__ __align__(16) unsigned char smem[];
    T* xs = reinterpret_cast<T*>(smem);  // [STAGES][BR][LDX]
    T* ds = xs + STAGES * BR * LDX;      // [STAGES][BR][LDD]
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int col0 = blockIdx.x * BN, r_begin = blockIdx.y * rows_per_block;
    int r_end = min(rows, r_begin + rows_per_block);
    int steps = r_end > r_begin ? (r_end - r_begin + BR - 1) / BR : 0;
    auto issue = [&](int st, int stage) {
        int r0 = r_begin + st * BR;
        tile_async<T>(xs + stage * BR * LDX, LDX, x + (size_t)r0 * ldx + col0, ldx, BR, BN, r_end - r0);
        tile_async<T>(ds + stage * BR * LDD, LDD, dd + (size_t)r0 * ldd, ldd, BR, R, r_end - r0);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps) issue(s, s);
        cp_async_commit();
    }
    float acc[MT][2][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
    int wcol = col0 + warp * 16;
    for (int st = 0; st < steps; ++st) {
        int stage = st % STAGES, r0 = r_begin + st * BR;
        if (st + STAGES - 1 < steps) issue(st + STAGES - 1, (st + STAGES - 1) % STAGES);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        const T* xt = xs + stage * BR * LDX;
        const T* dt = ds + stage * BR * LDD;
#pragma unroll
        for (int kc = 0; kc < BR / 16; ++kc) {
            // B = (mask ∘ x)[input rows (k) × this warp's 16 columns (n)].
            uint32_t b[4];
            load_b_trans_x4<T>(xt + kc * 16 * LDX + warp * 16, LDX, b);
            if (p > 0.f) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    // b[q]: input rows 2t, 2t+1 (+ 8 for odd q), column g (+ 8 for q ≥ 2).
                    // Columns g and g ^ 1 (lanes 4 apart) share each row's pair hash: this lane
                    // hashes row 2t + (g & 1) and swaps with its partner for the other row.
                    int row = r0 + kc * 16 + (q & 1) * 8 + 2 * t, col = wcol + (q >> 1) * 8 + g;
                    uint32_t mine = dropout_pair_hash(
                        seed, ((unsigned long long)(row + (g & 1)) * K + col) >> 1);
                    uint32_t other = __shfl_xor_sync(0xffffffff, mine, 4);
                    uint32_t h0 = (g & 1) ? other : mine, h1 = (g & 1) ? mine : other;
                    int shift = 16 * (col & 1);
                    if ((float)((h0 >> shift) & 0xFFFFu) * (1.0f / 65536.0f) < p) b[q] &= 0xFFFF0000u;
                    if ((float)((h1 >> shift) & 0xFFFFu) * (1.0f / 65536.0f) < p) b[q] &= 0x0000FFFFu;
                }
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                uint32_t af[4];
                load_at_x4<T>(dt + kc * 16 * LDD + m * 16, LDD, af);
                Mma<T>::run(acc[m][0], af, b[0], b[1]);
                Mma<T>::run(acc[m][1], af, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    if (steps == 0) return;
    float keep = p > 0.f ? 1.f / (1.f - p) : 1.f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            int r = m * 16 + g, c = wcol + n * 8 + 2 * t;
            atomic_add2(ga + (size_t)r * K + c, acc[m][n][0] * keep, acc[m][n][1] * keep);
            atomic_add2(ga + (size_t)(r + 8) * K + c, acc[m][n][2] * keep, acc[m][n][3] * keep);
        }
}

// ---------------------------------------------------------------------------------------------
// dx = keep · mask ∘ (d_down · A), added to dx's values when `accumulate`: one block = 4 warps =
// 64 rows × 128 columns, the whole rank in one tile (d_down rows as A fragments, A's rows as B).
// The masked f32 tile is staged in shared memory and written (or read, added and written) row
// by row in 16-byte pieces: the fragments' own 4-byte stores touched 8 rows a warp instruction
// and ran below 1 TB/s.
template <typename T, int R>
__device__ void lora_up(const T* dd, const T* a, T* dx, int rows, int K, int ldd, int ld_dx,
                        int accumulate, unsigned long long seed, float p) {
    constexpr int BM = 64, BN = 128, LDD = R + 8, LDA = BN + 8, NJ = BN / 8, LDO = BN + 4;
    extern __shared__ __align__(16) unsigned char smem[];
    T* ds = reinterpret_cast<T*>(smem);  // [BM][LDD]
    T* as = ds + BM * LDD;               // [R][LDA]
    float* staged = reinterpret_cast<float*>(smem);  // [BM][LDO], after the products
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    tile_async<T>(ds, LDD, dd + (size_t)row0 * ldd, ldd, BM, R, rows - row0);
    tile_async<T>(as, LDA, a + col0, K, R, BN, R);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    float acc[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < R / 16; ++kc) {
        uint32_t af[4];
        load_a_x4<T>(ds + warp * 16 * LDD + kc * 16, LDD, af);
#pragma unroll
        for (int j = 0; j < NJ; j += 2) {
            uint32_t b[4];
            load_b_trans_x4<T>(as + kc * 16 * LDA + j * 8, LDA, b);
            Mma<T>::run(acc[j], af, b[0], b[1]);
            Mma<T>::run(acc[j + 1], af, b[2], b[3]);
        }
    }
    __syncthreads();  // the operand tiles are no longer read: their memory takes the result
    float keep = p > 0.f ? 1.f / (1.f - p) : 1.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        int c = j * 8 + 2 * t;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            int r = warp * 16 + g + 8 * hi;
            float v0 = acc[j][2 * hi] * keep, v1 = acc[j][2 * hi + 1] * keep;
            if (p > 0.f) {
                bool drop0, drop1;
                dropout_pair(seed, (unsigned long long)(row0 + r) * K + col0 + c, p, drop0, drop1);
                if (drop0) v0 = 0.f;
                if (drop1) v1 = 0.f;
            }
            *reinterpret_cast<float2*>(staged + r * LDO + c) = make_float2(v0, v1);
        }
    }
    __syncthreads();
    bool wide = ld_dx % 8 == 0 && (uintptr_t)dx % 16 == 0;
    for (int i = threadIdx.x; i < BM * BN / 8; i += blockDim.x) {
        int r = i / (BN / 8), c = (i % (BN / 8)) * 8;
        if (row0 + r >= rows) break;
        const float* src = staged + r * LDO + c;
        T* dst = dx + (size_t)(row0 + r) * ld_dx + col0 + c;
        float v[8];
        *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(src);
        *reinterpret_cast<float4*>(v + 4) = *reinterpret_cast<const float4*>(src + 4);
        if (wide) {
            if (accumulate) {
                // The same rounding as a GEMM adding onto the stored value (beta = 1).
                float old[8];
                load8(dst, old);
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] += old[e];
            }
            store8(dst, v);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
                dst[e] = from_f32<T>(v[e] + (accumulate ? to_f32(dst[e]) : 0.f));
        }
    }
}

// Dynamic shared memory of each kernel for rank R (two-byte elements).
template <int R> constexpr int down_smem() { return 3 * (64 + R) * (64 + 8) * 2; }
template <int R> constexpr int grad_a_smem() { return 3 * 32 * ((64 + 8) + (R + 8)) * 2; }
template <int R> constexpr int up_smem() {
    // The operand tiles, then (in the same memory) the f32 result tile.
    constexpr int operands = (64 * (R + 8) + R * (128 + 8)) * 2, result = 64 * (128 + 4) * 4;
    return operands > result ? operands : result;
}

#define LORA(name, T, R)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) lora_down_##name##_r##R(                      \
        const T* x, const T* a, void* out, int rows, int K, int ldx, int ld_out, int split_len,    \
        unsigned long long seed, float p) {                                                        \
        lora_down<T, R>(x, a, out, rows, K, ldx, ld_out, split_len, seed, p);                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) lora_grad_a_##name##_r##R(                    \
        const T* x, const T* dd, float* ga, int rows, int K, int ldx, int ldd, int rows_per_block, \
        unsigned long long seed, float p) {                                                        \
        lora_grad_a<T, R>(x, dd, ga, rows, K, ldx, ldd, rows_per_block, seed, p);                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) lora_up_##name##_r##R(                        \
        const T* dd, const T* a, T* dx, int rows, int K, int ldd, int ld_dx, int accumulate,       \
        unsigned long long seed, float p) {                                                        \
        lora_up<T, R>(dd, a, dx, rows, K, ldd, ld_dx, accumulate, seed, p);                        \
    }
#define LORA_RANKS(name, T)                                                                        \
    LORA(name, T, 16) LORA(name, T, 32) LORA(name, T, 64) LORA(name, T, 128)                       \
    extern "C" __global__ void lora_down_sum_##name(const float* part, T* down, int rows, int r,    \
                                                    int ld_out, int splits, float keep) {          \
        lora_down_sum<T>(part, down, rows, r, ld_out, splits, keep);                               \
    }
LORA_RANKS(bf16, __nv_bfloat16)
LORA_RANKS(f16, __half)
