//! NF4 weights resident on the device: quantisation and dequantisation kernels with the layout of
//! [`philo_quant::Nf4Tensor`] (bitsandbytes'), whose host code is the CPU reference.

use candle_core::{DType, Device, Result, Tensor};
use philo_quant::{Absmax, Nf4Tensor, NF4_BLOCK_SIZE};

/// Block scales on the device.
#[derive(Debug, Clone)]
pub enum Nf4Scales {
    /// One f32 per block.
    Plain(Tensor),
    /// Double-quantised (see [`philo_quant::Absmax::Double`]); expanded to f32 per use.
    Double {
        quantized: Tensor,
        code: Tensor,
        absmax2: Tensor,
        offset: f32,
        block_size: usize,
    },
}

/// An NF4 matrix `[rows, cols]` whose packed indices and scales live on a device.
#[derive(Debug, Clone)]
pub struct Nf4Weight {
    /// `ceil(rows·cols / 2)` bytes, first element in the high nibble.
    pub packed: Tensor,
    pub scales: Nf4Scales,
    pub rows: usize,
    pub cols: usize,
}

fn quant_err(e: philo_quant::QuantError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Nf4Weight {
    /// Uploads a host NF4 tensor (blocks of 64).
    pub fn from_host(q: &Nf4Tensor, device: &Device) -> Result<Self> {
        if q.block_size() != NF4_BLOCK_SIZE {
            candle_core::bail!("NF4 on the device needs blocks of {NF4_BLOCK_SIZE}");
        }
        let packed = Tensor::from_slice(q.packed(), q.packed().len(), device)?;
        let scales = match q.absmax() {
            Absmax::Plain(v) => Nf4Scales::Plain(Tensor::from_slice(v, v.len(), device)?),
            Absmax::Double {
                quantized,
                code,
                state2_absmax,
                offset,
                block_size,
            } => Nf4Scales::Double {
                quantized: Tensor::from_slice(quantized, quantized.len(), device)?,
                code: Tensor::from_slice(code, code.len(), device)?,
                absmax2: Tensor::from_slice(state2_absmax, state2_absmax.len(), device)?,
                offset: *offset,
                block_size: *block_size,
            },
        };
        Ok(Nf4Weight {
            packed,
            scales,
            rows: q.rows(),
            cols: q.cols(),
        })
    }

    /// Downloads to the host layout (for saving, and for tests).
    pub fn to_host(&self) -> Result<Nf4Tensor> {
        let packed = self.packed.to_vec1::<u8>()?;
        let absmax = match &self.scales {
            Nf4Scales::Plain(t) => Absmax::Plain(t.to_vec1::<f32>()?),
            Nf4Scales::Double {
                quantized,
                code,
                absmax2,
                offset,
                block_size,
            } => Absmax::Double {
                quantized: quantized.to_vec1::<u8>()?,
                code: code.to_vec1::<f32>()?.into(),
                state2_absmax: absmax2.to_vec1::<f32>()?,
                offset: *offset,
                block_size: *block_size,
            },
        };
        Nf4Tensor::from_parts(packed, absmax, (self.rows, self.cols), NF4_BLOCK_SIZE)
            .map_err(quant_err)
    }

    /// Quantises `weights` `[rows, cols]`. On CUDA (element count a multiple of 64) the kernel
    /// quantises in place on the device; the scales are then double-quantised on the host when
    /// asked (they are 1/64 of the weights). Elsewhere the host quantiser does all of it.
    pub fn quantize(weights: &Tensor, double_quant: bool) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if weights.device().is_cuda() && weights.elem_count().is_multiple_of(NF4_BLOCK_SIZE) {
            let (rows, cols) = weights.dims2()?;
            use crate::launch::*;
            let dev = device(weights)?;
            let w = weights.contiguous()?;
            let blocks = rows * cols / NF4_BLOCK_SIZE;
            let (ws, wl) = w.storage_and_layout();
            let (packed, absmax) = with_float_type!(w.dtype(), T, {
                let wv = contiguous::<T>(cuda(&ws)?, wl)?;
                let packed = unsafe { dev.alloc::<u8>(rows * cols / 2)? };
                let absmax = unsafe { dev.alloc::<f32>(blocks)? };
                let f = typed_function(&dev, &NF4, "nf4_quantize", w.dtype())?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&wv).arg(&packed).arg(&absmax).arg(&blocks);
                let cfg = LaunchConfig {
                    grid_dim: (blocks.div_ceil(8) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { b.launch(cfg) }.w()?;
                (
                    tensor(packed, &dev, rows * cols / 2),
                    tensor(absmax, &dev, blocks),
                )
            });
            let scales = if double_quant {
                let host = Absmax::double_quantize(&absmax.to_vec1::<f32>()?).map_err(quant_err)?;
                let Absmax::Double {
                    quantized,
                    code,
                    state2_absmax,
                    offset,
                    block_size,
                } = host
                else {
                    unreachable!("double_quantize returns Absmax::Double")
                };
                let device = weights.device();
                Nf4Scales::Double {
                    quantized: Tensor::from_slice(&quantized, quantized.len(), device)?,
                    code: Tensor::from_slice(&code, code.len(), device)?,
                    absmax2: Tensor::from_slice(&state2_absmax, state2_absmax.len(), device)?,
                    offset,
                    block_size,
                }
            } else {
                Nf4Scales::Plain(absmax)
            };
            return Ok(Nf4Weight {
                packed,
                scales,
                rows,
                cols,
            });
        }
        let host = Nf4Tensor::from_tensor(weights, double_quant).map_err(quant_err)?;
        Self::from_host(&host, weights.device())
    }

    /// The dequantised matrix `[rows, cols]` in `dtype`, on the weight's device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.dequantize_padded(dtype, 0)
    }

    /// The dequantised matrix as `[rows, cols + pad]`: `pad` columns after each row left for
    /// the caller (unset on CUDA, zero on the CPU).
    pub fn dequantize_padded(&self, dtype: DType, pad: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.packed.device().is_cuda() {
            return self.dequantize_cuda(dtype, pad);
        }
        let dense = self
            .to_host()?
            .to_tensor(dtype, self.packed.device())
            .map_err(quant_err)?;
        crate::pad_columns(dense, pad)
    }

    #[cfg(feature = "cuda")]
    fn dequantize_cuda(&self, dtype: DType, pad: usize) -> Result<Tensor> {
        use crate::launch::*;
        let dev = device(&self.packed)?;
        let n = self.rows * self.cols;
        let blocks = n.div_ceil(NF4_BLOCK_SIZE);
        let absmax = match &self.scales {
            Nf4Scales::Plain(t) => t.clone(),
            Nf4Scales::Double {
                quantized,
                code,
                absmax2,
                offset,
                block_size,
            } => {
                let (qs, ql) = quantized.storage_and_layout();
                let (cs, cl) = code.storage_and_layout();
                let (a2s, a2l) = absmax2.storage_and_layout();
                let q = contiguous::<u8>(cuda(&qs)?, ql)?;
                let c = contiguous::<f32>(cuda(&cs)?, cl)?;
                let a2 = contiguous::<f32>(cuda(&a2s)?, a2l)?;
                let out = unsafe { dev.alloc::<f32>(blocks)? };
                let f = function(&dev, &NF4, "nf4_double_scales")?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                let block2 = *block_size as i32;
                b.arg(&q)
                    .arg(&c)
                    .arg(&a2)
                    .arg(offset)
                    .arg(&out)
                    .arg(&blocks)
                    .arg(&block2);
                unsafe { b.launch(elementwise_config(blocks)) }.w()?;
                tensor(out, &dev, blocks)
            }
        };
        let (ps, pl) = self.packed.storage_and_layout();
        let (as_, al) = absmax.storage_and_layout();
        with_float_type!(dtype, T, {
            let p = contiguous::<u8>(cuda(&ps)?, pl)?;
            let a = contiguous::<f32>(cuda(&as_)?, al)?;
            let stream = dev.cuda_stream();
            // Whole groups of 16 weights under one scale (rows too, for padded rows): the
            // vectorised kernel.
            if n.is_multiple_of(16)
                && NF4_BLOCK_SIZE.is_multiple_of(16)
                && NF4_BLOCK_SIZE.is_power_of_two()
                && (pad == 0 || self.cols.is_multiple_of(16) && pad.is_multiple_of(8))
            {
                let ld = self.cols + pad;
                let out = unsafe { dev.alloc::<T>(self.rows * ld)? };
                let f = typed_function(&dev, &NF4, "nf4_dequantize16", dtype)?;
                let mut b = stream.launch_builder(&f);
                let groups = n / 16;
                let shift = (NF4_BLOCK_SIZE / 16).trailing_zeros() as i32;
                let (cols, ld) = (self.cols as i32, ld as i32);
                b.arg(&p).arg(&a).arg(&out).arg(&groups).arg(&shift);
                b.arg(&cols).arg(&ld);
                unsafe { b.launch(elementwise_config(groups)) }.w()?;
                return Ok(tensor(out, &dev, (self.rows, self.cols + pad)));
            }
            let out = unsafe { dev.alloc::<T>(n)? };
            let f = typed_function(&dev, &NF4, "nf4_dequantize", dtype)?;
            let mut b = stream.launch_builder(&f);
            let block = NF4_BLOCK_SIZE as i32;
            b.arg(&p).arg(&a).arg(&out).arg(&n).arg(&block);
            unsafe { b.launch(elementwise_config(n.div_ceil(2))) }.w()?;
            crate::pad_columns(tensor(out, &dev, (self.rows, self.cols)), pad)
        })
    }
}
