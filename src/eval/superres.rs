//! Full-reference image quality for super-resolution: PSNR and SSIM against the original
//! high-resolution images.

/// Peak signal-to-noise ratio of two images in `[-1, 1]` (peak-to-peak 2):
/// `10 log10(2^2 / MSE)` (in dB; infinite for identical images).
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (4.0 / mse).log10()
}

/// Structural similarity (Wang et al. 2004, eq. 13) of two `c x s x s` images in `[-1, 1]`,
/// mapped to `[0, 1]`: local statistics under an 11x11 Gaussian window of sigma 1.5 (the
/// paper's section III-C; shrunk to the image for images under 11 pixels, valid positions
/// only), `C1 = (0.01)^2`, `C2 = (0.03)^2`, averaged over positions and channels.
pub fn ssim(a: &[f32], b: &[f32], c: usize, s: usize) -> f64 {
    let k = 11.min(s | 1).min(s);
    let half = k as f64 / 2.0 - 0.5;
    let g: Vec<f64> = (0..k)
        .map(|i| (-((i as f64 - half).powi(2)) / (2.0 * 1.5f64.powi(2))).exp())
        .collect();
    let gs: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / gs).collect();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mut total = 0.0;
    let mut count = 0usize;
    for ch in 0..c {
        let pa = &a[ch * s * s..(ch + 1) * s * s];
        let pb = &b[ch * s * s..(ch + 1) * s * s];
        let at = |p: &[f32], y: usize, x: usize| (p[y * s + x] as f64 + 1.0) / 2.0;
        for y0 in 0..=s - k {
            for x0 in 0..=s - k {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for dy in 0..k {
                    for dx in 0..k {
                        let w = g[dy] * g[dx];
                        let (va, vb) = (at(pa, y0 + dy, x0 + dx), at(pb, y0 + dy, x0 + dx));
                        ma += w * va;
                        mb += w * vb;
                        saa += w * va * va;
                        sbb += w * vb * vb;
                        sab += w * va * vb;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
    }
    total / count as f64
}
