//! Writing a Phi-3 model as a GGUF file for llama.cpp's `phi3` architecture.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use philo_model::{Phi3Config, RopeScaling};

use crate::metadata::architecture_keys;
use crate::names::gguf_name;
use crate::vocab::vocab_from_tokenizer_json;
use crate::{GgufError, Result};

/// The weight types of an export (`--quant`), with llama.cpp's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    /// Q4_K for most matrices; Q5_K for attn_qkv, Q6_K for the output and for ffn_down in the
    /// layers llama.cpp gives more bits (the first and last eighth, every third between).
    Q4KM,
}

impl std::str::FromStr for ExportType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "bf16" => ExportType::BF16,
            "q8_0" => ExportType::Q8_0,
            "q4_0" => ExportType::Q4_0,
            "q4_k_m" => ExportType::Q4KM,
            _ => {
                return Err(format!(
                    "unknown GGUF type `{s}`: use f32, f16, bf16, q8_0, q4_0 or q4_k_m"
                ))
            }
        })
    }
}

impl ExportType {
    pub fn name(self) -> &'static str {
        match self {
            ExportType::F32 => "f32",
            ExportType::F16 => "f16",
            ExportType::BF16 => "bf16",
            ExportType::Q8_0 => "q8_0",
            ExportType::Q4_0 => "q4_0",
            ExportType::Q4KM => "q4_k_m",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q8_0 => 7,
            ExportType::Q4KM => 15,
            ExportType::BF16 => 32,
        }
    }

    /// The type of matrix `gguf` (`blk.N.…` or a model-level name) of `layers` layers whose
    /// rows hold `cols` values. A k-quant needs rows in blocks of 256 and the legacy types in
    /// blocks of 32; a narrower matrix falls back as llama.cpp's quantiser does.
    fn matrix_type(self, gguf: &str, layers: usize, cols: usize) -> GgmlDType {
        let wanted = match self {
            ExportType::F32 => GgmlDType::F32,
            ExportType::F16 => GgmlDType::F16,
            ExportType::BF16 => GgmlDType::BF16,
            ExportType::Q8_0 => GgmlDType::Q8_0,
            ExportType::Q4_0 => GgmlDType::Q4_0,
            ExportType::Q4KM => {
                let layer = gguf
                    .strip_prefix("blk.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok());
                let more_bits = |i: usize| {
                    // Past the first eighth, `i - layers / 8` cannot underflow.
                    i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2
                };
                if gguf == "output.weight" {
                    GgmlDType::Q6K
                } else if gguf.ends_with("attn_qkv.weight") {
                    GgmlDType::Q5K
                } else if gguf.ends_with("ffn_down.weight") && layer.is_some_and(more_bits) {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
        };
        let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
        if fits(wanted) {
            return wanted;
        }
        let fallback = match wanted {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            _ => GgmlDType::Q8_0,
        };
        if fits(fallback) {
            fallback
        } else {
            GgmlDType::F16
        }
    }
}

/// Reads one tensor by its Hugging Face name, in f32 on the CPU (an adapter merged in).
pub type LoadTensor<'a> = dyn Fn(&str) -> Result<Tensor> + Sync + 'a;

/// What an export is made of.
pub struct ExportInput<'a> {
    pub config: &'a Phi3Config,
    /// Hugging Face names of the tensors to write, with their shapes.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Reads them, one at a time and from every core: the model is never whole in memory.
    pub load: &'a LoadTensor<'a>,
    /// tokenizer.json.
    pub tokenizer: &'a serde_json::Value,
    /// tokenizer_config.json, for `add_bos_token`, when present.
    pub tokenizer_config: Option<&'a serde_json::Value>,
    pub chat_template: Option<String>,
    /// `general.name`.
    pub name: String,
}

/// One tensor of the file: its GGUF name, where its values come from, its type and size.
struct Job {
    gguf: String,
    source: Source,
    dtype: GgmlDType,
    size: usize,
}

enum Source {
    /// Read through `ExportInput::load` under this Hugging Face name.
    Checkpoint(String),
    /// Made by the export (LongRoPE's factors).
    Given(Tensor),
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors by GGUF type name, e.g. ("q4_k", 97).
    pub types: Vec<(String, usize)>,
}

/// Writes `input` as `ty` to `path` (through a temporary file and a rename), reading and
/// quantising on every core, the largest tensors first; `progress(done, total)` after each.
pub fn write_gguf(
    path: &Path,
    input: ExportInput,
    ty: ExportType,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<ExportSummary> {
    let config = input.config;
    let vocab = vocab_from_tokenizer_json(input.tokenizer, config.vocab_size)?;
    let mut metadata = architecture_keys(config);
    let token_id = |v: Option<u32>| v.map(Value::U32);
    metadata.push(("general.name".into(), Value::String(input.name.clone())));
    metadata.push(("general.file_type".into(), Value::U32(ty.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    metadata.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
    metadata.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(vocab.tokens.iter().cloned().map(Value::String).collect()),
    ));
    metadata.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(vocab.scores.iter().copied().map(Value::F32).collect()),
    ));
    metadata.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(vocab.types.iter().copied().map(Value::I32).collect()),
    ));
    let unk = vocab.types.iter().position(|&t| t == crate::vocab::UNKNOWN);
    for (key, id) in [
        ("bos_token_id", config.bos_token_id),
        ("eos_token_id", config.eos_token_ids.first().copied()),
        ("padding_token_id", config.pad_token_id),
        ("unknown_token_id", unk.map(|u| u as u32)),
    ] {
        if let Some(v) = token_id(id) {
            metadata.push((format!("tokenizer.ggml.{key}"), v));
        }
    }
    let flag = |name: &str| {
        input
            .tokenizer_config
            .and_then(|c| c[name].as_bool())
            .unwrap_or(false)
    };
    metadata.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(flag("add_bos_token")),
    ));
    metadata.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(flag("add_eos_token")),
    ));
    if let Some(template) = &input.chat_template {
        metadata.push((
            "tokenizer.chat_template".into(),
            Value::String(template.clone()),
        ));
    }
    // philo reads its tokenizer back exactly from this (the GGUF spec's key for it).
    metadata.push((
        "tokenizer.huggingface.json".into(),
        Value::String(input.tokenizer.to_string()),
    ));

    // The tensors to write, in the checkpoint's order, then LongRoPE's factors.
    let mut jobs: Vec<Job> = Vec::new();
    for (name, shape) in &input.tensors {
        let Some(gguf) = gguf_name(name) else {
            return Err(GgufError::Tokenizer(format!(
                "tensor {name} has no place in llama.cpp's phi3 layout"
            )));
        };
        let dtype = match shape[..] {
            [_, cols] => ty.matrix_type(&gguf, config.num_hidden_layers, cols),
            _ => GgmlDType::F32,
        };
        jobs.push(Job {
            gguf,
            source: Source::Checkpoint(name.clone()),
            dtype,
            size: shape.iter().product(),
        });
    }
    if let RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    } = &config.rope.scaling
    {
        for (name, factors) in [
            ("rope_factors_short.weight", short_factor),
            ("rope_factors_long.weight", long_factor),
        ] {
            let values: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
            let n = values.len();
            let tensor = Tensor::from_vec(values, n, &Device::Cpu)?;
            jobs.push(Job {
                gguf: name.into(),
                source: Source::Given(tensor),
                dtype: GgmlDType::F32,
                size: n,
            });
        }
    }

    let total = jobs.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let quantize = |job: &Job| -> Result<QTensor> {
        let tensor = match &job.source {
            Source::Given(t) => t.clone(),
            Source::Checkpoint(name) => (input.load)(name)?,
        };
        let q = QTensor::quantize(&tensor.to_dtype(DType::F32)?, job.dtype)?;
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        progress(n, total);
        Ok(q)
    };
    // One worker per core takes the next largest tensor until none is left.
    let mut order: Vec<usize> = (0..total).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].size));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(total.max(1));
    let mut quantized: Vec<Option<QTensor>> = (0..total).map(|_| None).collect();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (jobs, order, next, quantize) = (&jobs, &order, &next, &quantize);
                scope.spawn(move || -> Result<Vec<(usize, QTensor)>> {
                    let mut out = Vec::new();
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(&i) = order.get(k) else {
                            return Ok(out);
                        };
                        out.push((i, quantize(&jobs[i])?));
                    }
                })
            })
            .collect();
        for handle in handles {
            let results: Vec<(usize, QTensor)> = handle
                .join()
                .map_err(|_| GgufError::Tokenizer("a quantising thread panicked".into()))??;
            for (i, q) in results {
                quantized[i] = Some(q);
            }
        }
        Ok(())
    })?;
    let tensors: Vec<(&str, QTensor)> = jobs
        .iter()
        .zip(quantized)
        .map(|(job, q)| (job.gguf.as_str(), q.expect("every tensor quantised")))
        .collect();
    let mut types: Vec<(String, usize)> = Vec::new();
    for (_, q) in &tensors {
        let name = type_name(q.dtype()).to_string();
        match types.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => types.push((name, 1)),
        }
    }

    let tmp = path.with_extension("gguf.tmp");
    let write = || -> Result<u64> {
        let file = std::fs::File::create(&tmp).map_err(|e| GgufError::file(&tmp, e.to_string()))?;
        let mut out = std::io::BufWriter::new(file);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
        gguf_file::write(&mut out, &meta, &refs)?;
        let file = out
            .into_inner()
            .map_err(|e| GgufError::file(&tmp, e.to_string()))?;
        file.sync_all()
            .map_err(|e| GgufError::file(&tmp, e.to_string()))?;
        Ok(file
            .metadata()
            .map_err(|e| GgufError::file(&tmp, e.to_string()))?
            .len())
    };
    let bytes = match write() {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path).map_err(|e| GgufError::file(path, e.to_string()))?;
    Ok(ExportSummary {
        tensors: tensors.len(),
        bytes,
        types,
    })
}

/// llama.cpp's name of a tensor type.
fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        let t = |name: &str, cols: usize| ExportType::Q4KM.matrix_type(name, 32, cols);
        assert_eq!(t("output.weight", 3072), GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", 3072), GgmlDType::Q4K);
        assert_eq!(t("blk.9.attn_qkv.weight", 3072), GgmlDType::Q5K);
        assert_eq!(t("blk.9.attn_output.weight", 3072), GgmlDType::Q4K);
        // ffn_down: the first and last eighth of the layers, and every third between.
        let down: Vec<usize> = (0..32)
            .filter(|i| t(&format!("blk.{i}.ffn_down.weight"), 8192) == GgmlDType::Q6K)
            .collect();
        assert_eq!(
            down,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        // Rows that k-quants cannot block fall back as llama.cpp's quantiser does.
        assert_eq!(t("blk.0.ffn_up.weight", 128), GgmlDType::Q5_0);
        assert_eq!(t("blk.0.attn_qkv.weight", 128), GgmlDType::Q5_1);
        assert_eq!(t("output.weight", 128), GgmlDType::Q8_0);
        assert_eq!(t("output.weight", 100), GgmlDType::F16);
        assert_eq!(
            ExportType::Q8_0.matrix_type("blk.0.ffn_up.weight", 32, 128),
            GgmlDType::Q8_0
        );
    }

    #[test]
    fn export_types_parse_with_llama_cpp_names() {
        assert_eq!("Q4_K_M".parse::<ExportType>(), Ok(ExportType::Q4KM));
        assert_eq!("bf16".parse::<ExportType>(), Ok(ExportType::BF16));
        assert!("q3_k_s"
            .parse::<ExportType>()
            .unwrap_err()
            .contains("q4_k_m"));
    }
}
