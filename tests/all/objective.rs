//! The training objective (`train::objective`): examples against the forward process's closed
//! form, the targets of each prediction type, dropout, determinism, and the loss weights.

use diffuse::data::HostBatch;
use diffuse::device::inference_device;
use diffuse::model::{ModelConfig, SuperResConfig};
use diffuse::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use diffuse::train::objective::{Objective, loss_weights};
use diffuse::train::{LossWeighting, RunConfig, TrainConfig};
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
