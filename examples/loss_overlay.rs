//! The loss curves of several runs on one chart, and how far each is from the first run step
//! by step: `cargo run --release --example loss_overlay -- OUT.png NAME=RUN [NAME=RUN ...]`.
//! Each curve is the mean loss over a window of 10 steps (the raw losses are printed as the
//! largest step-by-step difference). Made for docs/SCALING.md's one-device against
//! two-device comparison.

use anyhow::{Context, Result, bail};
use diffuse::plot::{PALETTE, Series, save_line_chart};
use diffuse::train::read_metrics;
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: loss_overlay OUT.png NAME=RUN [NAME=RUN ...]");
    }
    let mut runs = Vec::new();
    for a in &args[1..] {
        let (name, dir) = a.split_once('=').context("each run is NAME=RUN")?;
        let m = read_metrics(&Path::new(dir).join("metrics.jsonl"), usize::MAX);
        if m.is_empty() {
            bail!("{dir} has no metrics.jsonl lines");
        }
        runs.push((name.to_string(), m));
    }
    let window = 10;
    let series: Vec<Series> = runs
        .iter()
        .enumerate()
        .map(|(i, (name, m))| Series {
            name: name.clone(),
            color: PALETTE[i % PALETTE.len()],
            points: m
                .chunks(window)
                .map(|c| {
                    let mean = c.iter().map(|l| l.loss).sum::<f64>() / c.len() as f64;
                    (c.last().unwrap().step as f64, mean)
                })
                .collect(),
        })
        .collect();
    save_line_chart(
        &series,
        "step",
        "loss (mean of 10 steps)",
        Path::new(&args[0]),
    )?;
    let first = &runs[0].1;
    for (name, m) in &runs[1..] {
        let n = first.len().min(m.len());
        let (mut worst, mut at) = (0f64, 0);
        for (a, b) in first.iter().zip(m).take(n) {
            let d = (a.loss - b.loss).abs() / a.loss.abs();
            if d > worst {
                (worst, at) = (d, a.step);
            }
        }
        let mean = |m: &[diffuse::train::MetricLine]| {
            m[n - n.min(50)..n].iter().map(|l| l.loss).sum::<f64>() / n.min(50) as f64
        };
        println!(
            "{name} against {}: {n} steps; largest relative loss difference {worst:.2e} (step {at}); mean loss of the last 50 steps {:.5} against {:.5}",
            runs[0].0,
            mean(m),
            mean(first)
        );
    }
    Ok(())
}
