//! Sample-quality metrics on feature vectors: Fréchet distance (FID), kernel inception
//! distance (KID), and k-NN precision and recall. Features arrive as `n x d` row-major f32;
//! all arithmetic is f64.

use anyhow::{Result, bail};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

use crate::rng::{Stream, rng_for};

/// Mean and covariance of a set of feature vectors (the "statistics" pytorch-fid caches).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    pub n: usize,
    pub dim: usize,
    pub mean: Vec<f64>,
    /// `dim x dim`, row-major; unbiased (divides by `n - 1`, as `numpy.cov`).
    pub cov: Vec<f64>,
}

impl FeatureStats {
    /// `mu = (1/n) sum x_i`, `Sigma = (1/(n-1)) sum (x_i - mu)(x_i - mu)^T`.
    pub fn from_features(feats: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || !feats.len().is_multiple_of(dim) {
            bail!("features do not split into vectors of {dim}");
        }
        let n = feats.len() / dim;
        if n < 2 {
            bail!("at least 2 images are needed for a covariance (got {n})");
        }
        let x =
            DMatrix::from_row_slice(n, dim, &feats.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let mean: DVector<f64> = x.row_mean().transpose();
        let centered = DMatrix::from_fn(n, dim, |i, j| x[(i, j)] - mean[j]);
        let cov = centered.transpose() * &centered / (n as f64 - 1.0);
        Ok(Self {
            n,
            dim,
            mean: mean.iter().copied().collect(),
            cov: (0..dim)
                .flat_map(|i| (0..dim).map(move |j| (i, j)))
                .map(|(i, j)| cov[(i, j)])
                .collect(),
        })
    }

    fn cov_matrix(&self) -> DMatrix<f64> {
        DMatrix::from_row_slice(self.dim, self.dim, &self.cov)
    }
}

/// `A^{1/2}` of a symmetric positive semi-definite matrix from its eigendecomposition
/// `A = V diag(l) V^T`: `V diag(sqrt(max(l, 0))) V^T` (negative eigenvalues are rounding).
fn sqrt_psd(a: &DMatrix<f64>) -> DMatrix<f64> {
    let e = SymmetricEigen::new(a.clone());
    let d = DMatrix::from_diagonal(&e.eigenvalues.map(|l| l.max(0.0).sqrt()));
    &e.eigenvectors * d * e.eigenvectors.transpose()
}

/// Fréchet distance between two Gaussians (Heusel et al. 2017, "GANs Trained by a Two
/// Time-Scale Update Rule", eq. 6; Dowson & Landau 1982):
/// `d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})`, with
/// `tr((S_1 S_2)^{1/2}) = tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})` (same eigenvalues), computed
/// from symmetric eigendecompositions only, which stays stable for singular covariances.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.dim != b.dim {
        bail!("feature sizes differ ({} vs {})", a.dim, b.dim);
    }
    let diff: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let (s1, s2) = (a.cov_matrix(), b.cov_matrix());
    let r1 = sqrt_psd(&s1);
    let m = &r1 * &s2 * &r1;
    let m = (&m + m.transpose()) * 0.5;
    let tr_sqrt: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    Ok(diff + s1.trace() + s2.trace() - 2.0 * tr_sqrt)
}

/// KID: the unbiased squared MMD with the cubic polynomial kernel
/// `k(x, y) = (x.y / d + 1)^3` (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 3 and
/// section 4), averaged over `subsets` random subsets of `size` vectors from each set (as
/// torch-fidelity: 100 subsets of 1000). Returns `(mean, std)`.
pub fn kid(a: &[f32], b: &[f32], dim: usize, subsets: usize, size: usize, seed: u64) -> (f64, f64) {
    let (na, nb) = (a.len() / dim, b.len() / dim);
    let m = size.min(na).min(nb);
    let mut rng = rng_for(seed, Stream::Sample, 0x4b4944);
    let pick = |x: &[f32], idx: &[usize]| {
        DMatrix::from_fn(idx.len(), dim, |i, j| x[idx[i] * dim + j] as f64)
    };
    let kernel = |g: DMatrix<f64>| g.map(|v| (v / dim as f64 + 1.0).powi(3));
    let off_diag_sum = |k: &DMatrix<f64>| k.sum() - k.trace();
    let mut vals = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let x = pick(a, &sample(&mut rng, na, m).into_vec());
        let y = pick(b, &sample(&mut rng, nb, m).into_vec());
        let kxx = kernel(&x * x.transpose());
        let kyy = kernel(&y * y.transpose());
        let kxy = kernel(&x * y.transpose());
        let mf = m as f64;
        vals.push(
            (off_diag_sum(&kxx) + off_diag_sum(&kyy)) / (mf * (mf - 1.0))
                - 2.0 * kxy.sum() / (mf * mf),
        );
    }
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
    (mean, var.sqrt())
}

/// Squared Euclidean distances between every row of `x` (`n x d`) and every row of `y`.
fn sq_dists(x: &DMatrix<f64>, y: &DMatrix<f64>) -> DMatrix<f64> {
    let xx: Vec<f64> = x.row_iter().map(|r| r.norm_squared()).collect();
    let yy: Vec<f64> = y.row_iter().map(|r| r.norm_squared()).collect();
    let xy = x * y.transpose();
    DMatrix::from_fn(x.nrows(), y.nrows(), |i, j| {
        (xx[i] + yy[j] - 2.0 * xy[(i, j)]).max(0.0)
    })
}

/// k-NN precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
/// for Assessing Generative Models", eqs. 1-3): each set's manifold is the union of balls
/// around its vectors reaching their `k`-th nearest neighbour in the same set; precision is the
/// share of generated vectors inside the real manifold, recall the share of real vectors
/// inside the generated one. Returns `(precision, recall)`.
pub fn precision_recall(real: &[f32], fake: &[f32], dim: usize, k: usize) -> Result<(f64, f64)> {
    let to_m = |v: &[f32]| {
        DMatrix::from_row_slice(
            v.len() / dim,
            dim,
            &v.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        )
    };
    let (r, f) = (to_m(real), to_m(fake));
    if r.nrows() <= k || f.nrows() <= k {
        bail!("precision/recall with k = {k} needs more than {k} images in each set");
    }
    let radii = |d: &DMatrix<f64>| -> Vec<f64> {
        d.row_iter()
            .map(|row| {
                let mut v: Vec<f64> = row.iter().copied().collect();
                v.sort_by(f64::total_cmp);
                v[k] // v[0] is the point itself
            })
            .collect()
    };
    let (rr, rf) = (radii(&sq_dists(&r, &r)), radii(&sq_dists(&f, &f)));
    let covered = |d: &DMatrix<f64>, radii: &[f64]| -> f64 {
        let hits = d
            .row_iter()
            .filter(|row| row.iter().zip(radii).any(|(dist, rad)| dist <= rad))
            .count();
        hits as f64 / d.nrows() as f64
    };
    let precision = covered(&sq_dists(&f, &r), &rr);
    let recall = covered(&sq_dists(&r, &f), &rf);
    Ok((precision, recall))
}
