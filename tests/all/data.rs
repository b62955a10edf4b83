//! Loaders on the committed fixtures (tests/fixtures, made by examples/make_fixtures.rs).

use diffuse::data::{self, Shape, batch_for_step, idx};
use std::path::{Path, PathBuf};

pub fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn image_folder_with_mixed_modes_formats_and_bad_files() {
    let dir = fixture("folder");
    let ds = data::load(
        s(&dir),
        Shape {
            size: 8,
            channels: 3,
        },
        true,
    )
    .unwrap();
    // 3 good PNGs (grey, RGBA, palette) + JPEG + BMP + nested WebP; corrupt, empty and .txt skipped.
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.class_names, vec!["circle", "square"]);
    assert_eq!(ds.labels.as_ref().unwrap(), &vec![0, 0, 0, 1, 1, 1]);
    assert_eq!((ds.channels, ds.size), (3, 8));
    assert_eq!(ds.pixels.len(), 6 * 3 * 64);
    // RGBA is composited on white: the corner of the transparent image is white.
    let rgba = ds.image(1);
    assert_eq!([rgba[0], rgba[64], rgba[128]], [255, 255, 255]);
    // Its centre is the opaque blue.
    let c = 4 * 8 + 4;
    assert!(
        rgba[128 + c] > 150 && rgba[c] < 80,
        "centre {:?}",
        [rgba[c], rgba[64 + c], rgba[128 + c]]
    );
    // Palette image: the red stripe survives.
    let pal = ds.image(2);
    assert!(pal[c] > 150 && pal[64 + c] < 100);

    let grey = data::load(
        s(&dir),
        Shape {
            size: 5,
            channels: 1,
        },
        false,
    )
    .unwrap();
    assert_eq!((grey.len(), grey.channels, grey.size), (6, 1, 5));
    assert!(grey.labels.is_none());
}

#[test]
fn folder_errors_name_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let err = data::load(
        s(tmp.path()),
        Shape {
            size: 8,
            channels: 3,
        },
        false,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains(s(tmp.path())), "{err:#}");
    std::fs::write(tmp.path().join("bad.png"), b"garbage").unwrap();
    let err = format!(
        "{:#}",
        data::load(
            s(tmp.path()),
            Shape {
                size: 8,
                channels: 3
            },
            false
        )
        .unwrap_err()
    );
    assert!(
        err.contains("no readable image") && err.contains(s(tmp.path())),
        "{err}"
    );
    let err = format!(
        "{:#}",
        data::load(
            "/no/such/folder",
            Shape {
                size: 8,
                channels: 3
            },
            false
        )
        .unwrap_err()
    );
    assert!(err.contains("/no/such/folder"), "{err}");
    // Class conditioning needs subfolders.
    let flat = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("folder/circle/a_grey.png"),
        flat.path().join("a.png"),
    )
    .unwrap();
    assert!(
        data::load(
            s(flat.path()),
            Shape {
                size: 8,
                channels: 1
            },
            true
        )
        .is_err()
    );
    assert!(
        data::load(
            s(flat.path()),
            Shape {
                size: 0,
                channels: 1
            },
            false
        )
        .is_err()
    );
    assert!(
        data::load(
            s(flat.path()),
            Shape {
                size: 8,
                channels: 2
            },
            false
        )
        .is_err()
    );
}

#[test]
fn idx_files_gzipped_with_labels_and_class_names() {
    let ds = data::load(
        s(&fixture("idx")),
        Shape {
            size: 28,
            channels: 1,
        },
        true,
    )
    .unwrap();
    assert_eq!((ds.len(), ds.size, ds.channels), (64, 28, 1));
    assert_eq!(ds.class_names.len(), 10);
    assert_eq!(ds.class_names[9], "Ankle boot");
    // The first Fashion-MNIST test labels are 9, 2, 1, 1, 6.
    assert_eq!(&ds.labels.as_ref().unwrap()[..5], &[9, 2, 1, 1, 6]);
    let direct = data::load(
        s(&fixture("idx/small-images-idx3-ubyte.gz")),
        Shape {
            size: 14,
            channels: 1,
        },
        false,
    )
    .unwrap();
    assert_eq!((direct.len(), direct.size), (64, 14));

    // Truncated and non-IDX input.
    let tmp = tempfile::tempdir().unwrap();
    let bytes = idx::read_maybe_gz(&fixture("idx/small-images-idx3-ubyte.gz")).unwrap();
    let cut = tmp.path().join("cut-images-idx3-ubyte");
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let err = format!(
        "{:#}",
        data::load(
            s(&cut),
            Shape {
                size: 28,
                channels: 1
            },
            false
        )
        .unwrap_err()
    );
    assert!(err.contains("truncated"), "{err}");
    assert!(idx::parse_idx(b"\x01\x02\x03", "x").is_err());
}

#[test]
fn digits_csv_loads_1797_labelled_images() {
    let ds = data::load(
        s(&fixture("digits.csv.gz")),
        Shape {
            size: 8,
            channels: 1,
        },
        true,
    )
    .unwrap();
    assert_eq!(ds.len(), 1797);
    assert_eq!(ds.class_names.len(), 10);
    assert_eq!(ds.labels.as_ref().unwrap()[0], 0);
    assert!(ds.pixels.iter().any(|&p| p == 255) && ds.pixels.iter().any(|&p| p == 0));
    let up = ds
        .reshape_to(Shape {
            size: 16,
            channels: 3,
        })
        .unwrap();
    assert_eq!(up.pixels.len(), 1797 * 3 * 256);
}

#[test]
fn batches_are_deterministic_epoch_permutations() {
    let ds = data::load(
        s(&fixture("idx")),
        Shape {
            size: 28,
            channels: 1,
        },
        true,
    )
    .unwrap();
    let a = batch_for_step(&ds, 3, 10, 5, true);
    let b = batch_for_step(&ds, 3, 10, 5, true);
    assert_eq!(a.images, b.images);
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.shape, [10, 1, 28, 28]);
    assert!(a.images.iter().all(|&v| (-1.0..=1.0).contains(&v)));
    // One epoch (64 images) visits every image exactly once: 8 batches of 8.
    let mut seen: Vec<usize> = Vec::new();
    for step in 0..8 {
        let bt = batch_for_step(&ds, step, 8, 9, false);
        for k in 0..8 {
            let img = &bt.images[k * 784..(k + 1) * 784];
            let idx = (0..64)
                .find(|&i| {
                    ds.image(i)
                        .iter()
                        .zip(img)
                        .all(|(&p, &v)| (p as f32 / 127.5 - 1.0 - v).abs() < 1e-6)
                })
                .unwrap();
            seen.push(idx);
        }
    }
    seen.sort();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
}
