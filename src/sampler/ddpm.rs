//! The DDPM ancestral sampler (Ho et al. 2020, Algorithm 2), over all `T` steps or an evenly
//! respaced subset of them (Nichol & Dhariwal 2021, "Improved DDPM", section 4).

use super::Sampler;
use crate::schedule::{NoiseSchedule, Prediction};
use anyhow::{Result, bail};
use burn::tensor::Tensor;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Variance of the reverse step `p(x_{t-1} | x_t)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VarianceType {
    /// `sigma_t^2 = beta_tilde_t`, the posterior variance (DDPM, section 3.2; lower bound).
    FixedSmall,
    /// `sigma_t^2 = beta_t` (DDPM, section 3.2; upper bound).
    FixedLarge,
}

impl std::str::FromStr for VarianceType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "fixed-small" | "fixed_small" | "small" => Self::FixedSmall,
            "fixed-large" | "fixed_large" | "large" => Self::FixedLarge,
            other => bail!("unknown variance '{other}' (expected fixed-small or fixed-large)"),
        })
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
    timesteps: Vec<usize>,
    /// `timesteps` as the model sees them.
    model_t: Vec<f64>,
    coefs: Vec<StepCoef>,
    clip: bool,
}

/// `k` timesteps evenly spread over `0..t` (both ends included), descending.
pub fn respaced_timesteps(t: usize, k: usize) -> Vec<usize> {
    if k == 1 {
        return vec![t - 1];
    }
    let mut v: Vec<usize> = (0..k)
        .map(|i| ((i as f64) * (t - 1) as f64 / (k - 1) as f64).round() as usize)
        .collect();
    v.dedup();
    v.reverse();
    v
}

impl DdpmSampler {
    /// A sampler over `steps` evenly respaced timesteps (`steps = T` is the original DDPM).
    /// With respacing, `alpha'_t = ab_t / ab_prev` between consecutive kept timesteps.
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        variance: VarianceType,
        steps: usize,
        clip: bool,
    ) -> Result<Self> {
        let t = schedule.len();
        super::check_steps(t, steps)?;
        let timesteps = respaced_timesteps(t, steps);
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
                let last = i + 1 == timesteps.len();
                let var = match variance {
                    VarianceType::FixedSmall => (1.0 - ab_prev) / (1.0 - ab) * beta,
                    VarianceType::FixedLarge => beta,
                };
                StepCoef {
                    c_x0: beta * ab_prev.sqrt() / (1.0 - ab),
                    c_xt: (1.0 - ab_prev) * alpha.sqrt() / (1.0 - ab),
                    sigma: if last { 0.0 } else { var.max(0.0).sqrt() },
                }
            })
            .collect();
        Ok(Self {
            schedule: schedule.clone(),
            prediction,
            model_t: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            coefs,
            clip,
        })
    }
}

impl Sampler for DdpmSampler {
    fn timesteps(&self) -> &[f64] {
        &self.model_t
    }

    /// `x_{prev} = c_x0 x0_hat + c_xt x_t + sigma z`, `x0_hat` clipped to `[-1, 1]`.
    fn step(
        &self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        rng: &mut ChaCha8Rng,
    ) -> Tensor<4> {
        let t = self.timesteps[i];
        let n = x.dims()[0];
        let (x0, _) =
            self.schedule
                .split_prediction(self.prediction, x.clone(), model_out, &vec![t; n]);
        let x0 = if self.clip { x0.clamp(-1.0, 1.0) } else { x0 };
        let c = &self.coefs[i];
        let mean = x0 * (c.c_x0 as f32) + x * (c.c_xt as f32);
        super::add_noise(mean, c.sigma, rng)
    }
}
