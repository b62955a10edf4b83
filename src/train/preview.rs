//! The preview grids a run saves as it trains: EMA samples through the generation pipeline
//! (one row per class for a class-conditioned model, dataset captions for a text model, the
//! bicubic inputs above their outputs for super-resolution).

use super::{RunConfig, RunPaths};
use crate::data::Dataset;
use crate::device::inference_device;
use crate::imageio::{ImageBatch, display_factor, grid, save_image, upscale};
use crate::pipeline::{Conditioning, Pipeline, Request, SamplerDefaults, Seeds};
use crate::sampler::Scheduler;
use crate::unet::UNet;
use anyhow::Result;
use burn::tensor::{Tensor, TensorData};

/// Saves a grid of EMA samples (one per class for conditioned models, else 16) made with 30
/// Euler-ancestral steps to `samples/step-NNNNNN.png`.
pub(super) fn preview(
    cfg: &RunConfig,
    ema: &UNet,
    paths: &RunPaths,
    step: usize,
    p: Preview,
) -> Result<()> {
    let idev = inference_device();
    let (n, conditioning, cols) = match (cfg.model.unet.num_classes, p.text) {
        (Some(k), _) => class_layout(Some(k)),
        (None, Some(text)) => (
            text.null.len(),
            Conditioning::Encoded {
                text,
                negative: None,
            },
            4,
        ),
        (None, None) => class_layout(None),
    };
    let (n, low_res) = match &p.lowres {
        Some((v, shape)) => (
            shape[0],
            Some(Tensor::<4>::from_data(
                TensorData::new(v.clone(), *shape),
                &idev,
            )),
        ),
        None => (n, None),
    };
    let model = crate::model::LoadedModel {
        config: cfg.model.clone(),
        scheduler: Scheduler::for_model(&cfg.model.schedule, cfg.model.prediction)?,
        unet: ema.clone(),
        source: "the training run".into(),
        vae: p.vae.cloned(),
    };
    let pipe = Pipeline::new(model, None, idev.clone());
    let defaults = SamplerDefaults::PREVIEW.for_model(&cfg.model);
    let mut req = Request::new(n, defaults.sampler);
    req.steps = defaults.steps.map(|s| s.min(pipe.model.scheduler.len()));
    req.conditioning = conditioning;
    req.guidance = 1.0;
    req.seeds = Seeds::One(cfg.train.seed);
    req.low_res = low_res.clone();
    let x = pipe.run(&req, &mut |_| {})?.images;
    // Super-resolution: the bicubic inputs above their outputs.
    let x = match (&p.lowres, &cfg.model.superres) {
        (Some((v, [n, c, s, _])), Some(sr)) => {
            let up = crate::conditioning::lowres::condition(v, *n, *c, *s, sr.scale);
            let big = s * sr.scale;
            let up = Tensor::<4>::from_data(TensorData::new(up, [*n, *c, big, big]), &idev);
            Tensor::cat(vec![up, x], 0)
        }
        _ => x,
    };
    save_grid(x, cols, paths, step)
}

/// The preview's images: one per class (up to 4 of each where there are few classes), a row
/// per class when there are more than 4, or 16 for an unconditioned model.
pub(super) fn class_layout(num_classes: Option<usize>) -> (usize, Conditioning, usize) {
    match num_classes {
        Some(k) => {
            let per = (16 / k).clamp(1, 4);
            let classes: Vec<usize> = (0..k).flat_map(|c| std::iter::repeat_n(c, per)).collect();
            let cols = if per == 1 { k } else { per };
            (classes.len(), Conditioning::Classes(classes), cols)
        }
        None => (16, Conditioning::None, 4),
    }
}

/// Saves images `[n, C, S, S]` as the grid `samples/step-NNNNNN.png`, `cols` to a row.
pub(super) fn save_grid(x: Tensor<4>, cols: usize, paths: &RunPaths, step: usize) -> Result<()> {
    let size = x.dims()[2];
    let batch = ImageBatch::from_tensor(x);
    let imgs: Vec<_> = (0..batch.len()).map(|i| batch.image(i)).collect();
    let g = upscale(&grid(&imgs, cols), display_factor(size));
    save_image(&g, &paths.samples().join(format!("step-{step:06}.png")))
}

/// What preview grids need besides the model.
pub(super) struct Preview<'a> {
    pub text: Option<crate::unet::TextCond>,
    /// Super-resolution: 8 training images reduced by the scale, and their shape.
    pub lowres: Option<(Vec<f32>, [usize; 4])>,
    pub vae: Option<&'a crate::vae::LoadedVae>,
}

/// Super-resolution previews: 8 training images, reduced (area average) by the scale.
pub(super) fn preview_lowres(cfg: &RunConfig, ds: &Dataset) -> Option<(Vec<f32>, [usize; 4])> {
    let sr = cfg.model.superres.as_ref()?;
    let n = ds.len().min(8);
    let (c, s) = (ds.channels, ds.size);
    let high = ds.spread_f32(n);
    let v = crate::conditioning::lowres::downsample_area(&high, n, c, s, sr.scale);
    Some((v, [n, c, s / sr.scale, s / sr.scale]))
}
