//! diffusers pipeline folders: UNet2DModel outputs, the DDIM loop, export, and bad folders.
//! Fixtures are made by tests/fixtures/diffusers/make_pipeline_fixtures.py and
//! make_flow_export_fixture.py.

use super::cli::{fails, ok, ok_with_env};
use super::data::fixture;
use burn::tensor::{Tensor, TensorData};
use diffuse::device::inference_device;
use diffuse::interop::diffusers::load_pipeline;
use diffuse::model::LoadedModel;
use diffuse::sampler::SamplerKind;
use diffuse::weights::{self, HostTensor, NamedTensors, read_safetensors};
use std::path::Path;

pub fn tensor4(t: &HostTensor) -> Tensor<4> {
    let s: [usize; 4] = t.shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(t.data.clone(), s), &inference_device())
}

/// Largest absolute difference over the largest magnitude of `want`.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// The model's output on the fixture's inputs `x`, `t` (and `labels`) against diffusers' `out`.
fn forward_error(m: &LoadedModel, io: &NamedTensors) -> f32 {
    let t: Vec<f64> = io["t"].data.iter().map(|&v| v as f64).collect();
    let labels: Option<Vec<usize>> = io
        .get("labels")
        .map(|l| l.data.iter().map(|&v| v as usize).collect());
    let y = m.unet.forward(tensor4(&io["x"]), &t, labels.as_deref());
    let got: Vec<f32> = y.into_data().convert::<f32>().try_into_vec().unwrap();
    rel_err(&got, &io["out"].data)
}

fn pipeline(name: &str) -> String {
    fixture(&format!("diffusers/pipelines/{name}"))
        .display()
        .to_string()
}

#[test]
fn unet2d_models_match_diffusers_outputs() {
    let dev = inference_device();
    for name in ["cifar10-tiny", "celebahq-tiny", "multihead-class"] {
        let m = load_pipeline(Path::new(&pipeline(name)), &dev).unwrap();
        let (io, _) =
            read_safetensors(&fixture(&format!("diffusers/{name}_io.safetensors"))).unwrap();
        let e = forward_error(&m, &io);
        eprintln!("{name}: UNet output relative error {e}");
        assert!(e < 1e-4, "{name}: UNet output relative error {e}");
    }
    // Keys diffusers' scheduler config sets, as read.
    let m = load_pipeline(Path::new(&pipeline("multihead-class")), &dev).unwrap();
    assert_eq!(m.scheduler.settings.prediction_type, "v_prediction");
    assert_eq!(
        m.scheduler.settings.timestep_spacing.as_deref(),
        Some("trailing")
    );
    assert_eq!(m.config.unet.heads(32), 4);
}

/// `--init-noise` / `--save-tensor`: the whole DDIM loop against DDIMScheduler.from_config.
fn ddim_matches(model: &str, fixture_file: &Path, noise_key: &str, sample_key: &str) {
    let ddim = ["--sampler", "ddim", "--steps", "10", "--eta", "0"];
    loop_matches(model, fixture_file, noise_key, sample_key, &ddim, "DDIM");
}

/// A sampling loop (`sampler`: its options) from the fixture's noise against diffusers' result.
fn loop_matches(
    model: &str,
    fixture_file: &Path,
    noise_key: &str,
    sample_key: &str,
    sampler: &[&str],
    what: &str,
) {
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = read_safetensors(fixture_file).unwrap();
    let noise = tmp.path().join("noise.safetensors");
    let mut n = NamedTensors::new();
    n.insert("noise".into(), t[noise_key].clone());
    let bytes = weights::to_safetensors(&n, &Default::default(), weights::StoreDtype::F32).unwrap();
    std::fs::write(&noise, bytes).unwrap();
    let out = tmp.path().join("out.safetensors");
    let png = tmp.path().join("grid.png");
    // An f32 parity test: bf16 products (the default on AMX processors) are another question.
    // It runs the f32 kernels that round about as PyTorch's convolutions do: F(2x2, 3x3)
    // Winograd. The default f32 forward, F(4x4, 3x3), is within 3e-6 of diffusers per U-Net
    // call (`unet2d_models_match_diffusers_outputs`; F(2x2, 3x3): 8e-7), but these random
    // networks amplify rounding about a thousandfold over the ten steps: 1.3e-3 here.
    ok_with_env(
        &[("DIFFUSE_KERNELS", "conv,norm,winograd")],
        &[
            ["sample", "--precision", "f32", "--model", model].as_slice(),
            sampler,
            &[
                "--init-noise",
                noise.to_str().unwrap(),
                "--save-tensor",
                out.to_str().unwrap(),
                "--out",
                png.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(png.exists());
    let (got, _) = read_safetensors(&out).unwrap();
    assert_eq!(got["sample"].shape, t[sample_key].shape);
    let e = rel_err(&got["sample"].data, &t[sample_key].data);
    // diffusers' own f32 loop is `spread` from its f64 one (the random networks make the loop
    // chaotic: errors about double per step); ours is about as far from exact, so the two f32
    // results may be up to ~2 spreads apart, plus what another CPU's rounding adds.
    let bound = (3.0 * t["f64_spread"].data[0]).max(1e-4);
    eprintln!("{model}: {what} loop relative error {e} (bound {bound})");
    assert!(
        e < bound,
        "{model}: {what} loop relative error {e} (bound {bound})"
    );
}

#[test]
fn ddim_loop_on_pipelines_matches_diffusers() {
    for name in ["cifar10-tiny", "celebahq-tiny"] {
        let f = fixture(&format!("diffusers/{name}_ddim.safetensors"));
        ddim_matches(&pipeline(name), &f, "noise", "sample");
    }
}

#[test]
fn every_sampler_runs_on_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let model = pipeline("cifar10-tiny");
    for kind in SamplerKind::ALL {
        let png = tmp.path().join(format!("{}.png", kind.name()));
        ok(&[
            "sample",
            "--model",
            &model,
            "--sampler",
            kind.name(),
            "--steps",
            "3",
            "--n",
            "2",
            "--out",
            png.to_str().unwrap(),
        ]);
        assert!(png.exists(), "{}", kind.name());
    }
}

#[test]
fn exported_models_are_what_diffusers_loads_and_runs() {
    let dev = inference_device();
    // What diffusers computed from the exported folders (see the fixture script).
    let embedded = diffuse::pipeline::load_model(None, &dev).unwrap();
    let (io, _) = read_safetensors(&fixture("diffusers/export_fashion_io.safetensors")).unwrap();
    let e = forward_error(&embedded, &io);
    assert!(e < 1e-4, "embedded model vs diffusers: {e}");
    let tiny = fixture("diffusers/tiny-uncond.safetensors");
    let m = diffuse::pipeline::load_model(tiny.to_str(), &dev).unwrap();
    let f = fixture("diffusers/export_uncond_io.safetensors");
    let (io, _) = read_safetensors(&f).unwrap();
    let e = forward_error(&m, &io);
    assert!(e < 1e-4, "tiny model vs diffusers: {e}");

    // Export again here; the folder reads back to the same tensors and samples as diffusers did.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipe");
    ok(&[
        "export",
        "--model",
        tiny.to_str().unwrap(),
        "--diffusers",
        out.to_str().unwrap(),
    ]);
    let back = load_pipeline(&out, &dev).unwrap();
    let (mut a, mut b) = (NamedTensors::new(), NamedTensors::new());
    weights::collect(&m.unet, "", &mut a);
    weights::collect(&back.unet, "", &mut b);
    assert_eq!(a, b, "export then load changes no weight");
    assert_eq!(back.config.unet, m.config.unet);
    ddim_matches(out.to_str().unwrap(), &f, "noise", "ddim_sample");
    fails(
        &[
            "export",
            "--model",
            tiny.to_str().unwrap(),
            "--diffusers",
            out.to_str().unwrap(),
        ],
        "already exists",
    );
}

/// A flow-matching model exported to diffusers (make_flow_export_fixture.py): diffusers'
/// UNet2DModel gives the same outputs, DDPMPipeline ran it with FlowMatchEulerDiscreteScheduler,
/// and that scheduler's Euler loop at diffuse's times is what `sample` computes from the run and
/// from the exported folder read back.
#[test]
fn exported_flow_models_run_in_diffusers() {
    let dev = inference_device();
    let tiny = fixture("diffusers/tiny-flow.safetensors");
    let m = diffuse::pipeline::load_model(tiny.to_str(), &dev).unwrap();
    assert!(m.config.prediction.is_flow());
    let f = fixture("diffusers/tiny-flow_io.safetensors");
    let (io, _) = read_safetensors(&f).unwrap();
    let e = forward_error(&m, &io);
    assert!(e < 1e-4, "tiny flow model vs diffusers: {e}");
    let euler = ["--sampler", "euler", "--steps", "4"];
    loop_matches(
        tiny.to_str().unwrap(),
        &f,
        "noise",
        "euler_sample",
        &euler,
        "flow Euler",
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipe");
    let out = out.to_str().unwrap();
    ok(&[
        "export",
        "--model",
        tiny.to_str().unwrap(),
        "--diffusers",
        out,
    ]);
    let back = load_pipeline(Path::new(out), &dev).unwrap();
    assert!(back.config.prediction.is_flow());
    loop_matches(
        out,
        &f,
        "noise",
        "euler_sample",
        &euler,
        "flow Euler, exported",
    );
}

/// A copy of a fixture pipeline with its unet config edited.
fn edited_pipeline(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> String {
    let src = Path::new(&pipeline("multihead-class")).to_path_buf();
    for sub in ["", "unet", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    let cfg_path = dir.join("unet/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    dir.display().to_string()
}

#[test]
fn bad_pipelines_get_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &["sample", "--model", empty.to_str().unwrap(), "--steps", "2"],
        "model_index.json",
    );
    let cross = edited_pipeline(&tmp.path().join("cross"), |v| {
        v["down_block_types"][1] = "CrossAttnDownBlock2D".into();
    });
    fails(
        &["sample", "--model", &cross, "--steps", "2"],
        "CrossAttnDownBlock2D",
    );
    let fourier = edited_pipeline(&tmp.path().join("fourier"), |v| {
        v["time_embedding_type"] = "fourier".into();
    });
    fails(
        &["sample", "--model", &fourier, "--steps", "2"],
        "time_embedding_type",
    );
    let wider = edited_pipeline(&tmp.path().join("wider"), |v| {
        v["block_out_channels"] = serde_json::json!([16, 48]);
    });
    fails(&["sample", "--model", &wider, "--steps", "2"], "has shape");
    let flow = edited_pipeline(&tmp.path().join("flow"), |_| {});
    let sc = Path::new(&flow).join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sc).unwrap();
    std::fs::write(&sc, text.replace("v_prediction", "velocity")).unwrap();
    fails(
        &["sample", "--model", &flow, "--steps", "2"],
        "scheduler key prediction_type",
    );
    // diffuse's own flow objective is no diffusers DDPM-style scheduler.
    std::fs::write(&sc, text.replace("v_prediction", "flow")).unwrap();
    fails(
        &["sample", "--model", &flow, "--steps", "2"],
        "prediction_type flow is diffuse's flow matching",
    );
    std::fs::write(&sc, text.replace("\"trailing\"", "\"middle\"")).unwrap();
    fails(
        &["sample", "--model", &flow, "--steps", "2"],
        "timestep_spacing",
    );
    let good = pipeline("multihead-class");
    let noise = tmp.path().join("noise.safetensors");
    let mut n = NamedTensors::new();
    n.insert(
        "noise".into(),
        HostTensor {
            shape: vec![2, 3, 8, 8],
            data: vec![0.0; 2 * 3 * 64],
        },
    );
    let bytes = weights::to_safetensors(&n, &Default::default(), weights::StoreDtype::F32).unwrap();
    std::fs::write(&noise, bytes).unwrap();
    fails(
        &[
            "sample",
            "--model",
            &good,
            "--steps",
            "2",
            "--init-noise",
            noise.to_str().unwrap(),
        ],
        "[N, 1, 8, 8]",
    );
    fails(
        &["sample", "--model", &good, "--sampler", "plms"],
        "unknown sampler 'plms'",
    );
}

#[test]
fn sharded_and_legacy_named_weights_load_the_same() {
    let dev = inference_device();
    let src = Path::new(&pipeline("multihead-class")).to_path_buf();
    let reference = load_pipeline(&src, &dev).unwrap();
    let (tensors, _) =
        read_safetensors(&src.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (variant, legacy) in [("sharded", false), ("legacy", true)] {
        let dir = tmp.path().join(variant);
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        std::fs::create_dir_all(dir.join("scheduler")).unwrap();
        for f in [
            "model_index.json",
            "unet/config.json",
            "scheduler/scheduler_config.json",
        ] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let rename = |k: &str| {
            if !legacy {
                return k.to_string();
            }
            k.replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.")
        };
        let mut shards = [NamedTensors::new(), NamedTensors::new()];
        let mut map = serde_json::Map::new();
        for (i, (k, v)) in tensors.iter().enumerate() {
            let name = rename(k);
            let file = format!(
                "diffusion_pytorch_model-0000{}-of-00002.safetensors",
                i % 2 + 1
            );
            map.insert(name.clone(), file.into());
            shards[i % 2].insert(name, v.clone());
        }
        if legacy {
            let all: NamedTensors = shards.iter().flat_map(|s| s.clone()).collect();
            let bytes =
                weights::to_safetensors(&all, &Default::default(), weights::StoreDtype::F16)
                    .unwrap();
            std::fs::write(dir.join("unet/diffusion_pytorch_model.safetensors"), bytes).unwrap();
        } else {
            for (i, s) in shards.iter().enumerate() {
                let bytes =
                    weights::to_safetensors(s, &Default::default(), weights::StoreDtype::F32)
                        .unwrap();
                let f = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
                std::fs::write(dir.join("unet").join(f), bytes).unwrap();
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": map});
            std::fs::write(
                dir.join("unet/diffusion_pytorch_model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
        }
        let m = load_pipeline(&dir, &dev).unwrap();
        let (mut a, mut b) = (NamedTensors::new(), NamedTensors::new());
        weights::collect(&reference.unet, "", &mut a);
        weights::collect(&m.unet, "", &mut b);
        assert_eq!(a, b, "{variant}");
    }
}
