//! The forward (noising) process and its noise schedules.
//!
//! Every array is computed in `f64` once, from the chosen beta schedule, and only cast to `f32`
//! where a tensor needs it (as in the original DDPM code). Notation follows Ho et al. 2020
//! ("Denoising Diffusion Probabilistic Models", DDPM): `beta_t`, `alpha_t = 1 - beta_t`,
//! `alpha_bar_t = prod_{s<=t} alpha_s`. Timesteps are 0-based: `t = 0..T-1`.

pub mod flow;
pub mod prediction;
pub mod spacing;

pub use flow::FlowTime;
pub use prediction::Prediction;
pub use spacing::{TimestepSpacing, spaced_timesteps};

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// How `beta_t` grows over the `T` steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// `beta_t` evenly spaced from `beta_start` to `beta_end` (DDPM, section 4: 1e-4 to 0.02).
    Linear,
    /// `beta_t = (linspace(sqrt(beta_start), sqrt(beta_end), T))^2`, the latent-diffusion
    /// schedule (Rombach et al. 2022; diffusers' `scaled_linear`).
    #[value(alias = "scaled_linear")]
    ScaledLinear,
    /// `alpha_bar(t) = f(t)/f(0)`, `f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)`, `s = 0.008`;
    /// `beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999)` (Nichol & Dhariwal 2021,
    /// "Improved DDPM", eq. 17).
    #[value(alias = "squaredcos_cap_v2")]
    Cosine,
    /// `alpha_bar(t)` follows a scaled sigmoid from `sigmoid(-3)` to `sigmoid(3)` with
    /// temperature 1, normalised to start at 1, betas clipped at 0.999 (Chen 2023, "On the
    /// Importance of Noise Scheduling for Diffusion Models", Algorithm 1).
    Sigmoid,
}

impl std::str::FromStr for BetaSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_named(s, "schedule")
    }
}

/// A value of a closed set by its [`clap::ValueEnum`] name or alias (exact case, as in
/// diffusers' configs): the one name table of each such enum. The error names `what` and
/// lists the names.
pub fn parse_named<T: clap::ValueEnum>(s: &str, what: &str) -> Result<T> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        let list = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        anyhow::anyhow!("unknown {what} '{s}' (expected {list})")
    })
}

/// The hyperparameters of the forward process, saved with every model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Beta schedule kind.
    pub beta_schedule: BetaSchedule,
    /// Number of diffusion steps `T`.
    pub timesteps: usize,
    /// First beta (linear schedule only).
    pub beta_start: f64,
    /// Last beta (linear schedule only).
    pub beta_end: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            beta_schedule: BetaSchedule::Linear,
            timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}

/// All per-timestep quantities of the forward process, in `f64`.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// `beta_t`.
    pub betas: Vec<f64>,
    /// `alpha_bar_t = prod_{s<=t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f64>,
    /// `alpha_bar_{t-1}`, with `alpha_bar_{-1} = 1`.
    pub alphas_cumprod_prev: Vec<f64>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Betas from a sampled `alpha_bar` curve of length `T+1`: `beta_t = 1 - a[t+1]/a[t]`, clipped.
fn betas_from_alpha_bar(alpha_bar: &[f64]) -> Vec<f64> {
    alpha_bar
        .windows(2)
        .map(|w| (1.0 - w[1] / w[0]).clamp(0.0, 0.999))
        .collect()
}

impl NoiseSchedule {
    /// Builds every array of the schedule. Fails on `T = 0` or betas outside `(0, 1)`.
    pub fn new(config: &ScheduleConfig) -> Result<Self> {
        let t = config.timesteps;
        if !(1..=100_000).contains(&t) {
            bail!("the number of diffusion timesteps must be between 1 and 100000 (got {t})");
        }
        let betas: Vec<f64> = match config.beta_schedule {
            BetaSchedule::Linear => {
                let (a, b) = (config.beta_start, config.beta_end);
                if !(a > 0.0 && b < 1.0 && a <= b) {
                    bail!("linear schedule needs 0 < beta_start <= beta_end < 1 (got {a} and {b})");
                }
                if t == 1 {
                    vec![a]
                } else {
                    (0..t)
                        .map(|i| a + (b - a) * i as f64 / (t - 1) as f64)
                        .collect()
                }
            }
            BetaSchedule::ScaledLinear => {
                let (a, b) = (config.beta_start.sqrt(), config.beta_end.sqrt());
                if !(a > 0.0 && b < 1.0 && a <= b) {
                    bail!("scaled-linear schedule needs 0 < beta_start <= beta_end < 1");
                }
                (0..t)
                    .map(|i| {
                        let f = if t == 1 {
                            0.0
                        } else {
                            i as f64 / (t - 1) as f64
                        };
                        (a + (b - a) * f).powi(2)
                    })
                    .collect()
            }
            BetaSchedule::Cosine => {
                let s = 0.008;
                let f = |i: usize| {
                    let x = (i as f64 / t as f64 + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2;
                    x.cos().powi(2)
                };
                let ab: Vec<f64> = (0..=t).map(|i| f(i) / f(0)).collect();
                betas_from_alpha_bar(&ab)
            }
            BetaSchedule::Sigmoid => {
                let (start, end, tau) = (-3.0f64, 3.0f64, 1.0f64);
                let (v_start, v_end) = (sigmoid(start / tau), sigmoid(end / tau));
                let g = |i: usize| {
                    let x = i as f64 / t as f64;
                    (v_end - sigmoid((x * (end - start) + start) / tau)) / (v_end - v_start)
                };
                let ab: Vec<f64> = (0..=t).map(|i| g(i) / g(0)).collect();
                betas_from_alpha_bar(&ab)
            }
        };
        Ok(Self::from_betas(betas))
    }

    /// Builds the cumulative products from explicit betas.
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0f64;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let mut alphas_cumprod_prev = vec![1.0];
        alphas_cumprod_prev.extend_from_slice(&alphas_cumprod[..alphas_cumprod.len() - 1]);
        Self {
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
        }
    }

    /// The same schedule with each beta rounded to f32 first, as diffusers stores them. Near
    /// `beta = 0.999` (the end of the cosine schedule) that rounding moves `alpha_bar` by about
    /// 1e-4 relative, so models and schedulers from diffusers are reproduced with this.
    pub fn with_f32_betas(&self) -> Self {
        Self::from_betas(self.betas.iter().map(|&b| b as f32 as f64).collect())
    }

    /// The schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise
    /// Schedules and Sample Steps are Flawed", Algorithm 1): `sqrt(ab)` is shifted so that its
    /// last value is 0 and scaled so that its first is unchanged,
    /// `sqrt(ab)' = (sqrt(ab) - sqrt(ab_T)) sqrt(ab_0) / (sqrt(ab_0) - sqrt(ab_T))`; betas follow.
    pub fn rescaled_zero_terminal_snr(&self) -> Self {
        let sq: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (sq[0], sq[sq.len() - 1]);
        let ab: Vec<f64> = sq
            .iter()
            .map(|s| ((s - last) * first / (first - last)).powi(2))
            .collect();
        let mut betas = vec![1.0 - ab[0]];
        betas.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
        Self::from_betas(betas)
    }

    /// Number of steps `T`.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false: a schedule has at least one step.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// Signal-to-noise ratio `SNR(t) = alpha_bar_t / (1 - alpha_bar_t)` (Kingma et al. 2021,
    /// "Variational Diffusion Models", eq. 2).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// Posterior variance of `q(x_{t-1} | x_t, x_0)`:
    /// `beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t` (DDPM, eq. 7).
    pub fn posterior_variance(&self, t: usize) -> f64 {
        (1.0 - self.alphas_cumprod_prev[t]) / (1.0 - self.alphas_cumprod[t]) * self.betas[t]
    }

    /// Closed-form sample of the forward process for a batch with one timestep per item:
    /// `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps` (DDPM, eq. 4).
    pub fn q_sample(&self, x0: Tensor<4>, noise: Tensor<4>, t: &[usize]) -> Tensor<4> {
        let device = x0.device();
        let a = self.per_item(t, |ab| ab.sqrt(), &device);
        let s = self.per_item(t, |ab| (1.0 - ab).sqrt(), &device);
        x0 * a + noise * s
    }

    /// The training target for a given objective at timesteps `t` ([`prediction::target`]).
    pub fn target(
        &self,
        prediction: Prediction,
        x0: Tensor<4>,
        noise: Tensor<4>,
        t: &[usize],
    ) -> Tensor<4> {
        if prediction != Prediction::V {
            return prediction::target(prediction, x0, noise, 1.0f32, 0.0f32);
        }
        let (a, s) = self.coefficients(t, &x0.device());
        prediction::target(prediction, x0, noise, a, s)
    }

    /// A model output at timesteps `t` as the pair `(x0_hat, eps_hat)` ([`prediction::split`]).
    pub fn split_prediction(
        &self,
        prediction: Prediction,
        x_t: Tensor<4>,
        out: Tensor<4>,
        t: &[usize],
    ) -> (Tensor<4>, Tensor<4>) {
        let (a, s) = self.coefficients(t, &x_t.device());
        prediction::split(prediction, x_t, out, a, s)
    }

    /// `(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))` per item, as `[B,1,1,1]` tensors.
    fn coefficients(&self, t: &[usize], device: &Device) -> (Tensor<4>, Tensor<4>) {
        (
            self.per_item(t, |ab| ab.sqrt(), device),
            self.per_item(t, |ab| (1.0 - ab).sqrt(), device),
        )
    }

    /// A `[B,1,1,1]` tensor holding `f(alpha_bar_{t_i})` for each item.
    fn per_item(&self, t: &[usize], f: impl Fn(f64) -> f64, device: &Device) -> Tensor<4> {
        let v: Vec<f32> = t
            .iter()
            .map(|&i| f(self.alphas_cumprod[i]) as f32)
            .collect();
        Tensor::from_data(TensorData::new(v, [t.len(), 1, 1, 1]), device)
    }
}
