//! Sampling speed as a user of `serve` or the library feels it, with the model already
//! loaded: the time to one image (batch 1) and images per second at batch 64, for a class of
//! the embedded Fashion-MNIST model (or `--model`) with DPM-Solver++(2M) at 20 steps and
//! guidance 2 (so each step runs the denoiser on the image and on the null class).
//!
//!     cargo run --release --example sample_latency -- [MODEL] [STEPS] [ROUNDS]
//!
//! Prints `RESULT latency B=1 <seconds> s` and `RESULT sample B=64 <images/s> img/s` (medians);
//! `scripts/latency_vs_torch.sh` runs it beside the
//! PyTorch twin (`scripts/sample_latency_torch.py`, diffusers' UNet2DModel on the exported
//! model) and prints the ratios. `--precision` is taken from `DIFFUSE_MATMUL` (default: the
//! processor's fastest, as the command).

use anyhow::Result;
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
    let pipe = Pipeline::load(Some(model), &dev)?;
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
    for s in 0..2 {
        time(1, s)?;
    }
    let one: Vec<f64> = (0..rounds)
        .map(|s| time(1, 100 + s as u64))
        .collect::<Result<_>>()?;
    println!("RESULT latency B=1 {:.4} s", median(one));
    time(64, 0)?;
    let many: Vec<f64> = (0..rounds.div_ceil(4).max(2))
        .map(|s| time(64, 200 + s as u64))
        .collect::<Result<_>>()?;
    println!("RESULT sample B=64 {:.2} img/s", 64.0 / median(many));
    Ok(())
}
