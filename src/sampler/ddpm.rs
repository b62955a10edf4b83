//! The DDPM ancestral sampler (Ho et al. 2020, Algorithm 2), over all `T` steps or a spaced
//! subset of them (Nichol & Dhariwal 2021, "Improved DDPM", section 4), as diffusers'
//! `DDPMScheduler` runs it.

use super::{NoiseSource, Sampler, X0Clamp};
use crate::schedule::{NoiseSchedule, Prediction};
use crate::schedule::{TimestepSpacing, spaced_timesteps};
use anyhow::Result;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Variance of the reverse step `p(x_{t-1} | x_t)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VarianceType {
    /// `sigma_t^2 = beta_tilde_t`, the posterior variance (DDPM, section 3.2; lower bound).
    #[value(aliases = ["fixed_small", "small"])]
    FixedSmall,
    /// `sigma_t^2 = beta_t` (DDPM, section 3.2; upper bound).
    #[value(aliases = ["fixed_large", "large"])]
    FixedLarge,
}

impl std::str::FromStr for VarianceType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        crate::schedule::parse_named(s, "variance")
    }
}

/// Options of the DDPM sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct DdpmOptions {
    pub steps: usize,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub variance: VarianceType,
    /// What is done to `x0_hat` (DDPM clips it to `[-1, 1]`).
    pub clamp: X0Clamp,
}

impl Default for DdpmOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            spacing: TimestepSpacing::Trailing,
            steps_offset: 0,
            variance: VarianceType::FixedSmall,
            clamp: X0Clamp::Clip(1.0),
        }
    }
}

/// Per-step coefficients of the (respaced) reverse process, in f64 before casting.
#[derive(Clone, Debug)]
struct StepCoef {
    /// Coefficient of `x0_hat` in the posterior mean: `beta'_t sqrt(ab_prev) / (1 - ab_t)`.
    c_x0: f64,
    /// Coefficient of `x_t`: `(1 - ab_prev) sqrt(alpha'_t) / (1 - ab_t)` (DDPM, eq. 7).
    c_xt: f64,
    /// Standard deviation of the added noise.
    sigma: f64,
}

/// DDPM ancestral sampling.
pub struct DdpmSampler {
    schedule: NoiseSchedule,
    prediction: Prediction,
    clamp: X0Clamp,
    timesteps: Vec<usize>,
    /// `timesteps` as the model sees them.
    model_t: Vec<f64>,
    coefs: Vec<StepCoef>,
}

impl DdpmSampler {
    /// A sampler over `steps` spaced timesteps (`steps = T` is the original DDPM). Between
    /// consecutive kept timesteps, `alpha'_t = ab_t / ab_prev` and `beta'_t = 1 - alpha'_t`.
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        opts: DdpmOptions,
    ) -> Result<Self> {
        let t = schedule.len();
        super::check_steps(t, opts.steps)?;
        let timesteps = spaced_timesteps(t, opts.steps, opts.spacing, opts.steps_offset);
        let model_t: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        super::check_offset(&model_t, t, opts.steps_offset)?;
        let coefs = timesteps
            .iter()
            .enumerate()
            .map(|(i, &ti)| {
                let ab = schedule.alphas_cumprod[ti];
                let ab_prev = timesteps
                    .get(i + 1)
                    .map(|&p| schedule.alphas_cumprod[p])
                    .unwrap_or(1.0);
                let alpha = ab / ab_prev;
                let beta = 1.0 - alpha;
                let var = match opts.variance {
                    VarianceType::FixedSmall => ((1.0 - ab_prev) / (1.0 - ab) * beta).max(1e-20),
                    VarianceType::FixedLarge => beta,
                };
                StepCoef {
                    c_x0: beta * ab_prev.sqrt() / (1.0 - ab),
                    c_xt: (1.0 - ab_prev) * alpha.sqrt() / (1.0 - ab),
                    // As diffusers: no noise at t = 0 only.
                    sigma: if ti == 0 { 0.0 } else { var.max(0.0).sqrt() },
                }
            })
            .collect();
        Ok(Self {
            schedule: schedule.clone(),
            prediction,
            clamp: opts.clamp,
            model_t,
            timesteps,
            coefs,
        })
    }
}

impl Sampler for DdpmSampler {
    fn timesteps(&self) -> &[f64] {
        &self.model_t
    }

    fn state_scales(&self, i: usize) -> (f64, f64) {
        let ab = self
            .timesteps
            .get(i)
            .map_or(1.0, |&t| self.schedule.alphas_cumprod[t]);
        (ab.sqrt(), (1.0 - ab).max(0.0).sqrt())
    }

    /// `x_{prev} = c_x0 x0_hat + c_xt x_t + sigma z` (DDPM, eqs. 6-7), `x0_hat` clamped.
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        let t = self.timesteps[i];
        let n = x.dims()[0];
        let (x0, _) =
            self.schedule
                .split_prediction(self.prediction, x.clone(), model_out, &vec![t; n]);
        let x0 = self.clamp.apply(x0);
        let c = &self.coefs[i];
        let mean = x0 * (c.c_x0 as f32) + x * (c.c_xt as f32);
        super::add_noise(mean, c.sigma, noise)
    }
}
