//! The training objective (`train::objective`): examples against the forward process's closed
//! form, the targets of each prediction type, dropout, determinism, the loss weights, and the
//! learning rate's warm-up and schedule.

use diffuse::data::HostBatch;
use diffuse::device::inference_device;
use diffuse::model::{ModelConfig, SuperResConfig};
use diffuse::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use diffuse::train::objective::{Objective, loss_weights};
use diffuse::train::{LossWeighting, LrSchedule, RunConfig, TrainConfig, scheduled_lr};
use diffuse::unet::UNetConfig;

fn run(prediction: Prediction, label_dropout: f64, superres: bool) -> RunConfig {
    let unet = UNetConfig {
        in_channels: 1,
        out_channels: 1,
        num_classes: Some(3),
        cond_channels: if superres { 1 } else { 0 },
        ..UNetConfig::recipe(8)
    };
    RunConfig {
        model: ModelConfig {
            unet,
            schedule: ScheduleConfig::default(),
            prediction,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            superres: superres.then_some(SuperResConfig { scale: 2 }),
            latent: None,
            sampling: None,
        },
        train: TrainConfig {
            batch_size: 4,
            label_dropout,
            ..TrainConfig::default()
        },
        data: String::new(),
        distill: None,
    }
}

fn batch() -> HostBatch {
    HostBatch {
        step: 0,
        images: (0..4 * 64)
            .map(|i| ((i * 7) % 17) as f32 / 8.0 - 1.0)
            .collect(),
        labels: Some(vec![0, 1, 2, 1]),
        indices: vec![0, 1, 2, 3],
        shape: [4, 1, 8, 8],
    }
}

fn host(t: burn::tensor::Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

#[test]
fn examples_follow_the_forward_process_and_each_target() {
    let dev = inference_device();
    let sched = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let x0 = batch().images;
    let mut eps_of = Vec::new();
    for p in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
        let cfg = run(p, 0.0, false);
        let obj = Objective {
            cfg: &cfg,
            schedule: &sched,
            latents: None,
            captions: None,
        };
        let ex = obj.example(batch(), 5, &dev);
        assert_eq!(ex.x_t.dims(), [4, 1, 8, 8]);
        assert_eq!(ex.t.len(), 4);
        assert!(ex.t.iter().all(|&t| t < 1000));
        assert_eq!(
            ex.t_model,
            ex.t.iter().map(|&t| t as f64).collect::<Vec<_>>()
        );
        // No dropout: the batch's own labels.
        assert_eq!(ex.labels.as_deref(), Some(&[0, 1, 2, 1][..]));
        let (xt, target) = (host(ex.x_t.clone()), host(ex.target.clone()));
        // The noise each target implies, from x_t = a x0 + s eps.
        let eps: Vec<f32> = (0..xt.len())
            .map(|i| {
                let ab = sched.alphas_cumprod[ex.t[i / 64]];
                let (a, s) = (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32);
                match p {
                    Prediction::Epsilon => target[i],
                    Prediction::X0 => {
                        assert_eq!(target[i], x0[i], "the x0 target is the image");
                        (xt[i] - a * x0[i]) / s
                    }
                    // v = a eps - s x0.
                    Prediction::V => (target[i] + s * x0[i]) / a,
                    Prediction::Flow => unreachable!("tests/all/flow.rs"),
                }
            })
            .collect();
        for i in 0..xt.len() {
            let ab = sched.alphas_cumprod[ex.t[i / 64]];
            let want = ab.sqrt() as f32 * x0[i] + (1.0 - ab).sqrt() as f32 * eps[i];
            assert!((xt[i] - want).abs() < 1e-4, "{p:?} x_t[{i}]");
        }
        eps_of.push(eps);
        // Same step, same draws; another step, other draws.
        let again = obj.example(batch(), 5, &dev);
        assert_eq!(again.t, ex.t);
        assert_eq!(host(again.x_t), xt);
        let other = obj.example(batch(), 6, &dev);
        assert_ne!(host(other.x_t), xt);
    }
    // The noise does not depend on the prediction type.
    for e in &eps_of[1..] {
        let d = e
            .iter()
            .zip(&eps_of[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-2, "noise differs by {d}");
    }
}

#[test]
fn dropout_and_super_resolution_inputs() {
    let dev = inference_device();
    let sched = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let cfg = run(Prediction::Epsilon, 1.0, false);
    let obj = Objective {
        cfg: &cfg,
        schedule: &sched,
        latents: None,
        captions: None,
    };
    // Dropout 1: every label is the null class K = 3.
    assert_eq!(obj.example(batch(), 0, &dev).labels, Some(vec![3; 4]));
    // Super-resolution: the upsampled low-resolution image rides along as extra channels.
    let cfg = run(Prediction::Epsilon, 0.0, true);
    let obj = Objective {
        cfg: &cfg,
        schedule: &sched,
        latents: None,
        captions: None,
    };
    let ex = obj.example(batch(), 0, &dev);
    assert_eq!(ex.x_t.dims(), [4, 2, 8, 8]);
    assert_eq!(ex.target.dims(), [4, 1, 8, 8]);
    let v = host(ex.x_t);
    let cond = diffuse::conditioning::lowres::condition_from_high(&batch().images, 4, 1, 8, 2);
    for i in 0..4 {
        assert_eq!(&v[i * 128 + 64..i * 128 + 128], &cond[i * 64..(i + 1) * 64]);
    }
}

#[test]
fn min_snr_weights_have_their_closed_form() {
    let sched = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let t = [0, 10, 300, 999];
    assert_eq!(
        loss_weights(LossWeighting::Uniform, Prediction::Epsilon, &sched, &t),
        None
    );
    let g = 5.0;
    for p in [
        Prediction::Epsilon,
        Prediction::V,
        Prediction::X0,
        Prediction::Flow,
    ] {
        let w = loss_weights(LossWeighting::MinSnr { gamma: g }, p, &sched, &t).unwrap();
        for (k, &ti) in t.iter().enumerate() {
            let ab = sched.alphas_cumprod[ti];
            let snr = ab / (1.0 - ab);
            let want = match p {
                Prediction::Epsilon => snr.min(g) / snr,
                Prediction::V => snr.min(g) / (snr + 1.0),
                Prediction::X0 => snr.min(g),
                // The flow state at this SNR has t = s / (a + s), and x0 = x_t - t v.
                Prediction::Flow => {
                    let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
                    snr.min(g) * (s / (a + s)).powi(2)
                }
            };
            assert!(
                ((w[k] as f64) - want).abs() < 1e-6 * want.max(1.0),
                "{p:?} t={ti}"
            );
        }
    }
    // Low noise (high SNR) is down-weighted for epsilon; high noise keeps weight 1.
    let w = loss_weights(
        LossWeighting::MinSnr { gamma: g },
        Prediction::Epsilon,
        &sched,
        &t,
    )
    .unwrap();
    assert!(w[0] < 0.01 && (w[3] - 1.0).abs() < 1e-6);
}

/// The learning rate against its closed forms: the warm-up's ramp, the constant rate, the
/// cosine's midpoint (half the peak) and its symmetry `f(p) + f(1 - p) = peak`, the line's
/// `peak (1 - p)`; a run folder from before the schedule existed reads as constant.
#[test]
fn learning_rate_schedules_have_their_closed_forms() {
    let (lr, warmup, steps) = (2e-3, 10, 110);
    for schedule in [LrSchedule::Constant, LrSchedule::Cosine, LrSchedule::Linear] {
        let at = |step| scheduled_lr(lr, warmup, schedule, steps, step);
        assert_eq!(at(0), lr / 10.0);
        assert_eq!(at(4), lr / 2.0);
        // The first step after the warm-up is at the peak; the rate never rises after it.
        assert_eq!(at(warmup), lr);
        for s in warmup..steps - 1 {
            assert!(at(s + 1) <= at(s), "{schedule:?} rises at step {s}");
        }
    }
    let cos = |step| scheduled_lr(lr, warmup, LrSchedule::Cosine, steps, step);
    let lin = |step| scheduled_lr(lr, warmup, LrSchedule::Linear, steps, step);
    // p = (step - 10) / 100: 0.5 at step 60.
    assert!((cos(60) - lr / 2.0).abs() < 1e-15);
    for k in 0..=100 {
        let p = k as f64 / 100.0;
        assert!(
            (cos(10 + k) + cos(110 - k) - lr).abs() < 1e-15,
            "symmetry at p = {p}"
        );
        assert!(
            (lin(10 + k) - lr * (1.0 - p)).abs() < 1e-15,
            "line at p = {p}"
        );
        let closed = lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        assert!((cos(10 + k) - closed).abs() < 1e-15, "cosine at p = {p}");
    }
    // The last step's rate is small but not zero; a step past the end stays at 0.
    assert!(cos(steps - 1) > 0.0 && cos(steps - 1) < lr * 1e-3);
    assert_eq!(lin(steps + 5), 0.0);
    for s in 10..110 {
        assert_eq!(scheduled_lr(lr, warmup, LrSchedule::Constant, steps, s), lr);
    }
    // The run's config applies it, with the discriminator's other peak on the same curve.
    let tc = TrainConfig {
        lr,
        warmup_steps: warmup,
        steps,
        lr_schedule: LrSchedule::Cosine,
        ..TrainConfig::default()
    };
    assert_eq!(tc.lr_at(60), cos(60));
    assert!((tc.rate_at(lr / 4.0, 60) - cos(60) / 4.0).abs() < 1e-18);
    // Saved configs name it in kebab case; one without it (older runs) is constant.
    let mut v = serde_json::to_value(&tc).unwrap();
    assert_eq!(v["lr_schedule"], "cosine");
    v.as_object_mut().unwrap().remove("lr_schedule");
    let old: TrainConfig = serde_json::from_value(v).unwrap();
    assert_eq!(old.lr_schedule, LrSchedule::Constant);
}
