//! Data-driven parity with the Hugging Face reference: every case folder (config.json +
//! reference.json) under tests/fixtures/hf-reference/, or under $PHILO_HF_FIXTURES when set.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use philo_generate::{SamplingParams, TokenStream};
use philo_model::{Adapter, ModelFiles, Phi3, Phi3Config, SafetensorsStore};
use philo_train::adamw::{AdamW, AdamWConfig};
use philo_train::backward::{loss_and_grads, MicroBatch, PassOptions};
use philo_train::lora_params::LoraParams;
use philo_train::loss::count_targets;

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

        if dir.join("adapter").is_dir() {
            check_lora(&case);
        }

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

/// In-memory PEFT name (with the adapter name) of a saved-adapter name.
fn reference_name(prefix: &str, name: &str) -> String {
    format!(
        "{prefix}.{}",
        name.replacen(".weight", ".default.weight", 1)
    )
}

fn assert_close(case: &Case, what: &str, actual: &Tensor, expected_name: &str, tolerance: f32) {
    let expected = case.tensors.load_raw(expected_name).unwrap();
    let diff = relative_diff(actual, &expected);
    eprintln!(
        "{}: {what} relative difference {diff:.2e}",
        case.dir.display()
    );
    assert!(
        diff <= tolerance,
        "{}: {what} differs by {diff:e} (relative)",
        case.dir.display()
    );
}

/// Tolerance of the LoRA gradients: the reference gradients themselves carry ~1e-4 relative f32
/// noise on these sharp random models: the same gradients computed in f64 differ from them by
/// 1.0e-4 (gqa_window), while the loss agrees to 2e-7.
const GRAD_TOLERANCE: f32 = 2e-4;

/// Tolerance of the adapter after three AdamW steps. These random models are ill-conditioned
/// (gradient norms 10-50): Adam's per-element normalisation turns f32 rounding noise in the
/// gradients into ~1e-4 relative noise in the parameters. Measured: running the identical
/// procedure in f64 lands 3.4e-4 from the reference on `longrope` while every step's loss
/// agrees to 1e-6, so the reference itself carries that noise; 1e-4 cannot be asked of it.
const ADAMW_TOLERANCE: f32 = 5e-4;

/// Adapter logits, LoRA loss and gradients, three AdamW steps, and the merged model.
fn check_lora(case: &Case) {
    let name = case.dir.display();
    let adapter = Adapter::load(&case.dir.join("adapter")).unwrap();
    let lora = &case.reference["lora"];
    let row = |key: &str| {
        let ids = case.ids(&case.reference["inputs"][key]);
        (
            ids.clone(),
            Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
    };

    let mut model = case.model.clone();
    adapter.attach(&mut model).unwrap();
    let (_, in0) = row("in0");
    let logits = model.forward(&in0, None, None).unwrap().squeeze(0).unwrap();
    assert_close(case, "lora.logits.in0", &logits, "lora.logits.in0", 1e-4);

    // Loss and gradients, with and without gradient checkpointing.
    let params = LoraParams::from_model(&mut model).unwrap();
    let labels: Vec<i64> = lora["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let batch = MicroBatch {
        input_ids: in0.clone(),
        segments: None,
        labels: vec![labels],
    };
    let n = count_targets(&batch.labels);
    // Without checkpointing, with it, and with the last half of the layers exempt from it.
    let layers = model.config().num_hidden_layers;
    let partial = PassOptions {
        uncheckpointed_layers: layers.div_ceil(2),
        ..PassOptions::CHECKPOINTED
    };
    for options in [PassOptions::KEEP_ALL, PassOptions::CHECKPOINTED, partial] {
        let out = loss_and_grads(&model, &params, &batch, n, options, None).unwrap();
        let loss = out.loss_sum / n as f64;
        let expected = lora["loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-4,
            "{name}: LoRA loss {loss} vs {expected}"
        );
        for (param, grad) in params.params.iter().zip(&out.grads) {
            let reference = reference_name("lora.grad", &param.name);
            assert_close(
                case,
                &format!("grad of {}", param.name),
                grad,
                &reference,
                GRAD_TOLERANCE,
            );
        }
    }

    // Three AdamW steps from the adapter's weights, labels = inputs.
    let adamw = &case.reference["adamw"];
    let betas = adamw["betas"].as_array().unwrap();
    let config = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: adamw["eps"].as_f64().unwrap(),
        weight_decay: adamw["weight_decay"].as_f64().unwrap(),
    };
    let lr = adamw["lr"].as_f64().unwrap();
    let mut optimizer = AdamW::new(config, &params).unwrap();
    let expected_losses = adamw["losses"].as_array().unwrap();
    for (step, key) in adamw["inputs"].as_array().unwrap().iter().enumerate() {
        let (ids, input) = row(key.as_str().unwrap());
        let batch = MicroBatch {
            input_ids: input,
            segments: None,
            labels: vec![ids.iter().map(|&i| i as i64).collect()],
        };
        let n = count_targets(&batch.labels);
        let out =
            loss_and_grads(&model, &params, &batch, n, PassOptions::CHECKPOINTED, None).unwrap();
        let loss = out.loss_sum / n as f64;
        let expected = expected_losses[step].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-4,
            "{name}: AdamW step {step} loss {loss} vs {expected}"
        );
        optimizer.update(&params, &out.grads, lr, 1.0).unwrap();
    }
    for param in &params.params {
        let reference = reference_name("adamw.final", &param.name);
        let what = format!("AdamW result {}", param.name);
        assert_close(
            case,
            &what,
            param.var.as_tensor(),
            &reference,
            ADAMW_TOLERANCE,
        );
    }

    // Merge the original adapter into the base.
    let mut merged = case.model.clone();
    adapter.attach(&mut merged).unwrap();
    merged.merge_lora().unwrap();
    let logits = merged
        .forward(&in0, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_close(
        case,
        "merged.logits.in0",
        &logits,
        "merged.logits.in0",
        1e-4,
    );
    let weight = merged.layers[0]
        .self_attn
        .qkv_proj
        .dense_weight(DType::F32, &Device::Cpu)
        .unwrap();
    assert_close(
        case,
        "merged qkv_proj weight",
        &weight,
        "merged.weight.layers.0.qkv_proj",
        1e-4,
    );
}

/// The reference cases on the GPU in bf16, through philo's fused kernels (flash attention, fused
/// RoPE/RMSNorm/SwiGLU, NF4 on the device, the chunked loss). Gated: needs the `cuda` feature and
/// PHILO_CUDA_TESTS=1. Logits are held to 3e-2 of max |ref| (bf16 has 8 mantissa bits), or to
/// 1.5× what the composed ops reach in bf16 on the CPU where bf16 alone costs more, and the
/// LoRA gradients of a packed two-segment batch to 5e-2 (relative L2) of the same computation in
/// f32 on the CPU, which the test above holds to transformers.
#[cfg(feature = "cuda")]
#[test]
fn hf_reference_cases_on_cuda_bf16() {
    use philo_model::adapter::{AdapterConfig, TARGET_MODULES};
    use rand::{Rng, SeedableRng};
    if std::env::var("PHILO_CUDA_TESTS").as_deref() != Ok("1") {
        eprintln!("hf_reference_cases_on_cuda_bf16: skipped (set PHILO_CUDA_TESTS=1)");
        return;
    }
    let gpu = Device::new_cuda(0).unwrap();
    for dir in case_dirs(&fixture_root()) {
        let case = Case::load(&dir);
        let name = dir.display();
        let config = Phi3Config::from_file(&ModelFiles::from_dir(&dir).unwrap().config()).unwrap();
        let store = SafetensorsStore::open_dir(&dir).unwrap();
        let mut model = Phi3::load(&config, &store, DType::BF16, &gpu).unwrap();
        assert!(model.uses_fused_kernels());
        // What bf16 itself costs: the composed ops in bf16 on the CPU, against the same reference.
        let cpu_bf16 = Phi3::load(&config, &store, DType::BF16, &Device::Cpu).unwrap();
        let inputs = case.reference["inputs"].as_object().unwrap().clone();
        let mut first_ids = None;
        for (key, ids) in &inputs {
            let ids = case.ids(ids);
            let input = Tensor::new(ids.as_slice(), &gpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .forward(&input, None, None)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let logits = logits.to_device(&Device::Cpu).unwrap();
            let expected = case.tensors.load_raw(&format!("logits.{key}")).unwrap();
            let diff = relative_diff(&logits, &expected);
            let cpu_input = input.to_device(&Device::Cpu).unwrap();
            let bf16_logits = cpu_bf16
                .forward(&cpu_input, None, None)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let bf16_diff = relative_diff(&bf16_logits, &expected);
            let tolerance = (1.5 * bf16_diff).max(3e-2);
            eprintln!("{name} [cuda bf16]: logits.{key} relative difference {diff:.2e} (CPU bf16: {bf16_diff:.2e}, tolerance {tolerance:.1e})");
            assert!(
                diff <= tolerance,
                "{name}: cuda bf16 logits.{key} differ by {diff:e}"
            );

            // Decoding through the KV cache gives the full forward's last logits.
            let mut cache = model.new_cache();
            let n = ids.len();
            model
                .forward_last(&input.narrow(1, 0, n - 1).unwrap(), None, Some(&mut cache))
                .unwrap();
            let last = model
                .forward_last(&input.narrow(1, n - 1, 1).unwrap(), None, Some(&mut cache))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let diff = relative_diff(&last, &expected.get(n - 1).unwrap());
            eprintln!(
                "{name} [cuda bf16]: cached decode of logits.{key} relative difference {diff:.2e}"
            );
            assert!(
                diff <= tolerance,
                "{name}: cached decode differs by {diff:e}"
            );
            first_ids.get_or_insert(ids);
        }

        // LoRA gradients on a packed batch (two segments + padding), GPU bf16 vs CPU f32.
        let ids = first_ids.unwrap();
        let n = ids.len();
        let segments: Vec<u32> = (0..n)
            .map(|i| {
                if i < n / 2 {
                    1
                } else if i + 2 < n {
                    2
                } else {
                    0
                }
            })
            .collect();
        let labels = vec![ids
            .iter()
            .zip(&segments)
            .map(|(&t, &s)| if s == 0 { -100 } else { t as i64 })
            .collect::<Vec<_>>()];
        let adapter = AdapterConfig::new(
            4,
            8.0,
            0.0,
            TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
            false,
        );
        let mut cpu_model = case.model.clone();
        let mut grads = Vec::new();
        for (m, device) in [(&mut cpu_model, Device::Cpu), (&mut model, gpu.clone())] {
            let params = LoraParams::init(m, &adapter, 7).unwrap();
            // B starts at zero in PEFT; random B makes every A gradient non-zero too.
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            for p in params.params.iter().filter(|p| p.name.contains("lora_B")) {
                let values: Vec<f32> = (0..p.var.elem_count())
                    .map(|_| rng.random_range(-0.05..0.05))
                    .collect();
                p.var
                    .set(&Tensor::from_vec(values, p.var.shape(), &device).unwrap())
                    .unwrap();
            }
            let batch = MicroBatch {
                input_ids: Tensor::new(ids.as_slice(), &device)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                segments: Some(
                    Tensor::new(segments.as_slice(), &device)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                ),
                labels: labels.clone(),
            };
            let g = loss_and_grads(
                m,
                &params,
                &batch,
                count_targets(&labels),
                // The GPU runs the first layer checkpointed and the second as kept.
                PassOptions {
                    uncheckpointed_layers: usize::from(device.is_cuda()),
                    ..PassOptions::CHECKPOINTED
                },
                None,
            )
            .unwrap();
            let flat: Vec<f32> = g
                .grads
                .iter()
                .flat_map(|t| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect();
            grads.push((g.loss_sum, flat));
        }
        let (cpu, cuda) = (&grads[0], &grads[1]);
        let loss_diff = ((cuda.0 - cpu.0) / cpu.0).abs();
        let num: f32 = cpu
            .1
            .iter()
            .zip(&cuda.1)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        let den: f32 = cpu.1.iter().map(|a| a * a).sum();
        let grad_diff = (num / den).sqrt();
        eprintln!("{name} [cuda bf16]: packed LoRA loss relative difference {loss_diff:.2e}, gradients (relative L2) {grad_diff:.2e}");
        assert!(loss_diff <= 2e-2, "{name}: loss differs by {loss_diff:e}");
        assert!(
            grad_diff <= 5e-2,
            "{name}: LoRA gradients differ by {grad_diff:e}"
        );
    }
}
