//! Evaluation: how close generated images are to real ones. Features come from a feature
//! extractor (a domain classifier trained by [`classifier`]); [`metrics`] turns two feature
//! sets into FID, KID, precision and recall; a classifier also gives the class accuracy of
//! conditioned samples.

pub mod classifier;
pub mod metrics;

use crate::data::{self, Dataset, Shape};
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use classifier::{LoadedClassifier, dataset_pixels};
use metrics::{FeatureStats, frechet_distance, kid, precision_recall};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The Fashion-MNIST classifier shipped inside the binary (`--features fashion-mnist`).
pub static EMBEDDED_FASHION_CLASSIFIER: &[u8] =
    include_bytes!("../../models/fashion-mnist-classifier.safetensors");

/// Loads `--features`: a classifier file, or `fashion-mnist` for the embedded one.
pub fn load_features(spec: &str, dev: &Device) -> Result<LoadedClassifier> {
    if spec == "fashion-mnist" {
        return classifier::load_classifier_bytes(
            EMBEDDED_FASHION_CLASSIFIER,
            "the embedded fashion-mnist classifier",
            dev,
        );
    }
    if spec == "inception" {
        bail!(
            "--features inception is not available yet; use a classifier (`diffuse train-classifier`) or fashion-mnist"
        );
    }
    let p = Path::new(spec);
    if !p.exists() {
        bail!("--features '{spec}' is neither fashion-mnist nor an existing classifier file");
    }
    classifier::load_classifier(p, dev)
}

/// A set of images as the extractor sees them: resized to its input and in `[-1, 1]`.
pub struct Images {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub labels: Option<Vec<usize>>,
}

/// Loads a dataset (`--data` spec or image folder) at the extractor's input shape.
pub fn load_images(spec: &str, ext: &LoadedClassifier, with_labels: bool) -> Result<Images> {
    let shape = Shape {
        size: ext.config.image_size,
        channels: ext.config.channels,
    };
    let ds: Dataset = data::load(spec, shape, with_labels)?;
    let all: Vec<usize> = (0..ds.len()).collect();
    Ok(Images {
        pixels: dataset_pixels(&ds, &all),
        n: ds.len(),
        labels: ds.labels.clone(),
    })
}

/// Everything `diffuse fid` and `diffuse eval` report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub fid: f64,
    pub kid_mean: f64,
    pub kid_std: f64,
    pub precision: f64,
    pub recall: f64,
    /// Share of conditioned samples the classifier assigns to the requested class.
    pub class_accuracy: Option<f64>,
    pub n_a: usize,
    pub n_b: usize,
    pub features: String,
    pub feature_dim: usize,
}

/// Options of the metrics.
#[derive(Clone, Debug)]
pub struct MetricOptions {
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    pub k: usize,
    /// Precision/recall on at most this many images of each set (its cost is quadratic).
    pub pr_max: usize,
    pub seed: u64,
}

impl Default for MetricOptions {
    fn default() -> Self {
        Self {
            kid_subsets: 100,
            kid_subset_size: 1000,
            k: 3,
            pr_max: 5000,
            seed: 0,
        }
    }
}

/// Compares two image sets (`a` is the reference, `b` the one judged). `wanted` holds the
/// requested class of each image of `b` for the class accuracy.
pub fn compare(
    ext: &LoadedClassifier,
    a: &Images,
    b: &Images,
    wanted: Option<&[usize]>,
    opts: &MetricOptions,
    dev: &Device,
) -> Result<Report> {
    let dim = ext.config.feature_dim;
    for (name, set) in [("the first set", a), ("the second set", b)] {
        if set.n < 2 {
            bail!("{name} has {} images; FID needs at least 2", set.n);
        }
    }
    let (fa, _) = ext.run(&a.pixels, a.n, dev);
    let (fb, pb) = ext.run(&b.pixels, b.n, dev);
    let sa = FeatureStats::from_features(&fa, dim)?;
    let sb = FeatureStats::from_features(&fb, dim)?;
    let fid = frechet_distance(&sa, &sb)?;
    let (kid_mean, kid_std) = kid(
        &fa,
        &fb,
        dim,
        opts.kid_subsets,
        opts.kid_subset_size,
        opts.seed,
    );
    // An evenly strided subset (sets may be ordered by class).
    let cap = |f: &[f32], n: usize| -> Vec<f32> {
        let stride = n.div_ceil(opts.pr_max.max(1));
        (0..n)
            .step_by(stride)
            .flat_map(|i| f[i * dim..(i + 1) * dim].iter().copied())
            .collect()
    };
    let (precision, recall) = precision_recall(&cap(&fa, a.n), &cap(&fb, b.n), dim, opts.k)
        .context("precision/recall")?;
    let class_accuracy = wanted.map(|w| {
        let right = w.iter().zip(&pb).filter(|(x, y)| x == y).count();
        right as f64 / w.len().max(1) as f64
    });
    Ok(Report {
        fid,
        kid_mean,
        kid_std,
        precision,
        recall,
        class_accuracy,
        n_a: a.n,
        n_b: b.n,
        features: ext.source.clone(),
        feature_dim: dim,
    })
}
