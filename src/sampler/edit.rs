//! Editing given images with the reverse process: SDEdit (Meng et al. 2022, "SDEdit: Guided
//! Image Synthesis and Editing with Stochastic Differential Equations") and inpainting in the
//! manner of RePaint (Lugmayr et al. 2022), for any sampler and any conditioning.

use super::{GenerateOptions, NoiseSource, Sampler, SeededNoise, denoise_positions};
use crate::unet::UNet;
use burn::tensor::Tensor;

/// How an edit uses the given image.
#[derive(Clone, Debug)]
pub struct EditOptions {
    /// How far the image is noised before denoising: 0 keeps it, 1 starts from (almost) pure
    /// noise. The run begins at position `len - floor(strength * len)` of the sampler's
    /// positions (diffusers' img2img `strength`), moved later to a position that starts a step.
    pub strength: f64,
    /// `[n or 1, 1, H, W]`, 1 where the image is to be regenerated and 0 where it is kept;
    /// `None` edits everywhere.
    pub mask: Option<Tensor<4>>,
}

impl EditOptions {
    /// The strength of an edit that does not set one: 0.6 for SDEdit (diffusers' img2img
    /// default is 0.8; 0.6 keeps more of the input on small models), 1 with a mask.
    pub fn default_strength(masked: bool) -> f64 {
        if masked { 1.0 } else { 0.6 }
    }
}

/// The first position an edit of `strength` visits among `len` positions (`len`: none).
pub fn start_position(sampler: &dyn Sampler, strength: f64) -> usize {
    let len = sampler.timesteps().len();
    let keep = (strength.clamp(0.0, 1.0) * len as f64).floor() as usize;
    let mut start = len - keep.min(len);
    while start < len && !sampler.starts_step(start) {
        start += 1;
    }
    start
}

/// Edits the images `x0` (`[n, C, H, W]` in model space, `[-1, 1]`).
///
/// SDEdit: the state at the start position is `a x0 + s eps` (`(a, s)` =
/// [`Sampler::state_scales`]), from which the reverse process runs to the end with the
/// model's conditioning. With a mask, after every update the kept region (mask 0) is
/// replaced by `x0` noised afresh to the next position, `a' x0 + s' eps'` (RePaint, eq. 8 without
/// resampling), so the regenerated region grows to agree with what is kept; after the last
/// update it is `x0` itself. Noise comes from
/// `opts.seed`: same inputs and seed, same bits.
pub fn edit(
    model: &UNet,
    num_classes: Option<usize>,
    x0: Tensor<4>,
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    edit: &EditOptions,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let mut noise = SeededNoise::new(&[(x0.dims()[0], opts.seed)]);
    edit_with(
        model,
        num_classes,
        x0,
        sampler,
        opts,
        edit,
        &mut noise,
        on_step,
    )
}

/// [`edit`] with the noise drawn from `noise` (e.g. a [`SeededNoise`] of several requests
/// batched together; `opts.seed` is then unused).
#[allow(clippy::too_many_arguments)]
pub fn edit_with(
    model: &UNet,
    num_classes: Option<usize>,
    x0: Tensor<4>,
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    edit: &EditOptions,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let dims = x0.dims();
    let device = x0.device();
    let start = start_position(sampler, edit.strength);
    let len = sampler.timesteps().len();
    if start == len {
        // Nothing to run: strength 0 keeps the image.
        return x0;
    }
    let (a, s) = sampler.state_scales(start);
    let eps = noise.normal(dims, &device);
    let x = x0.clone() * (a as f32) + eps * (s as f32);
    let mask = edit.mask.clone();
    let keep = mask.clone().map(|m| m.neg() + 1.0);
    let scales: Vec<(f64, f64)> = (0..=len).map(|i| sampler.state_scales(i)).collect();
    let mut replace = |i: usize, x: Tensor<4>, noise: &mut dyn NoiseSource| {
        let (Some(mask), Some(keep)) = (&mask, &keep) else {
            return x;
        };
        // After the last update the kept region is the image itself (some samplers, like
        // DDIM with few steps, end a little short of noise level 0).
        let (a, s) = if i + 1 == len {
            (1.0, 0.0)
        } else {
            scales[i + 1]
        };
        let dev = x.device();
        let known = x0.clone().to_device(&dev) * (a as f32);
        let known = if s > 0.0 {
            known + noise.normal(dims, &dev) * (s as f32)
        } else {
            known
        };
        x * mask.clone().to_device(&dev) + known * keep.clone().to_device(&dev)
    };
    denoise_positions(
        model,
        num_classes,
        x,
        sampler,
        opts,
        noise,
        start,
        Some(&mut replace),
        on_step,
    )
}
