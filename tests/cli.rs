//! End-to-end tests of the `philo` binary: `new-tiny`, `generate`, `chat` and `demo` on the tiny
//! random model, loading a hub id from an offline Hugging Face cache, and the one-line `error: ...`
//! messages (never a panic) for broken model folders and bad arguments.
//!
//! Every test works in its own temporary folder, with HF_HOME pointed inside it and
//! HF_HUB_OFFLINE=1, so nothing ever touches the network or the user's cache.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

const PHILO: &str = env!("CARGO_BIN_EXE_philo");

/// The files `philo new-tiny` writes.
const TINY_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// A `philo` command run in `work`, offline, with an HF_HOME of its own inside `work`.
fn philo_in(work: &Path) -> Command {
    let mut cmd = Command::new(PHILO);
    cmd.current_dir(work)
        .env("HF_HOME", work.join("hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

/// Runs `philo ARGS` in `work` (stdin empty).
fn run(work: &Path, args: &[&str]) -> Output {
    philo_in(work)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {PHILO}: {e}"))
}

/// Runs `philo ARGS` in `work` with `input` on stdin.
fn run_with_stdin(work: &Path, args: &[&str], input: &str) -> Output {
    let mut child = philo_in(work)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {PHILO}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("write to philo's stdin");
    child.wait_with_output().expect("wait for philo")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails with both streams shown unless the command exited 0.
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Checks a failure as main reports it: non-zero exit, no panic, and stderr holding exactly one
/// non-empty line, `error: ...`, that contains every one of `needles`. Returns that line.
fn assert_error_line(out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure, got {}:\n--- stdout\n{}\n--- stderr\n{err}",
        out.status,
        stdout(out)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status of an error; stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "philo panicked:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line on stderr, got:\n{err}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("error: "),
        "error line does not start with `error: `: {line}"
    );
    for needle in needles {
        assert!(
            line.contains(needle),
            "error line does not mention `{needle}`: {line}"
        );
    }
    // A cause printed both inside its error's message and again as the next link of the chain.
    let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
    assert!(
        parts.windows(2).all(|w| w[0] != w[1]),
        "error line repeats itself: {line}"
    );
    line.to_string()
}

/// `philo new-tiny DIR` (must succeed); returns DIR.
fn new_tiny(work: &Path, name: &str) -> PathBuf {
    let dir = work.join(name);
    let out = run(work, &["new-tiny", dir.to_str().expect("utf-8 temp path")]);
    assert_success(&out, "philo new-tiny");
    dir
}

/// A fresh temporary folder holding a tiny model in `model/`.
fn tiny_model() -> (TempDir, PathBuf) {
    let work = TempDir::new().expect("temp dir");
    let model = new_tiny(work.path(), "model");
    (work, model)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// The generated-token count of generate's stats line
/// `[P prompt tokens, N new tokens, prefill X ms, Y tok/s]` on stderr.
fn new_tokens(out: &Output) -> usize {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.contains("tok/s"))
        .unwrap_or_else(|| panic!("no tok/s stats line on stderr:\n{err}"));
    let before = line
        .split(" new tokens")
        .next()
        .filter(|_| line.contains(" new tokens"))
        .unwrap_or_else(|| panic!("stats line without a new-token count: {line}"));
    let count = before.rsplit(' ').next().unwrap_or_default();
    count.parse().unwrap_or_else(|_| {
        panic!("stats line with an unreadable new-token count `{count}`: {line}")
    })
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Runs `generate --model MODEL --prompt Hello` with `extra` arguments; must succeed.
fn generate(work: &Path, model: &str, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--model", model, "--prompt", "Hello"];
    args.extend_from_slice(extra);
    let out = run(work, &args);
    assert_success(&out, &format!("philo {}", args.join(" ")));
    out
}

// ---------------------------------------------------------------------------------------------
// new-tiny

#[test]
fn new_tiny_writes_a_complete_model_and_refuses_to_overwrite_it() {
    let (work, dir) = tiny_model();
    for name in TINY_FILES {
        let path = dir.join(name);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("new-tiny did not write {name}: {e}"))
            .len();
        assert!(len > 0, "{name} is empty");
    }
    assert_eq!(read_json(&dir.join("config.json"))["model_type"], "phi3");
    assert!(
        read_json(&dir.join("tokenizer.json"))["model"].is_object(),
        "tokenizer.json has no model"
    );
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&weights).expect("model.safetensors parses");
    assert_eq!(
        parsed.tensor("model.embed_tokens.weight").unwrap().shape(),
        [32064, 128],
        "tiny embedding shape"
    );

    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before_weights = mtime(&dir.join("model.safetensors"));
    let before_config = std::fs::read(dir.join("config.json")).unwrap();
    // A second write into the same folder must fail without touching what is there.
    let out = run(work.path(), &["new-tiny", path_str(&dir)]);
    assert_error_line(&out, &[path_str(&dir), "already holds a model"]);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights,
        "model.safetensors changed"
    );
    assert_eq!(
        mtime(&dir.join("model.safetensors")),
        before_weights,
        "model.safetensors rewritten"
    );
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        before_config,
        "config.json changed"
    );
}

// ---------------------------------------------------------------------------------------------
// generate

#[test]
fn greedy_generate_streams_text_and_is_deterministic() {
    let (work, dir) = tiny_model();
    let model = path_str(&dir);
    let args = ["--max_new_tokens", "8", "--temperature", "0"];
    let first = generate(work.path(), model, &args);
    assert!(
        !stdout(&first).trim().is_empty(),
        "nothing generated on stdout"
    );
    assert!(
        stderr(&first).contains("tok/s"),
        "no stats line: {}",
        stderr(&first)
    );
    let n = new_tokens(&first);
    assert!(
        (1..=8).contains(&n),
        "{n} new tokens with --max_new_tokens 8"
    );

    let second = generate(work.path(), model, &args);
    assert_eq!(
        stdout(&first),
        stdout(&second),
        "greedy decoding gave different text"
    );
    assert_eq!(new_tokens(&second), n);

    // Prompt-lookup speculation leaves the greedy text as it is.
    let speculative = generate(
        work.path(),
        model,
        &[
            "--max_new_tokens",
            "8",
            "--temperature",
            "0",
            "--speculative",
            "ngram",
        ],
    );
    assert_eq!(
        stdout(&first),
        stdout(&speculative),
        "--speculative ngram changed the greedy text"
    );
    // So does a draft model (here the model itself: every proposal is kept).
    let drafted = generate(
        work.path(),
        model,
        &[
            "--max_new_tokens",
            "8",
            "--temperature",
            "0",
            "--speculative",
            "draft",
            "--draft_model",
            model,
        ],
    );
    assert_eq!(
        stdout(&first),
        stdout(&drafted),
        "--speculative draft changed the greedy text"
    );
    assert!(
        stderr(&drafted).contains("speculated tokens accepted"),
        "{}",
        stderr(&drafted)
    );
    // `bench decode --speculative draft` reports the same output and what speculation did
    // (also into --json's file).
    let report = work.path().join("speculative.json");
    let out = run(
        work.path(),
        &[
            "bench",
            "decode",
            "--model",
            model,
            "--device",
            "cpu",
            "--speculative",
            "draft",
            "--draft_model",
            model,
            "--seq",
            "16",
            "--new_tokens",
            "12",
            "--json",
            report.to_str().unwrap(),
        ],
    );
    assert_success(&out, "philo bench decode --speculative draft");
    let json: serde_json::Value = stdout(&out)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON line");
    assert_eq!(read_json(&report), json, "--json wrote another report");
    assert_eq!(json["same_output"], true, "{json}");
    assert_eq!(json["accepted"], json["proposed"], "{json}");
    assert!(json["verify_steps"].as_u64().unwrap() > 0, "{json}");
    let curve = json["verify_cost"].as_array().unwrap();
    assert_eq!(curve.len(), 9, "k = 0..=8: {json}");
    assert_eq!(curve[0]["relative"], 1.0);
    assert!(
        curve.iter().all(|c| c["ms"].as_f64().unwrap() > 0.0),
        "{json}"
    );
    // `--engine layers` (the persistent decode kernel, CUDA only) falls back to the general
    // forward on the CPU and names the engine that ran.
    let report = work.path().join("layers.json");
    let out = run(
        work.path(),
        &[
            "bench",
            "decode",
            "--model",
            model,
            "--device",
            "cpu",
            "--seq",
            "8",
            "--new_tokens",
            "4",
            "--engine",
            "layers",
            "--json",
            report.to_str().unwrap(),
        ],
    );
    assert_success(&out, "philo bench decode --engine layers");
    let json = &read_json(&report)[0];
    assert_eq!(json["engine"], "candle", "{json}");
    // `bench serve` runs its streams through the engine and reports the KV pool it sized for
    // them: 2 streams of 8 + 4 tokens, a block of 16 each, and one for the warm-up request.
    let report = work.path().join("serve.json");
    let out = run(
        work.path(),
        &[
            "bench",
            "serve",
            "--model",
            model,
            "--device",
            "cpu",
            "--batch",
            "2",
            "--seq",
            "8",
            "--new_tokens",
            "4",
            "--json",
            report.to_str().unwrap(),
        ],
    );
    assert_success(&out, "philo bench serve");
    let json = &read_json(&report)[0];
    assert_eq!(json["tokens"], 8, "{json}");
    let engine = json["engine"].as_str().unwrap();
    assert!(engine.contains("KV pool 3 blocks of 16"), "{json}");
    // The tiny model's block: 2 (keys, values) × layers × kv heads × head dim × 16 × f32.
    let config = read_json(&Path::new(model).join("config.json"));
    let field = |key: &str| config[key].as_u64().unwrap();
    let head_dim = field("hidden_size") / field("num_attention_heads");
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .unwrap_or(field("num_attention_heads"));
    let block_bytes = 2 * field("num_hidden_layers") * kv_heads * head_dim * 16 * 4;
    let gib = json["kv_pool_gib"].as_f64().unwrap();
    assert!(
        (gib * (1u64 << 30) as f64 - (3 * block_bytes) as f64).abs() < 1.0,
        "{json}"
    );
    // A draft without --speculative draft, and the reverse, are refused with the fix, by
    // generate and by the server (before it loads anything).
    for command in [
        &["generate", "--model", model, "--prompt", "Hi"][..],
        &["serve", "--model", model, "--device", "cpu"][..],
    ] {
        for args in [
            &["--speculative", "draft"][..],
            &["--draft_model", model][..],
        ] {
            let out = philo_in(work.path())
                .args(command)
                .args(args)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{command:?} took {args:?}");
            assert!(stderr(&out).contains("--draft_model"), "{}", stderr(&out));
        }
    }

    // The kebab-case spelling sets the same option: greedy stops after 3 tokens (or earlier, at
    // the same stop token the 8-token run met).
    let kebab = generate(
        work.path(),
        model,
        &["--max-new-tokens", "3", "--temperature", "0"],
    );
    assert_eq!(
        new_tokens(&kebab),
        n.min(3),
        "--max-new-tokens 3 was not applied"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (work, dir) = tiny_model();
    let args = [
        "--seed",
        "7",
        "--temperature",
        "0.8",
        "--max_new_tokens",
        "8",
    ];
    let first = generate(work.path(), path_str(&dir), &args);
    let second = generate(work.path(), path_str(&dir), &args);
    assert!(
        !stdout(&first).trim().is_empty(),
        "nothing generated on stdout"
    );
    assert_eq!(stdout(&first), stdout(&second), "same seed, different text");
    assert!(
        stderr(&first).contains("tok/s"),
        "no stats line: {}",
        stderr(&first)
    );
}

// ---------------------------------------------------------------------------------------------
// chat

#[test]
fn chat_answers_and_handles_commands() {
    let (work, dir) = tiny_model();
    let out = run_with_stdin(
        work.path(),
        &[
            "chat",
            "--model",
            path_str(&dir),
            "--temperature",
            "0",
            "--max_new_tokens",
            "5",
        ],
        "hello\n/system Be brief.\nhi\n/reset\n/exit\n",
    );
    assert_success(&out, "philo chat");
    let text = stdout(&out);
    assert!(
        text.contains("(system prompt set"),
        "no /system confirmation:\n{text}"
    );
    assert!(
        text.contains("(conversation cleared)"),
        "no /reset confirmation:\n{text}"
    );
    let answers = text.lines().filter(|l| l.contains("tok/s")).count();
    assert!(
        answers >= 2,
        "expected two answers with stats lines, got {answers}:\n{text}"
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// Broken model folders and bad arguments: one `error:` line naming the culprit, never a panic.

#[test]
fn folder_without_config_is_reported() {
    let work = TempDir::new().unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(
        work.path(),
        &["generate", "--model", path_str(&empty), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["config.json", path_str(&empty)]);
}

#[test]
fn truncated_safetensors_is_reported() {
    let (work, dir) = tiny_model();
    let weights = dir.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = run(
        work.path(),
        &["generate", "--model", path_str(&dir), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["model.safetensors"]);
}

#[test]
fn unparsable_tokenizer_is_reported() {
    let (work, dir) = tiny_model();
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let out = run(
        work.path(),
        &["generate", "--model", path_str(&dir), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["tokenizer.json"]);
}

#[test]
fn config_that_is_not_json_is_reported() {
    let (work, dir) = tiny_model();
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let out = run(
        work.path(),
        &["generate", "--model", path_str(&dir), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["config.json", "not valid JSON"]);
}

#[test]
fn unknown_model_type_is_reported() {
    let (work, dir) = tiny_model();
    let config_path = dir.join("config.json");
    let mut config = read_json(&config_path);
    config["model_type"] = "llama".into();
    write_json(&config_path, &config);
    let out = run(
        work.path(),
        &["generate", "--model", path_str(&dir), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["config.json", "model_type", "llama"]);
}

#[test]
fn hidden_size_not_divisible_by_heads_is_reported() {
    let (work, dir) = tiny_model();
    let config_path = dir.join("config.json");
    let mut config = read_json(&config_path);
    assert_eq!(
        config["num_attention_heads"], 4,
        "the tiny model changed; adjust this test"
    );
    config["hidden_size"] = 130.into();
    write_json(&config_path, &config);
    let out = run(
        work.path(),
        &["generate", "--model", path_str(&dir), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["config.json", "hidden_size"]);
}

#[test]
fn tensor_of_wrong_shape_is_reported() {
    let (work, dir) = tiny_model();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Same bytes, transposed shape: only the shape check can catch it.
    let culprit = "model.layers.1.mlp.down_proj.weight";
    let mut seen = false;
    let tensors: HashMap<String, safetensors::tensor::TensorView<'_>> = parsed
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut shape = view.shape().to_vec();
            if name == culprit {
                seen = true;
                assert_eq!(
                    shape,
                    [128, 256],
                    "the tiny model changed; adjust this test"
                );
                shape.reverse();
            }
            let view =
                safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap();
            (name, view)
        })
        .collect();
    assert!(seen, "{culprit} is not in the tiny model");
    safetensors::serialize_to_file(tensors, None, &path).unwrap();

    let out = run(
        work.path(),
        &["generate", "--model", path_str(&dir), "--prompt", "Hello"],
    );
    assert_error_line(&out, &["model.safetensors", culprit, "shape"]);
}

#[test]
fn missing_model_path_is_reported() {
    let work = TempDir::new().unwrap();
    for spec in ["./nope", "does/not/exist/"] {
        let out = run(
            work.path(),
            &["generate", "--model", spec, "--prompt", "Hello"],
        );
        assert_error_line(&out, &[spec, "no such model folder"]);
    }
}

#[test]
fn out_of_range_sampling_values_are_reported() {
    let (work, dir) = tiny_model();
    let model = path_str(&dir);
    for (flag, value, name) in [
        ("--top_p", "0", "top_p"),
        ("--top-p", "-0.5", "top_p"),
        ("--top_k", "0", "top_k"),
        ("--min_p", "2", "min_p"),
        ("--typical_p", "0", "typical_p"),
        ("--repetition_penalty", "0", "repetition_penalty"),
        ("--frequency_penalty", "NaN", "frequency_penalty"),
        ("--presence-penalty", "inf", "presence_penalty"),
        ("--temperature", "-1", "temperature"),
    ] {
        // `--flag=value`, so clap takes a negative value as the value, not as a flag.
        let arg = format!("{flag}={value}");
        let out = run(
            work.path(),
            &["generate", "--model", model, "--prompt", "Hello", &arg],
        );
        let line = assert_error_line(&out, &[name]);
        assert!(
            line.contains(value),
            "`{flag} {value}`: the error does not show the value: {line}"
        );
    }
}

/// `--top_p 1.5` (and NaN) must be rejected like every other out-of-range sampling value, not
/// silently turned into "top-p off".
#[test]
fn top_p_above_one_is_reported() {
    let (work, dir) = tiny_model();
    for value in ["1.5", "NaN"] {
        let out = run(
            work.path(),
            &[
                "generate",
                "--model",
                path_str(&dir),
                "--prompt",
                "Hello",
                "--max_new_tokens",
                "1",
                "--top_p",
                value,
            ],
        );
        assert_error_line(&out, &["top_p"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Hub ids, offline

/// A Hugging Face cache under `hf_home` holding the files of `model` as `repo` at `main`.
fn fill_hub_cache(hf_home: &Path, repo: &str, model: &Path) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    // hf-hub reads the ref as it is, so no trailing newline (as huggingface_hub writes it).
    std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for name in TINY_FILES {
        std::fs::copy(model.join(name), snapshot.join(name)).unwrap();
    }
}

#[test]
fn hub_id_is_read_from_the_offline_cache() {
    let (work, dir) = tiny_model();
    let hf_home = work.path().join("hf-home");
    fill_hub_cache(&hf_home, "philo-test/tiny", &dir);
    std::fs::remove_dir_all(&dir).unwrap(); // only the cache holds the model now

    let out = philo_in(work.path())
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "generate",
            "--model",
            "philo-test/tiny",
            "--prompt",
            "Hello",
        ])
        .args(["--temperature", "0", "--max_new_tokens", "4"])
        .output()
        .unwrap();
    assert_success(&out, "philo generate --model philo-test/tiny (offline)");
    assert!(
        !stdout(&out).trim().is_empty(),
        "nothing generated on stdout"
    );
    assert!((1..=4).contains(&new_tokens(&out)));

    let out = philo_in(work.path())
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "generate",
            "--model",
            "philo-test/absent",
            "--prompt",
            "Hello",
        ])
        .output()
        .unwrap();
    assert_error_line(
        &out,
        &["philo-test/absent", "config.json", "HF_HUB_OFFLINE"],
    );
}

// ---------------------------------------------------------------------------------------------
// demo

#[test]
fn demo_runs_end_to_end_and_reuses_its_model() {
    let work = TempDir::new().unwrap();
    let dir = work.path().join("demo");
    // A few steps only: the full demo's learning is checked in tests/finetune.rs.
    let out = run(
        work.path(),
        &["demo", "--dir", path_str(&dir), "--steps", "3"],
    );
    assert_success(&out, "philo demo");
    let text = stdout(&out);
    assert!(
        text.contains("wrote the tiny default model"),
        "no model written:\n{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("assistant:") && l.contains("tok/s"))
            .count(),
        3,
        "expected three answers with tok/s:\n{text}"
    );
    assert!(
        dir.join("tiny-model/model.safetensors").is_file(),
        "demo did not write its model"
    );
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(
            dir.join("adapter").join(file).is_file(),
            "demo did not write adapter/{file}"
        );
    }

    let again = run(
        work.path(),
        &["demo", "--dir", path_str(&dir), "--steps", "3"],
    );
    assert_success(&again, "philo demo (second run)");
    let text = stdout(&again);
    assert!(
        !text.contains("wrote the tiny default model"),
        "model rewritten:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("tok/s")),
        "no tok/s line:\n{text}"
    );
}

/// Phi-3-mini-4k's config.json, for `philo plan --config`.
const MINI_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/configs/phi-3-mini-4k-instruct.config.json"
);

#[test]
fn plan_finetune_answers_the_seed_command_on_a_4090() {
    let work = TempDir::new().expect("temp dir");
    let json = work.path().join("plan.json");
    // The seed's finetune flags, `finetune` replaced by `plan finetune --gpu rtx4090`.
    let out = run(
        work.path(),
        &[
            "plan",
            "finetune",
            "--gpu",
            "rtx4090",
            "--config",
            MINI_CONFIG,
            "--dataset",
            "data.json",
            "--batch_size",
            "12",
            "--gradient_accumulation_steps",
            "4",
            "--lora_r",
            "64",
            "--lora_alpha",
            "128",
            "--lr",
            "2e-4",
            "--max_seq_length",
            "2048",
            "--json",
            path_str(&json),
        ],
    );
    assert_success(&out, "philo plan finetune");
    let text = stdout(&out);
    assert!(
        text.contains("fits:") && text.contains("--batch_size auto would choose"),
        "{text}"
    );
    let plan = read_json(&json);
    // bench train measured 7.41 GiB for this micro-batch on the H200 (docs/plan.md); the
    // tensors' peak does not depend on the GPU.
    let peak = plan["peak_gib"].as_f64().unwrap();
    assert!((peak / 7.41 - 1.0).abs() < 0.03, "peak {peak}");
    assert_eq!(plan["fits"], true);
    assert_eq!(plan["batch_size"], 12);
    assert_eq!(plan["effective_batch_size"], 48);
    assert!(plan["largest_batch"].as_u64().unwrap() > 12);
    assert!(plan["tokens_per_second"].as_f64().unwrap() > 0.0);
    let breakdown = plan["breakdown_gib"].as_object().unwrap();
    let sum: f64 = breakdown.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - peak).abs() < 1e-6, "the breakdown sums to the peak");
}

#[test]
fn plan_batch_size_auto_keeps_the_effective_batch() {
    let work = TempDir::new().expect("temp dir");
    let json = work.path().join("plan.json");
    let plan = |args: &[&str]| {
        let mut all = vec![
            "plan",
            "finetune",
            "--config",
            MINI_CONFIG,
            "--json",
            path_str(&json),
        ];
        all.extend_from_slice(args);
        assert_success(&run(work.path(), &all), "philo plan finetune");
        read_json(&json)
    };
    let fixed = plan(&["--gpu", "t4", "--lora_r", "64", "--batch_size", "1"]);
    let largest = fixed["largest_batch"].as_u64().unwrap();
    let auto = plan(&[
        "--gpu",
        "t4",
        "--lora_r",
        "64",
        "--batch_size",
        "auto",
        "--effective_batch_size",
        "48",
    ]);
    let (batch, accumulation) = (
        auto["batch_size"].as_u64().unwrap(),
        auto["gradient_accumulation_steps"].as_u64().unwrap(),
    );
    assert!(batch <= largest && batch * accumulation == 48, "{auto}");
    assert_eq!(accumulation, 48u64.div_ceil(largest));
    assert_eq!(auto["auto_batch"], true);
}

#[test]
fn plan_uncheckpointed_layers_auto_fills_the_gpu_beside_the_batch() {
    let work = TempDir::new().expect("temp dir");
    let json = work.path().join("plan.json");
    let plan = |layers: &str| {
        let args = [
            "plan",
            "finetune",
            "--config",
            MINI_CONFIG,
            "--gpu",
            "rtx4090",
            "--lora_r",
            "64",
            "--batch_size",
            "12",
            "--uncheckpointed_layers",
            layers,
            "--json",
            path_str(&json),
        ];
        let out = run(work.path(), &args);
        assert_success(&out, "philo plan finetune");
        (stdout(&out), read_json(&json))
    };
    let (text, auto) = plan("auto");
    let layers = auto["uncheckpointed_layers"].as_u64().unwrap();
    assert!((1..32).contains(&layers), "{auto}");
    assert_eq!(auto["auto_layers"], true);
    assert_eq!(auto["fits"], true);
    assert!(
        text.contains(&format!("uncheckpointed layers: {layers} (auto)")),
        "{text}"
    );
    // The same count given as a number plans the same; one more layer leaves the 10 % headroom.
    let (_, fixed) = plan(&layers.to_string());
    assert_eq!(fixed["peak_gib"], auto["peak_gib"]);
    assert_eq!(fixed["auto_layers"], false);
    let (_, more) = plan(&(layers + 1).to_string());
    let gib = |key: &str| more[key].as_f64().unwrap();
    let held = gib("peak_gib") + gib("allocator_reserve_gib");
    assert!(
        held * 1.1 > gib("gpu_memory_gib") - gib("cuda_context_gib"),
        "{more}"
    );
}

#[test]
fn plan_serve_and_generate_report_memory_and_speed() {
    let work = TempDir::new().expect("temp dir");
    let json = work.path().join("plan.json");
    let serve = run(
        work.path(),
        &[
            "plan",
            "serve",
            "--gpu",
            "custom:24GiB,1008GB/s,165TFLOPs",
            "--config",
            MINI_CONFIG,
            "--kv-cache-gib",
            "4",
            "--json",
            path_str(&json),
        ],
    );
    assert_success(&serve, "philo plan serve");
    let plan = read_json(&json);
    // 4 GiB of 393,216-byte tokens (32 layers × 2 × 3,072 × bf16), in blocks of 16.
    assert_eq!(plan["kv_tokens"], 10_912);
    assert!(plan["max_kv_tokens"].as_u64().unwrap() > 10_912);
    let generate = run(
        work.path(),
        &[
            "plan",
            "generate",
            "--gpu",
            "h200",
            "--config",
            MINI_CONFIG,
            "--quant",
            "nf4",
            "--json",
            path_str(&json),
        ],
    );
    assert_success(&generate, "philo plan generate");
    let plan = read_json(&json);
    assert_eq!(plan["base"], "nf4");
    assert!(plan["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn plan_rejects_an_unknown_gpu() {
    let work = TempDir::new().expect("temp dir");
    let out = run(
        work.path(),
        &[
            "plan",
            "finetune",
            "--config",
            MINI_CONFIG,
            "--gpu",
            "rtx5090x",
        ],
    );
    assert_error_line(&out, &["rtx5090x", "rtx4090", "custom:24GiB"]);
}

#[test]
fn monitor_without_a_gpu_exits_1_with_the_reason() {
    if philo_monitor::Monitor::open().is_ok() {
        return; // this machine has a GPU: philo monitor works here (checked on the GPU machine)
    }
    let work = TempDir::new().expect("temp dir");
    let out = run(work.path(), &["monitor", "--count", "1"]);
    assert_error_line(&out, &["no NVIDIA driver found"]);
}

#[test]
fn finetune_on_several_gpus_says_what_it_needs() {
    let (work, model) = tiny_model();
    let data = work.path().join("data.json");
    std::fs::write(&data, r#"[{"text": "the cat says meow"}]"#).unwrap();
    let output = work.path().join("out");
    let finetune = |extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--base_model",
            path_str(&model),
            "--dataset",
            path_str(&data),
            "--output_dir",
            path_str(&output),
        ];
        args.extend_from_slice(extra);
        run(work.path(), &args)
    };
    // This test binary is built without NCCL (CI builds without CUDA).
    if !cfg!(feature = "nccl") {
        let out = finetune(&["--gpus", "2"]);
        assert_error_line(
            &out,
            &["fine-tuning on 2 GPUs needs NCCL", "--features cuda,nccl"],
        );
        let out = finetune(&["--gpus", "2", "--nnodes", "2", "--node_rank", "1"]);
        assert_error_line(&out, &["fine-tuning on 4 GPUs needs NCCL"]);
    }
    let out = finetune(&["--gpus", "2", "--nnodes", "2", "--node_rank", "2"]);
    assert_error_line(&out, &["--node_rank below --nnodes (got 2, 2, 2)"]);
    assert!(
        !output.exists(),
        "a refused launch wrote {}",
        output.display()
    );
}

#[test]
fn finetune_auto_sizing_needs_a_gpu() {
    let (work, model) = tiny_model();
    let data = work.path().join("data.json");
    std::fs::write(&data, r#"[{"text": "the cat says meow"}]"#).unwrap();
    for (flag, message) in [
        (
            "--batch_size",
            "--batch_size auto sizes the batch from free GPU memory",
        ),
        (
            "--uncheckpointed_layers",
            "--uncheckpointed_layers auto sizes from free GPU memory",
        ),
    ] {
        let out = run(
            work.path(),
            &[
                "finetune",
                "--base_model",
                path_str(&model),
                "--dataset",
                path_str(&data),
                flag,
                "auto",
                "--device",
                "cpu",
            ],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(message), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
