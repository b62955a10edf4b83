//! Reverse-process samplers behind one trait, and the denoising loop that drives them, with
//! classifier-free guidance for class- and text-conditioned models. [`crate::pipeline`]
//! composes a model's components around this loop; call it rather than these functions.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod edit;
pub mod euler;
pub mod flow;
pub mod heun;
pub mod sigmas;

pub use config::{SamplerChoice, SamplerKind, Scheduler, SchedulerConfig};
pub use ddim::{DdimOptions, DdimSampler};
pub use ddpm::{DdpmSampler, VarianceType};
pub use dpm_solver::{DpmSolverOptions, DpmSolverSampler};
pub use euler::{EulerOptions, EulerSampler};
pub use flow::{FlowOptions, FlowSampler};
pub use heun::{HeunOptions, HeunSampler};

use crate::rng::{Stream, normal_tensor, rng_for};
use crate::unet::{Cond, TextCond, UNet};
use burn::tensor::{Device, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a stochastic sampler takes its standard normal noise from: a seeded generator in
/// normal use, or recorded draws (to replay another implementation's trajectory in tests).
pub trait NoiseSource {
    /// A tensor of independent `N(0, 1)` draws.
    fn normal(&mut self, dims: [usize; 4], device: &Device) -> Tensor<4>;
}

impl NoiseSource for ChaCha8Rng {
    fn normal(&mut self, dims: [usize; 4], device: &Device) -> Tensor<4> {
        normal_tensor(self, dims, device)
    }
}

/// Noise for a batch made of several requests, each with its own seed: request `j` owns `n_j`
/// consecutive images and every draw for them comes from its own generator, so each request
/// gets the noise it would get alone (`rng_for(seed, Sample, 0)`, as [`generate`] uses).
///
/// A window ([`SeededNoise::window`]) serves only rows `lo..hi` of that batch: each draw still
/// advances every generator as the whole batch would (the rows outside are drawn and dropped),
/// so a batch run in chunks gets, row for row, the noise of one run. Drawing a skipped row
/// costs a few nanoseconds a value, far below one model call per row.
pub struct SeededNoise {
    parts: Vec<(usize, ChaCha8Rng)>,
    window: std::ops::Range<usize>,
}

impl SeededNoise {
    /// `(images, seed)` per request, in batch order.
    pub fn new(parts: &[(usize, u64)]) -> Self {
        let n = parts.iter().map(|p| p.0).sum();
        Self::window(parts, 0..n)
    }

    /// Rows `window` of the batch `parts` make up.
    pub fn window(parts: &[(usize, u64)], window: std::ops::Range<usize>) -> Self {
        Self {
            parts: parts
                .iter()
                .map(|&(n, seed)| (n, rng_for(seed, Stream::Sample, 0)))
                .collect(),
            window,
        }
    }

    /// Images served per draw (the window's rows).
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// True when the window holds no row.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }
}

impl SeededNoise {
    /// `per` independent uniform draws in `[0, 1)` for each row of the window, row after row,
    /// with the window rule of [`NoiseSource::normal`] (rows outside are drawn and dropped).
    pub fn uniform(&mut self, per: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.len() * per);
        let mut row = 0;
        for (n, rng) in &mut self.parts {
            for r in row..row + *n {
                let keep = self.window.contains(&r);
                for _ in 0..per {
                    let u: f32 = rand::Rng::r#gen(rng);
                    if keep {
                        v.push(u);
                    }
                }
            }
            row += *n;
        }
        v
    }
}

impl NoiseSource for SeededNoise {
    fn normal(&mut self, dims: [usize; 4], device: &Device) -> Tensor<4> {
        assert_eq!(dims[0], self.len(), "noise batch size");
        let per: usize = dims[1..].iter().product();
        let mut v = Vec::with_capacity(dims[0] * per);
        let mut row = 0;
        for (n, rng) in &mut self.parts {
            for r in row..row + *n {
                if self.window.contains(&r) {
                    v.extend(crate::rng::normal_vec(rng, per));
                } else {
                    crate::rng::skip_normals(rng, per);
                }
            }
            row += *n;
        }
        Tensor::from_data(TensorData::new(v, dims), device)
    }
}

/// What is done to the predicted clean image `x0_hat` before a sampler uses it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum X0Clamp {
    /// Used as predicted.
    None,
    /// Clipped to `[-r, r]` (diffusers' `clip_sample`, `clip_sample_range`).
    Clip(f64),
    /// Dynamic thresholding (Saharia et al. 2022, "Imagen", section 2.3): per image,
    /// `s = clamp(quantile(|x0|, ratio), 1, max)`, then `x0 = clamp(x0, -s, s) / s`
    /// (diffusers' `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value`).
    Dynamic { ratio: f64, max: f64 },
}

impl X0Clamp {
    pub fn apply(&self, x0: Tensor<4>) -> Tensor<4> {
        match *self {
            X0Clamp::None => x0,
            X0Clamp::Clip(r) => x0.clamp(-r as f32, r as f32),
            X0Clamp::Dynamic { ratio, max } => {
                let dims = x0.dims();
                let dev = x0.device();
                let per = dims[1] * dims[2] * dims[3];
                let v: Vec<f32> = x0
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec()
                    .expect("f32 data");
                let mut out = Vec::with_capacity(v.len());
                for img in v.chunks(per) {
                    let s = quantile_abs(img, ratio).clamp(1.0, max) as f32;
                    out.extend(img.iter().map(|x| x.clamp(-s, s) / s));
                }
                Tensor::from_data(TensorData::new(out, dims), &dev)
            }
        }
    }
}

/// The `q`-quantile of `|v|` with linear interpolation between order statistics (numpy's and
/// torch's default): position `q (n - 1)` in the sorted values.
pub fn quantile_abs(v: &[f32], q: f64) -> f64 {
    let mut a: Vec<f64> = v.iter().map(|x| x.abs() as f64).collect();
    a.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (a.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(a.len() - 1);
    a[lo] + (a[hi] - a[lo]) * (pos - lo as f64)
}

/// One reverse-diffusion method: which model timesteps it visits, and how it moves from
/// `x_t` to the next sample given the model output there.
pub trait Sampler {
    /// The model timesteps visited, in order (descending; fractional for some spacings).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the starting noise (1 for samplers that work on `x_t` itself; the
    /// largest sigma for those that work on `x_t / sqrt(alpha_bar_t)`, like Euler).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// What the denoiser is shown at position `i`: the sampler's state as `x_t`.
    fn scale_model_input(&self, _i: usize, x: Tensor<4>) -> Tensor<4> {
        x
    }

    /// The state after the update at position `i`, as `x_t` in model space (for trajectories).
    fn to_model_space(&self, _i: usize, x: Tensor<4>) -> Tensor<4> {
        x
    }

    /// `(a_i, s_i)`: the sampler's state before the update at position `i` is
    /// `a_i x0 + s_i eps` for a clean image `x0` and `eps ~ N(0, I)`; `i` = the number of
    /// positions means after the last update. x_t samplers: `(sqrt(ab_t), sqrt(1 - ab_t))`
    /// (DDPM, eq. 4); sigma samplers, whose state is `x_t / sqrt(ab_t)`: `(1, sigma_i)`
    /// (EDM, section 2). What editing ([`edit`]) noises a given image with.
    fn state_scales(&self, i: usize) -> (f64, f64);

    /// Whether a run may begin at position `i` (false inside a multi-evaluation step, such as
    /// Heun's corrector).
    fn starts_step(&self, _i: usize) -> bool {
        true
    }

    /// The update at position `i` of [`Sampler::timesteps`], from `x` and the model output.
    /// Positions are visited in order from 0; multistep samplers keep what they need of
    /// earlier positions, and start afresh at position 0.
    fn step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        model_out: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4>;
}

/// Checks a requested number of sampling steps against the schedule's `t` steps.
pub(crate) fn check_steps(t: usize, steps: usize) -> anyhow::Result<()> {
    if steps == 0 || steps > t {
        anyhow::bail!("--steps must be between 1 and {t} (got {steps})");
    }
    Ok(())
}

/// Checks that spaced timesteps (shifted by `steps_offset`) stay inside `0..t`.
pub(crate) fn check_offset(timesteps: &[f64], t: usize, offset: usize) -> anyhow::Result<()> {
    if let Some(bad) = timesteps.iter().find(|&&s| s > (t - 1) as f64) {
        anyhow::bail!(
            "steps_offset {offset} puts timestep {bad} outside 0..{}",
            t - 1
        );
    }
    Ok(())
}

/// `x + sigma z` with `z ~ N(0, I)` drawn from `noise`; `x` itself (and no draw) when
/// `sigma = 0`.
pub(crate) fn add_noise(x: Tensor<4>, sigma: f64, noise: &mut dyn NoiseSource) -> Tensor<4> {
    if sigma <= 0.0 {
        return x;
    }
    let z = noise.normal(x.dims(), &x.device());
    x + z * (sigma as f32)
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Number of images.
    pub n: usize,
    /// Class per image for a class-conditioned model (`None`: the null class, unconditional).
    pub classes: Option<Vec<usize>>,
    /// Classifier-free guidance weight `w`: `out = u + w (c - u)` (Ho & Salimans 2022, eq. 6,
    /// written as in diffusers' `guidance_scale`; `w = 1` is plain conditional sampling).
    pub guidance: f32,
    /// Seed of every random draw of the run.
    pub seed: u64,
    /// Checked before every step: once set, the run stops early and returns the sample as it
    /// is (for the caller who set it to discard). `None`: runs to the end.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Prompts for a text-conditioned model, one per image (items marked null: unconditional).
    pub text: Option<TextCond>,
    /// What guidance steers away from for a text model (a negative prompt per image); `None`:
    /// the null text.
    pub negative: Option<TextCond>,
    /// Images concatenated to the model input as extra channels, one per image (a
    /// super-resolution model's upsampled low-resolution input), on the model's device.
    pub image_cond: Option<Tensor<4>>,
    /// Guidance only where the state's noise level `sigma = s / a` ([`Sampler::state_scales`])
    /// is in `[lo, hi]`; elsewhere the conditional output alone, one model evaluation per
    /// image instead of two (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited
    /// Interval Improves Sample and Distribution Quality in Diffusion Models", eq. 3). `None`:
    /// guidance at every step.
    pub guidance_interval: Option<(f64, f64)>,
}

/// Checks a guidance interval `[lo, hi]` in sigma: `0 <= lo < hi`, `hi` possibly infinite.
pub fn check_guidance_interval(lo: f64, hi: f64) -> anyhow::Result<()> {
    if lo.is_nan() || hi.is_nan() || lo < 0.0 || lo.is_infinite() {
        anyhow::bail!(
            "the guidance interval must be two noise levels sigma with 0 <= LO < HI (got {}, {})",
            crate::pipeline::shown(lo),
            crate::pipeline::shown(hi)
        );
    }
    if lo >= hi {
        anyhow::bail!(
            "the guidance interval {}, {} is reversed or empty: give LO < HI",
            crate::pipeline::shown(lo),
            crate::pipeline::shown(hi)
        );
    }
    Ok(())
}

/// Runs the full reverse process from pure Gaussian noise. `num_classes` is the model's class
/// count (the null label is `num_classes`). `on_step(i, &x)` sees each intermediate sample.
/// Same model, options and build: the same bits out.
pub fn generate(
    model: &UNet,
    num_classes: Option<usize>,
    shape: [usize; 3],
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    device: &Device,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let mut noise = SeededNoise::new(&[(opts.n, opts.seed)]);
    generate_with(
        model,
        num_classes,
        shape,
        sampler,
        opts,
        &mut noise,
        device,
        on_step,
    )
}

/// [`generate`] with the noise drawn from `noise` (e.g. a [`SeededNoise`] of several
/// requests batched together; `opts.seed` is then unused).
#[allow(clippy::too_many_arguments)]
pub fn generate_with(
    model: &UNet,
    num_classes: Option<usize>,
    shape: [usize; 3],
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    noise: &mut dyn NoiseSource,
    device: &Device,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let [c, h, w] = shape;
    let x = noise.normal([opts.n, c, h, w], device);
    let sigma = sampler.init_noise_sigma();
    let x = if sigma != 1.0 { x * (sigma as f32) } else { x };
    denoise_from(model, num_classes, x, sampler, opts, noise, on_step)
}

/// Where the sampler's own arithmetic runs: the CPU (Flex) in GPU builds, the model's device
/// otherwise. On burn 0.22.1's fused GPU backend (Vulkan, seen on an H200), a sampling loop run
/// on the GPU drifted far from Flex although every model call and every single update matched
/// it to 1e-6 when given fresh tensors (`examples/backend_check.rs`, "lockstep"): an update
/// that reads a tensor through clones was seen to go wrong. So in GPU builds the GPU gets one
/// fresh upload per model call and the updates (a few element-wise operations) run on the host.
fn sampler_device(model_device: &Device) -> Device {
    if cfg!(any(feature = "cuda", feature = "wgpu-vulkan")) {
        Device::flex()
    } else {
        model_device.clone()
    }
}

/// `t` on `device`: itself when already there, else a copy through host memory.
fn moved(t: Tensor<4>, device: &Device) -> Tensor<4> {
    if t.device() == *device {
        t
    } else {
        Tensor::from_data(t.into_data(), device)
    }
}

/// `x` with the conditioning images appended as channels: `cond` repeated along the batch
/// when `x` holds the images twice (guidance).
fn with_image_cond(x: Tensor<4>, cond: Option<&Tensor<4>>) -> Tensor<4> {
    let Some(c) = cond else {
        return x;
    };
    let reps = x.dims()[0] / c.dims()[0];
    let c = if reps > 1 {
        Tensor::cat(vec![c.clone(); reps], 0)
    } else {
        c.clone()
    };
    Tensor::cat(vec![x, c], 1)
}

/// Runs the reverse process from a given starting sample `x` (pure noise for generation).
pub fn denoise_from(
    model: &UNet,
    num_classes: Option<usize>,
    x: Tensor<4>,
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    rng: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    denoise_positions(model, num_classes, x, sampler, opts, rng, 0, None, on_step)
}

/// What is done to the state after each update (editing): `(i, x, noise) -> x`.
pub(crate) type AfterStep<'a> =
    &'a mut dyn FnMut(usize, Tensor<4>, &mut dyn NoiseSource) -> Tensor<4>;

/// The reverse process over positions `start..` of the sampler's timesteps, `x` being the
/// state before position `start`; `after` (if any) sees each updated state.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise_positions(
    model: &UNet,
    num_classes: Option<usize>,
    mut x: Tensor<4>,
    sampler: &mut dyn Sampler,
    opts: &GenerateOptions,
    rng: &mut dyn NoiseSource,
    start: usize,
    mut after: Option<AfterStep>,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let n = x.dims()[0];
    let labels: Option<Vec<usize>> = match (num_classes, &opts.classes) {
        (Some(k), Some(c)) => Some(c.clone()).filter(|_| k > 0),
        (Some(k), None) => Some(vec![k; n]),
        _ => None,
    };
    let guided = labels.is_some() && opts.classes.is_some() && opts.guidance != 1.0;
    let model_device = x.device();
    let host = sampler_device(&model_device);
    // Text: the prompts, and for guidance the prompts then their unconditional counterparts.
    let text = opts.text.as_ref().map(|tc| tc.to_device(&model_device));
    let text_both = opts
        .text
        .as_ref()
        .filter(|_| opts.guidance != 1.0)
        .map(|tc| {
            let unc = opts.negative.clone().unwrap_or_else(|| tc.as_null());
            TextCond::cat(tc, &unc).to_device(&model_device)
        });
    x = moved(x, &host);
    let image_cond = opts
        .image_cond
        .as_ref()
        .map(|c| moved(c.clone(), &model_device));
    let ic = image_cond.as_ref();
    let timesteps = sampler.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            break;
        }
        let input = sampler.scale_model_input(i, x.clone());
        let in_interval = opts.guidance_interval.is_none_or(|(lo, hi)| {
            let (a, s) = sampler.state_scales(i);
            let sigma = if a > 0.0 { s / a } else { f64::INFINITY };
            (lo..=hi).contains(&sigma)
        });
        let out = if let Some(tc) = &text {
            if let Some(both) = text_both.as_ref().filter(|_| in_interval) {
                let xx = with_image_cond(
                    moved(Tensor::cat(vec![input.clone(), input], 0), &model_device),
                    ic,
                );
                let out = moved(
                    model.forward_cond(xx, &vec![t; 2 * n], Cond::Text(both)),
                    &host,
                );
                let cond = out.clone().narrow(0, 0, n);
                let uncond = out.narrow(0, n, n);
                uncond.clone() + (cond - uncond) * opts.guidance
            } else {
                let input = with_image_cond(moved(input, &model_device), ic);
                moved(
                    model.forward_cond(input, &vec![t; n], Cond::Text(tc)),
                    &host,
                )
            }
        } else if guided && in_interval {
            let labels = labels.as_ref().expect("guided implies labels");
            let k = num_classes.expect("guided implies classes");
            let mut both = labels.clone();
            both.extend(std::iter::repeat_n(k, n));
            let xx = with_image_cond(
                moved(Tensor::cat(vec![input.clone(), input], 0), &model_device),
                ic,
            );
            let out = moved(model.forward(xx, &vec![t; 2 * n], Some(&both)), &host);
            let cond = out.clone().narrow(0, 0, n);
            let uncond = out.narrow(0, n, n);
            uncond.clone() + (cond - uncond) * opts.guidance
        } else {
            let input = with_image_cond(moved(input, &model_device), ic);
            moved(model.forward(input, &vec![t; n], labels.as_deref()), &host)
        };
        x = sampler.step(i, x, out, rng);
        if let Some(f) = after.as_mut() {
            x = f(i, x, rng);
        }
        on_step(i, &sampler.to_model_space(i, x.clone()));
    }
    moved(x, &model_device)
}
