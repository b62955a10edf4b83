//! Sample quality against sampling steps for every sampler, on the embedded Fashion-MNIST
//! model, judged by the embedded Fashion-MNIST classifier's features against the test set.
//!
//!     cargo run --release --example steps_quality -- [N] [STEPS,..] [SAMPLERS,..] [GUIDANCE]
//!
//! Defaults: 500 images per cell, steps 10,20,50,100 for every sampler plus DDPM at 1000,
//! guidance 1. Writes its results as it goes to docs/steps-quality.json (or `$STEPS_QUALITY_JSON`,
//! so that two runs can share the work), skips cells found in any docs/steps-quality*.json,
//! and writes docs/steps-quality.md (the table) and docs/steps-quality.png (FID against
//! steps) from all of them, keeping the hand-written sections below the table. Needs
//! `diffuse fetch fashion-mnist`.

use anyhow::Result;
use diffuse::data;
use diffuse::device::inference_device;
use diffuse::eval::{self, SampleSpec, compare, evaluate, real_subset};
use diffuse::pipeline::{Generator, Pipeline, Request};
use diffuse::plot::{PALETTE, Series, save_line_chart};
use diffuse::sampler::SamplerKind;
use serde_json::{Value, json};
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(500);
    let steps: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').map(|v| v.parse()).collect())
        .transpose()?
        .unwrap_or(vec![10, 20, 50, 100]);
    let kinds: Vec<SamplerKind> = args
        .get(2)
        .map(|s| s.split(',').map(|v| v.parse()).collect())
        .transpose()?
        .unwrap_or(SamplerKind::ALL.to_vec());
    let guidance: f32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1.0);

    let dev = inference_device();
    let generator = Generator::Diffusion(Pipeline::load(None, &dev)?);
    let ext = eval::load_features("fashion-mnist", &dev)?;
    let dir = data::resolve("fashion-mnist")?;
    let test = eval::load_images(
        dir.join("t10k-images-idx3-ubyte.gz").to_str().unwrap(),
        &ext,
        false,
    )?;
    let out_name = std::env::var("STEPS_QUALITY_JSON").unwrap_or("docs/steps-quality.json".into());
    let out_json = Path::new(&out_name);
    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    };
    let others = || -> Vec<Value> {
        let mut v = Vec::new();
        for e in std::fs::read_dir("docs").into_iter().flatten().flatten() {
            let p = e.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if name.starts_with("steps-quality") && name.ends_with(".json") && p != out_json {
                v.extend(read(&p));
            }
        }
        v
    };
    let mut results: Vec<Value> = read(out_json);
    let have = |results: &[Value], name: &str, k: usize| {
        results.iter().any(|r| {
            r["sampler"] == name
                && r["steps"] == k
                && r["n"] == n
                && r["guidance"] == guidance as f64
        })
    };

    // The floor: n real training images against the test set.
    if !have(&results, "real", 0) && !have(&others(), "real", 0) {
        let train = real_subset(eval::load_images("fashion-mnist", &ext, false)?, n);
        let r = compare(&ext, &test, &train, None, &Default::default(), &dev)?;
        results.push(
            json!({"sampler": "real", "steps": 0, "n": n, "guidance": guidance as f64,
                            "report": r, "sample_seconds": 0.0}),
        );
    }
    let mut plan: Vec<(SamplerKind, usize)> = kinds
        .iter()
        .flat_map(|&k| steps.iter().map(move |&s| (k, s)))
        .collect();
    if args.get(1).is_none() {
        plan.push((SamplerKind::Ddpm, 1000));
    }
    for (kind, k) in plan {
        if have(&results, kind.name(), k) || have(&others(), kind.name(), k) {
            continue;
        }
        let mut request = Request::new(n, kind);
        request.steps = Some(k);
        request.guidance = guidance;
        let spec = SampleSpec {
            request,
            n,
            batch: 250,
            seed: 0,
        };
        let out = evaluate(&generator, &test, &ext, &spec, &mut |_| {})?;
        println!(
            "{:8} {:5} steps: FID {:.3}  KID {:.4}  P {:.3} R {:.3}  acc {:.3}  ({:.0} s)",
            kind.name(),
            k,
            out.report.fid,
            out.report.kid_mean,
            out.report.precision,
            out.report.recall,
            out.report.class_accuracy.unwrap_or(f64::NAN),
            out.sample_seconds
        );
        results.push(json!({"sampler": kind.name(), "steps": k, "n": n,
                            "guidance": guidance as f64,
                            "evaluations": kind.evaluations(k),
                            "report": out.report, "sample_seconds": out.sample_seconds}));
        std::fs::write(out_json, serde_json::to_string_pretty(&results)? + "\n")?;
    }
    std::fs::write(out_json, serde_json::to_string_pretty(&results)? + "\n")?;

    // Table and plot of this (n, guidance), from every results file.
    let all: Vec<Value> = results.iter().cloned().chain(others()).collect();
    let mine: Vec<&Value> = all
        .iter()
        .filter(|r| r["n"] == n && r["guidance"] == guidance as f64)
        .collect();
    let mut md = format!(
        "# Sample quality against sampling steps\n\n\
         The embedded Fashion-MNIST model, {n} images per row (classes in turn), guidance \
         {guidance}, seed 0, judged against the 10,000 Fashion-MNIST test images with the \
         features of the embedded Fashion-MNIST classifier (`--features fashion-mnist`, 128-d). \
         The `real` row is the floor: {n} training images (every 240th) against the same test \
         set. FID and KID at {n} images are biased upward; compare rows with each other, not \
         with published numbers. Class accuracy: the classifier's agreement with the class \
         asked for (92% on real held-out images). Seconds: wall time of the sampling on a \
         2-core CPU shared with other runs, and rows made from 2026-11-26 on (the 100-step euler, \
         euler-a and heun rows) with the project's faster kernels, so only roughly \
         comparable; model evaluations \
         are the cost that matters (Heun evaluates twice per step). Made by \
         `cargo run --release --example steps_quality` (see its header for arguments); \
         plot: `steps-quality.png`.\n\n\
         | sampler | steps | model evaluations | FID | KID | precision | recall | class accuracy | seconds |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut series = Vec::new();
    for (ci, name) in std::iter::once("real")
        .chain(SamplerKind::ALL.iter().map(|k| k.name()))
        .enumerate()
    {
        let mut rows: Vec<&&Value> = mine.iter().filter(|r| r["sampler"] == name).collect();
        rows.sort_by_key(|r| r["steps"].as_u64());
        let mut pts = Vec::new();
        for r in rows {
            let rep = &r["report"];
            let acc = rep["class_accuracy"]
                .as_f64()
                .map_or("-".to_string(), |a| format!("{:.3}", a));
            md += &format!(
                "| {} | {} | {} | {:.3} | {:.4} | {:.3} | {:.3} | {} | {:.0} |\n",
                name,
                if name == "real" {
                    "-".into()
                } else {
                    r["steps"].to_string()
                },
                r["evaluations"]
                    .as_u64()
                    .map_or("-".into(), |e| e.to_string()),
                rep["fid"].as_f64().unwrap_or(f64::NAN),
                rep["kid_mean"].as_f64().unwrap_or(f64::NAN),
                rep["precision"].as_f64().unwrap_or(f64::NAN),
                rep["recall"].as_f64().unwrap_or(f64::NAN),
                acc,
                r["sample_seconds"].as_f64().unwrap_or(0.0)
            );
            if name != "real" {
                pts.push((
                    r["steps"].as_f64().unwrap_or(1.0),
                    rep["fid"].as_f64().unwrap_or(f64::NAN),
                ));
            }
        }
        if !pts.is_empty() {
            series.push(Series {
                name: name.to_string(),
                color: PALETTE[ci % PALETTE.len()],
                points: pts,
            });
        }
    }
    // The floor as a flat line across the steps measured.
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    if let Some(floor) = mine
        .iter()
        .find(|r| r["sampler"] == "real")
        .and_then(|r| r["report"]["fid"].as_f64())
        && !xs.is_empty()
    {
        let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().cloned().fold(0.0, f64::max);
        series.push(Series {
            name: "real (floor)".into(),
            color: [120, 120, 120],
            points: vec![(lo, floor), (hi, floor)],
        });
    }
    // Hand-written sections after the table (from its first `## ` heading on) are kept.
    if let Ok(old) = std::fs::read_to_string("docs/steps-quality.md")
        && let Some(i) = old.find("\n## ")
    {
        md += &old[i..];
    }
    std::fs::write("docs/steps-quality.md", &md)?;
    save_line_chart(
        &series,
        "sampling steps",
        "fid (classifier features)",
        Path::new("docs/steps-quality.png"),
    )?;
    println!("{md}");
    Ok(())
}
