//! Samplers of a flow-matching model ([`crate::schedule::flow`]): the probability-flow ODE
//! `dx/dt = v(x, t)` integrated from pure noise at `t = 1` to the image at `t = 0` over the
//! times of [`sampling_times`], by Euler's method or by Heun's (Liu et al. 2022, "Flow
//! Straight and Fast", section 2.1; Esser et al. 2024, SD3, section 2; the Heun layout as in
//! Karras et al. 2022, Algorithm 1, and diffusers' `FlowMatchHeunDiscreteScheduler`).
//!
//! The state is the flow state `x_t` itself, shown to the model as it is, at model time
//! `t T` ([`model_time`]). Euler visits each time once. Heun visits every time but the first
//! and the last twice (`K` steps make `2K - 1` model evaluations): even positions take an
//! Euler step and remember it, odd positions correct it with the average of both slopes; the
//! last step, to `t = 0`, is a plain Euler step.

use super::{NoiseSource, Sampler};
use crate::schedule::flow::{model_time, sampling_times, scales};
use anyhow::{Result, bail};
use burn::tensor::Tensor;

/// Options of the flow samplers.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowOptions {
    /// Integration steps (Heun evaluates the model `2 steps - 1` times).
    pub steps: usize,
    /// Second order (Heun) rather than first (Euler).
    pub heun: bool,
    /// Time shift of [`sampling_times`] (1: even times).
    pub shift: f64,
    /// Euler only: the share of fresh noise in each step's state, 0 to 1 (0: the ODE).
    pub eta: f64,
}

/// The first half of a Heun step, kept for the correction.
struct Pending {
    x: Tensor<4>,
    slope: Tensor<4>,
    dt: f64,
}

/// Euler or Heun in flow time.
pub struct FlowSampler {
    heun: bool,
    eta: f64,
    /// Model times of the positions.
    timesteps: Vec<f64>,
    /// Flow time of the state before each position, and after the last (`t = 0`).
    times: Vec<f64>,
    pending: Option<Pending>,
}

impl FlowSampler {
    /// A sampler over a model trained with `train_steps` steps `T`.
    pub fn new(train_steps: usize, opts: FlowOptions) -> Result<Self> {
        super::check_steps(train_steps, opts.steps)?;
        if !(opts.shift.is_finite() && opts.shift > 0.0) {
            bail!("the flow time shift must be positive (got {})", opts.shift);
        }
        if !(0.0..=1.0).contains(&opts.eta) {
            bail!("--eta must be between 0 and 1 (got {})", opts.eta);
        }
        if opts.heun && opts.eta != 0.0 {
            bail!(
                "--eta (fresh noise in each step) is an option of euler on a flow model, not of heun"
            );
        }
        let t = sampling_times(opts.steps, opts.shift);
        let mut times = vec![t[0]];
        if opts.heun {
            for &tk in &t[1..opts.steps] {
                times.extend([tk, tk]);
            }
        } else {
            times.extend(&t[1..opts.steps]);
        }
        let timesteps = times.iter().map(|&t| model_time(t, train_steps)).collect();
        times.push(0.0);
        Ok(Self {
            heun: opts.heun,
            eta: opts.eta,
            timesteps,
            times,
            pending: None,
        })
    }

    /// Whether position `i` starts a step rather than correcting one.
    fn first_order(&self, i: usize) -> bool {
        !self.heun || i.is_multiple_of(2)
    }
}

impl Sampler for FlowSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `(1 - t, t)` at the position's flow time.
    fn state_scales(&self, i: usize) -> (f64, f64) {
        scales(self.times[i])
    }

    fn starts_step(&self, i: usize) -> bool {
        self.first_order(i)
    }

    /// Euler (and Heun's predictor, even `i`): `x' = x + (t' - t) v(x, t)`.
    /// Heun's corrector (odd `i`, at `x'` and `t'`): `x_next = x + (t' - t) (v + v') / 2`.
    ///
    /// Euler with `eta > 0`: the Euler step is `x' = (1 - t') x0 + t' eps` with the estimates
    /// `x0 = x - t v` and `eps = x + (1 - t) v`; `eta` replaces part of `eps` by fresh noise
    /// `z`, `x' = (1 - t') x0 + t' (sqrt(1 - eta^2) eps + eta z)`, which keeps the state's
    /// variance (as DDIM's `eta` does, Song et al. 2021, eq. 12). `eta = 1` is the multistep
    /// sampler of consistency models (Song et al. 2023, Algorithm 1) in flow time.
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        if i == 0 {
            self.pending = None;
        }
        let (t, t_next) = (self.times[i], self.times[i + 1]);
        if self.eta > 0.0 && t_next > 0.0 {
            let x0 = x.clone() - model_out.clone() * (t as f32);
            let eps = x.clone() + model_out * ((1.0 - t) as f32);
            let z = noise.normal(x.dims(), &x.device());
            let keep = (1.0 - self.eta * self.eta).sqrt();
            let mixed = eps * (keep as f32) + z * (self.eta as f32);
            return x0 * ((1.0 - t_next) as f32) + mixed * (t_next as f32);
        }
        match self.pending.take().filter(|_| !self.first_order(i)) {
            None => {
                let dt = self.times[i + 1] - self.times[i];
                let moved = x.clone() + model_out.clone() * (dt as f32);
                if self.heun && i + 1 < self.timesteps.len() {
                    self.pending = Some(Pending {
                        x,
                        slope: model_out,
                        dt,
                    });
                }
                moved
            }
            Some(p) => p.x + (p.slope + model_out) * ((p.dt / 2.0) as f32),
        }
    }
}
