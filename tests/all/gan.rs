//! The GAN family: a tiny class-conditioned GAN on the digits fixture trains, resumes to the
//! same bits, samples the same images at any batch and evaluates; the discriminator's hinge
//! loss falls on one batch; options of the other family and files of an unknown family are
//! refused with one line.

use super::cli::{
    eval_json, fails, family_train_args, ok, resumes_to_the_same_bits, run_config,
    run_folder_is_complete, same_images_at_any_batch, tensors,
};
use super::data::fixture;
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use diffuse::gan::spectral::SnLinear;
use diffuse::gan::{Discriminator, GanConfig, Generator};
use diffuse::train::adamw::AdamW;
use diffuse::weights::{HostTensor, NamedTensors};

fn gan_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    family_train_args(
        "gan",
        data,
        out,
        steps,
        &["--g-channels", "8", "--d-channels", "8", "--z-dim", "8"],
    )
}

#[test]
fn a_tiny_gan_trains_resumes_samples_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let whole = tmp.path().join("whole");
    let w = whole.to_str().unwrap();
    ok(&gan_args(data, w, "6"));
    let lines = run_folder_is_complete(&whole);
    let cfg = run_config(&whole);
    assert_eq!(cfg["model"]["family"], "gan");
    assert_eq!(cfg["model"]["num_classes"], 10);
    assert_eq!(cfg["train"]["lr"], 1e-4, "a GAN's own default --lr");
    assert_eq!(cfg["gan"]["lr_d"], 4e-4);
    assert_eq!(
        cfg["gan"]["mode_seeking"], 1.0,
        "the mode-seeking term is on by default"
    );
    assert_eq!(lines.len(), 6);
    for k in ["loss", "g_loss", "d_real", "d_fake", "grad_norm_d"] {
        assert!(lines[5][k].as_f64().unwrap().is_finite(), "{k}");
    }
    // The checkpoint holds both networks, the EMA and both optimisers.
    let ck = tensors(&whole.join("checkpoint.safetensors"));
    for prefix in ["model.", "ema.", "disc.", "opt.m.", "opt_d.m."] {
        assert!(ck.keys().any(|k| k.starts_with(prefix)), "no {prefix}*");
    }
    assert!(
        ck.contains_key("disc.convs.0.u"),
        "the spectral norm's vector"
    );

    // Three steps, then --resume to six: the same bits as six at once.
    let train = |out: &str, steps: &str| -> Vec<String> {
        gan_args(data, out, steps)
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    resumes_to_the_same_bits(&whole, &tmp.path().join("cut"), &train);

    // Sampling: one class, the same images whatever the batch.
    same_images_at_any_batch(w, tmp.path(), &[]);
    let grid = tmp.path().join("grid.png");
    // Without --class: rows of every class.
    let out = ok(&["sample", "--model", w, "--out", grid.to_str().unwrap()]);
    assert!(out.contains("40 images"), "{out}");

    // eval: one generator evaluation per image, no sampler or guidance in its JSON.
    let v = eval_json(w, data, tmp.path(), "gan");
    assert_eq!(v["evaluations"], 1);
    assert!(v.get("guidance").is_none());

    // Options of diffusion models, and commands that take only those, are refused.
    fails(
        &["sample", "--model", w, "--steps", "4"],
        "--steps is an option of diffusion models",
    );
    fails(
        &[
            "sample",
            "--model",
            w,
            "--sampler",
            "ddim",
            "--guidance",
            "3",
        ],
        "--sampler, --guidance are options of diffusion models",
    );
    fails(
        &["eval", "--model", w, "--data", data, "--eta", "1"],
        "--eta",
    );
    fails(
        &["edit", "--model", w, "--image", grid.to_str().unwrap()],
        "is a GAN; diffuse edit takes diffusion models",
    );
    fails(
        &["sample", "--model", w, "--class", "sneaker"],
        "'sneaker' is not a class of this model",
    );
    // The run is a GAN's: --resume as another family, or with diffusion options, is refused.
    let mut wrong = gan_args(data, w, "9");
    wrong.push("--resume");
    wrong[2] = "diffusion";
    fails(&wrong, "holds a GAN run");
}

#[test]
fn options_of_the_other_family_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let with = |extra: &[&'static str]| {
        let mut a = gan_args(data, o, "2");
        a.extend_from_slice(extra);
        a
    };
    fails(
        &with(&["--objective", "flow"]),
        "--objective is an option of diffusion models",
    );
    fails(
        &with(&["--base-channels", "16", "--min-snr", "5"]),
        "--min-snr, --base-channels are options of diffusion models",
    );
    let mut text = gan_args(data, o, "2");
    text[8] = "text";
    fails(&text, "--cond text is for diffusion models");
    fails(&with(&["--lr-d", "0"]), "--lr-d must be a positive number");
    let mut narrow = gan_args(data, o, "2");
    narrow[14] = "10";
    fails(&narrow, "multiple of the 8 GroupNorm groups");
    fails(
        &["train", "--data", data, "--out", o, "--z-dim", "8"],
        "--z-dim is an option of --family gan",
    );
    assert!(
        !out.exists(),
        "a refused run leaves nothing behind, not even the folder its lock made"
    );
}

/// A model file whose config names a family this build does not know is refused with one
/// line naming it, by every command that loads models.
#[test]
fn a_model_of_an_unknown_family_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, mut meta) =
        diffuse::weights::read_safetensors(&fixture("../../models/fashion-mnist-fast.safetensors"))
            .unwrap();
    let key = diffuse::model::CONFIG_KEY.to_string();
    let mut cfg: serde_json::Value = serde_json::from_str(&meta[&key]).unwrap();
    cfg["family"] = "vq-vae".into();
    meta.insert(key, cfg.to_string());
    let bytes =
        diffuse::weights::to_safetensors(&t, &meta, diffuse::weights::StoreDtype::F16).unwrap();
    let f = tmp.path().join("odd.safetensors");
    std::fs::write(&f, bytes).unwrap();
    let f = f.to_str().unwrap();
    for cmd in ["sample", "edit", "serve", "export"] {
        let mut args = vec![cmd, "--model", f];
        if cmd == "edit" {
            args.extend(["--image", "x.png"]);
        }
        if cmd == "export" {
            args.extend(["--diffusers", "out"]);
        }
        fails(
            &args,
            "model family 'vq-vae' is unknown to this build (diffusion, gan, autoregressive, vae)",
        );
    }
}

/// The discriminator alone, on one fixed batch of "real" and "generated" images, learns to
/// tell them apart: its hinge loss falls.
#[test]
fn the_discriminator_hinge_loss_falls_on_one_batch() {
    let dev = Device::flex().autodiff();
    dev.seed(3);
    let cfg = GanConfig {
        g_channels: 8,
        d_channels: 8,
        norm_groups: 4,
        num_classes: Some(2),
        ..GanConfig::recipe(8, 1)
    };
    let mut d = Discriminator::new(&cfg, &dev).unwrap();
    let real = Tensor::<4>::random([8, 1, 8, 8], Distribution::Uniform(0.0, 1.0), &dev);
    let fake = Tensor::<4>::random([8, 1, 8, 8], Distribution::Uniform(-1.0, 0.0), &dev);
    let labels: Vec<usize> = (0..16).map(|i| i % 2).collect();
    let mut opt = AdamW::new(0.0, 0.9, 1e-8, 0.0);
    let mut losses = Vec::new();
    for _ in 0..30 {
        d = d.power_iterate();
        let s = d.forward(
            Tensor::cat(vec![real.clone(), fake.clone()], 0),
            Some(&labels),
            diffuse::gan::mbstd_group(8),
        );
        let (r, f) = (s.clone().narrow(0, 0, 8), s.narrow(0, 8, 8));
        let loss = relu(r.neg().add_scalar(1.0)).mean() + relu(f.add_scalar(1.0)).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &d);
        losses.push(loss.into_scalar::<f32>());
        d = opt.step(d, &grads, 2e-3, 1.0);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        first > 1.5,
        "an untrained D scores both sets alike: {first}"
    );
    assert!(
        last < 0.5 * first,
        "the hinge loss fell from {first} to {last}"
    );
}

fn tiny(classes: Option<usize>) -> GanConfig {
    GanConfig {
        num_classes: classes,
        g_channels: 8,
        d_channels: 8,
        z_dim: 4,
        norm_groups: 4,
        ..GanConfig::recipe(8, 1)
    }
}

#[test]
fn generator_and_discriminator_shapes() {
    let dev = Device::flex();
    let cfg = tiny(Some(3));
    let g = Generator::new(&cfg, &dev).unwrap();
    let d = Discriminator::new(&cfg, &dev).unwrap();
    let labels = [0, 1, 2, 3, 0];
    let x = g.forward(Tensor::<2>::zeros([5, 4], &dev), Some(&labels));
    assert_eq!(x.dims(), [5, 1, 8, 8]);
    let v: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap();
    assert!(v.iter().all(|p| (-1.0..=1.0).contains(p)), "tanh pixels");
    assert_eq!(d.forward(x, Some(&labels), 1).dims(), [5]);
    // The size check at load is a lower bound of what G holds.
    let mut held = NamedTensors::new();
    diffuse::weights::collect(&g, "", &mut held);
    let n: usize = held.values().map(|t| t.data.len()).sum();
    assert!(cfg.min_generator_parameters() <= n);
    assert!(cfg.min_generator_parameters() * 10 > n * 9, "a tight bound");
}

/// Each image depends on its own noise and class only: the rows of a batch of 3 are what a
/// batch of 1 gives.
#[test]
fn a_generated_image_does_not_depend_on_its_batch() {
    let dev = Device::flex();
    let g = Generator::new(&tiny(Some(2)), &dev).unwrap();
    let z = Tensor::<2>::random([3, 4], Distribution::Normal(0.0, 1.0), &dev);
    let all: Vec<f32> = g
        .forward(z.clone(), Some(&[0, 1, 2]))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let one: Vec<f32> = g
        .forward(z.slice([1..2, 0..4]), Some(&[1]))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    for (a, b) in all[64..128].iter().zip(&one) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn bad_gan_configs_are_refused() {
    for bad in [
        GanConfig {
            image_size: 30,
            ..tiny(None)
        },
        GanConfig {
            channels: 2,
            ..tiny(None)
        },
        GanConfig {
            z_dim: 0,
            ..tiny(None)
        },
        GanConfig {
            g_channels: 10,
            ..tiny(None)
        },
        GanConfig {
            class_names: vec!["a".into()],
            ..tiny(Some(2))
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// Spectral normalisation against the closed form: for `W = diag(3, 2, 1)` (in a 3x4 matrix)
/// the largest singular value is 3, so after enough power iterations the layer computes
/// `x W / 3`: the identity's rows come out as `diag(1, 2/3, 1/3)`.
#[test]
fn spectral_norm_divides_by_the_largest_singular_value() {
    let dev = Device::flex();
    let mut layer = SnLinear::new(3, 4, &dev);
    let mut w = NamedTensors::new();
    let diag = vec![
        3.0f32, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
    ];
    w.insert(
        "linear.weight".into(),
        HostTensor {
            shape: vec![3, 4],
            data: diag.clone(),
        },
    );
    w.insert(
        "linear.bias".into(),
        HostTensor {
            shape: vec![4],
            data: vec![0.0; 4],
        },
    );
    w.insert(
        "u".into(),
        HostTensor {
            shape: vec![3],
            data: vec![0.3, 0.5, 0.8],
        },
    );
    layer = diffuse::weights::apply(layer, &w, "").unwrap();
    for _ in 0..40 {
        layer = layer.power_iterate();
    }
    let eye = Tensor::<2>::from_data(
        burn::tensor::TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], [3, 3]),
        &dev,
    );
    let y: Vec<f32> = layer.forward(eye).into_data().try_to_vec::<f32>().unwrap();
    for (got, want) in y.iter().zip(diag.iter().map(|v| v / 3.0)) {
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
}

/// `diffuse serve` serves a GAN: `/v1/models` says its family and lists no samplers, a class
/// request gives the PNG `diffuse sample` gives, and sampler options are a 400 naming them.
#[test]
fn serve_takes_a_gan() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    ok(&gan_args(data.to_str().unwrap(), r, "3"));
    super::serve::serves_like_sample(
        r,
        "gan",
        "",
        &[],
        &[
            (
                r#"{"class": 3, "steps": 10, "guidance": 2}"#,
                "steps, guidance are options of diffusion models; the served model is a GAN",
            ),
            (
                r#"{"class": 10}"#,
                "class 10 is out of range: this model has classes 0..9",
            ),
        ],
    );
}

/// A GAN that diverges (here a discriminator learning rate far too large, written into a
/// one-step run's checkpoint: its scores explode at its first update) stops with one line
/// naming the step and the checkpoint kept, and that checkpoint still loads and samples.
#[test]
fn a_diverging_gan_stops_naming_the_step_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let d = data.to_str().unwrap();
    let mut args = gan_args(d, r, "1");
    args[20] = "1"; // --checkpoint-every 1
    ok(&args);
    let ck = run.join("checkpoint.safetensors");
    let (t, mut meta) = diffuse::weights::read_safetensors(&ck).unwrap();
    let mut run_cfg: serde_json::Value = serde_json::from_str(&meta["diffuse.run"]).unwrap();
    run_cfg["gan"]["lr_d"] = 1e30.into();
    meta.insert("diffuse.run".into(), run_cfg.to_string());
    let bytes =
        diffuse::weights::to_safetensors(&t, &meta, diffuse::weights::StoreDtype::F32).unwrap();
    std::fs::write(&ck, bytes).unwrap();
    let model = std::fs::read(run.join("model.safetensors")).unwrap();
    let mut resume = gan_args(d, r, "6");
    resume.push("--resume");
    fails(&resume, "GAN training diverged at step 2 (d_loss");
    fails(&resume, "the checkpoint of step 1 is kept");
    assert_eq!(tensors(&ck), t, "the checkpoint is the good one");
    assert_eq!(std::fs::read(run.join("model.safetensors")).unwrap(), model);
    let png = tmp.path().join("s.png");
    ok(&[
        "sample",
        "--model",
        r,
        "--n",
        "2",
        "--out",
        png.to_str().unwrap(),
    ]);
}

/// The mode-seeking term against its closed form: images whose halves differ by 0.5 in every
/// pixel from noises whose halves differ by 2 in every coordinate give a ratio of 0.25, so
/// `1 / (0.25 + 1e-5)`; identical halves (a generator that ignores its noise) give `1 / 1e-5`.
#[test]
fn the_mode_seeking_term_is_its_closed_form() {
    use diffuse::train::gan::mode_seeking_term;
    let dev = Device::flex();
    let half = |v: f32| Tensor::<4>::full([2, 1, 3, 3], v, &dev);
    let fake = Tensor::cat(vec![half(0.25), half(-0.25)], 0);
    let z = Tensor::cat(
        vec![
            Tensor::<2>::full([2, 5], 1.0, &dev),
            Tensor::<2>::full([2, 5], -1.0, &dev),
        ],
        0,
    );
    let t = mode_seeking_term(fake, z.clone()).into_scalar::<f32>() as f64;
    let want = 1.0 / (0.25 + 1e-5);
    assert!((t - want).abs() < 1e-4 * want, "{t} vs {want}");
    let collapsed = mode_seeking_term(Tensor::cat(vec![half(0.3), half(0.3)], 0), z)
        .into_scalar::<f32>() as f64;
    assert!((collapsed - 1e5).abs() < 1.0, "{collapsed}");
}

/// `--mode-seeking` is saved with the run, its term is logged each step, a resumed run keeps
/// it to the same bits, and out-of-range weights are refused.
#[test]
fn a_gan_with_the_mode_seeking_term_trains_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let whole = tmp.path().join("whole");
    let train = |out: &str, steps: &str| -> Vec<String> {
        let mut a: Vec<String> = gan_args(data, out, steps)
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--mode-seeking".into(), "2".into()]);
        a
    };
    let args = train(whole.to_str().unwrap(), "6");
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let lines = run_folder_is_complete(&whole);
    assert_eq!(run_config(&whole)["gan"]["mode_seeking"], 2.0);
    let term = lines[5]["mode_seeking_term"].as_f64().unwrap();
    assert!(term.is_finite() && term > 0.0, "{term}");
    resumes_to_the_same_bits(&whole, &tmp.path().join("cut"), &train);
    // Off: no term in the metrics. A run saved before the option reads as off, the recipe
    // it was trained with (new runs default to 1).
    let off = tmp.path().join("off");
    let mut a = gan_args(data, off.to_str().unwrap(), "2");
    a.extend(["--mode-seeking", "0"]);
    ok(&a);
    let last = std::fs::read_to_string(off.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert!(
        last["g_loss"].is_f64() && last.get("mode_seeking_term").is_none(),
        "{last}"
    );
    let old: diffuse::train::gan::GanTrainConfig =
        serde_json::from_str(r#"{"lr_d": 4e-4, "beta1": 0.0, "beta2": 0.9}"#).unwrap();
    assert_eq!(old.mode_seeking, 0.0);
    let o = tmp.path().join("bad");
    for w in ["-1", "101", "nan"] {
        let mut bad = gan_args(data, o.to_str().unwrap(), "2");
        let flag = format!("--mode-seeking={w}");
        bad.push(&flag);
        fails(&bad, "--mode-seeking must be between 0 (off) and 100");
    }
    let mut other = family_train_args("vae", data, o.to_str().unwrap(), "2", &[]);
    other.extend(["--mode-seeking", "1"]);
    fails(&other, "--mode-seeking is an option of --family gan");
}
