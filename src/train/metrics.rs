//! A run's `metrics.jsonl`: one JSON line per step, kept in step with the checkpoint on resume.

use super::RunPaths;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetricLine {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub elapsed: f64,
    /// A family's further figures (a GAN's discriminator loss and scores); none for diffusion.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// Reads a run's metrics, keeping only lines up to `max_step`.
pub fn read_metrics(path: &Path, max_step: usize) -> Vec<MetricLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<MetricLine>(l).ok())
        .filter(|m| m.step <= max_step)
        .collect()
}

/// Keeps the lines up to `start` (what the checkpoint covers; later steps will be redone) and
/// opens the file for appending. Returns it with the training time those lines had taken.
pub(super) fn restore(paths: &RunPaths, start: usize) -> Result<(File, f64)> {
    let kept = read_metrics(&paths.metrics(), start);
    let mut text = String::new();
    for m in &kept {
        text.push_str(&serde_json::to_string(m)?);
        text.push('\n');
    }
    crate::files::write_atomic(&paths.metrics(), text.as_bytes())?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(paths.metrics())
        .with_context(|| format!("cannot open {}", paths.metrics().display()))?;
    Ok((file, kept.last().map(|m| m.elapsed).unwrap_or(0.0)))
}

/// Appends one step's line, flushed.
pub(super) fn append(file: &mut File, line: &MetricLine) -> Result<()> {
    writeln!(file, "{}", serde_json::to_string(line)?)?;
    file.flush()?;
    Ok(())
}
