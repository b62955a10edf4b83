//! Plots as PNGs, drawn directly into pixels with a tiny built-in 3x5 bitmap font: the loss
//! curve of a training run, and line charts such as sample quality against sampling steps.

use crate::imageio::save_image;
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
        '+' => [0, 2, 7, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        ':' => [0, 2, 0, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        'a' => [0, 3, 5, 5, 3],
        'b' => [4, 6, 5, 5, 6],
        'c' => [0, 3, 4, 4, 3],
        'd' => [1, 3, 5, 5, 3],
        'e' => [0, 7, 7, 4, 7],
        'f' => [1, 2, 7, 2, 2],
        'g' => [0, 3, 5, 3, 6],
        'h' => [4, 6, 5, 5, 5],
        'i' => [2, 0, 2, 2, 2],
        'j' => [1, 0, 1, 5, 2],
        'k' => [4, 5, 6, 5, 5],
        'l' => [6, 2, 2, 2, 7],
        'm' => [0, 7, 7, 5, 5],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 2, 5, 5, 2],
        'p' => [0, 6, 5, 6, 4],
        'q' => [0, 3, 5, 3, 1],
        'r' => [0, 5, 6, 4, 4],
        's' => [0, 3, 6, 1, 6],
        't' => [2, 7, 2, 2, 1],
        'u' => [0, 5, 5, 5, 3],
        'v' => [0, 5, 5, 5, 2],
        'w' => [0, 5, 5, 7, 7],
        'x' => [0, 5, 2, 2, 5],
        'y' => [0, 5, 3, 1, 6],
        'z' => [0, 7, 1, 2, 7],
        c if c.is_ascii_uppercase() => glyph(c.to_ascii_lowercase()),
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

/// Draws a loss curve (`(step, loss)` pairs) into `path`: raw loss (light) and its moving
/// average (dark) against the step, loss on a log axis.
pub fn save_loss_curve(metrics: &[(f64, f64)], path: &Path) -> Result<()> {
    let (w, h) = (720u32, 400u32);
    let (l, r, t, b) = (70.0, 20.0, 20.0, 40.0);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = metrics
        .iter()
        .filter(|m| m.1 > 0.0 && m.1.is_finite())
        .map(|m| (m.0, m.1.log10()))
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
    save_image(&img, path)
}

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
}

/// Distinct line colours, in order.
pub const PALETTE: [[u8; 3]; 12] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
    [127, 127, 127],
    [188, 189, 34],
    [0, 0, 0],
    [0, 90, 110],
];

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{}", v.round())
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// A line chart of `series` with a log-scaled x axis (ticks at the x values present) and a
/// linear y axis, with a legend and axis titles, into `path`.
pub fn save_line_chart(series: &[Series], x_title: &str, y_title: &str, path: &Path) -> Result<()> {
    let (w, h) = (760u32, 460u32);
    let (l, r, t, b) = (70.0, 190.0, 20.0, 60.0);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (pw, ph) = (w as f64 - l - r, h as f64 - t - b);
    let black = Rgb([0, 0, 0]);
    line(&mut img, (l, t), (l, t + ph), black);
    line(&mut img, (l, t + ph), (l + pw, t + ph), black);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0 > 0.0 && p.1.is_finite())
        .collect();
    if !pts.is_empty() {
        let xmin = pts.iter().map(|p| p.0.ln()).fold(f64::INFINITY, f64::min);
        let xmax = pts
            .iter()
            .map(|p| p.0.ln())
            .fold(f64::NEG_INFINITY, f64::max)
            .max(xmin + 1e-9);
        let ymin = pts
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .min(0.0);
        let ymax = pts
            .iter()
            .map(|p| p.1)
            .fold(f64::NEG_INFINITY, f64::max)
            .max(ymin + 1e-9)
            * 1.05;
        let px = |x: f64| l + (x.ln() - xmin) / (xmax - xmin) * pw;
        let py = |y: f64| t + (ymax - y) / (ymax - ymin) * ph;
        let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        // Every x gets a tick; a label that would run into the one before it is left out.
        let mut free_from = i64::MIN;
        for x in xs {
            let xx = px(x);
            line(&mut img, (xx, t + ph), (xx, t + ph + 5.0), black);
            let label = fmt_step(x);
            let start = xx as i64 - 8;
            if start >= free_from {
                text(&mut img, start, (t + ph + 10.0) as i64, &label, 2);
                free_from = start + 8 * label.chars().count() as i64 + 6;
            }
        }
        for i in 0..=5 {
            let y = ymin + (ymax - ymin) * i as f64 / 5.0;
            let yy = py(y);
            line(&mut img, (l - 5.0, yy), (l, yy), black);
            text(&mut img, 4, yy as i64 - 5, &fmt_tick(y), 2);
        }
        for (k, s) in series.iter().enumerate() {
            let c = Rgb(s.color);
            for w2 in s.points.windows(2) {
                for d in [-0.5, 0.0, 0.5] {
                    line(
                        &mut img,
                        (px(w2[0].0), py(w2[0].1) + d),
                        (px(w2[1].0), py(w2[1].1) + d),
                        c,
                    );
                }
            }
            for p in &s.points {
                let (cx, cy) = (px(p.0), py(p.1));
                for dy in -2..=2 {
                    line(
                        &mut img,
                        (cx - 2.0, cy + dy as f64),
                        (cx + 2.0, cy + dy as f64),
                        c,
                    );
                }
            }
            let ly = t + 10.0 + 18.0 * k as f64;
            let lx = l + pw + 15.0;
            for dy in 0..8 {
                line(
                    &mut img,
                    (lx, ly + dy as f64),
                    (lx + 14.0, ly + dy as f64),
                    c,
                );
            }
            text(&mut img, (lx + 20.0) as i64, ly as i64 - 1, &s.name, 2);
        }
    }
    text(
        &mut img,
        (l + pw / 2.0 - 40.0) as i64,
        (h as f64 - 22.0) as i64,
        x_title,
        2,
    );
    text(&mut img, 4, 4, y_title, 2);
    save_image(&img, path)
}
