//! `philo export --format gguf` and GGUF files as `--model`: an f32 export decodes exactly like
//! the safetensors model, a Q8_0 export stays within its quantisation error, llama.cpp's own
//! Python reader reads what philo wrote (where python3 can install it), and broken or foreign
//! files get one clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

const PHILO: &str = env!("CARGO_BIN_EXE_philo");

fn philo(work: &Path, args: &[&str]) -> Output {
    Command::new(PHILO)
        .current_dir(work)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .args(args)
        .output()
        .expect("run philo")
}

fn ok(out: Output, what: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The one `error: ` line of a failed run.
fn error_line(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{err}");
    lines[0].to_string()
}

/// A tiny model in `work/tiny` and its export as `quant` in `work/tiny-QUANT.gguf`.
fn tiny_with_export(work: &Path, quant: &str) -> (PathBuf, PathBuf) {
    let model = work.join("tiny");
    if !model.exists() {
        ok(
            philo(work, &["new-tiny", model.to_str().unwrap()]),
            "new-tiny",
        );
    }
    let file = work.join(format!("tiny-{quant}.gguf"));
    let text = ok(
        philo(
            work,
            &[
                "export",
                "--model",
                model.to_str().unwrap(),
                "--quant",
                quant,
                "--output",
                file.to_str().unwrap(),
            ],
        ),
        "export",
    );
    assert!(text.starts_with("wrote "), "{text}");
    (model, file)
}

/// Greedy `generate` on the CPU from `model` with `extra` arguments (the prompt among them).
fn greedy(work: &Path, model: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--temperature",
        "0",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    ok(philo(work, &args), "generate")
}

/// 24 greedy tokens after a plain prompt.
const PLAIN: [&str; 4] = ["--prompt", "The cat says", "--max_new_tokens", "24"];

#[test]
fn f32_export_decodes_exactly_like_the_safetensors_model() {
    let work = TempDir::new().unwrap();
    let (model, file) = tiny_with_export(work.path(), "f32");
    let from_safetensors = greedy(work.path(), &model, &PLAIN);
    assert!(from_safetensors.trim().len() > 10, "{from_safetensors}");
    assert_eq!(greedy(work.path(), &file, &PLAIN), from_safetensors);
    // The chat template travelled too.
    let chat = ["--prompt", "Hi", "--chat", "--max_new_tokens", "4"];
    assert_eq!(
        greedy(work.path(), &file, &chat),
        greedy(work.path(), &model, &chat)
    );
}

#[test]
fn an_adapter_is_merged_into_the_export() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let (model, _) = tiny_with_export(w, "f32");
    let adapter = w.join("adapter");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/toy_dataset.jsonl");
    ok(
        philo(
            w,
            &[
                "finetune",
                "--base_model",
                model.to_str().unwrap(),
                "--dataset",
                data,
                "--output_dir",
                adapter.to_str().unwrap(),
                "--max_steps",
                "3",
                "--batch_size",
                "2",
                "--max_seq_length",
                "64",
                "--lr",
                "5e-3",
                "--device",
                "cpu",
            ],
        ),
        "finetune",
    );
    let file = w.join("tuned.gguf");
    ok(
        philo(
            w,
            &[
                "export",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--quant",
                "f32",
                "--output",
                file.to_str().unwrap(),
            ],
        ),
        "export --adapter",
    );
    let mut with_adapter = PLAIN.to_vec();
    with_adapter.extend(["--adapter", adapter.to_str().unwrap()]);
    let tuned = greedy(w, &model, &with_adapter);
    assert_ne!(
        tuned,
        greedy(w, &model, &PLAIN),
        "the adapter changes the output"
    );
    assert_eq!(greedy(w, &file, &PLAIN), tuned);
}

#[test]
fn q8_0_export_stays_within_its_quantisation_error() {
    use candle_core::{DType, Device};
    use philo_model::weights::WeightSource;
    let work = TempDir::new().unwrap();
    let (model, file) = tiny_with_export(work.path(), "q8_0");
    let gguf = philo_gguf::GgufModel::open(&file).unwrap();
    let store = philo_model::SafetensorsStore::open_dir(&model).unwrap();
    for (name, shape) in [
        ("model.layers.0.self_attn.qkv_proj.weight", [384, 128]),
        ("model.layers.3.mlp.down_proj.weight", [128, 256]),
    ] {
        let source = store.load(name, &shape, DType::F32, &Device::Cpu).unwrap();
        let read = gguf.tensor(name, &shape, DType::F32, &Device::Cpu).unwrap();
        let err: f32 = (&read - &source)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let absmax: f32 = source
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        // A block of 32 shares an f16 scale absmax/127: half a step, plus the scale's rounding.
        assert!(
            err > 0.0 && err <= absmax / 127.0,
            "{name}: error {err}, absmax {absmax}"
        );
    }
    let mut config = philo_model::Phi3Config::from_file(&model.join("config.json")).unwrap();
    config.saved_dtype = None;
    assert_eq!(gguf.config().unwrap(), config);
}

#[test]
fn llama_cpp_python_reader_reads_the_exports() {
    let work = TempDir::new().unwrap();
    let site = work.path().join("site");
    let pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--timeout",
            "20",
            "--retries",
            "1",
            "--target",
        ])
        .arg(&site)
        .args(["gguf", "safetensors", "numpy"])
        .output();
    match pip {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "skipped: pip install gguf failed (no network?): {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: no python3 ({e})");
            return;
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_gguf.py");
    for quant in ["f32", "f16", "q8_0"] {
        let (model, file) = tiny_with_export(work.path(), quant);
        let out = Command::new("python3")
            .env("PYTHONPATH", &site)
            .args([
                script,
                file.to_str().unwrap(),
                model.to_str().unwrap(),
                quant,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{quant}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("ok   general.architecture is phi3"), "{text}");
    }
}

/// Where `needle` first occurs in `bytes`.
fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|win| win == needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in the file"))
}

#[test]
fn broken_and_foreign_gguf_files_get_one_clear_error() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let (_, file) = tiny_with_export(w, "q8_0");
    let bytes = std::fs::read(&file).unwrap();
    let run = |path: &Path| {
        philo(
            w,
            &[
                "generate",
                "--model",
                path.to_str().unwrap(),
                "--prompt",
                "Hi",
                "--max_new_tokens",
                "2",
            ],
        )
    };

    let truncated = w.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4096]).unwrap();
    let line = error_line(run(&truncated));
    assert!(
        line.contains("truncated.gguf") && line.contains("truncated"),
        "{line}"
    );

    // The same file claiming another architecture.
    let foreign = w.join("llama.gguf");
    let at = find(&bytes, b"\x04\x00\x00\x00\x00\x00\x00\x00phi3");
    let mut patched = bytes.clone();
    patched[at + 8..at + 12].copy_from_slice(b"gpt2");
    std::fs::write(&foreign, &patched).unwrap();
    let line = error_line(run(&foreign));
    assert!(
        line.contains("`gpt2` model") && line.contains("Phi-3"),
        "{line}"
    );

    // A tensor whose GGML type no reader knows.
    let unknown = w.join("unknown-type.gguf");
    let name = b"token_embd.weight";
    let at = find(&bytes, name) + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * dims;
    let mut patched = bytes.clone();
    patched[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&unknown, &patched).unwrap();
    let line = error_line(run(&unknown));
    assert!(
        line.contains("unknown-type.gguf") && line.contains("type 99"),
        "{line}"
    );

    // Not GGUF at all.
    let text = w.join("notes.gguf");
    std::fs::write(&text, "hello").unwrap();
    let line = error_line(run(&text));
    assert!(
        line.contains("notes.gguf") && line.contains("GGUF"),
        "{line}"
    );

    // export never overwrites.
    let model = w.join("tiny");
    let line = error_line(philo(
        w,
        &[
            "export",
            "--model",
            model.to_str().unwrap(),
            "--quant",
            "f16",
            "--output",
            file.to_str().unwrap(),
        ],
    ));
    assert!(line.contains("already exists"), "{line}");
}

/// A block-quantised GGUF file runs as stored (candle's quantised matmul, no dense copy): its
/// logits stay near the source model's; `--quant int8` converts it instead.
#[test]
fn quantised_gguf_weights_run_as_stored() {
    use candle_core::{DType, Device, Tensor};
    use philo::pipeline::{Pipeline, WeightOptions};
    use philo::quant::BaseQuant;
    use philo_model::lora_linear::BaseWeight;
    let work = TempDir::new().unwrap();
    let (model, file) = tiny_with_export(work.path(), "q8_0");
    let load = |spec: &Path, quant| {
        let weights = WeightOptions {
            quant,
            merge_adapter: false,
        };
        Pipeline::load(
            spec.to_str().unwrap(),
            None,
            weights,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .model
    };
    let stored = load(&file, BaseQuant::None);
    assert!(matches!(
        stored.layers[0].self_attn.qkv_proj.base,
        BaseWeight::Ggml(_)
    ));
    let converted = load(&file, BaseQuant::Int8);
    assert!(matches!(
        converted.layers[0].self_attn.qkv_proj.base,
        BaseWeight::Int8(_)
    ));
    let source = load(&model, BaseQuant::None);
    let ids = Tensor::new(
        &[[1u32, 450, 6635, 4083, 29871, 13, 3492, 526]],
        &Device::Cpu,
    )
    .unwrap();
    let logits = |m: &philo_model::Phi3| m.forward(&ids, None, None).unwrap();
    let want = logits(&source);
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    for (what, m) in [("as stored", &stored), ("as int8", &converted)] {
        let err: f32 = (logits(m) - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        // Q8_0 weights (and, as stored, Q8_0 activations in the dot products): within 2 %.
        assert!(err / scale < 0.02, "{what}: max error {err} of {scale}");
    }
}
