//! DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"): deterministic at `eta = 0`,
//! DDPM-like at `eta = 1`, with the timestep spacings and options of diffusers'
//! `DDIMScheduler` (`timestep_spacing`, `steps_offset`, `set_alpha_to_one`, `clip_sample`).

use super::{NoiseSource, Sampler, X0Clamp};
use crate::schedule::{NoiseSchedule, Prediction, TimestepSpacing, spaced_timesteps};
use anyhow::{Result, bail};
use burn::tensor::Tensor;

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
