//! Training the autoencoder: reconstruction (L1) plus a small KL penalty towards `N(0, I)`
//! (Rombach et al. 2022, appendix G, without the perceptual and adversarial terms), AdamW with
//! warm-up and clipping; afterwards the latent scaling factor is measured on the data.

use super::adamw::{self, AdamW};
use crate::data::{self, Dataset};
use crate::device::{inference_device, training_device};
use crate::imageio::{ImageBatch, display_factor, grid, save_image, upscale};
use crate::rng::{Stream, normal_vec, rng_for};
use crate::vae::{LoadedVae, Vae, VaeConfig};
use crate::weights::{self, StoreDtype};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Autoencoder training settings, saved as `train.json` in the output folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub grad_clip: f64,
    /// Weight of the per-image KL sum against the per-image sum of absolute errors
    /// (`loss = mean_b(sum |x - x_hat| + w KL_b) / (C H W)`; 1e-6 in Rombach et al.).
    pub kl_weight: f64,
    pub seed: u64,
    /// Write the folder every N steps (and at the end).
    pub save_every: usize,
    /// The `--data` argument.
    pub data: String,
}

impl VaeTrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > 100_000_000 {
            bail!("--steps must be between 1 and 100000000");
        }
        if !(1..=4096).contains(&self.batch_size) {
            bail!("--batch must be between 1 and 4096");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number (got {})", self.lr);
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            bail!("--kl-weight must be 0 or positive (got {})", self.kl_weight);
        }
        if self.save_every == 0 {
            bail!("--save-every must be at least 1");
        }
        Ok(())
    }
}

/// One line of the autoencoder's `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaeMetric {
    pub step: usize,
    pub loss: f64,
    /// Mean absolute error per pixel value (images in [-1, 1]).
    pub l1: f64,
    /// Mean KL per image.
    pub kl: f64,
    pub elapsed: f64,
}

/// Trains an autoencoder of `cfg` on `ds` into the folder `out` (config.json,
/// diffusion_pytorch_model.safetensors, train.json, metrics.jsonl, recon.png, samples.png).
/// `on_step(step, loss)` sees every step.
pub fn train(
    cfg: &VaeConfig,
    tc: &VaeTrainConfig,
    ds: Dataset,
    out: &Path,
    on_step: &mut dyn FnMut(usize, f64),
) -> Result<LoadedVae> {
    tc.validate()?;
    cfg.validate()?;
    crate::device::check_training_backend()?;
    if ds.channels != cfg.in_channels || ds.size != cfg.sample_size {
        bail!(
            "the data is {}x{}x{} but the VAE is configured for {}x{}x{}",
            ds.channels,
            ds.size,
            ds.size,
            cfg.in_channels,
            cfg.sample_size,
            cfg.sample_size
        );
    }
    let _lock = super::claim_run_folder(out)?;
    crate::files::write_atomic(
        &out.join("train.json"),
        serde_json::to_string_pretty(tc)?.as_bytes(),
    )?;
    let dev = training_device();
    dev.seed(tc.seed);
    let mut model = Vae::new(cfg, &dev)?;
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut metrics = std::fs::File::create(out.join("metrics.jsonl"))
        .with_context(|| format!("cannot write {}", out.join("metrics.jsonl").display()))?;
    let pixels = (ds.channels * ds.size * ds.size) as f64;
    let t0 = Instant::now();
    let mut current = cfg.clone();
    for step in 0..tc.steps {
        let batch = data::batch_for_step(&ds, step, tc.batch_size, tc.seed, false);
        let mut rng = rng_for(tc.seed, Stream::TrainStep, step as u64);
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), &dev);
        let post = model.encode(x.clone());
        let ldims = post.mean.dims();
        let eps = Tensor::<4>::from_data(
            TensorData::new(normal_vec(&mut rng, ldims.iter().product()), ldims),
            &dev,
        );
        let recon = model.decode(post.sample(eps));
        let l1 = (recon - x).abs().mean();
        let kl = post.kl().mean();
        let loss = l1.clone() + kl.clone().mul_scalar((tc.kl_weight / pixels) as f32);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let loss_v = loss.into_scalar::<f32>() as f64;
        if !loss_v.is_finite() {
            bail!("VAE training diverged at step {step} (loss {loss_v}); try a lower --lr");
        }
        let gnorm = adamw::grad_norm(&model, &grads);
        let scale = adamw::clip_scale(gnorm, tc.grad_clip);
        let lr = super::scheduled_lr(
            tc.lr,
            tc.warmup_steps,
            super::LrSchedule::Constant,
            tc.steps,
            step,
        );
        model = opt.step(model, &grads, lr, scale);
        let done = step + 1;
        let line = VaeMetric {
            step: done,
            loss: loss_v,
            l1: l1.into_scalar::<f32>() as f64,
            kl: kl.into_scalar::<f32>() as f64,
            elapsed: t0.elapsed().as_secs_f64(),
        };
        writeln!(metrics, "{}", serde_json::to_string(&line)?)?;
        on_step(done, loss_v);
        if done % tc.save_every == 0 || done == tc.steps {
            let idev = inference_device();
            let valid = to_inference(&model, cfg, &idev)?;
            current.scaling_factor = measure_scale(&valid, &ds, tc.seed, &idev);
            let v = LoadedVae {
                config: current.clone(),
                vae: valid,
                source: out.display().to_string(),
            };
            crate::vae::save(&v, out, StoreDtype::F32)?;
            if done == tc.steps {
                previews(&v, &ds, tc.seed, out)?;
                return Ok(v);
            }
        }
    }
    unreachable!("the loop returns at its last step")
}

/// The trained module, without autodiff, on the inference device.
fn to_inference(model: &Vae, cfg: &VaeConfig, idev: &Device) -> Result<Vae> {
    let mut t = weights::NamedTensors::new();
    weights::collect(&model.valid(), "", &mut t);
    weights::apply(Vae::new(cfg, idev)?, &t, "")
}

/// `1 / std` of posterior samples of up to 512 training images (Rombach et al. 2022, section
/// 4.3.2: "rescale the latent ... by the component-wise variance" so that latents have about
/// unit variance).
pub fn measure_scale(vae: &Vae, ds: &Dataset, seed: u64, dev: &Device) -> f64 {
    let mut sum = 0.0f64;
    let mut sq = 0.0f64;
    let mut count = 0usize;
    let mut rng = rng_for(seed, Stream::Sample, 7);
    crate::vae::encode_images(vae, ds, 512, dev, &mut |post| {
        let d = post.mean.dims();
        let eps = Tensor::<4>::from_data(
            TensorData::new(normal_vec(&mut rng, d.iter().product()), d),
            dev,
        );
        let z: Vec<f32> = post
            .sample(eps)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32");
        for v in z {
            sum += v as f64;
            sq += (v as f64) * (v as f64);
            count += 1;
        }
    });
    let mean = sum / count as f64;
    let var = (sq / count as f64 - mean * mean).max(1e-12);
    1.0 / var.sqrt()
}

/// `recon.png`: 8 training images over their reconstructions; `samples.png`: 16 decodes of
/// random latents with the data's latent spread (`z = eps / scaling_factor`, `eps ~ N(0, I)`).
fn previews(v: &LoadedVae, ds: &Dataset, seed: u64, out: &Path) -> Result<()> {
    let dev = inference_device();
    let n = ds.len().min(8);
    let imgs = ds.spread_f32(n);
    let x = Tensor::<4>::from_data(
        TensorData::new(imgs, [n, ds.channels, ds.size, ds.size]),
        &dev,
    );
    let rec = v.vae.decode(v.vae.encode(x.clone()).mean);
    let both = ImageBatch::from_tensor(Tensor::cat(vec![x, rec], 0));
    let pics: Vec<_> = (0..both.len()).map(|i| both.image(i)).collect();
    let f = display_factor(ds.size);
    save_image(&upscale(&grid(&pics, n), f), &out.join("recon.png"))?;
    let [c, h, w] = v.config.latent_shape(ds.size);
    let mut rng = rng_for(seed, Stream::Sample, 0);
    let z = Tensor::<4>::from_data(
        TensorData::new(normal_vec(&mut rng, 16 * c * h * w), [16, c, h, w]),
        &dev,
    );
    let s = ImageBatch::from_tensor(v.decode_scaled(z));
    let pics: Vec<_> = (0..s.len()).map(|i| s.image(i)).collect();
    save_image(&upscale(&grid(&pics, 8), f), &out.join("samples.png"))
}
