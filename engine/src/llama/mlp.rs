//! [`Mlp`]: one block's SwiGLU feed-forward network, `down(silu(gate(x)) * up(x))`.
//!
//! Gate and up read the same input and are fused into one matmul when that is exact (see
//! [`Projection`]).

use std::io::{Read, Seek};

use super::linear::Linear;
use candle_core::{Module, Tensor};

use super::config::LlamaConfig;
use super::error::Result;
use super::projection::Projection;
use super::weights::WeightReader;

/// Feed-forward network of one transformer block.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: Projection,
    down: Linear,
}

impl Mlp {
    /// Loads `blk.{layer}.ffn_{gate,up,down}.weight`.
    pub fn load<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        config: &LlamaConfig,
        layer: usize,
        fuse: bool,
    ) -> Result<Self> {
        let gate = format!("blk.{layer}.ffn_gate.weight");
        let up = format!("blk.{layer}.ffn_up.weight");
        let parts = [(gate.as_str(), config.n_ff), (up.as_str(), config.n_ff)];
        let gate_up = Projection::load(weights, &parts, config.n_embd, fuse)?;
        let down = Linear::load(
            weights,
            &format!("blk.{layer}.ffn_down.weight"),
            config.n_embd,
            config.n_ff,
        )?;
        Ok(Self { gate_up, down })
    }

    /// Applies the network to `x` (`[.., n_embd]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut gate_up = self.gate_up.forward(x)?.into_iter();
        let (Some(gate), Some(up)) = (gate_up.next(), gate_up.next()) else {
            return Err(candle_core::Error::Msg(
                "the gate/up projection returned fewer than two tensors".into(),
            )
            .into());
        };
        let hidden = (candle_nn::ops::silu(&gate)? * up)?;
        Ok(self.down.forward(&hidden)?)
    }
}
