//! The rectified-flow forward process (flow matching): a straight path from the clean image
//! to pure noise, `x_t = (1 - t) x0 + t eps` for `t` in `[0, 1]`, whose velocity
//! `dx_t/dt = eps - x0` the denoiser learns (Liu et al. 2022, "Flow Straight and Fast",
//! eq. 1; Lipman et al. 2023, "Flow Matching for Generative Modeling", eq. 23 with
//! `sigma_min = 0`; Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3, section 2).
//!
//! In the notation of [`super::prediction`] a flow state is `a x0 + s eps` with `a = 1 - t`,
//! `s = t`, so it is a variance-preserving state rescaled by `1 / (a + s)` at the same
//! signal-to-noise ratio `(a / s)^2`, i.e. at `sigma = s / a = t / (1 - t)`. The denoiser reads
//! `t` scaled to the model's `T` training steps (`t T`, as SD3 feeds `1000 t`), so a flow
//! model's time embedding covers the same range as a diffusion model's.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How the training times `t` are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowTime {
    /// `t ~ U(0, 1)` (rectified flow, Liu et al. 2022).
    Uniform,
    /// `t = sigmoid(u)`, `u ~ N(loc, scale^2)`: more training at middle times (SD3,
    /// section 3.1, eq. 19: "lognorm(m, s)"; SD3 trains with `m = 0`, `s = 1`).
    LogitNormal { loc: f64, scale: f64 },
}

impl Default for FlowTime {
    /// SD3's choice, its best in the paper's comparison (SD3, table 1): logit-normal(0, 1).
    fn default() -> Self {
        Self::LogitNormal {
            loc: 0.0,
            scale: 1.0,
        }
    }
}

impl FlowTime {
    /// Checks the density's parameters: a finite location, a positive finite scale.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Self::LogitNormal { loc, scale } = *self {
            if !loc.is_finite() || loc.abs() > 10.0 {
                anyhow::bail!("--flow-loc must be between -10 and 10 (got {loc})");
            }
            if !(scale > 0.0 && scale <= 10.0) {
                anyhow::bail!("--flow-scale must be above 0 and at most 10 (got {scale})");
            }
        }
        Ok(())
    }

    /// One training time in `[1e-5, 1 - 1e-5]`, from one draw of `rng` (a uniform, or a
    /// standard normal for the logit-normal).
    pub fn draw(&self, rng: &mut impl Rng) -> f64 {
        let t = match *self {
            Self::Uniform => rng.r#gen::<f64>(),
            Self::LogitNormal { loc, scale } => {
                let z: f64 = rng.sample(rand_distr::StandardNormal);
                1.0 / (1.0 + (-(loc + scale * z)).exp())
            }
        };
        t.clamp(1e-5, 1.0 - 1e-5)
    }
}

/// `(a, s)` of the flow state at time `t`: `(1 - t, t)`.
pub fn scales(t: f64) -> (f64, f64) {
    (1.0 - t, t)
}

/// The noise level of the flow state at time `t` in the variance-preserving sense:
/// `sigma = t / (1 - t)` (infinite at `t = 1`).
pub fn sigma(t: f64) -> f64 {
    if t >= 1.0 {
        f64::INFINITY
    } else {
        t / (1.0 - t)
    }
}

/// The flow time of the variance-preserving noise level `sigma`: `t = sigma / (1 + sigma)`.
pub fn time_of_sigma(sigma: f64) -> f64 {
    if sigma.is_infinite() {
        1.0
    } else {
        sigma / (1.0 + sigma)
    }
}

/// What the denoiser is shown as its time: `t T` for `T` training steps.
pub fn model_time(t: f64, steps: usize) -> f64 {
    t * steps as f64
}

/// The flow times of a sampling run of `steps` steps, from 1 down to 0 (`steps + 1` values),
/// evenly spaced, then shifted by `shift`: `t' = shift t / (1 + (shift - 1) t)` (SD3, eq. 23,
/// as diffusers' `FlowMatchEulerDiscreteScheduler` applies `shift`; 1 keeps them even).
pub fn sampling_times(steps: usize, shift: f64) -> Vec<f64> {
    (0..=steps)
        .map(|k| {
            let t = 1.0 - k as f64 / steps as f64;
            shift * t / (1.0 + (shift - 1.0) * t)
        })
        .collect()
}
