//! The JSON shapes of Ollama's answers: chat and generate objects (each line of an NDJSON
//! stream, or the one object of `stream: false`), the model list, model details, running
//! models, the version, and the error body `{"error": "..."}`.

use std::collections::BTreeMap;
use std::time::Duration;

use canopy_engine::tools::ParsedCall;
use canopy_proto::{FinishReason, TokenLogprob, Usage};
use serde::Serialize;

use crate::api::backend::{ModelDetails, ModelFile};
use crate::api::response::ChatTokenLogprob;
use crate::api::task::Timings;

/// Ollama's error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OllamaError)]
pub(crate) struct ErrorBody<'a> {
    /// What went wrong.
    pub(crate) error: &'a str,
}

/// The assistant's message in a chat answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OllamaMessage)]
pub(crate) struct Message<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<CallObject<'a>>,
}

/// One call of a tool in Ollama's shape: `{"function": {"index", "name", "arguments"}}`,
/// the arguments an object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CallObject<'a> {
    function: CalledFunction<'a>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CalledFunction<'a> {
    index: usize,
    name: &'a str,
    arguments: &'a serde_json::Value,
}

/// The end of an answer: why, and the counts and durations (nanoseconds) Ollama reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub(crate) struct Final {
    done_reason: &'static str,
    total_duration: u64,
    load_duration: u64,
    prompt_eval_count: u32,
    prompt_eval_duration: u64,
    eval_count: u32,
    eval_duration: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Ollama's `done_reason` for the engine's finish reason.
fn done_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence(_) | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

impl Final {
    /// The end of a task that ran.
    pub(crate) fn finished(reason: FinishReason, usage: Usage, timings: Timings) -> Self {
        Self {
            done_reason: done_reason(reason),
            total_duration: nanos(timings.total),
            load_duration: nanos(timings.load),
            prompt_eval_count: usage.prompt_tokens,
            prompt_eval_duration: nanos(timings.prompt_eval),
            eval_count: usage.completion_tokens,
            eval_duration: nanos(timings.eval),
        }
    }

    /// The end of a request that only loaded the model (it is loaded already).
    pub(crate) fn loaded(total: Duration) -> Self {
        Self {
            done_reason: "load",
            total_duration: nanos(total),
            load_duration: nanos(total),
            prompt_eval_count: 0,
            prompt_eval_duration: 0,
            eval_count: 0,
            eval_duration: 0,
        }
    }
}

/// A piece of an answer: its text, the calls it holds (chat only), and its tokens'
/// log-probabilities when they were asked for.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Piece<'a> {
    /// The text.
    pub(crate) text: &'a str,
    /// Calls of tools.
    pub(crate) calls: &'a [ParsedCall],
    /// `Some` (possibly empty) when the request asked for log-probabilities.
    pub(crate) logprobs: Option<&'a [TokenLogprob]>,
}

/// One `/api/chat` object: a piece of the answer (`done: false`) or its end.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ChatObject<'a> {
    model: &'a str,
    created_at: String,
    message: Message<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<ChatTokenLogprob>>,
    done: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    end: Option<Final>,
}

impl<'a> ChatObject<'a> {
    /// A piece of the answer (or all of it when not streaming), ended by `end` if given.
    pub(crate) fn new(model: &'a str, piece: Piece<'a>, end: Option<Final>) -> Self {
        Self {
            model,
            created_at: rfc3339_now(),
            logprobs: piece.logprobs.map(ChatTokenLogprob::list),
            message: Message {
                role: "assistant",
                content: piece.text,
                tool_calls: piece
                    .calls
                    .iter()
                    .enumerate()
                    .map(|(index, call)| CallObject {
                        function: CalledFunction {
                            index,
                            name: &call.name,
                            arguments: &call.arguments,
                        },
                    })
                    .collect(),
            },
            done: end.is_some(),
            end,
        }
    }
}

/// One `/api/generate` object: a piece of the answer (`done: false`) or its end.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GenerateObject<'a> {
    model: &'a str,
    created_at: String,
    response: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<ChatTokenLogprob>>,
    done: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    end: Option<Final>,
}

impl<'a> GenerateObject<'a> {
    /// A piece of the answer (or all of it when not streaming), ended by `end` if given.
    pub(crate) fn new(model: &'a str, piece: Piece<'a>, end: Option<Final>) -> Self {
        Self {
            model,
            created_at: rfc3339_now(),
            response: piece.text,
            logprobs: piece.logprobs.map(ChatTokenLogprob::list),
            done: end.is_some(),
            end,
        }
    }
}

/// `details` of a model.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub(crate) struct Details {
    parent_model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    families: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantization_level: Option<String>,
}

impl Details {
    fn of(file: Option<&ModelFile>) -> Self {
        Self {
            parent_model: String::new(),
            format: file.map(|f| f.format.clone()),
            family: file.and_then(|f| f.family.clone()),
            families: file.and_then(|f| f.family.clone()).map(|f| vec![f]),
            parameter_size: file.map(|f| human_number(f.parameters)),
            quantization_level: file.and_then(|f| f.quantization.clone()),
        }
    }
}

/// One model of `/api/tags`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TagsModel {
    name: String,
    model: String,
    modified_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    details: Details,
}

impl From<&ModelDetails> for TagsModel {
    fn from(m: &ModelDetails) -> Self {
        let file = m.file.as_ref();
        Self {
            name: m.info.id.clone(),
            model: m.info.id.clone(),
            modified_at: rfc3339(file.map_or(m.info.created, |f| f.modified), 0),
            size: file.map(|f| f.size_bytes),
            digest: file.and_then(|f| f.sha256.clone()),
            details: Details::of(file),
        }
    }
}

/// `GET /api/tags`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Tags {
    /// The models.
    pub(crate) models: Vec<TagsModel>,
}

/// One model of `/api/ps`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct RunningModel {
    name: String,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    details: Details,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<u64>,
}

impl From<&ModelDetails> for RunningModel {
    fn from(m: &ModelDetails) -> Self {
        let file = m.file.as_ref();
        Self {
            name: m.info.id.clone(),
            model: m.info.id.clone(),
            size: file.map(|f| f.size_bytes),
            digest: file.and_then(|f| f.sha256.clone()),
            details: Details::of(file),
            context_length: file.and_then(|f| f.context_length),
        }
    }
}

/// `GET /api/ps`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Running {
    /// The models with a Ready instance.
    pub(crate) models: Vec<RunningModel>,
}

/// `POST /api/show`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Show {
    modelfile: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
    details: Details,
    model_info: BTreeMap<String, serde_json::Value>,
    capabilities: Vec<&'static str>,
    modified_at: String,
}

impl From<&ModelDetails> for Show {
    fn from(m: &ModelDetails) -> Self {
        let file = m.file.as_ref();
        let template = file.and_then(|f| f.chat_template.clone());
        let mut model_info = file.map(|f| f.metadata.clone()).unwrap_or_default();
        if let Some(f) = file {
            model_info
                .entry("general.parameter_count".to_string())
                .or_insert_with(|| f.parameters.into());
        }
        let mut modelfile = format!(
            "# Served by Canopy, which has no Modelfile; this one only says what the node \
             knows.\nFROM {}\n",
            m.info.id
        );
        if let Some(t) = &template {
            modelfile.push_str(&format!(
                "# The template is the model's own Jinja chat template, not a Go template.\n\
                 TEMPLATE \"\"\"{t}\"\"\"\n"
            ));
        }
        Self {
            modelfile,
            template,
            details: Details::of(file),
            model_info,
            capabilities: vec!["completion"],
            modified_at: rfc3339(file.map_or(m.info.created, |f| f.modified), 0),
        }
    }
}

/// `GET /api/version`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Version {
    /// Canopy's version.
    pub(crate) version: &'static str,
}

/// A count as Ollama writes parameter sizes: `135M`, `134.52M`, `1.7B`, `7B`, `12K`.
pub(crate) fn human_number(n: u64) -> String {
    const THOUSAND: f64 = 1e3;
    const MILLION: f64 = 1e6;
    const BILLION: f64 = 1e9;
    let x = n as f64;
    let whole = |v: f64| v == v.floor();
    if x >= BILLION {
        let v = x / BILLION;
        if whole(v) {
            format!("{v:.0}B")
        } else {
            format!("{v:.1}B")
        }
    } else if x >= MILLION {
        let v = x / MILLION;
        if whole(v) {
            format!("{v:.0}M")
        } else {
            format!("{v:.2}M")
        }
    } else if x >= THOUSAND {
        format!("{:.0}K", x / THOUSAND)
    } else {
        n.to_string()
    }
}

/// Now, in RFC 3339 with nanoseconds, UTC (`2024-05-01T12:00:00.123456789Z`).
pub(crate) fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_nanos())
}

/// Unix time `secs` + `nanos` in RFC 3339, UTC (the fraction only when `nanos` > 0).
pub(crate) fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let time = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos > 0 {
        format!("{time}.{nanos:09}Z")
    } else {
        format!("{time}Z")
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::backend::ModelInfo;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(1_714_564_800, 123_456_789),
            "2024-05-01T12:00:00.123456789Z"
        );
        assert_eq!(rfc3339(4_102_444_799, 0), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn parameter_sizes_read_like_ollamas() {
        assert_eq!(human_number(134_515_008), "134.52M");
        assert_eq!(human_number(135_000_000), "135M");
        assert_eq!(human_number(1_711_376_384), "1.7B");
        assert_eq!(human_number(7_000_000_000), "7B");
        assert_eq!(human_number(12_345), "12K");
        assert_eq!(human_number(999), "999");
    }

    #[test]
    fn objects_have_ollamas_fields() {
        let end = Final::finished(
            FinishReason::Length,
            Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
            },
            Timings {
                total: Duration::from_millis(3),
                load: Duration::from_millis(1),
                prompt_eval: Duration::from_millis(1),
                eval: Duration::from_millis(1),
            },
        );
        let json =
            serde_json::to_value(ChatObject::new("m", Piece::default(), Some(end))).expect("json");
        assert_eq!(json["done"], true);
        assert_eq!(json["done_reason"], "length");
        assert_eq!(json["message"]["role"], "assistant");
        assert_eq!(json["total_duration"], 3_000_000);
        assert_eq!(json["prompt_eval_count"], 5);
        assert_eq!(json["eval_count"], 2);
        let piece = serde_json::to_value(GenerateObject::new(
            "m",
            Piece {
                text: "Hi",
                ..Piece::default()
            },
            None,
        ))
        .expect("json");
        assert_eq!(piece["response"], "Hi");
        assert_eq!(piece["done"], false);
        assert!(piece.get("done_reason").is_none(), "{piece}");
        assert!(
            piece["created_at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }

    #[test]
    fn a_model_without_a_file_is_listed_with_what_is_known() {
        let details = ModelDetails {
            info: ModelInfo {
                id: "scripted".into(),
                created: 0,
                owned_by: "canopy".into(),
                ready: true,
            },
            file: None,
        };
        let json = serde_json::to_value(TagsModel::from(&details)).expect("json");
        assert_eq!(json["name"], "scripted");
        assert_eq!(json["model"], "scripted");
        assert_eq!(json["modified_at"], "1970-01-01T00:00:00Z");
        assert!(json.get("size").is_none() && json.get("digest").is_none());
        let show = serde_json::to_value(Show::from(&details)).expect("json");
        assert_eq!(show["capabilities"], serde_json::json!(["completion"]));
        assert!(
            show["modelfile"]
                .as_str()
                .is_some_and(|m| m.contains("FROM scripted"))
        );
    }
}
