//! `diffuse distill` (`train::distill`): consistency distillation of a flow teacher into a
//! few-step student, its run folder, resume, sampling defaults and refusals.

use super::cli::{fails, ok, tiny_train_args};
use super::data::fixture;
use diffuse::device::inference_device;
use diffuse::pipeline::{Conditioning, Pipeline, Request, Seeds, load_model};
use diffuse::sampler::SamplerKind;
use diffuse::train::distill::{DistillConfig, TeacherSolver, huber_c, segment_floor};
use std::path::Path;

fn losses(run: &Path) -> Vec<f64> {
    diffuse::train::read_metrics(&run.join("metrics.jsonl"), usize::MAX)
        .iter()
        .map(|m| m.loss)
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// A tiny class-conditioned flow teacher on the digits, trained for `steps`.
fn teacher(dir: &Path, steps: &str) -> String {
    let data = fixture("digits.csv.gz");
    let run = dir.join("teacher");
    let mut args = tiny_train_args(data.to_str().unwrap(), run.to_str().unwrap(), steps);
    args.extend(["--objective", "flow", "--label-dropout", "0.2"]);
    ok(&args);
    run.to_str().unwrap().to_string()
}

fn distill_args<'a>(teacher: &'a str, out: &'a str, train_steps: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "--teacher",
        teacher,
        "--data",
        "DATA",
        "--out",
        out,
        "--steps",
        "2",
        "--grid",
        "8",
        "--train-steps",
        train_steps,
        "--batch",
        "8",
        "--lr",
        "5e-4",
        "--guidance",
        "1",
        "--checkpoint-every",
        "10",
        "--sample-every",
        "50",
    ]
}

/// Images of `model` at `steps` Euler steps, 8 of them, classes 0..8, seed 5, as f32 values.
fn images(model: &str, steps: usize) -> Vec<f32> {
    let dev = inference_device();
    let pipe = Pipeline::new(load_model(Some(model), &dev).unwrap(), None, dev);
    let mut req = Request::new(8, SamplerKind::Euler);
    req.steps = Some(steps);
    req.guidance = 1.0;
    req.conditioning = Conditioning::Classes((0..8).collect());
    req.seeds = Seeds::One(5);
    let x = pipe.run(&req, &mut |_| {}).unwrap().images;
    x.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// What the test student samples with by default.
const EULER_2_UNGUIDED: &[&str] = &["--sampler", "euler", "--steps", "2", "--guidance", "1"];

/// What the shipped student samples with by default.
const EULER_4_UNGUIDED: &[&str] = &["--sampler", "euler", "--steps", "4", "--guidance", "1"];

/// `diffuse sample --model M COMMON` writes the bits of `... COMMON EXPLICIT` (into `a`, `b`).
fn defaults_are(model: &str, common: &[&str], explicit: &[&str], a: &Path, b: &Path) {
    let run = |extra: &[&str], out: &Path| {
        let mut v = vec!["sample", "--model", model];
        v.extend(common);
        v.extend(extra);
        v.extend(["--out", out.to_str().unwrap()]);
        let said = ok(&v);
        assert!(said.contains("wrote"), "{said}");
        std::fs::read(out).unwrap()
    };
    assert!(
        run(&[], a) == run(explicit, b),
        "{model} samples by default as with {explicit:?}"
    );
}

/// The whole command: the loss falls, the student's two-step samples are closer to the
/// teacher's 32-step ones than the teacher's own two-step samples, the student samples in its
/// steps by default and refuses more than its grid, a resumed run ends with the bits of an
/// uninterrupted one, and `--minutes` stops early with a checkpoint that resumes.
#[test]
fn distilled_students_sample_in_few_steps_close_to_their_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let t = teacher(tmp.path(), "120");
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let with_data = |mut v: Vec<&str>| -> Vec<String> {
        v.iter_mut()
            .map(|s| if *s == "DATA" { data } else { *s }.to_string())
            .collect()
    };
    let run = tmp.path().join("student");
    let run_s = run.to_str().unwrap();
    // The plain consistency model (one segment, Euler teacher steps) here; the defaults
    // (as many segments as --steps, Heun teacher steps) below and in the resume test.
    let mut args = with_data(distill_args(&t, run_s, "150"));
    args.extend(["--segments", "1", "--teacher-solver", "euler"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let said = ok(&args);
    assert!(said.contains("trained to step 150"), "{said}");
    let l = losses(&run);
    assert_eq!(l.len(), 150);
    assert!(
        mean(&l[120..]) < 0.8 * mean(&l[..10]),
        "the distillation loss falls: {l:?}"
    );
    let cfg = super::cli::run_config(&run);
    assert_eq!(cfg["model"]["sampling"]["steps"], 2);
    assert_eq!(cfg["model"]["sampling"]["max_steps"], 8);
    assert_eq!(cfg["distill"]["grid"], 8);
    assert!(run.join("samples/step-000150.png").exists());

    // Closer to the teacher's ODE solution (its 32-step images) in 1 and 2 steps than the
    // teacher is in as many (unguided: the student was distilled with --guidance 1).
    let student = run.join("model.safetensors");
    let s = student.to_str().unwrap();
    let reference = images(&t, 32);
    for (k, factor) in [(1, 0.5), (2, 1.0)] {
        let dt = rms(&images(&t, k), &reference);
        let ds = rms(&images(s, k), &reference);
        assert!(
            ds < factor * dt,
            "{k} steps: the student is {ds:.4} from the teacher's 32-step images, the teacher {dt:.4}"
        );
    }

    // Two segments with Heun's teacher steps (the defaults at --steps 2): recorded, and in
    // its two steps closer to the teacher's ODE solution than the teacher in as many.
    let run2 = tmp.path().join("student2");
    let args = with_data(distill_args(&t, run2.to_str().unwrap(), "150"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args);
    let l = losses(&run2);
    assert!(
        mean(&l[120..]) < 0.8 * mean(&l[..10]),
        "the two-segment distillation loss falls: {l:?}"
    );
    let cfg = super::cli::run_config(&run2);
    assert_eq!(cfg["distill"]["segments"], 2);
    assert_eq!(cfg["distill"]["solver"], "heun");
    let s2 = run2.join("model.safetensors");
    let dt = rms(&images(&t, 2), &reference);
    let ds = rms(&images(s2.to_str().unwrap(), 2), &reference);
    assert!(
        ds < dt,
        "2 steps: the two-segment student is {ds:.4} from the teacher's 32-step images, the teacher {dt:.4}"
    );

    // Its own sampler and steps by default: the bits of --sampler euler --steps 2 --guidance 1.
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    defaults_are(s, &["--n", "4"], EULER_2_UNGUIDED, &a, &b);
    fails(
        &[
            "sample",
            "--model",
            s,
            "--steps",
            "9",
            "--out",
            b.to_str().unwrap(),
        ],
        "at most 8 steps",
    );

    // Consistency multistep sampling (--eta 1: fresh noise after each step but the last) is
    // deterministic per seed, differs from the ODE, and is the ODE at one step.
    let sample_of = |model: &str, extra: &[&str], out: &Path| -> Vec<u8> {
        let mut v = vec![
            "sample",
            "--model",
            model,
            "--n",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        v.extend(extra);
        ok(&v);
        std::fs::read(out).unwrap()
    };
    let sample = |extra: &[&str], out: &Path| sample_of(s, extra, out);
    let c = tmp.path().join("c.png");
    let eta = sample(&["--eta", "1"], &c);
    assert!(
        eta == sample(&["--eta", "1"], &c),
        "--eta 1 is deterministic"
    );
    assert!(eta != std::fs::read(&a).unwrap(), "--eta 1 is not the ODE");
    assert!(
        sample(&["--eta", "1", "--steps", "1"], &c) == sample(&["--steps", "1"], &c),
        "one step adds no noise"
    );
    fails(
        &[
            "sample",
            "--model",
            s,
            "--eta",
            "1.5",
            "--out",
            c.to_str().unwrap(),
        ],
        "--eta must be between 0 and 1",
    );

    // convert --default-steps rewrites the student's default steps, within its grid only.
    let one = tmp.path().join("one.safetensors");
    let said = ok(&[
        "convert",
        "--model",
        s,
        "--out",
        one.to_str().unwrap(),
        "--default-steps",
        "1",
        "--dtype",
        "f32",
    ]);
    assert!(said.contains("wrote"), "{said}");
    let m = load_model(one.to_str(), &inference_device()).unwrap();
    assert_eq!(
        m.config.sampling.as_ref().map(|c| (c.steps, c.max_steps)),
        Some((1, 8))
    );
    assert!(
        sample_of(one.to_str().unwrap(), &[], &c) == sample(&["--steps", "1"], &c),
        "the converted file samples in its new default steps"
    );
    let bad = tmp.path().join("bad.safetensors");
    let b_s = bad.to_str().unwrap();
    for (model, k, needle) in [
        (s, "9", "--default-steps must be between 1 and 8"),
        (s, "3", "--default-steps 3 must divide 8"),
        (t.as_str(), "2", "--default-steps is for distilled students"),
    ] {
        fails(
            &[
                "convert",
                "--model",
                model,
                "--out",
                b_s,
                "--default-steps",
                k,
            ],
            needle,
        );
    }
    assert!(!bad.exists(), "a refused convert writes nothing");

    // The HTTP API runs the student's own sampler, steps and guidance, and caps steps at
    // its grid; edit and eval take it as any model.
    let cfg = load_model(Some(s), &inference_device()).unwrap().config;
    let limits = diffuse::serve::api::Limits {
        max_n: 16,
        max_steps: 1000,
        max_body_bytes: 1 << 16,
        timeout_s: 60,
    };
    let req = diffuse::serve::api::GenerateRequest::default();
    let spec = diffuse::serve::api::validate(&req, &cfg, 1000, &limits, 0).unwrap();
    assert_eq!(
        (spec.sampler, spec.steps, spec.guidance),
        (SamplerKind::Euler, 2, 1.0)
    );
    let req = diffuse::serve::api::GenerateRequest {
        steps: Some(9),
        ..Default::default()
    };
    let err = diffuse::serve::api::validate(&req, &cfg, 1000, &limits, 0).unwrap_err();
    assert!(err.contains("between 1 and 8"), "{err}");
    let img = tmp.path().join("in.png");
    image::GrayImage::from_pixel(8, 8, image::Luma([200]))
        .save(&img)
        .unwrap();
    ok(&[
        "edit",
        "--model",
        s,
        "--image",
        img.to_str().unwrap(),
        "--strength",
        "0.5",
        "--out",
        b.to_str().unwrap(),
    ]);

    // Resume: 100 then 150 gives the uninterrupted run's files.
    let split = tmp.path().join("split");
    let split_s = split.to_str().unwrap();
    let first = with_data(distill_args(&t, split_s, "100"));
    ok(&first.iter().map(String::as_str).collect::<Vec<_>>());
    let said = ok(&[
        "distill",
        "--resume",
        "--data",
        data,
        "--out",
        split_s,
        "--train-steps",
        "150",
    ]);
    assert!(said.contains("trained to step 150"), "{said}");
    assert_eq!(
        std::fs::read(split.join("model.safetensors")).unwrap(),
        std::fs::read(&s2).unwrap(),
        "a resumed distillation ends with the bits of an uninterrupted one"
    );

    // --minutes: stops after the first step past it, with a checkpoint that resumes.
    let timed = tmp.path().join("timed");
    let timed_s = timed.to_str().unwrap();
    let mut short = with_data(distill_args(&t, timed_s, "80"));
    short.extend(["--minutes".to_string(), "0.00001".to_string()]);
    let said = ok(&short.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(said.contains("stopped at step 1 of 80"), "{said}");
    assert!(timed.join("checkpoint.safetensors").exists());
    ok(&[
        "distill",
        "--resume",
        "--data",
        data,
        "--out",
        timed_s,
        "--train-steps",
        "3",
    ]);
    assert_eq!(losses(&timed).len(), 3);

    // The wrong continuation of each kind of run.
    fails(
        &[
            "train", "--resume", "--data", data, "--out", split_s, "--steps", "160",
        ],
        "is a distillation run",
    );
    fails(
        &[
            "distill",
            "--resume",
            "--data",
            data,
            "--out",
            &t,
            "--train-steps",
            "200",
        ],
        "is a training run, not a distillation",
    );
}

/// Teachers and options that cannot be distilled get one clear line, and nothing is written.
#[test]
fn distill_refuses_what_it_cannot_distil() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a model").unwrap();
    let run = |teacher: &str, needle: &str| {
        fails(
            &[
                "distill",
                "--teacher",
                teacher,
                "--steps",
                "2",
                "--data",
                data,
                "--out",
                o,
            ],
            needle,
        );
    };
    let j = junk.to_str().unwrap().to_string();
    fails(
        &["distill", "--teacher", &j, "--data", data, "--out", o],
        "junk.safetensors",
    );
    run("fashion-mnist", "distill takes flow-matching teachers");
    run("emoji", "distill takes flow-matching teachers");
    fails(
        &["distill", "--data", data, "--out", o],
        "--teacher is needed",
    );
    let t = teacher(tmp.path(), "4");
    let bad: [(&[&str], &str); 7] = [
        (
            &["--steps", "2", "--grid", "8", "--segments", "3"],
            "--segments must divide --grid 8 (got 3)",
        ),
        (
            &["--steps", "3", "--grid", "8"],
            "must be a multiple of --steps 3",
        ),
        (
            &["--steps", "9", "--grid", "8"],
            "--steps must be between 1 and --grid 8",
        ),
        (&["--grid", "0"], "--grid must be between 1 and 1000"),
        (
            &["--grid", "1002", "--steps", "2"],
            "--grid must be between 1 and 1000",
        ),
        (
            &["--guidance", "1e9"],
            "guidance weight must be between 0 and 100",
        ),
        (&["--minutes", "-1"], "--minutes must be a positive number"),
    ];
    for (options, needle) in bad {
        let mut v = vec![
            "distill",
            "--teacher",
            t.as_str(),
            "--data",
            data,
            "--out",
            o,
        ];
        v.extend(options);
        fails(&v, needle);
    }
    assert!(
        !out.join("checkpoint.safetensors").exists(),
        "a refused run writes no checkpoint"
    );
    fails(
        &["distill", "--resume", "--data", data, "--out", o],
        "has no checkpoint.safetensors",
    );
    // An unconditioned teacher distils without guidance by default, and refuses guidance.
    let plain = tmp.path().join("plain");
    let args = tiny_train_args(data, plain.to_str().unwrap(), "2");
    let mut args: Vec<&str> = args
        .into_iter()
        .map(|a| if a == "class" { "none" } else { a })
        .collect();
    args.extend(["--objective", "flow"]);
    ok(&args);
    let p = plain.to_str().unwrap();
    let student = tmp.path().join("plain-student");
    let st = student.to_str().unwrap();
    let mut v = vec!["distill", "--teacher", p, "--data", data, "--out", st];
    v.extend([
        "--steps",
        "1",
        "--grid",
        "2",
        "--train-steps",
        "2",
        "--batch",
        "4",
    ]);
    ok(&v);
    fails(
        &[
            "distill",
            "--teacher",
            p,
            "--data",
            data,
            "--out",
            o,
            "--guidance",
            "2",
        ],
        "--guidance needs a class-conditioned teacher",
    );

    // iCT's pseudo-Huber constant, 0.00054 sqrt(d), for a 28x28 grey image.
    assert!((huber_c(784) - 0.01512).abs() < 1e-9);
}

/// The shipped student: loads by name with the embedded model's classes, samples in its 4
/// steps by default (the bits of `--sampler euler --steps 4 --guidance 1`), refuses more than
/// its grid, and its sneakers are sneakers to the embedded classifier.
#[test]
fn the_shipped_fast_model_samples_sneakers_in_four_steps() {
    let dev = inference_device();
    let fast = load_model(Some("fashion-mnist-fast"), &dev).unwrap();
    let embedded = load_model(None, &dev).unwrap();
    assert_eq!(fast.config.class_names, embedded.config.class_names);
    let sampling = fast.config.sampling.clone().unwrap();
    assert_eq!((sampling.sampler, sampling.steps), (SamplerKind::Euler, 4));
    assert!(sampling.max_steps >= 4);

    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    defaults_are(
        "fashion-mnist-fast",
        &["--class", "sneaker", "--n", "8"],
        EULER_4_UNGUIDED,
        &a,
        &b,
    );
    fails(
        &[
            "sample",
            "--model",
            "fashion-mnist-fast",
            "--steps",
            "100",
            "--out",
            b.to_str().unwrap(),
        ],
        "at most",
    );

    let sneaker = fast
        .config
        .class_names
        .iter()
        .position(|c| c.eq_ignore_ascii_case("sneaker"))
        .unwrap();
    let pipe = Pipeline::new(fast, None, dev.clone());
    let mut req = Request::new(16, SamplerKind::Euler);
    req.steps = Some(4);
    req.guidance = 1.0;
    req.conditioning = Conditioning::Classes(vec![sneaker; 16]);
    req.seeds = Seeds::One(0);
    let predicted = super::families::embedded_classes(pipe.run(&req, &mut |_| {}).unwrap().images);
    let hits = predicted.iter().filter(|&&p| p == sneaker).count();
    assert!(
        hits >= 12,
        "{hits} of 16 four-step sneakers are sneakers: {predicted:?}"
    );
}

/// The segment floor: one segment ends at 0, `n` segments at the grid point below, the top of
/// each piece maps to its own bottom and the next grid point up to that top.
#[test]
fn segment_floors_cut_time_into_equal_pieces() {
    let n = 16;
    for k in 1..=n {
        assert_eq!(segment_floor(k, n, 1), 0, "one segment: k = {k}");
        assert_eq!(segment_floor(k, n, n), k - 1, "n segments: k = {k}");
    }
    for j in 0..4 {
        let (bottom, top) = (4 * j, 4 * j + 4);
        assert_eq!(segment_floor(top, n, 4), bottom, "the top of piece {j}");
        assert_eq!(
            segment_floor(bottom + 1, n, 4),
            bottom,
            "the lowest step of piece {j}"
        );
        if top < n {
            assert_eq!(
                segment_floor(top + 1, n, 4),
                top,
                "the step above piece {j}"
            );
        }
    }
    // Runs made before segments and solvers existed read as what they learned.
    let old: DistillConfig =
        serde_json::from_str(r#"{"teacher":"t","grid":16,"guidance":1.0}"#).unwrap();
    assert_eq!((old.segments, old.solver), (1, TeacherSolver::Euler));
    let bad = DistillConfig { segments: 3, ..old };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("--segments must divide --grid 16"), "{e}");
}
