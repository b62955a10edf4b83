//! `diffuse bench`: the benchmark U-Net (shared/bench/MODEL.md) built from diffuse's blocks.

use anyhow::{Result, bail};
use std::path::Path;

pub fn run(warmup: usize, iters: usize, json: Option<&Path>) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let r = crate::bench::run(warmup, iters, &mut |l| eprintln!("{l}"));
    println!(
        "backend {} precision {} params {}",
        r.backend, r.precision, r.params
    );
    println!("RESULT train B=16 {:.2} img/s", r.train_b16_img_per_s);
    println!("RESULT train B=64 {:.2} img/s", r.train_b64_img_per_s);
    println!("RESULT infer B=64 {:.2} img/s", r.infer_b64_img_per_s);
    println!("peak RSS {:.2} GB", r.peak_rss_bytes as f64 / 1e9);
    if let Some(p) = json {
        crate::files::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    Ok(())
}
