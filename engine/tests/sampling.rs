//! Behaviour of [`Sampler`]: greedy decoding is the argmax, seeded sampling is reproducible,
//! and the top-k / top-p cut-offs keep only the tokens they should.

use candle_core::{Device, Tensor};
use canopy_engine::EngineError;
use canopy_engine::sampling::Sampler;
use canopy_proto::GenerateParams;

/// Logits over a 64-token vocabulary with a smooth, fairly flat distribution peaking near
/// token 17.
fn logits() -> Tensor {
    let values: Vec<f32> = (0..64)
        .map(|i| {
            let x = i as f32;
            -((x - 17.0) / 12.0).powi(2) + 0.3 * (x * 1.7).sin()
        })
        .collect();
    Tensor::new(values.as_slice(), &Device::Cpu).expect("logits")
}

fn params(temperature: f32, top_p: f32, top_k: Option<u32>, seed: u64) -> GenerateParams {
    GenerateParams {
        temperature,
        top_p,
        top_k,
        seed,
        ..GenerateParams::default()
    }
}

fn draw(params: &GenerateParams, n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(params).expect("sampler");
    let logits = logits();
    (0..n)
        .map(|_| sampler.sample(&logits).expect("sample"))
        .collect()
}

fn argmax() -> u32 {
    let values: Vec<f32> = logits().to_vec1().expect("vec");
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn temperature_zero_is_the_argmax() {
    let sampler = Sampler::new(&params(0.0, 0.9, Some(40), 7)).expect("sampler");
    assert!(sampler.is_greedy());
    assert!(
        draw(&params(0.0, 0.9, Some(40), 7), 20)
            .iter()
            .all(|&t| t == argmax())
    );
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    for p in [
        params(1.0, 1.0, None, 42),
        params(0.8, 0.9, None, 42),
        params(1.2, 0.95, Some(10), 42),
    ] {
        let a = draw(&p, 200);
        assert_eq!(a, draw(&p, 200), "{p:?}");
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 3,
            "sampling should not collapse to few tokens: {distinct:?}"
        );
    }
}

#[test]
fn different_seeds_give_different_tokens() {
    let a = draw(&params(1.0, 1.0, None, 1), 200);
    let b = draw(&params(1.0, 1.0, None, 2), 200);
    assert_ne!(a, b);
}

#[test]
fn top_k_one_is_greedy() {
    assert!(
        draw(&params(1.5, 1.0, Some(1), 3), 50)
            .iter()
            .all(|&t| t == argmax())
    );
}

#[test]
fn top_k_keeps_only_the_k_most_likely_tokens() {
    let values: Vec<f32> = logits().to_vec1().expect("vec");
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let top: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    let drawn = draw(&params(2.0, 1.0, Some(5), 9), 300);
    assert!(
        drawn.iter().all(|t| top.contains(t)),
        "{drawn:?} not within {top:?}"
    );
    let distinct: std::collections::BTreeSet<_> = drawn.iter().collect();
    assert!(distinct.len() > 1);
}

#[test]
fn a_tiny_top_p_keeps_only_the_most_likely_token() {
    assert!(
        draw(&params(1.0, 1e-6, None, 5), 50)
            .iter()
            .all(|&t| t == argmax())
    );
    assert!(
        draw(&params(1.0, 0.0, None, 5), 10)
            .iter()
            .all(|&t| t == argmax())
    );
}

#[test]
fn invalid_parameters_are_refused() {
    for p in [
        params(-0.5, 1.0, None, 0),
        params(f32::INFINITY, 1.0, None, 0),
        params(1.0, 2.0, None, 0),
    ] {
        assert!(
            matches!(Sampler::new(&p), Err(EngineError::InvalidRequest(_))),
            "{p:?}"
        );
    }
}

#[test]
fn empty_logits_are_an_error_not_a_panic() {
    let mut sampler = Sampler::new(&params(1.0, 1.0, None, 0)).expect("sampler");
    let empty = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).expect("tensor");
    assert!(matches!(
        sampler.sample(&empty),
        Err(EngineError::Generate(_))
    ));
}
