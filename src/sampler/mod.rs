//! Reverse-process samplers behind one trait, and the generation loop that drives them
//! (with classifier-free guidance for class-conditioned models).

pub mod ddim;
pub mod ddpm;
pub mod euler;

pub use ddim::{DdimOptions, DdimSampler, TimestepSpacing};
pub use ddpm::{DdpmSampler, VarianceType};
pub use euler::{EulerOptions, EulerSampler};

use crate::rng::{Stream, normal_tensor, rng_for};
use crate::unet::UNet;
use burn::tensor::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

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

    /// The update at position `i` of [`Sampler::timesteps`], from `x` and the model output.
    fn step(&self, i: usize, x: Tensor<4>, model_out: Tensor<4>, rng: &mut ChaCha8Rng)
    -> Tensor<4>;
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

/// `x + sigma z` with `z ~ N(0, I)` drawn from `rng`; `x` itself when `sigma = 0`.
pub(crate) fn add_noise(x: Tensor<4>, sigma: f64, rng: &mut ChaCha8Rng) -> Tensor<4> {
    if sigma <= 0.0 {
        return x;
    }
    let z = normal_tensor(rng, x.dims(), &x.device());
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
}

/// Runs the full reverse process from pure Gaussian noise. `num_classes` is the model's class
/// count (the null label is `num_classes`). `on_step(i, &x)` sees each intermediate sample.
/// Same model, options and build: the same bits out.
pub fn generate(
    model: &UNet,
    num_classes: Option<usize>,
    shape: [usize; 3],
    sampler: &dyn Sampler,
    opts: &GenerateOptions,
    device: &Device,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let mut rng = rng_for(opts.seed, Stream::Sample, 0);
    let [c, h, w] = shape;
    let x = normal_tensor(&mut rng, [opts.n, c, h, w], device);
    let sigma = sampler.init_noise_sigma();
    let x = if sigma != 1.0 { x * (sigma as f32) } else { x };
    denoise_from(model, num_classes, x, sampler, opts, &mut rng, on_step)
}

/// Runs the reverse process from a given starting sample `x` (pure noise for generation).
pub fn denoise_from(
    model: &UNet,
    num_classes: Option<usize>,
    mut x: Tensor<4>,
    sampler: &dyn Sampler,
    opts: &GenerateOptions,
    rng: &mut ChaCha8Rng,
    on_step: &mut dyn FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    let n = x.dims()[0];
    let labels: Option<Vec<usize>> = match (num_classes, &opts.classes) {
        (Some(k), Some(c)) => Some(c.clone()).filter(|_| k > 0),
        (Some(k), None) => Some(vec![k; n]),
        _ => None,
    };
    let guided = labels.is_some() && opts.classes.is_some() && opts.guidance != 1.0;
    for (i, &t) in sampler.timesteps().iter().enumerate() {
        let input = sampler.scale_model_input(i, x.clone());
        let out = if guided {
            let labels = labels.as_ref().expect("guided implies labels");
            let k = num_classes.expect("guided implies classes");
            let mut both = labels.clone();
            both.extend(std::iter::repeat_n(k, n));
            let xx = Tensor::cat(vec![input.clone(), input], 0);
            let out = model.forward(xx, &vec![t; 2 * n], Some(&both));
            let cond = out.clone().narrow(0, 0, n);
            let uncond = out.narrow(0, n, n);
            uncond.clone() + (cond - uncond) * opts.guidance
        } else {
            model.forward(input, &vec![t; n], labels.as_deref())
        };
        x = sampler.step(i, x, out, rng);
        on_step(i, &sampler.to_model_space(i, x.clone()));
    }
    x
}
