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
//! The weight gradient is the same bilinear form read the other way:
//! `dW = Gᵀ [Σ_tiles (A dy Aᵀ) ⊙ (Bᵀ d B)] G`, 36 products that sum over tiles.
//!
//! Each transform works on one image plane in two passes, and both run in whole vectors
//! whatever the image width: first down the columns, combining the six (or four) rows of a
//! tile row elementwise across the padded width; then along the rows, with the tile rows of
//! that result stored end to end so that one loop covers every tile of the plane. The input
//! transform's tiles overlap by two columns, so each row's last tile, whose last columns lie
//! past the row, is redone from two extra columns. The output transform runs the other way
//! round (`M A` over all tiles, then `Aᵀ` down the columns straight into the output rows).
//!
//! The larger interpolation points cost accuracy against F(2×2, 3×3): the results stay within
//! about 1e-5 of the largest output (forward) and 3e-6 (weight gradient) in the tests, still
//! far inside the 1e-4 relative the project holds its kernels to.

use super::conv2d::{ConvGeometry, scratch};
use super::winograd::{
    Positions, Tiling, by_groups, check_forward, check_weights, each_chunk, position_products,
    weight_grad,
};
use std::borrow::Cow;
use std::cell::RefCell;

/// Positions of a transformed 6×6 tile.
const XI: usize = 36;

/// Tiles per matrix product: images are grouped until their tiles reach this many columns.
/// Small groups keep a group's 36 transformed planes in the level-2 cache: on the benchmark
/// U-Net's forward pass (2-core Xeon), 16, 32, 64, 128 and 256 tiles gave 99, 105, 108, 103
/// and 90 images/s.
const TARGET_TILES: usize = 64;

/// `U_ξ[co, ci] = (G g Gᵀ)[i][j]` for every kernel `g = w[co, ci]`, at `ξ = 6j + i` (see
/// [`transform_plane`]), laid out [36][C_out][C_in]. The taps are first laid out
/// [9][C_out·C_in] in `taps` so that the transform vectorises over kernels; the six columns j
/// run on the cores, each writing its six positions. Both buffers are overwritten whole.
fn transform_weights(w: &[f32], plane: usize, taps: &mut [f32], u: &mut [f32]) {
    for (pair, g) in w.chunks_exact(9).enumerate() {
        for (ab, &v) in g.iter().enumerate() {
            taps[ab * plane + pair] = v;
        }
    }
    let taps = &*taps;
    each_chunk(u, 6 * plane, true, |j, uj| {
        // Row j of G: G[j][c] = (G e_c)[j].
        let gj = std::array::from_fn(|c| {
            let mut e = [0.0f32; 3];
            e[c] = 1.0;
            g_times(e)[j]
        });
        transform_weight_column(taps, gj, uj);
    });
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
        let mut o = six_rows(u, len, 0, len);
        for p in 0..len {
            let h0 = t0[p] * gj[0] + t1[p] * gj[1] + t2[p] * gj[2];
            let h1 = t3[p] * gj[0] + t4[p] * gj[1] + t5[p] * gj[2];
            let h2 = t6[p] * gj[0] + t7[p] * gj[1] + t8[p] * gj[2];
            let v = g_times([h0, h1, h2]);
            put(&mut o, p, v);
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
    /// The transformed weights of a forward pass, and their taps regrouped.
    static WEIGHTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A group's transformed operands and products.
    static GROUP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One channel's rows transformed along the row, for a whole group of images.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `len` floats from `from` on in each of six rows of `buf` that start `stride` floats apart.
#[inline(always)]
fn six_rows(buf: &mut [f32], stride: usize, from: usize, len: usize) -> [&mut [f32]; 6] {
    let (r0, rest) = buf.split_at_mut(stride);
    let (r1, rest) = rest.split_at_mut(stride);
    let (r2, rest) = rest.split_at_mut(stride);
    let (r3, rest) = rest.split_at_mut(stride);
    let (r4, r5) = rest.split_at_mut(stride);
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

/// `rows[r][c] = v[r]` for the six rows.
#[inline(always)]
fn put(rows: &mut [&mut [f32]; 6], c: usize, v: [f32; 6]) {
    for (row, v) in rows.iter_mut().zip(v) {
        row[c] = v;
    }
}

/// `rows[r][c] = f(here[c], next[c])[r]` for the tiles `c` in `0..tiles`: `f` reads tile c's
/// four values and, where it needs them, the first two of `next[c]` (the other two are not
/// passed). Sixteen tiles at a time are split into one array per value ([`split_tiles`]) and
/// mapped lane by lane, so that the compiler makes whole vectors: the last sixteen overlap the
/// ones before them, and a plane of fewer tiles goes through zero-filled arrays, so no tile
/// goes alone. Written tile by tile into the six rows, the loop had stayed scalar and checked
/// every index (a third of a training step's Winograd transforms on the benchmark U-Net,
/// `perf annotate`).
#[inline(always)]
fn put_tiles(
    here: &[[f32; 4]],
    next: &[[f32; 4]],
    tiles: usize,
    rows: [&mut [f32]; 6],
    f: impl Fn([f32; 4], [f32; 4]) -> [f32; 6] + Copy,
) {
    let (here, next) = (&here[..tiles], &next[..tiles]);
    let mut rows = rows.map(|r| &mut r[..tiles]);
    if !super::wide_simd() {
        // Without AVX-512 the split goes through memory lane by lane, which cost the benchmark
        // U-Net 5% of a batch-64 training step under `DIFFUSE_SIMD=avx2`: tile by tile instead.
        for c in 0..tiles {
            put(&mut rows, c, f(here[c], next[c]));
        }
        return;
    }
    if tiles < 16 {
        let (mut a, mut b) = ([[0.0f32; 4]; 16], [[0.0f32; 4]; 16]);
        a[..tiles].copy_from_slice(here);
        b[..tiles].copy_from_slice(next);
        let out = map_tiles(&a, &b, f);
        for (row, o) in rows.iter_mut().zip(&out) {
            row.copy_from_slice(&o[..tiles]);
        }
        return;
    }
    let mut c = 0;
    while c < tiles {
        let at = c.min(tiles - 16);
        let out = map_tiles(
            here[at..at + 16].try_into().expect("16 tiles"),
            next[at..at + 16].try_into().expect("16 tiles"),
            f,
        );
        for (row, o) in rows.iter_mut().zip(&out) {
            row[at..at + 16].copy_from_slice(o);
        }
        c += 16;
    }
}

/// `f(a[k], b[k])` for sixteen tiles, as six arrays of sixteen lanes. A function rather than a
/// closure, so that it is inlined into [`wide_fn!`]'s copies with their vector features.
#[inline(always)]
fn map_tiles(
    a: &[[f32; 4]; 16],
    b: &[[f32; 4]; 16],
    f: impl Fn([f32; 4], [f32; 4]) -> [f32; 6],
) -> [[f32; 16]; 6] {
    let lanes = split_tiles(a, b);
    let mut out = [[0.0f32; 16]; 6];
    for k in 0..16 {
        let v = f(
            [lanes[0][k], lanes[1][k], lanes[2][k], lanes[3][k]],
            [lanes[4][k], lanes[5][k], 0.0, 0.0],
        );
        for (o, v) in out.iter_mut().zip(v) {
            o[k] = v;
        }
    }
    out
}

/// Sixteen tiles' values split into one array per value: `[a[k][0], a[k][1], a[k][2],
/// a[k][3], b[k][0], b[k][1]]` for k = 0..16. Called where [`super::wide_simd`] holds.
#[inline(always)]
fn split_tiles(a: &[[f32; 4]; 16], b: &[[f32; 4]; 16]) -> [[f32; 16]; 6] {
    #[cfg(target_arch = "x86_64")]
    if super::wide_simd() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { split_tiles_avx512(a, b) };
    }
    std::array::from_fn(|j| std::array::from_fn(|k| if j < 4 { a[k][j] } else { b[k][j - 4] }))
}

/// [`split_tiles`] by two-source permutes: each of the six arrays takes value j of tiles 0-7
/// from the first two vectors and of tiles 8-15 from the last two, with one blend.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_tiles_avx512(a: &[[f32; 4]; 16], b: &[[f32; 4]; 16]) -> [[f32; 16]; 6] {
    use std::arch::x86_64::*;
    let (pa, pb) = (a.as_ptr().cast::<f32>(), b.as_ptr().cast::<f32>());
    // SAFETY: `a` and `b` hold 64 floats each.
    let (here, next) = unsafe {
        (
            [0, 16, 32, 48].map(|o| _mm512_loadu_ps(pa.add(o))),
            [0, 16, 32, 48].map(|o| _mm512_loadu_ps(pb.add(o))),
        )
    };
    let mut out = [[0.0f32; 16]; 6];
    for (j, o) in out.iter_mut().enumerate() {
        let (v, j) = if j < 4 {
            (&here, j as i32)
        } else {
            (&next, j as i32 - 4)
        };
        // Value j of tiles 0-7 in lanes 0-7, and again in lanes 8-15 (for the second pair).
        let lanes: [i32; 16] = std::array::from_fn(|k| j + 4 * (k % 8) as i32);
        // SAFETY: `lanes` holds 16 i32.
        let idx = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
        let lo = _mm512_permutex2var_ps(v[0], idx, v[1]);
        let hi = _mm512_permutex2var_ps(v[2], idx, v[3]);
        // SAFETY: `o` holds 16 floats.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_mask_blend_ps(0xFF00, lo, hi)) };
    }
    out
}

/// `len` floats from `from` on in each of the six rows `i, i + 6, …, i + 30` of `buf` (rows
/// of `n` floats): position `ξ = 6j + i` for j = 0..6.
#[inline(always)]
fn column_rows(buf: &mut [f32], n: usize, i: usize, from: usize, len: usize) -> [&mut [f32]; 6] {
    six_rows(&mut buf[i * n..], 6 * n, from, len)
}

/// `dst[r][c] = f(src[0][c], …, src[I - 1][c])[r]` for the columns `c` in `0..cols` (`dst` may
/// have fewer than `O` rows: the results past them are dropped). The columns go 16, then 4,
/// then 1 at a time through fixed-size arrays, so that the compiler makes whole vectors.
#[inline(always)]
fn map_columns<const I: usize, const O: usize>(
    src: &[&[f32]; I],
    cols: usize,
    dst: &mut [&mut [f32]],
    f: impl Fn([f32; I]) -> [f32; O] + Copy,
) {
    let mut at = 0;
    while at + 16 <= cols {
        map_lanes::<16, I, O>(src, at, dst, f);
        at += 16;
    }
    while at + 4 <= cols {
        map_lanes::<4, I, O>(src, at, dst, f);
        at += 4;
    }
    while at < cols {
        map_lanes::<1, I, O>(src, at, dst, f);
        at += 1;
    }
}

/// [`map_columns`] for the `L` columns from `from` on.
#[inline(always)]
fn map_lanes<const L: usize, const I: usize, const O: usize>(
    src: &[&[f32]; I],
    from: usize,
    dst: &mut [&mut [f32]],
    f: impl Fn([f32; I]) -> [f32; O],
) {
    let s: [&[f32; L]; I] =
        std::array::from_fn(|k| src[k][from..from + L].try_into().expect("L columns"));
    let mut o = [[0.0f32; L]; O];
    for l in 0..L {
        let v = f(std::array::from_fn(|k| s[k][l]));
        for r in 0..O {
            o[r][l] = v[r];
        }
    }
    for (row, o) in dst.iter_mut().zip(&o) {
        row[from..from + L].copy_from_slice(o);
    }
}

super::wide_fn! {
    /// `V = Bᵀ d B` for every tile of one image plane `x` [H, W] (padding `pad`), written to
    /// `v[(6j + i)·n + base + tile]` (tiles in row-major order); `stage` is staging space of
    /// [`stage_len`] floats.
    ///
    /// First `Bᵀ d` down the columns: the six padded rows a tile row reads give six rows
    /// `e_i` across the padded width, in full vectors. Then `(Bᵀ d) B` along them: tile t of
    /// tile row ty reads `e_i[4t .. 4t + 6]`, and with the tile rows of `e_i` stored end to
    /// end (`4·tw` floats each) the whole plane's tiles run as one loop ([`put_tiles`]). Its
    /// columns 4 and 5 are the next tile's first two, copied to `next`, except for each row's
    /// last tile, whose lie past those `4·tw` and come from `ext`.
    fn transform_plane(
        x: &[f32],
        w: usize,
        pad: [usize; 2],
        tl: Tiling,
        v: &mut [f32],
        n: usize,
        base: usize,
        stage: &mut [f32],
    ) {
        let (tw, th, rows) = (tl.tw, tl.th, x.len() / w);
        let (cols, tiles) = (4 * tw, tl.tiles());
        let (len, pw) = (th * cols, cols + 4);
        // The padded plane: rows of `pw` floats, image row y at row y + pad[0] from column
        // pad[1] on.
        let (padded, rest) = stage.split_at_mut(tl.hp * pw);
        for (r, dst) in padded.chunks_exact_mut(pw).enumerate() {
            match r.checked_sub(pad[0]).filter(|&y| y < rows) {
                Some(y) => {
                    let data = &x[y * w..(y + 1) * w];
                    let len = data.len().min(pw - pad[1]);
                    dst[..pad[1]].fill(0.0);
                    dst[pad[1]..pad[1] + len].copy_from_slice(&data[..len]);
                    dst[pad[1] + len..].fill(0.0);
                }
                None => dst.fill(0.0),
            }
        }
        let padded = &*padded;
        let (e, rest) = rest.split_at_mut(6 * len + 4);
        let (ext, next) = rest.split_at_mut(12 * th);
        for ty in 0..th {
            let src: [&[f32]; 6] = std::array::from_fn(|k| &padded[(4 * ty + k) * pw..][..pw]);
            map_columns(&src, cols, &mut six_rows(e, len, ty * cols, cols), bt);
            // The two padded columns past `cols`, for the row's last tile.
            for extra in 0..2 {
                let o = bt(src.map(|row| row[cols + extra]));
                for (i, v) in o.into_iter().enumerate() {
                    ext[(6 * ty + i) * 2 + extra] = v;
                }
            }
        }
        let (e, ext) = (&*e, &*ext);
        let next = next[..len].as_chunks_mut::<4>().0;
        for i in 0..6 {
            let quads = e[i * len..][..len + 4].as_chunks::<4>().0;
            // Tile c's columns 4 and 5 are the next tile's 0 and 1, except for the last tile of
            // each row, whose lie past the row (in `ext`).
            next.copy_from_slice(&quads[1..=tiles]);
            for ty in 0..th {
                let last = &mut next[ty * tw + tw - 1];
                last[..2].copy_from_slice(&ext[(6 * ty + i) * 2..][..2]);
            }
            put_tiles(quads, next, tiles, column_rows(v, n, i, base, tiles), |a, b| {
                bt([a[0], a[1], a[2], a[3], b[0], b[1]])
            });
        }
    }
}

/// Floats of staging space the transforms of one plane need ([`transform_plane`]'s are the
/// most).
fn stage_len(tl: &Tiling) -> usize {
    tl.hp * (4 * tl.tw + 4) + 7 * tl.th * 4 * tl.tw + 4 + 12 * tl.th
}

super::wide_fn! {
    /// `Y = Aᵀ M A` (+ bias) for every tile of one output plane `y` [OH, OW], reading
    /// `M[i][j]` of tile t at `m[(6j + i)·stride + t]`; `stage` is staging space of
    /// [`stage_len`] floats.
    ///
    /// First `M A` along the tile rows: for each i, the tiles of the whole plane run as one
    /// loop, writing the four values of tile t to `e_i[4t ..]` (tile rows end to end, `4·tw`
    /// floats each). Then `Aᵀ` down the columns writes the output rows, in full vectors.
    fn product_plane(m: &[f32], stride: usize, tl: Tiling, bias: f32, y: &mut [f32], stage: &mut [f32]) {
        let (tw, ow, tiles) = (tl.tw, tl.ow, tl.tiles());
        let cols = 4 * tw;
        let len = tiles * 4;
        for (i, ei) in stage[..6 * len].chunks_exact_mut(len).enumerate() {
            let s = |j: usize| &m[(6 * j + i) * stride..][..tiles];
            let (s0, s1, s2, s3, s4, s5) = (s(0), s(1), s(2), s(3), s(4), s(5));
            let q = &mut ei.as_chunks_mut::<4>().0[..tiles];
            for t in 0..tiles {
                q[t] = at([s0[t], s1[t], s2[t], s3[t], s4[t], s5[t]]);
            }
        }
        let e = &stage[..6 * len];
        for (ty, rows) in y.chunks_mut(4 * ow).enumerate() {
            let src: [&[f32]; 6] = std::array::from_fn(|i| &e[i * len + ty * cols..][..cols]);
            let mut dst: Vec<&mut [f32]> = rows.chunks_exact_mut(ow).collect();
            map_columns(&src, ow, &mut dst, |m| at(m).map(|v| v + bias));
        }
    }
}

/// `V = Bᵀ d B` for every channel of the `nb` images `b0..` of `x`, written to `v`
/// [C_in][36][n] (`n` = the images' tiles, `ξ = 6j + i`); the channels run on the cores when
/// `inner`.
fn transform_inputs(
    x: &[f32],
    g: &ConvGeometry,
    tl: Tiling,
    (b0, nb): (usize, usize),
    v: &mut [f32],
    inner: bool,
) {
    let n = nb * tl.tiles();
    let in_plane = g.h * g.w;
    each_chunk(v, XI * n, inner, |ci, vc| {
        scratch(&ROWS, stage_len(&tl), |stage| {
            for b in 0..nb {
                let plane = &x[((b0 + b) * g.c_in + ci) * in_plane..][..in_plane];
                transform_plane(plane, g.w, g.pad, tl, vc, n, b * tl.tiles(), stage);
            }
        })
    });
}

/// Forward convolution `y = conv(x, w) + bias` by F(4×4, 3×3), for a 3×3 stride-1 geometry
/// ([`super::winograd::applies`]), the 36 position products in `mode` (bf16: the transformed
/// weights and inputs rounded to bf16, needs [`super::bf16_available`]). Returns `y` [B,
/// C_out, OH, OW]; the same bits whatever the number of threads.
pub fn forward(
    mode: super::MatmulMode,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    check_weights(w, g);
    // The transformed weights, in scratch space kept from call to call (overwritten whole).
    let plane = g.c_out * g.c_in;
    scratch(&WEIGHTS, (9 + XI) * plane, |wbuf| {
        let (taps, u) = wbuf.split_at_mut(9 * plane);
        transform_weights(w, plane, taps, u);
        forward_with(&Positions::new(mode, Cow::Borrowed(u), g), x, bias, g)
    })
}

/// The 36 transformed weights of [`forward`] in `mode`, which depend on `w` alone, in a buffer
/// of their own (to be kept across calls).
pub(super) fn transformed(
    mode: super::MatmulMode,
    w: &[f32],
    g: &ConvGeometry,
) -> Positions<'static> {
    check_weights(w, g);
    let plane = g.c_out * g.c_in;
    let (mut taps, mut u) = (vec![0.0; 9 * plane], vec![0.0; XI * plane]);
    transform_weights(w, plane, &mut taps, &mut u);
    Positions::new(mode, Cow::Owned(u), g)
}

/// [`forward`] with its weights already [`transformed`].
pub(super) fn forward_with(
    u: &Positions,
    x: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    check_forward(x, g);
    let tl = Tiling::new(g, 4);
    let out_plane = tl.oh * tl.ow;
    by_groups(g, tl, TARGET_TILES, |b0, nb, inner, yg| {
        let n = nb * tl.tiles();
        scratch(&GROUP, (g.c_in + g.c_out) * XI * n, |buf| {
            // V [C_in][36][n], M [36][C_out][n].
            let (v, m) = buf.split_at_mut(g.c_in * XI * n);
            transform_inputs(x, g, tl, (b0, nb), v, inner);
            position_products(u, v, n, m, g, inner);
            let m = &*m;
            each_chunk(yg, out_plane, inner, |p, yp| {
                let (b, co) = (p / g.c_out, p % g.c_out);
                let bv = bias.map_or(0.0, |bias| bias[co]);
                scratch(&ROWS, stage_len(&tl), |stage| {
                    let at = co * n + b * tl.tiles();
                    product_plane(&m[at..], g.c_out * n, tl, bv, yp, stage)
                });
            });
        });
    })
}

/// `A c` for the four values `c` of one output-gradient column (or `c Aᵀ` of one row): the
/// cubic with coefficients `c` at the points 0, 1, -1, 2, -2 and its leading coefficient (∞).
#[inline(always)]
fn a_times([c0, c1, c2, c3]: [f32; 4]) -> [f32; 6] {
    let (e, o) = (c0 + c2, c1 + c3);
    let (e2, o2) = (c0 + 4.0 * c2, 2.0 * c1 + 8.0 * c3);
    [c0, e + o, e - o, e2 + o2, e2 - o2, c3]
}

/// `Gᵀ m` for the six values `m` of one transformed column (or `m G` of one row).
#[inline(always)]
fn gt_times([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 3] {
    let (s1, d1) = (m1 + m2, m1 - m2);
    let (s2, d2) = (m3 + m4, m3 - m4);
    [
        m0 / 4.0 - s1 / 6.0 + s2 / 24.0,
        d2 / 12.0 - d1 / 6.0,
        (s2 - s1) / 6.0 + m5,
    ]
}

super::wide_fn! {
    /// `D = A dy Aᵀ` for every 4×4 tile of one output-gradient plane `dy` [OH, OW] (zero past
    /// its edges), written to `d[(6j + i)·n + base + tile]`; `stage` is staging space of
    /// [`stage_len`] floats. As [`transform_plane`]: `A` down the columns of each tile row
    /// first, then along the rows for all the plane's tiles at once.
    fn transform_grad_plane(dy: &[f32], tl: Tiling, d: &mut [f32], n: usize, base: usize, stage: &mut [f32]) {
        let (tw, th, tiles) = (tl.tw, tl.th, tl.tiles());
        let (oh, ow, cols) = (tl.oh, tl.ow, 4 * tw);
        let len = th * cols;
        let (e, rest) = stage.split_at_mut(6 * len);
        // The plane with its rows and columns filled up to whole tiles.
        let plane: &[f32] = if ow == cols && oh == 4 * th {
            dy
        } else {
            let padded = &mut rest[..4 * len];
            for (r, row) in padded.chunks_exact_mut(cols).enumerate() {
                match dy.get(r * ow..(r + 1) * ow).filter(|_| r < oh) {
                    Some(data) => {
                        row[..ow].copy_from_slice(data);
                        row[ow..].fill(0.0);
                    }
                    None => row.fill(0.0),
                }
            }
            padded
        };
        for ty in 0..th {
            let src: [&[f32]; 4] = std::array::from_fn(|l| &plane[(4 * ty + l) * cols..][..cols]);
            map_columns(&src, cols, &mut six_rows(e, len, ty * cols, cols), a_times);
        }
        for i in 0..6 {
            let quads = e[i * len..][..len].as_chunks::<4>().0;
            let rows = column_rows(d, n, i, base, tiles);
            put_tiles(quads, quads, tiles, rows, |quad, _| a_times(quad));
        }
    }
}

/// Tiles per group of the weight gradient, and runs of groups summed apart. On the benchmark
/// U-Net at B=16 and 64 (2-core Xeon), groups of 32 to 256 tiles in 1, 2 or 4 runs took
/// from 121 to 156 ms (B=16) in all its weight gradients; 64 tiles in 2 runs was the fastest,
/// one run per core with no partial sums to spare.
const WEIGHT_GROUPS: (usize, usize) = (64, 2);

/// Weight and bias gradients `dW` [C_out, C_in, 3, 3] and `db` [C_out] by F(4×4, 3×3), for a
/// 3×3 stride-1 geometry. `y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A` is linear in `G g Gᵀ`, so
/// `dW = Gᵀ [Σ_tiles (A dy Aᵀ) ⊙ (Bᵀ d B)] G`: 36 products over the tiles (Lavin & Gray,
/// section 4, with the roles of the kernel and the output tile exchanged). The sums run in a
/// fixed order that depends on the batch alone: the same bits whatever the number of threads.
pub fn backward_weight(x: &[f32], dy: &[f32], g: &ConvGeometry) -> (Vec<f32>, Vec<f32>) {
    let tl = Tiling::new(g, 4);
    let out_plane = tl.oh * tl.ow;
    let sums = |b0: usize, nb: usize, xt: &mut [f32], dt: &mut [f32], inner: bool| {
        let n = nb * tl.tiles();
        transform_inputs(x, g, tl, (b0, nb), xt, inner);
        each_chunk(dt, XI * n, inner, |co, dc| {
            scratch(&ROWS, stage_len(&tl), |stage| {
                for b in 0..nb {
                    let plane = &dy[((b0 + b) * g.c_out + co) * out_plane..][..out_plane];
                    transform_grad_plane(plane, tl, dc, n, b * tl.tiles(), stage);
                }
            })
        });
    };
    let pos = |i: usize, j: usize| 6 * j + i;
    weight_grad::<6, XI>(x, dy, g, tl, WEIGHT_GROUPS, 0, sums, pos, gt_times)
}
