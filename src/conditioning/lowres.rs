//! The low-resolution input of a super-resolution model (SR3, Saharia et al. 2021, section 2:
//! "we upsample the low-resolution image to the target resolution using bicubic
//! interpolation" and concatenate it to the noisy image). Training pairs are made on the fly:
//! a high-resolution image is reduced by area averaging, then brought back up bicubically.
//! All on the host, on NCHW f32 buffers.

/// Area (box) downsampling by an integer factor: each output pixel is the mean of a
/// `factor x factor` block (as `torch.nn.functional.interpolate(mode="area")` for integer
/// factors). `x` is `n x c x s x s`; returns `n x c x (s/factor) x (s/factor)`.
pub fn downsample_area(x: &[f32], n: usize, c: usize, s: usize, factor: usize) -> Vec<f32> {
    let o = s / factor;
    let inv = 1.0 / (factor * factor) as f32;
    let mut out = Vec::with_capacity(n * c * o * o);
    for plane in x.chunks(s * s).take(n * c) {
        for oy in 0..o {
            for ox in 0..o {
                let mut acc = 0.0f32;
                for dy in 0..factor {
                    let row = &plane[(oy * factor + dy) * s + ox * factor..];
                    acc += row[..factor].iter().sum::<f32>();
                }
                out.push(acc * inv);
            }
        }
    }
    out
}

/// Keys' cubic convolution kernel with `a = -0.75` (Keys 1981, eq. 15; the value PyTorch's
/// bicubic interpolation uses).
fn cubic(t: f32) -> f32 {
    const A: f32 = -0.75;
    let t = t.abs();
    if t <= 1.0 {
        ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    } else if t < 2.0 {
        ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A
    } else {
        0.0
    }
}

/// For each output index along one axis, four source indices (clamped at the borders) and
/// their weights: half-pixel centres, `src = (i + 0.5) * in / out - 0.5` (PyTorch's
/// `align_corners=False`).
fn taps(inp: usize, out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|i| {
            let src = (i as f32 + 0.5) * scale - 0.5;
            let f = src.floor();
            let t = src - f;
            let mut idx = [0usize; 4];
            let mut w = [0f32; 4];
            for k in 0..4 {
                let j = f as i64 - 1 + k as i64;
                idx[k] = j.clamp(0, inp as i64 - 1) as usize;
                w[k] = cubic(t - (k as f32 - 1.0));
            }
            (idx, w)
        })
        .collect()
}

/// Bicubic resize of `n x c x s_in x s_in` planes to `s_out x s_out` (separable, rows then
/// columns, borders replicated), as `interpolate(mode="bicubic", align_corners=False)`.
pub fn upsample_bicubic(x: &[f32], n: usize, c: usize, s_in: usize, s_out: usize) -> Vec<f32> {
    let t = taps(s_in, s_out);
    let mut out = Vec::with_capacity(n * c * s_out * s_out);
    let mut tmp = vec![0f32; s_in * s_out];
    for plane in x.chunks(s_in * s_in).take(n * c) {
        // Horizontal pass: s_in rows of s_out.
        for y in 0..s_in {
            let row = &plane[y * s_in..(y + 1) * s_in];
            for (ox, (idx, w)) in t.iter().enumerate() {
                tmp[y * s_out + ox] = (0..4).map(|k| row[idx[k]] * w[k]).sum();
            }
        }
        // Vertical pass.
        for (idx, w) in &t {
            for ox in 0..s_out {
                out.push((0..4).map(|k| tmp[idx[k] * s_out + ox] * w[k]).sum());
            }
        }
    }
    out
}

/// The model's conditioning image for low-resolution images `n x c x s_low x s_low`: bicubic
/// upsampling by `scale`.
pub fn condition(low: &[f32], n: usize, c: usize, s_low: usize, scale: usize) -> Vec<f32> {
    upsample_bicubic(low, n, c, s_low, s_low * scale)
}

/// A training pair's conditioning image from the high-resolution images `n x c x s x s`:
/// area-downsampled by `scale`, then [`condition`].
pub fn condition_from_high(high: &[f32], n: usize, c: usize, s: usize, scale: usize) -> Vec<f32> {
    let low = downsample_area(high, n, c, s, scale);
    condition(&low, n, c, s / scale, scale)
}
