//! The Phi-3 decoder (Phi3ForCausalLM): embedding, decoder layers of attention + gated MLP, final
//! norm and LM head. Weights use the Hugging Face names (`model.layers.N.self_attn.qkv_proj.weight`).

use candle_core::{DType, Device, Tensor, D};

use crate::config::Phi3Config;
use crate::contiguous_attention::ContiguousAttention;
use crate::decoder_layer::OwnAdapters;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora_linear::{DropoutSeed, LoraLinear, WeightFormat};
use crate::rope::RotaryEmbedding;
use crate::weights::WeightSource;
use philo_kernels::attention::AttentionMask;
use philo_kernels::rope::QkvShape;

/// RMSNorm: the mean square is taken in f32 whatever the compute dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            return Ok(philo_kernels::rms_norm::rms_norm(
                x,
                &self.weight,
                self.eps,
            )?);
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }

    /// The norm of `x` `[..., n]` as rows `[rows, n + pad]`, `pad` columns after each row left
    /// for the caller (see [`philo_kernels::rms_norm::rms_norm_padded`]).
    pub fn forward_padded(&self, x: &Tensor, pad: usize) -> Result<Tensor> {
        if x.device().is_cuda() {
            return Ok(philo_kernels::rms_norm::rms_norm_padded(
                x,
                &self.weight,
                self.eps,
                pad,
            )?);
        }
        pad_rows(&self.forward(x)?, pad)
    }

    /// [`RmsNorm::forward_after_add`] with the norm as padded rows (see
    /// [`RmsNorm::forward_padded`]).
    pub fn forward_after_add_padded(
        &self,
        x: &Tensor,
        add: &Tensor,
        pad: usize,
    ) -> Result<(Tensor, Tensor)> {
        if x.device().is_cuda() {
            return Ok(philo_kernels::rms_norm::add_rms_norm_padded(
                x,
                add,
                &self.weight,
                self.eps,
                pad,
            )?);
        }
        // Training's hand-written layer is checked against the kernels' reference on the CPU.
        let (sum, normed) = philo_kernels::rms_norm::add_rms_norm(x, add, &self.weight, self.eps)?;
        Ok((sum, pad_rows(&normed, pad)?))
    }

    /// `x + add` (when given) and its norm: (the sum, the normed sum). The add is fused into
    /// the norm's kernel on the GPU, so a residual add costs no launch of its own; on the CPU
    /// the sum is normed as [`RmsNorm::forward`] norms.
    pub fn forward_after_add(&self, x: &Tensor, add: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        match add {
            Some(add) if x.device().is_cuda() => Ok(philo_kernels::rms_norm::add_rms_norm(
                x,
                add,
                &self.weight,
                self.eps,
            )?),
            Some(add) => {
                let sum = (x + add)?;
                let normed = self.forward(&sum)?;
                Ok((sum, normed))
            }
            None => Ok((x.clone(), self.forward(x)?)),
        }
    }
}

/// `t` `[..., n]` as rows `[rows, n + pad]`, the pad zero.
fn pad_rows(t: &Tensor, pad: usize) -> Result<Tensor> {
    let n = t.dim(D::Minus1)?;
    let rows = t.reshape((t.elem_count() / n.max(1), n))?;
    Ok(philo_kernels::pad_columns(rows, pad)?)
}

/// Self-attention with a fused `qkv_proj` laid out [Q | K | V].
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Per-forward data shared by every layer: rotary tables, attention bias, dropout seed.
pub struct ForwardContext {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Additive mask `[batch, 1, seq, past + seq]` (0 or a huge negative) for the composed
    /// attention, None when nothing is masked or when the fused kernels mask on the device.
    pub(crate) mask: Option<Tensor>,
    /// Which keys each query sees, for flash attention (the fused kernels, and training, whose
    /// hand-written layer runs flash attention on every device).
    pub(crate) attention: AttentionMask,
    /// Whether inference runs philo's fused CUDA kernels.
    pub(crate) fused: bool,
    /// Set while training: LoRA dropout masks are drawn from it.
    pub(crate) dropout: Option<DropoutSeed>,
}

impl Attention {
    /// The head layout of `qkv_proj`'s output, rotated over `rotary_dim`.
    pub(crate) fn qkv_shape(&self, rotary_dim: usize) -> QkvShape {
        QkvShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            rotary_dim,
        }
    }
}

/// SiLU-gated MLP with a fused `gate_up_proj` laid out [gate | up].
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_up_proj: LoraLinear,
    pub down_proj: LoraLinear,
    intermediate_size: usize,
}

impl Mlp {
    /// SwiGLU of `gate_up` `[..., 2 · intermediate]`: silu(gate) · up (one kernel on the GPU).
    pub(crate) fn activation(&self, gate_up: &Tensor) -> Result<Tensor> {
        if gate_up.device().is_cuda() {
            return Ok(philo_kernels::swiglu::swiglu(gate_up)?);
        }
        let i = self.intermediate_size;
        let gate = gate_up.narrow(D::Minus1, 0, i)?;
        let up = gate_up.narrow(D::Minus1, i, i)?;
        Ok((candle_nn::ops::silu(&gate)? * up)?)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual connection.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// Phi-3 for causal language modelling.
#[derive(Debug, Clone)]
pub struct Phi3 {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: LoraLinear,
    rotary: RotaryEmbedding,
    config: Phi3Config,
    dtype: DType,
    device: Device,
}

/// A value far below any real score that still keeps fully masked rows (left padding) finite.
const MASKED: f32 = f32::MIN;

impl Phi3 {
    /// Loads the weights of `config` from `store`, converted to `dtype` on `device`.
    pub fn load(
        config: &Phi3Config,
        store: &impl WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_as(config, store, dtype, device, WeightFormat::Dense)
    }

    /// Like [`Phi3::load`], with the decoder layers' projections stored in `format` as they
    /// are read: the dense copy of one projection exists at a time, never the whole model's
    /// (the same model as `load` then `quantize`). With [`WeightFormat::Dense`], projections the
    /// source holds block-quantised (GGUF) stay so.
    pub fn load_as(
        config: &Phi3Config,
        store: &impl WeightSource,
        dtype: DType,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self> {
        let c = config;
        let (hd, d) = (c.hidden_size, c.head_dim);
        let load = |name: &str, shape: &[usize]| store.tensor(name, shape, dtype, device);
        let dense = |name: &str, out: usize, inp: usize| -> Result<LoraLinear> {
            Ok(LoraLinear::new(load(
                &format!("{name}.weight"),
                &[out, inp],
            )?))
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<LoraLinear> {
            // Without a format to convert to, a block-quantised source matrix stays as stored.
            if format == WeightFormat::Dense {
                if let Some(q) = store.quantized(&format!("{name}.weight"), &[out, inp], device)? {
                    return Ok(LoraLinear {
                        base: crate::lora_linear::BaseWeight::Ggml(q),
                        lora: None,
                    });
                }
            }
            let mut linear = dense(name, out, inp)?;
            linear.quantize(format)?;
            Ok(linear)
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: load(&format!("{name}.weight"), &[hd])?,
                eps: c.rms_norm_eps,
            })
        };
        let embed_tokens = load("model.embed_tokens.weight", &[c.vocab_size, hd])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * d;
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                self_attn: Attention {
                    qkv_proj: linear(&format!("{p}.self_attn.qkv_proj"), qkv_out, hd)?,
                    o_proj: linear(
                        &format!("{p}.self_attn.o_proj"),
                        hd,
                        c.num_attention_heads * d,
                    )?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: d,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_up_proj: linear(
                        &format!("{p}.mlp.gate_up_proj"),
                        2 * c.intermediate_size,
                        hd,
                    )?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"), hd, c.intermediate_size)?,
                    intermediate_size: c.intermediate_size,
                },
            });
        }
        let lm_head = if c.tie_word_embeddings && !store.contains("lm_head.weight") {
            LoraLinear::new(embed_tokens.clone())
        } else {
            dense("lm_head", c.vocab_size, hd)?
        };
        Ok(Phi3 {
            embed_tokens,
            layers,
            norm: norm("model.norm")?,
            lm_head,
            rotary: RotaryEmbedding::new(&c.rope),
            config: c.clone(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Phi3Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether forwards run philo's fused CUDA kernels (flash attention, fused RoPE, RMSNorm,
    /// SwiGLU): on CUDA in bf16 or f16. Elsewhere the composed candle ops are used.
    pub fn uses_fused_kernels(&self) -> bool {
        self.device.is_cuda() && matches!(self.dtype, DType::BF16 | DType::F16)
    }

    pub fn rotary(&self) -> &RotaryEmbedding {
        &self.rotary
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    /// Logits `[batch, seq, vocab]` (f32) for every position of `input_ids` `[batch, seq]`.
    ///
    /// `attention_mask` `[batch, past + seq]` covers the cached and new positions, as in
    /// transformers: 0 marks padding, 1 a real token. Values above 1 are segment ids for packed
    /// rows: a token attends only to earlier tokens of its own segment, and positions restart at
    /// each segment. Positions count the real tokens of a segment, so a left-padded row gives the
    /// logits of the same row unpadded. With `cache`, the new keys/values are appended.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache)?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }

    /// Logits `[batch, vocab]` (f32) of the last position only: what decoding needs.
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache)?;
        let s = hidden.dim(1)?;
        let last = hidden.narrow(1, s - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?.to_dtype(DType::F32)?)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let ctx = self.context(input_ids, attention_mask, past, None)?;
        if let Some(cache) = &cache {
            let cached_long =
                cache.seq_len() > 0 && self.rotary.uses_long_factors(cache.seq_len() - 1);
            if cache.seq_len() > 0 && ctx.long_rope != cached_long {
                return Err(ModelError::Candle(candle_core::Error::Msg(
                    "this step crosses original_max_position_embeddings: LongRoPE switches to the long factors, so the cached prefix must be recomputed (clear the cache and feed the whole sequence)".into(),
                )));
            }
        }
        let mut attention = ContiguousAttention {
            ctx: &ctx.inner,
            rotary: &self.rotary,
            cache,
        };
        let mut x = self.embed(input_ids)?;
        let mut pending = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (residual, mlp) =
                layer.forward(i, &x, pending.as_ref(), &mut attention, &OwnAdapters)?;
            x = residual;
            pending = Some(mlp);
        }
        Ok(self.norm.forward_after_add(&x, pending.as_ref())?.1)
    }

    /// Token embeddings `[batch, seq, hidden]` of `input_ids` `[batch, seq]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, s, self.config.hidden_size))?)
    }

    /// Everything the layers share for one forward of `input_ids` after `past` cached positions
    /// (see [`Phi3::forward`] for `attention_mask`). `dropout` is set only while training.
    pub fn context(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        past: usize,
        dropout: Option<DropoutSeed>,
    ) -> Result<LayerContext> {
        let (b, s) = input_ids.dims2()?;
        let segments = match attention_mask {
            Some(m) => {
                let (mb, mt) = m.dims2()?;
                if mb != b || mt != past + s {
                    return Err(candle_core::Error::Msg(format!(
                        "attention_mask is [{mb}, {mt}], expected [{b}, {}] (cached + new positions)",
                        past + s
                    ))
                    .into());
                }
                Some(m.to_dtype(DType::U32)?.to_vec2::<u32>()?)
            }
            None => None,
        };
        let positions = positions(segments.as_deref(), b, past, s);
        let max_position = positions.iter().copied().max().unwrap_or(0) as usize;
        let long_rope = self.rotary.uses_long_factors(max_position);
        let (cos, sin) = self
            .rotary
            .cos_sin(&positions, long_rope, self.dtype, &self.device)?;
        let half = self.rotary.rotary_dim() / 2;
        let fused = self.uses_fused_kernels();
        let attention = AttentionMask {
            window: self.config.sliding_window.unwrap_or(usize::MAX),
            segments: attention_mask.map(|m| m.to_dtype(DType::U32)).transpose()?,
        };
        // Training runs flash attention (the reference on the CPU): no additive mask needed.
        let mask = if fused || dropout.is_some() {
            None
        } else {
            self.attention_bias(segments.as_deref(), b, past, s)?
        };
        Ok(LayerContext {
            inner: ForwardContext {
                cos: cos.reshape((b, s, half))?,
                sin: sin.reshape((b, s, half))?,
                mask,
                attention,
                fused,
                dropout,
            },
            long_rope,
        })
    }

    /// The LM head's weight for the chunked training loss: a dense head without adapter (LoRA
    /// on the head is not a target module, so None only for unusual checkpoints).
    pub fn head_weight(&self) -> Option<Tensor> {
        match (&self.lm_head.base, &self.lm_head.lora) {
            (crate::lora_linear::BaseWeight::Dense(w), None) => Some(w.clone()),
            _ => None,
        }
    }

    /// Final norm and LM head: logits `[batch, seq, vocab]` in the compute dtype.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(x)?)
    }

    /// Every LoRA-capable linear layer with its module name (`qkv_proj`, `o_proj`,
    /// `gate_up_proj`, `down_proj`) and layer index.
    pub fn linears(&self) -> Vec<(usize, &'static str, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((i, "qkv_proj", &layer.self_attn.qkv_proj));
            out.push((i, "o_proj", &layer.self_attn.o_proj));
            out.push((i, "gate_up_proj", &layer.mlp.gate_up_proj));
            out.push((i, "down_proj", &layer.mlp.down_proj));
        }
        out
    }

    /// [`Phi3::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(usize, &'static str, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            out.push((i, "qkv_proj", &mut layer.self_attn.qkv_proj));
            out.push((i, "o_proj", &mut layer.self_attn.o_proj));
            out.push((i, "gate_up_proj", &mut layer.mlp.gate_up_proj));
            out.push((i, "down_proj", &mut layer.mlp.down_proj));
        }
        out
    }

    /// Every weight under its Hugging Face name, dense in the model's dtype (NF4 bases are
    /// dequantised); the LM head is left out when tied.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dense = |l: &LoraLinear| l.dense_weight(self.dtype, &self.device);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("{p}.self_attn.qkv_proj.weight"),
                dense(&layer.self_attn.qkv_proj)?,
            ));
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                dense(&layer.self_attn.o_proj)?,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.clone(),
            ));
            out.push((
                format!("{p}.mlp.gate_up_proj.weight"),
                dense(&layer.mlp.gate_up_proj)?,
            ));
            out.push((
                format!("{p}.mlp.down_proj.weight"),
                dense(&layer.mlp.down_proj)?,
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), dense(&self.lm_head)?));
        }
        Ok(out)
    }

    /// Quantises the four projections of every layer to NF4 (QLoRA's frozen base). The LM head
    /// and embeddings stay in the compute dtype, as bitsandbytes' QLoRA recipe keeps them.
    pub fn quantize_nf4(&mut self, double_quant: bool) -> Result<()> {
        self.quantize(WeightFormat::Nf4 { double_quant })
    }

    /// Stores the four projections of every layer in `format` (adapters stay as they are, on
    /// top); the LM head and embeddings keep the compute dtype.
    pub fn quantize(&mut self, format: WeightFormat) -> Result<()> {
        for (_, _, linear) in self.linears_mut() {
            linear.quantize(format)?;
        }
        Ok(())
    }

    /// Folds every LoRA adapter into its base weight (W + scale·B·A in f32) and removes it.
    pub fn merge_lora(&mut self) -> Result<()> {
        for (_, _, linear) in self.linears_mut() {
            linear.merge()?;
        }
        Ok(())
    }

    /// Additive attention bias `[batch, 1, s, past + s]`: causal, sliding window, padding and
    /// segments. None when nothing needs masking (one new token, no mask, window not reached).
    fn attention_bias(
        &self,
        segments: Option<&[Vec<u32>]>,
        b: usize,
        past: usize,
        s: usize,
    ) -> Result<Option<Tensor>> {
        let t = past + s;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        if s == 1 && segments.is_none() && t <= window {
            return Ok(None);
        }
        let mut bias = vec![0f32; b * s * t];
        for row in 0..b {
            for qi in 0..s {
                let i = past + qi;
                let query_segment = segments.map(|m| m[row][i]);
                let out = &mut bias[(row * s + qi) * t..(row * s + qi + 1) * t];
                for (j, slot) in out.iter_mut().enumerate() {
                    let visible = j <= i
                        && i - j < window
                        && segments
                            .is_none_or(|m| m[row][j] != 0 && Some(m[row][j]) == query_segment);
                    if !visible {
                        *slot = MASKED;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(bias, (b, 1, s, t), &self.device)?))
    }
}

/// [`ForwardContext`] plus which RoPE factors it uses, handed out for layer-by-layer training.
pub struct LayerContext {
    pub(crate) inner: ForwardContext,
    long_rope: bool,
}

impl LayerContext {
    /// The context of batch rows `start .. start + len`, for running a micro-batch through a
    /// layer in row chunks. Each chunk draws its own dropout masks (the seed moves with `start`).
    pub fn rows(&self, start: usize, len: usize) -> Result<LayerContext> {
        let i = &self.inner;
        let narrow = |t: &Tensor| t.narrow(0, start, len);
        Ok(LayerContext {
            inner: ForwardContext {
                cos: narrow(&i.cos)?,
                sin: narrow(&i.sin)?,
                mask: i.mask.as_ref().map(narrow).transpose()?,
                attention: AttentionMask {
                    window: i.attention.window,
                    segments: i.attention.segments.as_ref().map(narrow).transpose()?,
                },
                fused: i.fused,
                dropout: i.dropout.map(|DropoutSeed(s)| {
                    DropoutSeed(s.wrapping_add((start as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)))
                }),
            },
            long_rope: self.long_rope,
        })
    }
}

/// Position ids of the new tokens, `[batch * s]` row-major: the number of earlier real tokens of
/// the same segment (padding gets 0), or simply past..past+s without a mask.
fn positions(segments: Option<&[Vec<u32>]>, b: usize, past: usize, s: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(b * s);
    for row in 0..b {
        match segments {
            None => out.extend((past..past + s).map(|p| p as u32)),
            Some(rows) => {
                let mut seen = 0u32;
                let mut segment = 0u32;
                for (j, &m) in rows[row].iter().enumerate() {
                    if m != segment {
                        segment = m;
                        seen = 0;
                    }
                    if j >= past {
                        out.push(if m != 0 { seen } else { 0 });
                    }
                    if m != 0 {
                        seen += 1;
                    }
                }
            }
        }
    }
    out
}
