//! End-to-end tests of `philo serve` as a child process on the tiny random model
//! (`philo new-tiny`):
//!
//! - with a LoRA adapter from a short `philo finetune` and an API key, the official `openai`
//!   Python package passes scripts/openai_client_test.py against it (models, chat whole and
//!   streamed, the adapter, completions, errors). That part needs `python3` and `pip install
//!   openai` (network); without them it prints `skipped: ...` and passes. PHILO_OPENAI_PYTHON
//!   names an interpreter that already has `openai` (no venv, no pip); PHILO_SKIP_OPENAI_CLIENT=1
//!   skips it;
//! - `--api-key`: the /v1 routes answer 401 without `Authorization: Bearer KEY` or with another
//!   key and 200 with it, while /health and /metrics stay open;
//! - SIGTERM while a stream is in flight: the stream still runs to its last token and
//!   `data: [DONE]`, the process exits 0 within seconds, and its port refuses connections after.
//!
//! Every test works in its own temporary folder, offline (HF_HUB_OFFLINE=1, HF_HOME inside it).
//! The servers get a small KV cache (--kv-cache-gib 0.01): the tests need little, and on the CPU
//! a decode step's cost grows with the cache's size.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

const PHILO: &str = env!("CARGO_BIN_EXE_philo");
const TOY_DATASET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/toy_dataset.jsonl");
const CLIENT_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/openai_client_test.py");
const SERVED_NAME: &str = "philo-tiny";
const API_KEY: &str = "test-key-0123";
/// How long a server may take to answer GET /health after it was started.
const STARTUP: Duration = Duration::from_secs(60);

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// A `philo` command run in `work`, offline.
fn philo(work: &Path) -> Command {
    let mut cmd = Command::new(PHILO);
    cmd.current_dir(work)
        .env("HF_HOME", work.join("hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("PHILO_API_KEY")
        .stdin(Stdio::null());
    cmd
}

/// Runs `philo ARGS` in `work` and fails the test, showing its output, unless it exits 0.
fn philo_ok(work: &Path, args: &[&str]) -> Output {
    let out = philo(work)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {PHILO}: {e}"));
    assert!(
        out.status.success(),
        "philo {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `philo new-tiny WORK/model`; returns the folder.
fn tiny_model(work: &Path) -> PathBuf {
    let dir = work.join("model");
    philo_ok(work, &["new-tiny", s(&dir)]);
    dir
}

/// A LoRA adapter for `model` from two steps of `philo finetune` on the toy data.
fn small_adapter(work: &Path, model: &Path) -> PathBuf {
    let out = work.join("adapter");
    philo_ok(
        work,
        &[
            "finetune",
            "--base_model",
            s(model),
            "--dataset",
            TOY_DATASET,
            "--output_dir",
            s(&out),
            "--max_steps",
            "2",
            "--batch_size",
            "2",
            "--max_seq_length",
            "64",
            "--lr",
            "5e-3",
        ],
    );
    assert!(
        out.join("adapter_config.json").is_file()
            && out.join("adapter_model.safetensors").is_file()
    );
    out
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A running `philo serve`; killed (and its log shown, when a test fails) on drop.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    /// Starts `philo serve --model MODEL --port P` with `extra` flags and waits for GET /health.
    fn start(work: &Path, model: &Path, extra: &[&str]) -> Server {
        // The port can be taken between free_port and the server's bind: try a few.
        for attempt in 0..3 {
            let port = free_port();
            let log = work.join(format!("serve-{port}.log"));
            let log_file = std::fs::File::create(&log).unwrap();
            let child = philo(work)
                .args(["serve", "--model", s(model), "--port", &port.to_string()])
                .args(["--served-model-name", SERVED_NAME, "--kv-cache-gib", "0.01"])
                .args(extra)
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {PHILO} serve: {e}"));
            let mut server = Server { child, port, log };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(log) if attempt < 2 && log.contains("cannot listen") => continue,
                Err(log) => panic!("philo serve did not come up:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Polls GET /health until 200; on an early exit or the deadline, the log as the error.
    fn wait_ready(&mut self) -> Result<(), String> {
        let client = client();
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}:\n{}", self.log_text()));
            }
            if let Ok(response) = client.get(self.url("/health")).send() {
                if response.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no 200 from /health in {STARTUP:?}:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// The exit status, if the process ends within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- philo serve log ({})\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A short greedy chat request body.
fn chat_body(model: &str, max_tokens: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// Runs `cmd` with stdout and stderr into `log`; None if it outlives `timeout` (then killed).
fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Option<(ExitStatus, String)> {
    let file = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .ok()?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Some((status, std::fs::read_to_string(log).unwrap_or_default()))
}

/// The last lines of `text`, for skip messages.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An interpreter with the `openai` package: PHILO_OPENAI_PYTHON, or a venv in `work` with
/// `pip install openai`. Err: why not (the test then skips the Python client).
fn openai_python(work: &Path) -> Result<PathBuf, String> {
    if std::env::var_os("PHILO_SKIP_OPENAI_CLIENT").is_some_and(|v| v != "0") {
        return Err("PHILO_SKIP_OPENAI_CLIENT is set".into());
    }
    if let Some(python) = std::env::var_os("PHILO_OPENAI_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let mut version = Command::new("python3");
    version.arg("--version");
    match run_logged(
        version,
        &work.join("python-version.log"),
        Duration::from_secs(30),
    ) {
        Some((status, _)) if status.success() => {}
        _ => return Err("no python3 on PATH".into()),
    }
    let venv = work.join("venv");
    let mut make_venv = Command::new("python3");
    make_venv.args(["-m", "venv", s(&venv)]);
    match run_logged(make_venv, &work.join("venv.log"), Duration::from_secs(120)) {
        Some((status, _)) if status.success() => {}
        Some((_, log)) => return Err(format!("python3 -m venv failed:\n{}", tail(&log, 5))),
        None => return Err("python3 -m venv took over 120 s".into()),
    }
    let python = venv.join("bin/python");
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
    ])
    .args(["--timeout", "20", "--retries", "1", "openai"]);
    match run_logged(pip, &work.join("pip.log"), Duration::from_secs(300)) {
        Some((status, _)) if status.success() => Ok(python),
        Some((_, log)) => Err(format!(
            "pip install openai failed (no network?):\n{}",
            tail(&log, 5)
        )),
        None => Err("pip install openai took over 300 s".into()),
    }
}

#[test]
fn openai_python_client_passes_against_the_server_with_an_adapter() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let model = tiny_model(w);
    let adapter = small_adapter(w, &model);
    let adapter_arg = format!("tuned={}", s(&adapter));
    let server = Server::start(
        w,
        &model,
        &["--adapter", &adapter_arg, "--api-key", API_KEY],
    );
    let client = client();

    // Without Python: the adapter is listed under the base and answers.
    let models: Value = client
        .get(server.url("/v1/models"))
        .header(AUTHORIZATION, bearer(API_KEY))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let listed: Vec<(&str, &Value)> = models["data"]
        .as_array()
        .expect("GET /v1/models has data")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or(""), &m["parent"]))
        .collect();
    assert_eq!(
        listed,
        [(SERVED_NAME, &Value::Null), ("tuned", &json!(SERVED_NAME))],
        "{models}"
    );
    let response = client
        .post(server.url("/v1/chat/completions"))
        .header(AUTHORIZATION, bearer(API_KEY))
        .json(&chat_body("tuned", 8))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().unwrap();
    assert_eq!(answer["model"], "tuned", "{answer}");
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 1,
        "{answer}"
    );

    let python = match openai_python(w) {
        Ok(python) => python,
        Err(why) => {
            println!("skipped: the openai Python client check ({why})");
            return;
        }
    };
    let mut script = Command::new(&python);
    script
        .arg(CLIENT_SCRIPT)
        .args(["--base-url", &server.url("/v1"), "--model", SERVED_NAME])
        .args(["--adapter", "tuned", "--api-key", API_KEY]);
    let (status, output) = run_logged(script, &w.join("client.log"), Duration::from_secs(180))
        .expect("scripts/openai_client_test.py did not finish in 180 s");
    println!("{output}");
    assert!(
        status.success(),
        "scripts/openai_client_test.py failed ({status}):\n{output}"
    );
}

#[test]
fn api_key_is_required_on_v1_routes_only() {
    let work = TempDir::new().unwrap();
    let w = work.path();
    let model = tiny_model(w);
    let server = Server::start(w, &model, &["--api-key", API_KEY]);
    let client = client();
    let error = |response: reqwest::blocking::Response| -> Value {
        let body: Value = response.json().expect("an OpenAI error body");
        assert!(body["error"]["message"].is_string(), "{body}");
        body
    };

    for key in [None, Some("wrong-key")] {
        let mut request = client.get(server.url("/v1/models"));
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, bearer(key));
        }
        let response = request.send().unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "GET /v1/models with key {key:?}"
        );
        error(response);
        let mut request = client
            .post(server.url("/v1/chat/completions"))
            .json(&chat_body(SERVED_NAME, 4));
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, bearer(key));
        }
        let response = request.send().unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "POST /v1/chat/completions with key {key:?}"
        );
        error(response);
    }
    // The key without `Bearer ` is not the header OpenAI clients send.
    let response = client
        .get(server.url("/v1/models"))
        .header(AUTHORIZATION, API_KEY)
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "the key without `Bearer `"
    );

    let response = client
        .get(server.url("/v1/models"))
        .header(AUTHORIZATION, bearer(API_KEY))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let models: Value = response.json().unwrap();
    assert_eq!(models["data"][0]["id"], SERVED_NAME, "{models}");
    let response = client
        .post(server.url("/v1/chat/completions"))
        .header(AUTHORIZATION, bearer(API_KEY))
        .json(&chat_body(SERVED_NAME, 4))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");

    // The operational routes stay open.
    for path in ["/health", "/metrics", "/openapi.json"] {
        let response = client.get(server.url(path)).send().unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "GET {path} without a key"
        );
    }

    // `philo bench serve --http` loads the server as clients do (streamed, sampled, keyed),
    // and stops with the server's answer when a request fails.
    let out = w.join("bench.json");
    let url = server.url("/v1");
    let bench = |key: &str| {
        let mut cmd = philo(w);
        cmd.args(["bench", "serve", "--http", &url, "--api_key", key])
            .args([
                "--served_model",
                SERVED_NAME,
                "--batch",
                "3",
                "--requests",
                "6",
            ])
            .args(["--seq", "16", "--new_tokens", "6", "--json", s(&out)]);
        cmd.output().unwrap()
    };
    let output = bench(API_KEY);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let run = &results[0];
    assert_eq!(
        (run["streams"].as_u64(), run["requests"].as_u64()),
        (Some(3), Some(6))
    );
    let tokens = run["completion_tokens"].as_u64().unwrap();
    assert!((6..=36).contains(&tokens), "{run}");
    assert!(run["tokens_per_second"].as_f64().unwrap() > 0.0, "{run}");
    assert!(
        run["time_to_first_token"]["p50_ms"].as_f64().unwrap() > 0.0,
        "{run}"
    );
    let output = bench("wrong-key");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HTTP 401"), "{stderr}");
}

/// What a streamed chat answer held.
#[derive(Debug, Default)]
struct StreamEnd {
    finish_reasons: Vec<String>,
    completion_tokens: Option<u64>,
    done: bool,
    /// Text chunks read after SIGTERM was sent.
    chunks_after_signal: usize,
}

#[cfg(unix)]
#[test]
fn sigterm_lets_the_stream_in_flight_finish_then_exits_0() {
    // Long enough that the stream is certainly still generating when the signal arrives.
    const MAX_TOKENS: u64 = 300;
    let work = TempDir::new().unwrap();
    let w = work.path();
    let model = tiny_model(w);
    let mut server = Server::start(w, &model, &[]);
    let port = server.port;

    let mut body = chat_body(SERVED_NAME, MAX_TOKENS as usize);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut lines = BufReader::new(response);
    let mut end = StreamEnd::default();
    let mut signalled_at = None;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).expect("read the stream") == 0 {
            break;
        }
        let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
            continue;
        };
        assert!(!end.done, "data after [DONE]: {data}");
        if data == "[DONE]" {
            end.done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        assert!(chunk.get("error").is_none(), "the stream failed: {chunk}");
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            end.completion_tokens = Some(tokens);
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            end.finish_reasons.push(reason.to_string());
        }
        if chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            if signalled_at.is_none() {
                // The first text is out: the sequence is running. Now SIGTERM.
                server.terminate();
                signalled_at = Some(Instant::now());
            } else {
                end.chunks_after_signal += 1;
            }
        }
    }
    let signalled_at = signalled_at.expect("the stream never sent text");
    let stream_seconds = signalled_at.elapsed().as_secs_f64();
    // Nothing may follow [DONE]; the connection then closes.
    let mut rest = Vec::new();
    let _ = lines.read_to_end(&mut rest);
    assert!(rest.iter().all(u8::is_ascii_whitespace));
    assert!(end.done, "the stream did not end with [DONE]: {end:?}");
    assert_eq!(
        end.finish_reasons,
        ["length"],
        "the stream was cut short instead of finishing: {end:?}"
    );
    assert_eq!(end.completion_tokens, Some(MAX_TOKENS), "{end:?}");

    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("philo serve still runs 10 s after its last stream ended");
    println!(
        "sigterm: the stream ran {stream_seconds:.2} s and {} more text chunks after SIGTERM; the server then exited ({status}) in {:.2} s",
        end.chunks_after_signal,
        signalled_at.elapsed().as_secs_f64() - stream_seconds
    );
    assert!(
        status.success(),
        "philo serve exited with {status}:\n{}",
        server.log_text()
    );
    assert!(
        server.log_text().contains("philo serve: stopped"),
        "{}",
        server.log_text()
    );
    let refused =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2));
    assert!(
        refused.is_err(),
        "port {port} still accepts connections after the server exited"
    );
}
