//! Sampling speed as a user of `serve` or the library feels it, with the model already
//! loaded: the time to one image (batch 1) and images per second at batch 64, for a class of
//! the embedded Fashion-MNIST model (or `--model`) with DPM-Solver++(2M) at 20 steps and
//! guidance 2 (so each step runs the denoiser on the image and on the null class).
//!
//!     cargo run --release --example sample_latency -- [MODEL] [STEPS] [ROUNDS]
//!
//! Prints `RESULT latency B=1 <seconds> s` and `RESULT sample B=64 <images/s> img/s` (medians),
//! `RESULT denoiser B=1 <seconds> s`, the denoiser alone called as one image's sampling calls
//! it (STEPS times, on the image and the null class), timed in turns with the image, and
//! `RESULT sampler share <fraction>`, the median over those turns of the part of the latency
//! that is not the denoiser: the sampler's own work (guidance, the update, the noise, the
//! pipeline around them);
//! `scripts/latency_vs_torch.sh` runs it beside the
//! PyTorch twin (`scripts/sample_latency_torch.py`, diffusers' UNet2DModel on the exported
//! model) and prints the ratios. `--precision` is taken from `DIFFUSE_MATMUL` (default: the
//! processor's fastest, as the command).

use anyhow::Result;
use burn::tensor::{Distribution, Tensor};
use diffuse::kernels::{self, MatmulMode};
use diffuse::pipeline::{Conditioning, Pipeline, Request, Seeds};
use diffuse::sampler::SamplerKind;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(String::as_str).unwrap_or("fashion-mnist");
    let steps: usize = args.get(1).map_or(Ok(20), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    if std::env::var_os("DIFFUSE_MATMUL").is_none() {
        kernels::set_matmul_mode(MatmulMode::fastest())?;
    }
    diffuse::device::keep_freed_memory();
    let dev = diffuse::device::inference_device();
    let loaded = diffuse::pipeline::load_model(Some(model), &dev)?;
    // The same weights (shared storage) as the pipeline's.
    let unet = loaded.unet.clone();
    let cfg = loaded.config.unet.clone();
    let pipe = Pipeline::with_text_encoder(loaded, &dev)?;
    println!(
        "model {model} precision {} steps {steps} sampler dpmpp-2m guidance 2",
        kernels::matmul_mode().name()
    );
    let request = |n: usize, seed: u64| {
        let mut r = Request::new(n, SamplerKind::DpmPp2m);
        r.steps = Some(steps);
        r.seeds = Seeds::One(seed);
        r.batch = Some(n);
        r.conditioning = Conditioning::Classes(vec![7; n]);
        r
    };
    let time = |n: usize, seed: u64| -> Result<f64> {
        let t = Instant::now();
        pipe.run(&request(n, seed), &mut |_| {})?;
        Ok(t.elapsed().as_secs_f64())
    };
    let (c, s) = (cfg.in_channels, cfg.image_size);
    // With guidance each step runs the denoiser on the image and on the null class.
    let classes = cfg.num_classes.map(|k| vec![7, k]);
    let rows = if classes.is_some() { 2 } else { 1 };
    let denoiser = || {
        let x = Tensor::<4>::random([rows, c, s, s], Distribution::Normal(0.0, 1.0), &dev);
        let t = Instant::now();
        for i in 0..steps {
            let ti = 999.0 * (1.0 - i as f64 / steps as f64);
            let out = unet.forward(x.clone(), &vec![ti; rows], classes.as_deref());
            out.into_data();
        }
        t.elapsed().as_secs_f64()
    };
    for s in 0..2 {
        time(1, s)?;
        denoiser();
    }
    // One image, then the denoiser alone, in turns: the machine's drift falls on both alike.
    let (mut one, mut alone, mut share) = (Vec::new(), Vec::new(), Vec::new());
    for s in 0..rounds {
        let (a, b) = (time(1, 100 + s as u64)?, denoiser());
        one.push(a);
        alone.push(b);
        share.push(1.0 - b / a);
    }
    println!("RESULT latency B=1 {:.4} s", median(one));
    println!("RESULT denoiser B=1 {:.4} s", median(alone));
    println!("RESULT sampler share {:.3}", median(share));
    time(64, 0)?;
    let many: Vec<f64> = (0..rounds.div_ceil(4).max(2))
        .map(|s| time(64, 200 + s as u64))
        .collect::<Result<_>>()?;
    println!("RESULT sample B=64 {:.2} img/s", 64.0 / median(many));
    Ok(())
}
