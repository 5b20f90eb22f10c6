//! Finding a model: a local Hugging Face folder, or a hub id fetched (or found offline) in the
//! Hugging Face cache.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// The files of one checkpoint, all in one folder (a local folder or a hub snapshot).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
}

/// Gets one file of a hub repository to a local path, or says why not.
type FetchFile = dyn Fn(&str) -> std::result::Result<PathBuf, String>;

/// Files fetched from the hub besides the weights; only config.json is required.
const HUB_FILES: [(&str, bool); 5] = [
    ("config.json", true),
    ("generation_config.json", false),
    ("tokenizer.json", false),
    ("tokenizer_config.json", false),
    ("special_tokens_map.json", false),
];

impl ModelFiles {
    /// `spec` is a folder, or a hub id such as `microsoft/Phi-3-mini-4k-instruct`. Hub files are
    /// downloaded into the cache (HF_HOME, default ~/.cache/huggingface); with HF_HUB_OFFLINE=1
    /// only the cache is read.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if looks_like_hub_id(spec) {
            return Self::from_hub(spec);
        }
        Err(ModelError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model folder (and not a hub id of the form owner/name)",
            ),
        ))
    }

    /// A local folder; it must hold config.json.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.join("config.json").is_file() {
            return Err(ModelError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
        })
    }

    /// The config.json of `spec` (a folder or a hub id) alone: a hub model's weights are not
    /// downloaded.
    pub fn resolve_config(spec: &str) -> Result<PathBuf> {
        let path = Path::new(spec);
        if path.is_dir() || !looks_like_hub_id(spec) {
            return Ok(Self::resolve(spec)?.config());
        }
        hub_fetcher(spec)?("config.json").map_err(|m| hub_error(spec, "config.json", m))
    }

    /// A hub repository, from the cache when offline, else downloaded.
    pub fn from_hub(repo: &str) -> Result<Self> {
        let fetch = hub_fetcher(repo)?;
        let mut dir = None;
        for (file, required) in HUB_FILES {
            match fetch(file) {
                Ok(path) => {
                    dir.get_or_insert_with(|| {
                        path.parent().map(Path::to_path_buf).unwrap_or_default()
                    });
                }
                Err(message) if required => return Err(hub_error(repo, file, message)),
                Err(_) => {}
            }
        }
        let dir = dir.expect("config.json is required");
        match fetch("model.safetensors.index.json") {
            Ok(index) => {
                let dir = index.parent().unwrap_or(Path::new("."));
                let shards: Vec<String> = crate::weights::shards_of_index(&index)?
                    .iter()
                    .map(|p| {
                        p.strip_prefix(dir)
                            .unwrap_or(p)
                            .to_string_lossy()
                            .to_string()
                    })
                    .collect();
                for shard in shards {
                    fetch(&shard).map_err(|m| hub_error(repo, &shard, m))?;
                }
            }
            Err(_) => {
                fetch("model.safetensors").map_err(|m| hub_error(repo, "model.safetensors", m))?;
            }
        }
        Ok(ModelFiles { dir })
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// `name` inside the model folder, if it exists.
    pub fn optional(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }
}

fn hub_error(repo: &str, file: &str, message: String) -> ModelError {
    ModelError::Hub {
        repo: repo.to_string(),
        file: file.to_string(),
        message,
    }
}

/// Reads files of hub repository `repo`: from the cache when HF_HUB_OFFLINE is set, else
/// downloaded into it.
fn hub_fetcher(repo: &str) -> Result<Box<FetchFile>> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    if offline {
        let cache = hf_hub::Cache::from_env().model(repo.to_string());
        return Ok(Box::new(move |file| {
            cache
                .get(file)
                .ok_or_else(|| "not in the local cache and HF_HUB_OFFLINE is set".to_string())
        }));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(repo, "", e.to_string()))?;
    let api_repo = api.model(repo.to_string());
    Ok(Box::new(move |file| {
        api_repo.get(file).map_err(|e| e.to_string())
    }))
}

/// `owner/name` with hub-legal characters and no path-like prefix.
fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let legal = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if legal(a) && legal(b))
}

#[cfg(test)]
mod tests {
    use super::looks_like_hub_id;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("microsoft/Phi-3-mini-4k-instruct"));
        assert!(looks_like_hub_id("a_b/c.d-e"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("one"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
    }
}
