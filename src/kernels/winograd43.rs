//! 3×3 stride-1 convolutions in f32 by Winograd's F(4×4, 3×3): 36 multiplications per 4×4
//! output tile and channel pair instead of 144, so the matrix products shrink 4 times (1.78
//! times against F(2×2, 3×3) in [`super::winograd`]). Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", CVPR 2016, section 4.2, with the interpolation points
//! 0, ±1, ±2 and ∞:
//!
//! ```text
//! Bᵀ = [4  0 -5  0  1  0]    G = [ 1/4     0     0 ]    Aᵀ = [1  1  1  1  1  0]
//!      [0 -4 -4  1  1  0]        [-1/6  -1/6  -1/6 ]         [0  1 -1  2 -2  0]
//!      [0  4 -4 -1  1  0]        [-1/6   1/6  -1/6 ]         [0  1  1  4  4  0]
//!      [0 -2 -1  2  1  0]        [1/24  1/12   1/6 ]         [0  1 -1  8 -8  1]
//!      [0  2 -1 -2  1  0]        [1/24 -1/12   1/6 ]
//!      [0  4  0 -5  0  1]        [ 0      0      1 ]
//! ```
//!
//! Per tile, with `d` the 6×6 input patch and `g` the kernel, `Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`;
//! summed over input channels each of the 36 positions is one matrix product over the tiles
//! of a group of images, as in F(2×2, 3×3).
//!
//! The transforms are laid out so that their vectors are full whatever the image size: the
//! input's rows are first transformed along the row (`d B`) and stored by the tile row and
//! patch row they feed (rows shared by two tile rows are stored twice), so that `Bᵀ(d B)` then
//! runs down whole contiguous runs of tiles, across all the images of a group. The output's
//! `Aᵀ M` likewise runs across all tiles of an image before `(Aᵀ M) A` runs along the rows.
//!
//! The larger interpolation points cost accuracy against F(2×2, 3×3): the results stay within
//! about 1e-5 of the largest output in the tests, still far inside the 1e-4 relative the
//! project holds its kernels to. Only the forward pass (and through it the input gradient)
//! takes this path; the weight gradient keeps F(2×2, 3×3).

use super::conv2d::{ConvGeometry, scratch};
use super::winograd::{Tiling, by_groups, check_forward, each_chunk, position_products};
use std::cell::RefCell;

/// Positions of a transformed 6×6 tile.
const XI: usize = 36;

/// Tiles per matrix product: images are grouped until their tiles reach this many columns.
/// Small groups keep a group's 36 transformed planes in the level-2 cache: on the benchmark
/// U-Net's forward pass (2-core Xeon), 16, 32, 64, 128 and 256 tiles gave 99, 105, 108, 103
/// and 90 images/s.
const TARGET_TILES: usize = 64;

/// Floats of one padded row of the input transform, in whole quads and one more.
fn row_len(tl: &Tiling) -> usize {
    4 * tl.tw + 4
}

/// `U_ξ[co, ci] = (G g Gᵀ)[i][j]` for every kernel `g = w[co, ci]`, at `ξ = 6j + i` (see
/// [`transform_columns`]), laid out [36][C_out][C_in]. The taps are first laid out
/// [9][C_out·C_in] so that the transform vectorises over kernels; the six columns j run on the
/// cores, each writing its six positions.
fn transform_weights(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let plane = c_out * c_in;
    let mut taps = vec![0.0f32; 9 * plane];
    for (pair, g) in w.chunks_exact(9).enumerate() {
        for (ab, &v) in g.iter().enumerate() {
            taps[ab * plane + pair] = v;
        }
    }
    let mut u = vec![0.0f32; XI * plane];
    each_chunk(&mut u, 6 * plane, true, |j, uj| {
        // Row j of G: G[j][c] = (G e_c)[j].
        let gj = std::array::from_fn(|c| {
            let mut e = [0.0f32; 3];
            e[c] = 1.0;
            g_times(e)[j]
        });
        transform_weight_column(&taps, gj, uj);
    });
    u
}

/// `G v` for the three values `v` of one kernel column (or `v Gᵀ` of one row).
#[inline(always)]
fn g_times([a, b, c]: [f32; 3]) -> [f32; 6] {
    let (s, t) = (a + c, a / 24.0 + c / 6.0);
    [
        a / 4.0,
        -(s + b) / 6.0,
        -(s - b) / 6.0,
        t + b / 12.0,
        t - b / 12.0,
        c,
    ]
}

super::wide_fn! {
    /// Column j of `G g Gᵀ` for every kernel, with `gj` row j of G: `h = g·gjᵀ` (three
    /// values), then `U[i][j] = (G h)[i]` to `u[i·len + pair]`.
    fn transform_weight_column(taps: &[f32], gj: [f32; 3], u: &mut [f32]) {
        let len = u.len() / 6;
        let t = |ab: usize| &taps[ab * len..(ab + 1) * len];
        let (t0, t1, t2, t3, t4, t5, t6, t7, t8) =
            (t(0), t(1), t(2), t(3), t(4), t(5), t(6), t(7), t(8));
        let [o0, o1, o2, o3, o4, o5] = six_rows(u, len, 0, len);
        for p in 0..len {
            let h0 = t0[p] * gj[0] + t1[p] * gj[1] + t2[p] * gj[2];
            let h1 = t3[p] * gj[0] + t4[p] * gj[1] + t5[p] * gj[2];
            let h2 = t6[p] * gj[0] + t7[p] * gj[1] + t8[p] * gj[2];
            let v = g_times([h0, h1, h2]);
            o0[p] = v[0];
            o1[p] = v[1];
            o2[p] = v[2];
            o3[p] = v[3];
            o4[p] = v[4];
            o5[p] = v[5];
        }
    }
}

/// `(Bᵀ d)` for the six values `d` of one patch column (or, the same, `d B` for one patch
/// row), grouped as in Lavin & Gray's implementation notes.
#[inline(always)]
fn bt(d: [f32; 6]) -> [f32; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let (p, m) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
    let (q, n) = (d4 - d2, 2.0 * (d3 - d1));
    [
        4.0 * d0 - 5.0 * d2 + d4,
        p + m,
        p - m,
        q + n,
        q - n,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ m` for the six values `m` of one transformed column (or `m A` of one row).
#[inline(always)]
fn at(m: [f32; 6]) -> [f32; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (s1, d1) = (m1 + m2, m1 - m2);
    let (s2, d2) = (m3 + m4, m3 - m4);
    [
        m0 + s1 + s2,
        d1 + 2.0 * d2,
        s1 + 4.0 * s2,
        d1 + 8.0 * d2 + m5,
    ]
}

thread_local! {
    /// A group's transformed operands and products.
    static GROUP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One channel's rows transformed along the row, for a whole group of images.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The six rows `rows[6·k .. 6·k + 6]` of `n` floats of `buf`, from `from` on in each.
#[inline(always)]
fn six_rows(buf: &mut [f32], n: usize, from: usize, len: usize) -> [&mut [f32]; 6] {
    let (r0, rest) = buf.split_at_mut(n);
    let (r1, rest) = rest.split_at_mut(n);
    let (r2, rest) = rest.split_at_mut(n);
    let (r3, rest) = rest.split_at_mut(n);
    let (r4, rest) = rest.split_at_mut(n);
    let r5 = &mut rest[..n];
    let span = from..from + len;
    [
        &mut r0[span.clone()],
        &mut r1[span.clone()],
        &mut r2[span.clone()],
        &mut r3[span.clone()],
        &mut r4[span.clone()],
        &mut r5[span],
    ]
}

super::wide_fn! {
    /// `d B` for every padded row of one image plane `x` [H, W] (padding `pad`), stored in
    /// `h[(6k + j)·n + base + tile]` for column j of the transformed row and patch row k of
    /// the tile it feeds (`n` floats per row of `h`); `row` is staging for one padded row
    /// ([`row_len`] floats).
    fn transform_rows(
        x: &[f32],
        w: usize,
        pad: [usize; 2],
        tl: Tiling,
        h: &mut [f32],
        n: usize,
        base: usize,
        row: &mut [f32],
    ) {
        let (tw, rows) = (tl.tw, x.len() / w);
        for r in 0..tl.hp {
            // Patch row k of tile row ty is padded row 4·ty + k: rows 4·ty and 4·ty + 1 are
            // also rows 4 and 5 of tile row ty - 1.
            let (k0, ty0) = (r % 4, r / 4);
            let first = (ty0 < tl.th).then_some((k0, ty0));
            let second = (k0 < 2 && (1..=tl.th).contains(&ty0)).then(|| (k0 + 4, ty0 - 1));
            // The padded row, in quads: tile t reads quads t and t + 1.
            row.fill(0.0);
            if let Some(y) = r.checked_sub(pad[0]).filter(|&y| y < rows) {
                let data = &x[y * w..(y + 1) * w];
                let len = data.len().min(row.len() - pad[1]);
                row[pad[1]..pad[1] + len].copy_from_slice(&data[..len]);
            }
            let quads: &[[f32; 4]] = row.as_chunks::<4>().0;
            let block = |(k, ty): (usize, usize)| (6 * k * n, base + ty * tw);
            match (first.map(block), second.map(block)) {
                (Some((k1, at1)), Some((k2, at2))) => {
                    // k2 = k1 + 24n: both blocks of six rows at once.
                    let (lo, hi) = h.split_at_mut(k2);
                    let d = six_rows(&mut lo[k1..], n, at1, tw);
                    let e = six_rows(hi, n, at2, tw);
                    for t in 0..tw {
                        let (a, b) = (quads[t], quads[t + 1]);
                        let o = bt([a[0], a[1], a[2], a[3], b[0], b[1]]);
                        for j in 0..6 {
                            d[j][t] = o[j];
                            e[j][t] = o[j];
                        }
                    }
                }
                (Some((k, at)), None) | (None, Some((k, at))) => {
                    let d = six_rows(&mut h[k..], n, at, tw);
                    for t in 0..tw {
                        let (a, b) = (quads[t], quads[t + 1]);
                        let o = bt([a[0], a[1], a[2], a[3], b[0], b[1]]);
                        for j in 0..6 {
                            d[j][t] = o[j];
                        }
                    }
                }
                (None, None) => {}
            }
        }
    }
}

super::wide_fn! {
    /// `Bᵀ (d B)` down the patch rows, for the `n` tiles of a group at once: reads `h` as
    /// [`transform_rows`] left it and writes `V[i][j]` to `v[(6j + i)·n + tile]`.
    fn transform_columns(h: &[f32], n: usize, v: &mut [f32]) {
        for (j, vj) in v.chunks_exact_mut(6 * n).enumerate() {
            let s = |k: usize| &h[(6 * k + j) * n..][..n];
            let (s0, s1, s2, s3, s4, s5) = (s(0), s(1), s(2), s(3), s(4), s(5));
            let d = six_rows(vj, n, 0, n);
            for t in 0..n {
                let o = bt([s0[t], s1[t], s2[t], s3[t], s4[t], s5[t]]);
                for i in 0..6 {
                    d[i][t] = o[i];
                }
            }
        }
    }
}

super::wide_fn! {
    /// `Y = Aᵀ M A` (+ bias) for the `n` tiles of one output channel across a group, reading
    /// `M[i][j]` at `m[(6j + i)·stride + tile]` and writing output pixel (l, c) of each tile to
    /// `o[(4l + c)·n + tile]`; `a` is staging space of `24·n` floats.
    fn transform_product(m: &[f32], stride: usize, n: usize, bias: f32, o: &mut [f32], a: &mut [f32]) {
        // Aᵀ down the columns: (Aᵀ M)[l][j] for every tile, at a[(4j + l)·n + tile].
        for (j, aj) in a.chunks_exact_mut(4 * n).enumerate() {
            let s = |i: usize| &m[(6 * j + i) * stride..][..n];
            let (s0, s1, s2, s3, s4, s5) = (s(0), s(1), s(2), s(3), s(4), s(5));
            let (a0, rest) = aj.split_at_mut(n);
            let (a1, rest) = rest.split_at_mut(n);
            let (a2, a3) = rest.split_at_mut(n);
            for t in 0..n {
                let v = at([s0[t], s1[t], s2[t], s3[t], s4[t], s5[t]]);
                a0[t] = v[0];
                a1[t] = v[1];
                a2[t] = v[2];
                a3[t] = v[3];
            }
        }
        // Then along the rows: row l of (Aᵀ M) A.
        for (l, ol) in o.chunks_exact_mut(4 * n).enumerate() {
            let s = |j: usize| &a[(4 * j + l) * n..][..n];
            let (s0, s1, s2, s3, s4, s5) = (s(0), s(1), s(2), s(3), s(4), s(5));
            let (o0, rest) = ol.split_at_mut(n);
            let (o1, rest) = rest.split_at_mut(n);
            let (o2, o3) = rest.split_at_mut(n);
            for t in 0..n {
                let v = at([s0[t], s1[t], s2[t], s3[t], s4[t], s5[t]]);
                o0[t] = v[0] + bias;
                o1[t] = v[1] + bias;
                o2[t] = v[2] + bias;
                o3[t] = v[3] + bias;
            }
        }
    }
}

super::wide_fn! {
    /// Places the 4×4 tiles of one output plane `y` [OH, OW] from `o[(4l + c)·stride + base +
    /// tile]` (as [`transform_product`] left them), cutting the tiles at the plane's edges.
    fn place_tiles(o: &[f32], stride: usize, base: usize, tl: Tiling, y: &mut [f32]) {
        let (tw, ow) = (tl.tw, tl.ow);
        for (yr, row) in y.chunks_exact_mut(ow).enumerate() {
            let (ty, l) = (yr / 4, yr % 4);
            let s = |c: usize| &o[(4 * l + c) * stride + base + ty * tw..][..tw];
            let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
            let (quads, rest) = row.as_chunks_mut::<4>();
            for (t, q) in quads.iter_mut().enumerate() {
                *q = [s0[t], s1[t], s2[t], s3[t]];
            }
            let t = quads.len();
            for (c, v) in rest.iter_mut().enumerate() {
                *v = [s0, s1, s2, s3][c][t];
            }
        }
    }
}

/// Forward convolution `y = conv(x, w) + bias` by F(4×4, 3×3), for a 3×3 stride-1 geometry
/// ([`super::winograd::applies`]). Returns `y` [B, C_out, OH, OW]; the same bits whatever the
/// number of threads.
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Vec<f32> {
    check_forward(x, w, g);
    let tl = Tiling::new(g, 4);
    let out_plane = tl.oh * tl.ow;
    let u = transform_weights(w, g.c_out, g.c_in);
    let in_plane = g.h * g.w;
    by_groups(g, tl, TARGET_TILES, |b0, nb, inner, yg| {
        let n = nb * tl.tiles();
        scratch(
            &GROUP,
            (g.c_in + g.c_out) * XI * n + g.c_out * 16 * n,
            |buf| {
                // V [C_in][36][n], M [36][C_out][n], O [C_out][16][n].
                let (v, rest) = buf.split_at_mut(g.c_in * XI * n);
                let (m, o) = rest.split_at_mut(g.c_out * XI * n);
                each_chunk(v, XI * n, inner, |ci, vc| {
                    scratch(&ROWS, XI * n + row_len(&tl), |rows| {
                        let (h, row) = rows.split_at_mut(XI * n);
                        for b in 0..nb {
                            let plane = &x[((b0 + b) * g.c_in + ci) * in_plane..][..in_plane];
                            transform_rows(plane, g.w, g.pad, tl, h, n, b * tl.tiles(), row);
                        }
                        transform_columns(h, n, vc);
                    })
                });
                position_products(&u, v, n, m, g, inner);
                let m = &*m;
                each_chunk(o, 16 * n, inner, |co, oc| {
                    let bv = bias.map_or(0.0, |bias| bias[co]);
                    scratch(&ROWS, 24 * n, |a| {
                        transform_product(&m[co * n..], g.c_out * n, n, bv, oc, a)
                    });
                });
                let o = &*o;
                each_chunk(yg, out_plane, inner, |p, yp| {
                    let (b, co) = (p / g.c_out, p % g.c_out);
                    place_tiles(&o[co * 16 * n..], n, b * tl.tiles(), tl, yp);
                });
            },
        );
    })
}
