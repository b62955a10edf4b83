//! Flow matching (`--objective flow`, `schedule::flow`, `sampler::flow`) and the guidance
//! interval: the conversions against the straight path's closed form, the samplers' order of
//! convergence on a Gaussian whose velocity field is known exactly, the training examples,
//! a tiny run end to end, and the refusals.

use super::cli::{fails, ok, tiny_train_args};
use super::data::fixture;
use burn::tensor::{Device, Tensor, TensorData};
use diffuse::data::HostBatch;
use diffuse::device::inference_device;
use diffuse::model::ModelConfig;
use diffuse::pipeline::{Conditioning, Pipeline, Request};
use diffuse::sampler::{SamplerChoice, SamplerKind, Scheduler, check_guidance_interval};
use diffuse::schedule::{FlowTime, NoiseSchedule, Prediction, ScheduleConfig, prediction};
use diffuse::train::objective::Objective;
use diffuse::train::{LossWeighting, RunConfig, TrainConfig};
use diffuse::unet::UNetConfig;
use rand::SeedableRng;

fn tensor(v: Vec<f32>, dims: [usize; 4], dev: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(v, dims), dev)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn normals(n: usize, seed: u64) -> Vec<f32> {
    diffuse::rng::normal_vec(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed), n)
}

/// On `x_t = (1 - t) x0 + t eps` the target is `eps - x0`, and the conversions give back
/// `x0` and `eps` from it, per item and as scalars, and in sigma space
/// (`x = x_t / (1 - t)`, `sigma = t / (1 - t)`).
#[test]
fn flow_conversions_recover_the_clean_image_and_the_noise() {
    let dev = inference_device();
    let dims = [3, 1, 4, 4];
    let x0 = tensor(normals(48, 1), dims, &dev);
    let eps = tensor(normals(48, 2), dims, &dev);
    let ts = [0.05f32, 0.5, 0.93];
    let per =
        |f: &dyn Fn(f32) -> f32| tensor(ts.iter().map(|&t| f(t)).collect(), [3, 1, 1, 1], &dev);
    let (a, s) = (per(&|t| 1.0 - t), per(&|t| t));
    let x_t = x0.clone() * a.clone() + eps.clone() * s.clone();
    let v = prediction::target(
        Prediction::Flow,
        x0.clone(),
        eps.clone(),
        a.clone(),
        s.clone(),
    );
    assert!(max_diff(&values(v.clone()), &values(eps.clone() - x0.clone())) == 0.0);
    let (x0_hat, eps_hat) = prediction::split(Prediction::Flow, x_t.clone(), v.clone(), a, s);
    assert!(max_diff(&values(x0_hat), &values(x0.clone())) < 1e-5);
    assert!(max_diff(&values(eps_hat), &values(eps.clone())) < 1e-5);
    // One item at a time, with scalar coefficients and in sigma space.
    for (k, &t) in ts.iter().enumerate() {
        let item = |x: &Tensor<4>| x.clone().narrow(0, k, 1);
        let want = values(item(&x0));
        let got = prediction::x0(Prediction::Flow, item(&x_t), item(&v), 1.0 - t, t);
        assert!(max_diff(&values(got), &want) < 1e-5, "t = {t}");
        let sigma = (t / (1.0 - t)) as f64;
        let x = item(&x_t) / (1.0 - t);
        let got = prediction::x0_in_sigma_space(Prediction::Flow, x, item(&v), sigma);
        assert!(
            max_diff(&values(got), &want) < 1e-4,
            "t = {t} in sigma space"
        );
    }
}

/// Data `x0 ~ N(mu, sd^2)` per pixel: the flow from `x_1 = z` is `x_t = (1 - t) mu + r_t z`
/// with `r_t = sqrt((1 - t)^2 sd^2 + t^2)`, so the exact velocity at `(x, t)` is
/// `-mu + r_t' (x - (1 - t) mu) / r_t`, `r_t' = (t - (1 - t) sd^2) / r_t`, and the exact
/// end point is `mu + sd z`.
fn gaussian_velocity(x: &[f32], t: f64, mu: f64, sd: f64) -> Vec<f32> {
    let r = ((1.0 - t).powi(2) * sd * sd + t * t).sqrt();
    let dr = (t - (1.0 - t) * sd * sd) / r;
    x.iter()
        .map(|&x| (-mu + dr * (x as f64 - (1.0 - t) * mu) / r) as f32)
        .collect()
}

/// Integrates the Gaussian's exact velocity with a flow sampler of `steps` steps; returns the
/// largest error against the exact end point.
fn gaussian_error(kind: SamplerKind, steps: usize) -> f32 {
    let (mu, sd) = (0.3, 0.5);
    let dev = inference_device();
    let sched = Scheduler::for_model(&ScheduleConfig::default(), Prediction::Flow).unwrap();
    let mut s = sched
        .sampler(
            kind,
            &SamplerChoice {
                steps,
                ..Default::default()
            },
        )
        .unwrap();
    let z = normals(64, 3);
    let dims = [1, 1, 8, 8];
    let n = s.timesteps().len();
    assert_eq!(n, kind.evaluations(steps), "{kind:?} positions");
    assert_eq!(s.timesteps()[0], 1000.0, "starts at t = 1, shown as T");
    assert_eq!(s.state_scales(0), (0.0, 1.0), "pure noise first");
    assert_eq!(s.state_scales(n), (1.0, 0.0), "the image last");
    let mut x = tensor(z.clone(), dims, &dev);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for i in 0..n {
        let t = s.timesteps()[i] / 1000.0;
        let v = gaussian_velocity(&values(x.clone()), t, mu, sd);
        x = s.step(i, x, tensor(v, dims, &dev), &mut rng);
    }
    let exact: Vec<f32> = z.iter().map(|&z| (mu + sd * z as f64) as f32).collect();
    max_diff(&values(x), &exact)
}

/// Euler's error halves as the steps double (first order), Heun's falls about fourfold
/// (second order), and both reach the exact end point.
#[test]
fn flow_samplers_converge_at_their_order_on_a_gaussian() {
    let errs = |k| [8, 16, 32, 64].map(|n| gaussian_error(k, n));
    let euler = errs(SamplerKind::Euler);
    let heun = errs(SamplerKind::Heun);
    for w in euler.windows(2) {
        let r = w[0] / w[1];
        assert!((1.7..2.4).contains(&r), "Euler ratio {r} in {euler:?}");
    }
    // Heun's last step to t = 0 is an Euler step, as in EDM: the ratio approaches 4 from below.
    for w in heun.windows(2) {
        let r = w[0] / w[1];
        assert!((2.8..4.6).contains(&r), "Heun ratio {r} in {heun:?}");
    }
    assert!(euler[3] < 0.03 && heun[3] < 1e-3, "{euler:?} {heun:?}");
    assert!(
        heun[1] < euler[3] / 2.0,
        "Heun at 16 steps (31 evaluations) beats Euler at 64 by half: {heun:?} {euler:?}"
    );
}

/// The diffusion samplers and their options are refused for a flow model, naming what to use.
#[test]
fn flow_models_refuse_diffusion_samplers_and_options() {
    let sched = Scheduler::for_model(&ScheduleConfig::default(), Prediction::Flow).unwrap();
    let choice = |f: &dyn Fn(&mut SamplerChoice)| {
        let mut c = SamplerChoice {
            steps: 10,
            ..Default::default()
        };
        f(&mut c);
        c
    };
    for kind in [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::DpmPp2m,
        SamplerKind::EulerAncestral,
    ] {
        let e = sched
            .sampler(kind, &choice(&|_| {}))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(kind.name()) && e.contains("use --sampler euler or heun"),
            "{e}"
        );
    }
    let e = sched
        .sampler(SamplerKind::Euler, &choice(&|c| c.karras = Some(true)))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--karras"), "{e}");
    let e = sched
        .sampler(SamplerKind::Heun, &choice(&|c| c.eta = 0.5))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--eta"), "{e}");
    let e = sched
        .sampler(SamplerKind::Euler, &choice(&|c| c.steps = 1001))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--steps must be between 1 and 1000"), "{e}");
}

fn flow_run(flow_time: FlowTime) -> RunConfig {
    RunConfig {
        model: ModelConfig {
            unet: UNetConfig {
                in_channels: 1,
                out_channels: 1,
                ..UNetConfig::recipe(8)
            },
            schedule: ScheduleConfig::default(),
            prediction: Prediction::Flow,
            class_names: Vec::new(),
            superres: None,
            latent: None,
            sampling: None,
        },
        train: TrainConfig {
            batch_size: 4,
            loss_weighting: LossWeighting::Uniform,
            flow_time,
            ..TrainConfig::default()
        },
        data: String::new(),
        distill: None,
    }
}

/// A flow example lies on the straight path: `x_t - x0 = t (eps - x0) = t target`, with `t`
/// in `(0, 1)` shown to the model as `t T`; the same step draws the same example.
#[test]
fn flow_examples_lie_on_the_straight_path() {
    let dev = inference_device();
    let cfg = flow_run(FlowTime::default());
    cfg.validate().unwrap();
    let sched = NoiseSchedule::new(&cfg.model.schedule).unwrap();
    let obj = Objective {
        cfg: &cfg,
        schedule: &sched,
        latents: None,
        captions: None,
    };
    let images: Vec<f32> = (0..4 * 64).map(|i| ((i % 17) as f32 / 8.0) - 1.0).collect();
    let batch = || HostBatch {
        step: 0,
        indices: vec![0, 1, 2, 3],
        images: images.clone(),
        labels: None,
        shape: [4, 1, 8, 8],
    };
    let ex = obj.example(batch(), 3, &dev);
    assert!(ex.t.is_empty());
    assert_eq!(ex.flow_t.len(), 4);
    assert!(
        ex.flow_t.iter().all(|&t| t > 0.0 && t < 1.0),
        "{:?}",
        ex.flow_t
    );
    for (tm, t) in ex.t_model.iter().zip(&ex.flow_t) {
        assert_eq!(*tm, t * 1000.0);
    }
    let (x_t, target) = (values(ex.x_t.clone()), values(ex.target.clone()));
    for i in 0..images.len() {
        let t = ex.flow_t[i / 64] as f32;
        let want = images[i] + t * target[i];
        assert!(
            (x_t[i] - want).abs() < 1e-5,
            "pixel {i}: {} vs {want}",
            x_t[i]
        );
    }
    let again = obj.example(batch(), 3, &dev);
    assert_eq!(again.flow_t, ex.flow_t);
    assert_eq!(values(again.x_t), x_t);
    assert_ne!(obj.example(batch(), 4, &dev).flow_t, ex.flow_t);
    // A flow run weights by its time density, not by Min-SNR.
    let mut bad = flow_run(FlowTime::default());
    bad.train.loss_weighting = LossWeighting::MinSnr { gamma: 5.0 };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("--min-snr"), "{e}");
}

/// Logit-normal times have `logit(t) ~ N(loc, scale^2)`; uniform times have mean 1/2 and
/// variance 1/12. Out-of-range parameters are refused.
#[test]
fn flow_training_times_follow_their_density() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let n = 20_000;
    let moments = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        (m, var.sqrt())
    };
    let d = FlowTime::LogitNormal {
        loc: -0.5,
        scale: 1.5,
    };
    let logits: Vec<f64> = (0..n)
        .map(|_| {
            let t = d.draw(&mut rng);
            (t / (1.0 - t)).ln()
        })
        .collect();
    let (m, s) = moments(&logits);
    assert!((m + 0.5).abs() < 0.04 && (s - 1.5).abs() < 0.04, "{m} {s}");
    let u: Vec<f64> = (0..n).map(|_| FlowTime::Uniform.draw(&mut rng)).collect();
    let (m, s) = moments(&u);
    assert!((m - 0.5).abs() < 0.01 && (s - (1.0f64 / 12.0).sqrt()).abs() < 0.01);
    for bad in [
        FlowTime::LogitNormal {
            loc: f64::NAN,
            scale: 1.0,
        },
        FlowTime::LogitNormal {
            loc: 0.0,
            scale: 0.0,
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// `train` on the digits with the default objective, flow: the loss falls, the model records its objective,
/// `sample` picks Euler by default and takes Heun, edits and resumes work, and the diffusion
/// samplers, Min-SNR and flow options without flow are refused; export writes a diffusers
/// folder with the flow scheduler that samples the same bits.
#[test]
fn flow_trains_samples_edits_and_resumes_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run_s = run.to_str().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    // Flow is `diffuse train`'s default objective.
    ok(&tiny_train_args(data, run_s, "40"));
    let cfg = super::cli::run_config(&run);
    assert_eq!(cfg["model"]["prediction"], "flow");
    assert_eq!(cfg["train"]["loss_weighting"], "uniform");
    assert_eq!(cfg["train"]["flow_time"]["logit-normal"]["scale"], 1.0);
    let losses: Vec<f64> = diffuse::train::read_metrics(&run.join("metrics.jsonl"), usize::MAX)
        .iter()
        .map(|m| m.loss)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&losses[30..]) < 0.8 * mean(&losses[..5]),
        "the loss falls: {losses:?}"
    );
    // Resume to a new total.
    let mut more = tiny_train_args(data, run_s, "44");
    more.extend(["--objective", "flow", "--resume"]);
    ok(&more);
    let model = run.join("model.safetensors");
    let m = model.to_str().unwrap();
    let out = tmp.path().join("s.png");
    let o = out.to_str().unwrap();
    let said = ok(&[
        "sample", "--model", m, "--n", "2", "--steps", "4", "--out", o, "--class", "3",
    ]);
    assert!(said.contains("wrote"), "{said}");
    ok(&[
        "sample",
        "--model",
        m,
        "--n",
        "2",
        "--sampler",
        "heun",
        "--steps",
        "3",
        "--out",
        o,
    ]);
    fails(
        &[
            "sample",
            "--model",
            m,
            "--n",
            "1",
            "--sampler",
            "ddpm",
            "--out",
            o,
        ],
        "use --sampler euler or heun",
    );
    let img = tmp.path().join("in.png");
    image::GrayImage::from_pixel(8, 8, image::Luma([200]))
        .save(&img)
        .unwrap();
    ok(&[
        "edit",
        "--model",
        m,
        "--image",
        img.to_str().unwrap(),
        "--steps",
        "6",
        "--out",
        o,
    ]);
    // Export: a DDPMPipeline folder with diffusers' flow-matching scheduler, which reads back
    // to the same weights and samples the same bits.
    let ex = tmp.path().join("ex");
    let ex_s = ex.to_str().unwrap();
    ok(&["export", "--model", m, "--diffusers", ex_s]);
    let sc_path = ex.join("scheduler/scheduler_config.json");
    let sc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sc_path).unwrap()).unwrap();
    assert_eq!(sc["_class_name"], "FlowMatchEulerDiscreteScheduler");
    assert_eq!(sc["num_train_timesteps"], 1000);
    let png = |model: &str, name: &str| {
        let p = tmp.path().join(name);
        ok(&[
            "sample",
            "--model",
            model,
            "--n",
            "2",
            "--steps",
            "3",
            "--seed",
            "4",
            "--out",
            p.to_str().unwrap(),
        ]);
        std::fs::read(p).unwrap()
    };
    assert!(
        png(m, "run.png") == png(ex_s, "exported.png"),
        "the exported flow model samples what the run does"
    );
    let mut dynamic = sc.clone();
    dynamic["use_dynamic_shifting"] = true.into();
    std::fs::write(&sc_path, dynamic.to_string()).unwrap();
    fails(
        &["sample", "--model", ex_s, "--steps", "2"],
        "use_dynamic_shifting = true is not supported",
    );
    let other = tmp.path().join("other");
    let other = other.to_str().unwrap();
    let mut bad = tiny_train_args(data, other, "2");
    bad.extend(["--objective", "flow", "--min-snr", "5"]);
    fails(&bad, "leave out --min-snr");
    let mut bad = tiny_train_args(data, other, "2");
    bad.extend(["--objective", "epsilon", "--flow-time", "uniform"]);
    fails(&bad, "options of --objective flow");
    let mut bad = tiny_train_args(data, other, "2");
    bad.extend(["--objective", "flow", "--flow-scale", "0"]);
    fails(&bad, "--flow-scale must be above 0");
}

/// The guidance interval: covering every noise level it is plain guidance, covering none it
/// is no guidance, in part it is neither; bad intervals are refused everywhere.
#[test]
fn guidance_interval_guides_only_inside_it() {
    let dev = inference_device();
    let pipe = Pipeline::load(None, &dev).unwrap();
    let bits = |guidance: f32, interval: Option<(f64, f64)>| {
        let mut req = Request::new(2, SamplerKind::Ddim);
        req.steps = Some(4);
        req.conditioning = Conditioning::Classes(vec![1, 7]);
        req.guidance = guidance;
        req.guidance_interval = interval;
        values(pipe.run(&req, &mut |_| {}).unwrap().sample)
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    let guided = bits(3.0, None);
    let plain = bits(1.0, None);
    assert!(guided != plain);
    assert!(bits(3.0, Some((0.0, f64::INFINITY))) == guided);
    assert!(bits(3.0, Some((1e6, f64::INFINITY))) == plain);
    let part = bits(3.0, Some((0.5, 5.0)));
    assert!(part != guided && part != plain);
    for (lo, hi) in [
        (5.0, 1.0),
        (1.0, 1.0),
        (-1.0, 2.0),
        (f64::NAN, 1.0),
        (0.0, f64::NAN),
    ] {
        assert!(check_guidance_interval(lo, hi).is_err(), "{lo}, {hi}");
    }
    let mut req = Request::new(1, SamplerKind::Ddim);
    req.guidance_interval = Some((2.0, 1.0));
    let e = pipe.run(&req, &mut |_| {}).err().unwrap().to_string();
    assert!(e.contains("reversed"), "{e}");
    let o = tempfile::tempdir().unwrap();
    let out = o.path().join("g.png");
    let out = out.to_str().unwrap();
    let o = super::cli::diffuse(&[
        "sample",
        "--n",
        "1",
        "--guidance-interval",
        "5,1",
        "--out",
        out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("reversed"), "{err}");
    ok(&[
        "sample",
        "--n",
        "1",
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--class",
        "1",
        "--guidance-interval",
        "0.3,inf",
        "--out",
        out,
    ]);
    use diffuse::serve::api::{GenerateRequest, Limits, validate};
    let req: GenerateRequest =
        serde_json::from_str(r#"{"class": 1, "guidance": 3, "guidance_interval": [4, 0.5]}"#)
            .unwrap();
    let limits = Limits {
        max_n: 4,
        max_steps: 1000,
        max_body_bytes: 1 << 20,
        timeout_s: 60,
    };
    let m = &pipe.model;
    let e = validate(&req, &m.config, m.scheduler.len(), &limits, 0).unwrap_err();
    assert!(e.contains("reversed"), "{e}");
}
