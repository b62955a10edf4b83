//! Writes the committed test fixtures under tests/fixtures/ (run from the repository root):
//! `cargo run --release --example make_fixtures`.
//!
//! - `folder/`: an image folder with two class subfolders and every supported mode and format
//!   (grey, RGBA, palette PNG; JPEG; BMP; WebP), plus a corrupt PNG, an empty PNG and a text file.
//! - `idx/`: the first 64 Fashion-MNIST test images and labels as gzipped IDX (needs
//!   `diffuse fetch fashion-mnist` first).
//! - `digits.csv.gz` is scikit-learn's file, copied as is (`diffuse fetch digits`).

use diffuse::data::{fetch, idx};
use image::{DynamicImage, GrayImage, Rgb, RgbImage, Rgba, RgbaImage};
use std::io::Write;
use std::path::Path;

fn disc(w: u32, h: u32, fg: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - w as f32 / 2.0, y as f32 - h as f32 / 2.0);
        if dx * dx + dy * dy < (w.min(h) as f32 / 3.0).powi(2) {
            Rgb(fg)
        } else {
            Rgb([255, 255, 255])
        }
    })
}

fn write_palette_png(path: &Path) {
    let (w, h) = (10u32, 10u32);
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![255, 255, 255, 200, 30, 30]);
    let mut wr = enc.write_header().unwrap();
    let data: Vec<u8> = (0..w * h)
        .map(|i| ((i % w) > 3 && (i % w) < 7) as u8)
        .collect();
    wr.write_image_data(&data).unwrap();
}

fn gz(path: &Path, bytes: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap();
}

fn main() {
    let root = Path::new("tests/fixtures");
    let folder = root.join("folder");
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(folder.join("circle")).unwrap();
    std::fs::create_dir_all(folder.join("square/nested")).unwrap();

    let grey = DynamicImage::ImageRgb8(disc(16, 12, [0, 0, 0])).to_luma8();
    GrayImage::from(grey)
        .save(folder.join("circle/a_grey.png"))
        .unwrap();
    let rgba = RgbaImage::from_fn(12, 12, |x, y| {
        let inside = (x as i32 - 6).pow(2) + (y as i32 - 6).pow(2) < 16;
        if inside {
            Rgba([20, 40, 200, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    });
    rgba.save(folder.join("circle/b_rgba.png")).unwrap();
    write_palette_png(&folder.join("circle/c_palette.png"));
    let sq = RgbImage::from_fn(20, 14, |x, y| {
        if (5..15).contains(&x) && (2..12).contains(&y) {
            Rgb([30, 160, 40])
        } else {
            Rgb([250, 250, 250])
        }
    });
    DynamicImage::ImageRgb8(sq.clone())
        .save(folder.join("square/d.jpg"))
        .unwrap();
    DynamicImage::ImageRgb8(sq.clone())
        .save(folder.join("square/e.bmp"))
        .unwrap();
    DynamicImage::ImageRgb8(sq)
        .save(folder.join("square/nested/f.webp"))
        .unwrap();
    std::fs::write(
        folder.join("square/corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    )
    .unwrap();
    std::fs::write(folder.join("square/empty.png"), b"").unwrap();
    std::fs::write(folder.join("square/notes.txt"), b"not an image, ignored\n").unwrap();

    let cache = diffuse::fetch::cache_dir().unwrap();
    let fm = cache.join("fashion-mnist");
    if fm.exists() {
        let out = root.join("idx");
        std::fs::create_dir_all(&out).unwrap();
        let n = 64usize;
        let imgs = idx::read_maybe_gz(&fm.join("t10k-images-idx3-ubyte.gz")).unwrap();
        let labels = idx::read_maybe_gz(&fm.join("t10k-labels-idx1-ubyte.gz")).unwrap();
        let mut a = vec![0u8, 0, 8, 3];
        for d in [n, 28, 28] {
            a.extend((d as u32).to_be_bytes());
        }
        a.extend_from_slice(&imgs[16..16 + n * 784]);
        gz(&out.join("small-images-idx3-ubyte.gz"), &a);
        let mut l = vec![0u8, 0, 8, 1];
        l.extend((n as u32).to_be_bytes());
        l.extend_from_slice(&labels[8..8 + n]);
        gz(&out.join("small-labels-idx1-ubyte.gz"), &l);
        std::fs::write(
            out.join("classes.txt"),
            fetch::FASHION_MNIST_CLASSES.join("\n") + "\n",
        )
        .unwrap();
    } else {
        eprintln!("fashion-mnist not fetched: idx/ left as it is");
    }
    let digits = cache.join("digits/digits.csv.gz");
    if digits.exists() {
        std::fs::copy(digits, root.join("digits.csv.gz")).unwrap();
    }
    println!("fixtures written under {}", root.display());
}
