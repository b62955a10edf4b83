//! Training data: image folders, IDX files (MNIST/Fashion-MNIST), the scikit-learn digits CSV,
//! and named datasets fetched with package clients. Everything is decoded once into memory as
//! `u8` pixels; batches are built from there.

pub mod captions;
pub mod emoji;
pub mod fetch;
pub mod folder;
pub mod idx;

use anyhow::{Result, bail};
use rand::seq::SliceRandom;
use std::path::{Path, PathBuf};

use crate::rng::{Stream, rng_for};

/// A decoded dataset: `n` square images of `channels x size x size` pixels, CHW order.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Pixel values, image after image, each `channels * size * size` long.
    pub pixels: Vec<u8>,
    /// One class index per image, when the dataset is labelled.
    pub labels: Option<Vec<usize>>,
    /// Class names by index.
    pub class_names: Vec<String>,
    /// Captions per image (alternatives), for folders that have them ([`captions`]).
    pub captions: Option<Vec<Vec<String>>>,
    pub channels: usize,
    pub size: usize,
    /// Where the data came from, for messages.
    pub source: String,
}

/// How images are brought to the training shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Side length after resizing and centre-cropping.
    pub size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.image_len()
    }

    /// True when the dataset holds no image.
    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let l = self.image_len();
        &self.pixels[i * l..(i + 1) * l]
    }

    /// `n` images spread evenly over the set (indices `i * len / n`), as `[-1, 1]` floats,
    /// NCHW: for previews and evaluations.
    pub fn spread_f32(&self, n: usize) -> Vec<f32> {
        let n = n.min(self.len());
        let mut out = Vec::with_capacity(n * self.image_len());
        for i in 0..n {
            out.extend(
                self.image(i * self.len() / n)
                    .iter()
                    .map(|&p| p as f32 / 127.5 - 1.0),
            );
        }
        out
    }

    /// Number of classes (0 when unlabelled).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Brings every image to `shape` (nearest-area resampling through the `image` crate and
    /// channel conversion), keeping labels.
    pub fn reshape_to(self, shape: Shape) -> Result<Self> {
        if shape.size == 0 {
            bail!("the image size to load the data at must be positive");
        }
        if self.size == shape.size && self.channels == shape.channels {
            return Ok(self);
        }
        let mut pixels = Vec::with_capacity(self.len() * shape.channels * shape.size * shape.size);
        for i in 0..self.len() {
            let img = folder::chw_to_image(self.image(i), self.channels, self.size);
            pixels.extend(folder::image_to_chw(&img, shape.size, shape.channels));
        }
        Ok(Self {
            pixels,
            channels: shape.channels,
            size: shape.size,
            ..self
        })
    }
}

/// Resolves `--data`: an existing path, the name of a fetched dataset in the cache, or
/// `NAME:test` for its held-out test split (Fashion-MNIST's 10,000 `t10k` images).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(name) = spec.strip_suffix(":test")
        && fetch::Dataset::from_name(name).is_some()
    {
        let test = resolve(name)?.join("t10k-images-idx3-ubyte.gz");
        if !test.is_file() {
            bail!("dataset '{name}' has no test split here (fashion-mnist has one)");
        }
        return Ok(test);
    }
    if let Some(ds) = fetch::Dataset::from_name(spec) {
        let dir = crate::fetch::cache_dir()?.join(ds.name());
        if dir.exists() {
            if ds == fetch::Dataset::Digits {
                return Ok(dir.join("digits.csv.gz"));
            }
            return Ok(dir);
        }
        bail!(
            "dataset '{spec}' is not fetched yet: run `diffuse fetch {}` first",
            ds.name()
        );
    }
    Err(crate::files::not_found(format!(
        "data '{spec}' does not exist (give a folder of images, an IDX file, a digits CSV, or a dataset name: fashion-mnist, mnist, digits, emoji, or fashion-mnist:test for its test split)"
    )))
}

/// The image shape a data spec has of its own: IDX files and the digits CSV know theirs
/// (grey); image folders have none (`None`).
pub fn native_shape(spec: &str) -> Result<Option<Shape>> {
    let path = resolve(spec)?;
    Ok(if idx::is_digits_csv(&path) {
        Some(Shape {
            size: 8,
            channels: 1,
        })
    } else if idx::is_idx(&path)? {
        Some(Shape {
            size: idx::load_idx(&path)?.size,
            channels: 1,
        })
    } else {
        None
    })
}

/// Loads training data from a path: a folder of images (optionally with class subfolders), a
/// folder or file in IDX format, or the scikit-learn digits CSV (`.csv` or `.csv.gz`).
/// `with_classes` asks for labels (class subfolders for an image folder).
pub fn load(spec: &str, shape: Shape, with_classes: bool) -> Result<Dataset> {
    if !(1..=3).contains(&shape.channels) || shape.channels == 2 {
        bail!(
            "the data can be loaded with 1 or 3 channels, not {}",
            shape.channels
        );
    }
    if shape.size == 0 {
        bail!("the image size to load the data at must be positive");
    }
    let path = resolve(spec)?;
    let ds = if idx::is_digits_csv(&path) {
        idx::load_digits_csv(&path)?
    } else if idx::is_idx(&path)? {
        idx::load_idx(&path)?
    } else if path.is_dir() {
        folder::load_folder(&path, shape, with_classes)?
    } else {
        bail!(
            "{} is neither an image folder, an IDX file nor a digits CSV",
            path.display()
        );
    };
    if ds.is_empty() {
        bail!("{} holds no usable image", path.display());
    }
    if with_classes && ds.labels.is_none() {
        bail!(
            "{} has no class labels (put the images of each class in its own subfolder)",
            path.display()
        );
    }
    let mut ds = ds.reshape_to(shape)?;
    if !with_classes {
        ds.labels = None;
        ds.class_names.clear();
    }
    Ok(ds)
}

/// The order in which epoch `e` visits the dataset: a permutation drawn from `(seed, e)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng_for(seed, Stream::Epoch, epoch));
    idx
}

/// A training batch on the host: pixels in `[-1, 1]`, NCHW, and labels.
#[derive(Clone, Debug)]
pub struct HostBatch {
    pub step: usize,
    pub images: Vec<f32>,
    pub labels: Option<Vec<usize>>,
    /// Dataset index of each image (for captions).
    pub indices: Vec<usize>,
    pub shape: [usize; 4],
}

/// Builds the batch of training step `step`: items `step*B .. (step+1)*B` of the endless
/// sequence of epochs, each a fresh permutation. Stateless, so a resumed run sees exactly the
/// batches it would have seen. With `hflip`, each image is mirrored with probability 1/2.
pub fn batch_for_step(
    ds: &Dataset,
    step: usize,
    batch: usize,
    seed: u64,
    hflip: bool,
) -> HostBatch {
    let n = ds.len();
    let start = step * batch;
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    let (c, s) = (ds.channels, ds.size);
    let mut images = Vec::with_capacity(batch * ds.image_len());
    let mut labels = ds.labels.as_ref().map(|_| Vec::with_capacity(batch));
    let mut indices = Vec::with_capacity(batch);
    let mut flip_rng = rng_for(seed, Stream::TrainStep, (step as u64) | (1 << 40));
    for k in start..start + batch {
        let e = (k / n) as u64;
        if e != order_epoch {
            order = epoch_order(n, seed, e);
            order_epoch = e;
        }
        let i = order[k % n];
        indices.push(i);
        let img = ds.image(i);
        let flip = hflip && rand::Rng::gen_bool(&mut flip_rng, 0.5);
        for ch in 0..c {
            for y in 0..s {
                for x in 0..s {
                    let sx = if flip { s - 1 - x } else { x };
                    let v = img[ch * s * s + y * s + sx];
                    images.push(v as f32 / 127.5 - 1.0);
                }
            }
        }
        if let (Some(l), Some(all)) = (labels.as_mut(), ds.labels.as_ref()) {
            l.push(all[i]);
        }
    }
    HostBatch {
        step,
        images,
        labels,
        indices,
        shape: [batch, c, s, s],
    }
}
