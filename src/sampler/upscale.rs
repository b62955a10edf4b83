//! Super-resolution sampling (SR3, Saharia et al. 2021): the reverse process of a model that
//! also reads the bicubically upsampled low-resolution image.

use super::{GenerateOptions, Sampler, generate};
use crate::conditioning::lowres;
use crate::model::LoadedModel;
use anyhow::{Result, bail};
use burn::tensor::{Tensor, TensorData};

/// Enlarges low-resolution images `[n, C, s, s]` (in `[-1, 1]`) by the model's scale, with
/// `opts` for the seed, guidance and cancellation (`opts.n` and `opts.image_cond` are set
/// here). Same model, images, options and build: the same bits out.
pub fn upscale(
    m: &LoadedModel,
    low: Tensor<4>,
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Result<Tensor<4>> {
    let Some(sr) = &m.config.superres else {
        bail!("{} is not a super-resolution model", m.source);
    };
    let [n, c, s, w] = low.dims();
    let [mc, big, _] = m.config.output_shape();
    if c != mc || s != w || s * sr.scale != big {
        bail!(
            "the low-resolution input is {c}x{s}x{w}; {} takes {mc}x{1}x{1}",
            m.source,
            big / sr.scale
        );
    }
    let dev = low.device();
    let v: Vec<f32> = low
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("f32");
    let up = lowres::condition(&v, n, c, s, sr.scale);
    let cond = Tensor::<4>::from_data(TensorData::new(up, [n, c, big, big]), &dev);
    let opts = GenerateOptions {
        n,
        image_cond: Some(cond),
        ..opts.clone()
    };
    Ok(generate(
        &m.unet,
        m.config.unet.num_classes,
        m.config.image_shape(),
        sampler,
        &opts,
        &dev,
        on_step,
    ))
}
