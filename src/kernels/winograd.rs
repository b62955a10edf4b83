//! 3×3 stride-1 convolutions in f32 by Winograd's minimal filtering F(2×2, 3×3): 16
//! multiplications per 2×2 output tile and channel pair instead of 36, so the matrix products
//! shrink 2.25 times (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! CVPR 2016, section 4).
//!
//! Per output tile of 2×2 pixels, with `d` the 4×4 input patch it reads (padding included) and
//! `g` one 3×3 kernel, the tile is `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` (Lavin & Gray, eq. 8) with
//!
//! ```text
//! Bᵀ = [1  0 -1  0]    G = [1    0    0 ]    Aᵀ = [1 1  1  0]
//!      [0  1  1  0]        [1/2  1/2  1/2]         [0 1 -1 -1]
//!      [0 -1  1  0]        [1/2 -1/2  1/2]
//!      [0  1  0 -1]        [0    0    1 ]
//! ```
//!
//! Summed over input channels, each of the 16 positions ξ of the 4×4 transformed tile is one
//! matrix product: `M_ξ[co, tile] = Σ_ci U_ξ[co, ci] · V_ξ[ci, tile]`, with `U = G g Gᵀ` (the
//! weights) and `V = Bᵀ d B` (the input), and the tiles of many images side by side.
//!
//! The weight gradient follows from the same bilinear form: `y = Aᵀ[(G g) ⊙ (Bᵀ d)]` gives
//! `∂L/∂g = Gᵀ [(A dy) ⊙ (Bᵀ d)]` in one dimension, so in two
//! `dW = Gᵀ [Σ_tiles (A dy Aᵀ) ⊙ (Bᵀ d B)] G`: again 16 products, now summing over tiles.
//! The input gradient of a convolution that keeps the image size is a forward convolution of
//! `dy` with the kernel turned by 180° (see `conv2d::as_forward`), so it takes the forward
//! path.
//!
//! The transforms add and halve only, and F(2×2, 3×3) is the most accurate of the Winograd
//! family: the results stay within a few f32 roundings of the direct sum (the tests hold them
//! to 1e-5 of the largest output).

use super::conv2d::{ConvGeometry, bias_grad, matmul, scratch};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;

/// Positions of a transformed 4×4 tile.
const XI: usize = 16;

/// Tiles per matrix product: images are grouped until their tiles reach this many columns,
/// enough for the products to run near the cores' peak while a group's transformed input and
/// products stay near the level-2 cache.
const TARGET_TILES: usize = 256;

/// Whether F(2×2, 3×3) computes this convolution: a 3×3 kernel at stride 1 (any padding).
pub fn applies(g: &ConvGeometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == [1, 1] && g.is_valid()
}

/// How the output of one image is cut into square tiles of `m`×`m` pixels (2 here, 4 in
/// [`super::winograd43`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Tiling {
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Tile rows and columns: `ceil(OH/m)`, `ceil(OW/m)`.
    pub(super) th: usize,
    pub(super) tw: usize,
    /// Rows of the padded image the tiles read: `m·th + 2`.
    pub(super) hp: usize,
}

impl Tiling {
    pub(super) fn new(g: &ConvGeometry, m: usize) -> Self {
        let [oh, ow] = g.out_hw();
        let (th, tw) = (oh.div_ceil(m), ow.div_ceil(m));
        Tiling {
            oh,
            ow,
            th,
            tw,
            hp: m * th + 2,
        }
    }

    /// Tiles per image.
    pub(super) fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// Tiles per row rounded up to whole vectors of [`LANES`].
    fn lane_width(&self) -> usize {
        self.tw.div_ceil(LANES) * LANES
    }

    /// Floats of staging space the F(2×2, 3×3) transforms of one plane need (the input
    /// transform's is the largest).
    fn staging(&self) -> usize {
        let twp = self.lane_width();
        self.hp * (2 * (twp + LANES) + 4 * twp)
    }

    /// Images per group: enough for `target` tiles, at most the batch.
    pub(super) fn per_group(&self, batch: usize, target: usize) -> usize {
        target.div_ceil(self.tiles()).clamp(1, batch.max(1))
    }
}

/// `U_ξ[co, ci] = (G g Gᵀ)_ξ` for every kernel `g = w[co, ci]`, laid out [16][C_out][C_in].
fn transform_weights(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; XI * c_out * c_in];
    let plane = c_out * c_in;
    for (pair, g) in w.chunks_exact(9).enumerate() {
        // G g: rows 0..4 of three columns.
        let mut gg = [[0.0f32; 3]; 4];
        for c in 0..3 {
            let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
            gg[0][c] = a;
            gg[1][c] = 0.5 * (a + b + d);
            gg[2][c] = 0.5 * (a - b + d);
            gg[3][c] = d;
        }
        // (G g) Gᵀ.
        for (i, row) in gg.iter().enumerate() {
            let [a, b, d] = *row;
            let t = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
            for (j, v) in t.into_iter().enumerate() {
                u[(i * 4 + j) * plane + pair] = v;
            }
        }
    }
    u
}

thread_local! {
    /// A group's transformed operands and products (see [`scratch`]).
    static GROUP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One plane's staging rows inside the transforms.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The weight gradient's per-position sums, one set per run of groups.
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Splits one padded image row into its even and odd columns: column `c = x + pad` of the
/// padded row goes to `even[c / 2]` or `odd[c / 2]`, and the padding's columns are zero.
#[inline(always)]
fn deinterleave(row: &[f32], pad: usize, even: &mut [f32], odd: &mut [f32]) {
    // Even columns of the data are c = pad..pad + w rounded up to even, odd ones likewise.
    let w = row.len();
    let (e_data, o_data) = (
        pad.div_ceil(2)..(pad + w).div_ceil(2),
        pad / 2..(pad + w) / 2,
    );
    even[..e_data.start].fill(0.0);
    odd[..o_data.start].fill(0.0);
    if let Some(tail) = even.get_mut(e_data.end..) {
        tail.fill(0.0);
    }
    if let Some(tail) = odd.get_mut(o_data.end..) {
        tail.fill(0.0);
    }
    let off = pad / 2;
    let (first, second) = if pad.is_multiple_of(2) {
        (&mut *even, &mut *odd)
    } else {
        (&mut *odd, &mut *even)
    };
    // With an odd pad, the odd element of each pair lands one slot further on.
    let shift = pad % 2;
    let pairs = row.chunks_exact(2);
    if let [last] = pairs.remainder() {
        first[off + row.len() / 2] = *last;
    }
    let slots = first[off..]
        .iter_mut()
        .zip(second[off + shift..].iter_mut());
    for ((a, b), pair) in slots.zip(pairs) {
        *a = pair[0];
        *b = pair[1];
    }
}

/// Lanes of the input transform's vectors: one AVX-512 register of f32.
const LANES: usize = 16;

/// `a[at..at + LANES]` as an array.
#[inline(always)]
fn lanes(a: &[f32], at: usize) -> &[f32; LANES] {
    a[at..at + LANES].try_into().expect("LANES elements")
}

super::wide_fn! {
    /// `V = Bᵀ d B` for every tile of one image plane `x` [H, W] (padding `pad`), written to
    /// `out[ξ·stride + base + tile]` for the 16 positions ξ, tiles in row-major order; `rows`
    /// is staging space of at least [`Tiling::staging`] floats.
    ///
    /// Tile rows are computed [`LANES`] tiles at a time and stored whole, so a store may run
    /// up to `LANES - 1` floats past the tile row it belongs to. Rows and images are written
    /// in ascending order, so what runs over is overwritten by the next tile row or image;
    /// after the last one it lands in the `LANES` floats of padding that each output row
    /// must have past `base + tiles` (`stride >= n + LANES`).
    fn transform_input(
        x: &[f32],
        w: usize,
        pad: [usize; 2],
        tl: Tiling,
        out: &mut [f32],
        stride: usize,
        base: usize,
        rows: &mut [f32],
    ) {
        let (hp, tw, twp) = (tl.hp, tl.tw, tl.lane_width());
        let cols = twp + LANES;
        let h = x.len() / w;
        let (eo, hrow) = rows.split_at_mut(2 * hp * cols);
        let (even, odd) = eo.split_at_mut(hp * cols);
        // Rows times B, per padded row r: with the row split into even and odd columns, the
        // four columns of tile t are even[t], odd[t], even[t + 1], odd[t + 1], so
        // h_j[t] = (d B)[j] is [d0 - d2, d1 + d2, d2 - d1, d1 - d3]. Rows are `twp` long.
        // All rows are split before any is read back, so that the reads (one float off the
        // stores) do not wait on stores still in flight. Only the first `tw + 1` floats of a
        // row feed real tiles; what lies past them (left by earlier calls) only reaches the
        // lanes of tiles past `tw`, whose stores are overwritten.
        for r in 0..hp {
            let (e, o) = (&mut even[r * cols..][..=tw], &mut odd[r * cols..][..=tw]);
            match r.checked_sub(pad[0]).filter(|&y| y < h) {
                Some(y) => deinterleave(&x[y * w..(y + 1) * w], pad[1], e, o),
                None => {
                    e.fill(0.0);
                    o.fill(0.0);
                }
            }
        }
        for r in 0..hp {
            let (even, odd) = (&even[r * cols..(r + 1) * cols], &odd[r * cols..(r + 1) * cols]);
            let dst = &mut hrow[r * 4 * twp..(r + 1) * 4 * twp];
            let (h0, rest) = dst.split_at_mut(twp);
            let (h1, rest) = rest.split_at_mut(twp);
            let (h2, h3) = rest.split_at_mut(twp);
            for c in (0..twp).step_by(LANES) {
                let (e0, e1) = (lanes(even, c), lanes(even, c + 1));
                let (o0, o1) = (lanes(odd, c), lanes(odd, c + 1));
                let mut v = [[0.0f32; LANES]; 4];
                for l in 0..LANES {
                    v[0][l] = e0[l] - e1[l];
                    v[1][l] = o0[l] + e1[l];
                    v[2][l] = e1[l] - o0[l];
                    v[3][l] = o0[l] - o1[l];
                }
                h0[c..c + LANES].copy_from_slice(&v[0]);
                h1[c..c + LANES].copy_from_slice(&v[1]);
                h2[c..c + LANES].copy_from_slice(&v[2]);
                h3[c..c + LANES].copy_from_slice(&v[3]);
            }
        }
        // Bᵀ times the rows, for each row of tiles ty: rows 2ty..2ty + 4 give
        // V[i][j] = [r0 - r2, r1 + r2, r2 - r1, r1 - r3][i] of h_j.
        let mut dst: Vec<&mut [f32]> = out.chunks_exact_mut(stride).take(XI).collect();
        // Row ξ = 4i + j of the output is q_i[j].
        let (q0, rest) = dst.split_at_mut(4);
        let (q1, rest) = rest.split_at_mut(4);
        let (q2, q3) = rest.split_at_mut(4);
        // Column j of every tile row first: four output rows are written at a time, each from
        // start to end.
        for j in 0..4 {
            for ty in 0..tl.th {
                for c in (0..tw).step_by(LANES) {
                    let row = |i: usize| lanes(hrow, ((2 * ty + i) * 4 + j) * twp + c);
                    let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                    let at = base + ty * tw + c;
                    let mut v = [[0.0f32; LANES]; 4];
                    for l in 0..LANES {
                        v[0][l] = r0[l] - r2[l];
                        v[1][l] = r1[l] + r2[l];
                        v[2][l] = r2[l] - r1[l];
                        v[3][l] = r1[l] - r3[l];
                    }
                    q0[j][at..at + LANES].copy_from_slice(&v[0]);
                    q1[j][at..at + LANES].copy_from_slice(&v[1]);
                    q2[j][at..at + LANES].copy_from_slice(&v[2]);
                    q3[j][at..at + LANES].copy_from_slice(&v[3]);
                }
            }
        }
    }
}

super::wide_fn! {
    /// `A dy Aᵀ` for every 2×2 tile of one output-gradient plane `dy` [OH, OW] (zero past its
    /// edges), written like [`transform_input`]'s output; `rows` is staging space of at least
    /// `4·(tw + 1)` floats.
    fn transform_output_grad(
        dy: &[f32],
        tl: Tiling,
        out: &mut [f32],
        stride: usize,
        base: usize,
        rows: &mut [f32],
    ) {
        let (tw, cols) = (tl.tw, tl.tw + 1);
        let mut dst: Vec<&mut [f32]> = out.chunks_exact_mut(stride).take(XI).collect();
        for ty in 0..tl.th {
            let at = base + ty * tw;
            // The tile row's two image rows, split into even and odd columns.
            rows[..4 * cols].fill(0.0);
            let (top, bottom) = rows[..4 * cols].split_at_mut(2 * cols);
            for (y, half) in [(2 * ty, top), (2 * ty + 1, bottom)] {
                if y < tl.oh {
                    let (e, o) = half.split_at_mut(cols);
                    deinterleave(&dy[y * tl.ow..(y + 1) * tl.ow], 0, e, o);
                }
            }
            let (e0, o0) = (&rows[..tw], &rows[cols..cols + tw]);
            let (e1, o1) = (&rows[2 * cols..2 * cols + tw], &rows[3 * cols..3 * cols + tw]);
            // A·[c0, c1] = [c0, c0 + c1, c0 - c1, -c1], down the rows and then along them.
            for (i, quad) in dst.chunks_exact_mut(4).enumerate() {
                let [v0, v1, v2, v3] = quad else {
                    unreachable!("rows come in fours");
                };
                let (v0, v1) = (&mut v0[at..at + tw], &mut v1[at..at + tw]);
                let (v2, v3) = (&mut v2[at..at + tw], &mut v3[at..at + tw]);
                for t in 0..tw {
                    let (c0, c1) = match i {
                        0 => (e0[t], o0[t]),
                        1 => (e0[t] + e1[t], o0[t] + o1[t]),
                        2 => (e0[t] - e1[t], o0[t] - o1[t]),
                        _ => (-e1[t], -o1[t]),
                    };
                    v0[t] = c0;
                    v1[t] = c0 + c1;
                    v2[t] = c0 - c1;
                    v3[t] = -c1;
                }
            }
        }
    }
}

super::wide_fn! {
    /// `Y = Aᵀ M A` (+ bias) for every tile of one output plane `y` [OH, OW], reading the
    /// products at `m[ξ·stride + base + tile]`; `rows` is staging space of at least `12·tw`
    /// floats.
    fn transform_product(
        m: &[f32],
        stride: usize,
        base: usize,
        tl: Tiling,
        bias: f32,
        y: &mut [f32],
        rows: &mut [f32],
    ) {
        let (tw, ow) = (tl.tw, tl.ow);
        let (ab, out) = rows[..12 * tw].split_at_mut(8 * tw);
        let (top, bottom) = out.split_at_mut(2 * tw);
        for ty in 0..tl.th {
            let at = base + ty * tw;
            let mx = |xi: usize| &m[xi * stride + at..][..tw];
            // Aᵀ down the columns: a_j = m0j + m1j + m2j and b_j = m1j - m2j - m3j.
            for (j, (a, b)) in ab.chunks_exact_mut(2 * tw).map(|c| c.split_at_mut(tw)).enumerate() {
                let (m0, m1, m2, m3) = (mx(j), mx(4 + j), mx(8 + j), mx(12 + j));
                for t in 0..tw {
                    a[t] = m0[t] + m1[t] + m2[t];
                    b[t] = m1[t] - m2[t] - m3[t];
                }
            }
            // Then along the rows: [c0 + c1 + c2, c1 - c2 - c3] of c = a (top) and b (bottom).
            for (half, dst) in [(0, &mut *top), (tw, &mut *bottom)] {
                let col = |j: usize| &ab[2 * tw * j + half..][..tw];
                let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
                let src = c0.iter().zip(c1).zip(c2.iter().zip(c3));
                for (pair, ((c0, c1), (c2, c3))) in dst.chunks_exact_mut(2).zip(src) {
                    pair[0] = c0 + c1 + c2 + bias;
                    pair[1] = c1 - c2 - c3 + bias;
                }
            }
            y[2 * ty * ow..(2 * ty + 1) * ow].copy_from_slice(&top[..ow]);
            if 2 * ty + 1 < tl.oh {
                y[(2 * ty + 1) * ow..(2 * ty + 2) * ow].copy_from_slice(&bottom[..ow]);
            }
        }
    }
}

/// Splits `buf` into consecutive pieces of `len` and runs `f(index, piece)` on each, on the
/// cores when `par`.
pub(super) fn each_chunk(
    buf: &mut [f32],
    len: usize,
    par: bool,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if par {
        buf.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        buf.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// [`transform_input`] of every channel of the images `b0..` of `x` whose transformed tiles
/// fill `v` [C_in][16][nv], with `nv = n + LANES` for the `n` tiles of those images.
fn transform_inputs(
    x: &[f32],
    g: &ConvGeometry,
    tl: Tiling,
    b0: usize,
    v: &mut [f32],
    inner: bool,
) {
    let nv = v.len() / (g.c_in * XI);
    let nb = (nv - LANES) / tl.tiles();
    let in_plane = g.h * g.w;
    each_chunk(v, XI * nv, inner, |ci, vc| {
        scratch(&ROWS, tl.staging(), |rows| {
            for b in 0..nb {
                let plane = &x[((b0 + b) * g.c_in + ci) * in_plane..][..in_plane];
                transform_input(plane, g.w, g.pad, tl, vc, nv, b * tl.tiles(), rows);
            }
        })
    });
}

/// The left operands `U_ξ` of a forward pass's position products: f32 values laid out
/// [ξ][C_out][C_in] (borrowed from scratch space, or owned where they are kept across calls),
/// or each position's packed into bf16 (see [`super::bf16`]).
pub(super) enum Positions<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Vec<super::bf16::PackedLhs>),
}

impl<'a> Positions<'a> {
    /// The operands for `mode`: `u` itself in f32, or each position packed in bf16.
    pub(super) fn new(mode: super::MatmulMode, u: Cow<'a, [f32]>, g: &ConvGeometry) -> Self {
        let plane = g.c_out * g.c_in;
        match mode {
            super::MatmulMode::F32 => Positions::F32(u),
            super::MatmulMode::Bf16 => Positions::Bf16(
                u.chunks_exact(plane)
                    .map(|ux| {
                        super::bf16::PackedLhs::new(g.c_out, g.c_in, (ux, g.c_in as isize, 1))
                    })
                    .collect(),
            ),
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Positions::F32(u) => 4 * u.len(),
            Positions::Bf16(packed) => packed.iter().map(|p| p.bytes()).sum(),
        }
    }

    fn count(&self, g: &ConvGeometry) -> usize {
        match self {
            Positions::F32(u) => u.len() / (g.c_out * g.c_in),
            Positions::Bf16(packed) => packed.len(),
        }
    }
}

/// The products of a forward pass, one per transformed position ξ:
/// `M_ξ [C_out][n] = U_ξ [C_out][C_in] · V_ξ [C_in][n]`, with `v` [C_in][ξ][nv] (each
/// position's `n` tiles in a row of `nv ≥ n` floats) and `m` [ξ][C_out][n]; the positions run
/// on the cores when `inner`.
pub(super) fn position_products(
    u: &Positions,
    v: &[f32],
    nv: usize,
    m: &mut [f32],
    g: &ConvGeometry,
    inner: bool,
) {
    let positions = u.count(g);
    let n = m.len() / (positions * g.c_out);
    each_chunk(m, g.c_out * n, inner, |xi, mx| {
        let rhs = (&v[xi * nv..], (positions * nv) as isize, 1);
        match u {
            Positions::F32(u) => {
                let lhs = (&u[xi * g.c_out * g.c_in..], g.c_in as isize, 1);
                matmul(g.c_out, n, g.c_in, mx, lhs, rhs, false, false);
            }
            Positions::Bf16(packed) => {
                let rhs = super::bf16::Rhs::Strided(rhs.0, rhs.1, rhs.2);
                super::bf16::matmul(&packed[xi], n, rhs, mx, super::bf16::Write::Set, false);
            }
        }
    });
}

/// Checks a forward convolution's input against its geometry (3×3, stride 1).
pub(super) fn check_forward(x: &[f32], g: &ConvGeometry) {
    assert!(applies(g), "Winograd needs a 3x3 stride-1 convolution");
    assert_eq!(x.len(), g.batch * g.c_in * g.h * g.w, "conv2d input size");
}

/// Checks a forward convolution's weights against its geometry.
pub(super) fn check_weights(w: &[f32], g: &ConvGeometry) {
    assert_eq!(w.len(), g.c_out * g.c_in * 9, "conv2d weight size");
}

/// Forward convolution `y = conv(x, w) + bias` for a geometry where [`applies`] holds, the 16
/// position products in `mode`. Returns `y` [B, C_out, OH, OW]; the same bits whatever the
/// number of threads.
pub fn forward(
    mode: super::MatmulMode,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    forward_with(&transformed(mode, w, g), x, bias, g)
}

/// The 16 transformed weights of [`forward`] in `mode`, which depend on `w` alone.
pub(super) fn transformed(
    mode: super::MatmulMode,
    w: &[f32],
    g: &ConvGeometry,
) -> Positions<'static> {
    check_weights(w, g);
    Positions::new(mode, Cow::Owned(transform_weights(w, g.c_out, g.c_in)), g)
}

/// [`forward`] with its weights already [`transformed`].
pub(super) fn forward_with(
    u: &Positions,
    x: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    check_forward(x, g);
    let tl = Tiling::new(g, 2);
    let out_plane = tl.oh * tl.ow;
    by_groups(g, tl, TARGET_TILES, |b0, nb, inner, yg| {
        let n = nb * tl.tiles();
        // Rows of V are padded by LANES (see `transform_input`).
        let nv = n + LANES;
        scratch(&GROUP, g.c_in * XI * nv + g.c_out * XI * n, |buf| {
            // V [C_in][16][nv]: one channel's transformed tiles together, so that channels can
            // be written in parallel; M [16][C_out][n]: one product each.
            let (v, m) = buf.split_at_mut(g.c_in * XI * nv);
            transform_inputs(x, g, tl, b0, v, inner);
            // M_ξ [C_out][n] = U_ξ [C_out][C_in] · V_ξ [C_in][n].
            position_products(u, v, nv, m, g, inner);
            let m = &*m;
            each_chunk(yg, out_plane, inner, |p, yp| {
                let (b, co) = (p / g.c_out, p % g.c_out);
                let bv = bias.map_or(0.0, |bias| bias[co]);
                let at = co * n + b * tl.tiles();
                scratch(&ROWS, tl.staging(), |rows| {
                    transform_product(m, g.c_out * n, at, tl, bv, yp, rows)
                });
            });
        });
    })
}

/// The output `y` [B, C_out, OH, OW] of a forward pass made group by group: images are grouped
/// until their tiles reach `target`, and `run(b0, nb, inner, yg)` fills the output `yg` of the
/// `nb` images from `b0` on. Groups spread over the cores; with fewer groups than cores, each
/// group's steps do (`inner`).
pub(super) fn by_groups(
    g: &ConvGeometry,
    tl: Tiling,
    target: usize,
    run: impl Fn(usize, usize, bool, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let image = g.c_out * tl.oh * tl.ow;
    if g.batch == 0 || image == 0 {
        return vec![0.0; g.batch * image];
    }
    let per = tl.per_group(g.batch, target);
    let inner = g.batch.div_ceil(per) < rayon::current_num_threads();
    let fill = |gi: usize, yg: &mut [f32]| run(gi * per, yg.len() / image, inner, yg);
    super::fresh_output(g.batch * image, per * image, !inner, fill).0
}

/// Weight and bias gradients `dW` [C_out, C_in, 3, 3] and `db` [C_out] for a geometry where
/// [`applies`] holds. The sums run over groups of images in a fixed order that depends on the
/// batch alone, so the bits do not depend on the number of threads.
pub fn backward_weight(x: &[f32], dy: &[f32], g: &ConvGeometry) -> (Vec<f32>, Vec<f32>) {
    let tl = Tiling::new(g, 2);
    let sums = |b0: usize, nb: usize, xt: &mut [f32], dt: &mut [f32], inner: bool| {
        let (n, out_plane) = (nb * tl.tiles(), tl.oh * tl.ow);
        transform_inputs(x, g, tl, b0, xt, inner);
        each_chunk(dt, XI * n, inner, |co, dc| {
            scratch(&ROWS, tl.staging(), |rows| {
                for b in 0..nb {
                    let plane = &dy[((b0 + b) * g.c_out + co) * out_plane..][..out_plane];
                    transform_output_grad(plane, tl, dc, n, b * tl.tiles(), rows);
                }
            })
        });
    };
    // dW = Gᵀ M G per kernel: Gᵀ·[m0, m1, m2, m3] = [m0 + (m1 + m2)/2, (m1 - m2)/2, (m1 + m2)/2 + m3].
    let gt = |m: [f32; 4]| -> [f32; 3] {
        let (s, d) = (0.5 * (m[1] + m[2]), 0.5 * (m[1] - m[2]));
        [m[0] + s, d, s + m[3]]
    };
    // Row i and column j of a tile at ξ = 4i + j (see `transform_input`).
    let pos = |i: usize, j: usize| 4 * i + j;
    weight_grad::<4, XI>(x, dy, g, tl, (TARGET_TILES, 4), LANES, sums, pos, gt)
}

/// The weight and bias gradients of a Winograd convolution with `A×A` transformed tiles
/// (`P = A·A` positions): `dW = Gᵀ [Σ_tiles D ⊙ X] G` per kernel, with `X` the transformed
/// input tiles and `D` the transformed output-gradient tiles. Images are grouped until their
/// tiles reach `target` (`target.0`), and the groups summed in at most `target.1` runs of
/// consecutive groups; `transform(b0, nb, xt, dt, inner)` fills a group's X [C_in][P][nx]
/// (rows of `nx = n + x_pad` floats for the group's `n` tiles) and D [C_out][P][n], with
/// row i and column j of a tile at position `pos(i, j)`; `gt` is `Gᵀ` applied to one column.
/// The runs run on the cores and are added in order at the end: the split depends on the
/// batch alone, so the bits do not depend on the number of threads.
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grad<const A: usize, const P: usize>(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    tl: Tiling,
    (target, partials): (usize, usize),
    x_pad: usize,
    transform: impl Fn(usize, usize, &mut [f32], &mut [f32], bool) + Sync + Send,
    pos: impl Fn(usize, usize) -> usize + Sync,
    gt: impl Fn([f32; A]) -> [f32; 3] + Sync + Send,
) -> (Vec<f32>, Vec<f32>) {
    assert!(applies(g), "Winograd needs a 3x3 stride-1 convolution");
    let (in_plane, out_plane) = (g.h * g.w, tl.oh * tl.ow);
    assert_eq!(x.len(), g.batch * g.c_in * in_plane, "conv2d input size");
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * out_plane,
        "conv2d output-gradient size"
    );
    let db = bias_grad(dy, g.batch, g.c_out, out_plane);
    let pairs = g.c_out * g.c_in;
    if g.batch == 0 || out_plane == 0 {
        return (vec![0.0; pairs * 9], db);
    }
    let per = tl.per_group(g.batch, target);
    let groups = g.batch.div_ceil(per);
    let groups_per_part = groups.div_ceil(partials);
    let parts = groups.div_ceil(groups_per_part);
    let inner = parts < rayon::current_num_threads();
    let len = P * pairs;
    // One accumulator S [P][C_out][C_in] per run, in scratch space kept from call to call:
    // each run's first group writes its products instead of adding them, so the space needs
    // no zeroing.
    let dw = scratch(&ACC, parts * len, |accs| {
        let run = |pi: usize, acc: &mut [f32]| {
            let first = pi * groups_per_part;
            for (k, gi) in (first..(first + groups_per_part).min(groups)).enumerate() {
                let b0 = gi * per;
                let nb = per.min(g.batch - b0);
                let n = nb * tl.tiles();
                let nx = n + x_pad;
                scratch(&GROUP, g.c_in * P * nx + g.c_out * P * n, |buf| {
                    let (xt, dt) = buf.split_at_mut(g.c_in * P * nx);
                    transform(b0, nb, xt, dt, inner);
                    let (xt, dt) = (&*xt, &*dt);
                    // S_ξ [C_out][C_in] (+)= D_ξ [C_out][n] · X_ξ [C_in][n]ᵀ.
                    each_chunk(acc, pairs, inner, |xi, mx| {
                        let lhs = (&dt[xi * n..], (P * n) as isize, 1);
                        let rhs = (&xt[xi * nx..], 1, (P * nx) as isize);
                        matmul(g.c_out, g.c_in, n, mx, lhs, rhs, k > 0, false);
                    });
                });
            }
        };
        let accs = &mut accs[..parts * len];
        if inner {
            accs.chunks_mut(len)
                .enumerate()
                .for_each(|(pi, a)| run(pi, a));
        } else {
            accs.par_chunks_mut(len)
                .enumerate()
                .for_each(|(pi, a)| run(pi, a));
        }
        let accs = &*accs;
        // dW = Gᵀ (Σ_runs S) G per kernel, the runs added in order, for blocks of kernels
        // side by side (vectors run over the kernels of a block).
        const BLOCK: usize = 64;
        let mut dw = vec![0.0f32; pairs * 9];
        dw.par_chunks_mut(9 * BLOCK)
            .enumerate()
            .for_each(|(blk, out)| {
                let (p0, nl) = (blk * BLOCK, out.len() / 9);
                let mut s = [[0.0f32; BLOCK]; P];
                for (xi, sx) in s.iter_mut().enumerate() {
                    let sx = &mut sx[..nl];
                    sx.copy_from_slice(&accs[xi * pairs + p0..][..nl]);
                    for r in 1..parts {
                        let src = &accs[r * len + xi * pairs + p0..][..nl];
                        sx.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                    }
                }
                // Gᵀ down each column j: c[a][j] for the block's kernels.
                let mut c = [[[0.0f32; BLOCK]; A]; 3];
                for j in 0..A {
                    for l in 0..BLOCK {
                        let v = gt(std::array::from_fn(|i| s[pos(i, j)][l]));
                        for a in 0..3 {
                            c[a][j][l] = v[a];
                        }
                    }
                }
                // Then along the three rows.
                for (a, ca) in c.iter().enumerate() {
                    for (l, k) in out.chunks_exact_mut(9).enumerate() {
                        let v = gt(std::array::from_fn(|j| ca[j][l]));
                        k[3 * a..3 * a + 3].copy_from_slice(&v);
                    }
                }
            });
        dw
    });
    (dw, db)
}
