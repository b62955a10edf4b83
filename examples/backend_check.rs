//! Compares the active backend (built with `--features vulkan` or `cuda`) against the Flex CPU
//! backend on the embedded model, op by op and block by block, on the same inputs; prints the
//! largest relative difference of each, then three training steps (loss, gradient norm and
//! updated weights). Run on a GPU machine to find where a backend departs.
//!
//!   cargo run --release --features vulkan --example backend_check

use anyhow::Result;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use diffuse::device::inference_device;
use diffuse::model;
use diffuse::sampler::SamplerKind;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn report<const D: usize>(name: &str, a: Tensor<D>, b: Tensor<D>) {
    let shape = a.dims();
    let (a, b) = (host(a), host(b));
    let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let bad = a.iter().any(|v| !v.is_finite());
    println!(
        "{name:<28} {shape:?}  max |diff| / max |ref| = {:.2e}{}",
        diff / scale,
        if bad { "  NON-FINITE" } else { "" }
    );
}

fn input(shape: [usize; 4], seed: u32, dev: &Device) -> Tensor<4> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2654435761) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(v, shape), dev)
}

/// A 5-step sampler of `kind` for model `m`.
fn five_steps(m: &model::LoadedModel, kind: SamplerKind) -> Box<dyn diffuse::sampler::Sampler> {
    let choice = diffuse::sampler::SamplerChoice {
        steps: 5,
        ..Default::default()
    };
    m.sampler(kind, &choice).expect("sampler")
}

fn main() -> Result<()> {
    let (gpu, cpu) = (inference_device(), Device::flex());
    println!("backend {} against flex", diffuse::device::backend_name());
    // The embedded model, loaded once per device.
    let loaded_g = diffuse::pipeline::load_model(None, &gpu)?;
    let loaded_c = diffuse::pipeline::load_model(None, &cpu)?;
    let (mg, mc) = (&loaded_g.unet, &loaded_c.unet);
    let x = |d: &Device| input([4, 1, 28, 28], 1, d);
    let t = [999.0, 500.0, 250.0, 3.0];
    let labels = [0usize, 3, 5, 9];

    // Primitive ops.
    let a = |d: &Device| input([2, 8, 6, 6], 2, d);
    let b = |d: &Device| input([2, 8, 6, 6], 3, d);
    report("add", a(&gpu) + b(&gpu), a(&cpu) + b(&cpu));
    report("silu", silu(a(&gpu)), silu(a(&cpu)));
    report(
        "cat dim 1",
        Tensor::cat(vec![a(&gpu), b(&gpu)], 1),
        Tensor::cat(vec![a(&cpu), b(&cpu)], 1),
    );
    let mm = |d: &Device| {
        let q: Tensor<4> = a(d).reshape([2, 2, 4, 36]).swap_dims(2, 3);
        q.matmul(b(d).reshape([2, 2, 4, 36]))
    };
    report("matmul (swapped dims)", mm(&gpu), mm(&cpu));
    report("softmax", softmax(mm(&gpu), 3), softmax(mm(&cpu), 3));
    report("mean dim", a(&gpu).mean_dim(3), a(&cpu).mean_dim(3));
    let ids =
        |d: &Device| Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 3, 5, 9], [4, 1]), d);
    if let (Some(eg), Some(ec)) = (&mg.class_embed, &mc.class_embed) {
        report(
            "class embedding",
            eg.forward(ids(&gpu)),
            ec.forward(ids(&cpu)),
        );
    }

    // Blocks of the embedded model.
    report(
        "time embedding",
        mg.time.forward(&t, &gpu),
        mc.time.forward(&t, &cpu),
    );
    let ta = |m: &diffuse::unet::UNet, d: &Device| silu(m.time.forward(&t, d));
    report(
        "stem conv",
        diffuse::kernels::conv2d(&mg.stem, x(&gpu)),
        diffuse::kernels::conv2d(&mc.stem, x(&cpu)),
    );
    let h = |m: &diffuse::unet::UNet, d: &Device| diffuse::kernels::conv2d(&m.stem, x(d));
    report(
        "first res block",
        mg.down[0].blocks[0].forward(h(mg, &gpu), ta(mg, &gpu)),
        mc.down[0].blocks[0].forward(h(mc, &cpu), ta(mc, &cpu)),
    );
    report(
        "group norm + silu",
        diffuse::kernels::group_norm(&mg.down[0].blocks[0].norm1, h(mg, &gpu), true),
        diffuse::kernels::group_norm(&mc.down[0].blocks[0].norm1, h(mc, &cpu), true),
    );
    if let (Some(dg), Some(dc)) = (&mg.down[0].downsample, &mc.down[0].downsample) {
        report(
            "downsample",
            dg.forward(h(mg, &gpu)),
            dc.forward(h(mc, &cpu)),
        );
    }
    if let (Some(ag), Some(ac)) = (&mg.mid_attn, &mc.mid_attn) {
        let c = mg.mid1.conv1.weight.dims()[1];
        report(
            "attention",
            ag.forward(input([4, c, 7, 7], 4, &gpu)),
            ac.forward(input([4, c, 7, 7], 4, &cpu)),
        );
    }
    for (i, (lg, lc)) in mg.up.iter().zip(&mc.up).enumerate() {
        if let (Some(ug), Some(uc)) = (&lg.upsample, &lc.upsample) {
            let c = lg.blocks.last().unwrap().conv2.weight.dims()[0];
            report(
                &format!("upsample level {i}"),
                ug.forward(input([2, c, 7, 7], 5, &gpu), [14, 14]),
                uc.forward(input([2, c, 7, 7], 5, &cpu), [14, 14]),
            );
        }
    }
    report(
        "whole U-Net, no class",
        mg.forward(x(&gpu), &t, None),
        mc.forward(x(&cpu), &t, None),
    );
    report(
        "whole U-Net, classes",
        mg.forward(x(&gpu), &t, Some(&labels)),
        mc.forward(x(&cpu), &t, Some(&labels)),
    );

    // The pieces of one sampling step at batch 10, all items at one timestep.
    let x10 = |d: &Device| input([10, 1, 28, 28], 8, d);
    // Batch sizes: where does the U-Net start to depart, if it does?
    for b in [1usize, 2, 3, 5, 8, 10, 16, 20] {
        let xb = |d: &Device| input([b, 1, 28, 28], 11, d);
        let ts = vec![500.0; b];
        let cs: Vec<usize> = (0..b).map(|i| i % 10).collect();
        report(
            &format!("U-Net, batch {b}"),
            mg.forward(xb(&gpu), &ts, Some(&cs)),
            mc.forward(xb(&cpu), &ts, Some(&cs)),
        );
    }
    // The same call twice on the GPU: buffer reuse must not change the answer.
    let again = |d: &Device| mg.forward(x10(d), &[250.0; 10], Some(&(0..10).collect::<Vec<_>>()));
    let first = again(&gpu);
    let _ = again(&gpu);
    report("U-Net batch 10, repeated", again(&gpu), first);
    let classes: Vec<usize> = (0..10).collect();
    report(
        "U-Net, batch 10, t = 999",
        mg.forward(x10(&gpu), &[999.0; 10], Some(&classes)),
        mc.forward(x10(&cpu), &[999.0; 10], Some(&classes)),
    );
    let pred = loaded_c.config.prediction;
    let sched_g = &loaded_c.scheduler.schedule;
    let split = |d: &Device| {
        let (x0, eps) =
            sched_g.split_prediction(pred, x10(d), input([10, 1, 28, 28], 9, d), &[999; 10]);
        Tensor::cat(vec![x0, eps], 1)
    };
    report("split_prediction, batch 10", split(&gpu), split(&cpu));
    for kind in diffuse::sampler::SamplerKind::ALL {
        let one = |d: &Device| {
            let m = &loaded_c;
            let mut s = five_steps(m, kind);
            let mut rng = diffuse::rng::rng_for(0, diffuse::rng::Stream::Sample, 0);
            s.step(0, x10(d), input([10, 1, 28, 28], 9, d), &mut rng)
        };
        report(
            &format!("{kind:?} one step, batch 10"),
            one(&gpu),
            one(&cpu),
        );
    }

    // DDIM, 5 steps, batch 4, written out by hand, with each kind of barrier between steps:
    // which one (if any) makes the GPU agree with Flex?
    for mode in ["none", "sync", "readback", "host round trip"] {
        let run = |m: &model::LoadedModel, d: &Device| {
            let mut s = five_steps(m, SamplerKind::Ddim);
            let mut x = input([4, 1, 28, 28], 7, d) * (s.init_noise_sigma() as f32);
            let labels = [0usize, 3, 5, 9];
            let mut rng = diffuse::rng::rng_for(0, diffuse::rng::Stream::Sample, 0);
            for (i, &t) in s.timesteps().to_vec().iter().enumerate() {
                let inp = s.scale_model_input(i, x.clone());
                let out = m.unet.forward(inp, &[t; 4], Some(&labels));
                x = s.step(i, x, out, &mut rng);
                match mode {
                    "sync" => d.sync().expect("sync"),
                    "readback" => drop(x.to_data()),
                    "host round trip" => x = Tensor::from_data(x.into_data(), d),
                    _ => {}
                }
            }
            x
        };
        report(
            &format!("Ddim 5 steps by hand, {mode}"),
            run(&loaded_g, &gpu),
            run(&loaded_c, &cpu),
        );
    }
    // Clone probe: an op given `x.clone()` must leave `x` as it was. A backend that reuses the
    // buffer in place despite the clone corrupts the sampler's state.
    {
        let d = &gpu;
        let xs = |d: &Device| input([4, 1, 28, 28], 12, d);
        type Op<'a> = Box<dyn Fn(Tensor<4>) -> Tensor<4> + 'a>;
        let ops: Vec<(&str, Op)> = vec![
            ("mul scalar", Box::new(|x| x * 2.0)),
            ("div scalar", Box::new(|x| x / 3.0)),
            ("add scalar", Box::new(|x| x + 1.0)),
            ("add tensor", Box::new(|x| x.clone() + xs(d))),
            ("silu", Box::new(silu)),
            ("clamp", Box::new(|x| x.clamp(-0.5, 0.5))),
            (
                "stem conv",
                Box::new(|x| diffuse::kernels::conv2d(&mg.stem, x)),
            ),
            (
                "U-Net",
                Box::new(|x| mg.forward(x, &[500.0; 4], Some(&labels))),
            ),
        ];
        for (name, f) in ops {
            let x = xs(d);
            let y = f(x.clone());
            drop(y.to_data());
            report(&format!("clone probe: {name}"), x, xs(&cpu));
        }
    }
    // The sampling loop with the model's input a deep copy of x, not a clone of it.
    {
        let run = |m: &model::LoadedModel, d: &Device| {
            let mut s = five_steps(m, SamplerKind::Ddim);
            let mut x = input([4, 1, 28, 28], 7, d) * (s.init_noise_sigma() as f32);
            let mut rng = diffuse::rng::rng_for(0, diffuse::rng::Stream::Sample, 0);
            for (i, &t) in s.timesteps().to_vec().iter().enumerate() {
                let copy = Tensor::from_data(x.to_data(), d);
                let inp = s.scale_model_input(i, copy);
                let out = m.unet.forward(inp, &[t; 4], Some(&labels));
                x = s.step(i, x, out, &mut rng);
            }
            x
        };
        report(
            "Ddim 5 steps, input deep copy",
            run(&loaded_g, &gpu),
            run(&loaded_c, &cpu),
        );
    }
    // Lockstep: at every step both devices start from Flex's state, so the first line that
    // departs names the step and the stage (model or update).
    for kind in [SamplerKind::Ddim, SamplerKind::Euler] {
        let mut sg = five_steps(&loaded_c, kind);
        let mut sc = five_steps(&loaded_c, kind);
        let mut xc = input([4, 1, 28, 28], 7, &cpu) * (sc.init_noise_sigma() as f32);
        let labels = [0usize, 3, 5, 9];
        let mut rg = diffuse::rng::rng_for(0, diffuse::rng::Stream::Sample, 0);
        let mut rc = diffuse::rng::rng_for(0, diffuse::rng::Stream::Sample, 0);
        let up = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &gpu);
        for (i, &t) in sc.timesteps().to_vec().iter().enumerate() {
            let ic = sc.scale_model_input(i, xc.clone());
            let ig = sg.scale_model_input(i, up(&xc));
            report(
                &format!("{kind:?} lockstep {i} (t={t}) input"),
                ig.clone(),
                ic.clone(),
            );
            let oc = mc.forward(ic.clone(), &[t; 4], Some(&labels));
            let og = mg.forward(up(&ic), &[t; 4], Some(&labels));
            report(&format!("{kind:?} lockstep {i} model"), og, oc.clone());
            let xg = sg.step(i, up(&xc), up(&oc), &mut rg);
            xc = sc.step(i, xc, oc, &mut rc);
            report(&format!("{kind:?} lockstep {i} update"), xg, xc.clone());
        }
    }
    // A short sampling run per sampler from the same noise, unguided.
    for (kind, nb) in diffuse::sampler::SamplerKind::ALL
        .into_iter()
        .flat_map(|k| [(k, 4usize), (k, 10)])
    {
        let run = |m: &model::LoadedModel, d: &Device| {
            let mut s = five_steps(m, kind);
            let x0 = input([nb, 1, 28, 28], 7, d) * (s.init_noise_sigma() as f32);
            let opts = diffuse::sampler::GenerateOptions {
                n: nb,
                classes: Some((0..nb).map(|i| i % 10).collect()),
                guidance: 1.0,
                seed: 0,
                cancel: None,
                text: None,
                negative: None,
                image_cond: None,
                guidance_interval: None,
            };
            let mut rng = diffuse::rng::rng_for(0, diffuse::rng::Stream::Sample, 0);
            diffuse::sampler::denoise_from(
                &m.unet,
                m.config.unet.num_classes,
                x0,
                s.as_mut(),
                &opts,
                &mut rng,
                &mut |_, _| {},
            )
        };
        report(
            &format!("{kind:?} 5 steps, batch {nb}"),
            run(&loaded_g, &gpu),
            run(&loaded_c, &cpu),
        );
    }
    training_steps(&loaded_c, &gpu, &cpu)?;
    Ok(())
}

/// Training: the embedded model's weights on each device with autodiff, three steps of its
/// objective (forward, loss, backward, the gradient norm, clipped AdamW) on the same
/// host-drawn examples; after each step the loss, the gradient norm and the updated weights
/// of the backend against Flex's.
fn training_steps(loaded: &model::LoadedModel, gpu: &Device, cpu: &Device) -> Result<()> {
    use diffuse::train::adamw::{self, AdamW};
    use diffuse::train::objective::Objective;
    use diffuse::train::{RunConfig, TrainConfig};
    let b = 8;
    let cfg = RunConfig {
        model: loaded.config.clone(),
        train: TrainConfig {
            batch_size: b,
            ..TrainConfig::default()
        },
        data: String::new(),
        distill: None,
    };
    let sched = diffuse::schedule::NoiseSchedule::new(&cfg.model.schedule)?;
    let objective = Objective {
        cfg: &cfg,
        schedule: &sched,
        latents: None,
        captions: None,
    };
    let images = host(input([b, 1, 28, 28], 11, cpu));
    let batch = || diffuse::data::HostBatch {
        step: 0,
        indices: (0..b).collect(),
        images: images.clone(),
        labels: Some((0..b).map(|i| i % 10).collect()),
        shape: [b, 1, 28, 28],
    };
    let mut w = diffuse::weights::NamedTensors::new();
    diffuse::weights::collect(&loaded.unet, "", &mut w);
    // A fresh model's output convolution starts at zero, so its first loss is the loss of a
    // zero output, whatever the rest of the network computes.
    for d in [gpu, cpu] {
        let dev = d.clone().autodiff();
        dev.seed(0);
        let fresh = diffuse::unet::UNet::new(&cfg.model.unet, &dev)?;
        let ex = objective.example(batch(), 0, &dev);
        let pred = fresh.forward(ex.x_t.clone(), &ex.t_model, ex.labels.as_deref());
        let zero = objective.loss(Tensor::zeros(pred.dims(), &dev), &ex, &dev);
        let out_max = host(pred.clone()).iter().fold(0f32, |m, v| m.max(v.abs()));
        let loss = objective.loss(pred, &ex, &dev).into_scalar::<f32>();
        println!(
            "fresh model on {:<12} first loss {loss:.6}, loss of a zero output {:.6}, largest |output| {out_max:.2e}",
            if d == cpu { "flex" } else { "the backend" },
            zero.into_scalar::<f32>()
        );
    }
    let steps = 3;
    let mut per_device = Vec::new();
    for d in [gpu, cpu] {
        let dev = d.clone().autodiff();
        let mut model =
            diffuse::weights::apply(diffuse::unet::UNet::new(&cfg.model.unet, &dev)?, &w, "")?;
        let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
        let mut out = Vec::new();
        for step in 0..steps {
            let ex = objective.example(batch(), step, &dev);
            let pred = model.forward(ex.x_t.clone(), &ex.t_model, ex.labels.as_deref());
            let loss = objective.loss(pred, &ex, &dev);
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            let gn = adamw::grad_norm(&model, &grads);
            model = opt.step(model, &grads, 1e-4, adamw::clip_scale(gn, 1.0));
            let mut after = diffuse::weights::NamedTensors::new();
            diffuse::weights::collect(&model, "", &mut after);
            out.push((loss.into_scalar::<f32>(), gn, after));
        }
        per_device.push(out);
    }
    let (g, c) = (&per_device[0], &per_device[1]);
    for step in 0..steps {
        let (lg, ng, wg) = &g[step];
        let (lc, nc, wc) = &c[step];
        let (mut diff, mut scale) = (0f32, 1e-12f32);
        for (k, t) in wc {
            for (x, y) in wg[k].data.iter().zip(&t.data) {
                diff = diff.max((x - y).abs());
                scale = scale.max(y.abs());
            }
        }
        println!(
            "{:<28} loss {lg:.6} against {lc:.6}, grad norm {ng:.5} against {nc:.5}, weights max |diff| / max |ref| = {:.2e}",
            format!("training step {}", step + 1),
            diff / scale
        );
    }
    Ok(())
}
