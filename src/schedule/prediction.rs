//! What the denoiser outputs, and the one home of the conversions between a model output
//! and the clean image `x0`, the noise `eps` and the velocity `v`.
//!
//! A state in the variance-preserving form is `x_t = a x0 + s eps` with `a = sqrt(alpha_bar_t)`,
//! `s = sqrt(1 - alpha_bar_t)` (DDPM, eq. 4); `v = a eps - s x0` (Salimans & Ho 2022,
//! "Progressive Distillation", section 4). The coefficients are `f32` scalars or per-item
//! `[B, 1, 1, 1]` tensors. Sigma-space samplers keep `x = x_t / a = x0 + sigma eps` with
//! `sigma = s / a` (Karras et al. 2022, "EDM"). A rectified-flow state is `a = 1 - t`, `s = t`
//! and its velocity `eps - x0` is the same quantity at any scaling, so the flow conversions are
//! written for any `a`, `s`: `x0 = (x_t - s v) / (a + s)`, `eps = (x_t + a v) / (a + s)`.

use anyhow::Result;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::ops::{Add, Div, Mul};

/// What the denoiser is trained to output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The noise `eps` that was added (DDPM, eq. 14; the embedded model's).
    #[value(alias = "eps")]
    Epsilon,
    /// The velocity `v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0` (Salimans & Ho 2022,
    /// "Progressive Distillation", section 4).
    #[value(aliases = ["v-prediction", "v_prediction"])]
    V,
    /// The clean image `x0` itself.
    #[value(alias = "sample")]
    X0,
    /// Flow matching: the rectified-flow forward process `x_t = (1 - t) x0 + t eps` and its
    /// velocity `eps - x0` ([`super::flow`]). A model trained so samples by integrating that
    /// velocity from `t = 1` to `0` (the flow Euler and Heun samplers). `diffuse train`'s
    /// default.
    #[value(aliases = ["rectified-flow", "flow-matching"])]
    Flow,
}

impl Prediction {
    /// Whether the model learned the rectified-flow process rather than the
    /// variance-preserving diffusion process.
    pub fn is_flow(self) -> bool {
        self == Self::Flow
    }
}

impl std::str::FromStr for Prediction {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        super::parse_named(s, "objective")
    }
}

/// `a` and `s` as scalars or per-item tensors.
pub trait Coefficient: Clone + Add<Output = Self>
where
    Tensor<4>: Mul<Self, Output = Tensor<4>> + Div<Self, Output = Tensor<4>>,
{
}
impl Coefficient for f32 {}
impl Coefficient for Tensor<4> {}

/// The training target (DDPM eq. 14; v from Salimans & Ho 2022; flow from Liu et al. 2022,
/// eq. 1): `eps`, `x0`, `v = a eps - s x0`, or the flow velocity `eps - x0`.
pub fn target<C: Coefficient>(p: Prediction, x0: Tensor<4>, eps: Tensor<4>, a: C, s: C) -> Tensor<4>
where
    Tensor<4>: Mul<C, Output = Tensor<4>> + Div<C, Output = Tensor<4>>,
{
    match p {
        Prediction::Epsilon => eps,
        Prediction::X0 => x0,
        Prediction::V => eps * a - x0 * s,
        Prediction::Flow => eps - x0,
    }
}

/// `x0_hat` from the model output `out` at `x_t = a x0 + s eps`: epsilon `(x_t - s out) / a`;
/// x0 `out`; v `a x_t - s out`; flow `(x_t - s out) / (a + s)`.
pub fn x0<C: Coefficient>(p: Prediction, x_t: Tensor<4>, out: Tensor<4>, a: C, s: C) -> Tensor<4>
where
    Tensor<4>: Mul<C, Output = Tensor<4>> + Div<C, Output = Tensor<4>>,
{
    match p {
        Prediction::Epsilon => (x_t - out * s) / a,
        Prediction::X0 => out,
        Prediction::V => x_t * a - out * s,
        Prediction::Flow => (x_t - out * s.clone()) / (a + s),
    }
}

/// `(x0_hat, eps_hat)` from the model output at `x_t = a x0 + s eps`: [`x0`], and for eps:
/// epsilon `out`; x0 `(x_t - a out) / s`; v `s x_t + a out`; flow `(x_t + a out) / (a + s)`.
pub fn split<C: Coefficient>(
    p: Prediction,
    x_t: Tensor<4>,
    out: Tensor<4>,
    a: C,
    s: C,
) -> (Tensor<4>, Tensor<4>)
where
    Tensor<4>: Mul<C, Output = Tensor<4>> + Div<C, Output = Tensor<4>>,
{
    let eps = match p {
        Prediction::Epsilon => out.clone(),
        Prediction::X0 => (x_t.clone() - out.clone() * a.clone()) / s.clone(),
        Prediction::V => x_t.clone() * s.clone() + out.clone() * a.clone(),
        Prediction::Flow => (x_t.clone() + out.clone() * a.clone()) / (a.clone() + s.clone()),
    };
    (x0(p, x_t, out, a, s), eps)
}

/// `x0_hat` from the model output for a sigma-space state `x = x0 + sigma eps` shown to the
/// model at noise level `sigma` (EDM, table 1, VP preconditioning undone): epsilon
/// `x - sigma out`; v `-sigma / sqrt(sigma^2 + 1) out + x / (sigma^2 + 1)`; x0 `out`; flow
/// (`a = 1`, `s = sigma` above) `(x - sigma out) / (1 + sigma)`.
pub fn x0_in_sigma_space(p: Prediction, x: Tensor<4>, out: Tensor<4>, sigma: f64) -> Tensor<4> {
    match p {
        Prediction::Epsilon => x - out * (sigma as f32),
        Prediction::X0 => out,
        Prediction::V => {
            let c = sigma * sigma + 1.0;
            out * ((-sigma / c.sqrt()) as f32) + x / (c as f32)
        }
        Prediction::Flow => (x - out * (sigma as f32)) / ((1.0 + sigma) as f32),
    }
}
