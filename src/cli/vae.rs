//! `diffuse train-vae` and `diffuse vae encode|decode`.

use crate::data::{self, Shape};
use crate::device::inference_device;
use crate::imageio::{ImageBatch, display_factor, grid, load_image, save_image, upscale};
use crate::train::vae::VaeTrainConfig;
use crate::vae::{self, VaeConfig};
use crate::weights::{self, HostTensor, NamedTensors, StoreDtype};
use anyhow::{Context, Result, bail};
use burn::tensor::{Tensor, TensorData};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainVaeArgs {
    /// Image folder, IDX file or fetched dataset name (fashion-mnist, mnist, digits, emoji).
    #[arg(long)]
    data: String,
    /// Output folder: a diffusers AutoencoderKL folder (config.json,
    /// diffusion_pytorch_model.safetensors) plus train.json, metrics.jsonl, recon.png and
    /// samples.png.
    #[arg(long)]
    out: PathBuf,
    /// Image side in pixels (default 32).
    #[arg(long)]
    image_size: Option<usize>,
    /// 1 (grey) or 3 (RGB); default 3 for folders, 1 for IDX and digits.
    #[arg(long)]
    channels: Option<usize>,
    /// Channels per level, comma-separated; each level after the first halves the resolution
    /// (default 32,64,64: latents at 1/4 of the image side).
    #[arg(long, default_value = "32,64,64")]
    widths: String,
    /// Latent channels.
    #[arg(long, default_value_t = 4)]
    latent_channels: usize,
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Weight of the KL term against the summed absolute error (1e-6 as in latent diffusion).
    #[arg(long, default_value_t = 1e-6)]
    kl_weight: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the folder every N steps (the run cannot be resumed; this keeps the latest
    /// weights safe).
    #[arg(long, default_value_t = 500)]
    save_every: usize,
}

#[derive(Subcommand)]
pub enum VaeCmd {
    /// Images to scaled latents (`(mean - shift) * scaling_factor`), saved as the tensor
    /// "latent" [N, C, h, w] of a safetensors file.
    Encode {
        /// VAE folder (diffuse train-vae output or a diffusers AutoencoderKL folder).
        #[arg(long)]
        vae: PathBuf,
        /// Images, resized and centre-cropped to the VAE's sample_size.
        #[arg(long, num_args = 1.., required = true)]
        image: Vec<PathBuf>,
        #[arg(long, default_value = "latents.safetensors")]
        out: PathBuf,
    },
    /// Scaled latents (tensor "latent" of a safetensors file) to images.
    Decode {
        #[arg(long)]
        vae: PathBuf,
        #[arg(long)]
        latent: PathBuf,
        /// A grid of the decoded images.
        #[arg(long, default_value = "decoded.png")]
        out: PathBuf,
        /// Also each image here (00000.png, ...).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn parse_widths(s: &str) -> Result<Vec<usize>> {
    let w: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--widths '{s}' is not a comma-separated list of numbers"))?;
    if w.is_empty() || w.len() > 6 {
        bail!("--widths takes 1 to 6 levels (got {})", w.len());
    }
    Ok(w)
}

pub fn train_vae_cmd(a: TrainVaeArgs) -> Result<()> {
    let widths = parse_widths(&a.widths)?;
    let path = data::resolve(&a.data)?;
    let native = data::idx::is_digits_csv(&path) || data::idx::is_idx(&path)?;
    let channels = a.channels.unwrap_or(if native { 1 } else { 3 });
    if channels != 1 && channels != 3 {
        bail!("--channels must be 1 or 3 (got {channels})");
    }
    let size = match a.image_size {
        Some(s) => s,
        None => data::native_shape(&a.data)?.map_or(32, |s| s.size),
    };
    let cfg = VaeConfig::small(channels, size, &widths, a.latent_channels);
    cfg.validate().context("VAE settings")?;
    if size == 0 || size % cfg.downscale() != 0 {
        bail!(
            "--image-size {size} must be a positive multiple of {} (the VAE halves it {} times)",
            cfg.downscale(),
            widths.len() - 1
        );
    }
    let tc = VaeTrainConfig {
        steps: a.steps,
        batch_size: a.batch,
        lr: a.lr,
        warmup_steps: 100.min(a.steps / 10),
        grad_clip: 1.0,
        kl_weight: a.kl_weight,
        seed: a.seed,
        save_every: a.save_every,
        data: a.data.clone(),
    };
    tc.validate()?;
    let ds = data::load(&a.data, Shape { size, channels }, false)?;
    let [lc, lh, lw] = cfg.latent_shape(size);
    eprintln!(
        "training a VAE on {} images ({channels}x{size}x{size} -> latents {lc}x{lh}x{lw}) from {}, {} steps, into {}",
        ds.len(),
        ds.source,
        a.steps,
        a.out.display()
    );
    let pb = super::bar(
        a.steps as u64,
        "{bar:40} {pos}/{len}  loss {msg}  {per_sec}  ETA {eta}",
    );
    let v = crate::train::vae::train(&cfg, &tc, ds, &a.out, &mut |s, l| {
        pb.set_position(s as u64);
        pb.set_message(format!("{l:.4}"));
    })?;
    pb.finish_and_clear();
    println!(
        "trained the VAE ({} steps, scaling_factor {:.4}); wrote {} (recon.png, samples.png)",
        a.steps,
        v.config.scaling_factor,
        a.out.display()
    );
    Ok(())
}

pub fn vae_cmd(c: VaeCmd) -> Result<()> {
    let dev = inference_device();
    match c {
        VaeCmd::Encode { vae, image, out } => {
            let v = vae::load(&vae, &dev)?;
            let size = v.config.sample_size;
            if size == 0 {
                bail!("{}: config.json has no sample_size", vae.display());
            }
            let imgs: Vec<Tensor<4>> = image
                .iter()
                .map(|p| load_image(p, size, v.config.in_channels, &dev))
                .collect::<Result<_>>()?;
            let z = v.encode_scaled(Tensor::cat(imgs, 0));
            let shape = z.dims().to_vec();
            let mut t = NamedTensors::new();
            t.insert(
                "latent".into(),
                HostTensor {
                    shape: shape.clone(),
                    data: z.into_data().convert::<f32>().try_into_vec().expect("f32"),
                },
            );
            let bytes = weights::to_safetensors(&t, &Default::default(), StoreDtype::F32)?;
            crate::files::write_atomic(&out, &bytes)?;
            println!("wrote {} (latent {:?})", out.display(), shape);
        }
        VaeCmd::Decode {
            vae,
            latent,
            out,
            out_dir,
        } => {
            let v = vae::load(&vae, &dev)?;
            let (t, _) = weights::read_safetensors(&latent)?;
            let z = t
                .get("latent")
                .with_context(|| format!("{} has no tensor named \"latent\"", latent.display()))?;
            let want = v.config.latent_channels;
            if z.shape.len() != 4 || z.shape[1] != want || z.shape[0] == 0 {
                bail!(
                    "{}: \"latent\" has shape {:?}; this VAE decodes [N, {want}, h, w]",
                    latent.display(),
                    z.shape
                );
            }
            let s: [usize; 4] = z.shape.clone().try_into().expect("4 dims");
            let x = v.decode_scaled(Tensor::from_data(TensorData::new(z.data.clone(), s), &dev));
            let batch = ImageBatch::from_tensor(x);
            let imgs: Vec<_> = (0..batch.len()).map(|i| batch.image(i)).collect();
            let side = imgs[0].width() as usize;
            save_image(
                &upscale(&grid(&imgs, imgs.len().min(8)), display_factor(side)),
                &out,
            )?;
            println!("wrote {} ({} images)", out.display(), imgs.len());
            if let Some(dir) = out_dir {
                for (i, img) in imgs.iter().enumerate() {
                    save_image(&img.to_rgb8(), &dir.join(format!("{i:05}.png")))?;
                }
                println!("wrote {} images to {}", imgs.len(), dir.display());
            }
        }
    }
    Ok(())
}
