//! A loaded model with everything generation needs: weights, tokenizer, chat template, stop tokens.

use std::ops::ControlFlow;
use std::path::Path;

use crate::quant::BaseQuant;
use anyhow::Context;
use candle_core::{DType, Device};
use philo_generate::{generate, GenerateOptions, Generation};
use philo_model::{
    config::read_generation_eos, weights::WeightSource, Adapter, ModelFiles, Phi3, Phi3Config,
    SafetensorsStore,
};
use philo_text::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer};

/// Phi-3's stop tokens (`<|endoftext|>`, `<|assistant|>`, `<|end|>`), used when the checkpoint
/// has no generation_config.json.
pub const PHI3_STOP_TOKENS: [u32; 3] = [32000, 32001, 32007];

/// The tokenizer of a model folder and its chat template (tokenizer_config.json's, or the
/// built-in Phi-3 one when the folder has none).
pub fn load_text(files: &ModelFiles) -> anyhow::Result<(Tokenizer, ChatTemplate)> {
    let tokenizer_path = files.optional("tokenizer.json").with_context(|| {
        format!(
            "{}: no tokenizer.json; copy the model's tokenizer files next to its weights",
            files.dir.display()
        )
    })?;
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let template = match files.optional("tokenizer_config.json") {
        Some(path) => ChatTemplate::from_tokenizer_config(&path)?,
        None => ChatTemplate::phi3_default(),
    };
    Ok((tokenizer, template))
}

/// Model, tokenizer and chat template of one checkpoint.
pub struct Pipeline {
    pub model: Phi3,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub stop_tokens: Vec<u32>,
}

/// How a loaded model holds its weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct WeightOptions {
    /// The projections' format.
    pub quant: BaseQuant,
    /// With an adapter on a dense base, fold it into the weights at load (PEFT's
    /// merge_and_unload: no per-token cost). On a quantised base the adapter stays apart.
    pub merge_adapter: bool,
}

impl Pipeline {
    /// Loads `spec` (a folder or hub id) in `dtype` on `device`, with the PEFT adapter in
    /// `adapter` on top when given, its weights held as `weights` says.
    pub fn load(
        spec: &str,
        adapter: Option<&Path>,
        weights: WeightOptions,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let path = Path::new(spec);
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            && path.is_file()
        {
            return Self::load_gguf(path, adapter, weights, dtype, device);
        }
        let files = ModelFiles::resolve(spec)?;
        let config = Phi3Config::from_file(&files.config())?;
        let (tokenizer, template) = load_text(&files)?;
        let eos = match files.optional("generation_config.json") {
            Some(path) => read_generation_eos(&path)?,
            None => Vec::new(),
        };
        let store = SafetensorsStore::open_dir(&files.dir)?;
        let parts = (config, tokenizer, template, eos);
        Self::assemble(parts, &store, adapter, weights, dtype, device)
    }

    /// A phi3 GGUF file: config, tokenizer and chat template from its metadata; block-quantised
    /// projections stay as stored unless `weights.quant` names a format.
    fn load_gguf(
        path: &Path,
        adapter: Option<&Path>,
        weights: WeightOptions,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let file = philo_gguf::GgufModel::open(path)?;
        let config = file.config()?;
        let tokenizer = Tokenizer::from_json(&file.tokenizer_json()?, path)?;
        let piece = |id: Option<u32>| id.and_then(|id| file.token(id)).unwrap_or("").to_string();
        let (bos, eos) = (
            piece(config.bos_token_id),
            piece(config.eos_token_ids.first().copied()),
        );
        let template = match file.chat_template() {
            Some(source) => ChatTemplate::new(source, &bos, &eos)
                .with_context(|| format!("{}: tokenizer.chat_template", path.display()))?,
            None => ChatTemplate::phi3_default(),
        };
        let parts = (config, tokenizer, template, Vec::new());
        Self::assemble(parts, &file, adapter, weights, dtype, device)
    }

    /// The pipeline of (config, tokenizer, template, generation_config's EOS ids) with its
    /// weights from `store` (a quantised base quantised projection by projection as it
    /// loads) and `adapter` on top.
    fn assemble(
        (config, tokenizer, template, eos): (Phi3Config, Tokenizer, ChatTemplate, Vec<u32>),
        store: &impl WeightSource,
        adapter: Option<&Path>,
        weights: WeightOptions,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let mut stop_tokens = if eos.is_empty() {
            config.eos_token_ids.clone()
        } else {
            eos
        };
        // Chat turns end with <|end|>; stop there even when generation_config forgets it.
        for id in PHI3_STOP_TOKENS {
            if (id as usize) < config.vocab_size && !stop_tokens.contains(&id) {
                stop_tokens.push(id);
            }
        }
        let format = weights.quant.format(true);
        let mut model = Phi3::load_as(&config, store, dtype, device, format).map_err(|e| {
            let shape = philo_plan::ModelShape::from_config(&config);
            let base = crate::plan::base_format(weights.quant, true);
            let need = philo_plan::infer::weight_bytes(&shape, base, dtype.size_in_bytes());
            crate::oom::explain(
                e,
                "loading the model's weights",
                &format!(
                    "They take {:.1} GiB as {}; --quant int8, int4 or nf4 shrinks them (philo plan generate --quant ... shows the whole need)",
                    need / philo_plan::GIB,
                    base.name()
                ),
            )
        })?;
        if let Some(dir) = adapter {
            Adapter::load(dir)?.attach(&mut model)?;
            if weights.quant == BaseQuant::None && weights.merge_adapter {
                model.merge_lora()?;
            }
        }
        Ok(Pipeline {
            model,
            tokenizer,
            template,
            stop_tokens,
        })
    }

    /// Token ids of a raw prompt (special tokens as the tokenizer adds them).
    pub fn encode_prompt(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, true)?)
    }

    /// Token ids of a conversation rendered by the chat template, ready for the assistant's turn.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        // The template writes BOS itself where the model wants one, as in transformers'
        // apply_chat_template.
        Ok(self.tokenizer.encode(&text, false)?)
    }

    /// Generates from `prompt`, handing each completed piece of text to `on_text`; `on_text`
    /// returning `Break` stops the generation.
    pub fn stream(
        &self,
        prompt: Vec<u32>,
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> anyhow::Result<(Generation, String)> {
        let mut decoder = StreamDecoder::new(&self.tokenizer);
        let mut text = String::new();
        let mut failure = None;
        let generation = generate(&self.model, prompt, options, |token| {
            match decoder.push(token) {
                Ok(Some(piece)) => {
                    text.push_str(&piece);
                    on_text(&piece)
                }
                Ok(None) => ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        if let Some(rest) = decoder.finish()? {
            text.push_str(&rest);
            let _ = on_text(&rest);
        }
        Ok((generation, text))
    }
}
