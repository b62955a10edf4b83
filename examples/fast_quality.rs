//! The table and plot of docs/fast-generation.md from `diffuse eval --json` results: one
//! file per row in a folder, named `SERIES-STEPS.json` (e.g. `teacher-euler-20.json`); the
//! series is what the plot draws as one line. `real-0.json` (`diffuse eval --real`) is the
//! floor: a row of the table and a level line in the plot.
//!
//!     cargo run --release --example fast_quality -- DIR [PLOT.png]
//!
//! Prints the Markdown table (model evaluations, FID, KID, precision, recall, class accuracy,
//! seconds to sample 1,000 images) sorted by series and evaluations, and writes FID against
//! model evaluations to PLOT.png (default docs/fast-generation.png).

use anyhow::{Context, Result};
use diffuse::plot::{PALETTE, Series, save_line_chart};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().context("usage: fast_quality DIR [PLOT.png]")?;
    let plot = args
        .get(1)
        .cloned()
        .unwrap_or("docs/fast-generation.png".into());
    let mut rows: Vec<(String, Value)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let series = stem
                .rsplit_once('-')
                .map_or(stem.clone(), |(s, _)| s.into());
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| p.display().to_string())?;
            rows.push((series, v));
        }
    }
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    rows.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(num(&a.1, "evaluations").total_cmp(&num(&b.1, "evaluations")))
    });
    println!(
        "| model and sampler | steps | model evaluations | FID | KID | precision | recall | class accuracy | seconds per 1,000 images |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (s, v) in &rows {
        let n = v["n"].as_f64().unwrap_or(1000.0);
        println!(
            "| {s} | {} | {} | {:.3} | {:.4} | {:.3} | {:.3} | {:.3} | {:.0} |",
            v["steps"],
            v["evaluations"],
            num(v, "fid"),
            num(v, "kid_mean"),
            num(v, "precision"),
            num(v, "recall"),
            num(v, "class_accuracy"),
            num(v, "sample_seconds") * 1000.0 / n
        );
        series
            .entry(s.clone())
            .or_default()
            .push((num(v, "evaluations"), num(v, "fid")));
    }
    // The floor (`diffuse eval --real`, saved as `real-0.json`): a level line across the plot.
    if let Some(floor) = series.remove("real") {
        let xs = series.values().flatten().map(|p| p.0);
        let (lo, hi) = xs.fold((f64::INFINITY, 0f64), |(l, h), x| (l.min(x), h.max(x)));
        let fid = floor[0].1;
        series.insert("real (floor)".into(), vec![(lo, fid), (hi, fid)]);
    }
    let lines: Vec<Series> = series
        .into_iter()
        .enumerate()
        .map(|(i, (name, points))| Series {
            name,
            color: PALETTE[i % PALETTE.len()],
            points,
        })
        .collect();
    save_line_chart(&lines, "model evaluations", "FID", Path::new(&plot))
}
