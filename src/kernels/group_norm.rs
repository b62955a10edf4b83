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

/// `1 / (1 + e^-u)` with [`exp`].
#[inline(always)]
fn sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + exp(-u))
}

/// `e^x` in f32 without a library call, so that loops over it vectorise: `e^x = 2^k · e^r`
/// with `k = round(x·log2 e)` and `r = x - k·ln 2` (ln 2 split in two parts for exactness),
/// `e^r` by the degree-7 polynomial of Cephes' `expf` (S. Moshier, Cephes Math Library,
/// `expf.c`; within 2 ulp on its range). Inputs are clamped to ±87.3, where `e^x` stays a
/// normal f32. `2^k` is built from the bits of `k + 1.5·2²³ + 127`, whose low mantissa bits
/// hold `k + 127` (the biased exponent), shifted into the exponent field: unlike `k as i32`,
/// which saturates and maps NaN to 0 lane by lane, this stays in vector registers.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 87.3);
    let k = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits((k + (12_582_912.0 + 127.0)).to_bits() << 23)
}

/// Lanes of the f64 sums: the sums are split over this many accumulators, element `i` going
/// to lane `i % LANES`, and the lanes added in order at the end. The order is fixed, so the
/// bits do not depend on the vector width. 32 lanes are four AVX-512 registers of f64, so four
/// chains of adds run at once instead of one waiting on each add's latency.
const LANES: usize = 32;

/// Mean and `1 / sqrt(var + eps)` of one group in one pass: `Σx` and `Σx²` in f64 (in
/// [`LANES`] lanes), `var = Σx²/n - mean²`. In f64 the cancellation costs nothing that
/// matters here: f32 inputs have 24 significant bits, f64 sums 53.
#[inline(always)]
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let (mut s1, mut s2) = ([0.0f64; LANES], [0.0f64; LANES]);
    let chunks = x.chunks_exact(LANES);
    let (mut t1, mut t2) = (0.0f64, 0.0f64);
    for &v in chunks.remainder() {
        t1 += v as f64;
        t2 += v as f64 * v as f64;
    }
    // Two loops, one per sum: each keeps its lanes in one vector register, where one loop
    // computing both had them paired lane by lane in scalar code.
    for c in chunks.clone() {
        for l in 0..LANES {
            s1[l] += c[l] as f64;
        }
    }
    for c in chunks {
        for l in 0..LANES {
            s2[l] += c[l] as f64 * c[l] as f64;
        }
    }
    let n = x.len() as f64;
    let mean = (s1.iter().sum::<f64>() + t1) / n;
    let var = ((s2.iter().sum::<f64>() + t2) / n - mean * mean).max(0.0);
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
    super::fresh_output(x.len(), len, true, |i, yg| {
        let xg = &x[i * len..(i + 1) * len];
        forward_group(yg, xg, (i % g.groups) * per, gamma, beta, g)
    })
    .0
}

super::wide_fn! {
    /// One (image, group) of [`forward`], its channels from `c0` on.
    fn forward_group(yg: &mut [f32], xg: &[f32], c0: usize, gamma: &[f32], beta: &[f32], g: &NormGeometry) {
        let (mean, r) = stats(xg, g.eps);
        for (j, (yc, xc)) in yg.chunks_mut(g.pixels).zip(xg.chunks(g.pixels)).enumerate() {
            let (scale, shift) = (gamma[c0 + j] * r, beta[c0 + j] - gamma[c0 + j] * r * mean);
            for (o, v) in yc.iter_mut().zip(xc) {
                let u = v * scale + shift;
                *o = if g.silu { u * sigmoid(u) } else { u };
            }
        }
    }
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
    // Per (image, channel) sums of du·x̂ and du, reduced over images afterwards in a fixed order.
    let (dx, partial) = super::fresh_output(x.len(), len, true, |i, dxg| {
        let span = i * len..(i + 1) * len;
        let c0 = (i % g.groups) * per;
        let mut pg = vec![(0.0f64, 0.0f64); per];
        backward_group(
            dxg,
            &mut pg,
            &x[span.clone()],
            &dy[span],
            c0,
            gamma,
            beta,
            g,
        );
        pg
    });
    let mut dgamma = vec![0.0f64; g.channels];
    let mut dbeta = vec![0.0f64; g.channels];
    for (i, (s_dux, s_du)) in partial.into_iter().flatten().enumerate() {
        dgamma[i % g.channels] += s_dux;
        dbeta[i % g.channels] += s_du;
    }
    (
        dx,
        dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta.into_iter().map(|v| v as f32).collect(),
    )
}

super::wide_fn! {
    /// One (image, group) of [`backward`], its channels from `c0` on: `dx` into `dxg`, the
    /// channels' sums of du·x̂ and du into `pg`.
    fn backward_group(
        dxg: &mut [f32],
        pg: &mut [(f64, f64)],
        xg: &[f32],
        dyg: &[f32],
        c0: usize,
        gamma: &[f32],
        beta: &[f32],
        g: &NormGeometry
    ) {
        let per = g.channels / g.groups;
        let len = xg.len();
        let (mean, r) = stats(xg, g.eps);
        // First pass: du into dx's buffer, the channel sums, and the group means of
        // gγ = du·γ and gγ·x̂.
        let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
        for (j, pj) in pg.iter_mut().enumerate().take(per) {
            let c = c0 + j;
            let span = j * g.pixels..(j + 1) * g.pixels;
            let du_of = |xv: f32, dyv: f32| {
                let xh = (xv - mean) * r;
                if g.silu {
                    let u = gamma[c] * xh + beta[c];
                    let s = sigmoid(u);
                    dyv * s * (1.0 + u * (1.0 - s))
                } else {
                    dyv
                }
            };
            let (d, xs, dys) = (&mut dxg[span.clone()], &xg[span.clone()], &dyg[span]);
            for ((d, &xv), &dyv) in d.iter_mut().zip(xs).zip(dys) {
                *d = du_of(xv, dyv);
            }
            // Σ du·x̂ and Σ du, in lanes as in `stats`.
            let (mut a_dux, mut a_du) = ([0.0f64; LANES], [0.0f64; LANES]);
            let whole = d.len() / LANES * LANES;
            // One loop per sum, as in `stats`.
            for (dc, xc) in d[..whole].chunks_exact(LANES).zip(xs[..whole].chunks_exact(LANES)) {
                for l in 0..LANES {
                    a_dux[l] += (dc[l] * ((xc[l] - mean) * r)) as f64;
                }
            }
            for dc in d[..whole].chunks_exact(LANES) {
                for l in 0..LANES {
                    a_du[l] += dc[l] as f64;
                }
            }
            let (mut t_dux, mut t_du) = (0.0f64, 0.0f64);
            for (&du, &xv) in d[whole..].iter().zip(&xs[whole..]) {
                t_dux += (du * ((xv - mean) * r)) as f64;
                t_du += du as f64;
            }
            let s_dux = a_dux.iter().sum::<f64>() + t_dux;
            let s_du = a_du.iter().sum::<f64>() + t_du;
            *pj = (s_dux, s_du);
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
    }
}
