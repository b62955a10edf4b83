//! The project's own CPU kernels for the operations that dominate a U-Net step, plugged under
//! burn's tensor API for the Flex backend (plain and with autodiff).
//!
//! Each public function here takes and returns ordinary `Tensor`s. When every input lives on
//! the Flex backend as f32 (untracked, or all tracked by burn's autodiff) the work goes to the
//! kernels in this module and, under autodiff, a custom backward node is recorded; otherwise
//! (another backend, another dtype, a geometry the kernel does not cover) the call falls back
//! to burn's own operation, so results never depend on which path ran beyond f32 rounding.
//!
//! Why: burn 0.22's Flex convolution converts every input to channels-last on one core and
//! runs small per-tile matrix products; on the benchmark U-Net its forward ran at a fifth of
//! the machine's peak. Here a convolution is one im2col and one large matrix product per image
//! with the images spread over the cores (see `docs/BENCHMARKS.md` for the measured effect).
//! In f32, 3x3 stride-1 convolutions (nearly all of a U-Net's arithmetic) take Winograd's
//! minimal filtering instead: F(4x4, 3x3) ([`winograd43`], 4 times fewer multiplications)
//! for the forward pass, the input gradient and the weight gradient, with F(2x2, 3x3)
//! ([`winograd`], 2.25 times fewer) kept for comparison. On processors with
//! Intel AMX or AVX-512 BF16 the products can run in bf16 ([`bf16`], [`MatmulMode`]), reading
//! the column matrix straight from the padded image; on AMX, convolutions with a multiple of
//! 32 input channels load their tiles from the image itself, laid out in channel pairs
//! ([`conv2d::reads_pairs`]), and weight gradients read the image and the output gradient
//! in place ([`conv2d::grad_reads_pairs`]).

pub mod bf16;
pub mod conv2d;
pub mod group_norm;
pub mod weight_cache;
pub mod winograd;
pub mod winograd43;

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::{Tensor, TensorData};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_backend::BackendTypes;
use burn_flex::{Flex, FlexTensor};
use conv2d::ConvGeometry;
use group_norm::NormGeometry;

/// Which of the project's kernels may be used: all by default. `DIFFUSE_KERNELS` narrows it
/// for the whole process: `burn` (none: burn's own ops throughout), or a comma list of `conv`,
/// `winograd` (f32 3x3 convolutions by [`winograd`]'s F(2x2, 3x3) rather than im2col; needs
/// `conv`), `f43` (their forward passes, and so their input gradients, by [`winograd43`]'s
/// F(4x4, 3x3); needs `winograd`), `f43w` (their weight gradients by F(4x4, 3x3); needs
/// `winograd`), `pairs` (on AMX, bf16 convolutions reading their image tiles in place,
/// [`conv2d::reads_pairs`]; needs `conv`), `wpairs` (on AMX, bf16 weight gradients reading
/// the image and the output gradient in place, [`conv2d::grad_reads_pairs`]; needs `conv`)
/// and `norm`. The benchmark uses it to measure each
/// kernel's effect.
fn enabled(kernel: &str) -> bool {
    static CHOICE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match CHOICE.get_or_init(|| std::env::var("DIFFUSE_KERNELS").ok()) {
        None => true,
        Some(list) => list.split(',').any(|k| k.trim() == kernel),
    }
}

/// A fresh output of `len` floats, made in pieces of `chunk` (the last may be shorter): each
/// piece is zeroed and handed to `f(index, piece)` by the thread that fills it, on the cores
/// when `par`; returns the output and what `f` returned for each piece, in order.
///
/// Replaces `vec![0.0; len]` followed by a parallel fill: that zero-fill ran on one core while
/// the other waited, and went through memory (up to a tenth of a forward pass); here each
/// piece is zeroed in the filling thread's cache just before it is written.
pub(crate) fn fresh_output<R: Send>(
    len: usize,
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [f32]) -> R + Sync + Send,
) -> (Vec<f32>, Vec<R>) {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let fill = |i: usize, piece: &mut [MaybeUninit<f32>]| {
        piece.fill(MaybeUninit::new(0.0));
        // SAFETY: every element of `piece` was initialised just above, and `MaybeUninit<f32>`
        // has the layout of `f32`.
        let piece = unsafe { &mut *(piece as *mut [MaybeUninit<f32>] as *mut [f32]) };
        f(i, piece)
    };
    let spare = &mut out.spare_capacity_mut()[..len];
    let results = if len == 0 {
        Vec::new()
    } else if par {
        spare
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .map(|(i, p)| fill(i, p))
            .collect()
    } else {
        spare
            .chunks_mut(chunk.max(1))
            .enumerate()
            .map(|(i, p)| fill(i, p))
            .collect()
    };
    // SAFETY: the pieces cover the first `len` elements of the capacity, and each was
    // initialised by `fill`.
    unsafe { out.set_len(len) };
    (out, results)
}

/// Whether `DIFFUSE_SIMD=avx2` asks the kernels to keep to instructions every x86-64 laptop
/// has: no AVX-512 copies ([`wide_simd`]) and no bf16 engine ([`bf16::engine`]), to measure
/// on an AVX-512 machine what a processor without it gets. (The `gemm` crate, which runs the
/// f32 products, picks its own instructions.)
pub fn simd_capped() -> bool {
    static CAPPED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAPPED.get_or_init(|| std::env::var("DIFFUSE_SIMD").is_ok_and(|v| v == "avx2"))
}

/// Whether the processor has AVX-512 (F, BW, VL, DQ) and FMA, for which [`wide_fn!`] compiles
/// a second copy of the kernels' loops (the crate itself targets baseline x86-64); false under
/// [`simd_capped`].
pub fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            !simd_capped()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines a function twice, for baseline x86-64 and for AVX-512, and calls the AVX-512 copy
/// where [`wide_simd`] says the processor has it. The two compute the same bits: Rust never
/// contracts `a * b + c` into a fused multiply-add, nor reorders sums, so only the width of
/// the vectors differs.
macro_rules! wide_fn {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::kernels::wide_simd() {
                    // SAFETY: the processor has these features (checked at run time).
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

/// How the convolution kernels multiply matrices.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MatmulMode {
    /// f32 fused multiply-adds (the `gemm` crate; AVX-512 or AVX2 as the processor allows);
    /// 3x3 stride-1 convolutions by Winograd's minimal filtering ([`winograd43`]).
    #[default]
    F32,
    /// Operands rounded to bf16, products summed in f32 on AMX tiles or by AVX-512 BF16 dot
    /// products ([`bf16`]): mixed precision, as PyTorch's autocast to bf16 does for
    /// convolutions. On AMX the weight gradients are bf16 products too, read in place
    /// ([`conv2d::grad_reads_pairs`]); with AVX-512 BF16 those of most 3x3 stride-1
    /// convolutions stay f32 ([`conv2d::weight_grad_in_f32`]), and sampling's large 3x3
    /// convolutions take Winograd's F(4x4, 3x3) ([`conv2d::winograd_of`]).
    Bf16,
}

impl MatmulMode {
    /// The mode named `f32` or `bf16`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "f32" => Ok(MatmulMode::F32),
            "bf16" => Ok(MatmulMode::Bf16),
            other => Err(format!("unknown precision {other:?}: expected f32 or bf16")),
        }
    }

    /// The fastest mode this processor runs at equal quality: bf16 where it has a bf16 engine
    /// (AMX or AVX-512 BF16), else f32. On AMX bf16 is faster throughout (a Sapphire
    /// Rapids-class Xeon: the benchmark U-Net trains 1.25-1.27x and runs forward 1.5x as fast
    /// as in f32, session 27); with AVX-512 BF16 alone it trains and samples in batches at
    /// f32's speed but makes one image twice as fast (measured in `docs/BENCHMARKS.md`,
    /// 2026-12-07).
    pub fn fastest() -> Self {
        if bf16_available() {
            MatmulMode::Bf16
        } else {
            MatmulMode::F32
        }
    }

    /// The mode's name, as [`MatmulMode::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            MatmulMode::F32 => "f32",
            MatmulMode::Bf16 => "bf16",
        }
    }
}

static MODE: std::sync::Mutex<Option<MatmulMode>> = std::sync::Mutex::new(None);

/// The matrix-product mode of the convolution kernels: the one set by [`set_matmul_mode`],
/// else `DIFFUSE_MATMUL` (`f32` or `bf16`), else `f32`. `bf16` on a processor without a bf16
/// engine falls back to `f32` (see [`bf16_available`]).
pub fn matmul_mode() -> MatmulMode {
    let mut mode = MODE.lock().unwrap_or_else(|e| e.into_inner());
    let chosen = *mode.get_or_insert_with(|| {
        match std::env::var("DIFFUSE_MATMUL")
            .ok()
            .map(|v| MatmulMode::parse(&v))
        {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("warning: DIFFUSE_MATMUL: {e}; using f32");
                MatmulMode::F32
            }
            None => MatmulMode::F32,
        }
    });
    match chosen {
        MatmulMode::Bf16 if !bf16_available() => MatmulMode::F32,
        m => m,
    }
}

/// Whether this processor and OS run the bf16 path (Intel AMX or AVX-512 BF16, see
/// [`bf16::engine`]).
pub fn bf16_available() -> bool {
    bf16::available()
}

/// Sets the matrix-product mode for the whole process (see [`matmul_mode`]). `bf16` on a
/// processor without a bf16 engine is refused with an error naming what is missing.
pub fn set_matmul_mode(mode: MatmulMode) -> anyhow::Result<()> {
    if mode == MatmulMode::Bf16 && !bf16_available() {
        anyhow::bail!(
            "precision bf16 needs AVX-512 BF16 (AMD Zen 4 or later, Intel Cooper Lake or later) or Intel AMX-BF16, which this machine lacks; use f32"
        );
    }
    *MODE.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
    Ok(())
}

type AdFlex = Autodiff<Flex, NoCheckpointing>;
/// burn-autodiff's tensor type, which that crate does not export by name.
type AdTensor = <AdFlex as BackendTypes>::FloatTensorPrimitive;

/// A float tensor unwrapped to one of the two Flex forms the kernels accept.
enum Unwrapped<const D: usize> {
    Plain(FlexTensor),
    Tracked(AdTensor),
}

/// The Flex form of `t`, without consuming it; `None` for any other backend.
fn unwrap<const D: usize>(t: &Tensor<D>) -> Option<Unwrapped<D>> {
    if let Ok(p) = t.clone().try_into_primitive::<Flex>() {
        return Some(Unwrapped::Plain(p));
    }
    t.clone()
        .try_into_primitive::<AdFlex>()
        .ok()
        .map(Unwrapped::Tracked)
}

/// The contiguous f32 values of a Flex tensor, or `None` for another dtype.
fn f32_values(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == burn::tensor::DType::F32).then(|| t.to_contiguous())
}

fn flex_tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// Symmetric padding of a `Conv2d`, where the module's configuration has one.
fn symmetric_padding(
    p: &PaddingConfig2d,
    kernel: [usize; 2],
    stride: [usize; 2],
) -> Option<[usize; 2]> {
    match *p {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(t, l, b, r) if t == b && l == r => Some([t, l]),
        PaddingConfig2d::Same if stride == [1, 1] && kernel[0] % 2 == 1 && kernel[1] % 2 == 1 => {
            Some([kernel[0] / 2, kernel[1] / 2])
        }
        _ => None,
    }
}

/// `module.forward(x)` for a burn `Conv2d`, on the project's kernel where it applies (see
/// [`try_conv2d`]); burn's own convolution otherwise.
pub fn conv2d(module: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    if enabled("conv")
        && let Some(y) = try_conv2d(module, x.clone())
    {
        return y;
    }
    module.forward(x)
}

/// `module.forward(x)` on the project's kernel, or `None` where it does not apply: groups or
/// dilation other than 1, asymmetric padding, or inputs that are not all f32 Flex tensors of
/// one kind (untracked, or tracked by autodiff without checkpointing).
pub fn try_conv2d(module: &Conv2d, x: Tensor<4>) -> Option<Tensor<4>> {
    let [batch, c_in, h, w] = x.dims();
    let [c_out, per_group, kh, kw] = module.weight.dims();
    let pad = symmetric_padding(&module.padding, module.kernel_size, module.stride)?;
    let g = ConvGeometry {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        stride: module.stride,
        pad,
    };
    if module.groups != 1 || module.dilation != [1, 1] || per_group != c_in || !g.is_valid() {
        return None;
    }
    conv2d_with(
        x,
        module.weight.val(),
        module.bias.as_ref().map(|b| b.val()),
        &g,
    )
}

/// A convolution with a computed weight `[c_out, c_in, kh, kw]` (a spectrally normalised or
/// masked one, say), stride `s` and zero padding `pad` (rows, columns) on both sides of each
/// axis: on the project's kernel where it applies (as [`try_conv2d`]), burn's `conv2d`
/// otherwise.
pub fn conv2d_weighted(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    pad: [usize; 2],
) -> Tensor<4> {
    let [batch, c_in, h, w] = x.dims();
    let [c_out, per_group, kh, kw] = weight.dims();
    let g = ConvGeometry {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        stride: [stride, stride],
        pad,
    };
    if enabled("conv")
        && per_group == c_in
        && g.is_valid()
        && let Some(y) = conv2d_with(x.clone(), weight.clone(), bias.clone(), &g)
    {
        return y;
    }
    burn::tensor::module::conv2d(
        x,
        weight,
        bias,
        burn::tensor::ops::ConvOptions::new([stride, stride], pad, [1, 1], 1),
    )
}

/// Backward node of [`conv2d`]: state is (input, weight, geometry, whether a bias took part).
#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    type State = (FlexTensor, FlexTensor, ConvGeometry);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x, w, g) = ops.state;
        let dy_v: &[f32] = dy.storage();
        if let Some(node) = node_x {
            let dx = conv2d::backward_input(matmul_mode(), dy_v, w.storage(), &g);
            grads.register::<Flex>(node.id, flex_tensor(dx, &[g.batch, g.c_in, g.h, g.w]));
        }
        if node_w.is_some() || node_b.is_some() {
            let (dw, db) = conv2d::backward_weight(matmul_mode(), x.storage(), dy_v, &g);
            if let Some(node) = node_w {
                grads.register::<Flex>(node.id, flex_tensor(dw, &[g.c_out, g.c_in, g.kh, g.kw]));
            }
            if let Some(node) = node_b {
                grads.register::<Flex>(node.id, flex_tensor(db, &[g.c_out]));
            }
        }
    }
}

/// The convolution on the kernels, or `None` where an input is not an f32 Flex tensor of the
/// same kind as the others (the caller then uses burn's own op).
fn conv2d_with(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    g: &ConvGeometry,
) -> Option<Tensor<4>> {
    let [oh, ow] = g.out_hw();
    let out_shape = [g.batch, g.c_out, oh, ow];
    // `keep`: the weights are untracked, so their preparation is kept across calls.
    let run = |x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>, keep: bool| {
        let xv = f32_values(x)?;
        let wv = f32_values(w)?;
        let bv = match b {
            Some(b) => Some(f32_values(b)?),
            None => None,
        };
        let (xs, ws, bs) = (xv.storage(), wv.storage(), bv.as_ref().map(|b| b.storage()));
        let mode = matmul_mode();
        let y = if keep {
            conv2d::forward_prepared(&weight_cache::global().get(mode, &wv, g), xs, ws, bs, g)
        } else {
            conv2d::forward(mode, xs, ws, bs, g)
        };
        Some(flex_tensor(y, &out_shape))
    };
    match (unwrap(&x)?, unwrap(&weight)?, bias.as_ref().map(unwrap)) {
        (Unwrapped::Plain(x), Unwrapped::Plain(w), None) => {
            Some(Tensor::from_primitive::<Flex>(run(&x, &w, None, true)?))
        }
        (Unwrapped::Plain(x), Unwrapped::Plain(w), Some(Some(Unwrapped::Plain(b)))) => {
            Some(Tensor::from_primitive::<Flex>(run(&x, &w, Some(&b), true)?))
        }
        (Unwrapped::Tracked(x), Unwrapped::Tracked(w), b) => {
            let b = match b {
                None => None,
                Some(Some(Unwrapped::Tracked(b))) => Some(b),
                Some(_) => return None,
            };
            let xp = f32_values(x.primitive())?;
            let wp = f32_values(w.primitive())?;
            let y = run(&xp, &wp, b.as_ref().map(|b| b.primitive()), false)?;
            // A missing bias is an untracked zero-size stand-in: it has no node to update.
            let bias_node = match &b {
                Some(b) => b.node(),
                None => AdTensor::new(flex_tensor(Vec::new(), &[0])).node(),
            };
            let out = match Conv2dBackward
                .prepare::<NoCheckpointing>([x.node(), w.node(), bias_node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((xp, wp, *g), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Some(Tensor::from_primitive::<AdFlex>(out))
        }
        _ => None,
    }
}

/// `module.forward(x)` for a burn `GroupNorm`, followed by SiLU when `silu` is set, fused on the
/// project's kernel where it applies (see [`try_group_norm`]); burn's own ops otherwise.
pub fn group_norm(module: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
    if enabled("norm")
        && let Some(y) = try_group_norm(module, x.clone(), silu)
    {
        return y;
    }
    let y = module.forward(x);
    if silu {
        burn::tensor::activation::silu(y)
    } else {
        y
    }
}

/// The fused group norm (+ SiLU) on the project's kernel, or `None` where it does not apply:
/// a norm without affine parameters, or inputs that are not all f32 Flex tensors of one kind.
pub fn try_group_norm(module: &GroupNorm, x: Tensor<4>, silu: bool) -> Option<Tensor<4>> {
    let [batch, channels, h, w] = x.dims();
    let (gamma, beta) = (module.gamma.as_ref()?.val(), module.beta.as_ref()?.val());
    let empty = batch == 0 || channels == 0 || h * w == 0;
    if empty
        || channels != module.num_channels
        || module.num_groups == 0
        || channels % module.num_groups != 0
    {
        return None;
    }
    let g = NormGeometry {
        batch,
        channels,
        pixels: h * w,
        groups: module.num_groups,
        eps: module.epsilon,
        silu,
    };
    let shape = [batch, channels, h, w];
    let run = |x: &FlexTensor, gm: &FlexTensor, bt: &FlexTensor| -> Option<FlexTensor> {
        let y = group_norm::forward(x.storage(), gm.storage(), bt.storage(), &g);
        Some(flex_tensor(y, &shape))
    };
    match (unwrap(&x)?, unwrap(&gamma)?, unwrap(&beta)?) {
        (Unwrapped::Plain(x), Unwrapped::Plain(gm), Unwrapped::Plain(bt)) => {
            let (x, gm, bt) = (f32_values(&x)?, f32_values(&gm)?, f32_values(&bt)?);
            Some(Tensor::from_primitive::<Flex>(run(&x, &gm, &bt)?))
        }
        (Unwrapped::Tracked(x), Unwrapped::Tracked(gm), Unwrapped::Tracked(bt)) => {
            let xp = f32_values(x.primitive())?;
            let gp = f32_values(gm.primitive())?;
            let bp = f32_values(bt.primitive())?;
            let y = run(&xp, &gp, &bp)?;
            let out = match GroupNormBackward
                .prepare::<NoCheckpointing>([x.node(), gm.node(), bt.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((xp, gp, bp, g), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Some(Tensor::from_primitive::<AdFlex>(out))
        }
        _ => None,
    }
}

/// Backward node of [`group_norm`]: state is (input, gamma, beta, geometry).
#[derive(Debug)]
struct GroupNormBackward;

impl Backward<Flex, 3> for GroupNormBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, NormGeometry);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_g, node_b] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x, gm, bt, g) = ops.state;
        let (dx, dg, db) =
            group_norm::backward(x.storage(), gm.storage(), bt.storage(), dy.storage(), &g);
        let shape = x.layout().shape().to_vec();
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, flex_tensor(dx, &shape));
        }
        if let Some(node) = node_g {
            grads.register::<Flex>(node.id, flex_tensor(dg, &[g.channels]));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, flex_tensor(db, &[g.channels]));
        }
    }
}
