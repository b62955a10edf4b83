//! bf16 matrix products with f32 sums: the bf16 mixed-precision path of the convolution
//! kernels ([`super::MatmulMode::Bf16`]; the f32 path is the `gemm` crate's). Two engines run
//! the same packed operands, chosen once per process ([`engine`]):
//!
//! - [`Engine::Amx`], Intel AMX tiles (`TDPBF16PS`; Xeon 4th generation, "Sapphire Rapids",
//!   and later);
//! - [`Engine::Avx512`], AVX-512 BF16 dot products (`VDPBF16PS`: each f32 lane adds the
//!   products of one pair of bf16 values; AMD Zen 4 and later, Intel Cooper Lake and later),
//!   twice the multiplications of an f32 fused multiply-add per instruction.
//!
//! `C[m×n] = A[m×k] · B[k×n]` with f32 operands in memory, given by (row, column) strides,
//! each operand rounded to bf16 (round to nearest even) and the products summed in f32:
//!
//! - `A` is packed once into 16×32 bf16 tiles (row-major, 64 bytes a row), two tiles (32 rows)
//!   per block and step of 32 along `k`, zero-padded past `m` and `k`;
//! - `B` is packed chunk by chunk along `k` into panels of 32 columns in the "VNNI" layout the
//!   instructions read: tile row `q` holds `B[2q, j], B[2q+1, j]` for the tile's 16 columns;
//! - on AMX, one step of the micro-kernel loads two `A` and two `B` tiles and issues four
//!   `TDPBF16PS` into four f32 accumulator tiles (a 32×32 block of `C`), so every tile load
//!   serves two products (Intel, "Intel 64 and IA-32 Architectures Optimization Reference
//!   Manual", chapter 20, AMX; eight tile registers allow this 2×2 blocking);
//! - with AVX-512 BF16 the same 32×32 block is computed in four passes of 8 rows: for each
//!   pair row `q`, a tile row of `B` is one 16-lane vector of pairs, and each row's pair
//!   `A[i, 2q], A[i, 2q+1]` is broadcast to all lanes, so one `VDPBF16PS` adds 32 products
//!   into 16 accumulators of `C`; 16 accumulators (8 rows × 32 columns) stay in registers
//!   over the whole of `k` (Intel, "Intel Architecture Instruction Set Extensions
//!   Programming Reference", VDPBF16PS).
//!
//! For stride-1 convolutions with 24 or more input channels (a multiple of 8, padded with zero
//! channels to a multiple of 32), AMX loads the `B` tiles straight from the image laid out
//! once in channel pairs ([`PairImage`], [`conv_pairs`]), with no packing per product.
//!
//! Each product `a·b` of two bf16 values is exact in f32, so the error against f32 arithmetic
//! is the rounding of the operands: at most 2⁻⁹ relative per operand. Results are exactly
//! reproducible: every block of `C` is summed by one thread in a fixed order, and the chunks
//! along `k` depend on the operands' sizes only. The two engines add the pairs in different
//! orders, so their results may differ in the last bits; one machine always uses the same one.

use rayon::prelude::*;
use std::cell::RefCell;

/// Rows (of `A`) and columns (of `B`) in one block: two tiles of 16.
const BLOCK: usize = 32;
/// `k` in one step: 32 bf16 values, one 64-byte tile row.
const KSTEP: usize = 32;
/// bf16 values in one block-step of a packed operand: two 16×32 tiles.
const BLOCK_STEP: usize = 2 * 16 * KSTEP;
/// u32s (bf16 pairs) in one step of a packed panel of `B`.
const STEP_U32: usize = BLOCK_STEP / 2;
/// Bytes of each packed operand per chunk of a product (see `columns`).
const CHUNK_BYTES: usize = 384 * 1024;

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The instructions that run the bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Intel AMX tiles (`TDPBF16PS`).
    Amx,
    /// AVX-512 BF16 dot products on vector registers (`VDPBF16PS`).
    Avx512,
}

impl Engine {
    /// The engine's name as `DIFFUSE_BF16_ENGINE` takes it and the benchmark reports it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Amx => "amx",
            Engine::Avx512 => "avx512-bf16",
        }
    }
}

/// The engine of this process, decided once: AMX where the processor has AMX-TILE, AMX-BF16
/// and AVX-512 BF16, the kernel grants the tile data permission (Linux
/// `arch_prctl(ARCH_REQ_XCOMP_PERM)`) and a small product on the tiles equals the same product
/// in plain arithmetic; else AVX-512 BF16 where the processor has it (with AVX-512 F and BW)
/// and passes the same check; else none. `DIFFUSE_BF16_ENGINE=avx512-bf16` skips AMX (to
/// measure the other engine on an AMX machine), `amx` allows AMX only; `DIFFUSE_SIMD=avx2`
/// ([`super::simd_capped`]) allows none.
pub fn engine() -> Option<Engine> {
    static ENGINE: std::sync::OnceLock<Option<Engine>> = std::sync::OnceLock::new();
    *ENGINE.get_or_init(|| {
        if super::simd_capped() {
            return None;
        }
        let only = std::env::var("DIFFUSE_BF16_ENGINE").ok();
        let allowed = |e: Engine| only.as_deref().is_none_or(|o| o == e.name());
        [Engine::Amx, Engine::Avx512]
            .into_iter()
            .find(|&e| allowed(e) && imp::supported(e) && self_test(e))
    })
}

/// `dst[i] = bf16(src[i])` (round to nearest even, as the products round their operands), in
/// AVX-512 BF16 conversions (`VCVTNEPS2BF16`), which read subnormal inputs as zero, as the
/// packing of every operand does. Needs [`available`].
pub fn round_into(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "bf16 rounding: lengths differ");
    imp::round_into(src, dst)
}

/// Writes `src` (an image `[h, w]`) rounded to bf16 ([`round_into`]) into `plane`, a grid
/// `wp` wide, with its top-left pixel at `(top, left)`, and zeros everywhere else in `plane`,
/// which must hold the image's last row. Needs [`available`].
pub fn round_padded(
    src: &[f32],
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    wp: usize,
    plane: &mut [u16],
) {
    assert!(
        src.len() == h * w
            && left + w <= wp
            && (h == 0 || (top + h - 1) * wp + left + w <= plane.len()),
        "padded plane: bad sizes"
    );
    // The gaps between rows are short (two values for a padding of one): a call of memset for
    // each took 2% of sampling one image.
    let zero = |gap: &mut [u16]| match gap {
        [] => {}
        [a] => *a = 0,
        [a, b] => (*a, *b) = (0, 0),
        _ => gap.fill(0),
    };
    let mut next = 0;
    for (y, row) in src.chunks_exact(w.max(1)).take(h).enumerate() {
        let at = (top + y) * wp + left;
        zero(&mut plane[next..at]);
        round_into(row, &mut plane[at..at + w]);
        next = at + w;
    }
    zero(&mut plane[next..]);
}

/// Whether this process runs bf16 products (see [`engine`]).
pub fn available() -> bool {
    engine().is_some()
}

/// A 40×70 by 70×45 product (edges in every dimension, both layouts of `B`) on `engine`
/// against the plain sum: products of small integers are exact in bf16, so the results must be
/// equal.
fn self_test(engine: Engine) -> bool {
    let (m, k, n) = (40, 70, 45);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
    let bt: Vec<f32> = (0..k * n).map(|i| b[(i % k) * n + i / k]).collect();
    let packed = PackedLhs::new(m, k, (&a, k as isize, 1));
    let want = |i: usize, j: usize| 1.0 + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
    [
        Rhs::Strided(&b, n as isize, 1),
        Rhs::Strided(&bt, 1, k as isize),
    ]
    .into_iter()
    .all(|rhs| {
        let mut c = vec![1.0f32; m * n];
        matmul_on(engine, &packed, n, rhs, &mut c, Write::Add, false);
        (0..m).all(|i| (0..n).all(|j| c[i * n + j] == want(i, j)))
    })
}

/// The right operand of [`matmul`]: values with (row, column) strides, or the column matrix
/// of a stride-1 convolution read straight from the padded image.
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    Strided(&'a [f32], isize, isize),
    Padded(&'a PaddedImage<'a>),
}

/// One image, zero-padded and already rounded to bf16, as the column matrix `col(x)` of a
/// stride-1 convolution: row `(ci, ky, kx)` at output pixel `(oy, ox)` is `xp[ci, oy + ky,
/// ox + kx]` (see `conv2d::im2col` for the layout), so each output row's part of a row is
/// contiguous. Rounding the image once, rather than each of the `kh·kw` rows that read a
/// pixel, halves what the packing reads and drops its conversions: the same bits, since the
/// products round their operands to nearest even either way.
pub struct PaddedImage<'a> {
    /// `[C_in, hp, wp]`, bf16 bits (see [`round_into`]).
    pub xp: &'a [u16],
    pub hp: usize,
    pub wp: usize,
    pub kh: usize,
    pub kw: usize,
    /// Output width.
    pub ow: usize,
}

impl PaddedImage<'_> {
    /// Where row `p` of the column matrix starts in `xp` (at output pixel 0).
    pub(crate) fn base(&self, p: usize) -> usize {
        let (ci, ky, kx) = (
            p / (self.kh * self.kw),
            (p / self.kw) % self.kh,
            p % self.kw,
        );
        ci * self.hp * self.wp + ky * self.wp + kx
    }

    /// Writes the row starting at `base` (see [`PaddedImage::base`]), output pixels
    /// `j0..j0 + out.len()`, into `out` (as f32: exact).
    pub(crate) fn read(&self, base: usize, j0: usize, out: &mut [f32]) {
        let mut filled = 0;
        while filled < out.len() {
            let j = j0 + filled;
            let (oy, ox) = (j / self.ow, j % self.ow);
            let len = (self.ow - ox).min(out.len() - filled);
            let src = &self.xp[base + oy * self.wp + ox..][..len];
            for (o, &h) in out[filled..filled + len].iter_mut().zip(src) {
                *o = f32_of(h);
            }
            filled += len;
        }
    }
}

/// One image laid out so that a stride-1 convolution on AMX loads its `B` tiles straight from
/// it ([`conv_pairs`]), with no packing per product: zero-padded, rounded to bf16, and in
/// channel pairs, the "VNNI" layout `TDPBF16PS` reads: u32 `q·plane + y·wp + x` holds the
/// bf16 values of channels `2q` (low half) and `2q + 1` (high half) at padded pixel `(y, x)`.
/// Sixteen pairs of channels at sixteen consecutive pixels are then one tile, sixteen rows
/// `plane` u32s apart; for kernel tap `(ky, kx)` the tile of output pixels `j..j + 16`
/// (counted over the padded width, `j = oy·wp + ox`) starts at `ky·wp + kx + j`.
pub struct PairImage<'a> {
    /// `[C / 2][plane]` (`C`: the input channels padded to a multiple of 32), filled by
    /// [`pack_pairs`].
    pub xv: &'a [u32],
    /// u32s per pair of channels ([`PairImage::plane_len`]).
    pub plane: usize,
    /// Padded width.
    pub wp: usize,
    pub kh: usize,
    pub kw: usize,
    /// Output height and width.
    pub oh: usize,
    pub ow: usize,
}

impl PairImage<'_> {
    /// u32s per pair of channels: the columns [`conv_pairs`] computes (`oh·wp`, in whole
    /// panels of 32) plus the farthest tap's offset, so that every tile load stays inside;
    /// rounded up to an odd number of 64-byte lines, so that the sixteen rows of a tile, one
    /// per plane, do not all fall into the same level-1 cache set.
    pub fn plane_len(oh: usize, wp: usize, kh: usize, kw: usize) -> usize {
        let need = (oh * wp).div_ceil(BLOCK) * BLOCK + (kh - 1) * wp + (kw - 1);
        16 * (need.div_ceil(16) | 1)
    }
}

/// Fills `out` (`c_pad / 2` planes of `plane` u32s) with the image `x` [c, h, w] zero-padded
/// by `pad` on each side, as [`PairImage`] lays it out, channels `c..c_pad` zero; everything
/// past the padded image in each plane is zero. `c_pad` must be even and at least `c`. Needs
/// [`available`].
pub fn pack_pairs(
    x: &[f32],
    [c, c_pad]: [usize; 2],
    [h, w]: [usize; 2],
    pad: [usize; 2],
    plane: usize,
    out: &mut [u32],
) {
    let (hp, wp) = (h + 2 * pad[0], w + 2 * pad[1]);
    assert!(
        c_pad % 2 == 0 && c_pad >= c,
        "pair image: {c_pad} channels cannot hold {c} in pairs"
    );
    assert_eq!(x.len(), c * h * w, "pair image: input size");
    assert!(
        plane >= hp * wp && out.len() >= c_pad / 2 * plane,
        "pair image: buffer too small"
    );
    imp::pack_pairs(x, [c, c_pad], [h, w], pad, plane, out)
}

/// `dst[m × oh·ow]` = `A · col(x)` (or as `write` says) for a stride-1 convolution on AMX, with
/// each `B` tile loaded straight from the image in pairs ([`PairImage`]) instead of packed
/// for every product (`pack_padded`, 11.7% of the bf16 benchmark U-Net's time on a 2-core
/// Xeon with AMX, docs/BENCHMARKS.md session 27). The product runs over the padded width (`oh·wp` columns, the `wp - ow`
/// extra ones per row discarded as the result is written), so that sixteen consecutive
/// columns are always sixteen consecutive pixels of the padded image.
///
/// `a` is the weight `[C_out, C_in, kh, kw]` with `k` in tap-major order, `A[co, (ky·kw +
/// kx)·C + ci]`, its input channels padded with zeros to `C`, a multiple of 32 (the image's
/// likewise, [`pack_pairs`]): each step of 32 along `k` is then one tap and 32 channels, whose
/// tile of `B` starts at a fixed offset. Each 32×32 block of the result sums its steps in
/// order on one thread, so the bits do not depend on the thread count.
pub fn conv_pairs(a: &PackedLhs, img: &PairImage, dst: &mut [f32], write: Write, parallel: bool) {
    assert_eq!(engine(), Some(Engine::Amx), "pair-image products need AMX");
    let taps = img.kh * img.kw;
    let c = a.k / taps;
    assert!(
        a.k == taps * c && c % KSTEP == 0,
        "pair-image products need a multiple of 32 input channels"
    );
    let (m, n) = (a.m, img.oh * img.ow);
    assert!(dst.len() >= m * n, "bf16 product: destination too small");
    if let Write::SetWithBias(bias) = write {
        assert!(bias.len() >= m, "bf16 product: bias too short");
    }
    let cols = img.oh * img.wp;
    let panels = cols.div_ceil(BLOCK);
    assert!(
        img.wp >= img.ow + img.kw - 1
            && img.plane >= panels * BLOCK + (img.kh - 1) * img.wp + img.kw - 1
            && img.xv.len() >= c / 2 * img.plane,
        "pair image too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Byte offset of step s's first B tile from the panel's column 0: its tap and its 16
    // pairs of channels.
    let per_tap = c / KSTEP;
    let offsets: Vec<usize> = (0..a.steps)
        .map(|s| {
            let (tap, cb) = (s / per_tap, s % per_tap);
            4 * (cb * 16 * img.plane + (tap / img.kw) * img.wp + tap % img.kw)
        })
        .collect();
    let blocks = m.div_ceil(BLOCK);
    let out = SharedDst(dst.as_mut_ptr());
    by_panels(panels, parallel, |range| {
        #[repr(align(64))]
        struct Acc([f32; BLOCK * BLOCK]);
        let mut acc = Acc([0.0; BLOCK * BLOCK]);
        // (column in the panel, output pixel, length) of each run of kept columns.
        let mut runs = Vec::with_capacity(BLOCK);
        imp::with_tiles(|| {
            for p in range {
                runs.clear();
                let (mut j, end) = (p * BLOCK, ((p + 1) * BLOCK).min(cols));
                while j < end {
                    let (oy, ox) = (j / img.wp, j % img.wp);
                    let len = (img.wp - ox).min(end - j);
                    if ox < img.ow {
                        runs.push((j - p * BLOCK, oy * img.ow + ox, len.min(img.ow - ox)));
                    }
                    j += len;
                }
                let b = img.xv[p * BLOCK..].as_ptr().cast::<u8>();
                for blk in 0..blocks {
                    let a_blk = &a.data[blk * a.steps * BLOCK_STEP..][..a.steps * BLOCK_STEP];
                    // SAFETY: AMX runs (checked above) with the tiles configured; `a_blk`
                    // holds `a.steps` block-steps; every B tile row read lies inside `xv`
                    // (the plane holds the panels and the farthest tap, checked above);
                    // `acc` holds 32×32 floats.
                    unsafe {
                        imp::block_taps(
                            a_blk.as_ptr(),
                            b,
                            &offsets,
                            4 * img.plane,
                            acc.0.as_mut_ptr(),
                        )
                    };
                    for i in blk * BLOCK..m.min((blk + 1) * BLOCK) {
                        for &(jc, at, len) in &runs {
                            // SAFETY: row i < m and pixels at..at + len < n lie inside dst
                            // (checked above); panels of different threads hold disjoint
                            // pixels.
                            let row =
                                unsafe { std::slice::from_raw_parts_mut(out.at(i * n + at), len) };
                            let src = &acc.0[(i % BLOCK) * BLOCK + jc..][..len];
                            imp::write_row(row, src, write, i);
                        }
                    }
                }
            }
        });
    });
}

/// The operands of a stride-1 convolution's weight gradient on AMX, laid out so that
/// [`grad_taps`] loads every tile in place, with nothing packed per product: the image
/// `x` as the left operand (sixteen input channels, 32 consecutive pixels each, are one
/// tile, for any tap), the output gradient `dy` as the right one, in the pairs `TDPBF16PS`
/// reads (sixteen output channels at one pair of pixels are one 64-byte tile row).
///
/// The images of a chunk lie one after the other, each zero-padded to `hp × wp`, and pixels
/// are counted over them: `q = b·hp·wp + oy·wp + ox` for output pixel `(oy, ox)` of image `b`.
/// Tap `(ky, kx)` then meets input pixel `q + ky·wp + kx`, and the columns `ox ≥ ow` and the
/// rows `oy ≥ oh` of each image's grid carry a zero gradient.
pub struct GradOperands<'a> {
    /// `[C][plane]` bf16 bits: the zero-padded images, image `b`'s padded pixel `(y, x)` at
    /// `b·hp·wp + y·wp + x`, then zeros to the end of each plane; channels past the images'
    /// zero ([`pack_grad_image`]).
    pub x: &'a [u16],
    /// u16s per channel of `x`: at least `2·kpairs` plus the farthest tap's offset.
    pub plane: usize,
    /// `[kpairs][co]`: u32 `j·co + c` holds output channel `c`'s gradient at pixels `2j` (low
    /// half) and `2j + 1` (high half) as bf16 ([`pack_grad_pairs`]).
    pub dyt: &'a [u32],
    /// Pairs of pixels summed over, a multiple of 16 (whole steps of 32 pixels).
    pub kpairs: usize,
    /// Input and output channels of the operands, multiples of 32.
    pub c: usize,
    pub co: usize,
    /// Each tap's offset in pixels, `ky·wp + kx`.
    pub offsets: &'a [usize],
}

impl GradOperands<'_> {
    /// u16s per channel of [`GradOperands::x`] for `kpairs` pairs of pixels and taps as far
    /// as `max_offset`, rounded up to an odd number of 64-byte lines (as
    /// [`PairImage::plane_len`], so that the sixteen rows of a tile spread over the cache's sets).
    pub fn plane_len(kpairs: usize, max_offset: usize) -> usize {
        32 * ((2 * kpairs + max_offset).div_ceil(32) | 1)
    }

    /// Floats of the sums [`grad_taps`] returns: one 32×32 block per pair of blocks of
    /// input and output channels and tap.
    pub fn sums_len(&self) -> usize {
        self.offsets.len() * (self.c / 32) * (self.co / 32) * BLOCK * BLOCK
    }
}

/// Fills `out` (`c_pad` planes of `plane` u16s) with the `images` images of `x` [images, c,
/// h, w] rounded to bf16, each placed at `(top, left)` of its own zero grid `[hp, wp]`, the
/// grids one after the other in each plane (image `b`'s pixel `(y, x)` at `b·hp·wp + (top +
/// y)·wp + left + x`): with `(top, left)` the padding, the zero-padded images that
/// [`GradOperands::x`] holds. Channels `c..c_pad` and every u16 past the last image's last
/// row are zero; `plane` may cut the last grid short after that row. Needs [`available`].
pub fn pack_grad_image(
    x: &[f32],
    [images, c, c_pad]: [usize; 3],
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    [hp, wp]: [usize; 2],
    plane: usize,
    out: &mut [u16],
) {
    assert_eq!(x.len(), images * c * h * w, "gradient image: input size");
    assert!(
        c_pad >= c && top + h <= hp && left + w <= wp && out.len() >= c_pad * plane,
        "gradient image: bad sizes"
    );
    out[..c_pad * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(ci, dst)| {
            if ci >= c {
                dst.fill(0);
                return;
            }
            for b in 0..images {
                let end = ((b + 1) * hp * wp).min(plane);
                round_padded(
                    &x[(b * c + ci) * h * w..][..h * w],
                    [h, w],
                    [top, left],
                    wp,
                    &mut dst[b * hp * wp..end],
                );
            }
            dst[(images * hp * wp).min(plane)..].fill(0);
        });
}

/// Fills `out` ([`GradOperands::dyt`]: `kpairs` rows of `co_pad` u32s) with the output
/// gradients `dy` [images, co, oh, ow] laid over the images' padded pixels as
/// [`pack_grad_image`] lays them out (`[hp, wp]`, the padded image size): pixel `b·hp·wp +
/// oy·wp + ox` of channel `c` is `dy[b, c, oy, ox]` rounded to bf16 where `oy < oh` and `ox <
/// ow`, zero elsewhere (as are channels `co..co_pad`). `rows` is scratch space for `co_pad · kpairs`
/// u32s. Needs [`available`].
pub fn pack_grad_pairs(
    dy: &[f32],
    [images, co, co_pad]: [usize; 3],
    [oh, ow]: [usize; 2],
    [hp, wp]: [usize; 2],
    kpairs: usize,
    rows: &mut [u32],
    out: &mut [u32],
) {
    assert_eq!(
        dy.len(),
        images * co * oh * ow,
        "gradient pairs: input size"
    );
    let last = images.saturating_sub(1) * hp * wp + oh * wp;
    assert!(
        co_pad.is_multiple_of(16)
            && kpairs.is_multiple_of(16)
            && co_pad >= co
            && ow <= wp
            && oh <= hp
            && 2 * kpairs >= last
            && rows.len() >= co_pad * kpairs
            && out.len() >= co_pad * kpairs,
        "gradient pairs: bad sizes"
    );
    // Each channel's row over the padded pixels, as bf16 (two to a u32), then the rows turned
    // into columns, sixteen by sixteen.
    // SAFETY: u16 has no invalid bits and half the size and alignment of u32.
    let halves = unsafe {
        std::slice::from_raw_parts_mut(rows.as_mut_ptr().cast::<u16>(), 2 * co_pad * kpairs)
    };
    pack_grad_image(
        dy,
        [images, co, co_pad],
        [oh, ow],
        [0, 0],
        [hp, wp],
        2 * kpairs,
        halves,
    );
    // Sixteen rows of `out` (sixteen pairs of pixels) at a time, from every channel.
    let rows = &*rows;
    out[..kpairs * co_pad]
        .par_chunks_mut(16 * co_pad)
        .enumerate()
        .for_each(|(jb, dst)| {
            for cb in (0..co_pad).step_by(16) {
                imp::transpose16(
                    &rows[cb * kpairs + 16 * jb..],
                    kpairs,
                    &mut dst[cb..],
                    co_pad,
                );
            }
        });
}

/// The sums `S[(i, o, t)] = Σ_q x[32i + r, q + offsets[t]] · dy[32o + s, q]` over the pixels
/// `q < 2·kpairs`, for every 32×32 block of input channels `i` and output channels `o` and
/// every tap `t`: block `(i, o, t)` (row `r` an input channel, column `s` an output channel)
/// at `((i·CO/32 + o)·taps + t)·1024` of the [`GradOperands::sums_len`] floats returned. Each
/// block sums its steps of 32 pixels in order on one thread (the blocks spread over the
/// threads when `parallel`), so the bits do not depend on the thread count. The blocks start
/// from zero in the tiles and are stored once, so the result is never zero-filled nor read
/// back. Needs AMX.
pub fn grad_taps(ops: &GradOperands, parallel: bool) -> Vec<f32> {
    assert_eq!(
        engine(),
        Some(Engine::Amx),
        "in-place weight gradients need AMX"
    );
    let max_offset = ops.offsets.iter().copied().max().unwrap_or(0);
    assert!(
        ops.c.is_multiple_of(BLOCK)
            && ops.co.is_multiple_of(BLOCK)
            && ops.kpairs.is_multiple_of(16)
            && ops.plane >= 2 * ops.kpairs + max_offset
            && ops.x.len() >= ops.c * ops.plane
            && ops.dyt.len() >= ops.kpairs * ops.co,
        "weight gradient operands: bad sizes"
    );
    let steps = ops.kpairs / 16;
    let taps = ops.offsets.len();
    let co_blocks = ops.co / BLOCK;
    let len = ops.sums_len();
    let blocks = len / (BLOCK * BLOCK);
    if steps == 0 || blocks == 0 {
        return vec![0.0; len];
    }
    let mut sums: Vec<f32> = Vec::with_capacity(len);
    let out = SharedDst(sums.as_mut_ptr());
    // Consecutive blocks are the taps of one pair of channel blocks: they read the same rows
    // of `dy` and nearly the same pixels of `x`.
    by_panels(blocks, parallel, |range| {
        imp::with_tiles(|| {
            for blk in range {
                let (i, o, t) = (blk / taps / co_blocks, blk / taps % co_blocks, blk % taps);
                // SAFETY: AMX runs (checked above) with the tiles configured; the `x` rows
                // 32i..32i + 32 hold `2·kpairs + offsets[t] ≤ plane` u16s from the offset and
                // the `dyt` rows `kpairs` columns 32o..32o + 32 (sizes checked above); block
                // `blk` lies inside the capacity of `sums` and no other thread writes it.
                unsafe {
                    imp::block_strided(
                        ops.x[i * BLOCK * ops.plane + ops.offsets[t]..]
                            .as_ptr()
                            .cast(),
                        2 * ops.plane,
                        ops.dyt[o * BLOCK..].as_ptr().cast(),
                        4 * ops.co,
                        steps,
                        out.at(blk * BLOCK * BLOCK),
                    )
                };
            }
        })
    });
    // SAFETY: every block of the `len` floats was stored above (all 32×32 floats of each).
    unsafe { sums.set_len(len) };
    sums
}

/// Runs `f` on `panels` split into contiguous ranges, one per rayon thread when `parallel`
/// (else one range on the calling thread); empty ranges are skipped.
fn by_panels(panels: usize, parallel: bool, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let groups = if parallel {
        rayon::current_num_threads().min(panels).max(1)
    } else {
        1
    };
    let per = panels.div_ceil(groups);
    let run = |g: usize| {
        let range = (g * per).min(panels)..((g + 1) * per).min(panels);
        if !range.is_empty() {
            f(range);
        }
    };
    if groups > 1 {
        (0..groups).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// The left operand of a product, packed into bf16 tiles once and reusable for any number of
/// right operands (e.g. a convolution's weights for every image of a batch).
#[derive(Clone)]
pub struct PackedLhs {
    m: usize,
    k: usize,
    /// Steps of `KSTEP` along `k`.
    steps: usize,
    /// `[block][step][tile][row][KSTEP]`.
    data: Vec<u16>,
}

impl PackedLhs {
    /// Packs `A[m×k]`, element `(i, p)` at `a.0[i·a.1 + p·a.2]`.
    pub fn new(m: usize, k: usize, a: (&[f32], isize, isize)) -> Self {
        let (src, rs, cs) = a;
        if cs != 1 || rs < k as isize {
            // Rows not contiguous: gather (or transpose) into row-major order first.
            let rows = to_row_major(m, k, a);
            return PackedLhs::new(m, k, (&rows, k as isize, 1));
        }
        let steps = k.div_ceil(KSTEP);
        let mut data = vec![0u16; m.div_ceil(BLOCK) * steps * BLOCK_STEP];
        let rs = rs as usize;
        data.par_chunks_mut(steps * BLOCK_STEP)
            .enumerate()
            .for_each(|(blk, out)| {
                let rows = BLOCK.min(m - blk * BLOCK);
                imp::pack_lhs_block(&src[blk * BLOCK * rs..], rs, rows, k, out);
            });
        PackedLhs { m, k, steps, data }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.data.len()
    }

    /// Packs the column matrix of a padded image (`m` rows, `k` output pixels) as `A`, row by
    /// row, without storing it whole.
    pub fn from_padded(m: usize, k: usize, img: &PaddedImage) -> Self {
        let steps = k.div_ceil(KSTEP);
        let mut data = vec![0u16; m.div_ceil(BLOCK) * steps * BLOCK_STEP];
        data.par_chunks_mut(steps * BLOCK_STEP)
            .enumerate()
            .for_each(|(blk, out)| {
                let count = BLOCK.min(m - blk * BLOCK);
                let mut buf = vec![0.0f32; count * k];
                for (r, row) in buf.chunks_mut(k.max(1)).enumerate() {
                    img.read(img.base(blk * BLOCK + r), 0, row);
                }
                imp::pack_lhs_block(&buf, k, count, k, out);
            });
        PackedLhs { m, k, steps, data }
    }
}

/// `A[m×k]` given by strides, copied out row-major; a transposed operand (`a.1 = 1`) is
/// transposed in 32×32 blocks so that both sides stay in cache.
fn to_row_major(m: usize, k: usize, (src, rs, cs): (&[f32], isize, isize)) -> Vec<f32> {
    let mut out = vec![0.0f32; m * k];
    const T: usize = 32;
    for i0 in (0..m).step_by(T) {
        for p0 in (0..k).step_by(T) {
            for p in p0..(p0 + T).min(k) {
                for i in i0..(i0 + T).min(m) {
                    out[i * k + p] = src[(i as isize * rs + p as isize * cs) as usize];
                }
            }
        }
    }
    out
}

thread_local! {
    /// Per-thread buffers: one chunk of the packed right operand (u32: two bf16 values), and
    /// the f32 accumulators of the columns the thread computes.
    static BUFFERS: RefCell<(Vec<u32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Packs rows `p0..p1` and columns `j0..j1` of `B` (zeros past `j1` and `p1` up to whole
/// panels and steps) into `out`, panel after panel (`panel_stride` u32s apart), each laid out
/// `[step][tile][pair row][column]` (u32 pairs, 256 per tile) with
/// `B[p0 + 32·step + 2·pair + t, j0 + 32·panel + 16·tile + column]` in half `t`.
fn pack_chunk(
    (p0, p1): (usize, usize),
    (j0, j1): (usize, usize),
    b: Rhs,
    out: &mut [u32],
    panel_stride: usize,
) {
    let (rows, cols) = (p1 - p0, j1 - j0);
    if cols % BLOCK != 0 || rows % KSTEP != 0 {
        match b {
            // `pack_cols` leaves the columns past `cols` of a tile unwritten.
            Rhs::Strided(_, rs, cs) if cs != 1 && rs == 1 => out.fill(0),
            _ => zero_margins(rows, cols, panel_stride, out),
        }
    }
    let layout = imp::Layout {
        rows,
        cols,
        panel_stride,
    };
    let (src, rs, cs) = match b {
        Rhs::Strided(src, rs, cs) => (src, rs, cs),
        Rhs::Padded(img) => {
            imp::pack_padded(img, (p0, p1), j0, &layout, out);
            return;
        }
    };
    // The operand from row p0, column j0 on.
    let origin = (p0 as isize * rs + j0 as isize * cs) as usize;
    let last = ((rows - 1) as isize * rs + (cols - 1) as isize * cs) as usize;
    let view = &src[origin..=origin + last];
    if cs == 1 {
        imp::pack_rows(view, rs as usize, &layout, out);
    } else if rs == 1 {
        imp::pack_cols(view, cs as usize, &layout, out);
    } else {
        let tmp = to_row_major(rows, cols, (view, rs, cs));
        imp::pack_rows(&tmp, cols, &layout, out);
    }
}

/// Zeroes what the row packers (`imp::pack_rows`, `imp::pack_padded`, which write every pair
/// row they pack in whole 16-column tiles) leave unwritten of a chunk of `rows` × `cols` laid
/// out as in [`pack_chunk`]: the pair rows past the last, up to a whole step, and the second
/// tile of a last panel that has only one. Zeroing the whole chunk instead took 5% of sampling
/// one image in bf16 (28×28 images: 784 columns, half a panel over).
fn zero_margins(rows: usize, cols: usize, panel_stride: usize, out: &mut [u32]) {
    let (panels, steps) = (cols.div_ceil(BLOCK), rows.div_ceil(KSTEP));
    for panel in out.chunks_mut(panel_stride).take(panels) {
        for q in rows.div_ceil(2)..steps * 16 {
            let (step, prow) = (q / 16, q % 16);
            for tile in 0..2 {
                panel[step * STEP_U32 + (tile * 16 + prow) * 16..][..16].fill(0);
            }
        }
    }
    if cols.div_ceil(16) % 2 == 1 {
        let last = &mut out[(panels - 1) * panel_stride..];
        for step in 0..steps {
            last[step * STEP_U32 + 256..][..256].fill(0);
        }
    }
}

/// How [`matmul`] writes its result `C` into `dst`.
#[derive(Clone, Copy)]
pub enum Write<'a> {
    /// `dst = C`.
    Set,
    /// `dst += C`.
    Add,
    /// `dst[i, j] = C[i, j] + bias[i]` (a convolution's bias, added on the way out).
    SetWithBias(&'a [f32]),
}

/// `dst[m×n] = C = A · B` (or as `write` says) with `A` packed and `B[k×n]` given by strides
/// (element `(p, j)` at `src[p·rs + j·cs]`) or made row by row; `dst` is row-major with row
/// length `n`.
/// `parallel` gives each of rayon's threads its own range of columns. Needs [`available`].
pub fn matmul(a: &PackedLhs, n: usize, b: Rhs, dst: &mut [f32], write: Write, parallel: bool) {
    let engine = engine().expect("bf16 product on a processor without a bf16 engine");
    matmul_on(engine, a, n, b, dst, write, parallel)
}

/// [`matmul`] on `engine`, which the processor must support.
fn matmul_on(
    engine: Engine,
    a: &PackedLhs,
    n: usize,
    b: Rhs,
    dst: &mut [f32],
    write: Write,
    parallel: bool,
) {
    let (m, k) = (a.m, a.k);
    assert!(dst.len() >= m * n, "bf16 product: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if let Write::SetWithBias(bias) = write {
        assert!(bias.len() >= m, "bf16 product: bias too short");
    }
    if k == 0 {
        match write {
            Write::Set => dst[..m * n].fill(0.0),
            Write::Add => {}
            Write::SetWithBias(bias) => {
                for (row, &b) in dst.chunks_mut(n).zip(bias) {
                    row.fill(b);
                }
            }
        }
        return;
    }
    let out = SharedDst(dst.as_mut_ptr());
    by_panels(n.div_ceil(BLOCK), parallel, |range| {
        columns(engine, a, n, b, range, out, write)
    });
}

/// The columns of panels `range` of [`matmul`]: groups of panels, each chunk by chunk along
/// `k`. A chunk's part of `A` (all rows) and of `B` (the group's panels) each stay within
/// `CHUNK_BYTES`, so both are served from the level-2 cache while every block of `A` meets
/// every panel; a chunk is as long as that allows (up to all of `k`), since each chunk after
/// the first reloads the accumulators.
fn columns(
    engine: Engine,
    a: &PackedLhs,
    n: usize,
    b: Rhs,
    range: std::ops::Range<usize>,
    out: SharedDst,
    write: Write,
) {
    let (m, k) = (a.m, a.k);
    let blocks = m.div_ceil(BLOCK);
    let step_bytes = STEP_U32 * 4;
    let chunk_steps = (CHUNK_BYTES / (blocks * step_bytes)).max(4).min(a.steps);
    let width = (CHUNK_BYTES / (chunk_steps * step_bytes)).clamp(1, range.len());
    let panel_stride = chunk_steps * STEP_U32;
    // The engine's kernel for one 32×32 block (see `imp::block`).
    let block = match engine {
        Engine::Amx => imp::block,
        Engine::Avx512 => imp::block_dp,
    };
    BUFFERS.with(|cell| {
        let mut bufs = cell.borrow_mut();
        let (packed, acc) = &mut *bufs;
        let packed = aligned(packed, width * panel_stride);
        let acc = aligned(acc, width * blocks * BLOCK * BLOCK);
        for g0 in range.clone().step_by(width) {
            let np = width.min(range.end - g0);
            let (j0, j1) = (g0 * BLOCK, ((g0 + np) * BLOCK).min(n));
            let mut blocks_of_chunks = || {
                for (ci, p0) in (0..k).step_by(chunk_steps * KSTEP).enumerate() {
                    let p1 = (p0 + chunk_steps * KSTEP).min(k);
                    let (steps, step0) = ((p1 - p0).div_ceil(KSTEP), p0 / KSTEP);
                    pack_chunk((p0, p1), (j0, j1), b, packed, panel_stride);
                    for pi in 0..np {
                        let panel = &packed[pi * panel_stride..][..steps * STEP_U32];
                        for blk in 0..blocks {
                            let a_blk = &a.data[(blk * a.steps + step0) * BLOCK_STEP..];
                            let c =
                                &mut acc[(pi * blocks + blk) * BLOCK * BLOCK..][..BLOCK * BLOCK];
                            // SAFETY: the processor runs `engine` (the caller's contract);
                            // both packed operands hold `steps` block-steps from here, `c`
                            // holds 32×32 floats; on AMX the tiles are configured.
                            unsafe {
                                block(
                                    a_blk[..steps * BLOCK_STEP].as_ptr(),
                                    panel.as_ptr().cast(),
                                    steps,
                                    c.as_mut_ptr(),
                                    ci > 0,
                                )
                            };
                        }
                    }
                }
            };
            match engine {
                Engine::Amx => imp::with_tiles(blocks_of_chunks),
                Engine::Avx512 => blocks_of_chunks(),
            }
            for pi in 0..np {
                let jp = j0 + pi * BLOCK;
                let cols = BLOCK.min(n - jp);
                for i in 0..m {
                    // SAFETY: row i < m and columns jp..jp+cols < n lie inside dst (checked by
                    // `matmul`); column ranges of different threads are disjoint.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.at(i * n + jp), cols) };
                    let c = &acc[(pi * blocks + i / BLOCK) * BLOCK * BLOCK + (i % BLOCK) * BLOCK..];
                    imp::write_row(row, &c[..cols], write, i);
                }
            }
        }
    })
}

/// The first `len` elements of `buf` from a 64-byte boundary on (`buf` grown as needed), so
/// that the kernels' 64-byte loads and stores of packed panels and accumulators each touch one
/// cache line: a large `Vec` from the allocator starts 16 bytes past a page boundary, which
/// split every other 32-byte half of those loads across two lines.
fn aligned<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let slack = 64 / std::mem::size_of::<T>();
    if buf.len() < len + slack {
        buf.resize(len + slack, T::default());
    }
    // `align_offset` may give up (usize::MAX); then the slice starts unaligned, still correct.
    let at = Some(buf.as_ptr().align_offset(64))
        .filter(|&at| at <= slack)
        .unwrap_or(0);
    &mut buf[at..at + len]
}

/// The destination shared by the column ranges of one product, which write disjoint columns.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);
// SAFETY: threads write disjoint elements through it, and the product waits for them all.
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}
impl SharedDst {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the destination slice.
        unsafe { self.0.add(i) }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{PaddedImage, STEP_U32};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Up to 16 floats from `x` (zeros past its end).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(x: &[f32]) -> __m512 {
        let n = x.len().min(16);
        // SAFETY: the mask covers only the slice's first `n` elements.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, x.as_ptr()) }
    }

    /// bf16 of up to 32 consecutive floats (zeros past the end), in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn convert32(x: &[f32]) -> __m512i {
        let hi = load16(x.get(16..).unwrap_or(&[]));
        // SAFETY: same-size reinterpretation of a SIMD register.
        unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, load16(x))) }
    }

    /// See [`super::round_into`] (lengths checked there).
    pub fn round_into(src: &[f32], dst: &mut [u16]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn go(src: &[f32], dst: &mut [u16]) {
            for (s, d) in src.chunks(16).zip(dst.chunks_mut(16)) {
                // SAFETY: same-size reinterpretation of a SIMD register.
                let h: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(load16(s))) };
                let mask = ((1u64 << d.len()) - 1) as u32;
                // SAFETY: the mask covers only the chunk's `d.len() ≤ 16` elements.
                unsafe {
                    _mm512_mask_storeu_epi16(d.as_mut_ptr().cast(), mask, _mm512_castsi256_si512(h))
                };
            }
        }
        // SAFETY: both engines (one is checked before any rounding) imply AVX-512 BF16.
        unsafe { go(src, dst) }
    }

    /// Packs `rows ≤ 32` rows of `A` (row `r` at `src[r·rs..][..k]`) as one block: `[step][tile]
    /// [row][32]`, zeros past `k` and past `rows`.
    pub fn pack_lhs_block(src: &[f32], rs: usize, rows: usize, k: usize, out: &mut [u16]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn go(src: &[f32], rs: usize, rows: usize, k: usize, out: &mut [u16]) {
            for r in 0..rows {
                let row = &src[r * rs..][..k];
                for (step, chunk) in row.chunks(32).enumerate() {
                    let at = ((step * 2 + r / 16) * 16 + r % 16) * 32;
                    assert!(at + 32 <= out.len(), "bf16 block buffer too small");
                    // SAFETY: checked just above.
                    unsafe {
                        _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), convert32(chunk))
                    };
                }
            }
        }
        // SAFETY: both engines (one is checked before any packing) imply AVX-512 BF16.
        unsafe { go(src, rs, rows, k, out) }
    }

    /// Up to 16 columns of rows `r0`, `r1` (zeros past the ends) as u32 lanes of bf16 pairs
    /// `(r0[j], r1[j])`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn interleave(r0: &[f32], r1: &[f32]) -> __m512i {
        // SAFETY: same-size reinterpretation of a SIMD register.
        let both: __m512i =
            unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(load16(r1), load16(r0))) };
        // Lane 2j takes element j of the first half, lane 2j + 1 element j of the second.
        let idx: [u16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as u16);
        // SAFETY: an unaligned load of 64 bytes from a 64-byte array.
        let idx = unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) };
        _mm512_permutexvar_epi16(idx, both)
    }

    /// Where a chunk of the right operand goes (see `pack_chunk`).
    pub struct Layout {
        pub rows: usize,
        pub cols: usize,
        pub panel_stride: usize,
    }

    /// `dst = src` or `dst += src`, in AVX-512 (the crate itself is built for baseline
    /// x86-64, whose 4-wide loop took a third of the time of the products it wrote).
    pub fn write_row(dst: &mut [f32], src: &[f32], write: super::Write, row: usize) {
        #[target_feature(enable = "avx512f")]
        fn go(dst: &mut [f32], src: &[f32], write: super::Write, row: usize) {
            match write {
                super::Write::Add => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
                super::Write::Set => dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s),
                super::Write::SetWithBias(bias) => {
                    let b = bias[row];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s + b)
                }
            }
        }
        // SAFETY: both engines (one is checked before any product) imply AVX-512.
        unsafe { go(dst, src, write, row) }
    }

    /// Packs rows `p0..p1`, columns `j0..j0 + cols` of a padded image's column matrix,
    /// sixteen columns at a time. Where a group of sixteen lies in the image is the same for
    /// every row (rows differ by where they start, [`PaddedImage::base`]), so each group's
    /// masked loads (one, or one per output row it spans) are worked out once per chunk, not
    /// once per row: the per-row divisions and branches took a sixth of sampling one 28×28
    /// image in bf16.
    pub fn pack_padded(
        img: &PaddedImage,
        (p0, p1): (usize, usize),
        j0: usize,
        l: &Layout,
        out: &mut [u32],
    ) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn go(img: &PaddedImage, (p0, p1): (usize, usize), j0: usize, l: &Layout, out: &mut [u32]) {
            let groups = l.cols.div_ceil(16);
            // Group t's loads are `segments[first[t]..first[t + 1]]`: (lanes, offset of lane
            // 0 from the row's base); `reach`: one past the farthest offset read.
            let (mut segments, mut first, mut reach) = (Vec::new(), Vec::new(), 0);
            for t in 0..groups {
                first.push(segments.len());
                let (j, w) = (j0 + 16 * t, (l.cols - 16 * t).min(16));
                let (mut lane, mut oy, mut ox) = (0, j / img.ow, j % img.ow);
                while lane < w {
                    let len = (img.ow - ox).min(w - lane);
                    let at = oy * img.wp + ox;
                    segments.push((
                        (((1u32 << len) - 1) << lane) as u16,
                        at as isize - lane as isize,
                    ));
                    reach = reach.max(at + len);
                    lane += len;
                    (oy, ox) = (oy + 1, 0);
                }
            }
            first.push(segments.len());
            // Rows start further on as `p` grows, so the last row reads farthest.
            assert!(
                p1 > p0 && img.base(p1 - 1) + reach <= img.xp.len(),
                "padded image too small"
            );
            let xp = img.xp.as_ptr().cast::<i16>();
            // Lanes 0..16 of the result: a group of sixteen bf16 values of one row.
            let gather = |base: usize, t: usize| -> __m512i {
                let mut v = _mm512_setzero_si512();
                for &(mask, off) in &segments[first[t]..first[t + 1]] {
                    // SAFETY: the lanes in `mask` read xp[base + at..base + at + len] for one
                    // segment's `at` and `len`, inside the image (checked above); the other
                    // lanes are masked off and never touched.
                    let part = unsafe {
                        _mm512_maskz_loadu_epi16(
                            mask as u32,
                            xp.wrapping_offset(base as isize + off),
                        )
                    };
                    v = _mm512_or_si512(v, part);
                }
                v
            };
            // Lane 2j takes element j of the first row, lane 2j + 1 element j of the second.
            let idx: [u16; 32] = std::array::from_fn(|i| (i / 2 + 32 * (i % 2)) as u16);
            // SAFETY: an unaligned load of 64 bytes from a 64-byte array.
            let idx = unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) };
            for q in 0..(p1 - p0).div_ceil(2) {
                let (step, prow) = (q / 16, q % 16);
                let p = p0 + 2 * q;
                let (b0, b1) = (img.base(p), (p + 1 < p1).then(|| img.base(p + 1)));
                for t in 0..groups {
                    let v0 = gather(b0, t);
                    let v1 = b1.map_or(_mm512_setzero_si512(), |b1| gather(b1, t));
                    let v = _mm512_permutex2var_epi16(v0, idx, v1);
                    let at =
                        (t / 2) * l.panel_stride + step * STEP_U32 + ((t % 2) * 16 + prow) * 16;
                    assert!(at + 16 <= out.len(), "bf16 panel buffer too small");
                    // SAFETY: checked just above.
                    unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), v) };
                }
            }
        }
        // SAFETY: both engines (one is checked before any packing) imply AVX-512 BF16.
        unsafe { go(img, (p0, p1), j0, l, out) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pair_at(r0: &[f32], r1: &[f32], q: usize, l: &Layout, out: &mut [u32]) {
        let (step, prow) = (q / 16, q % 16);
        for t in 0..l.cols.div_ceil(16) {
            let v = interleave(&r0[16 * t..], r1.get(16 * t..).unwrap_or(&[]));
            let at = (t / 2) * l.panel_stride + step * STEP_U32 + ((t % 2) * 16 + prow) * 16;
            assert!(at + 16 <= out.len(), "bf16 panel buffer too small");
            // SAFETY: checked just above.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(at).cast(), v) };
        }
    }

    /// Packs a chunk whose rows are contiguous (row `p` at `src[p·rs..]`): two rows at a time,
    /// read front to back.
    pub fn pack_rows(src: &[f32], rs: usize, l: &Layout, out: &mut [u32]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn go(src: &[f32], rs: usize, l: &Layout, out: &mut [u32]) {
            let row = |q: usize| {
                if q < l.rows {
                    &src[q * rs..][..l.cols]
                } else {
                    &[][..]
                }
            };
            for q in 0..l.rows.div_ceil(2) {
                pair_at(row(2 * q), row(2 * q + 1), q, l, out);
            }
        }
        // SAFETY: both engines (one is checked before any packing) imply AVX-512 BF16.
        unsafe { go(src, rs, l, out) }
    }

    /// Packs a chunk whose columns are contiguous (column `j` at `src[j·cs..]`): one step of
    /// one column is 32 consecutive values, 16 pairs down its tile.
    pub fn pack_cols(src: &[f32], cs: usize, l: &Layout, out: &mut [u32]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn go(src: &[f32], cs: usize, l: &Layout, out: &mut [u32]) {
            let down: __m512i = _mm512_setr_epi32(
                0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240,
            );
            for j in 0..l.cols {
                let col = &src[j * cs..][..l.rows];
                for (step, chunk) in col.chunks(32).enumerate() {
                    let at = (j / 32) * l.panel_stride
                        + step * STEP_U32
                        + ((j % 32) / 16) * 256
                        + j % 16;
                    assert!(at + 240 < out.len(), "bf16 panel buffer too small");
                    // SAFETY: every lane's index lies at or below at + 240, checked above.
                    unsafe {
                        let base = out.as_mut_ptr().add(at).cast::<i32>();
                        _mm512_i32scatter_epi32::<4>(base, down, convert32(chunk));
                    }
                }
            }
        }
        // SAFETY: both engines (one is checked before any packing) imply AVX-512 BF16.
        unsafe { go(src, cs, l, out) }
    }

    /// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Whether the processor (and, for AMX, the OS) supports `engine`. AMX: CPUID leaf 7,
    /// AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24), then Linux's permission for the tile data
    /// state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`). Both engines pack with
    /// AVX-512 BF16 conversions.
    pub fn supported(engine: super::Engine) -> bool {
        let simd = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        if !simd {
            return false;
        }
        if engine == super::Engine::Avx512 {
            return true;
        }
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86-64 processor.
        let leaf7 = unsafe {
            if std::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            std::arch::x86_64::__cpuid_count(7, 0)
        };
        let has = |bit: u32| leaf7.edx >> bit & 1 == 1;
        if !(has(22) && has(24)) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// One step of the 2×2 tile blocking, as assembly text: the `A` tiles in tmm4 and tmm5
    /// times the `B` tiles in tmm6 and tmm7, into the sums in tmm0-tmm3 (see [`block`]).
    macro_rules! four_products {
        () => {
            "tdpbf16ps tmm0, tmm4, tmm6\ntdpbf16ps tmm1, tmm4, tmm7\ntdpbf16ps tmm2, tmm5, tmm6\ntdpbf16ps tmm3, tmm5, tmm7"
        };
    }

    /// The sums in tmm0-tmm3 set to zero, as assembly text.
    macro_rules! zero_sums {
        () => {
            "tilezero tmm0\ntilezero tmm1\ntilezero tmm2\ntilezero tmm3"
        };
    }

    /// The sums in tmm0-tmm3 stored as a 32×32 row-major block at `{c}` (`{cs}` = 128 bytes a
    /// row), as assembly text.
    macro_rules! store_sums {
        () => {
            "tilestored [{c} + {cs}*1], tmm0\ntilestored [{c} + {cs}*1 + 64], tmm1\ntilestored [{c} + {cs}*1 + 2048], tmm2\ntilestored [{c} + {cs}*1 + 2112], tmm3"
        };
    }

    /// Runs `f` with the tile configuration loaded on this thread, releasing the tiles after.
    pub fn with_tiles(f: impl FnOnce()) {
        // SAFETY: only called once `supported()` granted the tile state; the configuration
        // is valid for palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        f();
        // SAFETY: as above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `c[32×32]` (row-major) = (`load_c` ? `c` : 0) + Σ over `steps` of two `A` tiles times
    /// two `B` tiles.
    ///
    /// # Safety
    /// Tiles configured ([`with_tiles`]); `a` and `b` hold `steps ≥ 1` block-steps of 2048
    /// bytes; `c` holds 1024 floats.
    pub unsafe fn block(a: *const u16, b: *const u16, steps: usize, c: *mut f32, load_c: bool) {
        debug_assert!(steps >= 1);
        // SAFETY: per the function's contract.
        unsafe {
            if load_c {
                asm!(
                    "tileloadd tmm0, [{c} + {cs}*1]",
                    "tileloadd tmm1, [{c} + {cs}*1 + 64]",
                    "tileloadd tmm2, [{c} + {cs}*1 + 2048]",
                    "tileloadd tmm3, [{c} + {cs}*1 + 2112]",
                    c = in(reg) c,
                    cs = in(reg) 128usize,
                    options(nostack, readonly),
                );
            } else {
                asm!(zero_sums!(), options(nostack, nomem),);
            }
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm5, [{a} + {s}*1 + 1024]",
                "tileloadd tmm6, [{b} + {s}*1]",
                "tileloadd tmm7, [{b} + {s}*1 + 1024]",
                four_products!(),
                "add {a}, 2048",
                "add {b}, 2048",
                "dec {k}",
                "jnz 2b",
                store_sums!(),
                a = inout(reg) a => _,
                b = inout(reg) b => _,
                k = inout(reg) steps => _,
                s = in(reg) 64usize,
                c = in(reg) c,
                cs = in(reg) 128usize,
                options(nostack),
            );
        }
    }

    /// `c[32×32]` (row-major) = Σ over the steps of two `A` tiles (packed, one block-step of
    /// 2048 bytes after the other from `a`) times two `B` tiles read in place: step `s`'s
    /// start at `b + offsets[s]` and `b + offsets[s] + 64`, rows `stride` bytes apart (see
    /// `conv_pairs`).
    ///
    /// # Safety
    /// Tiles configured ([`with_tiles`]); `a` holds `offsets.len() ≥ 1` block-steps; for every
    /// step, sixteen rows of 128 bytes from `b + offsets[s]`, `stride` bytes apart, are
    /// readable; `c` holds 1024 floats.
    pub unsafe fn block_taps(
        a: *const u16,
        b: *const u8,
        offsets: &[usize],
        stride: usize,
        c: *mut f32,
    ) {
        debug_assert!(!offsets.is_empty());
        // SAFETY: per the function's contract.
        unsafe {
            asm!(
                zero_sums!(),
                "2:",
                "mov {t}, [{o}]",
                "add {t}, {b}",
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm5, [{a} + {s}*1 + 1024]",
                "tileloadd tmm6, [{t} + {bs}*1]",
                "tileloadd tmm7, [{t} + {bs}*1 + 64]",
                four_products!(),
                "add {a}, 2048",
                "add {o}, 8",
                "dec {k}",
                "jnz 2b",
                store_sums!(),
                a = inout(reg) a => _,
                o = inout(reg) offsets.as_ptr() => _,
                k = inout(reg) offsets.len() => _,
                t = out(reg) _,
                b = in(reg) b,
                s = in(reg) 64usize,
                bs = in(reg) stride,
                c = in(reg) c,
                cs = in(reg) 128usize,
                options(nostack),
            );
        }
    }

    /// `c[32×32]` (row-major, written, not read) = Σ over `steps` of two `A` tiles times two
    /// `B` tiles, all read in place: step `s`'s `A` rows (32 bf16 each) at `a + 64s + r·a_stride` for rows `r <
    /// 32`, its `B` rows (32 columns in bf16 pairs) at `b + (16s + r)·b_stride` for `r < 16`
    /// (see `grad_taps`).
    ///
    /// # Safety
    /// Tiles configured ([`with_tiles`]); every row named above readable for `steps ≥ 1`
    /// steps (64 bytes of `A`, 128 of `B`); `c` writable for 1024 floats.
    pub unsafe fn block_strided(
        a: *const u8,
        a_stride: usize,
        b: *const u8,
        b_stride: usize,
        steps: usize,
        c: *mut f32,
    ) {
        debug_assert!(steps >= 1);
        // SAFETY: per the function's contract.
        unsafe {
            asm!(
                zero_sums!(),
                "2:",
                "tileloadd tmm4, [{a} + {as_}*1]",
                "tileloadd tmm5, [{a2} + {as_}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tileloadd tmm7, [{b} + {bs}*1 + 64]",
                four_products!(),
                "add {a}, 64",
                "add {a2}, 64",
                "add {b}, {bstep}",
                "dec {k}",
                "jnz 2b",
                store_sums!(),
                a = inout(reg) a => _,
                a2 = inout(reg) a.add(16 * a_stride) => _,
                b = inout(reg) b => _,
                k = inout(reg) steps => _,
                as_ = in(reg) a_stride,
                bs = in(reg) b_stride,
                bstep = in(reg) 16 * b_stride,
                c = in(reg) c,
                cs = in(reg) 128usize,
                options(nostack),
            );
        }
    }

    /// `dst[j·ds + i] = src[i·ss + j]` for `i, j < 16`: a 16×16 block of u32s turned over, in
    /// three rounds of shuffles (pairs of rows by 32 bits, then by 64, then the 128-bit lanes).
    pub fn transpose16(src: &[u32], ss: usize, dst: &mut [u32], ds: usize) {
        assert!(
            src.len() >= 15 * ss + 16 && dst.len() >= 15 * ds + 16,
            "transpose: too short"
        );
        #[target_feature(enable = "avx512f")]
        fn go(src: &[u32], ss: usize, dst: &mut [u32], ds: usize) {
            // SAFETY: sixteen rows of sixteen u32s lie inside `src` (checked by the caller).
            let r: [__m512i; 16] = std::array::from_fn(|i| unsafe {
                _mm512_loadu_si512(src[i * ss..].as_ptr().cast())
            });
            let mut t = [_mm512_setzero_si512(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
            }
            // Now lane L of u[4i + k] holds rows 4i..4i + 4 of column 4L + k.
            let mut u = [_mm512_setzero_si512(); 16];
            for i in 0..4 {
                u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
                u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
                u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
                u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
            }
            for k in 0..4 {
                let even_lo = _mm512_shuffle_i32x4::<0x88>(u[k], u[4 + k]);
                let odd_lo = _mm512_shuffle_i32x4::<0xdd>(u[k], u[4 + k]);
                let even_hi = _mm512_shuffle_i32x4::<0x88>(u[8 + k], u[12 + k]);
                let odd_hi = _mm512_shuffle_i32x4::<0xdd>(u[8 + k], u[12 + k]);
                let cols = [
                    (k, _mm512_shuffle_i32x4::<0x88>(even_lo, even_hi)),
                    (4 + k, _mm512_shuffle_i32x4::<0x88>(odd_lo, odd_hi)),
                    (8 + k, _mm512_shuffle_i32x4::<0xdd>(even_lo, even_hi)),
                    (12 + k, _mm512_shuffle_i32x4::<0xdd>(odd_lo, odd_hi)),
                ];
                for (j, v) in cols {
                    // SAFETY: row j < 16 of sixteen u32s lies inside `dst` (checked above).
                    unsafe { _mm512_storeu_si512(dst[j * ds..].as_mut_ptr().cast(), v) };
                }
            }
        }
        // SAFETY: both engines (one is checked before any packing) imply AVX-512.
        unsafe { go(src, ss, dst, ds) }
    }

    /// See [`super::pack_pairs`] (sizes checked there).
    pub fn pack_pairs(
        x: &[f32],
        [c, c_pad]: [usize; 2],
        [h, w]: [usize; 2],
        [ph, pw]: [usize; 2],
        plane: usize,
        out: &mut [u32],
    ) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn go(
            x: &[f32],
            [c, c_pad]: [usize; 2],
            h: usize,
            w: usize,
            ph: usize,
            pw: usize,
            plane: usize,
            out: &mut [u32],
        ) {
            let wp = w + 2 * pw;
            // Channel `ci` of the image, or nothing (zeros) past the last.
            let channel = |ci: usize| x.get(ci * h * w..(ci + 1) * h * w).unwrap_or(&[]);
            for (q, dst) in out.chunks_mut(plane).take(c_pad / 2).enumerate() {
                if 2 * q >= c {
                    dst.fill(0);
                    continue;
                }
                let (s0, s1) = (channel(2 * q), channel(2 * q + 1));
                dst[..ph * wp].fill(0);
                dst[(ph + h) * wp..].fill(0);
                for y in 0..h {
                    let row = &mut dst[(ph + y) * wp..][..wp];
                    if pw == 1 {
                        // As in `conv2d::with_padded`: no memset call for one value.
                        (row[0], row[wp - 1]) = (0, 0);
                    } else {
                        row[..pw].fill(0);
                        row[pw + w..].fill(0);
                    }
                    let (r0, r1) = (&s0[y * w..][..w], s1.get(y * w..(y + 1) * w).unwrap_or(&[]));
                    for t in (0..w).step_by(16) {
                        let len = (w - t).min(16);
                        let v = interleave(&r0[t..], r1.get(t..).unwrap_or(&[]));
                        let d = &mut row[pw + t..pw + t + len];
                        // SAFETY: the mask covers only the `len` elements of `d`.
                        unsafe {
                            _mm512_mask_storeu_epi32(
                                d.as_mut_ptr().cast(),
                                ((1u32 << len) - 1) as u16,
                                v,
                            )
                        };
                    }
                }
            }
        }
        // SAFETY: both engines (one is checked before any packing) imply AVX-512 BF16.
        unsafe { go(x, [c, c_pad], h, w, ph, pw, plane, out) }
    }

    /// Rows of `C` per pass of [`block_dp`]: 8 rows × 2 vectors of 16 columns = 16
    /// accumulator registers of the 32, leaving room for the two `B` vectors and the
    /// broadcasts.
    const DP_ROWS: usize = 8;

    /// [`block`] by AVX-512 BF16 dot products: `c[32×32]` (row-major) becomes (`load_c` ? `c`
    /// : 0) plus the sum over `steps` of the block's `A` rows times its `B` panel, in four
    /// passes of [`DP_ROWS`] rows. Per pair row `q` of a step, `B`'s two 16-column vectors
    /// meet each row's broadcast pair.
    ///
    /// # Safety
    /// AVX-512 F and BF16 present; `a` and `b` hold `steps ≥ 1` block-steps of 2048 bytes;
    /// `c` holds 1024 floats.
    pub unsafe fn block_dp(a: *const u16, b: *const u16, steps: usize, c: *mut f32, load_c: bool) {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn go(a: *const u16, b: *const u16, steps: usize, c: *mut f32, load_c: bool) {
            // u32s (bf16 pairs) per block-step of either operand, and per 16-column tile of B.
            const STEP: usize = STEP_U32;
            const TILE: usize = STEP / 2;
            let (a, b) = (a.cast::<i32>(), b.cast::<i32>());
            for pass in 0..32 / DP_ROWS {
                let r0 = pass * DP_ROWS;
                let mut acc = [[_mm512_setzero_ps(); 2]; DP_ROWS];
                // SAFETY (this block): rows r0..r0 + DP_ROWS of c (1024 floats) and steps
                // block-steps of a and b, per the contract.
                unsafe {
                    if load_c {
                        for (r, row) in acc.iter_mut().enumerate() {
                            for (t, v) in row.iter_mut().enumerate() {
                                *v = _mm512_loadu_ps(c.add((r0 + r) * 32 + 16 * t));
                            }
                        }
                    }
                    for s in 0..steps {
                        let (a_s, b_s) = (a.add(s * STEP + r0 * 16), b.add(s * STEP));
                        for q in 0..16 {
                            let b0: __m512bh =
                                std::mem::transmute(_mm512_loadu_si512(b_s.add(q * 16).cast()));
                            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                                b_s.add(TILE + q * 16).cast(),
                            ));
                            for (r, row) in acc.iter_mut().enumerate() {
                                let pair: __m512bh =
                                    std::mem::transmute(_mm512_set1_epi32(*a_s.add(r * 16 + q)));
                                row[0] = _mm512_dpbf16_ps(row[0], pair, b0);
                                row[1] = _mm512_dpbf16_ps(row[1], pair, b1);
                            }
                        }
                    }
                    for (r, row) in acc.iter().enumerate() {
                        for (t, v) in row.iter().enumerate() {
                            _mm512_storeu_ps(c.add((r0 + r) * 32 + 16 * t), *v);
                        }
                    }
                }
            }
        }
        debug_assert!(steps >= 1);
        // SAFETY: per the function's contract.
        unsafe { go(a, b, steps, c, load_c) }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub struct Layout {
        pub rows: usize,
        pub cols: usize,
        pub panel_stride: usize,
    }
    pub fn supported(_: super::Engine) -> bool {
        false
    }
    pub fn pack_lhs_block(_: &[f32], _: usize, _: usize, _: usize, _: &mut [u16]) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn pack_rows(_: &[f32], _: usize, _: &Layout, _: &mut [u32]) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn write_row(_: &mut [f32], _: &[f32], _: super::Write, _: usize) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn round_into(_: &[f32], _: &mut [u16]) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn pack_padded(
        _: &super::PaddedImage,
        _: (usize, usize),
        _: usize,
        _: &Layout,
        _: &mut [u32],
    ) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn pack_cols(_: &[f32], _: usize, _: &Layout, _: &mut [u32]) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn with_tiles(_: impl FnOnce()) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub unsafe fn block(_: *const u16, _: *const u16, _: usize, _: *mut f32, _: bool) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub unsafe fn block_dp(_: *const u16, _: *const u16, _: usize, _: *mut f32, _: bool) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub unsafe fn block_strided(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: usize,
        _: *mut f32,
    ) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn transpose16(_: &[u32], _: usize, _: &mut [u32], _: usize) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub unsafe fn block_taps(_: *const u16, _: *const u8, _: &[usize], _: usize, _: *mut f32) {
        unreachable!("bf16 products are never reported available on this platform")
    }
    pub fn pack_pairs(
        _: &[f32],
        _: [usize; 2],
        _: [usize; 2],
        _: [usize; 2],
        _: usize,
        _: &mut [u32],
    ) {
        unreachable!("bf16 products are never reported available on this platform")
    }
}
