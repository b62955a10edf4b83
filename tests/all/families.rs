//! The Fashion-MNIST models of the other families shipped in the binary: each loads by name
//! with the embedded model's classes, samples from the CLI, and makes images that the embedded
//! classifier reads as the class asked for more often than chance.

use super::cli::ok;
use diffuse::device::inference_device;
use diffuse::model::Family;
use diffuse::pipeline::{Conditioning, Generator, Request, Seeds, load_model};
use diffuse::sampler::SamplerKind;

/// The shipped models of other families, each with a class it draws well (docs/FAMILIES.md has
/// each model's accuracy per class at n = 1000) and the least share of 20 images of it the
/// classifier must read as that class (chance: 10%).
const SHIPPED: &[(&str, Family, &str, f64)] = &[
    ("fashion-mnist-gan", Family::Gan, "trouser", 0.8),
    (
        "fashion-mnist-autoregressive",
        Family::Autoregressive,
        "sandal",
        0.3,
    ),
    ("fashion-mnist-vae", Family::Vae, "ankle boot", 0.2),
];

#[test]
fn the_shipped_models_of_other_families_load_by_name_and_make_their_class() {
    let dev = inference_device();
    let embedded = load_model(None, &dev).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for &(name, family, class, least) in SHIPPED {
        let g = Generator::load(Some(name), &dev).unwrap();
        assert_eq!(g.family(), family, "{name}");
        assert_eq!(g.cond().class_names, embedded.config.class_names.as_slice());
        let out = tmp.path().join(format!("{name}.png"));
        let said = ok(&[
            "sample",
            "--model",
            name,
            "--class",
            "sneaker",
            "--n",
            "8",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(said.contains("8 images"), "{said}");
        let c = g.cond().class_index(class, "--class").unwrap();
        let mut req = Request::new(20, SamplerKind::Ddpm);
        req.conditioning = Conditioning::Classes(vec![c; 20]);
        req.seeds = Seeds::One(0);
        let predicted = embedded_classes(g.run(&req, &mut |_| {}).unwrap().images);
        let hits = predicted.iter().filter(|&&p| p == c).count();
        assert!(
            hits as f64 >= least * 20.0,
            "{name}: {hits} of 20 images of class {class} read as that class"
        );
    }
}

/// The embedded Fashion-MNIST classifier's class for each of `images` `[n, 1, 28, 28]` in
/// `[-1, 1]`.
pub fn embedded_classes(images: burn::tensor::Tensor<4>) -> Vec<usize> {
    let dev = inference_device();
    let n = images.dims()[0];
    let x: Vec<f32> = images.into_data().convert::<f32>().try_into_vec().unwrap();
    let classifier = diffuse::eval::classifier::load_classifier_bytes(
        diffuse::eval::EMBEDDED_FASHION_CLASSIFIER,
        "the embedded classifier",
        &dev,
    )
    .unwrap();
    classifier.run(&x, n, &dev).1
}

/// What would lose a file or mislead is refused with one line: `convert` writing over its
/// input or to a name of another kind, `eval --json` to a non-JSON name (before any work),
/// held-out labels beyond the model's classes, and a likelihood family whose loss explodes.
#[test]
fn family_commands_refuse_what_would_lose_a_file_or_mislead() {
    use super::cli::fails;
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let gan = t("gan.safetensors");
    ok(&["convert", "--model", "fashion-mnist-gan", "--out", &gan]);
    let before = std::fs::read(&gan).unwrap();
    fails(
        &["convert", "--model", &gan, "--out", &gan, "--dtype", "f32"],
        "that is the input",
    );
    let png = t("keep.png");
    std::fs::write(&png, b"not mine to replace").unwrap();
    fails(
        &["convert", "--model", &gan, "--out", &png],
        "the file written is .safetensors",
    );
    fails(
        &[
            "eval", "--model", &gan, "--data", "x", "--n", "8", "--json", &gan,
        ],
        "--json",
    );
    assert_eq!(std::fs::read(&gan).unwrap(), before, "the model is intact");
    assert_eq!(std::fs::read(&png).unwrap(), b"not mine to replace");

    // Held-out images labelled 0..11 against a 10-class model: an error naming both, not a
    // panic in the class embedding (and not label 10 scored as the null class).
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/idx");
    let images = t("held-images-idx3-ubyte.gz");
    std::fs::copy(fixture.join("small-images-idx3-ubyte.gz"), &images).unwrap();
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 64];
    labels.extend((0..64u8).map(|i| i % 12));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &labels).unwrap();
    std::fs::write(t("held-labels-idx1-ubyte.gz"), gz.finish().unwrap()).unwrap();
    fails(
        &[
            "eval",
            "--model",
            "fashion-mnist-autoregressive",
            "--data",
            &images,
            "--n",
            "4",
            "--n-real",
            "8",
            "--nll-data",
            &images,
        ],
        "has labels up to 11; the shipped model 'fashion-mnist-autoregressive' has classes 0..9",
    );

    // An exploding autoregressive run stops at the step it explodes, as a GAN's does.
    let digits =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits.csv.gz");
    fails(
        &[
            "train",
            "--family",
            "autoregressive",
            "--data",
            digits.to_str().unwrap(),
            "--out",
            &t("div"),
            "--features",
            "8",
            "--layers",
            "2",
            "--batch",
            "4",
            "--steps",
            "6",
            "--lr=1e6",
            "--sample-every",
            "0",
        ],
        "training diverged at step",
    );
}
