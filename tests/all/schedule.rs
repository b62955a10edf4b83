//! Forward process: schedule arrays against closed forms, and statistics of sampled x_t.

use burn::tensor::{Tensor, TensorData};
use diffuse::device::inference_device;
use diffuse::rng::{Stream, normal_tensor, rng_for};
use diffuse::schedule::{BetaSchedule, NoiseSchedule, Prediction, ScheduleConfig};

fn sched(kind: BetaSchedule) -> NoiseSchedule {
    NoiseSchedule::new(&ScheduleConfig {
        beta_schedule: kind,
        ..ScheduleConfig::default()
    })
    .unwrap()
}

#[test]
fn linear_schedule_matches_closed_form() {
    let s = sched(BetaSchedule::Linear);
    assert_eq!(s.len(), 1000);
    assert!((s.betas[0] - 1e-4).abs() < 1e-15);
    assert!((s.betas[999] - 0.02).abs() < 1e-15);
    assert!((s.betas[500] - (1e-4 + (0.02 - 1e-4) * 500.0 / 999.0)).abs() < 1e-15);
    // prod(1 - beta) over T = 1000 is about 4.04e-5 (DDPM's linear schedule).
    let last = s.alphas_cumprod[999];
    assert!((last - 4.036e-5).abs() < 0.01e-5, "alpha_bar_T = {last}");
    // Cumulative product by its definition, and the shifted "prev" array.
    let mut acc = 1.0;
    for t in 0..1000 {
        acc *= 1.0 - s.betas[t];
        assert!((s.alphas_cumprod[t] - acc).abs() < 1e-14);
    }
    assert_eq!(s.alphas_cumprod_prev[0], 1.0);
    assert_eq!(s.alphas_cumprod_prev[10], s.alphas_cumprod[9]);
}

#[test]
fn cosine_schedule_matches_closed_form() {
    let s = sched(BetaSchedule::Cosine);
    let f = |t: f64| {
        (((t / 1000.0) + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    // Away from the clipped end, alpha_bar_t = f(t+1)/f(0) exactly.
    for t in [0usize, 1, 10, 100, 500, 900] {
        let want = f(t as f64 + 1.0) / f(0.0);
        assert!((s.alphas_cumprod[t] - want).abs() < 1e-12, "t={t}");
    }
    assert!(s.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
    assert_eq!(s.betas[999], 0.999);
}

#[test]
fn sigmoid_schedule_is_monotone_and_ends_near_zero() {
    let s = sched(BetaSchedule::Sigmoid);
    assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
    assert!(s.alphas_cumprod[0] > 0.999 && s.alphas_cumprod[0] < 1.0);
    assert!(s.alphas_cumprod[999] < 1e-3);
}

#[test]
fn snr_and_posterior_variance_formulas() {
    let s = sched(BetaSchedule::Linear);
    for t in [1usize, 10, 999] {
        let a = s.alphas_cumprod[t];
        assert!((s.snr(t) - a / (1.0 - a)).abs() < 1e-12 * s.snr(t).max(1.0));
        let want = (1.0 - s.alphas_cumprod[t - 1]) / (1.0 - a) * s.betas[t];
        assert!((s.posterior_variance(t) - want).abs() < 1e-15);
    }
    // The posterior variance never exceeds beta_t and is 0 at t = 0.
    assert_eq!(s.posterior_variance(0), 0.0);
    assert!((1..1000).all(|t| s.posterior_variance(t) <= s.betas[t]));
}

#[test]
fn bad_schedule_configs_are_rejected() {
    for cfg in [
        ScheduleConfig {
            timesteps: 0,
            ..Default::default()
        },
        ScheduleConfig {
            beta_start: 0.0,
            ..Default::default()
        },
        ScheduleConfig {
            beta_start: 0.1,
            beta_end: 0.01,
            ..Default::default()
        },
        ScheduleConfig {
            beta_end: 1.5,
            ..Default::default()
        },
    ] {
        assert!(NoiseSchedule::new(&cfg).is_err(), "{cfg:?}");
    }
}

#[test]
fn q_sample_has_the_closed_form_mean_and_variance() {
    let dev = inference_device();
    let s = sched(BetaSchedule::Linear);
    let n = 64 * 32 * 32;
    let x0 = Tensor::<4>::from_data(TensorData::new(vec![0.5f32; n], [64, 1, 32, 32]), &dev);
    for t in [0usize, 100, 500, 999] {
        let eps = normal_tensor(
            &mut rng_for(7, Stream::Sample, t as u64),
            [64, 1, 32, 32],
            &dev,
        );
        let xt = s.q_sample(x0.clone(), eps, &[t; 64]);
        let v: Vec<f32> = xt.into_data().convert::<f32>().try_into_vec().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let a = s.alphas_cumprod[t];
        let (m_want, v_want) = (a.sqrt() * 0.5, 1.0 - a);
        // 65k draws: the standard error of the mean is sqrt(v/n) < 0.004.
        assert!(
            (mean - m_want).abs() < 5.0 * (v_want / n as f64).sqrt() + 1e-6,
            "t={t} mean {mean} want {m_want}"
        );
        assert!(
            (var - v_want).abs() < 0.03 * v_want + 1e-9,
            "t={t} var {var} want {v_want}"
        );
    }
}

#[test]
fn prediction_conversions_invert_the_forward_process() {
    let dev = inference_device();
    let s = sched(BetaSchedule::Cosine);
    let mut rng = rng_for(3, Stream::Sample, 0);
    let x0 = normal_tensor(&mut rng, [4, 3, 5, 5], &dev).clamp(-1.0, 1.0);
    let eps = normal_tensor(&mut rng, [4, 3, 5, 5], &dev);
    let t = [3usize, 250, 600, 990];
    let xt = s.q_sample(x0.clone(), eps.clone(), &t);
    for p in [Prediction::Epsilon, Prediction::V, Prediction::X0] {
        let target = s.target(p, x0.clone(), eps.clone(), &t);
        let (x0_hat, eps_hat) = s.split_prediction(p, xt.clone(), target, &t);
        let e0 = (x0_hat - x0.clone()).abs().max().into_scalar::<f32>();
        let e1 = (eps_hat - eps.clone()).abs().max().into_scalar::<f32>();
        // x0 from epsilon at t = 990 divides by sqrt(alpha_bar) ~ 0.03, amplifying f32 rounding.
        assert!(e0 < 2e-3 && e1 < 2e-3, "{p:?}: x0 err {e0}, eps err {e1}");
    }
}
