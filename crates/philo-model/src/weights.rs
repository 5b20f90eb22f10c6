//! Safetensors checkpoints, single-file or sharded, memory-mapped and read tensor by tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};

/// Where one tensor lives inside a mapped file.
struct TensorEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// Where a model's weights come from: a checkpoint on disk, or tensors already in memory.
pub trait WeightSource {
    /// The tensor `name`, checked against `shape`, converted to `dtype` on `device`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    /// Whether the source holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// `name` in the block-quantised form the source stores it in (a GGUF file's Q8_0, Q4_K,
    /// …), checked against `shape`, on `device`; None when it is stored dense.
    fn quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<std::sync::Arc<candle_core::quantized::QTensor>>> {
        let _ = (name, shape, device);
        Ok(None)
    }
}

impl WeightSource for SafetensorsStore {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.load(name, shape, dtype, device)
    }
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let tensor = self.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            files: "the in-memory weights".into(),
        })?;
        if tensor.dims() != shape {
            return Err(ModelError::TensorShape {
                path: "<memory>".into(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

/// The memory-mapped safetensors files of one checkpoint.
pub struct SafetensorsStore {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    entries: HashMap<String, TensorEntry>,
}

impl SafetensorsStore {
    /// Opens the checkpoint of a model folder: `model.safetensors.index.json` (sharded) if present,
    /// else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_files(&shards_of_index(&index)?);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(ModelError::MissingWeights {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens and validates the given safetensors files. A tensor named twice keeps its last file.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is only read; a checkpoint changed under a running process is the
            // same hazard every mmap-based loader (transformers included) accepts.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let parsed = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in parsed.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::U8 => DType::U8,
                    other => {
                        return Err(ModelError::TensorDtype {
                            path: path.clone(),
                            name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let start = view.data().as_ptr() as usize - base;
                entries.insert(
                    name,
                    TensorEntry {
                        file: index,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        end: start + view.data().len(),
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsStore { files, entries })
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of a tensor as stored, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Loads `name`, checks its shape, converts it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                files: self.describe_files(),
            })?;
        let (path, mmap) = &self.files[entry.file];
        if entry.shape != shape {
            return Err(ModelError::TensorShape {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        let bytes = &mmap[entry.start..entry.end];
        let tensor = Tensor::from_raw_buffer(bytes, entry.dtype, &entry.shape, &Device::Cpu)?;
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    /// Loads `name` as stored (any shape, its own dtype) on the CPU.
    pub fn load_raw(&self, name: &str) -> Result<Tensor> {
        let shape = self
            .shape(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                files: self.describe_files(),
            })?
            .to_vec();
        let dtype = self.entries[name].dtype;
        self.load(name, &shape, dtype, &Device::Cpu)
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }
}

/// The shard files named by a `model.safetensors.index.json`, in first-seen order.
pub(crate) fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|cause| ModelError::Json {
            path: index.to_path_buf(),
            cause,
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::invalid(index, "weight_map", "missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::invalid(index, &format!("weight_map.{tensor}"), "not a file name")
        })?;
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    Ok(shards)
}
