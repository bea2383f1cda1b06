//! [`Sampler`]: picks the next token from a logits vector, as a request's
//! [`GenerateParams`] ask.
//!
//! - `temperature == 0` is greedy decoding: the argmax (the lowest id among ties), no
//!   randomness at all.
//! - otherwise tokens are drawn from `softmax(logits / temperature)`, restricted to the `top_k`
//!   most likely tokens (`top_k` of `None` or `0` disables it) and then to the smallest set
//!   whose probability reaches `top_p` (`top_p >= 1` disables it; `top_p == 0` keeps only the
//!   most likely token). The random stream is a `StdRng` seeded with `params.seed`.
//!
//! The sampling itself is candle's [`LogitsProcessor`]; this module maps the request's
//! parameters onto its [`Sampling`] modes and validates them.
//!
//! Determinism: the same seed, logits and build give the same tokens. The sampler runs on
//! one thread over a plain vector (softmax of one row, a sort, one draw), so nothing depends
//! on the thread count; together with the thread-count-independent forward (see
//! [`crate::llama`]) the same seed, prompt and build give the same tokens on any machine
//! configuration of the same CPU architecture.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use canopy_proto::GenerateParams;

use crate::EngineError;

/// Chooses next tokens for one generation; stateful (its random stream advances).
pub struct Sampler {
    processor: LogitsProcessor,
    sampling: Sampling,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("sampling", &self.sampling)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for `params`; fails with [`EngineError::InvalidRequest`] for a negative or
    /// non-finite temperature or a `top_p` outside `[0, 1]`.
    pub fn new(params: &GenerateParams) -> Result<Self, EngineError> {
        let sampling = sampling_for(params)?;
        Ok(Self {
            processor: LogitsProcessor::from_sampling(params.seed, sampling.clone()),
            sampling,
        })
    }

    /// Whether the sampler is greedy (deterministic argmax, no random stream).
    pub fn is_greedy(&self) -> bool {
        self.sampling == Sampling::ArgMax
    }

    /// The sampling mode chosen for the request.
    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// Picks the next token from `logits` (`[vocab]`, any float dtype); fails with
    /// [`EngineError::Generate`] for logits that cannot be sampled (wrong shape, or no finite
    /// probability left).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32, EngineError> {
        let logits = logits
            .flatten_all()
            .map_err(|e| EngineError::Generate(format!("unusable logits: {e}")))?;
        if logits.elem_count() == 0 {
            return Err(EngineError::Generate(
                "cannot sample from empty logits".into(),
            ));
        }
        self.processor
            .sample(&logits)
            .map_err(|e| EngineError::Generate(format!("sampling failed: {e}")))
    }
}

/// Maps request parameters onto a candle sampling mode.
fn sampling_for(params: &GenerateParams) -> Result<Sampling, EngineError> {
    let temperature = params.temperature;
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(EngineError::InvalidRequest(format!(
            "temperature must be a number >= 0, got {temperature}"
        )));
    }
    let top_p = params.top_p;
    if !(0.0..=1.0).contains(&top_p) {
        return Err(EngineError::InvalidRequest(format!(
            "top_p must be between 0 and 1, got {top_p}"
        )));
    }
    if temperature == 0.0 || top_p == 0.0 || params.top_k == Some(1) {
        return Ok(Sampling::ArgMax);
    }
    let temperature = f64::from(temperature);
    let k = params.top_k.filter(|&k| k > 0).map(|k| k as usize);
    let p = (top_p < 1.0).then_some(f64::from(top_p));
    Ok(match (k, p) {
        (None, None) => Sampling::All { temperature },
        (Some(k), None) => Sampling::TopK { k, temperature },
        (None, Some(p)) => Sampling::TopP { p, temperature },
        (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: Option<u32>) -> GenerateParams {
        GenerateParams {
            temperature,
            top_p,
            top_k,
            ..GenerateParams::default()
        }
    }

    #[test]
    fn maps_parameters_onto_sampling_modes() {
        let mode = |p: GenerateParams| sampling_for(&p).expect("valid");
        assert_eq!(mode(params(0.0, 0.9, Some(40))), Sampling::ArgMax);
        assert_eq!(
            mode(params(0.7, 1.0, None)),
            Sampling::All {
                temperature: f64::from(0.7f32)
            }
        );
        assert!(matches!(
            mode(params(0.5, 1.0, Some(40))),
            Sampling::TopK { k: 40, .. }
        ));
        assert!(matches!(
            mode(params(0.5, 1.0, Some(0))),
            Sampling::All { .. }
        ));
        assert!(matches!(
            mode(params(0.5, 0.9, None)),
            Sampling::TopP { .. }
        ));
        assert!(matches!(
            mode(params(0.5, 0.9, Some(5))),
            Sampling::TopKThenTopP { k: 5, .. }
        ));
        assert_eq!(mode(params(0.5, 0.0, None)), Sampling::ArgMax);
        assert_eq!(mode(params(0.5, 1.0, Some(1))), Sampling::ArgMax);
    }

    #[test]
    fn rejects_invalid_parameters() {
        for p in [
            params(-1.0, 1.0, None),
            params(f32::NAN, 1.0, None),
            params(1.0, 1.5, None),
            params(1.0, -0.1, None),
        ] {
            assert!(
                matches!(Sampler::new(&p), Err(EngineError::InvalidRequest(_))),
                "{p:?}"
            );
        }
    }
}
