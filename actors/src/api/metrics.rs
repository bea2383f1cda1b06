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
//! | `canopy_batch_running`, `canopy_batch_queued` (gauges: sequences in the batch, tasks waiting for a place) | `instance` |
//! | `canopy_batch_parallel` (gauge: most sequences the runner batches) | `instance` |
//! | `canopy_batch_last_step_rows` (gauge: rows of the last batched step) | `instance` |
//! | `canopy_kv_cache_bytes`, `canopy_kv_cache_capacity_bytes` (gauges) | `instance` |
//! | `canopy_prefix_cache_hits_total`, `canopy_prefix_cache_reused_tokens_total`, `canopy_prefilled_tokens_total` | `instance` |
//!
//! The batch metrics follow each runner's `Batch` reports ([`RunnerEvent::BatchChanged`]).
//! A runner counts its prefix hits and prefilled tokens from its own start; the counters here
//! add up the increases, so they stay monotonic across runner restarts. When a runner dies
//! its gauges drop to 0 until the next runner reports.

use std::collections::HashMap;
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

use canopy_proto::BatchStats;

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
    batch: BatchMetrics,
}

/// The per-instance metrics of runners' batches.
#[derive(Debug, Default)]
struct BatchMetrics {
    running: Family<InstanceLabels, Gauge>,
    queued: Family<InstanceLabels, Gauge>,
    parallel: Family<InstanceLabels, Gauge>,
    last_step_rows: Family<InstanceLabels, Gauge>,
    kv_bytes: Family<InstanceLabels, Gauge>,
    kv_capacity_bytes: Family<InstanceLabels, Gauge>,
    prefix_hits: Family<InstanceLabels, Counter>,
    prefix_reused_tokens: Family<InstanceLabels, Counter>,
    prefilled_tokens: Family<InstanceLabels, Counter>,
    /// Each instance's last report from its current runner process, to count increases.
    last: Mutex<HashMap<String, BatchStats>>,
}

/// A gauge value from a runner's count.
fn gauge_value(n: impl Into<u64>) -> i64 {
    i64::try_from(n.into()).unwrap_or(i64::MAX)
}

/// How much a runner's counter grew since its last report (a smaller value means a new
/// process counting from 0).
fn increase(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

impl BatchMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "batch_running",
            "Sequences in each instance's running batch",
            self.running.clone(),
        );
        registry.register(
            "batch_queued",
            "Tasks each instance accepted that wait for a place in its batch",
            self.queued.clone(),
        );
        registry.register(
            "batch_parallel",
            "Most sequences each instance's runner generates at once",
            self.parallel.clone(),
        );
        registry.register(
            "batch_last_step_rows",
            "Rows (prefill and decode) of each instance's last batched step",
            self.last_step_rows.clone(),
        );
        registry.register_with_unit(
            "kv_cache",
            "KV cache memory in use by each instance (running sequences and prefix cache)",
            Unit::Bytes,
            self.kv_bytes.clone(),
        );
        registry.register_with_unit(
            "kv_cache_capacity",
            "KV cache memory each instance may use at most",
            Unit::Bytes,
            self.kv_capacity_bytes.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Requests whose prompt reused positions from the prefix cache",
            self.prefix_hits.clone(),
        );
        registry.register(
            "prefix_cache_reused_tokens",
            "Prompt positions reused from the prefix cache instead of prefilled",
            self.prefix_reused_tokens.clone(),
        );
        registry.register(
            "prefilled_tokens",
            "Prompt positions prefilled",
            self.prefilled_tokens.clone(),
        );
    }

    fn last(&self) -> std::sync::MutexGuard<'_, HashMap<String, BatchStats>> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a runner's report.
    fn report(&self, instance: &str, stats: &BatchStats) {
        let labels = InstanceLabels {
            instance: instance.to_string(),
        };
        self.running
            .get_or_create(&labels)
            .set(gauge_value(stats.running));
        self.queued
            .get_or_create(&labels)
            .set(gauge_value(stats.queued));
        self.parallel
            .get_or_create(&labels)
            .set(gauge_value(stats.parallel));
        self.last_step_rows
            .get_or_create(&labels)
            .set(gauge_value(stats.last_step_rows));
        self.kv_bytes
            .get_or_create(&labels)
            .set(gauge_value(stats.kv_bytes));
        self.kv_capacity_bytes
            .get_or_create(&labels)
            .set(gauge_value(stats.kv_capacity_bytes));
        let before = self
            .last()
            .insert(instance.to_string(), *stats)
            .unwrap_or_default();
        self.prefix_hits
            .get_or_create(&labels)
            .inc_by(increase(stats.prefix_hits, before.prefix_hits));
        self.prefix_reused_tokens
            .get_or_create(&labels)
            .inc_by(increase(
                stats.prefix_reused_tokens,
                before.prefix_reused_tokens,
            ));
        self.prefilled_tokens
            .get_or_create(&labels)
            .inc_by(increase(stats.prefilled_tokens, before.prefilled_tokens));
    }

    /// The instance's runner process is gone: its gauges drop to 0 and the next process's
    /// counters count from 0.
    fn runner_gone(&self, instance: &str) {
        if self.last().remove(instance).is_none() {
            // It never reported a batch: no series to reset.
            return;
        }
        let labels = InstanceLabels {
            instance: instance.to_string(),
        };
        for gauge in [
            &self.running,
            &self.queued,
            &self.parallel,
            &self.last_step_rows,
            &self.kv_bytes,
            &self.kv_capacity_bytes,
        ] {
            gauge.get_or_create(&labels).set(0);
        }
    }

    /// Drops every series of an instance that is gone for good.
    fn forget(&self, instance: &str) {
        self.last().remove(instance);
        let labels = InstanceLabels {
            instance: instance.to_string(),
        };
        for gauge in [
            &self.running,
            &self.queued,
            &self.parallel,
            &self.last_step_rows,
            &self.kv_bytes,
            &self.kv_capacity_bytes,
        ] {
            gauge.remove(&labels);
        }
        for counter in [
            &self.prefix_hits,
            &self.prefix_reused_tokens,
            &self.prefilled_tokens,
        ] {
            counter.remove(&labels);
        }
    }
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
        let batch = BatchMetrics::default();
        batch.register(&mut registry);
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
                batch,
            }),
        }
    }

    /// Counts what a runner event tells: a restart (`Started` with `restarts > 0`), a
    /// failure (`RunnerFailed`, by reason), or the runner's batch (`BatchChanged`).
    pub fn runner_event(&self, event: &RunnerEvent) {
        match event {
            RunnerEvent::BatchChanged { instance, stats } => {
                self.inner.batch.report(instance, stats);
                return;
            }
            RunnerEvent::Started { instance, .. }
            | RunnerEvent::RunnerFailed { instance, .. }
            | RunnerEvent::LoadFailed { instance, .. } => {
                self.inner.batch.runner_gone(instance);
            }
            RunnerEvent::StatusChanged { .. } => {}
        }
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
            | RunnerEvent::LoadFailed { .. }
            | RunnerEvent::BatchChanged { .. } => {}
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

    /// Drops the per-instance series (heartbeat, batch) of an instance that is gone.
    pub fn forget_instance(&self, instance: &str) {
        self.inner.heartbeat_lag.remove(&InstanceLabels {
            instance: instance.to_string(),
        });
        self.inner.batch.forget(instance);
    }

    /// Adds a metric of the node's own to the registry (its name gets the `canopy_` prefix).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// Exports the cluster's security counters, read from `cluster` at every scrape:
    /// `canopy_cluster_refused_frames_total` (peer messages whose seal did not check out) and
    /// `canopy_discovery_beacons_total{outcome}` (every discovery datagram by what became of
    /// it: `accepted`, `bad_mac`, `stale`, `replayed`, `malformed`, `oversize`, `version`,
    /// `other_namespace`).
    pub fn watch_cluster(&self, cluster: canopy_runtime::cluster::ClusterHandle) {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(Box::new(ClusterCounters(cluster)));
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

/// The cluster's counters, read at scrape time (see [`Metrics::watch_cluster`]).
struct ClusterCounters(canopy_runtime::cluster::ClusterHandle);

impl std::fmt::Debug for ClusterCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCounters")
    }
}

/// The label of one discovery outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl prometheus_client::collector::Collector for ClusterCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::TypedMetric;
        use prometheus_client::metrics::counter::ConstCounter;

        let refused = ConstCounter::new(self.0.refused_frames());
        refused.encode(encoder.encode_descriptor(
            "cluster_refused_frames",
            "Messages from peers refused because their seal did not check out (forged sender, \
             a frame for another node, garbage)",
            None,
            ConstCounter::<u64>::TYPE,
        )?)?;

        let c = self.0.discovery_counts();
        let mut family = encoder.encode_descriptor(
            "discovery_beacons",
            "Discovery datagrams received, by outcome (every outcome but accepted and \
             other_namespace is a refusal)",
            None,
            ConstCounter::<u64>::TYPE,
        )?;
        for (outcome, n) in [
            ("accepted", c.accepted),
            ("bad_mac", c.bad_mac),
            ("stale", c.stale),
            ("replayed", c.replayed),
            ("malformed", c.malformed),
            ("oversize", c.oversize),
            ("version", c.version),
            ("other_namespace", c.other_namespace),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&OutcomeLabels { outcome })?)?;
        }
        Ok(())
    }
}
