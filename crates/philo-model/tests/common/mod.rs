//! Shared helpers of the model crate's tests: the reference cases under tests/fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use philo_model::{Phi3, Phi3Config, SafetensorsStore, WeightFormat};

pub fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf-reference/dev")
        .join(name)
}

pub fn load_model(dir: &Path, dtype: DType) -> Phi3 {
    let config = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    let store = SafetensorsStore::open_dir(dir).unwrap();
    Phi3::load(&config, &store, dtype, &Device::Cpu).unwrap()
}

/// CUDA device 0 when PHILO_CUDA_TESTS=1 (a GPU test then needs it); otherwise None, after
/// saying that the test is skipped.
pub fn cuda_device() -> Option<Device> {
    if std::env::var("PHILO_CUDA_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped (set PHILO_CUDA_TESTS=1 to run the CUDA tests)");
        return None;
    }
    Some(Device::new_cuda(0).expect("PHILO_CUDA_TESTS=1 but no CUDA device 0"))
}

/// Reference case `name` loaded in bf16 on `device` with its weights held as `format`.
pub fn load_case_bf16(name: &str, device: &Device, format: WeightFormat) -> Phi3 {
    let dir = case_dir(name);
    let config = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    let store = SafetensorsStore::open_dir(&dir).unwrap();
    Phi3::load_as(&config, &store, DType::BF16, device, format).unwrap()
}

pub fn reference(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

pub fn reference_tensor(dir: &Path, name: &str) -> Tensor {
    SafetensorsStore::open_files(&[dir.join("reference.safetensors")])
        .unwrap()
        .load_raw(name)
        .unwrap()
}

pub fn input(reference: &serde_json::Value, key: &str) -> Vec<u32> {
    reference["inputs"][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// max |a - b| / max |b|
pub fn relative_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    let actual = actual.to_dtype(DType::F32).unwrap();
    let diff = (&actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = expected.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

pub fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Logits of the last position of `ids` by the plain forward on the model's device, on the CPU.
pub fn last_logits(model: &Phi3, ids: &[u32]) -> Tensor {
    let ids = row(ids).to_device(model.device()).unwrap();
    model
        .forward_last(&ids, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

/// A second adapter for `dir`'s (mini4k's): the same A, B negated and scaled by 1.5, written as
/// PEFT files into a temporary folder (kept alive by the returned guard).
pub fn negated_adapter(dir: &Path) -> (tempfile::TempDir, philo_model::Adapter) {
    rewritten_adapter(
        dir,
        |name, t| match name.contains("lora_B") {
            true => (t * -1.5).unwrap(),
            false => t,
        },
        |_| {},
    )
}

/// `dir`'s (mini4k's) adapter with each tensor passed through `tensor` (given its name) and
/// its config through `config`, written as PEFT files into a temporary folder (kept alive by
/// the returned guard).
pub fn rewritten_adapter(
    dir: &Path,
    tensor: impl Fn(&str, Tensor) -> Tensor,
    config: impl FnOnce(&mut serde_json::Value),
) -> (tempfile::TempDir, philo_model::Adapter) {
    let tmp = tempfile::tempdir().unwrap();
    let tensors: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let t = tensor(&name, t);
                (name, t)
            })
            .collect();
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    config(&mut json);
    std::fs::write(tmp.path().join("adapter_config.json"), json.to_string()).unwrap();
    candle_core::safetensors::save(&tensors, tmp.path().join("adapter_model.safetensors")).unwrap();
    let adapter = philo_model::Adapter::load(tmp.path()).unwrap();
    (tmp, adapter)
}
