//! DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"): deterministic at `eta = 0`,
//! DDPM-like at `eta = 1`, with the timestep spacings and options of diffusers'
//! `DDIMScheduler` (`timestep_spacing`, `steps_offset`, `set_alpha_to_one`, `clip_sample`).

use super::{NoiseSource, Sampler, X0Clamp};
use crate::schedule::{NoiseSchedule, Prediction};
use anyhow::{Result, bail};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// How `K` inference timesteps are chosen among `T` (Lin et al. 2024, "Common Diffusion Noise
/// Schedules and Sample Steps are Flawed", table 2; names as in diffusers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSpacing {
    /// `t_i = i * floor(T/K) + steps_offset`, descending (DDIM's original choice).
    Leading,
    /// `t_i = round(T - i * T/K) - 1`: always starts at `T - 1`.
    Trailing,
    /// `round(linspace(0, T-1, K))`, descending.
    Linspace,
}

impl std::str::FromStr for TimestepSpacing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "leading" => Self::Leading,
            "trailing" => Self::Trailing,
            "linspace" => Self::Linspace,
            other => {
                bail!("unknown timestep spacing '{other}' (expected leading, trailing or linspace)")
            }
        })
    }
}

/// `K` timesteps out of `T`, descending, as diffusers' `set_timesteps` computes them (numpy's
/// rounding: halves to even).
pub fn spaced_timesteps(t: usize, k: usize, spacing: TimestepSpacing, offset: usize) -> Vec<usize> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = t / k;
            (0..k).rev().map(|i| i * ratio + offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / k as f64;
            (0..k)
                .map(|i| {
                    ((t as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                })
                .collect()
        }
        TimestepSpacing::Linspace => (0..k)
            .rev()
            .map(|i| {
                if k == 1 {
                    0
                } else {
                    (i as f64 * ((t - 1) as f64 / (k - 1) as f64)).round_ties_even() as usize
                }
            })
            .collect(),
    }
}

/// Options of the DDIM sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimOptions {
    pub steps: usize,
    /// Noise weight: 0 deterministic (DDIM), 1 the DDPM posterior variance.
    pub eta: f64,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// `alpha_bar` after the last step: 1 (`true`) or `alpha_bar_0`.
    pub set_alpha_to_one: bool,
    /// What is done to `x0_hat`: clipping or dynamic thresholding.
    pub clamp: X0Clamp,
}

impl Default for DdimOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            eta: 0.0,
            spacing: TimestepSpacing::Trailing,
            steps_offset: 0,
            set_alpha_to_one: true,
            clamp: X0Clamp::Clip(1.0),
        }
    }
}

/// The DDIM sampler.
pub struct DdimSampler {
    schedule: NoiseSchedule,
    prediction: Prediction,
    opts: DdimOptions,
    timesteps: Vec<usize>,
    /// `timesteps` as the model sees them.
    model_t: Vec<f64>,
}

impl DdimSampler {
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        opts: DdimOptions,
    ) -> Result<Self> {
        let t = schedule.len();
        super::check_steps(t, opts.steps)?;
        if !(0.0..=1.0).contains(&opts.eta) {
            bail!("--eta must be in [0, 1] (got {})", opts.eta);
        }
        let timesteps = spaced_timesteps(t, opts.steps, opts.spacing, opts.steps_offset);
        let model_t: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        super::check_offset(&model_t, t, opts.steps_offset)?;
        Ok(Self {
            schedule: schedule.clone(),
            prediction,
            opts,
            model_t,
            timesteps,
        })
    }

    /// `alpha_bar` of the step after `t`, `t - floor(T/K)` as in diffusers.
    fn alpha_bar_prev(&self, t: usize) -> f64 {
        let jump = self.schedule.len() / self.opts.steps;
        match t.checked_sub(jump) {
            Some(p) => self.schedule.alphas_cumprod[p],
            None if self.opts.set_alpha_to_one => 1.0,
            None => self.schedule.alphas_cumprod[0],
        }
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[f64] {
        &self.model_t
    }

    /// Before position 0, `x_t` at the first timestep; after the update at `i - 1`, `x` at
    /// that step's `alpha_bar_prev` (eq. 12).
    fn state_scales(&self, i: usize) -> (f64, f64) {
        let ab = match i {
            0 => self.schedule.alphas_cumprod[self.timesteps[0]],
            _ => self.alpha_bar_prev(self.timesteps[i - 1]),
        };
        (ab.sqrt(), (1.0 - ab).max(0.0).sqrt())
    }

    /// DDIM, eq. 12: `x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat
    /// + sigma z`, with `sigma = eta sqrt((1 - ab_prev)/(1 - ab) (1 - ab/ab_prev))` (eq. 16).
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        let t = self.timesteps[i];
        let n = x.dims()[0];
        let (x0, eps) = self
            .schedule
            .split_prediction(self.prediction, x, model_out, &vec![t; n]);
        let x0 = self.opts.clamp.apply(x0);
        let ab = self.schedule.alphas_cumprod[t];
        let ab_prev = self.alpha_bar_prev(t);
        let var = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev);
        let sigma = self.opts.eta * var.max(0.0).sqrt();
        let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
        let out = x0 * (ab_prev.sqrt() as f32) + eps * (dir as f32);
        super::add_noise(out, sigma, noise)
    }
}
