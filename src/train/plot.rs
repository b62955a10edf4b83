//! The loss curve of a run as a PNG: raw loss (light) and its moving average (dark) against
//! the step, loss on a log axis, with tick values drawn in a tiny built-in bitmap font.

use super::MetricLine;
use crate::imageio::save_png;
use anyhow::Result;
use image::{Rgb, RgbImage};
use std::path::Path;

/// 3x5 glyphs for the characters tick labels need.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        'k' => [4, 5, 6, 5, 5],
        _ => [0; 5],
    }
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64) {
    for (k, c) in s.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = x + (k as i64 * 4 + col) * scale + dx;
                            let py = y + row as i64 * scale + dy;
                            if px >= 0
                                && py >= 0
                                && (px as u32) < img.width()
                                && (py as u32) < img.height()
                            {
                                img.put_pixel(px as u32, py as u32, Rgb([0, 0, 0]));
                            }
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let f = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * f, y0 + (y1 - y0) * f);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

fn fmt_step(s: f64) -> String {
    if s >= 10000.0 {
        format!("{}k", (s / 1000.0).round())
    } else {
        format!("{}", s.round())
    }
}

/// Draws the loss curve of `metrics` into `path`.
pub fn save_loss_curve(metrics: &[MetricLine], path: &Path) -> Result<()> {
    let (w, h) = (720u32, 400u32);
    let (l, r, t, b) = (70.0, 20.0, 20.0, 40.0);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = metrics
        .iter()
        .filter(|m| m.loss > 0.0 && m.loss.is_finite())
        .map(|m| (m.step as f64, m.loss.log10()))
        .collect();
    let (pw, ph) = (w as f64 - l - r, h as f64 - t - b);
    line(&mut img, (l, t), (l, t + ph), Rgb([0, 0, 0]));
    line(&mut img, (l, t + ph), (l + pw, t + ph), Rgb([0, 0, 0]));
    if pts.len() >= 2 {
        let xmax = pts.last().unwrap().0.max(1.0);
        let xmin = pts[0].0.min(xmax - 1.0);
        let ymin = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let ymax = pts
            .iter()
            .map(|p| p.1)
            .fold(f64::NEG_INFINITY, f64::max)
            .max(ymin + 1e-3);
        let px = |x: f64| l + (x - xmin) / (xmax - xmin) * pw;
        let py = |y: f64| t + (ymax - y) / (ymax - ymin) * ph;
        for w2 in pts.windows(2) {
            line(
                &mut img,
                (px(w2[0].0), py(w2[0].1)),
                (px(w2[1].0), py(w2[1].1)),
                Rgb([180, 200, 240]),
            );
        }
        let k = (pts.len() / 50).max(1);
        let smooth: Vec<(f64, f64)> = (0..pts.len())
            .map(|i| {
                let lo = i.saturating_sub(k);
                let hi = (i + k + 1).min(pts.len());
                let m = pts[lo..hi].iter().map(|p| p.1).sum::<f64>() / (hi - lo) as f64;
                (pts[i].0, m)
            })
            .collect();
        for w2 in smooth.windows(2) {
            line(
                &mut img,
                (px(w2[0].0), py(w2[0].1)),
                (px(w2[1].0), py(w2[1].1)),
                Rgb([20, 60, 160]),
            );
        }
        for i in 0..=4 {
            let y = ymin + (ymax - ymin) * i as f64 / 4.0;
            let yy = py(y);
            line(&mut img, (l - 5.0, yy), (l, yy), Rgb([0, 0, 0]));
            text(
                &mut img,
                4,
                yy as i64 - 5,
                &format!("{:.3}", 10f64.powf(y)),
                2,
            );
            let x = xmin + (xmax - xmin) * i as f64 / 4.0;
            let xx = px(x);
            line(&mut img, (xx, t + ph), (xx, t + ph + 5.0), Rgb([0, 0, 0]));
            text(
                &mut img,
                xx as i64 - 10,
                (t + ph + 10.0) as i64,
                &fmt_step(x),
                2,
            );
        }
    }
    save_png(&img, path)
}
