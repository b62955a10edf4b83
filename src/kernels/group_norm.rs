//! Group normalisation with an optional SiLU after it, fused, on f32 NCHW buffers: forward and
//! backward, one (image, group) per task.
//!
//! GroupNorm (Wu & He 2018, eq. 1-3): for image b and group g of C/G channels over H·W pixels,
//! `μ = mean(x)`, `σ² = mean((x - μ)²)` (biased), `x̂ = (x - μ) / sqrt(σ² + ε)`, then per
//! channel `u = γ_c·x̂ + β_c`; the output is `u`, or `silu(u) = u·sigmoid(u)` (Elfwing et al.
//! 2018) when fused.
//!
//! Backward, with `r = 1 / sqrt(σ² + ε)` and `N = (C/G)·H·W`:
//! `du = dy·silu'(u)` where `silu'(u) = s·(1 + u·(1 - s))`, `s = sigmoid(u)` (or `du = dy`);
//! `dγ_c = Σ_b,pixels du·x̂`, `dβ_c = Σ_b,pixels du`; with `g = du·γ_c`,
//! `dx = r·(g - mean(g) - x̂·mean(g·x̂))`, the means over the group.

use rayon::prelude::*;

/// Shape of one group normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormGeometry {
    pub batch: usize,
    pub channels: usize,
    pub pixels: usize,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl NormGeometry {
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.pixels
    }
}

fn sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + (-u).exp())
}

/// Mean and `1 / sqrt(var + eps)` of one group, accumulated in f64.
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// Forward: returns the output [B, C, H·W].
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], g: &NormGeometry) -> Vec<f32> {
    assert_eq!(
        x.len(),
        g.batch * g.channels * g.pixels,
        "group norm input size"
    );
    assert_eq!(gamma.len(), g.channels, "group norm gamma size");
    assert_eq!(beta.len(), g.channels, "group norm beta size");
    let len = g.group_len();
    let per = g.channels / g.groups;
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .for_each(|(i, (yg, xg))| {
            let (mean, r) = stats(xg, g.eps);
            let c0 = (i % g.groups) * per;
            for (j, (yc, xc)) in yg.chunks_mut(g.pixels).zip(xg.chunks(g.pixels)).enumerate() {
                let (scale, shift) = (gamma[c0 + j] * r, beta[c0 + j] - gamma[c0 + j] * r * mean);
                for (o, v) in yc.iter_mut().zip(xc) {
                    let u = v * scale + shift;
                    *o = if g.silu { u * sigmoid(u) } else { u };
                }
            }
        });
    y
}

/// Backward: returns (dx [B, C, H·W], dγ [C], dβ [C]).
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    g: &NormGeometry,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(dy.len(), x.len(), "group norm output-gradient size");
    let len = g.group_len();
    let per = g.channels / g.groups;
    let mut dx = vec![0.0f32; x.len()];
    // Per (image, channel) sums of du·x̂ and du, reduced over images afterwards in a fixed order.
    let mut partial = vec![(0.0f64, 0.0f64); g.batch * g.channels];
    dx.par_chunks_mut(len)
        .zip(partial.par_chunks_mut(per))
        .enumerate()
        .for_each(|(i, (dxg, pg))| {
            let xg = &x[i * len..(i + 1) * len];
            let dyg = &dy[i * len..(i + 1) * len];
            let (mean, r) = stats(xg, g.eps);
            let c0 = (i % g.groups) * per;
            // First pass: du into dx's buffer, the channel sums, and the group means of
            // gγ = du·γ and gγ·x̂.
            let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
            for j in 0..per {
                let c = c0 + j;
                let span = j * g.pixels..(j + 1) * g.pixels;
                let (mut s_dux, mut s_du) = (0.0f64, 0.0f64);
                for ((d, xv), dyv) in dxg[span.clone()]
                    .iter_mut()
                    .zip(&xg[span.clone()])
                    .zip(&dyg[span])
                {
                    let xh = (xv - mean) * r;
                    let du = if g.silu {
                        let u = gamma[c] * xh + beta[c];
                        let s = sigmoid(u);
                        dyv * s * (1.0 + u * (1.0 - s))
                    } else {
                        *dyv
                    };
                    *d = du;
                    s_dux += (du * xh) as f64;
                    s_du += du as f64;
                }
                pg[j] = (s_dux, s_du);
                sum_g += gamma[c] as f64 * s_du;
                sum_gx += gamma[c] as f64 * s_dux;
            }
            let n = len as f64;
            let (mg, mgx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
            for j in 0..per {
                let c = c0 + j;
                let span = j * g.pixels..(j + 1) * g.pixels;
                for (d, xv) in dxg[span.clone()].iter_mut().zip(&xg[span]) {
                    let xh = (xv - mean) * r;
                    *d = r * (*d * gamma[c] - mg - xh * mgx);
                }
            }
        });
    let mut dgamma = vec![0.0f64; g.channels];
    let mut dbeta = vec![0.0f64; g.channels];
    for (i, (s_dux, s_du)) in partial.into_iter().enumerate() {
        dgamma[i % g.channels] += s_dux;
        dbeta[i % g.channels] += s_du;
    }
    (
        dx,
        dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta.into_iter().map(|v| v as f32).collect(),
    )
}
