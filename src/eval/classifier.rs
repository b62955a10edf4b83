//! A small CNN classifier for one dataset's domain: its penultimate layer gives features for
//! FID/KID/precision/recall on small grey images (where ImageNet's Inception sees little), and
//! its predictions give the class accuracy of conditioned samples.
//!
//! `conv3x3(c, w) ReLU maxpool2, conv3x3(w, 2w) ReLU maxpool2, Linear(2w (s/4)^2, f) ReLU`
//! gives the features; `Linear(f, K)` the logits. Saved as safetensors with its
//! [`ClassifierConfig`] in the metadata (key `diffuse.classifier`).

use crate::data::{Dataset, batch_for_step};
use crate::train::adamw::AdamW;
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Metadata key of the classifier config.
pub const CLASSIFIER_KEY: &str = "diffuse.classifier";

/// Shape and training record of a classifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub image_size: usize,
    pub channels: usize,
    pub class_names: Vec<String>,
    /// Channels of the first convolution (the second has twice as many).
    pub width: usize,
    /// Size of the feature vector.
    pub feature_dim: usize,
    /// Features are multiplied by this, chosen after training so that their mean square is 1
    /// on the held-out images (KID's polynomial kernel assumes features of order 1).
    #[serde(default = "one")]
    pub feature_scale: f64,
    /// Accuracy on the held-out images after training.
    #[serde(default)]
    pub held_out_accuracy: Option<f64>,
    /// Where it was trained, for reports.
    #[serde(default)]
    pub trained_on: String,
}

fn one() -> f64 {
    1.0
}

/// The classifier network.
#[derive(Module, Debug)]
pub struct Classifier {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub pool: MaxPool2d,
    pub fc: Linear,
    pub head: Linear,
}

fn conv3(cin: usize, cout: usize, dev: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(dev)
}

impl ClassifierConfig {
    /// Checks the shape: sizes within what `train-classifier` accepts.
    pub fn validate(&self) -> Result<()> {
        if self.image_size < 4 || self.image_size > 256 {
            bail!(
                "classifier image size must be between 4 and 256 (got {})",
                self.image_size
            );
        }
        if self.channels != 1 && self.channels != 3 {
            bail!("classifier channels must be 1 or 3 (got {})", self.channels);
        }
        if !(2..=100_000).contains(&self.class_names.len()) {
            bail!("a classifier needs between 2 and 100000 classes");
        }
        if !(1..=1024).contains(&self.width) || !(2..=4096).contains(&self.feature_dim) {
            bail!("classifier width must be 1..1024 and feature_dim 2..4096");
        }
        if !(self.feature_scale.is_finite() && self.feature_scale > 0.0) {
            bail!("classifier feature_scale must be a positive number");
        }
        Ok(())
    }
}

impl Classifier {
    pub fn new(cfg: &ClassifierConfig, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let s = cfg.image_size / 4;
        Ok(Self {
            conv1: conv3(cfg.channels, cfg.width, dev),
            conv2: conv3(cfg.width, 2 * cfg.width, dev),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc: LinearConfig::new(2 * cfg.width * s * s, cfg.feature_dim).init(dev),
            head: LinearConfig::new(cfg.feature_dim, cfg.class_names.len()).init(dev),
        })
    }

    /// Features `[B, feature_dim]` of images `[B, C, S, S]` in `[-1, 1]`.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let h = self.pool.forward(relu(self.conv1.forward(x)));
        let h = self.pool.forward(relu(self.conv2.forward(h)));
        let [b, c, hh, ww] = h.dims();
        relu(self.fc.forward(h.reshape([b, c * hh * ww])))
    }

    /// Class logits `[B, K]`.
    pub fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.features(x))
    }
}

/// A classifier with its config.
#[derive(Debug)]
pub struct LoadedClassifier {
    pub config: ClassifierConfig,
    pub net: Classifier,
    pub source: String,
    /// Hash of its weights and config (keys cached features).
    pub content_hash: u64,
}

impl LoadedClassifier {
    /// Features and predicted classes of images `[N, C, S, S]` in `[-1, 1]` (host f32),
    /// in batches of 256.
    pub fn run(&self, images: &[f32], n: usize, dev: &Device) -> (Vec<f32>, Vec<usize>) {
        let c = &self.config;
        let per = c.channels * c.image_size * c.image_size;
        let mut feats = Vec::with_capacity(n * c.feature_dim);
        let mut preds = Vec::with_capacity(n);
        for start in (0..n).step_by(256) {
            let b = (n - start).min(256);
            let x = Tensor::<4>::from_data(
                TensorData::new(
                    images[start * per..(start + b) * per].to_vec(),
                    [b, c.channels, c.image_size, c.image_size],
                ),
                dev,
            );
            let f = self.net.features(x);
            let logits = self.net.head.forward(f.clone());
            let scale = c.feature_scale as f32;
            let fv: Vec<f32> = f.into_data().convert::<f32>().try_into_vec().expect("f32");
            feats.extend(fv.iter().map(|v| v * scale));
            let l: Vec<f32> = logits
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32");
            let k = c.class_names.len();
            preds.extend(l.chunks(k).map(|row| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i)
                    .unwrap_or(0)
            }));
        }
        (feats, preds)
    }
}

/// Training settings of the classifier.
#[derive(Clone, Debug)]
pub struct ClassifierTraining {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Share of the data held out to measure accuracy.
    pub held_out: f64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        Self {
            steps: 1500,
            batch: 128,
            lr: 1e-3,
            seed: 0,
            held_out: 0.1,
        }
    }
}

/// Host images of a dataset in `[-1, 1]`.
pub fn dataset_pixels(ds: &Dataset, idx: &[usize]) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| ds.image(i).iter().map(|&v| v as f32 / 127.5 - 1.0))
        .collect()
}

/// Trains a classifier on a labelled dataset (cross-entropy, AdamW with cosine decay, random
/// horizontal flips off: digits and garments are not mirror-symmetric in general), then
/// measures its accuracy on the held-out share. `on_step(step, loss)` reports progress.
pub fn train_classifier(
    ds: &Dataset,
    width: usize,
    feature_dim: usize,
    tc: &ClassifierTraining,
    on_step: &mut dyn FnMut(usize, f64),
) -> Result<LoadedClassifier> {
    let labels = ds
        .labels
        .as_ref()
        .ok_or_else(|| anyhow!("{} has no class labels", ds.source))?;
    if !(0.0..0.5).contains(&tc.held_out) {
        bail!("the held-out share must be in [0, 0.5)");
    }
    let order = crate::data::epoch_order(ds.len(), tc.seed, u64::MAX);
    let n_held = ((ds.len() as f64) * tc.held_out).round() as usize;
    let (held, train_idx) = order.split_at(n_held);
    let train_ds = Dataset {
        pixels: train_idx
            .iter()
            .flat_map(|&i| ds.image(i).to_vec())
            .collect(),
        labels: Some(train_idx.iter().map(|&i| labels[i]).collect()),
        captions: None,
        ..ds.clone()
    };
    let cfg = ClassifierConfig {
        image_size: ds.size,
        channels: ds.channels,
        class_names: ds.class_names.clone(),
        width,
        feature_dim,
        feature_scale: 1.0,
        held_out_accuracy: None,
        trained_on: ds.source.clone(),
    };
    let dev = crate::device::training_device();
    dev.seed(tc.seed);
    let mut net = Classifier::new(&cfg, &dev)?;
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 1e-4);
    for step in 0..tc.steps {
        let b = batch_for_step(&train_ds, step, tc.batch, tc.seed, false);
        let x = Tensor::<4>::from_data(TensorData::new(b.images, b.shape), &dev);
        let y: Vec<i64> = b
            .labels
            .expect("labelled")
            .iter()
            .map(|&l| l as i64)
            .collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(y, [tc.batch]), &dev);
        let logp = log_softmax(net.logits(x), 1);
        let picked: Tensor<2> = logp.gather(1, y.reshape([tc.batch, 1]));
        let loss = picked.mean().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let lv = loss.into_scalar::<f32>() as f64;
        if !lv.is_finite() {
            bail!("classifier training diverged at step {step}");
        }
        let lr = tc.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / tc.steps as f64).cos());
        net = opt.step(net, &grads, lr, 1.0);
        on_step(step + 1, lv);
    }
    let mut out = LoadedClassifier {
        config: cfg,
        net: net.valid(),
        source: ds.source.clone(),
        content_hash: 0,
    };
    if !held.is_empty() {
        let idev = crate::device::inference_device();
        let pix = dataset_pixels(ds, held);
        let (feats, preds) = out.run(&pix, held.len(), &idev);
        let right = held
            .iter()
            .zip(&preds)
            .filter(|(i, p)| labels[**i] == **p)
            .count();
        out.config.held_out_accuracy = Some(right as f64 / held.len() as f64);
        let ms = feats.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / feats.len() as f64;
        if ms > 0.0 {
            out.config.feature_scale = 1.0 / ms.sqrt();
        }
    }
    Ok(out)
}

/// Writes a classifier as safetensors with its config, atomically.
pub fn save_classifier(c: &LoadedClassifier, path: &Path) -> Result<()> {
    let mut t = NamedTensors::new();
    weights::collect(&c.net, "", &mut t);
    let mut meta = HashMap::new();
    meta.insert(
        CLASSIFIER_KEY.to_string(),
        serde_json::to_string(&c.config)?,
    );
    let bytes = weights::to_safetensors(&t, &meta, StoreDtype::F32)?;
    crate::files::write_atomic(path, &bytes)
}

/// Reads a classifier file written by [`save_classifier`].
pub fn load_classifier(path: &Path, dev: &Device) -> Result<LoadedClassifier> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {what}"))?;
    load_classifier_bytes(&bytes, &what, dev)
}

/// Reads a classifier from safetensors bytes.
pub fn load_classifier_bytes(bytes: &[u8], what: &str, dev: &Device) -> Result<LoadedClassifier> {
    let (t, meta) = weights::from_safetensors(bytes, what)?;
    let cfg: ClassifierConfig =
        serde_json::from_str(meta.get(CLASSIFIER_KEY).ok_or_else(|| {
            anyhow!("{what} is not a diffuse classifier (no {CLASSIFIER_KEY} metadata)")
        })?)
        .with_context(|| format!("{what}: invalid classifier config"))?;
    cfg.validate()
        .with_context(|| format!("{what}: invalid classifier config"))?;
    let net = weights::apply(Classifier::new(&cfg, dev)?, &t, "")
        .with_context(|| format!("{what} does not match its config"))?;
    Ok(LoadedClassifier {
        config: cfg,
        net,
        source: what.to_string(),
        content_hash: crate::eval::fnv1a(bytes.iter().copied(), 0xcbf29ce484222325),
    })
}
