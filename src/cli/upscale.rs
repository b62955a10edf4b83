//! `diffuse upscale`: super-resolution of one image, or a comparison with bicubic upscaling on
//! held-out data (PSNR, SSIM, FID).

use crate::conditioning::lowres;
use crate::data::{self, Shape};
use crate::device::inference_device;
use crate::eval::superres::{psnr, ssim};
use crate::eval::{self, Images, MetricOptions, compare, to_extractor};
use crate::imageio::{self, ImageBatch, display_factor, grid, load_image, save_image};
use crate::pipeline::{Generated, Pipeline, Request, SamplerDefaults, Seeds, Step, load_generator};
use anyhow::{Context, Result, bail};
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[derive(Args)]
pub struct UpscaleArgs {
    /// A super-resolution model (`diffuse train --task superres`).
    #[arg(long)]
    model: String,
    /// The small image. One of the model's low resolution is used as it is; a larger one is
    /// first reduced (area average) to it, with a note; a smaller one is refused.
    #[arg(long, required_unless_present = "eval")]
    image: Option<PathBuf>,
    /// Instead of --image: compare with bicubic upscaling on --n images of this data (at the
    /// model's high resolution; reduced to make the inputs).
    #[arg(long, conflicts_with = "image")]
    eval: Option<String>,
    /// The factor you expect; refused unless it is the model's.
    #[arg(long)]
    scale: Option<usize>,
    #[command(flatten)]
    sampler: super::SamplerArgs,
    /// Versions to make of --image (different noise each); images to evaluate with --eval.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output: the enlarged image (--n 1), or a grid of the versions; with --eval, a grid of
    /// 8 inputs (nearest-neighbour), bicubic, the model and the originals.
    #[arg(long, default_value = "upscaled.png")]
    out: PathBuf,
    /// --eval: features for FID: fashion-mnist (the shipped classifier), inception, or a
    /// classifier file.
    #[arg(long, default_value = "fashion-mnist")]
    features: String,
    /// --eval: also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn upscale_cmd(a: UpscaleArgs) -> Result<()> {
    // The output path is checked before any work.
    crate::imageio::output_format(&a.out)?;
    let dev = inference_device();
    let pipe = Pipeline::new(
        load_generator(Some(&a.model), &dev)?.into_diffusion("diffuse upscale")?,
        None,
        dev.clone(),
    );
    if let Some(spec) = &a.eval {
        let req = request(&a, &pipe)?;
        return eval_cmd(&a, &pipe, spec, req);
    }
    let batch = upscale(&a, &pipe, &mut |_| {}, None)?.pixels();
    let imgs: Vec<_> = (0..batch.len()).map(|i| batch.image(i)).collect();
    let out = if imgs.len() == 1 {
        imgs[0].to_rgb8()
    } else {
        grid(&imgs, imgs.len().min(8))
    };
    save_image(&out, &a.out)?;
    let big = pipe.model.config.output_shape()[1];
    let small = pipe.model.config.image_shape()[1];
    println!(
        "wrote {} ({small}x{small} -> {big}x{big}, {} version(s))",
        a.out.display(),
        imgs.len()
    );
    Ok(())
}

/// What `upscale`'s options ask of a super-resolution pipeline, checked (the model, the
/// scale, `--n`, the sampler options) before any image is read.
fn request(a: &UpscaleArgs, pipe: &Pipeline) -> Result<Request> {
    let m = &pipe.model;
    let Some(scale) = m.config.superres.as_ref().map(|s| s.scale) else {
        bail!(
            "{} is not a super-resolution model (train one with `diffuse train --task superres --scale 2|4`)",
            m.source
        );
    };
    if let Some(k) = a.scale.filter(|&k| k != scale) {
        bail!(
            "--scale {k}: {} was trained to enlarge {scale}x, not {k}x",
            m.source
        );
    }
    if a.n == 0 || a.n > 10_000 {
        bail!("--n must be between 1 and 10000 (got {})", a.n);
    }
    let mut req = a
        .sampler
        .request(a.n, SamplerDefaults::EDIT.for_model(&m.config));
    req.guidance = 1.0;
    req.seeds = Seeds::One(a.seed);
    pipe.sampler(&req)?; // option errors before any work
    Ok(req)
}

/// The `--n` enlargements of `--image` by a super-resolution pipeline; the Python package's
/// `Pipeline.upscale` runs this too, with its progress function as `on_step` and its Ctrl-C
/// as `cancel` (see [`Request::cancel`]).
pub fn upscale(
    a: &UpscaleArgs,
    pipe: &Pipeline,
    on_step: &mut dyn FnMut(&Step),
    cancel: Option<Arc<AtomicBool>>,
) -> Result<Generated> {
    let mut req = request(a, pipe)?;
    let dev = pipe.device.clone();
    let m = &pipe.model;
    let scale = m.config.superres.as_ref().expect("checked").scale;
    let [c, big, _] = m.config.output_shape();
    let small = big / scale;
    let Some(path) = a.image.as_ref() else {
        bail!("--image: give the image to enlarge");
    };
    let (w, h) = image::image_dimensions(path)
        .with_context(|| format!("{} is not a readable image", path.display()))?;
    if (w as usize) < small || (h as usize) < small {
        bail!(
            "--image {} is {w}x{h}, smaller than the model's input of {small}x{small} ({scale}x to {big}x{big})",
            path.display()
        );
    }
    let low = if (w as usize, h as usize) == (small, small) {
        load_image(path, small, c, &dev)?
    } else {
        // Centre-cropped to a square at a multiple of the input size, then area-reduced.
        let side = (w.min(h) as usize / small) * small;
        eprintln!(
            "note: --image {} is {w}x{h}; reduced to the model's input of {small}x{small}",
            path.display()
        );
        let x = load_image(path, side, c, &dev)?;
        let v: Vec<f32> = x.into_data().convert::<f32>().try_into_vec().expect("f32");
        let r = lowres::downsample_area(&v, 1, c, side, side / small);
        Tensor::from_data(TensorData::new(r, [1, c, small, small]), &dev)
    };
    req.low_res = Some(low.repeat_dim(0, a.n));
    req.cancel = cancel;
    pipe.run(&req, on_step)
}

/// Mean PSNR and SSIM of `got` against `want` (`n` images of `c x s x s`).
fn quality(got: &[f32], want: &[f32], n: usize, c: usize, s: usize) -> (f64, f64) {
    let per = c * s * s;
    let (mut p, mut q) = (0.0, 0.0);
    for i in 0..n {
        let (a, b) = (&got[i * per..(i + 1) * per], &want[i * per..(i + 1) * per]);
        p += psnr(a, b);
        q += ssim(a, b, c, s);
    }
    (p / n as f64, q / n as f64)
}

fn eval_cmd(a: &UpscaleArgs, pipe: &Pipeline, spec: &str, req: Request) -> Result<()> {
    let dev = inference_device();
    let m = &pipe.model;
    let seed = a.seed;
    let steps = pipe.steps(&req);
    let scale = m.config.superres.as_ref().expect("checked").scale;
    let [c, big, _] = m.config.output_shape();
    let small = big / scale;
    let ds = data::load(
        spec,
        Shape {
            size: big,
            channels: c,
        },
        false,
    )?;
    if a.n < 2 {
        bail!(
            "--eval measures --n images: give --n of at least 2 (got {})",
            a.n
        );
    }
    let n = a.n.min(ds.len());
    if n < 2 {
        bail!("--eval {spec}: need at least 2 images (got {})", ds.len());
    }
    let high = ds.spread_f32(n);
    let low = lowres::downsample_area(&high, n, c, big, scale);
    let bicubic: Vec<f32> = lowres::condition(&low, n, c, small, scale)
        .into_iter()
        .map(|v| v.clamp(-1.0, 1.0))
        .collect();
    let t0 = std::time::Instant::now();
    let mut model_out = Vec::with_capacity(high.len());
    for start in (0..n).step_by(64) {
        let b = (n - start).min(64);
        let per = c * small * small;
        let x = Tensor::<4>::from_data(
            TensorData::new(
                low[start * per..(start + b) * per].to_vec(),
                [b, c, small, small],
            ),
            &dev,
        );
        let r = Request {
            n: b,
            seeds: Seeds::One(seed.wrapping_add(start as u64)),
            low_res: Some(x),
            ..req.clone()
        };
        let y = pipe.run(&r, &mut |_| {})?.images;
        let v: Vec<f32> = y.into_data().convert::<f32>().try_into_vec().expect("f32");
        model_out.extend(v.into_iter().map(|p| p.clamp(-1.0, 1.0)));
        eprint!("\r{} / {n} images", start + b);
    }
    eprintln!();
    let seconds = t0.elapsed().as_secs_f64();
    let (p_sr, s_sr) = quality(&model_out, &high, n, c, big);
    let (p_bi, s_bi) = quality(&bicubic, &high, n, c, big);
    let ext = eval::load_features(&a.features, &dev)?;
    let shape = [c, big, big];
    let set = |v: &[f32]| -> Images { to_extractor(v.to_vec(), n, shape, &ext) };
    let real = set(&high);
    let mo = MetricOptions::default();
    let fid_sr = compare(&ext, &real, &set(&model_out), None, &mo, &dev)?.fid;
    let fid_bi = compare(&ext, &real, &set(&bicubic), None, &mo, &dev)?.fid;
    println!(
        "{n} images of {spec}, {small}x{small} -> {big}x{big} ({scale}x), {} {} steps, {seconds:.1} s",
        req.sampler.name(),
        steps
    );
    println!("            PSNR (dB)  SSIM    FID ({})", ext.name());
    println!("bicubic     {p_bi:9.2}  {s_bi:.4}  {fid_bi:.2}");
    println!("diffusion   {p_sr:9.2}  {s_sr:.4}  {fid_sr:.2}");
    if let Some(j) = &a.json {
        let v = serde_json::json!({
            "model": m.source, "data": spec, "n": n, "scale": scale,
            "sampler": req.sampler.name(), "steps": steps, "seed": seed, "seconds": seconds,
            "features": ext.name(),
            "bicubic": {"psnr": p_bi, "ssim": s_bi, "fid": fid_bi},
            "diffusion": {"psnr": p_sr, "ssim": s_sr, "fid": fid_sr},
        });
        crate::files::write_atomic(j, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    // Grid: inputs (nearest), bicubic, model, originals for the first 8.
    let k = n.min(8);
    let per_low = c * small * small;
    let per = c * big * big;
    let near: Vec<f32> = (0..k)
        .flat_map(|i| {
            let l = &low[i * per_low..(i + 1) * per_low];
            (0..per).map(move |j| {
                let (ch, y, x) = (j / (big * big), (j / big) % big, j % big);
                l[ch * small * small + (y / scale) * small + x / scale]
            })
        })
        .collect();
    let rows = [
        near,
        bicubic[..k * per].to_vec(),
        model_out[..k * per].to_vec(),
        high[..k * per].to_vec(),
    ];
    let all: Vec<f32> = rows.concat();
    let t = Tensor::<4>::from_data(TensorData::new(all, [4 * k, c, big, big]), &dev);
    let b = ImageBatch::from_tensor(t);
    let imgs: Vec<_> = (0..b.len()).map(|i| b.image(i)).collect();
    save_image(
        &imageio::upscale(&grid(&imgs, k), display_factor(big)),
        &a.out,
    )?;
    println!(
        "wrote {} (rows: input, bicubic, diffusion, original)",
        a.out.display()
    );
    Ok(())
}
