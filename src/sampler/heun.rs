//! Heun's second-order sampler in sigma space (Karras et al. 2022, "Elucidating the Design
//! Space of Diffusion-Based Generative Models", EDM, Algorithm 1 with `S_churn = 0`), laid out
//! as diffusers' `HeunDiscreteScheduler` lays it out: every noise level but the first and the
//! last is visited twice, so `K` steps make `2K - 1` model evaluations. Even positions take an
//! Euler step and remember it; odd positions correct it with the average of both slopes. The
//! last step (to sigma 0) is a plain Euler step.

use super::euler::{Spacing, sigma_steps};
use super::sigmas::{self, as_f32};
use super::{NoiseSource, Sampler, X0Clamp};
use crate::schedule::TimestepSpacing;
use crate::schedule::prediction::x0_in_sigma_space;
use crate::schedule::{NoiseSchedule, Prediction};
use anyhow::Result;
use burn::tensor::Tensor;

/// Options of the Heun sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct HeunOptions {
    /// Noise levels (the model is evaluated `2 steps - 1` times).
    pub steps: usize,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// Karras sigmas (EDM, eq. 5) between the smallest and largest spaced sigma.
    pub karras: bool,
    /// What is done to `x0_hat` (diffusers' Heun knows only `clip_sample`).
    pub clamp: X0Clamp,
}

impl Default for HeunOptions {
    fn default() -> Self {
        Self {
            steps: 25,
            spacing: TimestepSpacing::Trailing,
            steps_offset: 0,
            karras: true,
            clamp: X0Clamp::None,
        }
    }
}

/// The first half of a Heun step, kept for the correction.
struct Pending {
    x: Tensor<4>,
    slope: Tensor<4>,
    dt: f64,
}

/// The Heun sampler.
pub struct HeunSampler {
    prediction: Prediction,
    opts: HeunOptions,
    /// `t_0, t_1, t_1, t_2, t_2, ...`: `2K - 1` model timesteps.
    timesteps: Vec<f64>,
    /// `s_0, s_1, s_1, ..., s_{K-1}, s_{K-1}, 0`: one more than `timesteps`.
    sigmas: Vec<f64>,
    pending: Option<Pending>,
}

impl HeunSampler {
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        opts: HeunOptions,
    ) -> Result<Self> {
        let spacing = Spacing {
            steps: opts.steps,
            spacing: opts.spacing,
            offset: opts.steps_offset,
        };
        let (ts, s) = sigma_steps(schedule, &spacing, opts.karras)?;
        let s = as_f32(&s);
        let mut timesteps = vec![ts[0]];
        let mut sigmas = vec![s[0]];
        for k in 1..ts.len() {
            timesteps.extend([ts[k], ts[k]]);
            sigmas.extend([s[k], s[k]]);
        }
        sigmas.push(0.0);
        Ok(Self {
            prediction,
            opts,
            timesteps,
            sigmas,
            pending: None,
        })
    }

    /// Whether position `i` starts a step (an Euler predictor) rather than correcting one.
    fn first_order(i: usize) -> bool {
        i.is_multiple_of(2)
    }

    /// `x0_hat` at noise level `sigma`, clamped as configured.
    fn x0(&self, x: Tensor<4>, out: Tensor<4>, sigma: f64) -> Tensor<4> {
        let x0 = x0_in_sigma_space(self.prediction, x, out, sigma);
        self.opts.clamp.apply(x0)
    }
}

impl Sampler for HeunSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn state_scales(&self, i: usize) -> (f64, f64) {
        (1.0, self.sigmas[i])
    }

    fn starts_step(&self, i: usize) -> bool {
        Self::first_order(i)
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::init_noise_sigma(&self.sigmas, self.opts.spacing)
    }

    fn scale_model_input(&self, i: usize, x: Tensor<4>) -> Tensor<4> {
        sigmas::model_input(x, self.sigmas[i])
    }

    fn to_model_space(&self, i: usize, x: Tensor<4>) -> Tensor<4> {
        self.scale_model_input(i + 1, x)
    }

    /// Predictor (even `i`): `d = (x - x0_hat(x, s)) / s`, `x' = x + d (s' - s)`.
    /// Corrector (odd `i`, at `x'` and `s'`): `d' = (x' - x0_hat(x', s')) / s'`,
    /// `x_next = x + (d + d') / 2 (s' - s)` (EDM, Algorithm 1, lines 5-8).
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        _noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        if i == 0 {
            self.pending = None;
        }
        match self.pending.take().filter(|_| !Self::first_order(i)) {
            None => {
                let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.x0(x.clone(), model_out, s);
                let slope = (x.clone() - x0) / (s as f32);
                let dt = s_next - s;
                let moved = x.clone() + slope.clone() * (dt as f32);
                if i + 1 < self.timesteps.len() {
                    self.pending = Some(Pending { x, slope, dt });
                }
                moved
            }
            Some(p) => {
                let s_next = self.sigmas[i];
                let x0 = self.x0(x.clone(), model_out, s_next);
                let slope = (x - x0) / (s_next as f32);
                p.x + (p.slope + slope) * ((p.dt / 2.0) as f32)
            }
        }
    }
}
