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

pub mod conv2d;
pub mod group_norm;

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
/// for the whole process: `burn` (none: burn's own ops throughout), or a comma list of `conv`
/// and `norm`. The benchmark uses it to measure each kernel's effect.
fn enabled(kernel: &str) -> bool {
    static CHOICE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match CHOICE.get_or_init(|| std::env::var("DIFFUSE_KERNELS").ok()) {
        None => true,
        Some(list) => list.split(',').any(|k| k.trim() == kernel),
    }
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
    if enabled("conv") {
        if let Some(y) = try_conv2d(module, x.clone()) {
            return y;
        }
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
            let dx = conv2d::backward_input(dy_v, w.storage(), &g);
            grads.register::<Flex>(node.id, flex_tensor(dx, &[g.batch, g.c_in, g.h, g.w]));
        }
        if node_w.is_some() || node_b.is_some() {
            let (dw, db) = conv2d::backward_weight(x.storage(), dy_v, &g);
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
    let run = |x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>| -> Option<FlexTensor> {
        let xv = f32_values(x)?;
        let wv = f32_values(w)?;
        let bv = match b {
            Some(b) => Some(f32_values(b)?),
            None => None,
        };
        let y = conv2d::forward(
            xv.storage(),
            wv.storage(),
            bv.as_ref().map(|b| b.storage::<f32>()),
            g,
        );
        Some(flex_tensor(y, &out_shape))
    };
    match (unwrap(&x)?, unwrap(&weight)?, bias.as_ref().map(unwrap)) {
        (Unwrapped::Plain(x), Unwrapped::Plain(w), None) => {
            Some(Tensor::from_primitive::<Flex>(run(&x, &w, None)?))
        }
        (Unwrapped::Plain(x), Unwrapped::Plain(w), Some(Some(Unwrapped::Plain(b)))) => {
            Some(Tensor::from_primitive::<Flex>(run(&x, &w, Some(&b))?))
        }
        (Unwrapped::Tracked(x), Unwrapped::Tracked(w), b) => {
            let b = match b {
                None => None,
                Some(Some(Unwrapped::Tracked(b))) => Some(b),
                Some(_) => return None,
            };
            let xp = f32_values(x.primitive())?;
            let wp = f32_values(w.primitive())?;
            let y = run(&xp, &wp, b.as_ref().map(|b| b.primitive()))?;
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
    if enabled("norm") {
        if let Some(y) = try_group_norm(module, x.clone(), silu) {
            return y;
        }
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
