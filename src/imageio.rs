//! Images in and out: model-space tensors (`[-1, 1]`, NCHW) to PNG grids and strips, and
//! image files to tensors.

use crate::data::folder::{chw_to_image, image_to_chw, read_image};
use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use image::{DynamicImage, ImageFormat, RgbImage};
use std::path::Path;

/// Host copy of a batch: `[N, C, H, W]` shape and pixels as bytes (`(x + 1) * 127.5`,
/// clamped and rounded).
#[derive(Clone, Debug)]
pub struct ImageBatch {
    pub shape: [usize; 4],
    pub pixels: Vec<u8>,
}

impl ImageBatch {
    /// Converts a model-space tensor to bytes.
    pub fn from_tensor(x: Tensor<4>) -> Self {
        let shape = x.dims();
        let v = x
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 tensor");
        let pixels = v
            .iter()
            .map(|x| ((x + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
            .collect();
        Self { shape, pixels }
    }

    /// Image `i` as a picture.
    pub fn image(&self, i: usize) -> DynamicImage {
        let [_, c, h, _] = self.shape;
        let l = c * h * h;
        chw_to_image(&self.pixels[i * l..(i + 1) * l], c, h)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }
}

/// Tiles images into a grid of `cols` columns with a 2-pixel white border.
pub fn grid(images: &[DynamicImage], cols: usize) -> RgbImage {
    let cols = cols.max(1).min(images.len().max(1));
    let rows = images.len().div_ceil(cols).max(1);
    let (w, h) = images
        .first()
        .map(|i| (i.width(), i.height()))
        .unwrap_or((1, 1));
    let pad = 2u32;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (w + pad) + pad,
        rows as u32 * (h + pad) + pad,
        image::Rgb([255, 255, 255]),
    );
    for (k, img) in images.iter().enumerate() {
        let (r, c) = ((k / cols) as u32, (k % cols) as u32);
        image::imageops::replace(
            &mut out,
            &img.to_rgb8(),
            (pad + c * (w + pad)) as i64,
            (pad + r * (h + pad)) as i64,
        );
    }
    out
}

/// Scales an image up by an integer factor with nearest-neighbour sampling, so small images
/// stay crisp when viewed.
pub fn upscale(img: &RgbImage, factor: u32) -> RgbImage {
    if factor <= 1 {
        return img.clone();
    }
    image::imageops::resize(
        img,
        img.width() * factor,
        img.height() * factor,
        image::imageops::FilterType::Nearest,
    )
}

/// A display factor that brings small images to at least about 64 pixels.
pub fn display_factor(size: usize) -> u32 {
    (64 / size.max(1)).clamp(1, 8) as u32
}

/// An RGB image encoded as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    encode(img, ImageFormat::Png)
}

fn encode(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, format)?;
    Ok(buf.into_inner())
}

/// The format an output image path asks for by its extension: `.png` (also for a path
/// without one), `.jpg`/`.jpeg`, `.webp` (lossless) or `.bmp`. Anything else, or a folder, is
/// an error naming the path, so a run can refuse it before any work.
pub fn output_format(path: &Path) -> Result<ImageFormat> {
    if path.is_dir() {
        bail!(
            "{} is a folder: give an image file name (e.g. {}/samples.png)",
            path.display(),
            path.display()
        );
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    Ok(match ext.as_deref() {
        None | Some("png") => ImageFormat::Png,
        Some("jpg" | "jpeg") => ImageFormat::Jpeg,
        Some("webp") => ImageFormat::WebP,
        Some("bmp") => ImageFormat::Bmp,
        Some(other) => bail!(
            "{}: diffuse writes .png, .jpg, .webp or .bmp images, not .{other}",
            path.display()
        ),
    })
}

/// Saves an RGB image atomically in the format its extension names ([`output_format`]),
/// naming the path in errors.
pub fn save_image(img: &RgbImage, path: &Path) -> Result<()> {
    let format = output_format(path)?;
    let bytes = encode(img, format).with_context(|| format!("cannot encode {}", path.display()))?;
    crate::files::write_atomic(path, &bytes)
}

/// Loads an image file as a `[1, C, S, S]` model-space tensor (resized and centre-cropped).
pub fn load_image(path: &Path, size: usize, channels: usize, device: &Device) -> Result<Tensor<4>> {
    let img = read_image(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let chw = image_to_chw(&img, size, channels);
    let v: Vec<f32> = chw.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_data(
        TensorData::new(v, [1, channels, size, size]),
        device,
    ))
}
