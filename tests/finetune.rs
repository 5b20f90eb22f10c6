//! End-to-end tests of `philo finetune`, `philo merge` and `philo generate --adapter` on the tiny
//! random model (`philo new-tiny`) and the toy dataset in examples/:
//!
//! - a short QLoRA fine-tune lowers the eval loss well below the untrained model's, writes a PEFT
//!   adapter (adapter_config.json + adapter_model.safetensors with PEFT's names and shapes), and
//!   the adapter makes greedy generation answer the way the data does;
//! - `merge` folds the adapter into a Hugging Face checkpoint that holds W + (alpha/r)·B·A,
//!   generates exactly like base + adapter, and never writes over an existing model;
//! - bad data (malformed JSON, a record without its fields, an empty file, samples longer than
//!   --max_seq_length) and an adapter of another shape fail with one `error:` line that names
//!   the problem, without a panic and without writing anything;
//! - `--resume latest` continues from the newest checkpoint and repeats the uninterrupted run,
//!   and says so clearly when there is no checkpoint.
//!
//! Every test works in its own temporary folder, offline (HF_HUB_OFFLINE=1, HF_HOME inside it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use tempfile::TempDir;

const PHILO: &str = env!("CARGO_BIN_EXE_philo");
const TOY_DATASET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/toy_dataset.jsonl");
const TOY_EVAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/toy_eval.jsonl");

/// The tiny model's fused projections: module, block, [out, in] of its base weight.
const TINY_LINEARS: [(&str, &str, [usize; 2]); 4] = [
    ("qkv_proj", "self_attn", [384, 128]),
    ("o_proj", "self_attn", [128, 128]),
    ("gate_up_proj", "mlp", [512, 128]),
    ("down_proj", "mlp", [128, 256]),
];
const TINY_LAYERS: usize = 4;

/// Runs `philo ARGS` in `work`, offline, with stdin empty.
fn philo(work: &Path, args: &[&str]) -> Output {
    Command::new(PHILO)
        .args(args)
        .current_dir(work)
        .env("HF_HOME", work.join("hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {PHILO}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `philo ARGS` and fails the test, showing both streams, unless it exits 0.
fn philo_ok(work: &Path, args: &[&str]) -> Output {
    let out = philo(work, args);
    assert!(
        out.status.success(),
        "philo {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// A failure as `philo` reports one: exit status 1, no panic, and stderr holding exactly one
/// non-empty line, `error: ...`, that contains each of `needles`. Returns the line.
fn assert_error(out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit status 1\n--- stdout\n{}\n--- stderr\n{err}",
        stdout(out)
    );
    assert!(!err.contains("panicked"), "philo panicked:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a single error line on stderr:\n{err}"
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "the error line does not mention `{needle}`: {}",
            lines[0]
        );
    }
    lines[0].to_string()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// `philo new-tiny WORK/NAME`; returns the folder.
fn new_tiny(work: &Path, name: &str) -> PathBuf {
    let dir = work.join(name);
    philo_ok(work, &["new-tiny", s(&dir)]);
    dir
}

/// `philo finetune --base_model BASE --dataset DATA --output_dir OUT` followed by `extra`.
fn finetune(work: &Path, base: &Path, dataset: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "finetune",
        "--base_model",
        s(base),
        "--dataset",
        dataset,
        "--output_dir",
        s(out),
    ];
    args.extend_from_slice(extra);
    philo(work, &args)
}

/// A short fine-tune of `base` on the toy data (`steps` steps of `batch_size` samples, lr 5e-3,
/// then `extra`): an adapter for the tests that need one. Returns the adapter folder.
fn small_adapter(
    work: &Path,
    base: &Path,
    name: &str,
    steps: usize,
    batch_size: usize,
    extra: &[&str],
) -> PathBuf {
    let out = work.join(name);
    let (steps, batch_size) = (steps.to_string(), batch_size.to_string());
    let mut args = vec![
        "--max_steps",
        &steps,
        "--batch_size",
        &batch_size,
        "--lr",
        "5e-3",
        "--max_seq_length",
        "64",
    ];
    args.extend_from_slice(extra);
    let result = finetune(work, base, TOY_DATASET, &out, &args);
    assert!(
        result.status.success(),
        "finetune failed:\n{}",
        stderr(&result)
    );
    out
}

/// Greedy chat answer to `prompt` from `model` (with `adapter` on top when given).
fn greedy(work: &Path, model: &Path, adapter: Option<&Path>, prompt: &str) -> String {
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--chat",
        "--prompt",
        prompt,
        "--temperature",
        "0",
    ];
    args.extend_from_slice(&["--max_new_tokens", "24"]);
    if let Some(adapter) = adapter {
        args.extend_from_slice(&["--adapter", s(adapter)]);
    }
    stdout(&philo_ok(work, &args))
}

/// The lines of `dir/metrics.jsonl`.
fn metrics(dir: &Path) -> Vec<Value> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir` with its bytes (empty when `dir` does not exist).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path, bytes);
            }
        }
    }
    files
}

fn assert_unchanged(before: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path, what: &str) {
    let after = snapshot(dir);
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&after),
        names(before),
        "{what}: files were added or removed"
    );
    for (path, bytes) in before {
        assert!(
            after[path] == *bytes,
            "{what}: {} was rewritten",
            path.display()
        );
    }
}

/// A safetensors file's tensors: name → (dtype, shape, f32 values when the dtype is F32).
fn read_safetensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file =
        SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                _ => Vec::new(),
            };
            (name, (view.dtype(), view.shape().to_vec(), values))
        })
        .collect()
}

fn peft_name(layer: usize, block: &str, module: &str, which: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight")
}

// ---------------------------------------------------------------------------------------------
// Training and the adapter

#[test]
fn finetune_lowers_eval_loss_and_the_adapter_answers() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let common = [
        "--eval_dataset",
        TOY_EVAL,
        "--batch_size",
        "8",
        "--lora_r",
        "16",
        "--lora_alpha",
        "32",
        "--max_seq_length",
        "256",
    ];

    // The untrained eval loss: one step whose update has learning rate 0 (the first warmup
    // step), evaluated at its end.
    let untrained_dir = w.join("untrained");
    let mut args = common.to_vec();
    args.extend_from_slice(&["--max_steps", "1", "--warmup_steps", "1", "--lr", "5e-3"]);
    let out = finetune(w, &tiny, TOY_DATASET, &untrained_dir, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let untrained = metrics(&untrained_dir);
    assert_eq!(untrained.len(), 1, "{untrained:?}");
    assert_eq!(
        untrained[0]["lr"], 0.0,
        "the single step must not change the adapter"
    );
    let untrained_eval = untrained[0]["eval_loss"]
        .as_f64()
        .expect("eval_loss at the last step");
    // A random model is near chance: ln(32064) = 10.38.
    assert!(
        (9.5..11.5).contains(&untrained_eval),
        "untrained eval loss {untrained_eval}"
    );

    // The fine-tune (QLoRA: --quant nf4 is the default).
    let out_dir = w.join("out");
    let mut args = common.to_vec();
    args.extend_from_slice(&[
        "--max_steps",
        "60",
        "--lr",
        "5e-3",
        "--warmup_steps",
        "3",
        "--logging_steps",
        "10",
        "--eval_steps",
        "30",
    ]);
    let out = finetune(w, &tiny, TOY_DATASET, &out_dir, &args);
    assert!(out.status.success(), "finetune failed:\n{}", stderr(&out));

    let lines = metrics(&out_dir);
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [10, 20, 30, 40, 50, 60]);
    let evals: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        [30, 60],
        "{lines:?}"
    );
    let (first_eval, last_eval) = (evals[0].1, evals[1].1);
    assert!(
        last_eval < 0.6 * untrained_eval,
        "eval loss {untrained_eval} untrained, {first_eval} at step 30, {last_eval} at step 60"
    );
    assert!(
        last_eval < first_eval && first_eval < untrained_eval,
        "{untrained_eval} {first_eval} {last_eval}"
    );
    // `philo eval` measures what the trainer's evaluation measured: with the saved adapter on
    // the same NF4 base, and without it (B starts at zero, so the untrained adapter is a no-op).
    let eval_json = w.join("eval.json");
    for (adapter, want) in [(Some(&out_dir), last_eval), (None, untrained_eval)] {
        let mut args = vec![
            "eval",
            "--model",
            s(&tiny),
            "--quant",
            "nf4",
            "--dataset",
            TOY_EVAL,
            "--batch_size",
            "8",
            "--max_seq_length",
            "256",
            "--json",
            s(&eval_json),
        ];
        if let Some(dir) = adapter {
            args.extend_from_slice(&["--adapter", s(dir)]);
        }
        let out = philo_ok(w, &args);
        let result = read_json(&eval_json);
        let loss = result["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-4,
            "philo eval {loss} vs the trainer's {want} (adapter {adapter:?})"
        );
        assert!((result["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
        assert!(result["tokens"].as_u64().unwrap() > 0);
        assert!(
            stdout(&out).contains(&format!("loss {loss:.4}, perplexity")),
            "{}",
            stdout(&out)
        );
    }

    let first_loss = lines[0]["loss"].as_f64().unwrap();
    let last_loss = lines[5]["loss"].as_f64().unwrap();
    assert!(
        last_loss < first_loss,
        "training loss {first_loss} at step 10, {last_loss} at step 60"
    );
    let summary = stdout(&out);
    let expected =
        format!("done: 60 steps, loss {last_loss:.4}, eval loss {last_eval:.4}; adapter in ");
    assert!(
        summary.contains(&expected),
        "stdout: {summary}\nexpected: {expected}"
    );

    // The adapter folder, as PEFT writes it.
    let config = read_json(&out_dir.join("adapter_config.json"));
    assert_eq!(config["r"], 16);
    assert_eq!(config["lora_alpha"], 32.0);
    assert_eq!(
        config["lora_dropout"]
            .as_f64()
            .map(|d| (d - 0.05).abs() < 1e-6),
        Some(true),
        "{config}"
    );
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    );
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["bias"], "none");
    assert_eq!(config["use_rslora"], false);
    assert_eq!(config["base_model_name_or_path"], s(&tiny));
    let weights = read_safetensors(&out_dir.join("adapter_model.safetensors"));
    let mut expected_names = Vec::new();
    for layer in 0..TINY_LAYERS {
        for (module, block, [out_features, in_features]) in TINY_LINEARS {
            let a = peft_name(layer, block, module, "A");
            let b = peft_name(layer, block, module, "B");
            let (dtype, shape, _) = weights.get(&a).unwrap_or_else(|| panic!("no {a}"));
            assert_eq!(
                (*dtype, shape.as_slice()),
                (Dtype::F32, &[16, in_features][..]),
                "{a}"
            );
            let (dtype, shape, values) = weights.get(&b).unwrap_or_else(|| panic!("no {b}"));
            assert_eq!(
                (*dtype, shape.as_slice()),
                (Dtype::F32, &[out_features, 16][..]),
                "{b}"
            );
            // B starts at zero; training moved it.
            assert!(values.iter().any(|v| v.abs() > 1e-4), "{b} is still zero");
            expected_names.extend([a, b]);
        }
    }
    expected_names.sort();
    assert_eq!(weights.keys().cloned().collect::<Vec<_>>(), expected_names);
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-") || n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no checkpoints without --save_steps, no temporary files: {leftovers:?}"
    );

    // What it learned: the toy data answers "The <animal> says <sound>."
    let question = "What sound does a dog make?";
    let base_answer = greedy(w, &tiny, None, question);
    assert!(
        !base_answer.contains("says"),
        "the untrained model already says: {base_answer}"
    );
    let answer = greedy(w, &tiny, Some(&out_dir), question);
    assert!(answer.contains("says"), "the fine-tuned answer: {answer}");
}

// ---------------------------------------------------------------------------------------------
// Merge

/// Perplexity of `model` on the toy eval data with its projections in `quant` (`philo eval`).
fn perplexity(work: &Path, model: &Path, quant: &str) -> f64 {
    let json = work.join(format!("eval-{quant}.json"));
    philo_ok(
        work,
        &[
            "eval",
            "--model",
            s(model),
            "--dataset",
            TOY_EVAL,
            "--quant",
            quant,
            "--json",
            s(&json),
        ],
    );
    read_json(&json)["perplexity"].as_f64().unwrap()
}

#[test]
fn int8_and_int4_weights_keep_the_perplexity_of_a_merged_fine_tune() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let adapter = small_adapter(w, &tiny, "adapter", 60, 8, &["--quant", "none"]);
    let merged = w.join("merged");
    philo_ok(
        w,
        &[
            "merge",
            "--base_model",
            s(&tiny),
            "--adapter",
            s(&adapter),
            "--output",
            s(&merged),
            "--dtype",
            "f32",
        ],
    );
    let dense = perplexity(w, &merged, "none");
    let untrained = perplexity(w, &tiny, "none");
    assert!(
        dense < untrained / 100.0,
        "the fine-tune did not learn: {dense} vs {untrained}"
    );
    let int8 = perplexity(w, &merged, "int8");
    let int4 = perplexity(w, &merged, "int4");
    eprintln!("perplexity: dense {dense:.4}, int8 {int8:.4}, int4 {int4:.4}");
    assert!(
        (int8 / dense - 1.0).abs() < 0.01,
        "int8 {int8} vs dense {dense}"
    );
    assert!(
        (int4 / dense - 1.0).abs() < 0.05,
        "int4 {int4} vs dense {dense}"
    );
    // The adapter applied unmerged on an NF4 base (`--use_4bit`) stays as close (the adapter
    // itself is not quantised).
    let json = w.join("eval-adapter.json");
    philo_ok(
        w,
        &[
            "eval",
            "--model",
            s(&tiny),
            "--adapter",
            s(&adapter),
            "--dataset",
            TOY_EVAL,
            "--use_4bit",
            "--json",
            s(&json),
        ],
    );
    let nf4_adapter = read_json(&json)["perplexity"].as_f64().unwrap();
    assert!(
        (nf4_adapter / dense - 1.0).abs() < 0.05,
        "nf4 base + adapter {nf4_adapter} vs dense {dense}"
    );
}

#[test]
fn merge_writes_a_checkpoint_that_generates_like_the_adapter() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let adapter = small_adapter(
        w,
        &tiny,
        "adapter",
        8,
        4,
        &["--lora_r", "8", "--lora_alpha", "32"],
    );
    let merged = w.join("merged");
    let out = philo_ok(
        w,
        &[
            "merge",
            "--base_model",
            s(&tiny),
            "--adapter",
            s(&adapter),
            "--output",
            s(&merged),
            "--dtype",
            "f32",
        ],
    );
    assert!(
        stdout(&out).contains("wrote the merged model to"),
        "{}",
        stdout(&out)
    );

    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(
            merged.join(name).is_file(),
            "the merged folder lacks {name}"
        );
    }
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(
            std::fs::read(merged.join(name)).unwrap() == std::fs::read(tiny.join(name)).unwrap(),
            "{name} is not the base's"
        );
    }
    let mut config = read_json(&merged.join("config.json"));
    assert_eq!(config["torch_dtype"], "float32");
    let mut base_config = read_json(&tiny.join("config.json"));
    config.as_object_mut().unwrap().remove("torch_dtype");
    base_config.as_object_mut().unwrap().remove("torch_dtype");
    assert_eq!(
        config, base_config,
        "the merged config describes the base's shape"
    );

    // Every weight is the base's, the adapted ones plus (alpha / r) · B · A.
    let base = read_safetensors(&tiny.join("model.safetensors"));
    let merged_weights = read_safetensors(&merged.join("model.safetensors"));
    let lora = read_safetensors(&adapter.join("adapter_model.safetensors"));
    assert_eq!(
        merged_weights.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    let scale = 32.0 / 8.0;
    let mut adapted = 0;
    for (name, (dtype, shape, values)) in &merged_weights {
        let (_, base_shape, base_values) = &base[name];
        assert_eq!((*dtype, shape), (Dtype::F32, base_shape), "{name}");
        let target = TINY_LINEARS
            .iter()
            .find(|(module, _, _)| name.contains(&format!(".{module}.")));
        let Some((module, block, _)) = target else {
            assert!(
                values == base_values,
                "{name} is not adapted and must be the base's"
            );
            continue;
        };
        let layer: usize = name.split('.').nth(2).unwrap().parse().unwrap();
        let (_, a_shape, a) = &lora[&peft_name(layer, block, module, "A")];
        let (_, _, b) = &lora[&peft_name(layer, block, module, "B")];
        let (r, cols) = (a_shape[0], a_shape[1]);
        let mut max_diff = 0f32;
        let mut max_delta = 0f32;
        for (i, row) in values.chunks_exact(cols).enumerate() {
            for (j, &merged_value) in row.iter().enumerate() {
                let delta: f32 =
                    (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum::<f32>() * scale;
                max_diff = max_diff.max((merged_value - (base_values[i * cols + j] + delta)).abs());
                max_delta = max_delta.max(delta.abs());
            }
        }
        assert!(
            max_diff < 1e-5,
            "{name}: the merged weight is off W + scale·B·A by {max_diff}"
        );
        assert!(
            max_delta > 1e-5,
            "{name}: the adapter adds nothing, the check above proves nothing"
        );
        adapted += 1;
    }
    assert_eq!(adapted, TINY_LAYERS * TINY_LINEARS.len());

    // The merged model generates what base + adapter generates, which is not what the base does.
    let question = "What sound does a dog make?";
    let with_adapter = greedy(w, &tiny, Some(&adapter), question);
    assert_eq!(greedy(w, &merged, None, question), with_adapter);
    assert_ne!(
        greedy(w, &tiny, None, question),
        with_adapter,
        "the adapter changes nothing"
    );

    // A folder that already holds a model is never written over.
    for existing in [&merged, &tiny] {
        let before = snapshot(existing);
        let out = philo(
            w,
            &[
                "merge",
                "--base_model",
                s(&tiny),
                "--adapter",
                s(&adapter),
                "--output",
                s(existing),
                "--dtype",
                "f32",
            ],
        );
        assert_error(&out, &["already holds a model", s(existing)]);
        assert_unchanged(&before, existing, "merge into an existing model");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input: one `error:` line, nothing written

/// Fine-tunes the tiny model in `work` on a dataset of `contents` (written to `data.jsonl`)
/// with `extra` arguments; the run must fail with one error line containing `needles` and
/// leave `work` as it was. Returns the error line.
fn finetune_must_fail(contents: &str, extra: &[&str], needles: &[&str]) -> String {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let data = w.join("data.jsonl");
    std::fs::write(&data, contents).unwrap();
    let before = snapshot(w);
    let out = finetune(w, &tiny, s(&data), &w.join("out"), extra);
    let line = assert_error(&out, needles);
    assert_unchanged(&before, w, "a failed finetune");
    assert!(!w.join("out").exists());
    line
}

const GOOD_LINE: &str = r#"{"messages": [{"role": "user", "content": "What does a cow say?"}, {"role": "assistant", "content": "The cow says moo."}]}"#;

#[test]
fn finetune_rejects_a_malformed_json_line() {
    let contents =
        format!("{GOOD_LINE}\n{GOOD_LINE}\n{{\"messages\": [{{\"role\": \"user\"\n{GOOD_LINE}\n");
    finetune_must_fail(&contents, &[], &["data.jsonl:3", "not valid JSON"]);
}

#[test]
fn finetune_rejects_a_record_without_its_fields() {
    let contents = format!("{GOOD_LINE}\n{{\"prompt\": \"What does a cow say?\"}}\n{GOOD_LINE}\n");
    finetune_must_fail(&contents, &[], &["data.jsonl:2", "\"messages\"", "missing"]);
}

#[test]
fn finetune_rejects_an_empty_dataset() {
    finetune_must_fail("\n\n", &[], &["data.jsonl", "empty"]);
}

#[test]
fn finetune_rejects_data_longer_than_max_seq_length() {
    let contents = format!("{GOOD_LINE}\n{GOOD_LINE}\n");
    finetune_must_fail(
        &contents,
        &["--max_seq_length", "4"],
        &["no training sample left", "max_seq_length (4 tokens)"],
    );
}

#[test]
fn finetune_rejects_a_dropout_outside_zero_to_one() {
    let contents = format!("{GOOD_LINE}\n{GOOD_LINE}\n");
    for p in ["1", "-0.1"] {
        let flag = format!("--lora_dropout={p}");
        finetune_must_fail(&contents, &[&flag], &["--lora_dropout", "below 1"]);
    }
}

#[test]
fn an_adapter_for_another_shape_is_refused_by_generate_and_merge() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let adapter = small_adapter(w, &tiny, "adapter", 1, 2, &[]);

    // Two bases the adapter does not fit: hidden size 64 instead of 128, and 2 layers instead of 4.
    let narrow = {
        let mut c = philo_model::tiny::tiny_config();
        c.hidden_size = 64;
        c.intermediate_size = 128;
        c.head_dim = 16;
        c.rope.rotary_dim = 16;
        c
    };
    let shallow = philo_model::Phi3Config {
        num_hidden_layers: 2,
        ..philo_model::tiny::tiny_config()
    };
    for (name, config, needles) in [
        (
            "narrow",
            narrow,
            ["adapter_model.safetensors", "trained for another model"],
        ),
        (
            "shallow",
            shallow,
            ["adapter_model.safetensors", "2 layers"],
        ),
    ] {
        let base = w.join(name);
        philo_model::tiny::write_random_checkpoint(&base, &config, 1).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tiny.join(file), base.join(file)).unwrap();
        }
        // The base itself is fine.
        philo_ok(
            w,
            &[
                "generate",
                "--model",
                s(&base),
                "--prompt",
                "Hello",
                "--max_new_tokens",
                "2",
            ],
        );

        let before = snapshot(w);
        let out = philo(
            w,
            &[
                "generate",
                "--model",
                s(&base),
                "--adapter",
                s(&adapter),
                "--prompt",
                "Hello",
            ],
        );
        assert_error(&out, &needles);
        assert!(
            stdout(&out).is_empty(),
            "{name}: generated with a mismatched adapter: {}",
            stdout(&out)
        );

        let merged = w.join(format!("merged-{name}"));
        let out = philo(
            w,
            &[
                "merge",
                "--base_model",
                s(&base),
                "--adapter",
                s(&adapter),
                "--output",
                s(&merged),
            ],
        );
        assert_error(&out, &needles);
        assert!(
            !merged.exists(),
            "{name}: merge created {}",
            merged.display()
        );
        assert_unchanged(&before, w, name);
    }
}

// ---------------------------------------------------------------------------------------------
// Resume

#[test]
fn resume_latest_continues_from_the_last_checkpoint() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let out_dir = w.join("out");
    let args = [
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--batch_size",
        "2",
        "--lr",
        "5e-3",
        "--max_seq_length",
        "64",
    ];
    let first = finetune(w, &tiny, TOY_DATASET, &out_dir, &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let checkpoint = out_dir.join("checkpoint-2");
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(checkpoint.join(name).is_file(), "checkpoint-2 lacks {name}");
    }
    assert!(
        !out_dir.join("checkpoint-4").exists(),
        "the last step writes the adapter, not a checkpoint"
    );
    let straight_adapter = read_safetensors(&out_dir.join("adapter_model.safetensors"));
    let straight = metrics(&out_dir);
    assert_eq!(
        straight
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );

    // The same command again, resumed: it trains steps 3 and 4 from checkpoint-2.
    let mut resume_args = args.to_vec();
    resume_args.extend_from_slice(&["--resume", "latest"]);
    let second = finetune(w, &tiny, TOY_DATASET, &out_dir, &resume_args);
    assert!(second.status.success(), "{}", stderr(&second));
    let log = stderr(&second);
    assert!(
        log.contains(&format!("resumed from {}", s(&checkpoint))),
        "{log}"
    );
    assert!(
        stdout(&second).contains("done: 4 steps"),
        "{}",
        stdout(&second)
    );
    let all = metrics(&out_dir);
    let steps: Vec<u64> = all.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(
        steps,
        [1, 2, 3, 4, 3, 4],
        "the resumed run appends steps 3 and 4"
    );
    for (resumed, original) in all[4..].iter().zip(&straight[2..]) {
        for key in ["loss", "lr", "grad_norm"] {
            assert_eq!(
                resumed[key], original[key],
                "step {}: {key} differs after the resume",
                original["step"]
            );
        }
    }
    let resumed_adapter = read_safetensors(&out_dir.join("adapter_model.safetensors"));
    assert!(
        resumed_adapter == straight_adapter,
        "the resumed run ends with another adapter"
    );
    let at_checkpoint = read_safetensors(&checkpoint.join("adapter_model.safetensors"));
    assert!(
        at_checkpoint != straight_adapter,
        "steps 3 and 4 changed nothing: the comparison proves nothing"
    );
}

#[test]
fn resume_latest_without_a_checkpoint_is_a_clear_error() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let tiny = new_tiny(w, "tiny");
    let out_dir = w.join("out");
    let before = snapshot(w);
    let out = finetune(
        w,
        &tiny,
        TOY_DATASET,
        &out_dir,
        &["--resume", "latest", "--max_steps", "2"],
    );
    assert_error(&out, &["--resume latest", "no checkpoint", s(&out_dir)]);
    assert_unchanged(&before, w, "--resume latest without a checkpoint");

    // An output folder holding a finished adapter but no checkpoint-N is no better.
    small_adapter(w, &tiny, "out", 1, 2, &[]);
    let before = snapshot(w);
    let out = finetune(
        w,
        &tiny,
        TOY_DATASET,
        &out_dir,
        &["--resume", "latest", "--max_steps", "2"],
    );
    assert_error(&out, &["--resume latest", "no checkpoint"]);
    assert_unchanged(&before, w, "--resume latest without a checkpoint");
}
