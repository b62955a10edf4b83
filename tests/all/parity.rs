//! Samplers against diffusers: given the same model outputs, the same trajectory. Fixtures are
//! made by tests/fixtures/diffusers/make_scheduler_fixtures.py.

use super::data::fixture;
use burn::tensor::{Tensor, TensorData};
use diffuse::device::inference_device;
use diffuse::rng::{Stream, rng_for};
use diffuse::sampler::{DdimOptions, DdimSampler, EulerOptions, EulerSampler, Sampler};
use diffuse::schedule::{NoiseSchedule, ScheduleConfig};
use diffuse::weights::{HostTensor, read_safetensors};

fn slice(t: &HostTensor, i: usize) -> (Vec<f32>, [usize; 4]) {
    let shape = [t.shape[1], t.shape[2], t.shape[3], t.shape[4]];
    let n: usize = shape.iter().product();
    (t.data[i * n..(i + 1) * n].to_vec(), shape)
}

/// The noise schedule a diffusers scheduler config describes (with diffusers' f32 betas).
fn schedule_of(cfg: &serde_json::Value) -> NoiseSchedule {
    NoiseSchedule::new(&ScheduleConfig {
        beta_schedule: cfg["beta_schedule"].as_str().unwrap().parse().unwrap(),
        timesteps: cfg["num_train_timesteps"].as_u64().unwrap() as usize,
        beta_start: cfg["beta_start"].as_f64().unwrap(),
        beta_end: cfg["beta_end"].as_f64().unwrap(),
    })
    .unwrap()
    .with_f32_betas()
}

/// Largest absolute difference over the largest magnitude of `want`.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn host(x: Tensor<4>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_into_vec().unwrap()
}

#[test]
fn euler_matches_diffusers_over_whole_trajectories() {
    let dev = inference_device();
    for name in [
        "euler_linear_leading_eps",
        "euler_cosine_linspace_v",
        "euler_scaled_trailing_eps",
    ] {
        let (t, meta) =
            read_safetensors(&fixture(&format!("diffusers/{name}.safetensors"))).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
        let steps: usize = meta["steps"].parse().unwrap();
        let opts = EulerOptions {
            steps,
            spacing: cfg["timestep_spacing"].as_str().unwrap().parse().unwrap(),
            steps_offset: cfg["steps_offset"].as_u64().unwrap() as usize,
            ancestral: false,
        };
        let prediction = cfg["prediction_type"].as_str().unwrap().parse().unwrap();
        let sampler = EulerSampler::new(&schedule_of(&cfg), prediction, opts).unwrap();
        for (a, b) in sampler.timesteps().iter().zip(&t["timesteps"].data) {
            assert!((a - *b as f64).abs() < 1e-3, "{name}: timestep {a} vs {b}");
        }
        let init: f64 = meta["init_noise_sigma"].parse().unwrap();
        assert!(
            (sampler.init_noise_sigma() / init - 1.0).abs() < 1e-5,
            "{name}: init sigma"
        );
        let x0 = &t["x_T"];
        let shape = [x0.shape[0], x0.shape[1], x0.shape[2], x0.shape[3]];
        let mut x = Tensor::<4>::from_data(TensorData::new(x0.data.clone(), shape), &dev)
            * (sampler.init_noise_sigma() as f32);
        let mut rng = rng_for(0, Stream::Sample, 0);
        // f32 holds a state to ~6e-8 of its own magnitude, and the rounding of a large state
        // persists after a step shrinks it (cosine's sigma_max is 2e4: the first Euler step
        // cancels four orders of magnitude, in diffusers' f32 result too). So errors are
        // measured against the largest state magnitude seen so far.
        let mag = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let mut seen = mag(&host(x.clone()));
        for i in 0..steps {
            let (want_in, s) = slice(&t["model_in"], i);
            let input = host(sampler.scale_model_input(i, x.clone()));
            let shrink = host(sampler.scale_model_input(i, Tensor::ones(s, &dev)))[0];
            let e = rel_err(&input, &want_in) * mag(&want_in) / mag(&want_in).max(seen * shrink);
            assert!(e < 1e-5, "{name}: step {i} model input relative error {e}");
            let (out, s) = slice(&t["model_out"], i);
            let out = Tensor::<4>::from_data(TensorData::new(out, s), &dev);
            x = sampler.step(i, x, out, &mut rng);
            let want = slice(&t["trajectory"], i).0;
            seen = seen.max(mag(&want));
            let e = rel_err(&host(x.clone()), &want) * mag(&want) / seen;
            assert!(e < 1e-5, "{name}: step {i} relative error {e}");
        }
    }
}

#[test]
fn ddim_matches_diffusers_over_whole_trajectories() {
    let dev = inference_device();
    for name in [
        "ddim_linear_leading_eps",
        "ddim_cosine_trailing_v",
        "ddim_scaled_linspace_sample",
        "ddim_linear_leading_offset1_eps",
    ] {
        let (t, meta) =
            read_safetensors(&fixture(&format!("diffusers/{name}.safetensors"))).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
        let steps: usize = meta["steps"].parse().unwrap();
        let schedule = schedule_of(&cfg);
        let prediction = cfg["prediction_type"].as_str().unwrap().parse().unwrap();
        let opts = DdimOptions {
            steps,
            eta: 0.0,
            spacing: cfg["timestep_spacing"].as_str().unwrap().parse().unwrap(),
            steps_offset: cfg["steps_offset"].as_u64().unwrap() as usize,
            set_alpha_to_one: cfg["set_alpha_to_one"].as_bool().unwrap(),
            clip_sample: cfg["clip_sample"]
                .as_bool()
                .unwrap()
                .then(|| cfg["clip_sample_range"].as_f64().unwrap()),
        };
        let sampler = DdimSampler::new(&schedule, prediction, opts).unwrap();
        let want_t: Vec<f64> = t["timesteps"].data.iter().map(|&v| v as f64).collect();
        assert_eq!(sampler.timesteps(), &want_t[..], "{name}: timesteps");

        let x0 = &t["x_T"];
        let shape = [x0.shape[0], x0.shape[1], x0.shape[2], x0.shape[3]];
        let mut x = Tensor::<4>::from_data(TensorData::new(x0.data.clone(), shape), &dev);
        let mut rng = rng_for(0, Stream::Sample, 0);
        for i in 0..steps {
            let (out, s) = slice(&t["model_out"], i);
            let out = Tensor::<4>::from_data(TensorData::new(out, s), &dev);
            x = sampler.step(i, x, out, &mut rng);
            let (want, _) = slice(&t["trajectory"], i);
            let got: Vec<f32> = x
                .clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err / scale < 1e-5,
                "{name}: step {i} relative error {}",
                err / scale
            );
        }
    }
}
