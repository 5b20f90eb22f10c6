//! GET /metrics: Prometheus metrics in the OpenMetrics text format.
//!
//! The HTTP layer counts requests and observes latencies as they happen; the engine's gauges and
//! counters (queue, running sequences, KV blocks, tokens) are read from [`Backend::stats`] at
//! each scrape, so they are never stale and the engine keeps no metrics code of its own. So are
//! the GPUs' utilization and memory, through NVML, on machines that have it.

use std::fmt;
use std::sync::{Arc, OnceLock};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use philo_monitor::{Gpu, Monitor};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::error::ApiError;
use super::state::ServerState;
use crate::request::Backend;

/// The content type of the OpenMetrics text format, which Prometheus scrapes natively.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route pattern (e.g. `/v1/models/{*id}`), not the raw path, to keep the number of
    /// series bounded.
    endpoint: String,
    status: u16,
}

/// Labels of the request duration histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

/// The server's metrics registry and the metrics the HTTP layer updates.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    queue_full: Counter,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    request_duration: Family<EndpointLabels, Histogram>,
}

impl Metrics {
    /// A registry with the HTTP metrics and, read at scrape time, `backend`'s stats.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let mut registry = Registry::with_prefix("philo");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status code",
            requests.clone(),
        );
        let queue_full = Counter::default();
        registry.register(
            "requests_rejected_queue_full",
            "Generation requests answered with 429 because the engine's queue was full",
            queue_full.clone(),
        );
        let time_to_first_token = Histogram::new([
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]);
        registry.register_with_unit(
            "time_to_first_token",
            "Time from a generation request's arrival to its first generated token",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let inter_token_latency = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0,
        ]);
        registry.register_with_unit(
            "inter_token_latency",
            "Time between consecutive generated tokens of a request",
            Unit::Seconds,
            inter_token_latency.clone(),
        );
        let request_duration = Family::<EndpointLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a generation request's arrival to its last event (or the client leaving)",
            Unit::Seconds,
            request_duration.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { backend }));
        registry.register_collector(Box::new(GpuCollector::default()));
        Metrics {
            registry,
            requests,
            queue_full,
            time_to_first_token,
            inter_token_latency,
            request_duration,
        }
    }

    /// Records a first token `seconds` after the request arrived.
    pub fn observe_time_to_first_token(&self, seconds: f64) {
        self.time_to_first_token.observe(seconds);
    }

    /// Records a token `seconds` after the previous one of the same request.
    pub fn observe_inter_token_latency(&self, seconds: f64) {
        self.inter_token_latency.observe(seconds);
    }

    /// Records a generation request to `endpoint` that took `seconds` in all.
    pub fn observe_request_duration(&self, endpoint: &'static str, seconds: f64) {
        self.request_duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    fn count_response(&self, method: &str, endpoint: String, status: StatusCode) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                endpoint,
                status: status.as_u16(),
            })
            .inc();
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.queue_full.inc();
        }
    }

    fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ])
}

/// Middleware counting every response by method, route and status.
pub async fn count_requests(
    State(state): State<ServerState>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    state
        .metrics()
        .count_response(method.as_str(), endpoint, response.status());
    response
}

/// GET /metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text format)",
            body = String, content_type = "application/openmetrics-text"),
        (status = 500, description = "The metrics could not be written", body = super::openai::ErrorResponse),
    )
)]
pub async fn scrape(State(state): State<ServerState>) -> Result<Response, ApiError> {
    let text = state.metrics().encode().map_err(|_| {
        ApiError::internal("writing the metrics failed; this is a bug in philo, please report it")
    })?;
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    Ok(response)
}

/// Encodes the engine's [`EngineStats`](crate::request::EngineStats) at each scrape.
struct EngineCollector {
    backend: Arc<dyn Backend>,
}

impl fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        // One snapshot for all of them, so they are consistent with each other. (Unlike
        // registered metrics, collected ones get their help text written as is, hence the
        // periods.)
        let stats = self.backend.stats();
        let gauges = [
            (
                "queue_depth",
                "Requests waiting to be scheduled.",
                stats.queue_depth,
            ),
            (
                "running_sequences",
                "Sequences being generated.",
                stats.running_sequences,
            ),
            (
                "kv_blocks_used",
                "Paged KV cache blocks in use.",
                stats.kv_blocks_used,
            ),
            (
                "kv_blocks_free",
                "Paged KV cache blocks free.",
                stats.kv_blocks_free,
            ),
            (
                "kv_block_size",
                "Tokens per paged KV cache block.",
                stats.kv_block_size,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counters = [
            (
                "prompt_tokens",
                "Prompt tokens admitted.",
                stats.prompt_tokens_total,
            ),
            (
                "generation_tokens",
                "Tokens generated.",
                stats.generated_tokens_total,
            ),
            (
                "cached_prompt_tokens",
                "Prompt tokens served from shared prefix blocks instead of being computed.",
                stats.cached_prompt_tokens_total,
            ),
            (
                "preemptions",
                "Sequences preempted to free KV blocks.",
                stats.preemptions_total,
            ),
            ("engine_steps", "Engine forward steps.", stats.steps_total),
            (
                "engine_general_steps",
                "Engine steps that ran the general forward instead of the decode kernels.",
                stats.general_steps_total,
            ),
            (
                "spec_decode_proposed_tokens",
                "Tokens proposed by speculative decoding (prompt lookup).",
                stats.spec_proposed_tokens_total,
            ),
            (
                "spec_decode_accepted_tokens",
                "Proposed tokens that the model accepted.",
                stats.spec_accepted_tokens_total,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Labels of the GPU gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    /// NVML's index, the one nvidia-smi shows.
    gpu: String,
}

/// Encodes each GPU's utilization and memory at each scrape, read through NVML.
#[derive(Debug, Default)]
struct GpuCollector {
    /// Opened at the first scrape, not at startup, so that a server nobody scrapes never loads
    /// NVML; `None` where NVML or a GPU is missing, and then the gauges are left out.
    monitor: OnceLock<Option<Monitor>>,
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(monitor) = self.monitor.get_or_init(|| Monitor::open().ok()) else {
            return Ok(());
        };
        // A failed sample (a GPU fallen off the bus) leaves the gauges out of this scrape rather
        // than failing the engine's metrics with it.
        let Ok(gpus) = monitor.sample() else {
            return Ok(());
        };
        encode_gpu_gauge(
            &mut encoder,
            "gpu_utilization",
            "Percent of the last sample period during which a kernel ran on the GPU.",
            Unit::Other("percent".to_string()),
            &gpus,
            |gpu| gpu.utilization_percent.into(),
        )?;
        encode_gpu_gauge(
            &mut encoder,
            "gpu_memory_used",
            "GPU memory allocated, by every process and the driver.",
            Unit::Bytes,
            &gpus,
            |gpu| gpu.memory_used_bytes as i64,
        )?;
        encode_gpu_gauge(
            &mut encoder,
            "gpu_memory_total",
            "GPU memory installed.",
            Unit::Bytes,
            &gpus,
            |gpu| gpu.memory_total_bytes as i64,
        )
    }
}

/// One gauge family with a `value` per GPU.
fn encode_gpu_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Unit,
    gpus: &[Gpu],
    value: impl Fn(&Gpu) -> i64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, Some(&unit), MetricType::Gauge)?;
    for gpu in gpus {
        let labels = GpuLabels {
            gpu: gpu.index.to_string(),
        };
        ConstGauge::new(value(gpu)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
