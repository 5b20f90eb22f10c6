//! Reading a phi3 GGUF file: its config, tokenizer and chat template, and its tensors under
//! Hugging Face names for philo's model loader (dequantised into the compute dtype).

use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use philo_model::weights::WeightSource;
use philo_model::{ModelError, Phi3Config};

use crate::metadata::{config_json, get_u64};
use crate::names::gguf_name;
use crate::vocab::{tokenizer_json_from_vocab, Vocab};
use crate::{GgufError, Result};

/// An open phi3 GGUF file.
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    file: Mutex<BufReader<std::fs::File>>,
}

impl GgufModel {
    /// Opens `path` and checks that it is a phi3 model whose tensors lie within the file.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |message: String| GgufError::file(path, message);
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let message = e.to_string();
            match message.strip_prefix("unknown dtype for tensor ") {
                Some(code) => err(format!(
                    "a tensor has GGML type {code}, which philo does not read (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k to q6_k)"
                )),
                None => err(format!("not a GGUF file philo can read ({message})")),
            }
        })?;
        match content.metadata.get("general.architecture") {
            Some(Value::String(arch)) if arch == "phi3" => {}
            Some(Value::String(arch)) => {
                return Err(err(format!(
                    "a `{arch}` model: philo runs Phi-3 models (GGUF architecture phi3)"
                )))
            }
            _ => return Err(err("no general.architecture key: not a model file".into())),
        }
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > size {
                return Err(err(format!(
                    "truncated: tensor {name} ends at byte {end}, the file has {size}"
                )));
            }
        }
        Ok(GgufModel {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(reader),
        })
    }

    fn err(&self, message: impl Into<String>) -> GgufError {
        GgufError::file(&self.path, message)
    }

    fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn string(&self, key: &str) -> Option<&str> {
        match self.metadata().get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    fn read_f32(&self, gguf: &str) -> Result<Vec<f32>> {
        Ok(self
            .read(gguf)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// Tensor `gguf`, dequantised to f32 on the CPU.
    fn read(&self, gguf: &str) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf)
            .ok_or_else(|| self.err(format!("no tensor {gguf}")))?;
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let q = info
            .read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| self.err(format!("tensor {gguf}: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    /// The model's config, from the phi3 keys and the tensors' shapes.
    pub fn config(&self) -> Result<Phi3Config> {
        let embed = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.err("no token_embd.weight tensor"))?;
        let vocab_rows = embed.shape.dims()[0];
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let factors = match (
            self.content
                .tensor_infos
                .contains_key("rope_factors_short.weight"),
            self.content
                .tensor_infos
                .contains_key("rope_factors_long.weight"),
        ) {
            (true, true) => Some((
                self.read_f32("rope_factors_short.weight")?,
                self.read_f32("rope_factors_long.weight")?,
            )),
            _ => None,
        };
        let json =
            config_json(self.metadata(), vocab_rows, tied, factors).map_err(|m| self.err(m))?;
        Ok(Phi3Config::from_json_str(&json.to_string(), &self.path)?)
    }

    /// tokenizer.json: the one philo's export embeds, else rebuilt from the llama vocabulary.
    pub fn tokenizer_json(&self) -> Result<String> {
        if let Some(json) = self.string("tokenizer.huggingface.json") {
            return Ok(json.to_string());
        }
        match self.string("tokenizer.ggml.model") {
            Some("llama") => {}
            other => {
                return Err(self.err(format!(
                    "tokenizer.ggml.model is {other:?}: philo reads Phi-3's llama (SentencePiece) vocabulary"
                )))
            }
        }
        let array = |key: &str| match self.metadata().get(key) {
            Some(Value::Array(values)) => Ok(values),
            _ => Err(self.err(format!("metadata key {key} is missing"))),
        };
        let tokens = array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.err("tokenizer.ggml.tokens holds a non-string")),
            })
            .collect::<Result<Vec<_>>>()?;
        let scores = array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32().map_err(|e| self.err(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let types = array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().map_err(|e| self.err(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(self.err("tokenizer.ggml.tokens, scores and token_type differ in length"));
        }
        let add_bos = matches!(
            self.metadata().get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let bos = get_u64(self.metadata(), "tokenizer.ggml.bos_token_id").map(|b| b as u32);
        let vocab = Vocab {
            tokens,
            scores,
            types,
        };
        Ok(tokenizer_json_from_vocab(&vocab, bos, add_bos).to_string())
    }

    /// The chat template, when the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.string("tokenizer.chat_template")
    }

    /// The piece of token `id` in the file's vocabulary.
    pub fn token(&self, id: u32) -> Option<&str> {
        match self.metadata().get("tokenizer.ggml.tokens")? {
            Value::Array(values) => match values.get(id as usize)? {
                Value::String(s) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }
}

impl WeightSource for GgufModel {
    fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> philo_model::Result<Tensor> {
        let gguf = gguf_name(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            files: self.path.display().to_string(),
        })?;
        if !self.content.tensor_infos.contains_key(&gguf) {
            return Err(ModelError::MissingTensor {
                name: format!("{name} ({gguf})"),
                files: self.path.display().to_string(),
            });
        }
        let tensor = self
            .read(&gguf)
            .map_err(|e| ModelError::Candle(candle_core::Error::Msg(e.to_string())))?;
        if tensor.dims() != shape {
            return Err(ModelError::TensorShape {
                path: self.path.clone(),
                name: gguf,
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> philo_model::Result<Option<Arc<QTensor>>> {
        let Some(info) = gguf_name(name).and_then(|g| self.content.tensor_infos.get(&g)) else {
            return Ok(None);
        };
        if matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) {
            return Ok(None);
        }
        if info.shape.dims() != shape {
            return Err(ModelError::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let q = info.read(&mut *file, self.content.tensor_data_offset, device)?;
        Ok(Some(Arc::new(q)))
    }
}
