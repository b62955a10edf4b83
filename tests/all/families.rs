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
