//! The decoder layer for training, written out by hand: a forward that can keep what its
//! backward needs, and a backward that computes the input's gradient and every LoRA gradient
//! directly, with no autograd tape. Frozen weights never get a gradient.
//!
//! What is kept for the backward, per layer: the input, the rotated q/k/v, the attention output
//! and its logsumexp, the post-attention residual, the gate/up projection and, per adapter, its
//! (dropped-out) input and the rank-r down projection. The norms' backward recomputes their
//! statistics from their inputs. With gradient checkpointing only the layer input, the
//! attention output with its logsumexp and the post-attention residual are kept
//! ([`CheckpointState`]); the rest is recomputed by running the forward again from there
//! (without flash attention and the o projection), chunk by chunk, right before the backward of
//! that chunk. Dropout masks are regenerated from their seed instead of stored.
//!
//! The same code runs on the CPU, where philo-kernels' f32 references do the work (the tests
//! hold it to PEFT's gradients), and on CUDA, where their kernels and cuBLAS do.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use philo_kernels::attention::{flash_backward_qkv, flash_forward};
use philo_kernels::gemm::{accumulate_at_b, gemm_into};
use philo_kernels::rope::qkv_rope;

use crate::error::{ModelError, Result};
use crate::lora_linear::{DropoutSeed, LoraLinear};
use crate::phi3::{DecoderLayer, LayerContext, Phi3, RmsNorm};
use philo_kernels::profile::time;

/// Gradient accumulators of one adapter: f32, shaped like its A `[r, in]` and B `[out, r]`.
/// The backward adds to them, so they sum over row chunks and micro-batches.
pub struct LoraGrad {
    pub a: Tensor,
    pub b: Tensor,
}

/// Accumulators by adapter id ([`crate::Lora::id`]).
pub type LoraGrads = HashMap<u64, LoraGrad>;

/// A linear layer as one training pass uses it: the base weight dense in the compute dtype (an
/// NF4 base dequantised once for the whole pass) and the adapter's factors in the compute dtype.
/// With an adapter the base sits beside scale·B in `folded` = [W | scale·B] `[out, in + r]`,
/// and `weight` is W as a view of it: a forward whose input rows have r free columns after
/// them ([`PassLinear::forward_padded`]) then adds the adapter inside the base GEMM, over
/// [x | down], instead of writing and re-reading the output once more.
struct PassLinear {
    weight: Tensor,
    folded: Option<Tensor>,
    lora: Option<PassLora>,
    names: &'static OpNames,
}

/// Profile names of one linear layer's operations.
struct OpNames {
    gemm: &'static str,
    lora: &'static str,
    dx_gemm: &'static str,
    lora_backward: &'static str,
}

macro_rules! op_names {
    ($name:ident, $m:literal) => {
        const $name: OpNames = OpNames {
            gemm: concat!($m, " gemm"),
            lora: concat!($m, " lora"),
            dx_gemm: concat!($m, " bwd dx gemm"),
            lora_backward: concat!($m, " bwd lora"),
        };
    };
}
op_names!(QKV, "qkv");
op_names!(O, "o");
op_names!(GATE_UP, "gate_up");
op_names!(DOWN, "down");

struct PassLora {
    /// `[r, in]`.
    a: Tensor,
    /// scale · B, `[out, r]`.
    b_scaled: Tensor,
    scale: f64,
    dropout: f32,
    id: u64,
}

/// What an adapter's backward needs from its forward.
struct LoraSaved {
    /// The adapter's input before dropout, `[rows, in]` (the mask is regenerated from its seed;
    /// rows may be strided).
    input: Tensor,
    /// input · Aᵀ, `[rows, r]` (rows may be strided).
    down: Tensor,
}

impl PassLinear {
    fn new(
        linear: &LoraLinear,
        dtype: DType,
        device: &candle_core::Device,
        names: &'static OpNames,
    ) -> Result<Self> {
        // Detached: A and B are the optimizer's variables; nothing here records a graph.
        let lora = linear
            .lora
            .as_ref()
            .map(|l| -> Result<PassLora> {
                Ok(PassLora {
                    a: l.a.detach().to_dtype(dtype)?,
                    b_scaled: (l.b.detach().to_dtype(dtype)? * l.scale)?,
                    scale: l.scale,
                    dropout: l.dropout,
                    id: l.id,
                })
            })
            .transpose()?;
        let (weight, folded) = time(device, "dequantize", || {
            let dense = |e| candle_core::Error::wrap(e);
            match &lora {
                Some(l) => {
                    let folded = linear
                        .dense_weight_beside(dtype, device, &l.b_scaled)
                        .map_err(dense)?;
                    let width = folded.dim(1)? - l.b_scaled.dim(1)?;
                    Ok((folded.narrow(1, 0, width)?, Some(folded)))
                }
                None => Ok((linear.dense_weight(dtype, device).map_err(dense)?, None)),
            }
        })?;
        Ok(PassLinear {
            weight,
            folded,
            lora,
            names,
        })
    }

    /// Columns a forward input needs after each row for [`PassLinear::forward_padded`]: the
    /// adapter's rank, or 0 without one.
    fn pad(&self) -> usize {
        self.lora.as_ref().map_or(0, |l| l.a.dim(0).unwrap_or(0))
    }

    /// [`PassLinear::forward`] on rows `padded` `[rows, in + pad()]` whose first `in` columns
    /// are x: the adapter's down projection is written into the last columns and one GEMM
    /// against [W | scale·B] gives x·Wᵀ + down·(scale·B)ᵀ (added onto `onto` when given, as
    /// in [`PassLinear::forward`]).
    fn forward_padded(
        &self,
        padded: &Tensor,
        dropout: Option<DropoutSeed>,
        onto: Option<Tensor>,
    ) -> Result<(Tensor, Option<LoraSaved>)> {
        let (Some(lora), Some(folded)) = (&self.lora, &self.folded) else {
            return self.forward(padded, dropout, onto);
        };
        let dev = padded.device();
        let saved = self.down_padded(lora, padded, dropout)?;
        let (y, beta) = match onto {
            Some(y) => (y, 1.0),
            None => (
                unsafe { Tensor::empty((padded.dim(0)?, folded.dim(0)?), padded.dtype(), dev)? },
                0.0,
            ),
        };
        time(dev, self.names.gemm, || {
            gemm_into(&y, padded, false, folded, true, 1.0, beta)
        })?;
        Ok((y, Some(saved)))
    }

    /// The adapter's down projection of the rows `padded` `[rows, in + r]` (x in the first
    /// `in` columns) written into their last r columns: what the backward needs of the adapter.
    fn down_padded(
        &self,
        lora: &PassLora,
        padded: &Tensor,
        dropout: Option<DropoutSeed>,
    ) -> Result<LoraSaved> {
        let (r, width) = (lora.a.dim(0)?, self.weight.dim(1)?);
        if padded.dim(1)? != width + r {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "padded input of {} columns for a projection of {width} inputs and rank {r}",
                padded.dim(1)?
            ))));
        }
        let x = padded.narrow(1, 0, width)?;
        time(padded.device(), self.names.lora, || {
            philo_kernels::lora::down_into(&x, &lora.a, lora.mask(dropout), padded, width)
        })?;
        Ok(LoraSaved {
            input: x,
            down: padded.narrow(1, width, r)?,
        })
    }

    /// The adapter's saved state derived again for a backward: `padded(r)` gives its input
    /// rows with r free columns (a norm or SwiGLU run again), where the down projection is then
    /// written. None without an adapter.
    fn rederive(
        &self,
        dropout: Option<DropoutSeed>,
        padded: impl FnOnce(usize) -> Result<Tensor>,
    ) -> Result<Option<LoraSaved>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let padded = padded(self.pad())?;
        Ok(Some(self.down_padded(lora, &padded, dropout)?))
    }

    /// y = x·Wᵀ + dropout(x)·Aᵀ·(scale·B)ᵀ on rows `x` `[rows, in]`, written onto `onto`
    /// (`[rows, out]`, contiguous, overwritten: y = onto + …) when given. The adapter's product
    /// is written first and the base GEMM adds onto it (beta = 1), so the sums cost no extra
    /// pass.
    fn forward(
        &self,
        x: &Tensor,
        dropout: Option<DropoutSeed>,
        onto: Option<Tensor>,
    ) -> Result<(Tensor, Option<LoraSaved>)> {
        let dev = x.device();
        let (y, beta) = match onto {
            Some(y) => (y, 1.0),
            None => (
                unsafe { Tensor::empty((x.dim(0)?, self.weight.dim(0)?), x.dtype(), dev)? },
                0.0,
            ),
        };
        let saved = match &self.lora {
            Some(lora) => {
                let saved = self.lora_down(lora, x, dropout)?;
                time(dev, self.names.lora, || {
                    gemm_into(&y, &saved.down, false, &lora.b_scaled, true, 1.0, beta)
                })?;
                Some(saved)
            }
            None => None,
        };
        let beta = if saved.is_some() { 1.0 } else { beta };
        time(dev, self.names.gemm, || {
            gemm_into(&y, x, false, &self.weight, true, 1.0, beta)
        })?;
        Ok((y, saved))
    }

    /// Only what the backward needs of this layer's adapter (its input after dropout and the
    /// rank-r down projection), without the output: a recompute whose output nobody reads.
    fn backward_inputs(
        &self,
        x: &Tensor,
        dropout: Option<DropoutSeed>,
    ) -> Result<Option<LoraSaved>> {
        self.lora
            .as_ref()
            .map(|lora| self.lora_down(lora, x, dropout))
            .transpose()
    }

    fn lora_down(
        &self,
        lora: &PassLora,
        x: &Tensor,
        dropout: Option<DropoutSeed>,
    ) -> Result<LoraSaved> {
        Ok(time(x.device(), self.names.lora, || {
            let down = philo_kernels::lora::down(x, &lora.a, lora.mask(dropout))?;
            Ok(LoraSaved {
                input: x.clone(),
                down,
            })
        })?)
    }

    /// dx `[rows, in]` from dy `[rows, out]`; the adapter's dA and dB are added to `grads`.
    /// With an output wider than the input, dx comes back as the first columns of a wider
    /// buffer (its rows strided); otherwise the adapter's part of dx is written first and the
    /// base GEMM adds onto it.
    fn backward(
        &self,
        saved: Option<&LoraSaved>,
        dy: &Tensor,
        dropout: Option<DropoutSeed>,
        grads: &LoraGrads,
    ) -> Result<Tensor> {
        let dev = dy.device();
        let (Some(lora), Some(saved)) = (&self.lora, saved) else {
            return Ok(time(dev, self.names.dx_gemm, || dy.matmul(&self.weight))?);
        };
        let grad = grads.get(&lora.id).ok_or_else(|| {
            ModelError::Candle(candle_core::Error::Msg(format!(
                "no gradient accumulator for adapter {}",
                lora.id
            )))
        })?;
        let mask = lora.mask(dropout);
        let (out, width) = self.weight.dims2()?;
        if let (Some(folded), true) = (&self.folded, out > width) {
            // A wide output (qkv, gate_up): one GEMM against [W | scale·B] gives
            // [dx | d(down)] and reads dy once instead of twice; the adapter's share of dx is
            // then added in place (re-reading dx, which is narrower than dy).
            let r = lora.a.dim(0)?;
            let both = unsafe { Tensor::empty((dy.dim(0)?, width + r), dy.dtype(), dev)? };
            time(dev, self.names.dx_gemm, || {
                gemm_into(&both, dy, false, folded, false, 1.0, 0.0)
            })?;
            let d_down = both.narrow(1, width, r)?;
            time(dev, self.names.lora_backward, || {
                accumulate_at_b(&grad.b, dy, &saved.down, lora.scale)?;
                philo_kernels::lora::accumulate_grad_a(&grad.a, &d_down, &saved.input, mask)?;
                philo_kernels::lora::add_up_through_dropout(&d_down, &lora.a, mask, &both)
            })?;
            return Ok(both.narrow(1, 0, width)?);
        }
        let dx = time(dev, self.names.lora_backward, || {
            // d(down) = dy·(scale·B); dB = scale·dyᵀ·down; dA = d(down)ᵀ·dropout(input);
            // dx = d(down)·A through the dropout (the same mask, regenerated from its seed).
            let d_down = dy.matmul(&lora.b_scaled)?;
            accumulate_at_b(&grad.b, dy, &saved.down, lora.scale)?;
            philo_kernels::lora::accumulate_grad_a(&grad.a, &d_down, &saved.input, mask)?;
            philo_kernels::lora::up_through_dropout(&d_down, &lora.a, mask)
        })?;
        time(dev, self.names.dx_gemm, || {
            gemm_into(&dx, dy, false, &self.weight, false, 1.0, 1.0)
        })?;
        Ok(dx)
    }
}

impl PassLora {
    /// This adapter's dropout mask (seed, probability) in a forward with `dropout`, or None
    /// when no mask applies.
    fn mask(&self, dropout: Option<DropoutSeed>) -> philo_kernels::lora::Dropout {
        match dropout {
            Some(DropoutSeed(s)) if self.dropout > 0.0 => Some((
                s ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                self.dropout,
            )),
            _ => None,
        }
    }
}

/// A decoder layer's weights for one training pass (a forward over all row chunks, or a
/// recompute-and-backward over all of them): NF4 bases are dequantised once here.
pub struct LayerWeights {
    qkv: PassLinear,
    o: PassLinear,
    gate_up: PassLinear,
    down: PassLinear,
}

/// What a checkpointed layer keeps beside its input: the attention output `[b, s, h, d]`, its
/// logsumexp `[b, h, s]` (f32) and the post-attention residual `[b, s, hidden]`. They spare the
/// recompute the flash-attention forward and the o projection.
pub struct CheckpointState {
    pub attn: Tensor,
    pub lse: Tensor,
    pub residual: Tensor,
}

/// Everything a layer's backward reads from its forward (see the module docs). A layer kept
/// whole across the forward (not checkpointed) is `lean`: the inputs of the qkv, gate/up and
/// down adapters (both norms' outputs and the SwiGLU, 30 % of the state) are dropped and derived
/// again from x, h and gate/up right before the backward, which costs two norms, a SwiGLU and
/// three rank-r products instead of the recompute's GEMMs.
pub struct LayerSaved {
    lean: bool,
    x: Tensor,
    qkv_lora: Option<LoraSaved>,
    /// `[b, h + 2·kvh, s, d]`: rotated q and k, then v.
    heads: Tensor,
    /// `[b, s, h, d]`.
    attn: Tensor,
    /// `[b, h, s]` f32.
    lse: Tensor,
    o_lora: Option<LoraSaved>,
    h: Tensor,
    gate_up_lora: Option<LoraSaved>,
    gate_up: Tensor,
    down_lora: Option<LoraSaved>,
}

/// `norm` of `x` as rows with `pad` free columns after each (see `RmsNorm::forward_padded`),
/// timed as "rms_norm".
fn norm_padded(norm: &RmsNorm, x: &Tensor, pad: usize) -> Result<Tensor> {
    Ok(time(x.device(), "rms_norm", || {
        norm.forward_padded(x, pad)
            .map_err(candle_core::Error::wrap)
    })?)
}

/// `t` `[b, s, n]` as rows `[b·s, n]`.
fn rows(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(candle_core::D::Minus1)?;
    Ok(t.reshape((t.elem_count() / n, n))?)
}

impl DecoderLayer {
    /// The layer on `x` `[b, s, hidden]`: its output when `output`, what its backward needs
    /// when `keep`, and the state a checkpoint keeps when `output` alone. A recompute for the
    /// backward asks for the second only, which spares the down projection's GEMM and the last
    /// residual add, and given `checkpoint` (kept from the forward) it skips flash attention and
    /// the o projection too.
    #[allow(clippy::too_many_arguments)]
    fn forward_train(
        &self,
        x: &Tensor,
        ctx: &LayerContext,
        w: &LayerWeights,
        rotary_dim: usize,
        output: bool,
        keep: bool,
        checkpoint: Option<&CheckpointState>,
    ) -> Result<(Option<Tensor>, Option<LayerSaved>, Option<CheckpointState>)> {
        let ctx = &ctx.inner;
        let (b, s, hidden) = x.dims3()?;
        let shape = self.self_attn.qkv_shape(rotary_dim);
        let (h, kvh) = (shape.heads, shape.kv_heads);
        let dev = x.device();
        let n1 = norm_padded(&self.input_layernorm, x, w.qkv.pad())?;
        let (qkv, qkv_lora) = w.qkv.forward_padded(&n1, ctx.dropout, None)?;
        let heads = time(dev, "rope", || {
            qkv_rope(
                &qkv.reshape((b, s, qkv.dim(1)?))?,
                &ctx.cos,
                &ctx.sin,
                shape,
            )
        })?;
        let (q, k, v) = (
            heads.narrow(1, 0, h)?,
            heads.narrow(1, h, kvh)?,
            heads.narrow(1, h + kvh, kvh)?,
        );
        let norm2 = &self.post_attention_layernorm;
        let (attn, lse, o_lora, hres, n2) = match checkpoint {
            Some(c) => {
                let o_lora =
                    w.o.backward_inputs(&c.attn.reshape((b * s, ()))?, ctx.dropout)?;
                let n2 = norm_padded(norm2, &c.residual, w.gate_up.pad())?;
                (
                    c.attn.clone(),
                    c.lse.clone(),
                    o_lora,
                    c.residual.clone(),
                    n2,
                )
            }
            None => {
                let (attn, lse) = time(dev, "flash fwd", || {
                    flash_forward(&q, &k, &v, &ctx.attention)
                })?;
                let (o, o_lora) =
                    w.o.forward(&attn.reshape((b * s, ()))?, ctx.dropout, None)?;
                let (hres, n2) = time(dev, "add + rms_norm", || {
                    norm2
                        .forward_after_add_padded(x, &o.reshape((b, s, hidden))?, w.gate_up.pad())
                        .map_err(candle_core::Error::wrap)
                })?;
                (attn, lse, o_lora, hres, n2)
            }
        };
        let (gate_up, gate_up_lora) = w.gate_up.forward_padded(&n2, ctx.dropout, None)?;
        // [act | room for the down projection's adapter].
        let act_padded = time(dev, "swiglu", || {
            philo_kernels::swiglu::swiglu_padded(&gate_up, w.down.pad())
        })?;
        let act = act_padded.narrow(1, 0, gate_up.dim(1)? / 2)?;
        let mut kept = None;
        let (out, down_lora) = if output && !keep {
            // A checkpoint: the residual is copied for it, and the MLP's output is summed onto
            // the residual stream itself.
            kept = Some(CheckpointState {
                attn: attn.clone(),
                lse: lse.clone(),
                residual: time(dev, "residual copy", || hres.copy())?,
            });
            let (out, down_lora) =
                w.down
                    .forward_padded(&act_padded, ctx.dropout, Some(rows(&hres)?))?;
            (Some(out.reshape((b, s, hidden))?), down_lora)
        } else if output {
            let (mlp, down_lora) = w.down.forward_padded(&act_padded, ctx.dropout, None)?;
            let out = time(dev, "residual add", || {
                &hres + mlp.reshape((b, s, hidden))?
            })?;
            (Some(out), down_lora)
        } else {
            (None, w.down.backward_inputs(&act, ctx.dropout)?)
        };
        // A forward that keeps its state for a later backward (not a recompute right before
        // it) frees the adapters' inputs; the backward derives them again.
        let lean = output && keep;
        let saved = keep.then(|| LayerSaved {
            lean,
            x: x.clone(),
            qkv_lora: qkv_lora.filter(|_| !lean),
            heads,
            attn,
            lse,
            o_lora,
            h: hres,
            gate_up_lora: gate_up_lora.filter(|_| !lean),
            gate_up,
            down_lora: down_lora.filter(|_| !lean),
        });
        Ok((out, saved, kept))
    }

    /// dL/dx from dL/d(out) `dout` `[b, s, hidden]`; LoRA gradients are added to `grads`.
    fn backward(
        &self,
        saved: &LayerSaved,
        dout: &Tensor,
        ctx: &LayerContext,
        w: &LayerWeights,
        rotary_dim: usize,
        grads: &LoraGrads,
    ) -> Result<Tensor> {
        let ctx = &ctx.inner;
        let kvh = self.self_attn.num_kv_heads;
        let dev = dout.device();
        // A projection's backward, with its adapter's saved state kept or derived again.
        let linear_backward = |linear: &PassLinear,
                               kept: Option<&LoraSaved>,
                               input: &dyn Fn(usize) -> Result<Tensor>,
                               dy: &Tensor| {
            let derived = if saved.lean {
                linear.rederive(ctx.dropout, input)?
            } else {
                None
            };
            linear.backward(kept.or(derived.as_ref()), dy, ctx.dropout, grads)
        };
        // MLP: out = h + down(swiglu(gate_up(norm2(h)))).
        let dout_rows = rows(dout)?;
        let act = |pad| -> Result<Tensor> {
            Ok(time(dev, "swiglu", || {
                philo_kernels::swiglu::swiglu_padded(&saved.gate_up, pad)
            })?)
        };
        let d_act = linear_backward(&w.down, saved.down_lora.as_ref(), &act, &dout_rows)?;
        let d_gate_up = time(dev, "swiglu bwd", || {
            philo_kernels::swiglu::backward(&saved.gate_up, &d_act)
        })?;
        let norm2 = &self.post_attention_layernorm;
        let n2 = |pad| norm_padded(norm2, &saved.h, pad);
        let d_n2 = linear_backward(&w.gate_up, saved.gate_up_lora.as_ref(), &n2, &d_gate_up)?;
        let dh = time(dev, "rms_norm bwd + add", || {
            philo_kernels::rms_norm::backward(&saved.h, &norm2.weight, &d_n2, norm2.eps, Some(dout))
        })?;

        // Attention: h = x + o_proj(flash(rope(qkv_proj(norm1(x))))).
        let d_attn =
            w.o.backward(saved.o_lora.as_ref(), &rows(&dh)?, ctx.dropout, grads)?
                .reshape(saved.attn.shape())?;
        let d_qkv = time(dev, "flash bwd", || {
            flash_backward_qkv(
                &saved.heads,
                kvh,
                &saved.attn,
                &saved.lse,
                &d_attn,
                &ctx.attention,
                Some((&ctx.cos, &ctx.sin, rotary_dim)),
            )
        })?;
        let norm1 = &self.input_layernorm;
        let n1 = |pad| norm_padded(norm1, &saved.x, pad);
        let d_n1 = linear_backward(&w.qkv, saved.qkv_lora.as_ref(), &n1, &rows(&d_qkv)?)?;
        time(dev, "rms_norm bwd + add", || {
            philo_kernels::rms_norm::backward(&saved.x, &norm1.weight, &d_n1, norm1.eps, Some(&dh))
        })
        .map_err(Into::into)
    }
}

impl Phi3 {
    /// Layer `index`'s weights for one training pass (NF4 bases dequantised once).
    pub fn layer_weights(&self, index: usize) -> Result<LayerWeights> {
        let layer = &self.layers[index];
        let (dtype, device) = (self.dtype(), self.device());
        Ok(LayerWeights {
            qkv: PassLinear::new(&layer.self_attn.qkv_proj, dtype, device, &QKV)?,
            o: PassLinear::new(&layer.self_attn.o_proj, dtype, device, &O)?,
            gate_up: PassLinear::new(&layer.mlp.gate_up_proj, dtype, device, &GATE_UP)?,
            down: PassLinear::new(&layer.mlp.down_proj, dtype, device, &DOWN)?,
        })
    }

    /// Training forward of layer `index` on `x` `[b, s, hidden]` with gradient checkpointing:
    /// its output and what the checkpoint keeps beside `x` (the backward recomputes the rest
    /// with [`Phi3::layer_recompute`]).
    pub fn layer_forward_train(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &LayerContext,
        weights: &LayerWeights,
    ) -> Result<(Tensor, CheckpointState)> {
        let rd = self.rotary().rotary_dim();
        let layer = &self.layers[index];
        match layer.forward_train(x, ctx, weights, rd, true, false, None)? {
            (Some(out), _, Some(state)) => Ok((out, state)),
            _ => Err(missing("output or checkpoint")),
        }
    }

    /// What the backward of layer `index` needs from its input `x` and its `checkpoint`,
    /// recomputed (gradient checkpointing).
    pub fn layer_recompute(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &LayerContext,
        weights: &LayerWeights,
        checkpoint: &CheckpointState,
    ) -> Result<LayerSaved> {
        let rd = self.rotary().rotary_dim();
        let layer = &self.layers[index];
        let (_, saved, _) =
            layer.forward_train(x, ctx, weights, rd, false, true, Some(checkpoint))?;
        saved.ok_or_else(|| missing("saved state"))
    }

    /// Training forward of layer `index` that keeps what its backward needs (no checkpointing).
    pub fn layer_forward_keep(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &LayerContext,
        weights: &LayerWeights,
    ) -> Result<(Tensor, LayerSaved)> {
        let rd = self.rotary().rotary_dim();
        match self.layers[index].forward_train(x, ctx, weights, rd, true, true, None)? {
            (Some(out), Some(saved), _) => Ok((out, saved)),
            _ => Err(missing("output or saved state")),
        }
    }

    /// Backward of layer `index`: dL/d(input) from dL/d(output); the LoRA gradients of the
    /// layer are added to `grads`.
    pub fn layer_backward(
        &self,
        index: usize,
        saved: &LayerSaved,
        dout: &Tensor,
        ctx: &LayerContext,
        weights: &LayerWeights,
        grads: &LoraGrads,
    ) -> Result<Tensor> {
        self.layers[index].backward(saved, dout, ctx, weights, self.rotary().rotary_dim(), grads)
    }
}

fn missing(what: &str) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!(
        "the training forward did not produce its {what}"
    )))
}
