//! Data-parallel training (`diffuse train --devices`): N replicas, each on its share of the
//! batch, make the update of one device on the whole batch, up to the order of f32 sums.

use super::cli::{diffuse, fails, ok, tiny_train_args};
use super::data::fixture;
use diffuse::train::read_metrics;
use diffuse::train::replicas::Replicas;
use diffuse::weights::{NamedTensors, read_safetensors};
use std::path::Path;
use std::process::Command;

/// The run's checkpoint tensors whose names start with `prefix` (`model.`, `ema.`).
fn tensors(run: &Path, prefix: &str) -> NamedTensors {
    let (t, _) = read_safetensors(&run.join("checkpoint.safetensors")).unwrap();
    t.into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect()
}

/// The largest difference between two runs' tensors of `prefix`, over the largest magnitude.
fn max_diff(a: &Path, b: &Path, prefix: &str) -> (f32, f32) {
    let (ta, tb) = (tensors(a, prefix), tensors(b, prefix));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "the same tensors"
    );
    assert!(!ta.is_empty());
    let (mut diff, mut scale) = (0f32, 0f32);
    for (k, x) in &ta {
        let y = &tb[k];
        assert_eq!(x.shape, y.shape, "{k}");
        for (p, q) in x.data.iter().zip(&y.data) {
            diff = diff.max((p - q).abs());
            scale = scale.max(p.abs());
        }
    }
    (diff, scale)
}

/// The loss and the gradient norm of every step in the run's `metrics.jsonl`.
fn metric(run: &Path, key: &str) -> Vec<f64> {
    read_metrics(&run.join("metrics.jsonl"), usize::MAX)
        .iter()
        .map(|m| match key {
            "loss" => m.loss,
            "grad_norm" => m.grad_norm,
            k => panic!("metrics.jsonl has no {k}"),
        })
        .collect()
}

fn losses(run: &Path) -> Vec<f64> {
    metric(run, "loss")
}

fn train(data: &str, out: &Path, steps: &str, extra: &[&str]) {
    let mut args = tiny_train_args(data, out.to_str().unwrap(), steps);
    args.extend(extra);
    ok(&args);
}

#[test]
fn shares_split_a_batch_as_evenly_as_it_can() {
    let r = |n: usize| {
        Replicas::new(vec![(String::new(), diffuse::device::training_device()); n]).unwrap()
    };
    assert_eq!(r(3).shares(10), vec![0..4, 4..7, 7..10]);
    assert_eq!(r(2).shares(8), vec![0..4, 4..8]);
    assert_eq!(r(4).shares(4), vec![0..1, 1..2, 2..3, 3..4]);
    for (n, b) in [(1, 1), (3, 7), (5, 64), (8, 9)] {
        let s = r(n).shares(b);
        assert_eq!(s.len(), n);
        assert_eq!(s[0].start, 0);
        assert_eq!(s[n - 1].end, b);
        assert!(s.windows(2).all(|w| w[0].end == w[1].start));
        let lens: Vec<usize> = s.iter().map(|x| x.len()).collect();
        assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
    }
    assert!(
        r(3).check_batch(2)
            .unwrap_err()
            .to_string()
            .contains("batch of at least 3")
    );
}

/// Two replicas of 4 images and three of 3, 3 and 2 train as one device on 8, over 12 steps
/// (Adam, EMA, clipping and the learning rate warm-up included); a run with replicas repeats
/// its bits; a run of 2 replicas resumes on 1 device.
#[test]
fn replicas_train_as_one_device_on_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    // In f32: in bf16 (the default where the processor runs it) each product rounds its
    // operands, so a weight whose last bit differs between two runs (from the order of f32
    // sums) can round to the neighbouring bf16 value; the runs then drift apart chaotically,
    // to 1e-4 of the loss within 12 steps (measured with AVX-512 BF16, against 1e-7 in f32),
    // which would hide a wrongly combined gradient. How replicas split and combine does not
    // depend on the precision.
    let run = |name: &str, steps: &str, extra: &[&str]| {
        let p = tmp.path().join(name);
        let mut extra = extra.to_vec();
        extra.extend(["--precision", "f32"]);
        train(data, &p, steps, &extra);
        p
    };
    let one = run("one", "12", &[]);
    let two = run("two", "12", &["--devices", "2"]);
    let three = run("three", "12", &["--devices", "cpu:0..2"]);
    // The loss and the gradient norm of the whole batch (Adam alone would not see gradients
    // scaled by the number of replicas; the norm and the clipping would).
    for key in ["loss", "grad_norm"] {
        let want = metric(&one, key);
        assert_eq!(want.len(), 12);
        for run in [&two, &three] {
            for (i, (g, w)) in metric(run, key).iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs(),
                    "{} step {}: {key} {g} against {w} on one device",
                    run.display(),
                    i + 1
                );
            }
        }
    }
    // Measured on this tiny model after 12 steps: at most 2.7e-6 of the largest weight (only
    // the order of f32 sums differs). Adam divides by the root of the second moment, so a
    // gradient near zero can move its weight by more than its own relative error; the bound
    // leaves room for that.
    for other in [&two, &three] {
        for prefix in ["model.", "ema."] {
            let (d, s) = max_diff(&one, other, prefix);
            assert!(
                d <= 1e-4 * s,
                "{prefix} of {} differs from one device by {d} (largest {s})",
                other.display()
            );
        }
    }
    // Same seed, same devices: the same bits.
    let again = run("again", "12", &["--devices", "2"]);
    assert_eq!(tensors(&two, ""), tensors(&again, ""));
    assert_eq!(losses(&two), losses(&again));

    // Written with 2 devices, resumed with 1 (and the other way).
    let half = run("half", "4", &["--devices", "2"]);
    train(data, &half, "12", &["--resume"]);
    let back = run("back", "4", &[]);
    train(data, &back, "12", &["--resume", "--devices", "cpu:0,cpu:1"]);
    for resumed in [&half, &back] {
        let (d, s) = max_diff(&one, resumed, "model.");
        assert!(d <= 1e-4 * s, "{}: {d} of {s}", resumed.display());
        assert_eq!(losses(resumed).len(), 12);
    }
}

/// With dropout the replicas draw their masks in a fixed order: a run repeats its bits.
#[test]
fn replicas_with_dropout_repeat_their_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for p in [&a, &b] {
        train(data, p, "4", &["--devices", "3", "--dropout", "0.3"]);
    }
    assert_eq!(tensors(&a, ""), tensors(&b, ""));
}

#[test]
fn bad_device_lists_get_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let out = tmp.path().join("run");
    let outs = out.to_str().unwrap();
    let with = |devices: &'static str| {
        let mut a = tiny_train_args(data, outs, "2");
        a.extend(["--devices", devices]);
        a
    };
    fails(&with("0"), "at least 1");
    fails(&with("9"), "9 devices need a batch of at least 9");
    fails(&with("cpu:0,cpu:0"), "cpu:0 is listed twice");
    fails(&with("cpu:3..1"), "reversed");
    fails(&with("gpu:0"), "unknown device kind 'gpu'");
    fails(&with("cpu:x"), "'x' in 'cpu:x' is not an index");
    fails(&with("two"), "not KIND:INDEX");
    fails(&with("cpu:0,cuda:1"), "of one kind");
    if diffuse::device::backend_name() == "flex-cpu" {
        fails(
            &with("cuda:0"),
            "not cuda (build with --features libtorch (or cuda)",
        );
        fails(
            &with("vulkan:0"),
            "not vulkan (build with --features vulkan",
        );
    }
    assert!(!out.exists(), "a refused run leaves nothing");
    let mut gan = vec!["train", "--family", "gan", "--data", data, "--out", outs];
    gan.extend(["--steps", "2", "--devices", "2"]);
    fails(&gan, "--devices is an option of diffusion");
    // The option's help names the forms.
    let help = String::from_utf8_lossy(&diffuse(&["train", "--help"]).stdout).into_owned();
    assert!(help.contains("cuda:0..7"), "{help}");
}

/// A device that fails mid-run stops it with one line naming the device and the step; the last
/// checkpoint is intact and resumes to the bits of a run that never failed.
#[test]
fn a_failing_device_stops_the_run_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let (cut, whole) = (tmp.path().join("cut"), tmp.path().join("whole"));
    let args = tiny_train_args(data, cut.to_str().unwrap(), "8");
    let o = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(&args)
        .args(["--devices", "2"])
        .env("DIFFUSE_FAIL_REPLICA", "cpu:1@6")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("device cpu:1 failed at step 6: injected failure")
            && lines[0].contains("the checkpoint of step 4 is kept"),
        "{err}"
    );
    assert_eq!(losses(&cut).len(), 5, "metrics up to the failed step");
    train(data, &cut, "8", &["--resume", "--devices", "2"]);
    train(data, &whole, "8", &["--devices", "2"]);
    assert_eq!(tensors(&cut, ""), tensors(&whole, ""));
}
