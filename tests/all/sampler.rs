//! The DDPM sampler against its closed forms, and reproducibility of generation.

use diffuse::device::inference_device;
use diffuse::rng::{Stream, normal_tensor, normal_vec, rng_for};
use diffuse::sampler::ddpm::DdpmOptions;
use diffuse::sampler::{DdpmSampler, GenerateOptions, Sampler, VarianceType, generate};
use diffuse::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use diffuse::schedule::{TimestepSpacing, spaced_timesteps};

fn to_vec(x: burn::tensor::Tensor<4>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn ddpm(s: &NoiseSchedule, variance: VarianceType, steps: usize) -> anyhow::Result<DdpmSampler> {
    let opts = DdpmOptions {
        steps,
        variance,
        ..DdpmOptions::default()
    };
    DdpmSampler::new(s, Prediction::Epsilon, opts)
}

#[test]
fn spacings_are_descending_and_in_range() {
    for sp in [
        TimestepSpacing::Leading,
        TimestepSpacing::Trailing,
        TimestepSpacing::Linspace,
    ] {
        assert_eq!(
            spaced_timesteps(1000, 1000, sp, 0),
            (0..1000).rev().collect::<Vec<_>>(),
            "{sp:?}"
        );
        let r = spaced_timesteps(1000, 10, sp, 0);
        assert_eq!(r.len(), 10);
        assert!(r.windows(2).all(|w| w[0] > w[1]) && r[0] <= 999, "{sp:?}");
    }
    assert_eq!(
        spaced_timesteps(1000, 10, TimestepSpacing::Trailing, 0)[0],
        999
    );
    assert_eq!(
        spaced_timesteps(1000, 10, TimestepSpacing::Linspace, 0)[9],
        0
    );
    assert_eq!(
        spaced_timesteps(1000, 10, TimestepSpacing::Leading, 1)[0],
        901
    );
    let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    assert!(ddpm(&s, VarianceType::FixedSmall, 1001).is_err());
    assert!(ddpm(&s, VarianceType::FixedSmall, 0).is_err());
}

#[test]
fn ddpm_step_matches_the_posterior_closed_form() {
    let dev = inference_device();
    let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let mut rng = rng_for(4, Stream::Sample, 1);
    let x0 = normal_tensor(&mut rng, [2, 1, 4, 4], &dev).clamp(-1.0, 1.0);
    let eps = normal_tensor(&mut rng, [2, 1, 4, 4], &dev);
    for variance in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
        let mut sm = ddpm(&s, variance, 1000).unwrap();
        // Middle step i (t = 999 - i) with the true noise as model output.
        let i = 500;
        let t = sm.timesteps()[i] as usize;
        let xt = s.q_sample(x0.clone(), eps.clone(), &[t, t]);
        let mut r1 = rng_for(9, Stream::Sample, 2);
        let got = to_vec(sm.step(i, xt.clone(), eps.clone(), &mut r1));
        let mut r2 = rng_for(9, Stream::Sample, 2);
        let z = normal_vec(&mut r2, 32);
        let (ab, abp, beta) = (s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]);
        let var = match variance {
            VarianceType::FixedSmall => (1.0 - abp) / (1.0 - ab) * beta,
            VarianceType::FixedLarge => beta,
        };
        let (x0v, xtv) = (to_vec(x0.clone()), to_vec(xt));
        for k in 0..32 {
            let mean = beta * abp.sqrt() / (1.0 - ab) * x0v[k] as f64
                + (1.0 - abp) * (1.0 - beta).sqrt() / (1.0 - ab) * xtv[k] as f64;
            let want = mean + var.sqrt() * z[k] as f64;
            assert!(
                (got[k] as f64 - want).abs() < 1e-4,
                "{variance:?} k={k}: {} vs {want}",
                got[k]
            );
        }
        // The last step returns x0_hat with no noise.
        let last = sm.timesteps().len() - 1;
        let x1 = s.q_sample(x0.clone(), eps.clone(), &[0, 0]);
        let out = to_vec(sm.step(last, x1, eps.clone(), &mut r1));
        for (a, b) in out.iter().zip(&x0v) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}

#[test]
fn same_seed_same_bits_other_seed_other_images() {
    let dev = inference_device();
    let m = super::unet::randomized(&super::unet::tiny(8, 1, Some(3)), 5);
    let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    let mut sm = ddpm(&s, VarianceType::FixedSmall, 20).unwrap();
    let mut run = |seed: u64, guidance: f32| {
        let opts = GenerateOptions {
            n: 3,
            classes: Some(vec![0, 1, 2]),
            guidance,
            seed,
            cancel: None,
            text: None,
            negative: None,
            image_cond: None,
            guidance_interval: None,
        };
        to_vec(generate(
            &m,
            Some(3),
            [1, 8, 8],
            &mut sm,
            &opts,
            &dev,
            &mut |_, _| {},
        ))
    };
    let a = run(1, 2.0);
    assert_eq!(a.len(), 3 * 64);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, run(1, 2.0));
    assert_ne!(a, run(2, 2.0));
    assert_ne!(a, run(1, 1.0));
}

#[test]
fn every_sampler_visits_distinct_noise_levels_even_at_t_steps() {
    use diffuse::sampler::{SamplerChoice, SamplerKind, SchedulerConfig};
    for spacing in ["leading", "trailing", "linspace"] {
        let cfg = SchedulerConfig {
            timestep_spacing: Some(spacing.into()),
            ..SchedulerConfig::default()
        };
        let s = cfg.noise_schedule().unwrap();
        for kind in SamplerKind::ALL {
            for steps in [1, 7, 999, 1000] {
                let choice = SamplerChoice {
                    steps,
                    ..SamplerChoice::default()
                };
                let Ok(sm) = cfg.build(kind, &s, &choice) else {
                    continue; // some spacings cannot give that many steps
                };
                let t = sm.timesteps();
                assert!(!t.is_empty() && t.iter().all(|v| (0.0..=999.0).contains(v)));
                if kind != SamplerKind::Heun {
                    assert!(
                        t.windows(2).all(|w| w[0] > w[1]),
                        "{spacing} {kind:?} {steps}: repeated timesteps"
                    );
                }
            }
        }
    }
}

/// Requests batched together (the server's worker) give each the bits it gets alone: the
/// noise is drawn per request, and every layer treats images independently.
#[test]
fn batched_requests_give_the_bits_of_solo_runs() {
    use diffuse::sampler::{SamplerChoice, SamplerKind, SeededNoise, generate_with};
    let dev = inference_device();
    let m = diffuse::pipeline::load_model(None, &dev).unwrap();
    let shape = m.config.image_shape();
    let run = |kind: SamplerKind, parts: &[(usize, u64, usize)]| -> Vec<f32> {
        let mut s = m
            .sampler(
                kind,
                &SamplerChoice {
                    steps: 4,
                    ..Default::default()
                },
            )
            .unwrap();
        let seeds: Vec<(usize, u64)> = parts.iter().map(|p| (p.0, p.1)).collect();
        let classes: Vec<usize> = parts.iter().flat_map(|p| vec![p.2; p.0]).collect();
        let opts = GenerateOptions {
            n: classes.len(),
            classes: Some(classes),
            guidance: 2.0,
            seed: 0,
            cancel: None,
            text: None,
            negative: None,
            image_cond: None,
            guidance_interval: None,
        };
        let x = generate_with(
            &m.unet,
            m.config.unet.num_classes,
            shape,
            s.as_mut(),
            &opts,
            &mut SeededNoise::new(&seeds),
            &dev,
            &mut |_, _| {},
        );
        to_vec(x)
    };
    for kind in [SamplerKind::EulerAncestral, SamplerKind::Ddim] {
        let batched = run(kind, &[(1, 11, 7), (2, 5, 3), (1, 9, 0)]);
        let solo: Vec<f32> = [(1, 11, 7), (2, 5, 3), (1, 9, 0)]
            .iter()
            .flat_map(|p| run(kind, &[*p]))
            .collect();
        assert_eq!(batched.len(), 4 * 28 * 28);
        let same = batched
            .iter()
            .zip(&solo)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        let diff = batched
            .iter()
            .zip(&solo)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(same, "{kind:?}: batched differs from solo by up to {diff}");
    }
}

/// Every sampler's `state_scales`: variance-preserving or sigma form, ending clean.
#[test]
fn state_scales_run_from_noise_to_the_clean_image() {
    use diffuse::sampler::{SamplerChoice, SamplerKind};
    let m = diffuse::pipeline::load_model(None, &inference_device()).unwrap();
    for kind in SamplerKind::ALL {
        let s = m
            .sampler(
                kind,
                &SamplerChoice {
                    steps: 10,
                    ..Default::default()
                },
            )
            .unwrap();
        let len = s.timesteps().len();
        // DDIM ends at alpha_bar_0 (its last step's `t - T/K`), the others at level 0.
        let (a_end, s_end) = s.state_scales(len);
        assert!(
            s_end < 0.01 && (a_end - 1.0).abs() < 1e-4,
            "{kind:?}: {a_end} {s_end}"
        );
        let (a0, s0) = s.state_scales(0);
        let sigma_form = matches!(
            kind,
            SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::Heun
        );
        for i in 0..len {
            let (a, sd) = s.state_scales(i);
            if sigma_form {
                assert_eq!(a, 1.0, "{kind:?} {i}");
            } else {
                assert!(
                    (a * a + sd * sd - 1.0).abs() < 1e-6,
                    "{kind:?} {i}: {a} {sd}"
                );
            }
            // Noise falls along the way.
            assert!(sd / a >= s.state_scales(i + 1).1 / s.state_scales(i + 1).0 - 1e-9);
        }
        // The first position is nearly pure noise for this schedule (t = 999).
        assert!(s0 / a0 > 50.0, "{kind:?}: {a0} {s0}");
    }
}

/// Editing: strength 0 returns the image bit for bit; inpainting keeps the unmasked pixels bit
/// for bit and changes the masked ones; same seed, same bits.
#[test]
fn edit_keeps_what_it_must_for_every_sampler() {
    use burn::tensor::{Tensor, TensorData};
    use diffuse::sampler::edit::{EditOptions, edit, start_position};
    use diffuse::sampler::{SamplerChoice, SamplerKind};
    let dev = inference_device();
    let m = diffuse::pipeline::load_model(None, &dev).unwrap();
    let x0: Tensor<4> = Tensor::from_data(
        TensorData::new(
            normal_vec(&mut rng_for(3, Stream::Sample, 9), 2 * 28 * 28)
                .into_iter()
                .map(|v| v.clamp(-1.0, 1.0))
                .collect::<Vec<f32>>(),
            [2, 1, 28, 28],
        ),
        &dev,
    );
    let mask_v: Vec<f32> = (0..28 * 28)
        .map(|p| if p % 28 >= 14 { 1.0 } else { 0.0 })
        .collect();
    let mask: Tensor<4> = Tensor::from_data(TensorData::new(mask_v.clone(), [1, 1, 28, 28]), &dev);
    let x0v = to_vec(x0.clone());
    for kind in SamplerKind::ALL {
        let build = || {
            m.sampler(
                kind,
                &SamplerChoice {
                    steps: 6,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let run = |strength: f64, mask: Option<Tensor<4>>, seed: u64| {
            let mut s = build();
            let opts = GenerateOptions {
                n: 2,
                classes: Some(vec![7, 7]),
                guidance: 2.0,
                seed,
                cancel: None,
                text: None,
                negative: None,
                image_cond: None,
                guidance_interval: None,
            };
            let e = EditOptions { strength, mask };
            to_vec(edit(
                &m.unet,
                Some(10),
                x0.clone(),
                s.as_mut(),
                &opts,
                &e,
                &mut |_, _| {},
            ))
        };
        let s = build();
        assert_eq!(start_position(s.as_ref(), 0.0), s.timesteps().len());
        assert_eq!(start_position(s.as_ref(), 1.0), 0);
        assert_eq!(run(0.0, None, 1), x0v, "{kind:?}: strength 0");
        let sd = run(0.5, None, 1);
        assert_ne!(sd, x0v, "{kind:?}: strength 0.5 changes the image");
        assert_eq!(sd, run(0.5, None, 1), "{kind:?}: same seed, same bits");
        let inp = run(1.0, Some(mask.clone()), 2);
        let mut changed = 0;
        for (p, (a, b)) in inp.iter().zip(&x0v).enumerate() {
            if mask_v[p % (28 * 28)] == 0.0 {
                assert_eq!(a.to_bits(), b.to_bits(), "{kind:?}: kept pixel {p} changed");
            } else if a != b {
                changed += 1;
            }
        }
        assert!(
            changed > 28 * 14,
            "{kind:?}: only {changed} masked pixels changed"
        );
    }
}

/// DDIM's step against eq. 12 (eta 0) with and without `--clip-sample`: clipping replaces
/// `x0_hat` by `clip(x0_hat, -1, 1)` and keeps the model's `eps`; only ddpm and ddim take it.
#[test]
fn ddim_clips_the_clean_estimate_only_when_asked() {
    use diffuse::sampler::{SamplerChoice, SamplerKind, SchedulerConfig};
    let dev = inference_device();
    let cfg = SchedulerConfig::for_model(&ScheduleConfig::default(), Prediction::Epsilon);
    let s = cfg.noise_schedule().unwrap();
    let mut rng = rng_for(3, Stream::Sample, 1);
    let x = normal_tensor(&mut rng, [1, 1, 4, 4], &dev) * 3.0;
    let eps = normal_tensor(&mut rng, [1, 1, 4, 4], &dev) * 0.2;
    let (xv, ev) = (to_vec(x.clone()), to_vec(eps.clone()));
    for clip in [None, Some(true), Some(false)] {
        let choice = SamplerChoice {
            steps: 10,
            clip_sample: clip,
            ..SamplerChoice::default()
        };
        let mut sm = cfg.build(SamplerKind::Ddim, &s, &choice).unwrap();
        let i = 5;
        let (t, tp) = (sm.timesteps()[i] as usize, sm.timesteps()[i + 1] as usize);
        let (ab, abp) = (s.alphas_cumprod[t], s.alphas_cumprod[tp]);
        let mut r = rng_for(9, Stream::Sample, 2);
        let got = to_vec(sm.step(i, x.clone(), eps.clone(), &mut r));
        let mut clipped = 0;
        for k in 0..16 {
            let mut x0 = (xv[k] as f64 - (1.0 - ab).sqrt() * ev[k] as f64) / ab.sqrt();
            if clip != Some(false) && x0.abs() > 1.0 {
                x0 = x0.signum();
                clipped += 1;
            }
            let want = abp.sqrt() * x0 + (1.0 - abp).sqrt() * ev[k] as f64;
            assert!(
                (got[k] as f64 - want).abs() < 1e-4,
                "{clip:?} k={k}: {} vs {want}",
                got[k]
            );
        }
        if clip != Some(false) {
            assert!(clipped > 0, "the test's x0_hat leaves [-1, 1] somewhere");
        }
    }
    let e = cfg
        .build(
            SamplerKind::Euler,
            &s,
            &SamplerChoice {
                steps: 10,
                clip_sample: Some(true),
                ..SamplerChoice::default()
            },
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--clip-sample is an option of the ddpm and ddim"),
        "{e}"
    );
}
