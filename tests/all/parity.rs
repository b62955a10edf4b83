//! Samplers against diffusers: given the same model outputs (and, for the stochastic ones, the
//! same noise draws), the same trajectory. Each fixture carries its diffusers scheduler config,
//! which is read with `SchedulerConfig::from_json` as a pipeline's scheduler_config.json is.
//! Fixtures are made by tests/fixtures/diffusers/make_scheduler_fixtures.py.

use super::data::fixture;
use burn::tensor::{Device, Tensor, TensorData};
use diffuse::device::inference_device;
use diffuse::sampler::{NoiseSource, SamplerChoice, SchedulerConfig};
use diffuse::weights::{HostTensor, read_safetensors};

fn slice(t: &HostTensor, i: usize) -> (Vec<f32>, [usize; 4]) {
    let shape = [t.shape[1], t.shape[2], t.shape[3], t.shape[4]];
    let n: usize = shape.iter().product();
    (t.data[i * n..(i + 1) * n].to_vec(), shape)
}

fn host(x: Tensor<4>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn mag(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Replays the noise diffusers drew, in order.
struct Replay {
    draws: Vec<(Vec<f32>, [usize; 4])>,
    next: usize,
}

impl NoiseSource for Replay {
    fn normal(&mut self, dims: [usize; 4], device: &Device) -> Tensor<4> {
        let (v, s) = self.draws[self.next].clone();
        assert_eq!(s, dims, "noise draw {} has another shape", self.next);
        self.next += 1;
        Tensor::from_data(TensorData::new(v, s), device)
    }
}

/// Every scheduler fixture (sampler, schedule, spacing, objective): timesteps, starting noise
/// level, model inputs and every state of the trajectory.
///
/// Errors are measured against the largest state magnitude seen so far: f32 holds a state to
/// ~6e-8 of its own magnitude, and the rounding of a large state persists after a step shrinks
/// it (cosine's sigma_max is 2e4: the first Euler step cancels four orders of magnitude, in
/// diffusers' f32 result too). The bound is 1e-5, or twice the distance between diffusers' own
/// f32 and f64 runs where that is larger: only Heun over cosine (its corrector multiplies the
/// rounding of the 2e4-sized first state by `dt / sigma ~ 2000`; diffusers' f32 result is
/// 1.6e-4 from its f64 one).
#[test]
fn samplers_match_diffusers_over_whole_trajectories() {
    let dev = inference_device();
    let mut names: Vec<String> = std::fs::read_dir(fixture("diffusers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter_map(|n| n.strip_suffix(".safetensors").map(str::to_string))
        .collect();
    names.sort();
    let mut checked = 0;
    for name in &names {
        let (t, meta) =
            read_safetensors(&fixture(&format!("diffusers/{name}.safetensors"))).unwrap();
        if !meta.contains_key("sampler") {
            continue; // a pipeline fixture
        }
        checked += 1;
        let cfg = SchedulerConfig::from_json(&meta["config"], name).unwrap();
        let kind = meta["sampler"].parse().unwrap();
        let choice = SamplerChoice {
            steps: meta["steps"].parse().unwrap(),
            ..SamplerChoice::default()
        };
        let schedule = cfg.noise_schedule().unwrap();
        let mut sampler = cfg.build(kind, &schedule, &choice).unwrap();
        let want_t = &t["timesteps"].data;
        assert_eq!(
            sampler.timesteps().len(),
            want_t.len(),
            "{name}: step count"
        );
        for (a, b) in sampler.timesteps().iter().zip(want_t) {
            assert!((a - *b as f64).abs() < 1e-3, "{name}: timestep {a} vs {b}");
        }
        let init: f64 = meta["init_noise_sigma"].parse().unwrap();
        let e = (sampler.init_noise_sigma() / init - 1.0).abs();
        assert!(e < 1e-5, "{name}: init noise sigma off by {e}");

        let x0 = &t["x_T"];
        let shape = [x0.shape[0], x0.shape[1], x0.shape[2], x0.shape[3]];
        let mut x = Tensor::<4>::from_data(TensorData::new(x0.data.clone(), shape), &dev)
            * (sampler.init_noise_sigma() as f32);
        let mut noise = Replay {
            draws: t
                .get("noise")
                .map(|n| (0..n.shape[0]).map(|i| slice(n, i)).collect())
                .unwrap_or_default(),
            next: 0,
        };
        let spread = t["f64_spread"].data.iter().fold(0f32, |m, v| m.max(*v));
        let bound = (2.0 * spread).max(1e-5);
        let mut seen = mag(&host(x.clone()));
        for i in 0..want_t.len() {
            let (want_in, s) = slice(&t["model_in"], i);
            let input = host(sampler.scale_model_input(i, x.clone()));
            let shrink = host(sampler.scale_model_input(i, Tensor::ones(s, &dev)))[0];
            let e = max_diff(&input, &want_in) / mag(&want_in).max(seen * shrink).max(1e-6);
            assert!(e < bound, "{name}: step {i} model input relative error {e}");
            let (out, s) = slice(&t["model_out"], i);
            let out = Tensor::<4>::from_data(TensorData::new(out, s), &dev);
            x = sampler.step(i, x, out, &mut noise);
            let want = slice(&t["trajectory"], i).0;
            seen = seen.max(mag(&want));
            let e = max_diff(&host(x.clone()), &want) / seen.max(1e-6);
            assert!(
                e < bound,
                "{name}: step {i} relative error {e} (bound {bound})"
            );
        }
    }
    // Every sampler x schedule x objective fixture the script writes (72) was read.
    assert!(checked >= 72, "only {checked} scheduler fixtures found");
}
