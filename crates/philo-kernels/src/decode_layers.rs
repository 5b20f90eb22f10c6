//! Every decoder layer of a decode step of up to 16 rows in one persistent kernel
//! (`cuda/decode_layers.cu`): one block per multiprocessor runs each layer's projections and
//! attention as phases separated by grid-wide barriers, and each warp streams its share of the
//! weights through shared memory in the order it uses them, across phases and layers, so that
//! the weights keep flowing while blocks wait for each other. Its reference is the
//! launch-per-kernel step of [`crate::decode`] (the same buffers, rounded the same way up to the
//! order of the sums); `philo_model`'s decode-graph tests check it against the full forward.

use crate::decode::GemvWeight;

/// Words per projection and per layer in the kernel's layer table (`PROJ_WORDS`, `LAYER_WORDS`
/// in decode_layers.cu).
const PROJ_WORDS: usize = 5;
pub const LAYER_WORDS: usize = 4 * PROJ_WORDS + 4;

/// The model's shape as the kernel runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerShape {
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    /// Tokens per block of the paged KV cache.
    pub block_size: usize,
    /// Keys at least this far behind the query are masked (`usize::MAX`: none).
    pub window: usize,
    pub eps: f32,
}

/// One decoder layer's buffers as the kernel reads them: the four projections (one format for
/// all), the norm weights and the layer's key and value caches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerBuffers {
    pub qkv: GemvWeight,
    pub o: GemvWeight,
    pub gate_up: GemvWeight,
    pub down: GemvWeight,
    pub input_norm: u64,
    pub post_norm: u64,
    pub k_cache: u64,
    pub v_cache: u64,
}

/// The layer's words in the kernel's table, or None where the kernel does not read its weights
/// (INT4 in groups other than 128, NF4 whose second-level blocks are not whole tiles) or its
/// projections differ in format. Per projection: weights, scales (INT8 absmax, INT4 group
/// scales, NF4 block absmax or their 8-bit codes), NF4's code book, second-level absmax and
/// (offset bits << 32 | block2); then the norms and the caches.
pub fn layer_words(l: &LayerBuffers) -> Option<[u64; LAYER_WORDS]> {
    let projections = [l.qkv, l.o, l.gate_up, l.down];
    let mut words = [0u64; LAYER_WORDS];
    for (i, p) in projections.iter().enumerate() {
        if std::mem::discriminant(p) != std::mem::discriminant(&l.qkv) {
            return None;
        }
        let a = p.kernel_args();
        let int4 = matches!(p, GemvWeight::Int4 { .. });
        let double = a.q2 != 0;
        if (int4 && a.group != 128)
            || (double && (!a.block2.is_multiple_of(16) || a.block2 > u32::MAX as usize))
        {
            return None;
        }
        let entry = match double {
            false => [a.w, a.s, 0, 0, 0],
            true => [
                a.w,
                a.q2,
                a.code2,
                a.absmax2,
                (u64::from(a.offset2.to_bits()) << 32) | a.block2 as u64,
            ],
        };
        words[i * PROJ_WORDS..][..PROJ_WORDS].copy_from_slice(&entry);
    }
    words[4 * PROJ_WORDS..].copy_from_slice(&[l.input_norm, l.post_norm, l.k_cache, l.v_cache]);
    Some(words)
}

/// One launch of `m` rows: the table of `layers` layers (see [`layer_words`]), the step's
/// buffers (the residual stream `x` `[m, hidden]`, `qkv`, the SwiGLU output `h` `[m, inter]`,
/// the attention's f32 partial results, [`LayerKernel::partial_floats`]), the RoPE tables
/// (cos/sin, short then long, `[positions, rotary_dim / 2]`), the rows' lengths, LongRoPE
/// choices (u32 each) and block tables (`[rows, max_blocks]` u32, as the decode step's state
/// holds them), and two u32 of barrier counters, zero before the first launch (each launch
/// leaves them zero).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLayers {
    pub table: u64,
    pub layers: usize,
    pub x: u64,
    pub qkv: u64,
    pub h: u64,
    pub partial: u64,
    pub rope: [u64; 4],
    pub lens: u64,
    pub long_rows: u64,
    pub tables: u64,
    pub max_blocks: usize,
    pub m: usize,
    pub sync: u64,
}

#[cfg(feature = "cuda")]
pub use device::LayerKernel;

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use crate::decode::{int, Arg, DecodeKernels};
    use crate::launch::*;
    use candle_core::cuda_backend::cudarc::driver::CudaFunction;
    use candle_core::{CudaDevice, DType, Result};

    /// Threads of a block (8 warps) and the attention's ring (positions per chunk, chunks): as
    /// decode_layers.cu.
    const THREADS: usize = 256;
    const ATT_CHUNK: usize = 32;
    const ATT_BUFS: usize = 4;
    /// Most splits of one head's positions.
    const MAX_SPLITS: usize = 16;

    /// The several-row instances by the most rows each takes (`_rows`: up to `MAXM` of
    /// decode_common.cuh; `_rows16`: the mma's second half of rows too).
    const ROW_INSTANCES: [(&str, usize); 2] = [("_rows", 8), ("_rows16", 16)];

    /// One instance of the kernel with its dynamic shared memory and the bytes of its shared
    /// region (the staged input rows, or the attention's chunks).
    #[derive(Clone)]
    struct Instance {
        f: CudaFunction,
        smem: usize,
        region: usize,
    }

    /// The persistent kernel for one weight format and model shape, with its launch geometry:
    /// the one-row instance, and the several-row ones where their rows fit in shared memory.
    #[derive(Clone)]
    pub struct LayerKernel {
        one: Instance,
        /// Each with the most rows it takes here, ascending (an instance takes rows past the
        /// one before it).
        rows: Vec<(Instance, usize)>,
        shape: LayerShape,
        blocks: usize,
        max_splits: usize,
    }

    impl LayerKernel {
        /// The kernel for layers whose projections are all like `weight` (see [`layer_words`]),
        /// or None where it does not run: widths that are not whole 512-byte tiles or exceed
        /// what a block stages (8,192), a head dimension past 256 or not a multiple of 8, or
        /// a GPU whose blocks cannot hold the rings (it needs one block per multiprocessor).
        pub fn load(
            dev: &CudaDevice,
            dtype: DType,
            weight: &GemvWeight,
            shape: LayerShape,
        ) -> Result<Option<Self>> {
            // Weights per 16-byte chunk, a warp tile's bytes and the tiles each warp keeps in
            // flight with one row (`layer_stages` in decode_layers.cu; two with several).
            let (format, chunk_weights, tile_bytes, stages) = match weight {
                GemvWeight::Dense { .. } => ("dense", 16 / dtype.size_in_bytes(), 8 * 512, 4),
                GemvWeight::Int8 { .. } => ("int8", 16, 8 * 512, 4),
                GemvWeight::Int4 { group: 128, .. } => ("int4", 32, 8 * 512 + 256, 4),
                GemvWeight::Int4 { .. } => return Ok(None),
                GemvWeight::Nf4 { .. } => ("nf4", 32, 8 * 512 + 512, 3),
            };
            let s = shape;
            let widths = [s.hidden, s.inter, s.heads * s.head_dim];
            if dtype == DType::F32
                || s.heads == 0
                || s.kv_heads == 0
                || !s.heads.is_multiple_of(s.kv_heads)
                || !s.head_dim.is_multiple_of(8)
                || s.head_dim > THREADS
                || s.rotary_dim > s.head_dim
                || !s.rotary_dim.is_multiple_of(2)
                || widths
                    .iter()
                    .any(|&k| k == 0 || !k.is_multiple_of(32 * chunk_weights) || k > 8192)
            {
                return Ok(None);
            }
            let blocks = multiprocessors(dev)?;
            let size = dtype.size_in_bytes();
            let d = s.head_dim;
            let staged_row = (widths.iter().max().unwrap() + 8) * size;
            let attention = ATT_BUFS * 2 * ATT_CHUNK * d * size + d * 4 + ATT_CHUNK * 4;
            // Each projection's row groups a block owns (the gate/up's in pairs), 8 weight rows
            // each, a sum per input row.
            let owned =
                |groups: usize, pairs: bool| groups.div_ceil(blocks) * if pairs { 2 } else { 1 };
            let qkv_rows = (s.heads + 2 * s.kv_heads) * d;
            let row_groups = [
                owned(qkv_rows.div_ceil(8), false),
                owned(s.hidden.div_ceil(8), false),
                owned(2 * s.inter / 16, true),
            ]
            .into_iter()
            .max()
            .unwrap();
            let limit = block_smem_limit(dev)?;
            // The instance for `rows` input rows with `stages` tiles a warp, where it fits.
            let instance = |name: &str, stages: usize, rows: usize| -> Result<Option<Instance>> {
                let f = function(dev, &DECODE_LAYERS, name)?;
                let region = (rows * staged_row).max(attention).next_multiple_of(16);
                // Row sums are strided by the instance's most rows.
                let stride = ROW_INSTANCES
                    .iter()
                    .map(|&(_, most)| most)
                    .find(|&most| rows > 1 && rows <= most)
                    .unwrap_or(1);
                let red = row_groups * 8 * stride * 4;
                let smem = THREADS / 32 * stages * tile_bytes + region + red;
                let dynamic = limit.saturating_sub(static_smem(&f)?);
                if smem > dynamic {
                    return Ok(None);
                }
                // The function is shared by every model of the process: allow it all it may
                // take, not this shape's bytes (a smaller shape loaded later would lower it).
                dynamic_smem(&f, dynamic)?;
                // Every block must be resident at once: they wait for each other.
                let per_sm = f
                    .occupancy_max_active_blocks_per_multiprocessor(THREADS as u32, smem, None)
                    .w()?;
                Ok((per_sm >= 1).then_some(Instance { f, smem, region }))
            };
            let base = format!("decode_layers_{format}_{}", suffix(dtype)?);
            let Some(one) = instance(&base, stages, 1)? else {
                return Ok(None);
            };
            // Each several-row instance with as many rows as fit, past the previous one's.
            let mut rows: Vec<(Instance, usize)> = Vec::new();
            let mut least = 2;
            for (suffix, most) in ROW_INSTANCES {
                for m in (least..=most).rev() {
                    if let Some(i) = instance(&format!("{base}{suffix}"), 2, m)? {
                        rows.push((i, m));
                        break;
                    }
                }
                match rows.last() {
                    Some(&(_, m)) if m == most => least = most + 1,
                    _ => break,
                }
            }
            Ok(Some(LayerKernel {
                one,
                rows,
                shape,
                blocks,
                max_splits: (blocks / s.heads).clamp(1, MAX_SPLITS),
            }))
        }

        /// Most rows one launch takes.
        pub fn max_rows(&self) -> usize {
            self.rows.last().map_or(1, |(_, m)| *m)
        }

        /// f32 elements of the attention's partial results (`DecodeLayers::partial`).
        pub fn partial_floats(&self) -> usize {
            ROW_INSTANCES[ROW_INSTANCES.len() - 1].1
                * self.shape.heads
                * self.max_splits
                * (self.shape.head_dim + 4)
        }

        /// Launches the layers of one decode step on the device's stream (after the embedding,
        /// before the final norm and LM head; with programmatic dependent launch where the GPU
        /// has it, like the step's other kernels).
        pub fn launch(&self, kernels: &DecodeKernels, a: &DecodeLayers) -> Result<()> {
            let s = &self.shape;
            let kernel = match a.m {
                1 => &self.one,
                m => match self.rows.iter().find(|(_, most)| m <= *most) {
                    Some((rows, _)) => rows,
                    None => candle_core::bail!(
                        "decode layers: {m} rows (the kernel takes up to {})",
                        self.max_rows()
                    ),
                },
            };
            use Arg::*;
            let args = [
                Ptr(a.table),
                int(a.layers),
                Ptr(a.x),
                Ptr(a.qkv),
                Ptr(a.h),
                Ptr(a.partial),
                Ptr(a.rope[0]),
                Ptr(a.rope[1]),
                Ptr(a.rope[2]),
                Ptr(a.rope[3]),
                Ptr(a.lens),
                Ptr(a.long_rows),
                Ptr(a.tables),
                int(a.max_blocks),
                int(a.m),
                int(s.hidden),
                int(s.inter),
                int(s.heads),
                int(s.kv_heads),
                int(s.head_dim),
                int(s.rotary_dim),
                int(s.block_size),
                int(s.window),
                int(self.max_splits),
                int(kernel.region),
                F32(s.eps),
                Ptr(a.sync),
            ];
            kernels.launch(
                &kernel.f,
                (self.blocks as u32, 1, 1),
                THREADS as u32,
                kernel.smem as u32,
                &args,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Nf4BlockScales;

    fn layer(weight: impl Fn(u64) -> GemvWeight) -> LayerBuffers {
        LayerBuffers {
            qkv: weight(0x100),
            o: weight(0x200),
            gate_up: weight(0x300),
            down: weight(0x400),
            input_norm: 0x10,
            post_norm: 0x20,
            k_cache: 0x30,
            v_cache: 0x40,
        }
    }

    #[test]
    fn the_table_holds_weights_then_scales_then_norms_and_caches() {
        let int4 = |w: u64| GemvWeight::Int4 {
            packed: w,
            scales: w + 1,
            group: 128,
        };
        let words = layer_words(&layer(int4)).unwrap();
        for (i, w) in [0x100, 0x200, 0x300, 0x400].into_iter().enumerate() {
            assert_eq!(words[i * PROJ_WORDS..][..PROJ_WORDS], [w, w + 1, 0, 0, 0]);
        }
        assert_eq!(words[4 * PROJ_WORDS..], [0x10, 0x20, 0x30, 0x40]);
        let nf4 = |w: u64| GemvWeight::Nf4 {
            packed: w,
            scales: Nf4BlockScales::Double {
                quantized: w + 1,
                code: 0x7000,
                absmax2: w + 2,
                offset: 0.5,
                block2: 256,
            },
        };
        let words = layer_words(&layer(nf4)).unwrap();
        assert_eq!(
            words[PROJ_WORDS..][..PROJ_WORDS],
            [
                0x200,
                0x201,
                0x7000,
                0x202,
                (0.5f32.to_bits() as u64) << 32 | 256
            ]
        );
    }

    #[test]
    fn formats_the_kernel_does_not_read_have_no_table() {
        let group_64 = |w: u64| GemvWeight::Int4 {
            packed: w,
            scales: w,
            group: 64,
        };
        assert_eq!(layer_words(&layer(group_64)), None);
        let block2_8 = |w: u64| GemvWeight::Nf4 {
            packed: w,
            scales: Nf4BlockScales::Double {
                quantized: w,
                code: w,
                absmax2: w,
                offset: 0.0,
                block2: 8,
            },
        };
        assert_eq!(layer_words(&layer(block2_8)), None);
        let mut mixed = layer(|w| GemvWeight::Dense { w });
        mixed.down = GemvWeight::Int8 {
            codes: 1,
            absmax: 2,
        };
        assert_eq!(layer_words(&mixed), None);
    }
}
