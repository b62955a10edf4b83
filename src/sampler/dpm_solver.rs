//! DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in data
//! prediction form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models", Algorithm 2), with the timestep choices of diffusers'
//! `DPMSolverMultistepScheduler` (`algorithm_type = "dpmsolver++"`, `solver_order = 2`,
//! `solver_type = "midpoint"`, `final_sigmas_type = "zero"`).
//!
//! The state is `x_t` itself. With `sigma = sqrt((1 - ab) / ab)`: `alpha_t = 1 / sqrt(sigma^2 + 1)`,
//! `sigma_t = sigma alpha_t`, and half-log-SNR `lambda = ln(alpha_t / sigma_t) = -ln(sigma)`.

use super::sigmas::{TrainSigmas, as_f32, karras_sigmas};
use super::{NoiseSource, Sampler, X0Clamp};
use crate::schedule::TimestepSpacing;
use crate::schedule::{NoiseSchedule, Prediction};
use anyhow::Result;
use burn::tensor::Tensor;

/// Options of DPM-Solver++(2M).
#[derive(Clone, Debug, PartialEq)]
pub struct DpmSolverOptions {
    pub steps: usize,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// Karras sigmas (EDM, eq. 5) over the whole training range.
    pub karras: bool,
    /// Round the timesteps of Karras sigmas to integers (diffusers does, except for
    /// `squaredcos_cap_v2`).
    pub round_karras_timesteps: bool,
    /// diffusers' `lower_order_final` (a first-order last step below 15 steps). With the final
    /// noise level 0 (`final_sigmas_type = "zero"`, the only one supported) the last step is
    /// first order anyway (it lands on `x0_hat`), so for the 2M solver this changes nothing;
    /// it is kept so that configs read the same.
    pub lower_order_final: bool,
    /// What is done to `x0_hat`: only dynamic thresholding applies here, as in diffusers.
    pub clamp: X0Clamp,
}

impl Default for DpmSolverOptions {
    fn default() -> Self {
        Self {
            steps: 20,
            spacing: TimestepSpacing::Trailing,
            steps_offset: 0,
            karras: false,
            round_karras_timesteps: true,
            lower_order_final: true,
            clamp: X0Clamp::None,
        }
    }
}

/// Model timesteps of DPM-Solver as diffusers spaces them: `K + 1` points, the last dropped.
pub fn dpm_timesteps(t: usize, k: usize, spacing: TimestepSpacing, offset: usize) -> Vec<usize> {
    match spacing {
        TimestepSpacing::Linspace => (1..=k)
            .rev()
            .map(|i| (i as f64 * (t - 1) as f64 / k as f64).round_ties_even() as usize)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / (k + 1);
            (1..=k).rev().map(|i| i * ratio + offset).collect()
        }
        TimestepSpacing::Trailing => crate::schedule::spaced_timesteps(t, k, spacing, offset),
    }
}

/// The DPM-Solver++(2M) sampler.
pub struct DpmSolverSampler {
    prediction: Prediction,
    opts: DpmSolverOptions,
    timesteps: Vec<f64>,
    /// Noise level per visited timestep, then a final 0.
    sigmas: Vec<f64>,
    /// `x0_hat` of the previous position.
    prev_x0: Option<Tensor<4>>,
}

/// `(alpha_t, sigma_t, lambda)` of a noise level `sigma > 0`.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * a;
    (a, s, a.ln() - s.ln())
}

impl DpmSolverSampler {
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        opts: DpmSolverOptions,
    ) -> Result<Self> {
        let t = schedule.len();
        super::check_steps(t, opts.steps)?;
        if opts.spacing == TimestepSpacing::Leading && t / (opts.steps + 1) == 0 {
            anyhow::bail!(
                "leading spacing gives DPM-Solver at most {} steps (got {})",
                t - 1,
                opts.steps
            );
        }
        let mut ts: Vec<f64> = dpm_timesteps(t, opts.steps, opts.spacing, opts.steps_offset)
            .into_iter()
            .map(|v| v as f64)
            .collect();
        // Rounding can repeat a timestep when steps come close to T; a repeated noise level
        // would make the step size h zero, so each is visited once.
        ts.dedup();
        super::check_offset(&ts, t, opts.steps_offset)?;
        let table = TrainSigmas::new(schedule);
        let (timesteps, mut sigmas) = if opts.karras {
            let (lo, hi) = (table.sigmas[0], table.sigmas[t - 1]);
            let k = karras_sigmas(lo, hi, opts.steps);
            let round = |v: f64| {
                if opts.round_karras_timesteps {
                    v.round_ties_even()
                } else {
                    v as f32 as f64
                }
            };
            let mut pairs: Vec<(f64, f64)> =
                k.iter().map(|&s| (round(table.sigma_to_t(s)), s)).collect();
            pairs.dedup_by(|a, b| a.1 == b.1);
            pairs.into_iter().unzip()
        } else {
            let s: Vec<f64> = ts.iter().map(|&v| table.at(v)).collect();
            (ts, s)
        };
        sigmas.push(0.0);
        Ok(Self {
            prediction,
            opts,
            timesteps,
            sigmas: as_f32(&sigmas),
            prev_x0: None,
        })
    }

    /// `x0_hat` from the model output at noise level `sigma` (DPM-Solver++, section 4).
    fn x0(&self, x: Tensor<4>, out: Tensor<4>, sigma: f64) -> Tensor<4> {
        let (a, s, _) = alpha_sigma_lambda(sigma);
        let x0 = crate::schedule::prediction::x0(self.prediction, x, out, a as f32, s as f32);
        self.opts.clamp.apply(x0)
    }
}

impl Sampler for DpmSolverSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn state_scales(&self, i: usize) -> (f64, f64) {
        match self.sigmas[i] {
            0.0 => (1.0, 0.0),
            s => {
                let (a, s, _) = alpha_sigma_lambda(s);
                (a, s)
            }
        }
    }

    /// First order (DPM-Solver++, eq. 9; DDIM): `h = lambda' - lambda`,
    /// `x' = (sigma'_t / sigma_t) x - alpha'_t (e^{-h} - 1) x0_hat`.
    /// Second order from the previous `x0_hat` (Algorithm 2): `r = h_prev / h`,
    /// `D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev`, used in place of `x0_hat`.
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        _noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        if i == 0 {
            self.prev_x0 = None;
        }
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = self.x0(x.clone(), model_out, s);
        let prev = self.prev_x0.replace(x0.clone());
        if s_next == 0.0 {
            // lambda' = inf: the step lands on x0_hat.
            return x0;
        }
        // The last step ends at sigma 0 and returned above, so `lower_order_final` (a
        // first-order last step) needs no case of its own.
        let (_, st, l) = alpha_sigma_lambda(s);
        let (a_n, st_n, l_n) = alpha_sigma_lambda(s_next);
        let h = l_n - l;
        let em1 = (-h).exp() - 1.0;
        let d = match prev {
            Some(x0_prev) if i > 0 => {
                let (_, _, l_p) = alpha_sigma_lambda(self.sigmas[i - 1]);
                let r = (l - l_p) / h;
                let c = 0.5 / r;
                x0.clone() * ((1.0 + c) as f32) - x0_prev * (c as f32)
            }
            _ => x0,
        };
        x * ((st_n / st) as f32) - d * ((a_n * em1) as f32)
    }
}
