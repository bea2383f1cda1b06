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
//! Before the draw, the logits are shaped as the request asks: `logit_bias` is added (-100
//! bans the token),
//! `presence_penalty` is subtracted once from every token generated so far and
//! `frequency_penalty` once per time it was generated (over the generated tokens only, as
//! vLLM does; the prompt is not penalised), and a grammar's mask (structured output) sets the
//! tokens that would leave the grammar to minus infinity. With none of these the logits reach
//! the draw untouched.
//!
//! The draw itself is candle's [`LogitsProcessor`]; this module maps the request's parameters
//! onto its [`Sampling`] modes and validates them. When the request asks for
//! log-probabilities, they are computed from the shaped logits divided by the temperature (by
//! 1 for greedy decoding), in f64: the distribution the draw uses before its top-k/top-p cut.
//!
//! Determinism: the same seed, logits and build give the same tokens. The sampler runs on
//! one thread over a plain vector (softmax of one row, a sort, one draw), so nothing depends
//! on the thread count; together with the thread-count-independent forward (see
//! [`crate::llama`]) the same seed, prompt and build give the same tokens on any machine
//! configuration of the same CPU architecture.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use canopy_proto::GenerateParams;

use crate::EngineError;

/// Most alternatives a request may ask for per position (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// Chooses next tokens for one generation; stateful (its random stream advances, and it
/// counts the tokens it chose for the penalties).
pub struct Sampler {
    processor: LogitsProcessor,
    sampling: Sampling,
    temperature: f32,
    presence: f32,
    frequency: f32,
    bias: Vec<(u32, f32)>,
    logprobs: Option<u8>,
    counts: HashMap<u32, u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("sampling", &self.sampling)
            .field("presence", &self.presence)
            .field("frequency", &self.frequency)
            .field("bias", &self.bias.len())
            .field("logprobs", &self.logprobs)
            .finish_non_exhaustive()
    }
}

/// A chosen token, with its log-probability when the request asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// `Some` when the request asked for log-probabilities.
    pub logprobs: Option<Logprobs>,
}

/// The log-probability of a chosen token and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    /// The chosen token's natural log-probability.
    pub chosen: f32,
    /// The most likely tokens, most likely first (ties: the lower id first), as many as
    /// asked for; tokens of probability 0 (masked, banned) are left out.
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params`; fails with [`EngineError::InvalidRequest`] for a negative or
    /// non-finite temperature, a `top_p` outside `[0, 1]`, a penalty outside `[-2, 2]`, a
    /// bias outside `[-100, 100]` or more than [`MAX_TOP_LOGPROBS`] alternatives.
    pub fn new(params: &GenerateParams) -> Result<Self, EngineError> {
        let sampling = sampling_for(params)?;
        for (name, value) in [
            ("presence_penalty", params.presence_penalty),
            ("frequency_penalty", params.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(EngineError::InvalidRequest(format!(
                    "{name} must be between -2 and 2, got {value}"
                )));
            }
        }
        if let Some(&(id, bias)) = params
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(EngineError::InvalidRequest(format!(
                "logit_bias of token {id} must be between -100 and 100, got {bias}"
            )));
        }
        if let Some(k) = params.logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return Err(EngineError::InvalidRequest(format!(
                "at most {MAX_TOP_LOGPROBS} top log-probabilities may be asked for, got {k}"
            )));
        }
        Ok(Self {
            processor: LogitsProcessor::from_sampling(params.seed, sampling.clone()),
            sampling,
            temperature: params.temperature,
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
            bias: params.logit_bias.clone(),
            logprobs: params.logprobs,
            counts: HashMap::new(),
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

    /// The token ids the request biases (to check them against the vocabulary).
    pub fn biased_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.bias.iter().map(|&(id, _)| id)
    }

    /// Picks the next token from `logits` (`[vocab]`, any float dtype); fails with
    /// [`EngineError::Generate`] for logits that cannot be sampled (wrong shape, or no finite
    /// probability left).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32, EngineError> {
        self.sample_masked(logits, None).map(|s| s.token)
    }

    /// Picks the next token among those `allowed` lets through (every token when `None`),
    /// with its log-probabilities when the request asked for them.
    pub fn sample_masked(
        &mut self,
        logits: &Tensor,
        allowed: Option<&dyn Fn(u32) -> bool>,
    ) -> Result<Sampled, EngineError> {
        let unusable =
            |e: candle_core::Error| EngineError::Generate(format!("unusable logits: {e}"));
        let logits = logits.flatten_all().map_err(unusable)?;
        if logits.elem_count() == 0 {
            return Err(EngineError::Generate(
                "cannot sample from empty logits".into(),
            ));
        }
        let penalised = (self.presence != 0.0 || self.frequency != 0.0) && !self.counts.is_empty();
        let shaped = !self.bias.is_empty() || penalised || allowed.is_some();
        if !shaped && self.logprobs.is_none() {
            // Untouched logits: the draw sees exactly what the model produced.
            let token = self.draw(&logits)?;
            return Ok(self.chose(token, None));
        }
        let mut values: Vec<f32> = logits
            .to_dtype(DType::F32)
            .and_then(|l| l.to_vec1())
            .map_err(unusable)?;
        if shaped {
            self.shape(&mut values, allowed);
        }
        if !values.iter().any(|v| v.is_finite()) {
            return Err(EngineError::Generate(
                "no token is allowed at this position".into(),
            ));
        }
        let token = if shaped {
            let n = values.len();
            let tensor = Tensor::from_vec(values.clone(), n, logits.device()).map_err(unusable)?;
            self.draw(&tensor)?
        } else {
            self.draw(&logits)?
        };
        let logprobs = self
            .logprobs
            .map(|k| logprobs_of(&values, token, k, self.temperature));
        Ok(self.chose(token, logprobs))
    }

    fn draw(&mut self, logits: &Tensor) -> Result<u32, EngineError> {
        self.processor
            .sample(logits)
            .map_err(|e| EngineError::Generate(format!("sampling failed: {e}")))
    }

    fn chose(&mut self, token: u32, logprobs: Option<Logprobs>) -> Sampled {
        if self.presence != 0.0 || self.frequency != 0.0 {
            *self.counts.entry(token).or_default() += 1;
        }
        Sampled { token, logprobs }
    }

    /// Applies the bias, the penalties and the mask to `values`.
    fn shape(&self, values: &mut [f32], allowed: Option<&dyn Fn(u32) -> bool>) {
        for &(id, bias) in &self.bias {
            if let Some(v) = values.get_mut(id as usize) {
                // -100 is a ban, as OpenAI documents it, whatever the logit.
                *v = if bias <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    *v + bias
                };
            }
        }
        for (&id, &count) in &self.counts {
            if let Some(v) = values.get_mut(id as usize) {
                *v -= self.presence + self.frequency * count as f32;
            }
        }
        if let Some(allowed) = allowed {
            for (id, v) in values.iter_mut().enumerate() {
                if !allowed(id as u32) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// The log-probability of `token` and the `k` most likely tokens under
/// `softmax(values / temperature)` (temperature 1 when it is 0).
fn logprobs_of(values: &[f32], token: u32, k: u8, temperature: f32) -> Logprobs {
    let t = if temperature > 0.0 {
        f64::from(temperature)
    } else {
        1.0
    };
    let max = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let max = f64::from(max);
    let sum: f64 = values
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| ((f64::from(v) - max) / t).exp())
        .sum();
    let log_sum = sum.ln();
    let logprob = |v: f32| -> f32 {
        if v.is_finite() {
            ((f64::from(v) - max) / t - log_sum) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    // Most likely first; ids come in ascending order, so an equal value found later stays
    // behind (ties: the lower id first).
    let k = usize::from(k);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (id, &v) in values.iter().enumerate() {
        if k == 0 || !v.is_finite() || (top.len() == k && top[k - 1].1 >= v) {
            continue;
        }
        let at = top.iter().position(|&(_, w)| w < v).unwrap_or(top.len());
        top.insert(at, (id as u32, v));
        top.truncate(k);
    }
    Logprobs {
        chosen: logprob(
            values
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY),
        ),
        top: top.into_iter().map(|(id, v)| (id, logprob(v))).collect(),
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

    fn logits(values: &[f32]) -> Tensor {
        Tensor::new(values, &candle_core::Device::Cpu).expect("tensor")
    }

    fn greedy() -> GenerateParams {
        params(0.0, 1.0, None)
    }

    #[test]
    fn untouched_requests_sample_exactly_as_before() {
        let l = logits(&[0.1, 2.0, 1.9, -3.0]);
        for p in [
            greedy(),
            GenerateParams {
                seed: 7,
                ..params(0.8, 0.9, None)
            },
        ] {
            let mut plain = LogitsProcessor::from_sampling(p.seed, sampling_for(&p).unwrap());
            let mut ours = Sampler::new(&p).unwrap();
            for _ in 0..20 {
                assert_eq!(ours.sample(&l).unwrap(), plain.sample(&l).unwrap());
            }
        }
    }

    #[test]
    fn asking_for_logprobs_does_not_change_the_tokens() {
        let l = logits(&[0.5, 1.5, 1.4, -1.0, 0.0]);
        let p = GenerateParams {
            seed: 11,
            ..params(1.2, 1.0, None)
        };
        let mut plain = Sampler::new(&p).unwrap();
        let mut with = Sampler::new(&GenerateParams {
            logprobs: Some(3),
            ..p
        })
        .unwrap();
        for _ in 0..50 {
            let s = with.sample_masked(&l, None).unwrap();
            assert_eq!(s.token, plain.sample(&l).unwrap());
            assert_eq!(s.logprobs.expect("asked for").top.len(), 3);
        }
    }

    #[test]
    fn logprobs_are_the_log_softmax_over_the_temperature() {
        let values = [1.0f32, 3.0, 2.0, 3.0];
        let p = GenerateParams {
            logprobs: Some(2),
            ..greedy()
        };
        let s = Sampler::new(&p)
            .unwrap()
            .sample_masked(&logits(&values), None)
            .unwrap();
        let lp = s.logprobs.unwrap();
        // Either maximum may be drawn; the top list breaks the tie by id.
        assert!(s.token == 1 || s.token == 3, "{}", s.token);
        let total: f64 = values.iter().map(|&v| f64::from(v).exp()).sum();
        let expect = |v: f32| (f64::from(v) - total.ln()) as f32;
        assert!((lp.chosen - expect(3.0)).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        // At temperature 2 the distribution is flatter: softmax(values / 2).
        let p = GenerateParams {
            logprobs: Some(4),
            seed: 3,
            ..params(2.0, 1.0, None)
        };
        let s = Sampler::new(&p)
            .unwrap()
            .sample_masked(&logits(&values), None)
            .unwrap();
        let lp = s.logprobs.unwrap();
        let total: f64 = values.iter().map(|&v| (f64::from(v) / 2.0).exp()).sum();
        let sum: f64 = lp.top.iter().map(|t| f64::from(t.1).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5, "all four: {lp:?}");
        let lowest = lp.top.last().unwrap();
        assert_eq!(lowest.0, 0);
        assert!((f64::from(lowest.1) - (0.5 - total.ln())).abs() < 1e-6);
    }

    #[test]
    fn logit_bias_moves_and_bans_tokens() {
        let l = logits(&[0.0, 5.0, 1.0]);
        let p = GenerateParams {
            logit_bias: vec![(2, 10.0)],
            ..greedy()
        };
        assert_eq!(Sampler::new(&p).unwrap().sample(&l).unwrap(), 2);
        let p = GenerateParams {
            logit_bias: vec![(1, -100.0)],
            logprobs: Some(3),
            ..greedy()
        };
        let s = Sampler::new(&p).unwrap().sample_masked(&l, None).unwrap();
        assert_eq!(s.token, 2);
        // The banned token has probability 0: it is left out of the alternatives.
        assert_eq!(
            s.logprobs
                .unwrap()
                .top
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>(),
            vec![2, 0]
        );
        let all = GenerateParams {
            logit_bias: vec![(0, -100.0), (1, -100.0), (2, -100.0)],
            ..greedy()
        };
        assert!(matches!(
            Sampler::new(&all).unwrap().sample(&l),
            Err(EngineError::Generate(_))
        ));
    }

    #[test]
    fn penalties_count_only_generated_tokens() {
        // Token 0 leads by 1.0; each time it is chosen, a frequency penalty of 0.6 (plus a
        // presence penalty of 0.1 once) lowers it, so the lead flips after two picks.
        let l = logits(&[2.0, 1.0, 0.0]);
        let p = GenerateParams {
            frequency_penalty: 0.6,
            presence_penalty: 0.1,
            ..greedy()
        };
        let mut s = Sampler::new(&p).unwrap();
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&l).unwrap()).collect();
        // 0 (2.0), 0 (2.0 - 0.7 = 1.3 > 1.0), then 1 (0: 2.0 - 1.3 = 0.7 < 1.0), then 0
        // (0.7 against 1.0 - 0.7 = 0.3).
        assert_eq!(picks, vec![0, 0, 1, 0]);
        let p = GenerateParams {
            presence_penalty: 1.5,
            ..greedy()
        };
        let mut s = Sampler::new(&p).unwrap();
        let picks: Vec<u32> = (0..3).map(|_| s.sample(&l).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0]);
    }

    #[test]
    fn a_mask_keeps_only_allowed_tokens() {
        let l = logits(&[9.0, 1.0, 2.0, 3.0]);
        let odd = |id: u32| id % 2 == 1;
        let p = GenerateParams {
            logprobs: Some(5),
            ..greedy()
        };
        let s = Sampler::new(&p)
            .unwrap()
            .sample_masked(&l, Some(&odd))
            .unwrap();
        assert_eq!(s.token, 3);
        let lp = s.logprobs.unwrap();
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![3, 1]);
        let none = |_: u32| false;
        assert!(
            Sampler::new(&p)
                .unwrap()
                .sample_masked(&l, Some(&none))
                .is_err()
        );
    }

    proptest::proptest! {
        /// Constrained greedy decoding picks the unconstrained argmax wherever the mask
        /// allows it, and otherwise the best allowed token; a seeded draw under a mask picks
        /// an allowed token, the same one every time.
        #[test]
        fn a_mask_changes_a_pick_only_where_it_forbids_it(
            values in proptest::collection::vec(-20.0f32..20.0, 2..40),
            allowed_bits in proptest::collection::vec(proptest::bool::ANY, 40),
            seed in 0u64..1000,
        ) {
            let n = values.len();
            let mut allowed: Vec<bool> = allowed_bits[..n].to_vec();
            if !allowed.iter().any(|&a| a) {
                allowed[n - 1] = true;
            }
            let allows = |id: u32| allowed[id as usize];
            let l = logits(&values);
            let free = Sampler::new(&greedy()).unwrap().sample(&l).unwrap();
            let masked = Sampler::new(&greedy())
                .unwrap()
                .sample_masked(&l, Some(&allows))
                .unwrap()
                .token;
            if allowed[free as usize] {
                proptest::prop_assert_eq!(masked, free);
            } else {
                let best = (0..n as u32)
                    .filter(|&i| allowed[i as usize])
                    .max_by(|&a, &b| values[a as usize].total_cmp(&values[b as usize]))
                    .unwrap();
                proptest::prop_assert_eq!(values[masked as usize], values[best as usize]);
                proptest::prop_assert!(allowed[masked as usize]);
            }
            let seeded = GenerateParams {
                temperature: 0.9,
                seed,
                ..greedy()
            };
            let draw = || {
                Sampler::new(&seeded)
                    .unwrap()
                    .sample_masked(&l, Some(&allows))
                    .unwrap()
                    .token
            };
            let first = draw();
            proptest::prop_assert!(allowed[first as usize]);
            proptest::prop_assert_eq!(first, draw());
        }
    }

    #[test]
    fn rejects_out_of_range_shaping() {
        for p in [
            GenerateParams {
                presence_penalty: 2.5,
                ..greedy()
            },
            GenerateParams {
                frequency_penalty: -3.0,
                ..greedy()
            },
            GenerateParams {
                logit_bias: vec![(0, 101.0)],
                ..greedy()
            },
            GenerateParams {
                logprobs: Some(MAX_TOP_LOGPROBS + 1),
                ..greedy()
            },
        ] {
            assert!(
                matches!(Sampler::new(&p), Err(EngineError::InvalidRequest(_))),
                "{p:?}"
            );
        }
    }
}
