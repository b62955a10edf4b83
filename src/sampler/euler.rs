//! Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022, "Elucidating the
//! Design Space of Diffusion-Based Generative Models", EDM, Algorithm 1 with one evaluation per
//! step), with the timestep spacings of diffusers' `EulerDiscreteScheduler`.
//!
//! The state is `x = x_t / sqrt(alpha_bar_t) = x0 + sigma eps`, `sigma_t = sqrt((1 - ab) / ab)`;
//! the denoiser sees `x / sqrt(sigma^2 + 1) = x_t`.

use super::sigmas::{self, TrainSigmas, as_f32, karras_sigmas};
use super::{NoiseSource, Sampler};
use crate::schedule::TimestepSpacing;
use crate::schedule::prediction::x0_in_sigma_space;
use crate::schedule::{NoiseSchedule, Prediction};
use anyhow::Result;
use burn::tensor::Tensor;

/// Options of the Euler samplers.
#[derive(Clone, Debug, PartialEq)]
pub struct EulerOptions {
    pub steps: usize,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// Ancestral: after each deterministic step, add fresh noise (`sigma_up`, k-diffusion's
    /// `get_ancestral_step`), as diffusers' `EulerAncestralDiscreteScheduler`.
    pub ancestral: bool,
    /// Karras sigmas: the spaced noise levels replaced by [`karras_sigmas`] between the
    /// smallest and largest of them (diffusers' `use_karras_sigmas`; not with `ancestral`).
    pub karras: bool,
}

impl Default for EulerOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            spacing: TimestepSpacing::Trailing,
            steps_offset: 0,
            ancestral: false,
            karras: false,
        }
    }
}

/// The Euler sampler.
pub struct EulerSampler {
    prediction: Prediction,
    opts: EulerOptions,
    timesteps: Vec<f64>,
    /// `sigma` at each visited timestep, then a final 0.
    sigmas: Vec<f64>,
}

/// Model timesteps as diffusers' Euler scheduler spaces them (`linspace` is not rounded). One
/// linspace step is `T - 1` here (numpy's `linspace(0, T-1, 1)` would give 0: a single step
/// from pure noise must start at the noisiest timestep).
pub fn euler_timesteps(t: usize, k: usize, spacing: TimestepSpacing, offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let step = if k > 1 {
                (t - 1) as f64 / (k - 1) as f64
            } else {
                0.0
            };
            let at = |i: usize| {
                if i + 1 == k {
                    (t - 1) as f64
                } else {
                    i as f64 * step
                }
            };
            (0..k).rev().map(|i| at(i) as f32 as f64).collect()
        }
        other => crate::schedule::spaced_timesteps(t, k, other, offset)
            .into_iter()
            .map(|v| v as f64)
            .collect(),
    }
}

/// Spacing options shared by the sigma-space samplers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spacing {
    pub steps: usize,
    pub spacing: TimestepSpacing,
    pub offset: usize,
}

fn opts_spacing(o: &EulerOptions) -> Spacing {
    Spacing {
        steps: o.steps,
        spacing: o.spacing,
        offset: o.steps_offset,
    }
}

/// The visited model timesteps and their noise levels (without the final 0), as diffusers'
/// Euler and Heun schedulers compute them: spaced timesteps with interpolated sigmas, or with
/// `karras`, Karras sigmas between the smallest and largest spaced sigma and the timesteps
/// they map back to.
pub(crate) fn sigma_steps(
    schedule: &NoiseSchedule,
    s: &Spacing,
    karras: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let t = schedule.len();
    super::check_steps(t, s.steps)?;
    let timesteps = euler_timesteps(t, s.steps, s.spacing, s.offset);
    super::check_offset(&timesteps, t, s.offset)?;
    let table = TrainSigmas::new(schedule);
    let sigmas: Vec<f64> = timesteps.iter().map(|&ts| table.at(ts)).collect();
    if !karras {
        return Ok((timesteps, sigmas));
    }
    let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
    let k = karras_sigmas(lo, hi, s.steps);
    let ts = k
        .iter()
        .map(|&v| table.sigma_to_t(v) as f32 as f64)
        .collect();
    Ok((ts, k))
}

impl EulerSampler {
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        opts: EulerOptions,
    ) -> Result<Self> {
        let (timesteps, mut sigmas) = sigma_steps(schedule, &opts_spacing(&opts), opts.karras)?;
        sigmas.push(0.0);
        let sigmas = as_f32(&sigmas);
        Ok(Self {
            prediction,
            opts,
            timesteps,
            sigmas,
        })
    }
}

impl Sampler for EulerSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn state_scales(&self, i: usize) -> (f64, f64) {
        (1.0, self.sigmas[i])
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

    /// `x0_hat` from the model output, `d = (x - x0_hat) / sigma`, `x' = x + d (sigma' - sigma)`
    /// (EDM, Algorithm 1, Euler step). Ancestral: `sigma' = sigma_down`, then `+ sigma_up z`, with
    /// `sigma_up = sqrt(s_next^2 (s^2 - s_next^2) / s^2)`, `sigma_down = sqrt(s_next^2 - sigma_up^2)`.
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = x0_in_sigma_space(self.prediction, x.clone(), model_out, s);
        let d = (x.clone() - x0) / (s as f32);
        if self.opts.ancestral {
            let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s))
                .max(0.0)
                .sqrt();
            let down = (s_next * s_next - up * up).max(0.0).sqrt();
            let moved = x + d * ((down - s) as f32);
            super::add_noise(moved, up, noise)
        } else {
            x + d * ((s_next - s) as f32)
        }
    }
}
