//! `philo bench serve --http URL`: a load generator against a running OpenAI-compatible server
//! (philo's or any other), as its users meet it: concurrent streamed chat completions over
//! HTTP with sampling, half of them naming an adapter when one is given. It reports the
//! aggregate completion tokens per second, time to first token and inter-token latency
//! (p50/p99), and the per-stream decode rate of adapter and base requests apart.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

/// What to send.
#[derive(Debug, Clone)]
pub struct HttpBench {
    /// The API's base URL, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The base model's id (`model` of the requests that name no adapter); None leaves the
    /// field out, which philo answers with its base model.
    pub model: Option<String>,
    /// An adapter that every second request names.
    pub adapter: Option<String>,
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub streams: usize,
    /// Requests in all.
    pub requests: usize,
    /// Words of the user message (about 1.3 tokens each).
    pub prompt_words: usize,
    pub max_tokens: usize,
    /// Request i asks for `max_tokens` × (1/2 + (i mod 8)/7), between a half and one and a half
    /// times it, instead of `max_tokens` each: streams then finish apart and new requests join
    /// a decoding batch one by one, as in real traffic (equal lengths finish in waves).
    pub varied_lengths: bool,
    pub temperature: f32,
    pub top_p: f32,
}

impl HttpBench {
    /// The `max_tokens` of request `i` (see [`HttpBench::varied_lengths`]).
    pub fn max_tokens_of(&self, i: usize) -> usize {
        match self.varied_lengths {
            true => (self.max_tokens * (7 + 2 * (i % 8)) / 14).max(1),
            false => self.max_tokens,
        }
    }
}

/// The 50th and 99th percentiles of a latency, ms.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct HttpBenchResult {
    pub streams: usize,
    pub requests: usize,
    /// Completion tokens of all requests (the servers' usage chunks).
    pub completion_tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub time_to_first_token: Percentiles,
    pub inter_token_latency: Percentiles,
    /// Mean decode rate of one stream (tokens after the first over the time after it), for the
    /// requests that named no adapter and for those that named it.
    pub base_stream_tokens_per_second: f64,
    pub adapter_stream_tokens_per_second: Option<f64>,
    /// Time to first token of the requests that named no adapter and of those that named it.
    pub base_time_to_first_token: Percentiles,
    pub adapter_time_to_first_token: Option<Percentiles>,
}

/// One request's timings.
struct Timed {
    adapter: bool,
    completion_tokens: usize,
    ttft: Duration,
    /// Gaps between consecutive pieces of text.
    gaps: Vec<Duration>,
    /// From the first piece of text to the last.
    decode: Duration,
}

/// Runs `options`: `requests` streamed chat completions, `streams` at a time.
pub fn run(options: &HttpBench) -> anyhow::Result<HttpBenchResult> {
    if options.streams == 0 || options.requests == 0 {
        bail!("--batch (streams) and --requests must be at least 1");
    }
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(options.requests));
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..options.streams.min(options.requests) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= options.requests {
                    return;
                }
                match request(options, i) {
                    Ok(timed) => results.lock().unwrap().push(timed),
                    Err(e) => failures.lock().unwrap().push(format!("request {i}: {e:#}")),
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let failures = failures.into_inner().unwrap();
    if let Some(first) = failures.first() {
        bail!(
            "{} of {} requests failed; the first: {first}",
            failures.len(),
            options.requests
        );
    }
    let results = results.into_inner().unwrap();
    let completion_tokens = results.iter().map(|r| r.completion_tokens).sum();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let ttft: Vec<f64> = results.iter().map(|r| ms(&r.ttft)).collect();
    let gaps: Vec<f64> = results.iter().flat_map(|r| r.gaps.iter().map(ms)).collect();
    let rate = |adapter: bool| {
        let rates: Vec<f64> = results
            .iter()
            .filter(|r| r.adapter == adapter && r.completion_tokens > 1)
            .map(|r| (r.completion_tokens - 1) as f64 / r.decode.as_secs_f64().max(1e-9))
            .collect();
        (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
    };
    let first_token = |adapter: bool| {
        let ttft: Vec<f64> = results
            .iter()
            .filter(|r| r.adapter == adapter)
            .map(|r| ms(&r.ttft))
            .collect();
        (!ttft.is_empty()).then(|| percentiles(ttft))
    };
    Ok(HttpBenchResult {
        streams: options.streams,
        requests: options.requests,
        completion_tokens,
        seconds,
        tokens_per_second: completion_tokens as f64 / seconds,
        time_to_first_token: percentiles(ttft),
        inter_token_latency: percentiles(gaps),
        base_stream_tokens_per_second: rate(false).unwrap_or(0.0),
        adapter_stream_tokens_per_second: rate(true),
        base_time_to_first_token: first_token(false).unwrap_or_default(),
        adapter_time_to_first_token: first_token(true),
    })
}

/// p50 and p99 (nearest rank) of `values`; zeros when there are none.
fn percentiles(mut values: Vec<f64>) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    Percentiles {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// Sends request `i` and reads its stream to `[DONE]`.
fn request(options: &HttpBench, i: usize) -> anyhow::Result<Timed> {
    let adapter = options.adapter.is_some() && i % 2 == 1;
    let words: Vec<&str> = ["tell", "me", "about", "the", "sea", "and", "its", "tides"]
        .iter()
        .cycle()
        .skip(i % 8)
        .take(options.prompt_words.max(1))
        .copied()
        .collect();
    let mut body = json!({
        "messages": [{"role": "user", "content": format!("Request {i}: {}", words.join(" "))}],
        "max_tokens": options.max_tokens_of(i),
        "temperature": options.temperature,
        "top_p": options.top_p,
        "seed": i,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let model = if adapter {
        options.adapter.as_deref()
    } else {
        options.model.as_deref()
    };
    if let Some(model) = model {
        body["model"] = json!(model);
    }
    let url = format!(
        "{}/chat/completions",
        options.base_url.trim_end_matches('/')
    );
    let mut call = ureq::post(&url).set("Content-Type", "application/json");
    if let Some(key) = &options.api_key {
        call = call.set("Authorization", &format!("Bearer {key}"));
    }
    let sent = Instant::now();
    let response = match call.send_string(&body.to_string()) {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            bail!("HTTP {status}: {text}");
        }
        Err(e) => return Err(e).with_context(|| format!("POST {url}")),
    };
    let mut pieces = Vec::new();
    let mut completion_tokens = None;
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.context("reading the event stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)
            .with_context(|| format!("an event that is not JSON: {data}"))?;
        if let Some(error) = chunk.get("error") {
            bail!("the server failed mid-stream: {error}");
        }
        let text = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str);
        if text.is_some_and(|t| !t.is_empty()) {
            pieces.push(Instant::now());
        }
        if let Some(n) = chunk
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
        {
            completion_tokens = Some(n as usize);
        }
    }
    let completion_tokens = completion_tokens
        .context("the stream ended without a usage chunk (stream_options.include_usage)")?;
    let (first, last) = match (pieces.first(), pieces.last()) {
        (Some(&first), Some(&last)) => (first, last),
        _ => (Instant::now(), Instant::now()),
    };
    Ok(Timed {
        adapter,
        completion_tokens,
        ttft: first - sent,
        gaps: pieces.windows(2).map(|w| w[1] - w[0]).collect(),
        decode: last - first,
    })
}

/// The result as the table `bench` prints.
pub fn table(results: &[HttpBenchResult]) -> String {
    let mut out = String::from(
        "streams  requests  tokens   seconds   tok/s     TTFT p50/p99 ms   ITL p50/p99 ms   stream tok/s base / adapter   TTFT p50 base / adapter\n",
    );
    for r in results {
        let adapter = r
            .adapter_stream_tokens_per_second
            .map_or("-".to_string(), |v| format!("{v:.1}"));
        let adapter_ttft = r
            .adapter_time_to_first_token
            .as_ref()
            .map_or("-".to_string(), |p| format!("{:.1}", p.p50_ms));
        out.push_str(&format!(
            "{:<8} {:<9} {:<8} {:<9.2} {:<9.1} {:>7.1} / {:<7.1} {:>6.1} / {:<7.1} {:>7.1} / {:<16} {:>7.1} / {}\n",
            r.streams,
            r.requests,
            r.completion_tokens,
            r.seconds,
            r.tokens_per_second,
            r.time_to_first_token.p50_ms,
            r.time_to_first_token.p99_ms,
            r.inter_token_latency.p50_ms,
            r.inter_token_latency.p99_ms,
            r.base_stream_tokens_per_second,
            adapter,
            r.base_time_to_first_token.p50_ms,
            adapter_ttft
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varied_lengths_span_a_half_to_one_and_a_half_times() {
        let mut bench = HttpBench {
            base_url: String::new(),
            model: None,
            adapter: None,
            api_key: None,
            streams: 1,
            requests: 8,
            prompt_words: 1,
            max_tokens: 128,
            varied_lengths: true,
            temperature: 0.0,
            top_p: 1.0,
        };
        let lengths: Vec<usize> = (0..8).map(|i| bench.max_tokens_of(i)).collect();
        assert_eq!(lengths, [64, 82, 100, 118, 137, 155, 173, 192]);
        bench.varied_lengths = false;
        assert_eq!(bench.max_tokens_of(5), 128);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!((p.p50_ms, p.p99_ms), (50.0, 99.0));
        let one = percentiles(vec![7.0]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
        assert_eq!(percentiles(Vec::new()), Percentiles::default());
    }
}
