//! A bounded load test over loopback: the real engine (a tiny random Phi-3 on the CPU) behind the
//! real HTTP server, driven by a real HTTP client.
//!
//! 1,000 requests at 64 concurrency, after a warm-up round of 200: streamed chat completions
//! (every fifth of them dropped by the client right after its first piece of text, while the
//! engine is generating) and whole completions, with a queue bound small enough that some are
//! refused. It checks that
//!
//! - every answer is 200, or 429 with a `Retry-After` header and an OpenAI error body;
//! - every stream the client did not drop ends with a finish reason, a usage chunk and
//!   `data: [DONE]`, and every whole completion parses with 1..=max_tokens completion tokens;
//! - the dropped streams were cancelled: they ask for 1,000 tokens each, but the engine generated
//!   (by /metrics) fewer than 200 per dropped stream beyond the tokens the clients received;
//! - afterwards /metrics reaches zero used KV blocks, zero running sequences and an empty queue
//!   within a bounded wait, and the server counted exactly the 429s the clients saw;
//! - the process's resident memory (Linux) grows by less than 64 MiB from after the warm-up to
//!   after the 1,000.
//!
//! The model is the `philo new-tiny` shape (random weights, Phi-3's 32,064-token vocabulary)
//! rather than the 512-token reference model of tests/engine.rs: the Phi-3 chat template writes
//! special tokens (`<|user|>` = 32010, ...) that a 512-row embedding cannot look up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use futures_util::StreamExt;
use philo_model::tiny::{random_weights, tiny_config};
use philo_model::Phi3;
use philo_serve::engine::{DecodePath, EngineConfig, EngineHandle};
use philo_serve::http::{serve, ServerConfig, ServerState};
use philo_serve::request::Backend;
use philo_text::{ChatTemplate, Tokenizer};
use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;
use serde_json::{json, Value};

const REQUESTS: usize = 1000;
const WARM_UP: usize = 200;
const CONCURRENCY: usize = 64;
/// Every `CANCEL_EVERY`-th request is a stream the client drops after its first text (10 %).
const CANCEL_EVERY: usize = 10;
/// What a dropped stream asks for: far more than it may cost (TOKENS_PER_CANCEL_LIMIT).
const CANCELLED_MAX_TOKENS: usize = 1000;
/// Most tokens the engine may generate for a dropped stream on average (of
/// CANCELLED_MAX_TOKENS asked for): the few steps until the server sees the closed connection.
const TOKENS_PER_CANCEL_LIMIT: usize = 200;
const MAX_RUNNING: usize = 16;
/// Small next to CONCURRENCY - MAX_RUNNING, so the admission bound refuses some requests.
const MAX_QUEUE: usize = 8;
const BLOCK_SIZE: usize = 16;
/// 4,096 token slots: enough for MAX_RUNNING sequences of the test's lengths, and for one
/// dropped stream's CANCELLED_MAX_TOKENS (the engine refuses what can never fit).
const NUM_BLOCKS: usize = 256;
/// How long the engine may take to go idle once the clients are done.
const IDLE_WAIT: Duration = Duration::from_secs(30);
/// The whole test (warm-up, load, idle wait) must finish within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Allowed growth of the resident set from after the warm-up to after the load.
const RSS_GROWTH_LIMIT: u64 = 64 << 20;

fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/phi-3-early")
}

/// The tiny model of `philo new-tiny` (seed 0), in memory.
fn model() -> Phi3 {
    let config = tiny_config();
    let weights = random_weights(&config, 0, &Device::Cpu).unwrap();
    Phi3::load(&config, &weights, DType::F32, &Device::Cpu).unwrap()
}

/// What one request is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Streamed chat completion read to the end.
    Stream,
    /// Streamed chat completion the client drops after its first piece of text.
    Cancel,
    /// Whole (non-streamed) text completion.
    Completion,
}

fn kind(i: usize) -> Kind {
    if i.is_multiple_of(CANCEL_EVERY) {
        Kind::Cancel
    } else if i.is_multiple_of(2) {
        Kind::Stream
    } else {
        Kind::Completion
    }
}

/// The max_tokens of request `i` (8 to 24 unless it is a stream to drop).
fn max_tokens(i: usize) -> usize {
    match kind(i) {
        Kind::Cancel => CANCELLED_MAX_TOKENS,
        _ => 8 + (i * 7) % 17,
    }
}

/// The request body; half greedy, half sampled with a seed, prompts of varied length.
fn body(i: usize) -> Value {
    let topic = [
        "the sea",
        "prime numbers",
        "a red bicycle",
        "tea",
        "Paris",
        "winter",
    ][i % 6];
    let words = "and then some more words ".repeat(i % 5);
    let text = format!("Request {i}: tell me about {topic} {words}in one sentence.");
    let mut body = json!({
        "model": "tiny",
        "max_tokens": max_tokens(i),
        "temperature": if i % 4 < 2 { 0.0 } else { 0.8 },
        "seed": i,
    });
    match kind(i) {
        Kind::Stream | Kind::Cancel => {
            body["messages"] = json!([{"role": "user", "content": text}]);
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        Kind::Completion => body["prompt"] = json!(text),
    }
    body
}

/// How a request ended, when it ended as intended.
#[derive(Debug)]
enum Outcome {
    /// Answered in full with this many completion tokens.
    Ok { tokens: usize, stream: bool },
    /// 429 with a usable Retry-After: the time to wait before sending it again.
    Refused { retry_after: Duration },
    /// A stream dropped by the client after its first text.
    Cancelled,
}

#[derive(Debug, Default)]
struct Tally {
    streams: usize,
    completions: usize,
    refused: usize,
    cancelled: usize,
    tokens: usize,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, result: Result<Outcome, String>) {
        match result {
            Ok(Outcome::Ok { tokens, stream }) => {
                self.tokens += tokens;
                if stream {
                    self.streams += 1;
                } else {
                    self.completions += 1;
                }
            }
            Ok(Outcome::Refused { .. }) => self.refused += 1,
            Ok(Outcome::Cancelled) => self.cancelled += 1,
            Err(failure) => self.failures.push(failure),
        }
    }

    fn ok(&self) -> usize {
        self.streams + self.completions
    }
}

/// Sends request `i` and checks its answer.
async fn one_request(client: &reqwest::Client, base: &str, i: usize) -> Result<Outcome, String> {
    let kind = kind(i);
    let path = match kind {
        Kind::Completion => "/v1/completions",
        _ => "/v1/chat/completions",
    };
    let response = client
        .post(format!("{base}{path}"))
        .json(&body(i))
        .send()
        .await
        .map_err(|e| format!("request {i}: {e}"))?;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let Some(secs @ 1..=60) = retry_after else {
            return Err(format!(
                "request {i}: 429 without a Retry-After of 1 to 60 s: {:?}",
                response.headers().get(RETRY_AFTER)
            ));
        };
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("request {i}: 429 body: {e}"))?;
        if !body["error"]["message"].is_string() {
            return Err(format!("request {i}: 429 without an OpenAI error: {body}"));
        }
        // Spread over 200 ms, so the refused clients do not all come back at once.
        let jitter = Duration::from_millis((i as u64 * 37) % 200);
        return Ok(Outcome::Refused {
            retry_after: Duration::from_secs(secs) + jitter,
        });
    }
    if status != StatusCode::OK {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("request {i}: status {status}: {text}"));
    }
    match kind {
        Kind::Completion => {
            let body: Value = response
                .json()
                .await
                .map_err(|e| format!("request {i}: completion body: {e}"))?;
            let tokens = body["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
            let reason = body["choices"][0]["finish_reason"].as_str();
            if !(1..=max_tokens(i)).contains(&tokens)
                || !matches!(reason, Some("length" | "stop"))
                || !body["choices"][0]["text"].is_string()
            {
                return Err(format!("request {i}: bad completion: {body}"));
            }
            Ok(Outcome::Ok {
                tokens,
                stream: false,
            })
        }
        Kind::Stream | Kind::Cancel => read_stream(response, i, kind == Kind::Cancel).await,
    }
}

/// Reads an SSE answer: to `[DONE]`, or (with `cancel`) until its first text, then drops it.
async fn read_stream(
    response: reqwest::Response,
    i: usize,
    cancel: bool,
) -> Result<Outcome, String> {
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !content_type.starts_with("text/event-stream") {
        return Err(format!(
            "request {i}: stream with content type `{content_type}`"
        ));
    }
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut finish_reason = None;
    let mut usage_tokens = None;
    let mut done = false;
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(|e| format!("request {i}: stream broke: {e}"))?;
        buffer.extend_from_slice(&bytes);
        // Complete events end with a blank line.
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let event = String::from_utf8(event)
                .map_err(|_| format!("request {i}: an event that is not UTF-8"))?;
            for line in event.lines() {
                // Blank lines and keep-alive comments carry nothing.
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if done {
                    return Err(format!("request {i}: data after [DONE]: {data}"));
                }
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let chunk: Value = serde_json::from_str(data)
                    .map_err(|e| format!("request {i}: chunk `{data}`: {e}"))?;
                if chunk.get("error").is_some() {
                    return Err(format!("request {i}: error in the stream: {chunk}"));
                }
                if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                    usage_tokens = usage["completion_tokens"].as_u64();
                }
                let choice = &chunk["choices"][0];
                if let Some(reason) = choice["finish_reason"].as_str() {
                    if finish_reason.replace(reason.to_string()).is_some() {
                        return Err(format!("request {i}: a second finish_reason: {chunk}"));
                    }
                }
                let text = choice["delta"]["content"].as_str().unwrap_or("");
                if cancel && !text.is_empty() {
                    // Dropping the body closes the connection mid-stream.
                    return Ok(Outcome::Cancelled);
                }
            }
        }
    }
    let tokens = usage_tokens.unwrap_or(0) as usize;
    if !done
        || !buffer.iter().all(u8::is_ascii_whitespace)
        || !matches!(finish_reason.as_deref(), Some("length" | "stop"))
        || !(1..=max_tokens(i)).contains(&tokens)
    {
        return Err(format!(
            "request {i}: stream ended badly: [DONE] {done}, finish_reason {finish_reason:?}, completion tokens {usage_tokens:?}, left over {:?}",
            String::from_utf8_lossy(&buffer)
        ));
    }
    Ok(Outcome::Ok {
        tokens,
        stream: true,
    })
}

/// Requests `first..first + count` over CONCURRENCY workers.
async fn round(client: &reqwest::Client, base: &str, first: usize, count: usize) -> Tally {
    let next = Arc::new(AtomicUsize::new(first));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, base) = (client.clone(), base.to_string());
            let (next, tally) = (next.clone(), tally.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= first + count {
                        break;
                    }
                    // A refused request is sent again after the Retry-After it was given.
                    loop {
                        let result = one_request(&client, &base, i).await;
                        let retry_after = match result {
                            Ok(Outcome::Refused { retry_after }) => Some(retry_after),
                            _ => None,
                        };
                        tally.lock().unwrap().add(result);
                        match retry_after {
                            Some(wait) => tokio::time::sleep(wait).await,
                            None => break,
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a client worker panicked");
    }
    Arc::try_unwrap(tally).unwrap().into_inner().unwrap()
}

/// The unlabelled samples of a Prometheus text exposition.
fn gauges(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

async fn scrape(client: &reqwest::Client, base: &str) -> HashMap<String, f64> {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET /metrics");
    gauges(&response.text().await.unwrap())
}

/// Polls /metrics until no KV block is used, nothing runs and nothing waits.
async fn wait_idle(client: &reqwest::Client, base: &str) -> HashMap<String, f64> {
    let deadline = Instant::now() + IDLE_WAIT;
    loop {
        let metrics = scrape(client, base).await;
        let value = |name: &str| {
            *metrics
                .get(name)
                .unwrap_or_else(|| panic!("/metrics has no {name}"))
        };
        if value("philo_kv_blocks_used") == 0.0
            && value("philo_running_sequences") == 0.0
            && value("philo_queue_depth") == 0.0
        {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not go idle within {IDLE_WAIT:?}: kv_blocks_used {}, running {}, queue {} (leaked blocks or sequences)",
            value("philo_kv_blocks_used"),
            value("philo_running_sequences"),
            value("philo_queue_depth"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The resident set of this process in bytes (Linux only).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    })
}

/// Checks that the dropped streams of a round stopped generating: the engine's generated
/// tokens over the round (`before`/`after` are /metrics scrapes), less the completion tokens the
/// clients were answered with, are what the dropped streams cost.
fn check_cancels(
    name: &str,
    tally: &Tally,
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
) {
    let generated = |m: &HashMap<String, f64>| m["philo_generation_tokens_total"] as usize;
    let generated = generated(after) - generated(before);
    let for_dropped = generated.checked_sub(tally.tokens).unwrap_or_else(|| {
        panic!(
            "{name}: the engine counts {generated} generated tokens, fewer than the {} the clients received",
            tally.tokens
        )
    });
    println!(
        "{name}: {for_dropped} tokens generated for {} dropped streams ({:.1} each)",
        tally.cancelled,
        for_dropped as f64 / tally.cancelled.max(1) as f64
    );
    assert!(
        for_dropped < tally.cancelled * TOKENS_PER_CANCEL_LIMIT,
        "{name}: {for_dropped} tokens were generated for {} dropped streams: were they cancelled?",
        tally.cancelled
    );
}

/// Checks one round's tally: no failures, nothing but the intended outcomes.
fn check_round(name: &str, tally: &Tally, count: usize) {
    assert!(
        tally.failures.is_empty(),
        "{name}: {} of {count} requests failed; the first ones:\n{}",
        tally.failures.len(),
        tally.failures[..tally.failures.len().min(10)].join("\n")
    );
    assert_eq!(tally.ok() + tally.cancelled, count, "{name}: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_requests_with_cancels_and_refusals_leak_nothing() {
    let tokenizer = Tokenizer::from_file(&tokenizer_dir().join("tokenizer.json")).unwrap();
    let template =
        ChatTemplate::from_tokenizer_config(&tokenizer_dir().join("tokenizer_config.json"))
            .unwrap();
    let stop_token_ids = ["<|end|>", "<|endoftext|>"]
        .iter()
        .map(|t| tokenizer.token_to_id(t).unwrap())
        .collect();
    let engine = Arc::new(
        EngineHandle::start(
            model(),
            EngineConfig {
                model_id: "tiny".into(),
                max_running: MAX_RUNNING,
                max_tokens_per_step: 512,
                max_queue: MAX_QUEUE,
                block_size: BLOCK_SIZE,
                num_blocks: NUM_BLOCKS,
                decode_path: DecodePath::default(),
                speculative_tokens: None,
            },
            Vec::new(),
        )
        .unwrap(),
    );
    let state = ServerState::new(ServerConfig {
        backend: engine.clone(),
        tokenizer,
        template,
        stop_token_ids,
        api_key: None,
        base_model: "tiny".into(),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();

    let run = async {
        let initial = scrape(&client, &base).await;
        let warm_up = round(&client, &base, 0, WARM_UP).await;
        check_round("warm-up", &warm_up, WARM_UP);
        let warmed_up = wait_idle(&client, &base).await;
        check_cancels("warm-up", &warm_up, &initial, &warmed_up);
        let rss_before = rss_bytes();
        let started = Instant::now();
        let load = round(&client, &base, WARM_UP, REQUESTS).await;
        let seconds = started.elapsed().as_secs_f64();
        check_round("load", &load, REQUESTS);
        let metrics = wait_idle(&client, &base).await;
        let rss_after = rss_bytes();
        check_cancels("load", &load, &warmed_up, &metrics);
        (warm_up, load, seconds, rss_before, rss_after, metrics)
    };
    let (warm_up, load, seconds, rss_before, rss_after, metrics) =
        tokio::time::timeout(TEST_TIMEOUT, run)
            .await
            .expect("the load test took longer than its time limit");
    println!(
        "load: {REQUESTS} requests at concurrency {CONCURRENCY} in {seconds:.1} s: {} ok ({} streams, {} completions), {} refused (429), {} cancelled; {} completion tokens ({:.0}/s); RSS {} after the warm-up, {} after the load",
        load.ok(),
        load.streams,
        load.completions,
        load.refused,
        load.cancelled,
        load.tokens,
        load.tokens as f64 / seconds,
        mib(rss_before),
        mib(rss_after),
    );

    // The admission bound was exercised, and the server counted every refusal the clients saw.
    assert!(
        load.refused > 0,
        "no request was refused; MAX_QUEUE no longer bounds admission? {load:?}"
    );
    assert!(
        load.cancelled > 0,
        "no stream was dropped mid-way: {load:?}"
    );
    assert_eq!(
        metrics
            .get("philo_requests_rejected_queue_full_total")
            .copied(),
        Some((warm_up.refused + load.refused) as f64),
        "the server's count of 429s differs from the clients'"
    );
    let stats = engine.stats();
    assert_eq!(
        (
            stats.kv_blocks_used,
            stats.kv_blocks_free,
            stats.running_sequences,
            stats.queue_depth
        ),
        (0, NUM_BLOCKS, 0, 0),
        "the engine's own stats after the load"
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        assert!(
            after < before + RSS_GROWTH_LIMIT,
            "RSS grew from {} to {} over {REQUESTS} requests (limit {})",
            mib(Some(before)),
            mib(Some(after)),
            mib(Some(RSS_GROWTH_LIMIT)),
        );
    } else {
        println!("load: RSS not checked (no /proc/self/status)");
    }

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    engine.shutdown();
    let engine_for_join = engine.clone();
    tokio::task::spawn_blocking(move || engine_for_join.join())
        .await
        .unwrap();
}
