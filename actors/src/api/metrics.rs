//! The node's Prometheus metrics, served by `GET /metrics` in the Prometheus text format.
//!
//! [`Metrics`] is a cheap handle (an `Arc` inside): the API records request counts,
//! durations, tokens and time to first token as it serves; the node feeds it the
//! `RunnerEvent`s it receives ([`Metrics::runner_event`]) and the heartbeat lag of each
//! instance ([`Metrics::heartbeat_lag`]). Metrics of its own can be added with
//! [`Metrics::register`].
//!
//! | metric | labels |
//! |---|---|
//! | `canopy_http_requests_total` | `endpoint` (the route, or `unmatched`), `status` |
//! | `canopy_http_request_duration_seconds` (histogram; streams: until the stream ends) | `endpoint` |
//! | `canopy_tokens_generated_total` | `model` |
//! | `canopy_prompt_tokens_total` | `model` |
//! | `canopy_time_to_first_token_seconds` (histogram) | `model` |
//! | `canopy_request_retries_total` (transparent retries after a runner death) | `model` |
//! | `canopy_runner_restarts_total` | `instance` |
//! | `canopy_runner_failures_total` | `instance`, `reason` |
//! | `canopy_runner_heartbeat_lag_seconds` (gauge) | `instance` |

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use canopy_runtime::process::FailureReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};
use std::sync::atomic::AtomicU64;

use crate::runner::RunnerEvent;

/// The `Content-Type` of `GET /metrics`.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    instance: String,
    reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Debug)]
struct Inner {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<EndpointLabels>,
    tokens_generated: Family<ModelLabels, Counter>,
    prompt_tokens: Family<ModelLabels, Counter>,
    time_to_first_token: HistogramFamily<ModelLabels>,
    retries: Family<ModelLabels, Counter>,
    runner_restarts: Family<InstanceLabels, Counter>,
    runner_failures: Family<FailureLabels, Counter>,
    heartbeat_lag: Family<InstanceLabels, Gauge<f64, AtomicU64>>,
}

/// The node's metrics; clone it freely, every clone records into the same registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn first_token_histogram() -> Histogram {
    // 10 ms .. ~41 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

/// The `reason` label of a runner failure.
fn reason_label(reason: &FailureReason) -> &'static str {
    match reason {
        FailureReason::Exited { .. } => "exited",
        FailureReason::Signaled { .. } => "signaled",
        FailureReason::UnexpectedExit => "unexpected_exit",
        FailureReason::HeartbeatMissed { .. } => "heartbeat_missed",
        FailureReason::Stalled { .. } => "stalled",
        FailureReason::Killed { .. } => "killed",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric of the table above (prefix `canopy_`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("canopy");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily<EndpointLabels> =
            Family::new_with_constructor(duration_histogram);
        let tokens_generated = Family::<ModelLabels, Counter>::default();
        let prompt_tokens = Family::<ModelLabels, Counter>::default();
        let time_to_first_token: HistogramFamily<ModelLabels> =
            Family::new_with_constructor(first_token_histogram);
        let retries = Family::<ModelLabels, Counter>::default();
        let runner_restarts = Family::<InstanceLabels, Counter>::default();
        let runner_failures = Family::<FailureLabels, Counter>::default();
        let heartbeat_lag = Family::<InstanceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by endpoint and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from request to the end of the response (for streams: of the stream)",
            Unit::Seconds,
            request_duration.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens generated for API requests",
            tokens_generated.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished API requests",
            prompt_tokens.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Time from request to its first generated token",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        registry.register(
            "request_retries",
            "Requests retried transparently after their runner died before any output",
            retries.clone(),
        );
        registry.register(
            "runner_restarts",
            "Runner processes restarted",
            runner_restarts.clone(),
        );
        registry.register(
            "runner_failures",
            "Runner processes that died, by reason",
            runner_failures.clone(),
        );
        registry.register_with_unit(
            "runner_heartbeat_lag",
            "Age of each instance's last runner heartbeat",
            Unit::Seconds,
            heartbeat_lag.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                requests,
                request_duration,
                tokens_generated,
                prompt_tokens,
                time_to_first_token,
                retries,
                runner_restarts,
                runner_failures,
                heartbeat_lag,
            }),
        }
    }

    /// Counts what a runner event tells: a restart (`Started` with `restarts > 0`) or a
    /// failure (`RunnerFailed`, by reason).
    pub fn runner_event(&self, event: &RunnerEvent) {
        match event {
            RunnerEvent::Started {
                instance, restarts, ..
            } if *restarts > 0 => {
                self.inner
                    .runner_restarts
                    .get_or_create(&InstanceLabels {
                        instance: instance.clone(),
                    })
                    .inc();
            }
            RunnerEvent::RunnerFailed {
                instance, reason, ..
            } => {
                self.inner
                    .runner_failures
                    .get_or_create(&FailureLabels {
                        instance: instance.clone(),
                        reason: reason_label(reason).to_string(),
                    })
                    .inc();
            }
            RunnerEvent::Started { .. }
            | RunnerEvent::StatusChanged { .. }
            | RunnerEvent::LoadFailed { .. } => {}
        }
    }

    /// Sets the age of `instance`'s last heartbeat.
    pub fn heartbeat_lag(&self, instance: &str, lag: Duration) {
        self.inner
            .heartbeat_lag
            .get_or_create(&InstanceLabels {
                instance: instance.to_string(),
            })
            .set(lag.as_secs_f64());
    }

    /// Drops the heartbeat gauge of an instance that is gone.
    pub fn forget_instance(&self, instance: &str) {
        self.inner.heartbeat_lag.remove(&InstanceLabels {
            instance: instance.to_string(),
        });
    }

    /// Adds a metric of the node's own to the registry (its name gets the `canopy_` prefix).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// Every metric in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let registry = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }

    /// Counts an answered request.
    pub(crate) fn request(&self, endpoint: &str, status: u16) {
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
    }

    /// Records how long a request took.
    pub(crate) fn request_duration(&self, endpoint: &str, took: Duration) {
        self.inner
            .request_duration
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts generated tokens.
    pub(crate) fn tokens_generated(&self, model: &str, tokens: usize) {
        self.model_counter(&self.inner.tokens_generated, model)
            .inc_by(tokens as u64);
    }

    /// Counts the prompt tokens of a finished request.
    pub(crate) fn prompt_tokens(&self, model: &str, tokens: u32) {
        self.model_counter(&self.inner.prompt_tokens, model)
            .inc_by(u64::from(tokens));
    }

    /// Counts a transparent retry.
    pub(crate) fn retry(&self, model: &str) {
        self.model_counter(&self.inner.retries, model).inc();
    }

    /// Records the time to a request's first token.
    pub(crate) fn time_to_first_token(&self, model: &str, took: Duration) {
        self.inner
            .time_to_first_token
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    fn model_counter(&self, family: &Family<ModelLabels, Counter>, model: &str) -> Counter {
        family.get_or_create_owned(&ModelLabels {
            model: model.to_string(),
        })
    }
}
