// Device helpers shared by the decode step's kernels (decode.cu) and the persistent kernel of
// its decoder layers (decode_layers.cu): the GEMV's input staging and epilogue, and the
// tensor-core GEMV's weight unpacking.
#pragma once
#include "mma.cuh"
#include "nf4_code.cuh"

// Rows of x a GEMV takes (sequences decoded together, or one sequence's verify rows): the
// tensor-core GEMV's mma has 16 input rows, of which it fills the first 8.
constexpr int MAXM = 8;
// Output rows one thread group computes: each x chunk read from shared memory serves R rows.
constexpr int R = 4;
// Elements of padding after each staged input row (16 bytes): rows of 3,072 or 8,192 would
// otherwise all start at the same shared-memory bank, and the tensor-core GEMV's lanes, which
// read the same columns of up to 8 rows at once, would conflict 8 ways (a step of 8 rows took
// 1.8x one of 1 row on the H200).
constexpr int XPAD = 8;

enum InputMode { IN_PLAIN = 0, IN_RMSNORM = 1, IN_SWIGLU = 2 };
enum Format { F_DENSE = 0, F_INT8 = 1, F_INT4 = 2, F_NF4 = 3 };

// Weights one 16-byte chunk of a row holds.
template <typename T, int FMT> struct Chunk;
template <typename T> struct Chunk<T, F_DENSE> { static constexpr int E = 16 / sizeof(T); };
template <typename T> struct Chunk<T, F_INT8> { static constexpr int E = 16; };
template <typename T> struct Chunk<T, F_INT4> { static constexpr int E = 32; };
template <typename T> struct Chunk<T, F_NF4> { static constexpr int E = 32; };

// Weights q·8 … q·8 + 7 of a chunk as floats (before any scale).
template <typename T, int FMT>
__device__ __forceinline__ void unpack8(const uint4& v, int q, float (&wf)[8], const float* nf4) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&v);
    if constexpr (FMT == F_DENSE) {
        const T* t = reinterpret_cast<const T*>(&v) + q * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[j] = to_f32(t[j]);
    } else if constexpr (FMT == F_INT8) {
        // Codes are stored + 128.
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[j] = (float)b[q * 8 + j] - 128.f;
    } else if constexpr (FMT == F_INT4) {
        // Even element in the low nibble, codes + 8.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wf[2 * j] = (float)(b[q * 4 + j] & 15) - 8.f;
            wf[2 * j + 1] = (float)(b[q * 4 + j] >> 4) - 8.f;
        }
    } else {
        // bitsandbytes: first element in the high nibble.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wf[2 * j] = nf4[b[q * 4 + j] >> 4];
            wf[2 * j + 1] = nf4[b[q * 4 + j] & 15];
        }
    }
}

// How a GEMV finds its weights' scales.
struct Scales {
    // INT8: absmax per row (× 1/127). INT4: per (row, group). NF4: per 64-block when plain.
    const float* s;
    // INT4 group length.
    int group;
    // NF4 double quantisation: scale = code2[q2[block]] · absmax2[block / block2] + offset2.
    const uint8_t* q2;
    const float* code2;
    const float* absmax2;
    float offset2;
    int block2;
};

// Scale of the chunk starting at column `col` of `row`, for the formats that scale per chunk.
template <int FMT>
__device__ __forceinline__ float chunk_scale(const Scales& sc, int row, int col, int k) {
    if constexpr (FMT == F_INT4) {
        return sc.s[(size_t)row * (k / sc.group) + col / sc.group];
    } else if constexpr (FMT == F_NF4) {
        size_t block = ((size_t)row * k + col) / 64;
        if (sc.q2 == nullptr) return sc.s[block];
        // Each step rounded to f32 as bitsandbytes does.
        return __fadd_rn(__fmul_rn(sc.code2[sc.q2[block]], sc.absmax2[block / sc.block2]), sc.offset2);
    } else {
        return 1.f;
    }
}

// 16-byte vectors of a staged row each thread holds: rows of up to 4 · 8 · blockDim.x elements
// (8,192 with 256 threads). All of a thread's loads are issued before any use: the staging is
// a prologue every block waits for, so it must cost one memory round trip, not one per element.
constexpr int VPT = 4;

// Stages the GEMV's input rows in shared memory as T, transformed as the layer wants them:
// plain; RMSNorm (x·rsqrt(ms + eps) rounded, times g, as rms_norm.cu); or SwiGLU of [gate | up]
// (silu(gate) rounded, times up, as swiglu.cu). k % 8 == 0, k ≤ VPT · 8 · blockDim.x. With
// PAIRS each group of 8 elements is stored in the order INT4 nibbles unpack in on the tensor-core
// path: 0, 4, 1, 5, 2, 6, 3, 7. Row r starts at xs + r · (k + XPAD).
// One staged 16-byte vector: `a` (8 inputs) transformed with `b` (the norm weights, or the up
// half for SwiGLU) and `inv` (the row's 1/rms), written at `dst`.
template <typename T, bool PAIRS>
__device__ __forceinline__ void stage_vector(const uint4& a, const uint4& b, float inv, int mode, T* dst) {
    if (mode == IN_PLAIN && !PAIRS) {
        *reinterpret_cast<uint4*>(dst) = a;
        return;
    }
    float fa[8], fb[8], o[8];
    load8(reinterpret_cast<const T*>(&a), fa);
    load8(reinterpret_cast<const T*>(&b), fb);
#pragma unroll
    for (int j = 0; j < 8; ++j)
        o[j] = mode == IN_PLAIN     ? fa[j]
               : mode == IN_RMSNORM ? fb[j] * round_to<T>(fa[j] * inv)
                                    : round_to<T>(fa[j] / (1.f + __expf(-fa[j]))) * fb[j];
    if (PAIRS) {
        float p[8] = {o[0], o[4], o[1], o[5], o[2], o[6], o[3], o[7]};
        store8(dst, p);
    } else {
        store8(dst, o);
    }
}

// One row: each thread holds its vectors in registers, so the norm takes no second pass. Also
// the transform of one row into global memory (transform_rows). With CG, x is read through L2
// only: the persistent layers kernel reads rows other blocks of the same grid wrote.
template <typename T, bool PAIRS = false, bool CG = false>
__device__ void stage_row(const T* x, const T* g, float eps, int mode, int k, T* xs) {
    const int nv = k / 8;
    const uint4* src = reinterpret_cast<const uint4*>(x);
    uint4 a[VPT], b[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        int v = threadIdx.x + i * blockDim.x;
        if (v < nv) {
            a[i] = CG ? __ldcg(src + v) : src[v];
            if (mode == IN_SWIGLU) b[i] = CG ? __ldcg(src + nv + v) : src[nv + v];
            else if (mode == IN_RMSNORM) b[i] = reinterpret_cast<const uint4*>(g)[v];
        }
    }
    float inv = 1.f;
    if (mode == IN_RMSNORM) {
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            if (threadIdx.x + i * blockDim.x < nv) {
                float f[8];
                load8(reinterpret_cast<const T*>(&a[i]), f);
#pragma unroll
                for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
            }
        }
        inv = rsqrtf(block_sum(ss) / k + eps);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        int v = threadIdx.x + i * blockDim.x;
        if (v >= nv) continue;
        stage_vector<T, PAIRS>(a[i], b[i], inv, mode, xs + (size_t)v * 8);
    }
    __syncthreads();
}

// stage_row for several rows: one row per group of warps at a time (the block's warps split
// into the power of two of groups at or above the rows, up to one warp a row, so that up to 8
// rows take one round), each group walking its row in batches of VPT vectors per thread.
// Staged one after another, every row cost a memory round trip and a block reduction: about
// 2 µs per row and GEMV, a verify step's main cost. (H200, INT4 verify steps of 6-7 rows: 1.35
// and 1.38× a one-row step in two rounds of 4 groups, 1.31 and 1.34× in one round.)
template <typename T, bool PAIRS = false, bool CG = false>
__device__ void stage_rows(const T* x, const T* g, float eps, int mode, int m, int k, T* xs) {
    __shared__ float sums[32];
    const int nv = k / 8;
    const int warps = blockDim.x / 32;
    int groups = 1;
    while (groups < m && groups * 2 <= warps) groups *= 2;
    const int gw = warps / groups, gt = gw * 32;
    const int group = threadIdx.x / gt, t = threadIdx.x % gt;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint4* g4 = reinterpret_cast<const uint4*>(g);
    // Every thread runs the same rounds (the reduction synchronises the block).
    for (int r0 = 0; r0 < m; r0 += groups) {
        const int r = r0 + group;
        const bool active = r < m;
        const uint4* src =
            reinterpret_cast<const uint4*>(x + (size_t)(active ? r : 0) * (mode == IN_SWIGLU ? 2 * k : k));
        float inv = 1.f;
        if (mode == IN_RMSNORM) {
            float ss = 0.f;
            for (int v0 = 0; v0 < nv; v0 += VPT * gt) {
                uint4 a[VPT];
#pragma unroll
                for (int i = 0; i < VPT; ++i) {
                    int v = v0 + t + i * gt;
                    if (active && v < nv) a[i] = CG ? __ldcg(src + v) : src[v];
                }
#pragma unroll
                for (int i = 0; i < VPT; ++i) {
                    int v = v0 + t + i * gt;
                    if (active && v < nv) {
                        float f[8];
                        load8(reinterpret_cast<const T*>(&a[i]), f);
#pragma unroll
                        for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
                    }
                }
            }
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
            if (lane == 0) sums[warp] = ss;
            __syncthreads();
            float total = 0.f;
            for (int w = group * gw; w < (group + 1) * gw; ++w) total += sums[w];
            inv = rsqrtf(total / k + eps);
            __syncthreads();  // sums is written again next round
        }
        if (!active) continue;
        for (int v0 = 0; v0 < nv; v0 += VPT * gt) {
            uint4 a[VPT], b[VPT];
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                int v = v0 + t + i * gt;
                if (v < nv) {
                    a[i] = CG ? __ldcg(src + v) : src[v];
                    if (mode == IN_SWIGLU) b[i] = CG ? __ldcg(src + nv + v) : src[nv + v];
                    else if (mode == IN_RMSNORM) b[i] = g4[v];
                }
            }
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                int v = v0 + t + i * gt;
                if (v >= nv) continue;
                stage_vector<T, PAIRS>(a[i], b[i], inv, mode, xs + (size_t)(r * (nv + 1) + v) * 8);
            }
        }
    }
    __syncthreads();
}

// The GEMV epilogue for input row r, output `row` of n, given its sum v: INT8's per-row scale,
// then T (optionally added to `residual` in place, as `x + y` rounds), or f32 rounded through T.
template <typename T, int FMT>
__device__ __forceinline__ void store_output(float v, int r, int row, int n, const float* int8_absmax,
                                             T* out, float* out_f32, const T* residual) {
    if (FMT == F_INT8) v = v * int8_absmax[row] * (1.f / 127.f);
    size_t at = (size_t)r * n + row;
    if (out_f32 != nullptr) {
        out_f32[at] = round_to<T>(v);
    } else if (residual != nullptr) {
        out[at] = from_f32<T>(to_f32(residual[at]) + round_to<T>(v));
    } else {
        out[at] = from_f32<T>(v);
    }
}

template <typename T> struct Nibbles;
template <> struct Nibbles<__nv_bfloat16> {
    // Bits 0–3 and 16–19 of u as a bf16 pair: 128 + nibble (exact), minus 136.
    static __device__ __forceinline__ uint32_t pair(uint32_t u) {
        uint32_t v = (u & 0x000F000Fu) | 0x43004300u;
        __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), __floats2bfloat162_rn(136.f, 136.f));
        return *reinterpret_cast<uint32_t*>(&r);
    }
};
template <> struct Nibbles<__half> {
    // 1024 + nibble (exact), minus 1032.
    static __device__ __forceinline__ uint32_t pair(uint32_t u) {
        uint32_t v = (u & 0x000F000Fu) | 0x64006400u;
        __half2 r = __hsub2(*reinterpret_cast<__half2*>(&v), __floats2half2_rn(1032.f, 1032.f));
        return *reinterpret_cast<uint32_t*>(&r);
    }
};

// INT8 codes (+ 128) in bytes j and j + 1 of u as a pair of T, exact: 2²³ + byte as a float's
// bits, minus 2²³ + 128.
template <typename T>
__device__ __forceinline__ uint32_t int8_pair(uint32_t u, int j) {
    float lo = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + j)) - 8388736.f;
    float hi = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541 + j)) - 8388736.f;
    return Mma<T>::pack(lo, hi);
}

// Bytes of one warp tile in shared memory: 8 rows × 512, and the tile's scales: INT4's 8 × 8
// groups of 128, NF4's 8 × 16 blocks of 64 (f32, or their 8-bit codes when double-quantised).
template <int FMT> constexpr int tc_tile_bytes() { return 8 * 512 + (FMT == F_INT4 ? 256 : FMT == F_NF4 ? 512 : 0); }

// Copies the scales of the tile at 512-byte column kt of rows row0 .. row0 + 7 (rows past n
// zero-filled) behind its weights, one cp.async of 16 bytes per lane at most (k a multiple of
// 1,024 for the 4-bit formats, so a row's scales of one tile are 16-byte aligned).
template <int FMT>
__device__ __forceinline__ void tc_copy_scales(unsigned char* dst, const Scales& sc, int row0, int n, int k, int kt,
                                               int lane) {
    if constexpr (FMT == F_INT4) {
        if (lane < 16) {
            // Row lane / 2's scales of the tile's 8 groups, 4 at a time.
            const int row = row0 + lane / 2;
            const bool ok = row < n;
            const float* src = sc.s + (ok ? (size_t)row * (k / 128) + kt * 8 + (lane % 2) * 4 : 0);
            cp_async16(dst + 8 * 512 + lane * 16, src, ok);
        }
    } else if constexpr (FMT == F_NF4) {
        if (sc.q2 == nullptr) {
            // Row lane / 4's 16 block scales, 4 at a time.
            const int row = row0 + lane / 4;
            const bool ok = row < n;
            const float* src = sc.s + (ok ? (size_t)row * (k / 64) + kt * 16 + (lane % 4) * 4 : 0);
            cp_async16(dst + 8 * 512 + lane * 16, src, ok);
        } else if (lane < 8) {
            // Row lane's 16 codes of its block scales.
            const int row = row0 + lane;
            const bool ok = row < n;
            const uint8_t* src = sc.q2 + (ok ? (size_t)row * (k / 64) + kt * 16 : 0);
            cp_async16(dst + 8 * 512 + lane * 16, src, ok);
        }
    }
}

// NF4 on the tensor cores: each byte (two weights, the first in its high nibble) becomes a pair
// of T by a table of its 256 values in shared memory, one copy per lane (entry b of lane l at
// b · 32 + l), so that every lookup is free of bank conflicts. The pairs are the NF4 codes
// rounded to T; the block scale multiplies the f32 sums.
constexpr int NF4_PAIR_WORDS = 256 * 32;

template <typename T>
__device__ __forceinline__ void fill_nf4_pairs(uint32_t* pairs) {
    for (int i = threadIdx.x; i < NF4_PAIR_WORDS; i += blockDim.x) {
        const int b = i / 32;
        pairs[i] = Mma<T>::pack(NF4[b >> 4], NF4[b & 15]);
    }
}

// What an NF4 tile's scales need besides the tile: with double quantisation, the code book and
// offset, and the second-level absmax of the lane's two weight rows (one per row and tile: a
// tile's 16 blocks lie in one group of block2, a multiple of 16).
struct Nf4Tile {
    const float* code2;
    float absmax2[2];
    float offset;
};

template <int FMT>
__device__ __forceinline__ Nf4Tile nf4_tile(const Scales& sc, int row0, int n, int k, int kt, int t) {
    Nf4Tile nf{nullptr, {0.f, 0.f}, 0.f};
    if constexpr (FMT == F_NF4) {
        if (sc.q2 != nullptr) {
            nf.code2 = sc.code2;
            nf.offset = sc.offset2;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int row = row0 + 2 * t + i;
                if (row < n) nf.absmax2[i] = __ldg(sc.absmax2 + ((size_t)row * (k / 64) + kt * 16) / sc.block2);
            }
        }
    }
    return nf;
}

// Scale of block b of the tile's row 2t + i (row r), rounded as bitsandbytes computes it.
__device__ __forceinline__ float nf4_tile_scale(const unsigned char* tile, const Nf4Tile& nf, int r, int b, int i) {
    if (nf.code2 == nullptr) return reinterpret_cast<const float*>(tile + 8 * 512)[r * 16 + b];
    return __fadd_rn(__fmul_rn(__ldg(nf.code2 + tile[8 * 512 + r * 16 + b]), nf.absmax2[i]), nf.offset);
}

// The A fragments of two mma.m16n8k16 over a lane's 8 staged inputs at x (row g, columns 2t ..
// 2t + 1 and 2t + 8 .. 2t + 9 of each): inputs 0-1 and 2-3 in a0, 4-5 and 6-7 in a1; zero
// where the lane's row is not an input row. With HI, row g + 8's at xhi likewise.
template <typename T, bool HI = false>
__device__ __forceinline__ void x8_fragments(const T* x, bool live, uint32_t (&a0)[4], uint32_t (&a1)[4],
                                             const T* xhi = nullptr, bool live_hi = false) {
    a0[0] = a0[1] = a0[2] = a0[3] = 0u;
    a1[0] = a1[1] = a1[2] = a1[3] = 0u;
    if (live) {
        const uint4 xv = *reinterpret_cast<const uint4*>(x);
        a0[0] = xv.x;
        a0[2] = xv.y;
        a1[0] = xv.z;
        a1[2] = xv.w;
    }
    if (HI && live_hi) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xhi);
        a0[1] = xv.x;
        a0[3] = xv.y;
        a1[1] = xv.z;
        a1[3] = xv.w;
    }
}

// One tile's products (8 weight rows × 512 bytes, at input column kbase) added to acc: lane
// (g, t) gets input row g's sums of weight rows 2t and 2t + 1 in acc[0], acc[1]; `xrow` is row
// g's staged input, `live` whether g is an input row. With HI, also input row g + 8's (`xhi`,
// `live_hi`) in acc[2], acc[3]: the mma's second half of rows. Each 8 × 8 matrix of ldmatrix is 8 rows
// of one 16-byte chunk, lane t holding bytes 4t .. 4t + 3 of each: the weights' k order within
// a lane may be permuted as long as the staged input matches (INT4 stages pairs (0,4), (1,5), …;
// NF4's bytes hold consecutive pairs, staged in order).
template <typename T, int FMT, bool HI = false>
__device__ __forceinline__ void tc_tile_product(const unsigned char* tile, const T* xrow, bool live, int kbase,
                                                const Nf4Tile& nf, const uint32_t* nf4_pairs, float (&acc)[4],
                                                const T* xhi = nullptr, bool live_hi = false) {
    const int lane = threadIdx.x % 32, t = lane % 4;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        // Chunks 4q .. 4q + 3 of the 8 rows: lane 8i + j addresses row j of chunk 4q + i.
        uint32_t r[4];
        ldsm_x4<false>(tile + (lane % 8) * 512 + (((4 * q + lane / 8) ^ (lane % 8)) * 16), r);
        if constexpr (FMT == F_DENSE) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int k0 = kbase + (4 * q + 2 * h) * 8;
                uint32_t a[4] = {0u, 0u, 0u, 0u};
                if (live) {
                    a[0] = *reinterpret_cast<const uint32_t*>(xrow + k0 + 2 * t);
                    a[2] = *reinterpret_cast<const uint32_t*>(xrow + k0 + 8 + 2 * t);
                }
                if (HI && live_hi) {
                    a[1] = *reinterpret_cast<const uint32_t*>(xhi + k0 + 2 * t);
                    a[3] = *reinterpret_cast<const uint32_t*>(xhi + k0 + 8 + 2 * t);
                }
                Mma<T>::run(acc, a, r[2 * h], r[2 * h + 1]);
            }
        } else if constexpr (FMT == F_INT8) {
            // Lane t holds bytes 4t .. 4t + 3 of each chunk.
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                int k0 = kbase + (4 * q + h) * 16 + 4 * t;
                uint32_t a[4] = {0u, 0u, 0u, 0u};
                if (live) {
                    uint2 xv = *reinterpret_cast<const uint2*>(xrow + k0);
                    a[0] = xv.x;
                    a[2] = xv.y;
                }
                if (HI && live_hi) {
                    const uint2 xv = *reinterpret_cast<const uint2*>(xhi + k0);
                    a[1] = xv.x;
                    a[3] = xv.y;
                }
                Mma<T>::run(acc, a, int8_pair<T>(r[h], 0), int8_pair<T>(r[h], 2));
            }
        } else if constexpr (FMT == F_INT4) {
            // Lane t holds nibbles 8t .. 8t + 7 of each chunk; the four chunks are one
            // group of 128, scaled once.
            float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                uint32_t a0[4], a1[4];
                const int k0 = kbase + (4 * q + h) * 32 + 8 * t;
                x8_fragments<T, HI>(xrow + k0, live, a0, a1, HI ? xhi + k0 : nullptr, live_hi);
                uint32_t u = r[h];
                Mma<T>::run(d, a0, Nibbles<T>::pair(u), Nibbles<T>::pair(u >> 4));
                Mma<T>::run(d, a1, Nibbles<T>::pair(u >> 8), Nibbles<T>::pair(u >> 12));
            }
            const float* ts = reinterpret_cast<const float*>(tile + 8 * 512);
            acc[0] += d[0] * ts[(2 * t) * 8 + q];
            acc[1] += d[1] * ts[(2 * t + 1) * 8 + q];
            if (HI) {
                acc[2] += d[2] * ts[(2 * t) * 8 + q];
                acc[3] += d[3] * ts[(2 * t + 1) * 8 + q];
            }
        } else {
            // NF4: lane t holds bytes 4t .. 4t + 3 of each chunk, weights 8t .. 8t + 7 in order;
            // chunks 4q and 4q + 1 are block 2q of 64, chunks 4q + 2 and 4q + 3 block 2q + 1.
            float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f};
            const uint32_t* pairs = nf4_pairs + lane;
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                uint32_t a0[4], a1[4];
                const int k0 = kbase + (4 * q + h) * 32 + 8 * t;
                x8_fragments<T, HI>(xrow + k0, live, a0, a1, HI ? xhi + k0 : nullptr, live_hi);
                const uint32_t u = r[h];
                float* d = h < 2 ? d0 : d1;
                Mma<T>::run(d, a0, pairs[(u & 255u) * 32], pairs[((u >> 8) & 255u) * 32]);
                Mma<T>::run(d, a1, pairs[((u >> 16) & 255u) * 32], pairs[(u >> 24) * 32]);
            }
            const float s00 = nf4_tile_scale(tile, nf, 2 * t, 2 * q, 0);
            const float s01 = nf4_tile_scale(tile, nf, 2 * t, 2 * q + 1, 0);
            const float s10 = nf4_tile_scale(tile, nf, 2 * t + 1, 2 * q, 1);
            const float s11 = nf4_tile_scale(tile, nf, 2 * t + 1, 2 * q + 1, 1);
            acc[0] += d0[0] * s00 + d1[0] * s01;
            acc[1] += d0[1] * s10 + d1[1] * s11;
            if (HI) {
                acc[2] += d0[2] * s00 + d1[2] * s01;
                acc[3] += d0[3] * s10 + d1[3] * s11;
            }
        }
    }
}
