//! `diffuse noise`: the forward-diffusion strip of one image, x_t at several timesteps.

use super::parse_list;
use crate::device::inference_device;
use crate::imageio::{ImageBatch, grid, load_image, save_image};
use crate::rng::{Stream, normal_tensor, rng_for};
use crate::schedule::{BetaSchedule, NoiseSchedule, ScheduleConfig};
use anyhow::{Result, bail};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct NoiseArgs {
    /// Input image.
    #[arg(long)]
    image: PathBuf,
    /// Output PNG strip.
    #[arg(long)]
    out: PathBuf,
    /// Timesteps to show, comma-separated.
    #[arg(long, default_value = "0,50,100,250,500,999")]
    timesteps: String,
    /// Beta schedule.
    #[arg(long, value_enum, default_value_t = ScheduleConfig::default().beta_schedule)]
    schedule: BetaSchedule,
    /// Diffusion steps T.
    #[arg(long, default_value_t = ScheduleConfig::default().timesteps)]
    total: usize,
    /// Side length the image is resized to.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Random seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: NoiseArgs) -> Result<()> {
    // The output path is checked before any work.
    crate::imageio::output_format(&a.out)?;
    let dev = inference_device();
    let sched = NoiseSchedule::new(&ScheduleConfig {
        beta_schedule: a.schedule,
        timesteps: a.total,
        ..ScheduleConfig::default()
    })?;
    if a.size == 0 || a.size > 2048 {
        bail!("--size must be between 1 and 2048 (got {})", a.size);
    }
    let ts = parse_list(&a.timesteps, "--timesteps")?;
    if ts.is_empty() {
        bail!("--timesteps is empty");
    }
    if let Some(bad) = ts.iter().find(|&&t| t >= sched.len()) {
        bail!(
            "--timesteps: {bad} is outside 0..{} (T = {})",
            sched.len() - 1,
            sched.len()
        );
    }
    let x0 = load_image(&a.image, a.size, 3, &dev)?;
    let mut rng = rng_for(a.seed, Stream::Sample, 0);
    let eps = normal_tensor(&mut rng, [1, 3, a.size, a.size], &dev);
    let frames: Vec<_> = ts
        .iter()
        .map(|&t| ImageBatch::from_tensor(sched.q_sample(x0.clone(), eps.clone(), &[t])).image(0))
        .collect();
    save_image(&grid(&frames, frames.len()), &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
