//! Image folders: PNG, JPEG, WebP and BMP files found recursively, of any size and mode.

use super::{Dataset, Shape};
use crate::files::io_reason;
use anyhow::{Result, bail};
use image::{DynamicImage, GenericImageView, RgbImage, imageops::FilterType};
use std::path::{Path, PathBuf};

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

fn is_image_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// The image files under a folder, found recursively in sorted order, and what could not be
/// searched.
#[derive(Debug, Default)]
pub struct Walk {
    pub files: Vec<PathBuf>,
    /// Subfolders that could not be read (`path: reason`), skipped.
    pub unreadable: Vec<String>,
}

/// Finds the image files under `dir`. Symbolic links are followed, but each folder is entered
/// once and each file is listed once (by device and inode), so a link back to an ancestor
/// (`ln -s . loop`) is no loop and a link to an image already found adds no copy of it.
/// `dir` itself must be readable; an unreadable subfolder is skipped and reported.
pub fn walk(dir: &Path) -> Result<Walk> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut out = Walk::default();
    let mut seen_dirs: HashSet<(u64, u64)> = HashSet::new();
    let mut seen_files: HashSet<(u64, u64)> = HashSet::new();
    let root = std::fs::metadata(dir)
        .map_err(|e| anyhow::anyhow!("cannot read folder {}: {}", dir.display(), io_reason(&e)))?;
    seen_dirs.insert((root.dev(), root.ino()));
    // Depth-first with an explicit stack (no recursion limit), children in sorted order.
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(r) => r,
            Err(e) if d == dir => {
                bail!("cannot read folder {}: {}", dir.display(), io_reason(&e))
            }
            Err(e) => {
                out.unreadable
                    .push(format!("{}: {}", d.display(), io_reason(&e)));
                continue;
            }
        };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        let mut subdirs = Vec::new();
        for p in entries {
            // Follows links; a dangling link is neither a folder nor a file and is passed over.
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            let id = (meta.dev(), meta.ino());
            if meta.is_dir() {
                if seen_dirs.insert(id) {
                    subdirs.push(p);
                }
            } else if is_image_file(&p) && seen_files.insert(id) {
                out.files.push(p);
            }
        }
        // Reversed onto the stack, so the first subfolder is searched first.
        stack.extend(subdirs.into_iter().rev());
    }
    out.files.sort();
    Ok(out)
}

/// Prints one warning for the subfolders a walk could not read.
fn warn_unreadable(dir: &Path, w: &Walk) {
    if let Some(first) = w.unreadable.first() {
        eprintln!(
            "warning: skipped {} unreadable subfolder(s) of {}, first: {first}",
            w.unreadable.len(),
            dir.display()
        );
    }
}

/// Flattens any image mode to RGB: alpha is composited on white, palettes and grey expand.
pub fn to_rgb_on_white(img: &DynamicImage) -> RgbImage {
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (x, y, p) in rgba.enumerate_pixels() {
        let a = p[3] as f32 / 255.0;
        let c = |v: u8| (v as f32 * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8;
        out.put_pixel(x, y, image::Rgb([c(p[0]), c(p[1]), c(p[2])]));
    }
    out
}

/// Resizes so that the shorter side is `size` (Catmull-Rom), centre-crops to a square, and
/// returns `channels x size x size` bytes (grey = ITU-R 601 luma).
pub fn image_to_chw(img: &DynamicImage, size: usize, channels: usize) -> Vec<u8> {
    let rgb = DynamicImage::ImageRgb8(to_rgb_on_white(img));
    let (w, h) = rgb.dimensions();
    let s = size as u32;
    let scaled = if w == s && h == s {
        rgb
    } else {
        let (nw, nh) = if w < h {
            (s, ((h as f64 * s as f64 / w as f64).round() as u32).max(s))
        } else {
            (((w as f64 * s as f64 / h as f64).round() as u32).max(s), s)
        };
        let r = rgb.resize_exact(nw, nh, FilterType::CatmullRom);
        r.crop_imm((nw - s) / 2, (nh - s) / 2, s, s)
    };
    let rgb = scaled.to_rgb8();
    let n = size * size;
    let mut out = vec![0u8; channels * n];
    for (i, p) in rgb.pixels().enumerate() {
        if channels == 1 {
            let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
            out[i] = l.round().clamp(0.0, 255.0) as u8;
        } else {
            for c in 0..3 {
                out[c * n + i] = p[c];
            }
        }
    }
    out
}

/// Turns `channels x size x size` bytes back into an image.
pub fn chw_to_image(chw: &[u8], channels: usize, size: usize) -> DynamicImage {
    let n = size * size;
    let s = size as u32;
    if channels == 1 {
        DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(s, s, chw[..n].to_vec()).expect("buffer of size*size"),
        )
    } else {
        let mut img = RgbImage::new(s, s);
        for (i, p) in img.pixels_mut().enumerate() {
            *p = image::Rgb([chw[i], chw[n + i], chw[2 * n + i]]);
        }
        DynamicImage::ImageRgb8(img)
    }
}

/// The class names of a class-conditioned folder: its first-level subfolders that hold image
/// files, sorted.
pub fn class_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read folder {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && walk(&p).is_ok_and(|w| !w.files.is_empty()) {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        bail!(
            "{} has no class subfolders with images (needed for --cond class)",
            dir.display()
        );
    }
    Ok(names)
}

/// The side length of the first decodable image of a folder, when it is square (the size a
/// folder of same-sized square images is used at, e.g. for FID).
pub fn first_square_size(dir: &Path) -> Option<usize> {
    walk(dir)
        .ok()?
        .files
        .iter()
        .find_map(|f| image::image_dimensions(f).ok())
        .filter(|(w, h)| w == h && *w > 0)
        .map(|(w, _)| w as usize)
}

/// Loads every readable image under `dir`. With `with_classes`, each image's class is its
/// first-level subfolder (sorted by name); images directly in `dir` are then an error.
/// Unreadable files are skipped with one counted warning on stderr.
/// Unreadable subfolders are skipped the same way.
pub fn load_folder(dir: &Path, shape: Shape, with_classes: bool) -> Result<Dataset> {
    let found = walk(dir)?;
    warn_unreadable(dir, &found);
    let files = found.files;
    if files.is_empty() {
        bail!(
            "{} holds no image files (looked for {} recursively)",
            dir.display(),
            EXTENSIONS.join(", ")
        );
    }
    let mut class_names: Vec<String> = Vec::new();
    let class_of = |p: &Path| -> Option<String> {
        let rel = p.strip_prefix(dir).ok()?;
        let mut comps = rel.components();
        let first = comps.next()?;
        comps.next()?; // must be inside a subfolder
        Some(first.as_os_str().to_string_lossy().into_owned())
    };
    if with_classes {
        for f in &files {
            match class_of(f) {
                Some(c) if !class_names.contains(&c) => class_names.push(c),
                Some(_) => {}
                None => bail!(
                    "{} is directly in {}: with --cond class every image must be in a class subfolder",
                    f.display(),
                    dir.display()
                ),
            }
        }
        class_names.sort();
    }
    let all_captions = super::captions::read(dir, &files)?;
    let mut captions = Vec::new();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut bad = Vec::new();
    for (k, f) in files.iter().enumerate() {
        match read_image(f) {
            Ok(img) if img.width() > 0 && img.height() > 0 => {
                pixels.extend(image_to_chw(&img, shape.size, shape.channels));
                if let Some(c) = &all_captions {
                    captions.push(c[k].clone());
                }
                if with_classes {
                    let c = class_of(f).expect("checked above");
                    labels.push(
                        class_names
                            .iter()
                            .position(|n| *n == c)
                            .expect("known class"),
                    );
                }
            }
            Ok(_) => bad.push(format!("{}: an empty image", f.display())),
            Err(e) => bad.push(format!("{}: {e}", f.display())),
        }
    }
    if !bad.is_empty() {
        eprintln!(
            "warning: skipped {} unreadable image file(s) in {}, first: {}",
            bad.len(),
            dir.display(),
            bad[0]
        );
    }
    if pixels.is_empty() {
        bail!(
            "{} holds no readable image: {} file(s) could not be read or decoded, first: {}",
            dir.display(),
            bad.len(),
            bad[0]
        );
    }
    Ok(Dataset {
        pixels,
        labels: with_classes.then_some(labels),
        class_names,
        captions: all_captions.map(|_| captions),
        channels: shape.channels,
        size: shape.size,
        source: dir.display().to_string(),
    })
}

/// The most memory one image may take once decoded (256 MiB: a 8192 x 8192 RGBA picture),
/// so that a small file whose header claims a huge picture is refused instead of allocated.
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

/// Reads and decodes one image file, sniffing its format from its bytes. The error says in
/// words what is wrong (it cannot be read, it is not an image, or its header claims a
/// picture over [`MAX_DECODED_BYTES`]); the caller names the file.
pub fn read_image(path: &Path) -> std::result::Result<DynamicImage, String> {
    let open = || {
        image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| format!("cannot read it: {}", io_reason(&e)))
    };
    let (w, h) = open()?
        .into_dimensions()
        .map_err(|e| format!("not a decodable image: {e}"))?;
    // Up to 16-bit RGBA: 8 bytes a pixel.
    if u64::from(w) * u64::from(h) * 8 > MAX_DECODED_BYTES {
        return Err(format!(
            "its header claims {w}x{h} pixels, more than diffuse decodes ({} MiB at most)",
            MAX_DECODED_BYTES >> 20
        ));
    }
    let mut reader = open()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| format!("not a decodable image: {e}"))
}
