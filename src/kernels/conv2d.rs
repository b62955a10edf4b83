//! 2-D convolution on f32 NCHW buffers: forward, input gradient and weight gradient, each as
//! im2col plus one matrix product per image, images spread over the cores.
//!
//! Shapes: input `x` [B, C_in, H, W], weight `w` [C_out, C_in, kh, kw] (burn's and PyTorch's
//! layout, read as the matrix W [C_out, K] with K = C_in·kh·kw), output `y` [B, C_out, OH, OW]
//! with `OH = (H + 2·pad_h - kh) / stride_h + 1` (likewise OW). For one image, with the column
//! matrix `col(x)` [K, OH·OW] whose row `(ci·kh + ky)·kw + kx` holds
//! `x[ci, oy·s_h + ky - p_h, ox·s_w + kx - p_w]` (zero outside the image):
//!
//! - forward: `y = W · col(x) + b`;
//! - input gradient: `dx = col⁻¹(Wᵀ · dy)`, where `col⁻¹` adds each column entry back onto the
//!   input pixel it was read from (the adjoint of `col`);
//! - weight gradient: `dW = Σ_images dy · col(x)ᵀ`, bias gradient `db = Σ_images,pixels dy`.
//!
//! These are the textbook identities of convolution as a matrix product (Chellapilla et al.,
//! "High Performance Convolutional Neural Networks for Document Processing", 2006).

pub use super::MatmulMode;
use super::{bf16, winograd, winograd43};
use gemm::Parallelism;
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;

thread_local! {
    /// Per-thread column-matrix buffer, kept between calls: it is zero-filled only when it
    /// grows, where a fresh `Vec` per call paid a full zero-fill of K·N floats every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a scratch buffer of `len` floats (contents unspecified: callers overwrite
/// every element before reading it).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch(&SCRATCH, len, f)
}

/// Runs `f` on the first `len` floats of the thread's buffer `key`, grown (and zero-filled)
/// only when too short; its contents are whatever the last user left. A thread re-entering
/// while its buffer is in use (rayon may run another task on it inside a parallel section)
/// gets a fresh one.
pub(super) fn scratch<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// Geometry of one convolution (groups = 1, dilation = 1, symmetric padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
}

impl ConvGeometry {
    /// Output height and width.
    pub fn out_hw(&self) -> [usize; 2] {
        [
            (self.h + 2 * self.pad[0] - self.kh) / self.stride[0] + 1,
            (self.w + 2 * self.pad[1] - self.kw) / self.stride[1] + 1,
        ]
    }

    /// K = C_in·kh·kw: the length of one column.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// OH·OW: output pixels per image.
    pub fn n(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }

    /// 1x1, stride 1, no padding: the image itself is its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0]
    }

    /// Whether this geometry is one the kernels handle: positive strides, at least one input and
    /// output channel, and a kernel that fits the padded image.
    pub fn is_valid(&self) -> bool {
        self.stride[0] > 0
            && self.stride[1] > 0
            && self.c_in > 0
            && self.c_out > 0
            && self.h + 2 * self.pad[0] >= self.kh
            && self.w + 2 * self.pad[1] >= self.kw
            && self.kh > 0
            && self.kw > 0
    }
}

/// For output coordinate range `0..out` along one axis, kernel offset `k`: the first and one
/// past the last output index whose input index `o·s + k - p` lies in `0..len`.
fn valid_range(out: usize, len: usize, k: usize, s: usize, p: usize) -> (usize, usize) {
    // o·s + k >= p  <=>  o >= ceil((p - k) / s)
    let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
    // o·s + k - p <= len - 1  <=>  o <= (len - 1 + p - k) / s
    let hi = if len + p > k {
        ((len - 1 + p - k) / s + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Writes `col(x)` [K, OH·OW] of one image `x` [C_in, H, W].
fn im2col(x: &[f32], g: &ConvGeometry, col: &mut [f32]) {
    let [oh, ow] = g.out_hw();
    let n = oh * ow;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.pad;
    for ci in 0..g.c_in {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (oy0, oy1) = valid_range(oh, g.h, ky, sh, ph);
            for kx in 0..g.kw {
                let (ox0, ox1) = valid_range(ow, g.w, kx, sw, pw);
                let row = &mut col[((ci * g.kh + ky) * g.kw + kx) * n..][..n];
                row[..oy0 * ow].fill(0.0);
                row[oy1 * ow..].fill(0.0);
                for oy in oy0..oy1 {
                    let src = &plane[(oy * sh + ky - ph) * g.w..][..g.w];
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    dst[..ox0].fill(0.0);
                    dst[ox1..].fill(0.0);
                    if ox0 == ox1 {
                        // This tap sees no column of the image (the kernel is wider than
                        // the padded image reaches); `ox0 + kx - pw` may then be negative.
                    } else if sw == 1 {
                        let start = ox0 + kx - pw;
                        dst[ox0..ox1].copy_from_slice(&src[start..start + (ox1 - ox0)]);
                    } else {
                        for (ox, d) in dst[ox0..ox1].iter_mut().enumerate() {
                            *d = src[(ox + ox0) * sw + kx - pw];
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column matrix `col` [K, OH·OW] back onto the image `dx` [C_in, H, W] (the adjoint
/// of [`im2col`]); `dx` must start zeroed.
fn col2im(col: &[f32], g: &ConvGeometry, dx: &mut [f32]) {
    let [oh, ow] = g.out_hw();
    let n = oh * ow;
    let [sh, sw] = g.stride;
    let [ph, pw] = g.pad;
    for ci in 0..g.c_in {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (oy0, oy1) = valid_range(oh, g.h, ky, sh, ph);
            for kx in 0..g.kw {
                let (ox0, ox1) = valid_range(ow, g.w, kx, sw, pw);
                let row = &col[((ci * g.kh + ky) * g.kw + kx) * n..][..n];
                for oy in oy0..oy1 {
                    let dst = &mut plane[(oy * sh + ky - ph) * g.w..][..g.w];
                    let src = &row[oy * ow..(oy + 1) * ow];
                    if ox0 == ox1 {
                        // No column of the image under this tap (see `im2col`).
                    } else if sw == 1 {
                        let start = ox0 + kx - pw;
                        for (d, s) in dst[start..start + (ox1 - ox0)]
                            .iter_mut()
                            .zip(&src[ox0..ox1])
                        {
                            *d += *s;
                        }
                    } else {
                        for ox in ox0..ox1 {
                            dst[ox * sw + kx - pw] += src[ox];
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread buffer of [`with_padded`] (bf16 bits).
    static PADDED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffer of [`forward_pairs`] (bf16 pairs).
    static PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffers of [`backward_weight_pairs`]: the images in bf16, and `dy` in pixel
    /// pairs (with the rows it is turned from).
    static GRAD_X: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static GRAD_DY: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Whether the bf16 forward convolution `g` (and so its input gradient, see [`as_forward`])
/// loads its image tiles straight from the image laid out in channel pairs
/// ([`bf16::conv_pairs`]) instead of packing them for each product: on AMX, for stride-1
/// convolutions larger than 1×1 with a multiple of 32 input channels, or of 8 from 24 on
/// (zero channels pad them to [`pair_channels`], at most a third more products).
/// `DIFFUSE_KERNELS` without `pairs` turns it off (see [`super::enabled`]).
pub fn reads_pairs(mode: MatmulMode, g: &ConvGeometry) -> bool {
    mode == MatmulMode::Bf16
        && g.stride == [1, 1]
        && g.kh * g.kw > 1
        && (g.c_in % 32 == 0 || (g.c_in % 8 == 0 && g.c_in >= 24))
        && bf16::engine() == Some(bf16::Engine::Amx)
        && super::enabled("pairs")
}

/// Whether the bf16 weight gradient of `g` runs on AMX with its tiles loaded in place
/// ([`bf16::grad_taps`]): the image as it is (rounded and padded) and the output gradient in
/// pixel pairs, for stride-1 convolutions larger than 1×1 with at least 16 input and output
/// channels (zero channels pad both to multiples of 32) whose sums fit in [`GRAD_SUMS_BYTES`].
/// It replaces f32 F(4×4, 3×3) there ([`weight_grad_in_f32`]): on a 2-core Xeon with AMX,
/// 1.34-2.02 times its speed (median 1.6) over the benchmark U-Net's and the default
/// Fashion-MNIST network's shapes (`examples/conv_routes.rs`; docs/BENCHMARKS.md, session 28). `DIFFUSE_KERNELS`
/// without `wpairs` turns it off.
pub fn grad_reads_pairs(mode: MatmulMode, g: &ConvGeometry) -> bool {
    let sums = 4 * g.kh * g.kw * g.c_in.next_multiple_of(32) * g.c_out.next_multiple_of(32);
    mode == MatmulMode::Bf16
        && g.stride == [1, 1]
        && g.kh * g.kw > 1
        && g.n() > 0
        && g.c_in >= 16
        && g.c_out >= 16
        && sums <= GRAD_SUMS_BYTES
        && bf16::engine() == Some(bf16::Engine::Amx)
        && super::enabled("wpairs")
}

/// The most bytes of sums [`grad_reads_pairs`] takes: each chunk of images adds into every
/// block of sums once, so they must stay in the level-2 cache (2 MiB a core on the Xeons with
/// AMX). Above it (256 input and output channels, 3×3: 2.4 MB) the in-place route at 8×8
/// pixels is at best level with F(4×4, 3×3) in f32 (1.03-1.06 times its speed, 0.73 at 512 by
/// 256 channels), against 1.34 at 256 by 128 channels (1.2 MB), so f32 stays there.
const GRAD_SUMS_BYTES: usize = 3 << 19;

/// The input channels of a convolution that [`reads_pairs`], rounded up to whole steps of 32.
fn pair_channels(g: &ConvGeometry) -> usize {
    g.c_in.next_multiple_of(32)
}

/// Runs `f` on the zero-padded bf16 copy of one image [C_in, H, W] that the bf16 products read
/// `col(x)` from, for stride-1 geometries (`None` for others). The copy lives in a per-thread
/// buffer: only its border is zeroed, the rest is overwritten by the rounded image.
fn with_padded<R>(
    x: &[f32],
    g: &ConvGeometry,
    f: impl FnOnce(Option<&bf16::PaddedImage>) -> R,
) -> R {
    if g.stride != [1, 1] {
        return f(None);
    }
    let (hp, wp) = (g.h + 2 * g.pad[0], g.w + 2 * g.pad[1]);
    let [ph, pw] = g.pad;
    scratch(&PADDED, g.c_in * hp * wp, |xp| {
        for (plane, src) in xp.chunks_mut(hp * wp).zip(x.chunks(g.h * g.w)) {
            bf16::round_padded(src, [g.h, g.w], [ph, pw], wp, plane);
        }
        f(Some(&bf16::PaddedImage {
            xp,
            hp,
            wp,
            kh: g.kh,
            kw: g.kw,
            ow: g.out_hw()[1],
        }))
    })
}

/// A matrix operand: the values and the (row, column) strides of its elements.
type Operand<'a> = (&'a [f32], isize, isize);

/// The left operand of a convolution's matrix products, prepared once per call and shared by
/// the products of every image: plain f32 for the f32 GEMM, or packed into bf16 tiles for AMX
/// (see [`super::matmul_mode`]).
enum Lhs<'a> {
    F32 { a: Operand<'a>, m: usize, k: usize },
    Bf16(Cow<'a, bf16::PackedLhs>),
}

impl<'a> Lhs<'a> {
    fn new(mode: MatmulMode, m: usize, k: usize, a: Operand<'a>) -> Self {
        match mode {
            MatmulMode::F32 => Lhs::F32 { a, m, k },
            MatmulMode::Bf16 => Lhs::Bf16(Cow::Owned(bf16::PackedLhs::new(m, k, a))),
        }
    }

    /// `dst[m×n] = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]`, `dst` row-major.
    fn product(&self, n: usize, dst: &mut [f32], rhs: Operand, accumulate: bool, par: bool) {
        match self {
            Lhs::F32 { a, m, k } => matmul(*m, n, *k, dst, *a, rhs, accumulate, par),
            Lhs::Bf16(packed) => {
                let rhs = bf16::Rhs::Strided(rhs.0, rhs.1, rhs.2);
                let write = if accumulate {
                    bf16::Write::Add
                } else {
                    bf16::Write::Set
                };
                bf16::matmul(packed, n, rhs, dst, write, par)
            }
        }
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]` in f32 (the `gemm` crate), all
/// given by (row, column) strides in elements.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
    par: bool,
) {
    debug_assert!(dst.len() >= m * n);
    let par = if par {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: every index the product reads or writes lies inside the slices: the caller passes
    // strides that describe matrices of the stated sizes within them (checked in debug builds
    // by the callers' length assertions).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Whether one matrix product spreads over the cores: only when there are too few images (or
/// chunks of images) to spread instead.
fn inner_parallelism(batch: usize) -> bool {
    batch < rayon::current_num_threads()
}

/// Forward convolution: `y[b] = W · col(x[b]) + bias` for every image, products in `mode`
/// (a bf16 `mode` needs [`super::bf16_available`]) by the route of [`Purpose::Training`] (for
/// the other, [`forward_prepared`]). Returns `y` [B, C_out, OH, OW].
pub fn forward(
    mode: MatmulMode,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    if winograd_of(mode, g, Purpose::Training) == Some(Winograd::F43) {
        // Its transformed weights go to scratch space rather than a buffer of their own.
        return winograd43::forward(mode, x, w, bias, g);
    }
    let prepared = PreparedWeight::new(mode, Purpose::Training, w, g);
    forward_prepared(&prepared, x, w, bias, g)
}

/// A forward convolution's weights in the form its products read, which depends on the
/// weights, the mode and the weights' shape alone: Winograd's transformed weights (f32, or
/// packed in bf16), or the weights packed in bf16 for the direct product. What [`forward`]
/// otherwise redoes on every call; [`super::weight_cache`] keeps them for models that do not
/// change between calls.
pub struct PreparedWeight {
    prepared: Prepared,
    /// [`PreparedWeight::key`] of the convolution it was made for.
    key: [usize; 6],
}

enum Prepared {
    F43(winograd::Positions<'static>),
    F23(winograd::Positions<'static>),
    Bf16(bf16::PackedLhs),
    /// Packed in bf16 with `k` in tap-major order, for [`bf16::conv_pairs`] ([`reads_pairs`]).
    Pairs(bf16::PackedLhs),
    /// The f32 direct product reads the weights as they are.
    F32,
}

impl PreparedWeight {
    /// The weights `w` of a forward convolution `g` prepared for `mode` and `purpose`.
    pub fn new(mode: MatmulMode, purpose: Purpose, w: &[f32], g: &ConvGeometry) -> Self {
        Self::for_route(mode, winograd_of(mode, g, purpose), w, g)
    }

    /// The weights `w` of a forward convolution `g` prepared for `mode` and the given Winograd
    /// algorithm (`None`: the direct product), whatever [`winograd_of`] would choose: to
    /// compare the routes on one convolution. A Winograd algorithm needs a 3×3 stride-1 `g`.
    pub fn for_route(
        mode: MatmulMode,
        route: Option<Winograd>,
        w: &[f32],
        g: &ConvGeometry,
    ) -> Self {
        assert_eq!(w.len(), g.c_out * g.k(), "conv2d weight size");
        assert!(
            route.is_none() || winograd::applies(g),
            "Winograd's algorithms are for 3x3 stride-1 convolutions"
        );
        let prepared = match (route, mode) {
            (Some(Winograd::F43), _) => Prepared::F43(winograd43::transformed(mode, w, g)),
            (Some(Winograd::F23), _) => Prepared::F23(winograd::transformed(mode, w, g)),
            (None, MatmulMode::Bf16) if reads_pairs(mode, g) => {
                // [C_out, C_in, kh, kw] to [C_out, kh, kw, C_pad], zeros past C_in.
                let (taps, c_pad) = (g.kh * g.kw, pair_channels(g));
                let k = taps * c_pad;
                let mut by_tap = vec![0.0f32; g.c_out * k];
                for (src, dst) in w.chunks(g.k()).zip(by_tap.chunks_mut(k)) {
                    for (ci, tap_values) in src.chunks(taps).enumerate() {
                        for (tap, &v) in tap_values.iter().enumerate() {
                            dst[tap * c_pad + ci] = v;
                        }
                    }
                }
                Prepared::Pairs(bf16::PackedLhs::new(g.c_out, k, (&by_tap, k as isize, 1)))
            }
            (None, MatmulMode::Bf16) => {
                Prepared::Bf16(bf16::PackedLhs::new(g.c_out, g.k(), (w, g.k() as isize, 1)))
            }
            (None, MatmulMode::F32) => Prepared::F32,
        };
        PreparedWeight {
            prepared,
            key: Self::key(g),
        }
    }

    /// What decides the preparation besides the weights and the mode: `[C_out, C_in, kh, kw]`
    /// and the strides.
    pub fn key(g: &ConvGeometry) -> [usize; 6] {
        [g.c_out, g.c_in, g.kh, g.kw, g.stride[0], g.stride[1]]
    }

    /// Whether there is anything to prepare for this convolution in `mode` and `purpose`.
    pub fn needed(mode: MatmulMode, purpose: Purpose, g: &ConvGeometry) -> bool {
        winograd_of(mode, g, purpose).is_some() || mode == MatmulMode::Bf16
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.prepared {
            Prepared::F43(u) | Prepared::F23(u) => u.bytes(),
            Prepared::Bf16(p) | Prepared::Pairs(p) => p.bytes(),
            Prepared::F32 => 0,
        }
    }
}

/// [`forward`] with the weights `w` already prepared as `p` (for the same mode and weight
/// shape): the same bits as [`forward`] where `p` was prepared for [`Purpose::Training`].
pub fn forward_prepared(
    p: &PreparedWeight,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    let (k, n) = (g.k(), g.n());
    assert_eq!(x.len(), g.batch * g.c_in * g.h * g.w, "conv2d input size");
    assert_eq!(w.len(), g.c_out * k, "conv2d weight size");
    assert_eq!(
        p.key,
        PreparedWeight::key(g),
        "weights prepared for another convolution"
    );
    let lhs = match &p.prepared {
        Prepared::F43(u) => return winograd43::forward_with(u, x, bias, g),
        Prepared::F23(u) => return winograd::forward_with(u, x, bias, g),
        Prepared::Pairs(packed) => return forward_pairs(packed, x, bias, g),
        Prepared::Bf16(packed) => Lhs::Bf16(Cow::Borrowed(packed)),
        Prepared::F32 => Lhs::F32 {
            a: (w, k as isize, 1),
            m: g.c_out,
            k,
        },
    };
    if n == 0 || g.batch == 0 {
        return vec![0.0; g.batch * g.c_out * n];
    }
    let par = inner_parallelism(g.batch);
    let image = g.c_in * g.h * g.w;
    let len = g.batch * g.c_out * n;
    super::fresh_output(len, g.c_out * n, true, |b, yb| {
        let xb = &x[b * image..(b + 1) * image];
        if let Lhs::Bf16(packed) = &lhs {
            // The bias is added as the product is written out.
            let write = bias.map_or(bf16::Write::Set, bf16::Write::SetWithBias);
            if g.is_pointwise() {
                let rhs = bf16::Rhs::Strided(xb, n as isize, 1);
                return bf16::matmul(packed, n, rhs, yb, write, par);
            }
            with_padded(xb, g, |img| match img {
                Some(img) => bf16::matmul(packed, n, bf16::Rhs::Padded(img), yb, write, par),
                // Strided convolutions: the column matrix, stored.
                None => with_scratch(k * n, |col| {
                    im2col(xb, g, col);
                    let rhs = bf16::Rhs::Strided(col, n as isize, 1);
                    bf16::matmul(packed, n, rhs, yb, write, par)
                }),
            });
            return;
        }
        if let Some(bias) = bias {
            for (row, &bv) in yb.chunks_mut(n).zip(bias) {
                row.fill(bv);
            }
        }
        let product = |cols: &[f32], yb: &mut [f32]| {
            lhs.product(n, yb, (cols, n as isize, 1), bias.is_some(), par);
        };
        if g.is_pointwise() {
            product(xb, yb);
        } else {
            with_scratch(k * n, |col| {
                im2col(xb, g, col);
                product(col, yb);
            });
        }
    })
    .0
}

/// [`forward_prepared`] by [`bf16::conv_pairs`]: each image laid out in channel pairs once
/// (in a per-thread buffer), its tiles then read in place by every product.
fn forward_pairs(
    packed: &bf16::PackedLhs,
    x: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
) -> Vec<f32> {
    let n = g.n();
    if n == 0 || g.batch == 0 {
        return vec![0.0; g.batch * g.c_out * n];
    }
    let [oh, ow] = g.out_hw();
    let wp = g.w + 2 * g.pad[1];
    let plane = bf16::PairImage::plane_len(oh, wp, g.kh, g.kw);
    let par = inner_parallelism(g.batch);
    let image = g.c_in * g.h * g.w;
    let write = bias.map_or(bf16::Write::Set, bf16::Write::SetWithBias);
    let c_pad = pair_channels(g);
    super::fresh_output(g.batch * g.c_out * n, g.c_out * n, true, |b, yb| {
        let xb = &x[b * image..(b + 1) * image];
        scratch(&PAIRS, c_pad / 2 * plane, |xv| {
            bf16::pack_pairs(xb, [g.c_in, c_pad], [g.h, g.w], g.pad, plane, xv);
            let img = bf16::PairImage {
                xv,
                plane,
                wp,
                kh: g.kh,
                kw: g.kw,
                oh,
                ow,
            };
            bf16::conv_pairs(packed, &img, yb, write, par)
        })
    })
    .0
}

/// Input gradient: `dx[b] = col⁻¹(Wᵀ · dy[b])`. Returns `dx` [B, C_in, H, W].
pub fn backward_input(mode: MatmulMode, dy: &[f32], w: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (k, n) = (g.k(), g.n());
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * n,
        "conv2d output-gradient size"
    );
    let image = g.c_in * g.h * g.w;
    // In bf16 the flipped forward convolution skips the column matrix; in f32 it takes
    // Winograd's path where that applies.
    let via_forward = match mode {
        MatmulMode::Bf16 => !g.is_pointwise(),
        MatmulMode::F32 => use_winograd(g),
    };
    if via_forward
        && n > 0
        && let Some((flipped, gt)) = as_forward(w, g)
    {
        return forward(mode, dy, &flipped, None, &gt);
    }
    if n == 0 || g.batch == 0 {
        return vec![0.0; g.batch * image];
    }
    let par = inner_parallelism(g.batch);
    let wt = Lhs::new(mode, k, g.c_out, (w, 1, k as isize));
    super::fresh_output(g.batch * image, image, true, |b, dxb| {
        let dyb = (&dy[b * g.c_out * n..(b + 1) * g.c_out * n], n as isize, 1);
        if g.is_pointwise() {
            wt.product(n, dxb, dyb, false, par);
        } else {
            with_scratch(k * n, |col| {
                wt.product(n, col, dyb, false, par);
                col2im(col, g, dxb);
            });
        }
    })
    .0
}

/// [`backward_weight`] by [`bf16::grad_taps`] ([`grad_reads_pairs`]): per chunk of
/// [`IMAGES_PER_PARTIAL`] images, the images rounded and padded one after the other and `dy`
/// in pixel pairs over the same pixels (in per-thread buffers), then every block of sums (a
/// tap, 32 input and 32 output channels) read from them in place, so that each block sums a
/// long run of steps. The chunks' sums are added in chunk order, as the other routes do, so
/// the bits depend on the batch alone. Returns `dW` [C_out, C_in, kh, kw] and `db` [C_out],
/// as [`backward_weight`] does. Needs AMX and a stride-1 geometry.
pub fn backward_weight_pairs(x: &[f32], dy: &[f32], g: &ConvGeometry) -> (Vec<f32>, Vec<f32>) {
    assert!(
        g.stride == [1, 1],
        "in-place weight gradients need stride 1"
    );
    assert_eq!(x.len(), g.batch * g.c_in * g.h * g.w, "conv2d input size");
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * g.n(),
        "conv2d output-gradient size"
    );
    let [oh, ow] = g.out_hw();
    let (hp, wp) = (g.h + 2 * g.pad[0], g.w + 2 * g.pad[1]);
    let taps = g.kh * g.kw;
    let offsets: Vec<usize> = (0..taps).map(|t| t / g.kw * wp + t % g.kw).collect();
    let (c, co) = (g.c_in.next_multiple_of(32), g.c_out.next_multiple_of(32));
    let (image, grad) = (g.c_in * g.h * g.w, g.c_out * oh * ow);
    let len = taps * (c / 32) * (co / 32) * 1024;
    let chunks = g.batch.div_ceil(IMAGES_PER_PARTIAL);
    let par = inner_parallelism(chunks);
    let partial: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let first = chunk * IMAGES_PER_PARTIAL;
            let images = IMAGES_PER_PARTIAL.min(g.batch - first);
            // The last image's output pixels end at (images - 1)·hp·wp + oh·wp.
            let kpairs = ((images - 1) * hp * wp + oh * wp).div_ceil(32) * 16;
            let plane = bf16::GradOperands::plane_len(kpairs, (g.kh - 1) * wp + g.kw - 1)
                .max(images * hp * wp);
            scratch(&GRAD_X, c * plane, |xs| {
                bf16::pack_grad_image(
                    &x[first * image..(first + images) * image],
                    [images, g.c_in, c],
                    [g.h, g.w],
                    g.pad,
                    [hp, wp],
                    plane,
                    xs,
                );
                scratch(&GRAD_DY, 2 * co * kpairs, |buf| {
                    let (rows, dyt) = buf.split_at_mut(co * kpairs);
                    bf16::pack_grad_pairs(
                        &dy[first * grad..(first + images) * grad],
                        [images, g.c_out, co],
                        [oh, ow],
                        [hp, wp],
                        kpairs,
                        rows,
                        dyt,
                    );
                    let ops = bf16::GradOperands {
                        x: xs,
                        plane,
                        dyt,
                        kpairs,
                        c,
                        co,
                        offsets: &offsets,
                    };
                    bf16::grad_taps(&ops, par)
                })
            })
        })
        .collect();
    let sums = sum_partials(partial, len);
    // Block (i, o, t), row r, column s holds dW[32o + s, 32i + r, t].
    let mut dw = vec![0.0f32; g.c_out * g.c_in * taps];
    for (blk, block) in sums.chunks(1024).enumerate() {
        let (i, o, t) = (blk / taps / (co / 32), blk / taps % (co / 32), blk % taps);
        for (r, row) in block
            .chunks(32)
            .enumerate()
            .take(g.c_in.saturating_sub(32 * i))
        {
            for (s, &v) in row.iter().enumerate().take(g.c_out.saturating_sub(32 * o)) {
                dw[((32 * o + s) * g.c_in + 32 * i + r) * taps + t] = v;
            }
        }
    }
    (dw, bias_grad(dy, g.batch, g.c_out, oh * ow))
}

/// The input gradient of a stride-1 convolution that keeps the image size, as a forward
/// convolution of `dy`: `dx[ci, y, x] = Σ_co,ky,kx W[co, ci, ky, kx] · dy[co, y - ky + p_h,
/// x - kx + p_w]`, i.e. the weight with input and output channels swapped and the kernel
/// turned by 180°, padding `kh - 1 - p_h` (the transposed convolution of Dumoulin & Visin, "A
/// guide to convolution arithmetic for deep learning", 2016, relationship 8). Returns the
/// weight [C_in, C_out, kh, kw] and the geometry; `None` for other geometries.
fn as_forward(w: &[f32], g: &ConvGeometry) -> Option<(Vec<f32>, ConvGeometry)> {
    let [oh, ow] = g.out_hw();
    if g.stride != [1, 1] || [oh, ow] != [g.h, g.w] || g.pad[0] >= g.kh || g.pad[1] >= g.kw {
        return None;
    }
    let taps = g.kh * g.kw;
    let mut flipped = vec![0.0f32; w.len()];
    for co in 0..g.c_out {
        for ci in 0..g.c_in {
            let src = &w[(co * g.c_in + ci) * taps..][..taps];
            let dst = &mut flipped[(ci * g.c_out + co) * taps..][..taps];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    let gt = ConvGeometry {
        c_in: g.c_out,
        c_out: g.c_in,
        pad: [g.kh - 1 - g.pad[0], g.kw - 1 - g.pad[1]],
        ..*g
    };
    Some((flipped, gt))
}

/// Images per partial sum of the weight and bias gradients.
const IMAGES_PER_PARTIAL: usize = 4;

/// The bias gradient `db[co] = Σ_b,pixels dy[b, co]` of `dy` [B, C_out, n]: per chunk of
/// [`IMAGES_PER_PARTIAL`] images, then the chunks in order, so the bits depend on the batch
/// alone (and not on which algorithm computed the weight gradient).
pub(super) fn bias_grad(dy: &[f32], batch: usize, c_out: usize, n: usize) -> Vec<f32> {
    let chunks = batch.div_ceil(IMAGES_PER_PARTIAL);
    let partial: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let mut part = vec![0.0f32; c_out];
            for b in chunk * IMAGES_PER_PARTIAL..((chunk + 1) * IMAGES_PER_PARTIAL).min(batch) {
                let dyb = &dy[b * c_out * n..(b + 1) * c_out * n];
                for (d, row) in part.iter_mut().zip(dyb.chunks(n.max(1))) {
                    *d += lane_sum(row);
                }
            }
            part
        })
        .collect();
    sum_partials(partial, c_out)
}

/// The element-wise sum of `partial` sums of `len` floats, added in order (the first as it
/// is): a fixed order, so the bits do not depend on which thread made which part. Zeros when
/// there are none.
pub(super) fn sum_partials(partial: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut iter = partial.into_iter();
    let mut sum = iter.next().unwrap_or_else(|| vec![0.0; len]);
    for part in iter {
        sum.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    sum
}

super::wide_fn! {
    /// `Σ row` in [`SUM_LANES`] lanes (element `i` to lane `i % SUM_LANES`, lanes added in
    /// order, then the tail): a fixed order, so the same bits on every machine, that
    /// vectorises where a plain left-to-right sum cannot.
    fn lane_sum_into(row: &[f32], out: &mut f32) {
        let mut lanes = [0.0f32; SUM_LANES];
        let chunks = row.chunks_exact(SUM_LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for l in 0..SUM_LANES {
                lanes[l] += c[l];
            }
        }
        *out = lanes.iter().sum::<f32>() + tail;
    }
}

/// Lanes of [`lane_sum_into`]: one AVX-512 register of f32.
const SUM_LANES: usize = 16;

fn lane_sum(row: &[f32]) -> f32 {
    let mut s = 0.0;
    lane_sum_into(row, &mut s);
    s
}

/// Whether an f32 convolution takes Winograd's F(2×2, 3×3) ([`winograd`]): 3×3 at stride 1,
/// unless `DIFFUSE_KERNELS` leaves `winograd` out.
fn use_winograd(g: &ConvGeometry) -> bool {
    winograd::applies(g) && super::enabled("winograd")
}

/// What a convolution is computed for, which decides its bf16 route ([`bf16_winograd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Tracked by autodiff: a training step, whose input gradient takes the same route.
    Training,
    /// Untracked: sampling, evaluation, serving; the weights' preparation may be kept
    /// ([`super::weight_cache`]).
    Inference,
}

/// Output tiles (4×4 pixels, over the whole batch) from which an inference convolution in bf16
/// takes F(4×4, 3×3) by default. Below it the 36 position products are too small to beat the
/// direct product: `cargo run --release --example conv_routes` on a 2-core AMD EPYC (Zen 4),
/// the direct product's time over F(4×4, 3×3)'s in two runs: 1.08-1.27 (32 channels, 28×28,
/// batches 64 and 128: 3,136 and 6,272 tiles), 1.11-1.14 and 1.64-1.77 (64 and 128 channels,
/// 14×14 and 16×16: 1,024 and 2,048), 1.25-1.67 (64 channels, 32×32); 0.70-0.78 (64
/// channels, 7×7: 256 and 512), 0.83-1.28 (8×8); and 0.24-0.67 at batch 2 (32 to 128 tiles)
/// save one shape.
const F43_MIN_TILES: usize = 1024;

/// Which routes bf16 convolutions on the AVX-512 BF16 engine take ([`bf16_winograd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Routes {
    /// Where it was measured to pay: F(4×4, 3×3) for inference over at least
    /// [`F43_MIN_TILES`] output tiles, the direct product otherwise (training included).
    Measured,
    /// The direct product everywhere.
    Direct,
    /// One Winograd algorithm for every 3×3 stride-1 convolution, training and inference.
    Everywhere(Winograd),
}

impl Bf16Routes {
    /// The routes named `measured`, `direct`, `f23` or `f43` (everywhere).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "measured" => Some(Bf16Routes::Measured),
            "direct" => Some(Bf16Routes::Direct),
            "f23" => Some(Bf16Routes::Everywhere(Winograd::F23)),
            "f43" => Some(Bf16Routes::Everywhere(Winograd::F43)),
            _ => None,
        }
    }

    /// The routes `DIFFUSE_BF16_WINOGRAD` names ([`Bf16Routes::parse`]); anything else, or
    /// unset, [`Bf16Routes::Measured`].
    pub fn from_env() -> Self {
        std::env::var("DIFFUSE_BF16_WINOGRAD")
            .ok()
            .and_then(|v| Bf16Routes::parse(&v))
            .unwrap_or(Bf16Routes::Measured)
    }
}

static ROUTES: std::sync::Mutex<Option<Bf16Routes>> = std::sync::Mutex::new(None);

/// Sets the bf16 routes for the whole process, in place of `DIFFUSE_BF16_WINOGRAD`'s (used by
/// `examples/route_ab.rs` to time two settings step by step in one process). Prepared weights
/// already kept stay valid: [`super::weight_cache`] keys them by route.
pub fn set_bf16_routes(routes: Bf16Routes) {
    *ROUTES.lock().unwrap_or_else(|e| e.into_inner()) = Some(routes);
}

/// The Winograd algorithm of the bf16 forward convolution `g` for `purpose`, as the routes set
/// by [`set_bf16_routes`] (else `DIFFUSE_BF16_WINOGRAD`, [`Bf16Routes::from_env`]) say. Only
/// with the AVX-512 BF16 engine: AMX tiles multiply so much faster than the transforms run
/// that the direct product wins there.
///
/// Why inference and training differ: F(4×4, 3×3) rounds its transformed tiles, about 12 times
/// the direct product's error per convolution (2.6% relative RMS). Sampling a model either way
/// gave the same quality at n = 1,000, while the embedded recipe trained with it for 1,000
/// steps ended 1.4% and 3% higher in FID in two seeds, at the same loss (docs/BENCHMARKS.md,
/// 2026-12-07 session 22). F(2×2, 3×3) costs about twice the direct product's error (0.4%)
/// and trained as well in the same check (within 1% in both seeds), but made a training step
/// no faster: a training step transforms its weights at every call, which on most layers
/// costs more than the smaller products save (`examples/conv_routes.rs`; whole steps of the
/// benchmark U-Net 0.98x at batch 16 and 1.03x at 64 by `examples/route_ab.rs`, session 23).
fn bf16_winograd(purpose: Purpose, g: &ConvGeometry) -> Option<Winograd> {
    if bf16::engine() != Some(bf16::Engine::Avx512) {
        return None;
    }
    let routes = *ROUTES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(Bf16Routes::from_env);
    match (routes, purpose) {
        (Bf16Routes::Direct, _) => None,
        (Bf16Routes::Everywhere(w), _) => Some(w),
        (Bf16Routes::Measured, Purpose::Inference) => {
            let [oh, ow] = g.out_hw();
            let tiles = g.batch * oh.div_ceil(4) * ow.div_ceil(4);
            (tiles >= F43_MIN_TILES).then_some(Winograd::F43)
        }
        (Bf16Routes::Measured, Purpose::Training) => None,
    }
}

/// Winograd's minimal filtering algorithms for 3×3 stride-1 convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Winograd {
    /// F(2×2, 3×3), [`winograd`].
    F23,
    /// F(4×4, 3×3), [`winograd43`].
    F43,
}

/// The Winograd algorithm of a forward convolution (and so of an input gradient) in `mode`
/// for `purpose`: in f32 F(4×4, 3×3) for every one where [`use_winograd`] holds (F(2×2, 3×3)
/// when `DIFFUSE_KERNELS` leaves `f43` out); in bf16 as [`bf16_winograd`] says. Rounding the
/// transformed tiles to bf16 costs accuracy: the relative RMS error of a convolution is about
/// 0.4% by F(2×2, 3×3) and 2.6% by F(4×4, 3×3), against 0.2% for the direct bf16 product
/// (`tests/all/kernels.rs`). `None`: the direct product.
pub fn winograd_of(mode: MatmulMode, g: &ConvGeometry, purpose: Purpose) -> Option<Winograd> {
    if !use_winograd(g) {
        return None;
    }
    match mode {
        MatmulMode::F32 if super::enabled("f43") => Some(Winograd::F43),
        MatmulMode::F32 => Some(Winograd::F23),
        MatmulMode::Bf16 => bf16_winograd(purpose, g),
    }
}

/// Whether [`backward_weight`] in `mode` runs in f32 by Winograd's F(4×4, 3×3) whatever the
/// mode: in bf16 too for 3×3 stride-1 convolutions of at least 16 input channels that do not
/// take [`grad_reads_pairs`] (on AMX, only those whose sums are too large for it; with
/// AVX-512 BF16, all), where it beats the packed bf16 product with exact f32 operands (the
/// benchmark U-Net's weight gradients on a 2-core Xeon: 98 ms against 117 for the packed AMX
/// product at B=16, 399 against 472 at B=64). With fewer input channels the packed product is
/// faster.
pub fn weight_grad_in_f32(mode: MatmulMode, g: &ConvGeometry) -> bool {
    mode == MatmulMode::Bf16
        && g.c_in >= 16
        && use_winograd(g)
        && super::enabled("f43w")
        && !grad_reads_pairs(mode, g)
}

/// Weight and bias gradients: `dW = Σ_b dy[b] · col(x[b])ᵀ` [C_out, C_in, kh, kw] and
/// `db = Σ_b,pixels dy` [C_out].
pub fn backward_weight(
    mode: MatmulMode,
    x: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
) -> (Vec<f32>, Vec<f32>) {
    let (k, n) = (g.k(), g.n());
    let image = g.c_in * g.h * g.w;
    assert_eq!(x.len(), g.batch * image, "conv2d input size");
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * n,
        "conv2d output-gradient size"
    );
    if mode == MatmulMode::F32 && use_winograd(g) {
        return if super::enabled("f43w") {
            winograd43::backward_weight(x, dy, g)
        } else {
            winograd::backward_weight(x, dy, g)
        };
    }
    if weight_grad_in_f32(mode, g) {
        return winograd43::backward_weight(x, dy, g);
    }
    if grad_reads_pairs(mode, g) {
        return backward_weight_pairs(x, dy, g);
    }
    // One accumulator per chunk of IMAGES_PER_PARTIAL images, summed in chunk order at the
    // end: the chunking depends on the batch alone (not on the number of cores), so the sums
    // are the same bits on every machine.
    let per = IMAGES_PER_PARTIAL;
    let workers = g.batch.div_ceil(per).max(1);
    let par = inner_parallelism(workers);
    let bf16 = mode == MatmulMode::Bf16;
    let partial: Vec<Vec<f32>> = (0..workers)
        .into_par_iter()
        .map(|wi| {
            let mut dw = vec![0.0f32; g.c_out * k];
            for b in wi * per..((wi + 1) * per).min(g.batch) {
                let xb = &x[b * image..(b + 1) * image];
                let dyb = &dy[b * g.c_out * n..(b + 1) * g.c_out * n];
                if bf16 {
                    // dWᵀ [K, C_out] += col(x) · dyᵀ: the column matrix, the larger operand, is
                    // packed row by row as it is made; dyᵀ is read down its columns.
                    let col = if g.is_pointwise() {
                        bf16::PackedLhs::new(k, n, (xb, n as isize, 1))
                    } else {
                        with_padded(xb, g, |img| match img {
                            Some(img) => bf16::PackedLhs::from_padded(k, n, img),
                            None => with_scratch(k * n, |col| {
                                im2col(xb, g, col);
                                bf16::PackedLhs::new(k, n, (col, n as isize, 1))
                            }),
                        })
                    };
                    let dyt = bf16::Rhs::Strided(dyb, 1, n as isize);
                    bf16::matmul(&col, g.c_out, dyt, &mut dw, bf16::Write::Add, par);
                    continue;
                }
                let lhs = Lhs::new(mode, g.c_out, n, (dyb, n as isize, 1));
                let product = |cols: &[f32], dw: &mut [f32]| {
                    lhs.product(k, dw, (cols, 1, n as isize), true, par);
                };
                if g.is_pointwise() {
                    product(xb, &mut dw);
                } else {
                    with_scratch(k * n, |col| {
                        im2col(xb, g, col);
                        product(col, &mut dw);
                    });
                }
            }
            dw
        })
        .collect();
    let db = bias_grad(dy, g.batch, g.c_out, n);
    let mut dw = sum_partials(partial, g.c_out * k);
    if bf16 {
        // dWᵀ [K, C_out] back to dW [C_out, K].
        let t = crate::weights::HostTensor {
            shape: vec![k, g.c_out],
            data: dw,
        };
        dw = crate::weights::transpose(&t).data;
    }
    (dw, db)
}
