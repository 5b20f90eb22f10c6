//! The linear layers of Phi-3: a frozen base weight (dense, or NF4 for QLoRA), optionally with a
//! LoRA adapter on top, y = x·Wᵀ + dropout(x)·Aᵀ·Bᵀ·scale.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use philo_kernels::nf4::Nf4Weight;
use philo_quant::device::{Int4Weight, Int8Weight};
use philo_quant::{dequantize_matmul, Int4Tensor, Int8Tensor, Nf4Tensor, INT4_GROUP};

use crate::error::Result;

/// A low-rank adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in_features]`; during training this tensor is the storage of a `candle_core::Var`.
    pub a: Tensor,
    /// `[out_features, r]`.
    pub b: Tensor,
    /// alpha / r (rsLoRA: alpha / sqrt(r)).
    pub scale: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f32,
    /// Identifies this adapter within the model so its dropout masks are reproducible, also when
    /// a layer is recomputed for gradient checkpointing.
    pub id: u64,
}

/// The dropout seed of one training forward: each adapter derives its masks from it and its id.
#[derive(Debug, Clone, Copy)]
pub struct DropoutSeed(pub u64);

/// The frozen weight `[out_features, in_features]`, as PyTorch stores it.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    /// 4-bit NormalFloat blocks on the host, dequantised on the fly in the input's dtype (QLoRA
    /// on the CPU).
    Nf4(Arc<Nf4Tensor>),
    /// 4-bit NormalFloat blocks resident on a GPU, dequantised by a kernel per use.
    Nf4Device(Arc<Nf4Weight>),
    /// Per-row symmetric INT8 on the model's device (W8A16), dequantised per use.
    Int8(Arc<Int8Weight>),
    /// Symmetric INT4 in groups of 128 input columns on the model's device (W4A16).
    Int4(Arc<Int4Weight>),
    /// A GGUF block-quantised matrix (Q8_0, Q4_K, …) as a GGUF file stores it, multiplied by
    /// candle's quantised kernels (llama.cpp's MMVQ/MMQ on the GPU) without a dense copy.
    Ggml(Arc<QTensor>),
}

/// How a linear layer's frozen base weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The checkpoint's values in the compute dtype.
    #[default]
    Dense,
    /// Per-row INT8 (8.5 bits a weight with the scales, about half of bf16).
    Int8,
    /// INT4 in groups of 128 (4.25 bits a weight).
    Int4,
    /// bitsandbytes' NF4 in blocks of 64, with the block scales themselves quantised when
    /// `double_quant` (QLoRA's base).
    Nf4 { double_quant: bool },
}

/// A frozen linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: BaseWeight,
    pub lora: Option<Lora>,
}

/// x · wᵀ for x of any leading shape.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    over_rows(x, w, |x2| x2.matmul(&w.t()?))
}

/// x · wᵀ for a frozen `w`. A decoding step's few rows go through philo's GEMV kernel on the
/// GPU.
fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    over_rows(x, w, |x2| {
        if philo_kernels::gemv::applies(x2, w) {
            philo_kernels::gemv::gemv(x2, w)
        } else {
            x2.matmul(&w.t()?)
        }
    })
}

/// x · wᵀ for a GGUF block-quantised `w`. The GPU's kernels take bf16/f16/f32 rows; the CPU's
/// take f32.
fn ggml_matmul_t(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let product = QMatMul::from_arc(w.clone())?;
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    let rows = x.reshape((x.elem_count() / in_features, in_features))?;
    let rows = if x.device().is_cpu() {
        rows.to_dtype(DType::F32)?
    } else {
        rows.contiguous()?
    };
    let y = product.forward(&rows)?.to_dtype(x.dtype())?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = w.shape().dims()[0];
    Ok(y.reshape(out_dims)?)
}

/// Applies a 2-D product `[rows, in] → [rows, out]` (out = `w`'s rows) to `x` of any leading
/// shape by folding the leading dimensions into rows.
fn over_rows(
    x: &Tensor,
    w: &Tensor,
    product: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    let rows = x.elem_count() / in_features;
    let y = product(&x.reshape((rows, in_features))?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

impl LoraLinear {
    /// A dense layer without adapter.
    pub fn new(weight: Tensor) -> Self {
        LoraLinear {
            base: BaseWeight::Dense(weight),
            lora: None,
        }
    }

    pub fn out_features(&self) -> usize {
        match &self.base {
            BaseWeight::Dense(w) => w.dims()[0],
            BaseWeight::Nf4(w) => w.rows(),
            BaseWeight::Nf4Device(w) => w.rows,
            BaseWeight::Int8(w) => w.shape().0,
            BaseWeight::Int4(w) => w.shape().0,
            BaseWeight::Ggml(w) => w.shape().dims()[0],
        }
    }

    pub fn in_features(&self) -> usize {
        match &self.base {
            BaseWeight::Dense(w) => w.dims()[1],
            BaseWeight::Nf4(w) => w.cols(),
            BaseWeight::Nf4Device(w) => w.cols,
            BaseWeight::Int8(w) => w.shape().1,
            BaseWeight::Int4(w) => w.shape().1,
            BaseWeight::Ggml(w) => w.shape().dims()[1],
        }
    }

    /// The base weight as a dense tensor of `dtype` on `device` (a quantised one is dequantised).
    pub fn dense_weight(&self, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
        Ok(match &self.base {
            BaseWeight::Dense(w) => w.to_dtype(dtype)?.to_device(device)?,
            BaseWeight::Nf4(w) => w.to_tensor(dtype, device).map_err(quant_error)?,
            BaseWeight::Nf4Device(w) => w.dequantize(dtype)?.to_device(device)?,
            BaseWeight::Int8(w) => philo_kernels::dequantize::int8(w, dtype)?.to_device(device)?,
            BaseWeight::Int4(w) => philo_kernels::dequantize::int4(w, dtype)?.to_device(device)?,
            BaseWeight::Ggml(w) => w.dequantize(device)?.to_dtype(dtype)?,
        })
    }

    /// [`LoraLinear::dense_weight`] with `columns` `[out, c]` (same dtype and device) after
    /// each row: `[out, in + c]`. An NF4 base on the GPU is dequantised straight into it.
    pub fn dense_weight_beside(
        &self,
        dtype: DType,
        device: &candle_core::Device,
        columns: &Tensor,
    ) -> Result<Tensor> {
        if let BaseWeight::Nf4Device(w) = &self.base {
            let padded = w
                .dequantize_padded(dtype, columns.dim(1)?)?
                .to_device(device)?;
            padded.slice_set(&columns.contiguous()?, 1, w.cols)?;
            return Ok(padded);
        }
        let dense = self.dense_weight(dtype, device)?;
        Ok(Tensor::cat(&[&dense, columns], 1)?)
    }

    /// Stores a dense base in `format` (a quantised base stays as it is). A weight on a GPU is
    /// quantised into GPU-resident codes.
    pub fn quantize(&mut self, format: WeightFormat) -> Result<()> {
        let BaseWeight::Dense(w) = &self.base else {
            return Ok(());
        };
        let host = || -> Result<(Vec<f32>, usize, usize)> {
            let (rows, cols) = w.dims2()?;
            let values = w
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok((values, rows, cols))
        };
        match format {
            WeightFormat::Dense => {}
            WeightFormat::Nf4 { double_quant } => self.quantize_nf4(double_quant)?,
            WeightFormat::Int8 => {
                let (values, rows, cols) = host()?;
                let q = Int8Tensor::quantize(&values, rows, cols).map_err(quant_error)?;
                let weight = Int8Weight::from_host(&q, w.device()).map_err(quant_error)?;
                self.base = BaseWeight::Int8(Arc::new(weight));
            }
            WeightFormat::Int4 => {
                let (values, rows, cols) = host()?;
                let q =
                    Int4Tensor::quantize(&values, rows, cols, INT4_GROUP).map_err(quant_error)?;
                let weight = Int4Weight::from_host(&q, w.device())
                    .map_err(quant_error)?
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "int4 quantises whole groups of {INT4_GROUP} input columns; this layer has {cols}"
                        ))
                    })?;
                self.base = BaseWeight::Int4(Arc::new(weight));
            }
        }
        Ok(())
    }

    /// Replaces a dense base by its NF4 quantisation (blocks of 64, optional double quantisation).
    /// A weight on a GPU is quantised there and stays there.
    pub fn quantize_nf4(&mut self, double_quant: bool) -> Result<()> {
        if let BaseWeight::Dense(w) = &self.base {
            if w.device().is_cuda() {
                self.base = BaseWeight::Nf4Device(Arc::new(Nf4Weight::quantize(w, double_quant)?));
                return Ok(());
            }
            let q = Nf4Tensor::from_tensor(w, double_quant).map_err(quant_error)?;
            self.base = BaseWeight::Nf4(Arc::new(q));
        }
        Ok(())
    }

    /// y = x·Wᵀ (+ the adapter's contribution), for inference (training runs the hand-written
    /// layer of [`crate::train_layer`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.base {
            BaseWeight::Dense(w) => frozen_matmul_t(x, w)?,
            BaseWeight::Nf4(w) => dequantize_matmul(x, w, x.dtype()).map_err(quant_error)?,
            BaseWeight::Int8(w) => {
                frozen_matmul_t(x, &philo_kernels::dequantize::int8(w, x.dtype())?)?
            }
            BaseWeight::Int4(w) => {
                frozen_matmul_t(x, &philo_kernels::dequantize::int4(w, x.dtype())?)?
            }
            // The dequantised copy lives for this matmul only.
            BaseWeight::Nf4Device(w) => frozen_matmul_t(x, &w.dequantize(x.dtype())?)?,
            BaseWeight::Ggml(w) => ggml_matmul_t(x, w)?,
        };
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        // Detached: while training, A and B are the optimizer's variables, and an evaluation
        // forward must not record an autograd graph.
        let down = matmul_t(x, &lora.a.detach().to_dtype(x.dtype())?)?;
        // The scale goes on B ([out, r]) rather than on the [tokens, out] product: one small
        // tensor instead of a large one kept for the backward.
        let up = matmul_t(&down, &(lora.b.detach().to_dtype(x.dtype())? * lora.scale)?)?;
        Ok((y + up)?)
    }

    /// W + scale·B·A computed in f32 (an NF4 base is dequantised first); the result is dense in
    /// the dense base's dtype (for NF4, the adapter's) and the adapter is removed.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(lora) = self.lora.take() {
            let dtype = match &self.base {
                BaseWeight::Dense(w) => w.dtype(),
                _ => lora.a.dtype(),
            };
            let base = self.dense_weight(DType::F32, lora.a.device())?;
            let delta = (lora
                .b
                .to_dtype(DType::F32)?
                .matmul(&lora.a.to_dtype(DType::F32)?)?
                * lora.scale)?;
            self.base = BaseWeight::Dense((base + delta)?.to_dtype(dtype)?);
        }
        Ok(())
    }
}

fn quant_error(e: philo_quant::QuantError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}
