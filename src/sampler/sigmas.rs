//! Noise levels in sigma space, shared by the samplers that work there (Euler, Heun,
//! DPM-Solver). With `x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`, the rescaled state
//! `x_t / sqrt(ab) = x0 + sigma eps` has `sigma_t = sqrt((1 - ab_t) / ab_t)` (Karras et al. 2022,
//! "Elucidating the Design Space of Diffusion-Based Generative Models", EDM, table 1, "VP").

use crate::schedule::NoiseSchedule;
use crate::schedule::TimestepSpacing;
use burn::tensor::Tensor;

/// `sigma_t` for every training timestep, with its logarithm for interpolation.
#[derive(Clone, Debug)]
pub struct TrainSigmas {
    pub sigmas: Vec<f64>,
    pub log_sigmas: Vec<f64>,
}

impl TrainSigmas {
    /// `sigma_t = sqrt((1 - ab_t) / ab_t)`, computed from f32 `alpha_bar` as diffusers does
    /// (its schedulers keep `alphas_cumprod` in f32). A terminal `ab = 0` (zero-SNR rescaling)
    /// becomes `2^-24`, as in diffusers, so that `sigma_max` stays finite.
    pub fn new(schedule: &NoiseSchedule) -> Self {
        let sigmas: Vec<f64> = schedule
            .alphas_cumprod
            .iter()
            .map(|&a| {
                let a = if a > 0.0 { a as f32 } else { 2f32.powi(-24) };
                ((1.0 - a) / a).sqrt() as f64
            })
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self { sigmas, log_sigmas }
    }

    /// `sigma` at a possibly fractional timestep, linear between integer timesteps (numpy's
    /// `interp`).
    pub fn at(&self, t: f64) -> f64 {
        let n = self.sigmas.len();
        let t = t.clamp(0.0, (n - 1) as f64);
        let lo = t.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let f = t - lo as f64;
        self.sigmas[lo] * (1.0 - f) + self.sigmas[hi] * f
    }

    /// The (fractional) timestep of a noise level: linear interpolation of `log sigma` between
    /// the two neighbouring training timesteps, clamped to the table (diffusers' `_sigma_to_t`).
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let ls = sigma.max(1e-10).ln();
        let n = self.log_sigmas.len();
        if n < 2 {
            return 0.0;
        }
        // The last timestep whose log sigma is at most `ls`, by bisection: sigma grows with t
        // (alpha_bar falls), and a linear scan per call made Karras sigmas over a long
        // schedule quadratic (100,000 steps of T = 100,000 did not finish).
        let low = self
            .log_sigmas
            .partition_point(|&l| ls - l >= 0.0)
            .saturating_sub(1)
            .min(n - 2);
        let (a, b) = (self.log_sigmas[low], self.log_sigmas[low + 1]);
        let w = ((a - ls) / (a - b)).clamp(0.0, 1.0);
        // A zero or infinite sigma at either end (alpha_bar of exactly 1, or zero terminal
        // SNR) makes the quotient NaN: the level then belongs to the nearer end.
        let w = if w.is_nan() {
            if ls >= b { 1.0 } else { 0.0 }
        } else {
            w
        };
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }
}

/// Karras et al. 2022 (EDM), eq. 5: `k` noise levels from `sigma_max` down to `sigma_min`,
/// `sigma_i = (sigma_max^(1/rho) + i/(k-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`,
/// `rho = 7`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, k: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..k)
        .map(|i| {
            let r = if k > 1 {
                i as f64 / (k - 1) as f64
            } else {
                0.0
            };
            (hi + r * (lo - hi)).powf(rho)
        })
        .collect()
}

/// Rounds each value through f32, as diffusers stores its sigma tables.
pub fn as_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&s| s as f32 as f64).collect()
}

/// The standard deviation of the starting state `x_T / sqrt(ab_T)`: the largest sigma, or
/// `sqrt(sigma_max^2 + 1)` for leading spacing, as diffusers' sigma-space schedulers have it.
pub fn init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().cloned().fold(0.0, f64::max);
    match spacing {
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        _ => max,
    }
}

/// What the denoiser sees of a sigma-space state: `x / sqrt(sigma^2 + 1) = x_t`.
pub fn model_input(x: Tensor<4>, sigma: f64) -> Tensor<4> {
    x / ((sigma * sigma + 1.0).sqrt() as f32)
}
