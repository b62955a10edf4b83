//! `diffuse train-classifier`, `diffuse fid` and `diffuse eval`.

use super::{bar, given};
use crate::data::{self, Shape};
use crate::device::inference_device;
use crate::eval::classifier::{self, ClassifierTraining};
use crate::eval::{self, MetricOptions, Report, SampleSpec, evaluate, real_subset};
use crate::model::{Family, Loaded};
use crate::pipeline::{Generator, SamplerDefaults, generates_from_noise, load_generator};
use anyhow::{Result, bail};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct TrainClassifierArgs {
    /// Labelled data: image folder with class subfolders, IDX with labels, digits CSV, or a
    /// fetched dataset name.
    #[arg(long)]
    data: String,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Training steps.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Peak learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Channels of the first convolution.
    #[arg(long, default_value_t = 32)]
    width: usize,
    /// Size of the feature vector used for FID.
    #[arg(long, default_value_t = 128)]
    feature_dim: usize,
    /// Image side length (default: the data's own, or 32 for folders).
    #[arg(long)]
    image_size: Option<usize>,
    /// Channels: 1 or 3 (default: the data's own, or 3 for folders).
    #[arg(long)]
    channels: Option<usize>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn train_classifier(a: TrainClassifierArgs) -> Result<()> {
    if a.steps == 0 || a.batch == 0 || a.batch > 4096 {
        bail!("--steps must be positive and --batch between 1 and 4096");
    }
    if !(1..=1024).contains(&a.width) || !(2..=4096).contains(&a.feature_dim) {
        bail!("--width must be 1..1024 and --feature-dim 2..4096");
    }
    let (size, channels) = data_shape(&a.data, a.image_size, a.channels)?;
    let ds = data::load(&a.data, Shape { size, channels }, true)?;
    println!(
        "training a classifier on {} images ({}x{}x{}, {} classes) from {}",
        ds.len(),
        channels,
        size,
        size,
        ds.num_classes(),
        ds.source
    );
    let tc = ClassifierTraining {
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        ..ClassifierTraining::default()
    };
    let pb = bar(
        a.steps as u64,
        "{bar:40} {pos}/{len} steps  loss {msg}  ETA {eta}",
    );
    let c = classifier::train_classifier(&ds, a.width, a.feature_dim, &tc, &mut |_, loss| {
        pb.inc(1);
        pb.set_message(format!("{loss:.4}"));
    })?;
    pb.finish_and_clear();
    classifier::save_classifier(&c, &a.out)?;
    println!(
        "wrote {} (held-out accuracy {:.2}%)",
        a.out.display(),
        100.0 * c.config.held_out_accuracy.unwrap_or(f64::NAN)
    );
    Ok(())
}

/// The image shape of `--data` when not given: IDX and digits keep their own (grey), folders
/// default to 32x32 RGB.
fn data_shape(spec: &str, size: Option<usize>, channels: Option<usize>) -> Result<(usize, usize)> {
    let native = data::native_shape(spec)?;
    Ok((
        size.or(native.map(|s| s.size)).unwrap_or(32),
        channels.unwrap_or(native.map_or(3, |s| s.channels)),
    ))
}

#[derive(Args)]
pub struct FidArgs {
    /// The reference images: an image folder, IDX file, digits CSV or dataset name.
    a: String,
    /// The images judged against them.
    b: String,
    /// Feature extractor: a classifier file from `diffuse train-classifier`, or fashion-mnist.
    #[arg(long, default_value = "fashion-mnist")]
    features: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Prints a report (and writes it to `json` when given, with the `extra` fields); returns
/// what the file holds.
fn print_report(
    r: &Report,
    json: Option<&PathBuf>,
    extra: serde_json::Value,
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(r)?;
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    // The file first: what is printed may go to a pipe that closes early.
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&v)? + "\n";
        crate::files::write_atomic(path, text.as_bytes())?;
    }
    println!("FID       {:.4}", r.fid);
    println!("KID       {:.6} ± {:.6}", r.kid_mean, r.kid_std);
    println!("precision {:.4}", r.precision);
    println!("recall    {:.4}", r.recall);
    if let Some(acc) = r.class_accuracy {
        println!("class accuracy {:.4}", acc);
    }
    if let Some(per) = &r.class_accuracy_per_class {
        let cells: Vec<String> = per.iter().map(|a| format!("{a:.2}")).collect();
        println!("  per class      {}", cells.join(" "));
    }
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    println!(
        "({} vs {} images, {}-d features of {})",
        r.n_a, r.n_b, r.feature_dim, r.features
    );
    if let Some(path) = json {
        println!("wrote {}", path.display());
    }
    Ok(v)
}

/// `diffuse fid`; returns the report as `--json` writes it.
pub fn fid(a: FidArgs) -> Result<serde_json::Value> {
    if let Some(j) = &a.json {
        super::check_output("--json", j, "json", &[])?;
    }
    let dev = inference_device();
    let ext = eval::load_features(&a.features, &dev)?;
    let t0 = Instant::now();
    let ia = eval::load_images(&a.a, &ext, false)?;
    let ib = eval::load_images(&a.b, &ext, false)?;
    let r = eval::compare(&ext, &ia, &ib, None, &MetricOptions::default(), &dev)?;
    let secs = t0.elapsed().as_secs_f64();
    print_report(&r, a.json.as_ref(), serde_json::json!({ "seconds": secs }))
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model: run folder, model file or diffusers pipeline (default: the embedded model).
    #[arg(long)]
    model: Option<String>,
    /// Real images to compare with (default for the embedded model: fashion-mnist).
    #[arg(long)]
    data: Option<String>,
    /// Feature extractor: a classifier file, or fashion-mnist.
    #[arg(long, default_value = "fashion-mnist")]
    features: String,
    /// Number of generated images.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Real images used (an evenly strided subset of the data).
    #[arg(long, default_value_t = 10000)]
    n_real: usize,
    #[command(flatten)]
    sampler: super::SamplerArgs,
    /// Autoregressive models: the sampling temperature (logits divided by it) [default: 1].
    #[arg(long)]
    temperature: Option<f32>,
    /// Autoregressive models: held-out images whose likelihood is reported in bits per
    /// dimension (`--n` of them, evenly strided) [default: DATA:test where the data has a test
    /// split, else --data].
    #[arg(long, value_name = "DATA")]
    nll_data: Option<String>,
    /// Classifier-free guidance weight.
    #[arg(long, default_value_t = 1.0)]
    guidance: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The floor, in place of a model: `--n` real images evenly strided from this data (held
    /// out from `--data`, e.g. `fashion-mnist:test`, its test split) judged against `--data`
    /// exactly as samples are.
    #[arg(long, value_name = "DATA")]
    real: Option<String>,
}

/// `eval --real`: real images judged as samples would be, the lowest figures a model can
/// reach at the same `n`. With labels, class accuracy is the classifier's on them.
fn eval_real(a: &EvalArgs, held_out: &str) -> Result<serde_json::Value> {
    if a.model.is_some() {
        bail!("--real judges real images in place of a model's samples: leave out --model");
    }
    let data_spec = a.data.clone().unwrap_or_else(|| "fashion-mnist".into());
    let dev = inference_device();
    let ext = eval::load_features(&a.features, &dev)?;
    let t0 = Instant::now();
    let reference = real_subset(eval::load_images(&data_spec, &ext, false)?, a.n_real);
    let judged = real_subset(eval::load_images(held_out, &ext, true)?, a.n);
    if judged.n < a.n {
        eprintln!(
            "note: {held_out} holds {} images, fewer than --n {}",
            judged.n, a.n
        );
    }
    let r = eval::compare(
        &ext,
        &reference,
        &judged,
        judged.labels.as_deref(),
        &MetricOptions::default(),
        &dev,
    )?;
    let extra = serde_json::json!({
        "model": "real",
        "real": held_out,
        "data": data_spec,
        "sampler": "real",
        "steps": 0,
        "evaluations": 0,
        "n": judged.n,
        "sample_seconds": 0.0,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    print_report(&r, a.json.as_ref(), extra)
}

/// Options of `eval` that only diffusion models take (field names).
const DIFFUSION_ONLY: &[&str] = &[
    "sampler",
    "steps",
    "eta",
    "spacing",
    "variance",
    "karras",
    "clip_sample",
    "guidance_interval",
    "guidance",
];

/// `diffuse eval`; returns the report as `--json` writes it.
pub fn eval_cmd(a: EvalArgs) -> Result<serde_json::Value> {
    if let Some(j) = &a.json {
        super::check_output("--json", j, "json", &[])?;
    }
    if a.n < 4 || a.n > 100_000 {
        bail!("--n must be between 4 and 100000 (got {})", a.n);
    }
    if a.n_real < 4 {
        bail!("--n-real must be at least 4 (got {})", a.n_real);
    }
    if let Some(held_out) = &a.real {
        return eval_real(&a, held_out);
    }
    crate::pipeline::check_guidance(a.guidance)?;
    let dev = inference_device();
    // Samples are unconditional or per class: no text encoder.
    let loaded = load_generator(a.model.as_deref(), &dev)?;
    match &loaded {
        Loaded::Diffusion(m) => generates_from_noise(m)?,
        other => super::refuse_given(
            DIFFUSION_ONLY,
            Family::Diffusion,
            other.family(),
            other.source(),
        )?,
    }
    super::refuse_unless(
        &["temperature"],
        Family::Autoregressive,
        loaded.family(),
        loaded.source(),
    )?;
    if !matches!(loaded.family(), Family::Autoregressive | Family::Vae) && given("nll_data") {
        bail!(
            "--nll-data is an option of models with a likelihood (autoregressive models and VAEs); {} is {}",
            loaded.source(),
            loaded.family().article_name()
        );
    }
    let generator = Generator::from_loaded(loaded, &dev, false)?;
    let data_spec = match (&a.data, &a.model) {
        (Some(d), _) => d.clone(),
        (None, None) => "fashion-mnist".into(),
        (None, Some(_)) => bail!("--data is needed: the real images to compare the samples with"),
    };
    let ext = eval::load_features(&a.features, &dev)?;
    let defaults = match generator.as_diffusion() {
        Some(p) => SamplerDefaults::EVAL.for_model(&p.model.config),
        None => SamplerDefaults::EVAL,
    };
    let mut request = a.sampler.request(a.n, defaults);
    request.guidance = a.guidance;
    request.temperature = a.temperature;
    // What the JSON says of the sampling: the sampler, steps and model evaluations of a
    // diffusion model; one evaluation of the generator otherwise.
    let (sampler, steps, evaluations) = match generator.as_diffusion() {
        Some(pipe) => {
            pipe.sampler(&request)?; // option errors before any work
            let (kind, steps) = (request.sampler, pipe.steps(&request));
            (kind.name(), steps, kind.evaluations(steps))
        }
        // An autoregressive model runs once per sub-pixel (each run a sliver of the network).
        None => {
            let sequential = match generator.family() {
                Family::Autoregressive => generator.output_shape().iter().product(),
                _ => 1,
            };
            (generator.family().name(), 1, sequential)
        }
    };
    let t0 = Instant::now();
    let real = real_subset(eval::load_images(&data_spec, &ext, false)?, a.n_real);
    let pb = bar(a.n as u64, "{bar:40} {pos}/{len} images  ETA {eta}");
    let spec = SampleSpec {
        batch: generator.batch(&request),
        request,
        n: a.n,
        seed: a.seed,
    };
    let out = evaluate(&generator, &real, &ext, &spec, &mut |b| pb.inc(b as u64))?;
    pb.finish_and_clear();
    let total = t0.elapsed().as_secs_f64();
    let diffusion = generator.as_diffusion().is_some();
    let mut extra = serde_json::json!({
        "model": generator.source(),
        "data": data_spec,
        "sampler": sampler,
        "steps": steps,
        "evaluations": evaluations,
        "guidance": a.guidance,
        "guidance_interval": a.sampler.guidance_interval.map(|(lo, hi)| vec![lo, hi]),
        "eta": a.sampler.eta,
        "clip_sample": a.sampler.clip_sample,
        "seed": a.seed,
        "n": a.n,
        "sample_seconds": out.sample_seconds,
        "seconds": total,
    });
    if diffusion {
        println!(
            "{sampler} {steps} steps, guidance {}: {} images in {:.1} s",
            a.guidance, a.n, out.sample_seconds
        );
    } else {
        let fields = extra.as_object_mut().expect("an object");
        for k in ["guidance", "guidance_interval", "eta", "clip_sample"] {
            fields.remove(k);
        }
        fields.insert("family".into(), generator.family().name().into());
        if let Generator::Autoregressive { .. } = &generator {
            fields.insert("temperature".into(), a.temperature.unwrap_or(1.0).into());
        }
        let spec = match &a.nll_data {
            Some(d) => d.clone(),
            None => {
                let test = format!("{data_spec}:test");
                if data::resolve(&test).is_ok() {
                    test
                } else {
                    data_spec.clone()
                }
            }
        };
        let [channels, size, _] = generator.output_shape();
        let with_classes = generator.cond().num_classes.is_some();
        if matches!(
            generator,
            Generator::Autoregressive { .. } | Generator::Vae { .. }
        ) {
            let ds = data::load(&spec, Shape { size, channels }, with_classes)?;
            if let Some((bpd, kind, scored)) = eval::bits_per_dim(&generator, &ds, a.n, a.seed)? {
                let what = match kind {
                    eval::Likelihood::Exact => "negative log-likelihood",
                    eval::Likelihood::Elbo => "negative ELBO (a bound of the NLL)",
                };
                println!("{what} on {scored} images of {spec}: {bpd:.4} bits/dim");
                fields.insert("bits_per_dim".into(), bpd.into());
                fields.insert("likelihood".into(), kind.name().into());
                fields.insert("nll_data".into(), spec.into());
                fields.insert("nll_images".into(), scored.into());
            }
        }
        println!(
            "{}: {} images in {:.1} s",
            generator.source(),
            a.n,
            out.sample_seconds
        );
    }
    print_report(&out.report, a.json.as_ref(), extra)
}
