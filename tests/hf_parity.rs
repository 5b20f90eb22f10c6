//! Data-driven parity with the Hugging Face reference: every case folder (config.json +
//! reference.json) under tests/fixtures/hf-reference/, or under $PHILO_HF_FIXTURES when set.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use philo_generate::{SamplingParams, TokenStream};
use philo_model::{ModelFiles, Phi3, Phi3Config, SafetensorsStore};

fn fixture_root() -> PathBuf {
    match std::env::var_os("PHILO_HF_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-reference"),
    }
}

/// Every folder below `root` holding both config.json and reference.json.
fn case_dirs(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.join("config.json").is_file() && dir.join("reference.json").is_file() {
            found.push(dir.clone());
        }
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

struct Case {
    dir: PathBuf,
    reference: serde_json::Value,
    tensors: SafetensorsStore,
    model: Phi3,
}

impl Case {
    fn load(dir: &Path) -> Case {
        let files = ModelFiles::from_dir(dir).unwrap();
        let config = Phi3Config::from_file(&files.config()).unwrap();
        let store = SafetensorsStore::open_dir(dir).unwrap();
        let model = Phi3::load(&config, &store, DType::F32, &Device::Cpu).unwrap();
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let tensors = SafetensorsStore::open_files(&[dir.join("reference.safetensors")]).unwrap();
        Case {
            dir: dir.to_path_buf(),
            reference: serde_json::from_str(&text).unwrap(),
            tensors,
            model,
        }
    }

    fn ids(&self, value: &serde_json::Value) -> Vec<u32> {
        value
            .as_array()
            .unwrap_or_else(|| panic!("{}: expected a list of ids", self.dir.display()))
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }
}

/// max |a - b| / max |b|
fn relative_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale
}

#[test]
fn hf_reference_cases() {
    let root = fixture_root();
    let cases = case_dirs(&root);
    assert!(
        !cases.is_empty(),
        "no case folders under {}",
        root.display()
    );
    for dir in cases {
        let case = Case::load(&dir);
        let name = dir.display();
        let inputs = case.reference["inputs"]
            .as_object()
            .expect("inputs")
            .clone();
        let mut checked = 0;
        for (key, ids) in &inputs {
            let ids = case.ids(ids);
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = case
                .model
                .forward(&input, None, None)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let expected = case.tensors.load_raw(&format!("logits.{key}")).unwrap();
            let diff = relative_diff(&logits, &expected);
            eprintln!("{name}: logits.{key} relative difference {diff:.2e}");
            assert!(
                diff <= 1e-4,
                "{name}: logits.{key} differ by {diff:e} (relative)"
            );
            checked += 1;
        }
        assert!(checked > 0, "{name}: no inputs");

        let greedy = &case.reference["greedy"];
        let prompt = case.ids(&greedy["prompt"]);
        let expected = case.ids(&greedy["new_tokens"]);
        let mut stream = TokenStream::new(&case.model, prompt, SamplingParams::greedy()).unwrap();
        let produced: Vec<u32> = (0..expected.len())
            .map(|_| stream.next_token().unwrap())
            .collect();
        assert_eq!(
            produced, expected,
            "{name}: greedy continuation through the KV cache"
        );
    }
}
