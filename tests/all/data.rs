//! Loaders on the committed fixtures (tests/fixtures, made by examples/make_fixtures.rs).

use diffuse::data::{self, Shape, batch_for_step, idx};
use std::path::{Path, PathBuf};

pub fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// The first `b` 8x8 digits of the digits fixture: pixels in `[-1, 1]` (image after image)
/// and their labels, a one-batch training set for the families' loss tests.
pub fn digits_batch(b: usize) -> (Vec<f32>, Vec<usize>) {
    let ds = diffuse::data::load(
        fixture("digits.csv.gz").to_str().unwrap(),
        diffuse::data::Shape {
            size: 8,
            channels: 1,
        },
        true,
    )
    .unwrap();
    let px = ds.pixels[..b * 64]
        .iter()
        .map(|&p| f32::from(p) / 127.5 - 1.0)
        .collect();
    (px, ds.labels.unwrap()[..b].to_vec())
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
    assert!(ds.pixels.contains(&255) && ds.pixels.contains(&0));
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

fn write_png(p: &Path, v: u8) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([v, 0, 255 - v]))
        .save(p)
        .unwrap();
}

#[test]
fn captions_from_jsonl_or_sidecars_and_their_errors() {
    let shape = Shape {
        size: 8,
        channels: 3,
    };
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_png(&dir.join("a.png"), 10);
    write_png(&dir.join("sub/b.png"), 200);
    // No captions at all: an ordinary folder.
    assert!(data::load(s(dir), shape, false).unwrap().captions.is_none());
    // Sidecars: one caption per non-empty line.
    std::fs::write(dir.join("a.txt"), "red square\n\n  a red tile \n").unwrap();
    let err = data::load(s(dir), shape, false).unwrap_err().to_string();
    assert!(
        err.contains("1 of 2 images") && err.contains("b.png"),
        "{err}"
    );
    std::fs::write(dir.join("sub/b.txt"), "blue square").unwrap();
    let ds = data::load(s(dir), shape, false).unwrap();
    assert_eq!(
        ds.captions.unwrap(),
        vec![
            vec!["red square".to_string(), "a red tile".into()],
            vec!["blue square".into()]
        ]
    );
    // captions.jsonl takes precedence; several lines per file are alternatives.
    let jsonl = "{\"file\": \"sub/b.png\", \"text\": \"b one\"}\n{\"file\": \"a.png\", \"text\": \"a\"}\n{\"file\": \"sub/b.png\", \"text\": \"b two\"}\n";
    std::fs::write(dir.join("captions.jsonl"), jsonl).unwrap();
    let ds = data::load(s(dir), shape, false).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(
        ds.captions.unwrap(),
        vec![vec!["a".to_string()], vec!["b one".into(), "b two".into()]]
    );
    for (bad, needle) in [
        ("{\"file\": \"a.png\"}\n", "line 1: not a caption"),
        (
            "{\"file\": \"nope.png\", \"text\": \"x\"}\n",
            "line 1: no image nope.png",
        ),
        (
            "{\"file\": \"../a.png\", \"text\": \"x\"}\n",
            "must be a path inside the folder",
        ),
        (
            "{\"file\": \"a.png\", \"text\": \"x\"}\nnot json\n",
            "line 2: not a caption",
        ),
        ("{\"file\": \"a.png\", \"text\": \"x\"}\n", "1 of 2 images"),
    ] {
        std::fs::write(dir.join("captions.jsonl"), bad).unwrap();
        let err = format!("{:#}", data::load(s(dir), shape, false).unwrap_err());
        assert!(err.contains(needle), "{bad:?}: {err}");
        assert!(
            err.contains("captions.jsonl") || err.contains(s(dir)),
            "{err}"
        );
    }
}

#[test]
fn emoji_captions_join_names_short_names_categories_and_keywords() {
    let emoji = r#"[
      {"name": "RED HEART", "unified": "2764-FE0F", "image": "2764-fe0f.png", "short_names": ["heart"],
       "category": "Smileys & Emotion", "subcategory": "heart", "has_img_google": true},
      {"name": null, "unified": "1F1FA-1F1F8", "image": "1f1fa-1f1f8.png", "short_names": ["flag-us", "us"],
       "category": "Flags", "subcategory": "country-flag", "has_img_google": true},
      {"name": "NO IMAGE", "unified": "1F000", "image": "1f000.png", "short_names": ["x"],
       "category": "Symbols", "subcategory": "other", "has_img_google": false}
    ]"#;
    let mart = r#"{"emojis": {"heart": {"keywords": ["love", "Like", "heart"], "skins": [{"unified": "2764-fe0f"}]}}}"#;
    let c = data::emoji::captions(emoji, mart).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].0, "2764-fe0f.png");
    assert_eq!(
        c[0].1,
        vec![
            "red heart",
            "red heart, heart, love, like",
            "red heart, heart, smileys & emotion"
        ]
    );
    assert_eq!(c[1].1[0], "flag us");
    assert!(data::emoji::captions("[]", mart).is_err());
    assert!(data::emoji::captions("{", mart).is_err());
}
