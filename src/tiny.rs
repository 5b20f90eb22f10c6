//! `philo new-tiny`: the embedded tiny default model, with the real Phi-3 tokenizer files.

use std::path::Path;

use anyhow::Context;
use philo_model::tiny::{tiny_config, write_random_checkpoint};

/// The Phi-3-mini-4k-instruct tokenizer files, shipped inside the binary.
const TOKENIZER_JSON: &[u8] = include_bytes!("../assets/phi-3-tokenizer/tokenizer.json");
const TOKENIZER_CONFIG_JSON: &[u8] =
    include_bytes!("../assets/phi-3-tokenizer/tokenizer_config.json");

/// Writes a tiny random Phi-3 model (hidden 128, 4 layers, Phi-3 vocabulary) with the real
/// tokenizer to `dir`. Refuses to overwrite an existing model.
pub fn write_tiny_model(dir: &Path, seed: u64) -> anyhow::Result<()> {
    if dir.join("config.json").exists() || dir.join("model.safetensors").exists() {
        anyhow::bail!(
            "{}: already holds a model; choose an empty folder",
            dir.display()
        );
    }
    write_random_checkpoint(dir, &tiny_config(), seed)?;
    for (name, bytes) in [
        ("tokenizer.json", TOKENIZER_JSON),
        ("tokenizer_config.json", TOKENIZER_CONFIG_JSON),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}
