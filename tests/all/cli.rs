//! The `diffuse` binary end to end on committed fixtures, and its answers to bad input.

use super::data::fixture;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

pub fn diffuse(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run diffuse")
}

/// The `config.json` of a run folder, as JSON.
pub fn run_config(run: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
}

pub fn ok(args: &[&str]) -> String {
    ok_with_env(&[], args)
}

/// [`ok`] with extra environment variables for the process.
pub fn ok_with_env(env: &[(&str, &str)], args: &[&str]) -> String {
    let o = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run diffuse");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "diffuse {args:?} failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must fail with one `error:` line naming `needle`, and no panic.
pub fn fails(args: &[&str], needle: &str) {
    let o = diffuse(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "diffuse {args:?} should fail: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "diffuse {args:?} panicked: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line expected from {args:?}: {err}"
    );
    assert!(
        lines[0].contains(needle),
        "error for {args:?} should mention '{needle}': {err}"
    );
}

fn png_size(p: &Path) -> (u32, u32) {
    image::image_dimensions(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn metric_steps(run: &Path) -> Vec<usize> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["step"].as_u64().unwrap() as usize)
        .collect()
}

pub fn tiny_train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--cond",
        "class",
        "--steps",
        steps,
        "--batch",
        "8",
        "--base-channels",
        "16",
        "--res-blocks",
        "1",
        "--checkpoint-every",
        "4",
        "--sample-every",
        "12",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
    ]
}

#[test]
fn train_then_sample_on_the_digits_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (data, runs) = (fixture("digits.csv.gz"), run.to_str().unwrap().to_string());
    // A diffusion model: every DDPM-style sampler runs on it below.
    let mut args = tiny_train_args(data.to_str().unwrap(), &runs, "24");
    args.extend(["--objective", "epsilon"]);
    ok(&args);
    for f in [
        "config.json",
        "checkpoint.safetensors",
        "model.safetensors",
        "loss.png",
        "samples/step-000012.png",
        "samples/step-000024.png",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert_eq!(metric_steps(&run), (1..=24).collect::<Vec<_>>());
    assert_eq!(png_size(&run.join("loss.png")), (720, 400));

    let out_dir = tmp.path().join("imgs");
    let grid = tmp.path().join("grid.png");
    let traj = tmp.path().join("traj.png");
    ok(&[
        "sample",
        "--model",
        &runs,
        "--n",
        "6",
        "--steps",
        "10",
        "--class",
        "3",
        "--out",
        grid.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--trajectory",
        traj.to_str().unwrap(),
    ]);
    let files: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
    assert_eq!(files.len(), 6);
    assert_eq!(png_size(&out_dir.join("00000.png")), (8, 8));
    // 4 columns x 2 rows of 8x8 images, 2-pixel borders, shown 8x larger.
    assert_eq!(png_size(&grid), ((4 * 10 + 2) * 8, (2 * 10 + 2) * 8));
    assert!(traj.is_file());

    // Same seed, same bits; another seed, other images.
    let again = tmp.path().join("again");
    ok(&[
        "sample",
        "--model",
        &runs,
        "--n",
        "6",
        "--steps",
        "10",
        "--class",
        "3",
        "--out-dir",
        again.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(out_dir.join("00004.png")).unwrap(),
        std::fs::read(again.join("00004.png")).unwrap()
    );
    let other = tmp.path().join("other");
    ok(&[
        "sample",
        "--model",
        &runs,
        "--n",
        "6",
        "--steps",
        "10",
        "--class",
        "3",
        "--seed",
        "9",
        "--out-dir",
        other.to_str().unwrap(),
    ]);
    assert_ne!(
        std::fs::read(out_dir.join("00004.png")).unwrap(),
        std::fs::read(other.join("00004.png")).unwrap()
    );

    // Bad sampling options.
    fails(
        &["sample", "--model", &runs, "--class", "12"],
        "out of range",
    );
    fails(
        &["sample", "--model", &runs, "--class", "sneaker"],
        "not a class",
    );
    fails(&["sample", "--model", &runs, "--steps", "1001"], "--steps");
    fails(&["sample", "--model", &runs, "--n", "0"], "--n");
    fails(
        &["sample", "--model", &runs, "--sampler", "plms"],
        "--sampler",
    );
    fails(
        &[
            "sample",
            "--model",
            &runs,
            "--sampler",
            "ddim",
            "--eta",
            "2",
        ],
        "--eta",
    );
    // --eta is DDIM's: the other diffusion samplers refuse it rather than ignore it.
    fails(
        &[
            "sample",
            "--model",
            &runs,
            "--sampler",
            "dpmpp-2m",
            "--eta",
            "0.5",
        ],
        "--eta (fresh noise in each step) is an option of the ddim sampler",
    );
    for sampler in ["euler", "euler-a"] {
        let p = tmp.path().join(format!("{sampler}.png"));
        ok(&[
            "sample",
            "--model",
            &runs,
            "--n",
            "2",
            "--sampler",
            sampler,
            "--steps",
            "6",
            "--out",
            p.to_str().unwrap(),
        ]);
        assert!(p.is_file());
    }
    // DDIM at eta 0 is deterministic, whatever the seed.
    let d1 = tmp.path().join("d1.png");
    let d2 = tmp.path().join("d2.png");
    for (p, seed) in [(&d1, "1"), (&d2, "1")] {
        ok(&[
            "sample",
            "--model",
            &runs,
            "--n",
            "4",
            "--class",
            "2",
            "--sampler",
            "ddim",
            "--steps",
            "8",
            "--seed",
            seed,
            "--out",
            p.to_str().unwrap(),
        ]);
    }
    assert_eq!(std::fs::read(&d1).unwrap(), std::fs::read(&d2).unwrap());
    // A second training run into the same folder must not touch the checkpoint.
    let before = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    fails(
        &tiny_train_args(data.to_str().unwrap(), &runs, "8"),
        "--resume",
    );
    assert_eq!(
        before,
        std::fs::read(run.join("checkpoint.safetensors")).unwrap()
    );
}

#[test]
fn trains_resumes_and_samples_on_an_image_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let runs = run.to_str().unwrap();
    let folder = fixture("folder");
    let base = [
        "train",
        "--data",
        folder.to_str().unwrap(),
        "--out",
        runs,
        "--cond",
        "class",
        "--image-size",
        "12",
        "--base-channels",
        "16",
        "--res-blocks",
        "1",
        "--batch",
        "4",
        "--checkpoint-every",
        "3",
    ];
    let mut first = base.to_vec();
    first.extend(["--steps", "3"]);
    let err = String::from_utf8_lossy(&diffuse(&first).stderr).into_owned();
    assert!(err.contains("skipped 2 unreadable image file(s)"), "{err}");
    let mut more = base.to_vec();
    more.extend(["--steps", "5", "--resume"]);
    ok(&more);
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4, 5]);
    let cfg = run_config(&run);
    assert_eq!(
        cfg["model"]["class_names"],
        serde_json::json!(["circle", "square"])
    );
    assert_eq!(cfg["model"]["unet"]["in_channels"], 3);
    let out_dir = tmp.path().join("imgs");
    ok(&[
        "sample",
        "--model",
        runs,
        "--class",
        "square",
        "--n",
        "2",
        "--steps",
        "4",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    let img = image::open(out_dir.join("00001.png")).unwrap();
    assert_eq!(
        (img.width(), img.height(), img.color().channel_count()),
        (12, 12, 3)
    );
}

#[test]
fn killed_run_resumes_to_the_same_result_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    // With a cosine decay, which the resumed run must take from the saved config.
    let cosine = |out| {
        let mut a = tiny_train_args(data, out, "16");
        a.extend(["--lr-schedule", "cosine"]);
        a
    };
    let whole = tmp.path().join("whole");
    ok(&cosine(whole.to_str().unwrap()));

    let cut = tmp.path().join("cut");
    let cuts = cut.to_str().unwrap();
    let mut child = Command::new(BIN)
        .args(cosine(cuts))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while metric_steps(&cut).len() < 6 && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = metric_steps(&cut).len();
    assert!(at_kill < 16, "the run finished before it could be killed");
    assert!(cut.join("checkpoint.safetensors").is_file());

    let mut args = tiny_train_args(data, cuts, "16");
    args.push("--resume");
    ok(&args);
    assert_eq!(
        metric_steps(&cut),
        (1..=16).collect::<Vec<_>>(),
        "metrics must be continuous"
    );
    // Resume rewrites the kept lines: their figures must come back to the last digit (serde_json
    // parses floats exactly only with its float_roundtrip feature).
    let figures = |run: &Path| -> Vec<String> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| l.split("\"elapsed\"").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(figures(&whole), figures(&cut));
    // The logged rates: the 2-step warm-up, then the half cosine over the other 14 steps.
    let rates: Vec<f64> = diffuse::train::read_metrics(&cut.join("metrics.jsonl"), usize::MAX)
        .iter()
        .map(|m| m.lr)
        .collect();
    assert_eq!(rates.len(), 16);
    for (s, &r) in rates.iter().enumerate() {
        let want = match s {
            0 => 5e-4,
            1 => 1e-3,
            _ => 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * (s - 2) as f64 / 14.0).cos()),
        };
        assert!(
            (r - want).abs() < 1e-12,
            "step {s}: rate {r}, expected {want}"
        );
    }
    // Every random draw derives from (seed, step): the resumed run ends bit-identical.
    let a = diffuse::weights::read_safetensors(&whole.join("model.safetensors"))
        .unwrap()
        .0;
    let b = diffuse::weights::read_safetensors(&cut.join("model.safetensors"))
        .unwrap()
        .0;
    assert_eq!(a, b);
}

#[test]
fn bad_input_gives_one_clear_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let out = t("run");
    fails(
        &["train", "--data", "/no/such/folder", "--out", &out],
        "/no/such/folder",
    );
    std::fs::create_dir(t("empty")).unwrap();
    fails(
        &["train", "--data", &t("empty"), "--out", &out],
        "no image files",
    );
    let folder = fixture("folder");
    let folder = folder.to_str().unwrap();
    fails(
        &[
            "train",
            "--data",
            folder,
            "--out",
            &out,
            "--image-size",
            "0",
        ],
        "image-size",
    );
    fails(
        &["train", "--data", folder, "--out", &out, "--channels", "2"],
        "channels",
    );
    fails(
        &["train", "--data", folder, "--out", &out, "--batch", "0"],
        "--batch",
    );
    fails(
        &["train", "--data", folder, "--out", &out, "--cond", "words"],
        "--cond",
    );
    fails(
        &[
            "train",
            "--data",
            folder,
            "--out",
            &out,
            "--norm-groups",
            "5",
        ],
        "norm groups",
    );
    fails(
        &["train", "--data", folder, "--out", &out, "--resume"],
        "no checkpoint",
    );

    std::fs::write(t("junk.safetensors"), b"definitely not safetensors").unwrap();
    fails(
        &["sample", "--model", &t("junk.safetensors")],
        "not a valid safetensors",
    );
    fails(
        &["sample", "--model", &t("missing.safetensors")],
        "neither a file or folder nor a shipped model (fashion-mnist, fashion-mnist-fast, emoji, fashion-mnist-gan, fashion-mnist-autoregressive, fashion-mnist-vae)",
    );
    fails(
        &["sample", "--model", &t("empty")],
        "neither model.safetensors",
    );
    // A truncated copy of the embedded model.
    let full = diffuse::model::EMBEDDED_MODEL;
    std::fs::write(t("cut.safetensors"), &full[..full.len() / 2]).unwrap();
    fails(
        &["sample", "--model", &t("cut.safetensors")],
        "cut.safetensors",
    );
    // Weights from another config: the embedded weights with a wider model's config.
    let (tensors, meta) = diffuse::weights::from_safetensors(full, "embedded").unwrap();
    let mut cfg: diffuse::model::ModelConfig =
        serde_json::from_str(&meta[diffuse::model::CONFIG_KEY]).unwrap();
    cfg.unet.base_channels *= 2;
    let bytes =
        diffuse::model::model_bytes(&cfg, &tensors, diffuse::weights::StoreDtype::F16).unwrap();
    std::fs::write(t("other.safetensors"), bytes).unwrap();
    fails(&["sample", "--model", &t("other.safetensors")], "has shape");

    fails(
        &["noise", "--image", &t("nope.png"), "--out", &t("s.png")],
        "nope.png",
    );
    let img = fixture("folder/circle/a_grey.png");
    fails(
        &[
            "noise",
            "--image",
            img.to_str().unwrap(),
            "--out",
            &t("s.png"),
            "--timesteps",
            "0,1000",
        ],
        "1000",
    );
    fails(&["fetch", "cifar10"], "unknown dataset");
}

#[test]
fn noise_strip_and_embedded_model() {
    let tmp = tempfile::tempdir().unwrap();
    let strip = tmp.path().join("strip.png");
    let img = fixture("folder/square/d.jpg");
    ok(&[
        "noise",
        "--image",
        img.to_str().unwrap(),
        "--out",
        strip.to_str().unwrap(),
        "--size",
        "32",
    ]);
    assert_eq!(png_size(&strip), (6 * 34 + 2, 36));

    let grid = tmp.path().join("g.png");
    let out = ok(&[
        "sample",
        "--class",
        "Sandal",
        "--n",
        "2",
        "--steps",
        "5",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(out.contains("embedded model"), "{out}");
    assert!(grid.is_file());
    let (_, meta) =
        diffuse::weights::from_safetensors(diffuse::model::EMBEDDED_MODEL, "embedded").unwrap();
    let cfg: diffuse::model::ModelConfig =
        serde_json::from_str(&meta[diffuse::model::CONFIG_KEY]).unwrap();
    assert_eq!(cfg.class_names.len(), 10);
    assert_eq!(cfg.class_names[5], "Sandal");
    assert_eq!(cfg.unet.image_size, 28);
}

/// `diffuse edit`: SDEdit and inpainting on the embedded model, the same bits for the same
/// seed, the kept half of an inpainted image unchanged, and bad input refused.
#[test]
fn edit_and_inpaint_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    // A source image from the model itself, and a mask over its right half.
    ok(&[
        "sample",
        "--class",
        "sneaker",
        "--n",
        "1",
        "--steps",
        "10",
        "--sampler",
        "euler-a",
        "--out-dir",
        &p("src"),
    ]);
    let src = p("src/00000.png");
    let mut mask = image::GrayImage::new(28, 28);
    for (x, _, px) in mask.enumerate_pixels_mut() {
        px.0 = [if x >= 14 { 255 } else { 0 }];
    }
    mask.save(p("mask.png")).unwrap();
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "edit", "--image", &src, "--steps", "10", "--n", "2", "--out", out,
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let (a, b) = (p("a.png"), p("b.png"));
    run(
        &a,
        &[
            "--class",
            "ankle boot",
            "--strength",
            "0.6",
            "--out-dir",
            &p("sd"),
        ],
    );
    run(&b, &["--class", "ankle boot", "--strength", "0.6"]);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same bits"
    );
    // Input and two edits in a row, shown at 2x.
    assert_eq!(png_size(Path::new(&a)), (2 * (3 * 30 + 2), 2 * 32));
    assert_ne!(
        std::fs::read(p("sd/00000.png")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    // Strength 0 gives the image back.
    run(&p("z.png"), &["--strength", "0", "--out-dir", &p("zero")]);
    assert_eq!(
        image::open(p("zero/00000.png")).unwrap().to_luma8(),
        image::open(&src).unwrap().to_luma8()
    );
    // Inpainting keeps the left half exactly and redraws the right half.
    run(
        &p("i.png"),
        &[
            "--mask",
            &p("mask.png"),
            "--prompt",
            "sandal",
            "--out-dir",
            &p("inp"),
        ],
    );
    let orig = image::open(&src).unwrap().to_luma8();
    let mut changed = 0;
    for k in 0..2 {
        let e = image::open(p(&format!("inp/{k:05}.png")))
            .unwrap()
            .to_luma8();
        for (x, y, px) in e.enumerate_pixels() {
            if x < 14 {
                assert_eq!(px, orig.get_pixel(x, y), "kept pixel ({x}, {y}) changed");
            } else if px != orig.get_pixel(x, y) {
                changed += 1;
            }
        }
    }
    assert!(changed > 100, "only {changed} masked pixels changed");
    // A mask of another size is resized, with a note.
    image::GrayImage::from_pixel(56, 40, image::Luma([255]))
        .save(p("big.png"))
        .unwrap();
    let o = diffuse(&[
        "edit",
        "--image",
        &src,
        "--mask",
        &p("big.png"),
        "--steps",
        "3",
        "--out",
        &p("m.png"),
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is 56x40; resized"));

    std::fs::write(p("bad.png"), b"not a png").unwrap();
    fails(
        &["edit", "--image", &src, "--strength", "1.5"],
        "--strength must be between 0 and 1",
    );
    fails(
        &["edit", "--image", &src, "--strength=-0.1"],
        "--strength must be between 0 and 1",
    );
    fails(&["edit", "--image", &p("nope.png")], "nope.png");
    fails(&["edit", "--image", &p("bad.png")], "bad.png");
    fails(
        &["edit", "--image", &src, "--mask", &p("bad.png")],
        "bad.png",
    );
    fails(
        &["edit", "--image", &src, "--prompt", "spaceship"],
        "--prompt 'spaceship' is not a class",
    );
    fails(
        &["edit", "--image", &src, "--class", "1", "--prompt", "bag"],
        "not both",
    );
    fails(&["edit", "--image", &src, "--sampler", "magic"], "magic");
    fails(
        &["edit", "--image", &src, "--steps", "0"],
        "--steps must be between",
    );
}

/// `--precision`: recorded in the run's config (the default: the processor's fastest, see
/// `MatmulMode::fastest`), kept on resume unless given again, and bad values refused with one line.
#[test]
fn precision_is_recorded_and_kept_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let precision_of = |run: &Path| -> String {
        let cfg = run_config(run);
        cfg["train"]["precision"].as_str().unwrap().to_string()
    };
    let default = match std::env::var("DIFFUSE_MATMUL") {
        Ok(v) if v == "bf16" && diffuse::kernels::bf16_available() => "bf16",
        Ok(_) => "f32",
        Err(_) => diffuse::kernels::MatmulMode::fastest().name(),
    };
    let run = tmp.path().join("default");
    ok(&tiny_train_args(data, run.to_str().unwrap(), "2"));
    assert_eq!(precision_of(&run), default);

    let run = tmp.path().join("f32");
    let runs = run.to_str().unwrap();
    let mut args = tiny_train_args(data, runs, "4");
    args.extend(["--precision", "f32"]);
    ok(&args);
    assert_eq!(precision_of(&run), "f32");
    // Resumed without --precision: the run's own precision.
    ok(&[
        "train", "--resume", "--data", data, "--out", runs, "--steps", "6",
    ]);
    assert_eq!(precision_of(&run), "f32");
    assert_eq!(metric_steps(&run), (1..=6).collect::<Vec<_>>());

    fails(&["sample", "--precision", "fp8"], "--precision");
    if !diffuse::kernels::bf16_available() {
        fails(&["sample", "--precision", "bf16"], "AMX");
    }
}

/// Output into a closed pipe (`diffuse fid ... | head -1`) ends the process without a panic.
#[test]
fn a_closed_pipe_is_no_panic() {
    let digits = super::data::fixture("digits.csv.gz");
    let d = digits.to_str().unwrap();
    let mut child = Command::new(BIN)
        .args(["fid", d, d, "--features", "fashion-mnist"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is written
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !o.status.success(),
        "its output went nowhere: {:?}",
        o.status
    );
}

/// The tensors of a safetensors file.
pub fn tensors(p: &Path) -> diffuse::weights::NamedTensors {
    diffuse::weights::read_safetensors(p).unwrap().0
}

/// The bytes of every file in `dir`, in name order.
pub fn files_in(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// A run trained for 3 steps and then resumed to 6 in `cut` ends in the same bits (checkpoint
/// and model file) as `whole`, trained for 6 at once. `train(out, steps)` gives the options of
/// a fresh run.
pub fn resumes_to_the_same_bits(
    whole: &Path,
    cut: &Path,
    train: &dyn Fn(&str, &str) -> Vec<String>,
) {
    let c = cut.to_str().unwrap();
    let args = |steps: &str| train(c, steps);
    ok(&args("3").iter().map(String::as_str).collect::<Vec<_>>());
    let mut resume = args("6");
    resume.push("--resume".into());
    ok(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        tensors(&whole.join("checkpoint.safetensors")),
        tensors(&cut.join("checkpoint.safetensors"))
    );
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(cut.join("model.safetensors")).unwrap()
    );
}

/// Five images of class 3 with seed 4 from `model` (and `extra` options), at batch 2 and at
/// batch 7: the same files. Returns them.
pub fn same_images_at_any_batch(model: &str, dir: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    let (a, b) = (dir.join("batch2"), dir.join("batch7"));
    let grid = dir.join("grid.png");
    for (out, batch) in [(&a, "2"), (&b, "7")] {
        let mut args = vec![
            "sample",
            "--model",
            model,
            "--class",
            "3",
            "--n",
            "5",
            "--batch",
            batch,
            "--seed",
            "4",
            "--out-dir",
            out.to_str().unwrap(),
            "--out",
            grid.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(&args);
    }
    assert_eq!(files_in(&a).len(), 5);
    assert_eq!(files_in(&a), files_in(&b));
    files_in(&a)
}

/// `diffuse train` of a tiny class-conditioned run of `family` on `data` into `out`: batch 8,
/// a checkpoint every 3 steps, a preview every 6, the family's own options `extra` before
/// those two (so a GAN's `--checkpoint-every` value stays at index 20).
pub fn family_train_args<'a>(
    family: &'a str,
    data: &'a str,
    out: &'a str,
    steps: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "train", "--family", family, "--data", data, "--out", out, "--cond", "class", "--steps",
        steps, "--batch", "8",
    ];
    a.extend_from_slice(extra);
    a.extend(["--checkpoint-every", "3", "--sample-every", "6"]);
    a
}

/// A finished run folder of 6 steps holds its config, checkpoint, model, loss plot and the
/// preview of step 6; returns its metrics lines.
pub fn run_folder_is_complete(run: &Path) -> Vec<serde_json::Value> {
    for f in [
        "config.json",
        "checkpoint.safetensors",
        "model.safetensors",
        "loss.png",
        "samples/step-000006.png",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `diffuse eval` of `model` on 20 samples against 100 images of `data`, its JSON report
/// (written into `dir`), which must name the family `family` and have a finite FID.
pub fn eval_json(model: &str, data: &str, dir: &Path, family: &str) -> serde_json::Value {
    let j = dir.join("eval.json");
    let args = [
        "eval",
        "--model",
        model,
        "--data",
        data,
        "--n",
        "20",
        "--n-real",
        "100",
        "--json",
        j.to_str().unwrap(),
    ];
    ok(&args);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert_eq!(v["family"], family, "{v}");
    assert!(v["fid"].as_f64().unwrap().is_finite(), "{v}");
    v
}
