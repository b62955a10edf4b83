//! diffusers pipeline folders with a `UNet2DModel` (DDPMPipeline, DDIMPipeline):
//!
//! ```text
//! model_index.json                          {"unet": ["diffusers", "UNet2DModel"], ...}
//! unet/config.json                          the UNet2DModel settings
//! unet/diffusion_pytorch_model.safetensors  weights (or sharded, with an .index.json)
//! scheduler/scheduler_config.json           the scheduler settings
//! ```
//!
//! A UNet2DModel built from DownBlock2D/AttnDownBlock2D, UNetMidBlock2D and
//! UpBlock2D/AttnUpBlock2D is the DDPM U-Net that [`crate::unet::UNet`] implements: the same
//! skips, residual blocks and attention, so loading is a renaming of tensors (torch's Linear
//! weights are the transpose of burn's; attention projections are Linear there and 1x1
//! convolutions here) and exporting is the reverse.

use crate::model::{LoadedModel, ModelConfig};
use crate::sampler::{Scheduler, SchedulerConfig};
use crate::schedule::BetaSchedule;
use crate::unet::{UNet, UNetConfig};
use crate::weights::{self, HostTensor, NamedTensors, StoreDtype};
use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The diffusers version whose file layout the exporter writes.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// `unet/config.json` of a `UNet2DModel`, with diffusers' defaults for absent keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub sample_size: Option<Value>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub freq_shift: f64,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: usize,
    pub downsample_type: String,
    pub upsample_type: String,
    pub dropout: f64,
    pub act_fn: String,
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: Option<usize>,
    pub attn_norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
}

impl Default for UNet2DConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            class_name: None,
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: s(&[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: s(&[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
        }
    }
}

fn unsupported(key: &str, value: impl std::fmt::Display, supported: &str) -> anyhow::Error {
    anyhow!("unet config key {key} = {value} is not supported ({supported})")
}

impl UNet2DConfig {
    /// The same network as a diffuse [`UNetConfig`], or an error naming the first unsupported
    /// key.
    pub fn to_unet_config(&self) -> Result<UNetConfig> {
        let size = match &self.sample_size {
            Some(Value::Number(n)) => n.as_u64().map(|v| v as usize),
            Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => {
                a[0].as_u64().map(|v| v as usize)
            }
            _ => None,
        }
        .ok_or_else(|| {
            anyhow!(
                "unet config key sample_size must be a positive integer or a square [h, w] (got {})",
                self.sample_size.clone().unwrap_or(Value::Null)
            )
        })?;
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "only positional",
            ));
        }
        if self.center_input_sample {
            return Err(unsupported("center_input_sample", true, "only false"));
        }
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn, "only silu"));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "only default",
            ));
        }
        if self.mid_block_scale_factor != 1.0 {
            return Err(unsupported(
                "mid_block_scale_factor",
                self.mid_block_scale_factor,
                "only 1",
            ));
        }
        for (key, v) in [
            ("downsample_type", &self.downsample_type),
            ("upsample_type", &self.upsample_type),
        ] {
            if v != "conv" {
                return Err(unsupported(key, v, "only conv"));
            }
        }
        if let Some(m) = self
            .mid_block_type
            .as_deref()
            .filter(|m| *m != "UNetMidBlock2D")
        {
            return Err(unsupported("mid_block_type", m, "only UNetMidBlock2D"));
        }
        if self.mid_block_type.is_none() {
            return Err(unsupported("mid_block_type", "null", "only UNetMidBlock2D"));
        }
        if let Some(c) = &self.class_embed_type {
            return Err(unsupported(
                "class_embed_type",
                c,
                "only null, with num_class_embeds",
            ));
        }
        let chans = &self.block_out_channels;
        let n = chans.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "unet config: block_out_channels, down_block_types and up_block_types must have the same length (got {}, {} and {})",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        let base = chans[0];
        if base == 0 || chans.iter().any(|c| c % base != 0) {
            bail!(
                "unet config key block_out_channels = {chans:?} is not supported (every entry must be a multiple of the first)"
            );
        }
        let groups = self
            .norm_num_groups
            .ok_or_else(|| unsupported("norm_num_groups", "null", "give a number"))?;
        if let Some(g) = self.attn_norm_num_groups.filter(|g| *g != groups) {
            return Err(unsupported(
                "attn_norm_num_groups",
                g,
                "only null or norm_num_groups",
            ));
        }
        if let Some(d) = self.time_embedding_dim.filter(|d| *d != 4 * base) {
            return Err(unsupported(
                "time_embedding_dim",
                d,
                "only null or 4 x block_out_channels[0]",
            ));
        }
        let mut attention_levels = Vec::new();
        for (i, down) in self.down_block_types.iter().enumerate() {
            let up = &self.up_block_types[n - 1 - i];
            let d_attn = match down.as_str() {
                "DownBlock2D" => false,
                "AttnDownBlock2D" => true,
                other => {
                    return Err(unsupported(
                        "down_block_types",
                        other,
                        "DownBlock2D, AttnDownBlock2D",
                    ));
                }
            };
            let u_attn = match up.as_str() {
                "UpBlock2D" => false,
                "AttnUpBlock2D" => true,
                other => {
                    return Err(unsupported(
                        "up_block_types",
                        other,
                        "UpBlock2D, AttnUpBlock2D",
                    ));
                }
            };
            if d_attn != u_attn {
                bail!(
                    "unet config: down block {i} ({down}) and the matching up block {} ({up}) must both have attention or both not",
                    n - 1 - i
                );
            }
            if d_attn {
                attention_levels.push(i);
            }
        }
        let mut cfg = UNetConfig {
            image_size: size,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            base_channels: base,
            channel_mult: chans.iter().map(|c| c / base).collect(),
            num_res_blocks: self.layers_per_block,
            attention_resolutions: Vec::new(),
            dropout: 0.0,
            norm_groups: groups,
            num_classes: match self.num_class_embeds {
                Some(0) | Some(1) => {
                    return Err(unsupported("num_class_embeds", 1, "at least 2"));
                }
                Some(k) => Some(k - 1),
                None => None,
            },
            norm_eps: self.norm_eps,
            attention_head_dim: self.attention_head_dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            downsample_padding: self.downsample_padding,
            mid_attention: self.add_attention,
            text_dim: None,
            cross_attention_resolutions: Vec::new(),
            cond_channels: 0,
        };
        let sizes = cfg.level_sizes();
        cfg.attention_resolutions = attention_levels.iter().map(|&i| sizes[i]).collect();
        // Attention is placed by feature-map size here: two levels of one size must agree.
        for i in 0..n {
            for j in i + 1..n {
                if sizes[i] == sizes[j]
                    && attention_levels.contains(&i) != attention_levels.contains(&j)
                {
                    bail!(
                        "unet config: levels {i} and {j} are both {} pixels but only one has attention (sample_size {size} is too small for {n} levels)",
                        sizes[i]
                    );
                }
            }
        }
        cfg.validate().context("unet config")?;
        Ok(cfg)
    }

    /// The diffusers description of a diffuse U-Net.
    pub fn from_unet_config(cfg: &UNetConfig) -> Self {
        let sizes = cfg.level_sizes();
        let attn: Vec<bool> = sizes
            .iter()
            .map(|s| cfg.attention_resolutions.contains(s))
            .collect();
        let down = attn
            .iter()
            .map(|&a| if a { "AttnDownBlock2D" } else { "DownBlock2D" }.to_string())
            .collect();
        let up = attn
            .iter()
            .rev()
            .map(|&a| if a { "AttnUpBlock2D" } else { "UpBlock2D" }.to_string())
            .collect();
        Self {
            class_name: Some("UNet2DModel".into()),
            sample_size: Some(json!(cfg.image_size)),
            in_channels: cfg.in_channels,
            out_channels: cfg.out_channels,
            freq_shift: cfg.freq_shift,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            down_block_types: down,
            up_block_types: up,
            block_out_channels: cfg.level_channels(),
            layers_per_block: cfg.num_res_blocks,
            downsample_padding: cfg.downsample_padding,
            dropout: cfg.dropout,
            attention_head_dim: cfg.attention_head_dim,
            norm_num_groups: Some(cfg.norm_groups),
            norm_eps: cfg.norm_eps,
            add_attention: cfg.mid_attention,
            num_class_embeds: cfg.num_classes.map(|k| k + 1),
            ..Self::default()
        }
    }
}

/// How one diffuse tensor is stored in diffusers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    Same,
    /// burn's Linear weight `[in, out]` is torch's `[out, in]`.
    Transposed,
    /// A 1x1 convolution here, a Linear there: `[c, c, 1, 1]` vs `[c, c]`.
    ConvAsLinear,
}

/// The diffusers name of a diffuse U-Net parameter path, and how its values are laid out.
fn diffusers_name(ours: &str) -> Option<(String, Layout)> {
    let parts: Vec<&str> = ours.split('.').collect();
    fn leaf(p: &str) -> &str {
        match p {
            "gamma" => "weight",
            "beta" => "bias",
            other => other,
        }
    }
    let resnet = |rest: &[&str]| -> Option<(String, Layout)> {
        let (layer, layout) = match rest[0] {
            "norm1" | "conv1" | "norm2" | "conv2" => (rest[0], Layout::Same),
            "time_proj" => ("time_emb_proj", Layout::Transposed),
            "skip" => ("conv_shortcut", Layout::Same),
            _ => return None,
        };
        let layout = if rest[1] == "bias" {
            Layout::Same
        } else {
            layout
        };
        Some((format!("{layer}.{}", leaf(rest[1])), layout))
    };
    let attention = |rest: &[&str]| -> Option<(String, Layout)> {
        let (layer, layout) = match rest[0] {
            "norm" => ("group_norm", Layout::Same),
            "q" => ("to_q", Layout::ConvAsLinear),
            "k" => ("to_k", Layout::ConvAsLinear),
            "v" => ("to_v", Layout::ConvAsLinear),
            "proj" => ("to_out.0", Layout::ConvAsLinear),
            _ => return None,
        };
        let layout = if rest[1] == "weight" {
            layout
        } else {
            Layout::Same
        };
        Some((format!("{layer}.{}", leaf(rest[1])), layout))
    };
    let prefixed =
        |p: String, inner: Option<(String, Layout)>| inner.map(|(n, l)| (format!("{p}.{n}"), l));
    match parts.as_slice() {
        ["time", fc, w] => {
            let l = if *w == "weight" {
                Layout::Transposed
            } else {
                Layout::Same
            };
            let name = match *fc {
                "fc1" => "linear_1",
                "fc2" => "linear_2",
                _ => return None,
            };
            Some((format!("time_embedding.{name}.{w}"), l))
        }
        ["class_embed", "weight"] => Some(("class_embedding.weight".into(), Layout::Same)),
        ["stem", w] => Some((format!("conv_in.{w}"), Layout::Same)),
        ["out_norm", w] => Some((format!("conv_norm_out.{}", leaf(w)), Layout::Same)),
        ["out_conv", w] => Some((format!("conv_out.{w}"), Layout::Same)),
        ["mid1", rest @ ..] => prefixed("mid_block.resnets.0".into(), resnet(rest)),
        ["mid2", rest @ ..] => prefixed("mid_block.resnets.1".into(), resnet(rest)),
        ["mid_attn", rest @ ..] => prefixed("mid_block.attentions.0".into(), attention(rest)),
        [dir @ ("down" | "up"), i, "blocks", j, rest @ ..] => {
            prefixed(format!("{dir}_blocks.{i}.resnets.{j}"), resnet(rest))
        }
        [dir @ ("down" | "up"), i, "attn", j, rest @ ..] => {
            prefixed(format!("{dir}_blocks.{i}.attentions.{j}"), attention(rest))
        }
        ["down", i, "downsample", "conv", w] => Some((
            format!("down_blocks.{i}.downsamplers.0.conv.{w}"),
            Layout::Same,
        )),
        ["up", i, "upsample", "conv", w] => {
            Some((format!("up_blocks.{i}.upsamplers.0.conv.{w}"), Layout::Same))
        }
        _ => None,
    }
}

/// The names of the original DDPM checkpoints' attention layers, which diffusers still reads.
fn legacy_attention_name(name: &str) -> Option<String> {
    [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ]
    .iter()
    .find(|(new, _)| name.contains(new))
    .map(|(new, old)| name.replace(new, old))
}

/// diffusers tensors renamed (and re-laid out) for the diffuse U-Net `unet` (built from the
/// converted config). Fails naming the first missing or mis-shaped tensor, or one the config
/// does not account for.
pub fn tensors_from_diffusers(unet: &UNet, theirs: &NamedTensors) -> Result<NamedTensors> {
    let mut wanted = NamedTensors::new();
    weights::collect(unet, "", &mut wanted);
    let mut out = NamedTensors::new();
    let mut used = BTreeSet::new();
    for (ours, want) in &wanted {
        let (name, layout) = diffusers_name(ours)
            .ok_or_else(|| anyhow!("internal: no diffusers name for tensor '{ours}'"))?;
        let (key, t) = match theirs.get(&name) {
            Some(t) => (name.clone(), t),
            None => match legacy_attention_name(&name).and_then(|l| theirs.get(&l).map(|t| (l, t)))
            {
                Some(found) => found,
                None => bail!("tensor '{name}' is missing"),
            },
        };
        let t = match layout {
            Layout::Same => t.clone(),
            Layout::Transposed if t.shape.len() == 2 => weights::transpose(t),
            Layout::ConvAsLinear if t.shape.len() == 2 => HostTensor {
                shape: vec![t.shape[0], t.shape[1], 1, 1],
                data: t.data.clone(),
            },
            Layout::ConvAsLinear if t.shape.len() == 4 => t.clone(),
            _ => bail!(
                "tensor '{key}' has shape {:?}, a matrix was expected",
                t.shape
            ),
        };
        if t.shape != want.shape {
            let mut expect = want.shape.clone();
            if layout == Layout::Transposed {
                expect.reverse();
            } else if layout == Layout::ConvAsLinear {
                expect.truncate(2);
            }
            bail!(
                "tensor '{key}' has shape {:?}, the config implies {:?}",
                theirs[&key].shape,
                expect
            );
        }
        used.insert(key);
        out.insert(ours.clone(), t);
    }
    if let Some(extra) = theirs.keys().find(|k| !used.contains(*k)) {
        bail!("tensor '{extra}' is not part of the network its config describes");
    }
    Ok(out)
}

/// diffuse tensors as diffusers names and lays them out.
pub fn tensors_to_diffusers(ours: &NamedTensors) -> Result<NamedTensors> {
    let mut out = NamedTensors::new();
    for (name, t) in ours {
        let (theirs, layout) =
            diffusers_name(name).ok_or_else(|| anyhow!("no diffusers name for tensor '{name}'"))?;
        let t = match layout {
            Layout::Same => t.clone(),
            Layout::Transposed => weights::transpose(t),
            Layout::ConvAsLinear => HostTensor {
                shape: t.shape[..2].to_vec(),
                data: t.data.clone(),
            },
        };
        out.insert(theirs, t);
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&crate::sampler::config::python_json(&text))
        .with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Reads the U-Net weights of a pipeline's `unet` folder: one safetensors file, or shards
/// listed in `diffusion_pytorch_model.safetensors.index.json`, or the fp16 variant.
fn read_unet_weights(unet: &Path) -> Result<NamedTensors> {
    let single = unet.join(WEIGHTS);
    if single.exists() {
        return Ok(weights::read_safetensors(&single)?.0);
    }
    let index = unet.join(format!("{WEIGHTS}.index.json"));
    if index.exists() {
        let v = read_json(&index)?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| anyhow!("{} has no weight_map", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        let mut all = NamedTensors::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                bail!("{}: shard name '{f}' leaves the folder", index.display());
            }
            all.extend(weights::read_safetensors(&unet.join(f))?.0);
        }
        return Ok(all);
    }
    let fp16 = unet.join("diffusion_pytorch_model.fp16.safetensors");
    if fp16.exists() {
        return Ok(weights::read_safetensors(&fp16)?.0);
    }
    if unet.join("diffusion_pytorch_model.bin").exists() {
        bail!(
            "{} holds only PyTorch .bin weights; save the pipeline with safe_serialization=True",
            unet.display()
        );
    }
    bail!("{} holds no {WEIGHTS}", unet.display())
}

/// Whether `dir` looks like a diffusers pipeline folder.
pub fn is_pipeline(dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
}

/// Loads a diffusers pipeline folder with a `UNet2DModel`.
pub fn load_pipeline(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let what = dir.display().to_string();
    let index = read_json(&dir.join("model_index.json"))?;
    let unet_class = index["unet"]
        .as_array()
        .and_then(|a| a.get(1))
        .and_then(|c| c.as_str());
    match unet_class {
        Some("UNet2DModel") => {}
        Some(other) => bail!("{what}: its unet is a {other}; only UNet2DModel is supported"),
        None => bail!("{what}/model_index.json names no unet"),
    }
    for extra in ["vqvae", "vae", "text_encoder"] {
        if !index[extra].is_null() {
            bail!("{what}: pipelines with a {extra} are not supported (only DDPM/DDIM pipelines)");
        }
    }
    let unet_dir = dir.join("unet");
    let cfg_path = unet_dir.join("config.json");
    let raw = read_json(&cfg_path)?;
    let u2d: UNet2DConfig = serde_json::from_value(raw)
        .with_context(|| format!("{} is not a UNet2DModel config", cfg_path.display()))?;
    let unet_cfg = u2d
        .to_unet_config()
        .with_context(|| cfg_path.display().to_string())?;
    let sched_path = dir.join("scheduler").join("scheduler_config.json");
    let raw_sched = read_json(&sched_path)?;
    let flow = raw_sched["_class_name"].as_str() == Some(FLOW_SCHEDULER);
    if flow {
        check_flow_scheduler(&raw_sched).with_context(|| sched_path.display().to_string())?;
    } else if let Some(class) = raw_sched["_class_name"].as_str() {
        const VP: [&str; 11] = [
            "DDPMScheduler",
            "DDIMScheduler",
            "PNDMScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "HeunDiscreteScheduler",
            "LMSDiscreteScheduler",
            "UniPCMultistepScheduler",
            "DEISMultistepScheduler",
        ];
        if !VP.contains(&class) {
            bail!(
                "{}: scheduler {class} is not supported (only variance-preserving DDPM-style schedulers and {FLOW_SCHEDULER})",
                sched_path.display()
            );
        }
    }
    let mut scheduler = SchedulerConfig::from_file(&sched_path)?;
    if flow {
        // The velocity of x_t = (1 - t) x0 + t eps at model time t T: diffuse's flow objective.
        scheduler.prediction_type = "flow".into();
    } else if scheduler.prediction()?.is_flow() {
        bail!(
            "{}: prediction_type flow is diffuse's flow matching, not a diffusers DDPM-style scheduler",
            sched_path.display()
        );
    }
    let theirs = read_unet_weights(&unet_dir)?;
    let unet =
        UNet::new(&unet_cfg, device).with_context(|| format!("{what}: invalid model config"))?;
    let mismatch = || format!("{}: weights do not match config.json", unet_dir.display());
    let ours = tensors_from_diffusers(&unet, &theirs).with_context(mismatch)?;
    let unet = weights::apply(unet, &ours, "").with_context(mismatch)?;
    let config = ModelConfig {
        unet: unet_cfg,
        schedule: scheduler.schedule_config()?,
        prediction: scheduler.prediction()?,
        class_names: Vec::new(),
        superres: None,
        latent: None,
        sampling: None,
    };
    Ok(LoadedModel {
        config,
        scheduler: Scheduler::from_settings(scheduler)?,
        unet,
        source: what,
        vae: None,
    })
}

/// diffusers' scheduler of flow-matching models (SD3, Flux): Euler in `sigma = t`, states
/// `x_t = (1 - t) x0 + t eps`, model time `1000 t` (`num_train_timesteps t`) and the velocity
/// `eps - x0` as the model output (`prev = x + (t' - t) out`), which is what
/// `--objective flow` trains and [`crate::sampler::flow`] integrates.
pub const FLOW_SCHEDULER: &str = "FlowMatchEulerDiscreteScheduler";

/// Refuses the `FlowMatchEulerDiscreteScheduler` settings whose sampling times or updates
/// differ from the flow samplers here (resolution-dependent shifting, other sigma spacings,
/// inverted or stochastic sampling); `shift` and `num_train_timesteps` are read (and checked)
/// by [`SchedulerConfig`].
fn check_flow_scheduler(raw: &Value) -> Result<()> {
    for key in [
        "use_dynamic_shifting",
        "invert_sigmas",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "stochastic_sampling",
    ] {
        if raw[key].as_bool() == Some(true) {
            bail!(
                "scheduler key {key} = true is not supported ({FLOW_SCHEDULER} with even times and a fixed shift only)"
            );
        }
    }
    if !raw["shift_terminal"].is_null() {
        bail!(
            "scheduler key shift_terminal is not supported ({FLOW_SCHEDULER} with even times and a fixed shift only)"
        );
    }
    Ok(())
}

/// The `DDPMScheduler` settings of a diffusion model: its schedule, objective and sampler
/// settings in diffusers' keys.
fn ddpm_scheduler_json(model: &LoadedModel) -> Result<Value> {
    let cfg = &model.config;
    let sched = &model.scheduler.settings;
    let beta_schedule = match cfg.schedule.beta_schedule {
        BetaSchedule::Linear => "linear",
        BetaSchedule::ScaledLinear => "scaled_linear",
        BetaSchedule::Cosine => "squaredcos_cap_v2",
        BetaSchedule::Sigmoid => bail!(
            "{}: its sigmoid schedule has no diffusers equivalent (diffusers' 'sigmoid' differs)",
            model.source
        ),
    };
    Ok(json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": cfg.schedule.timesteps,
        "beta_start": cfg.schedule.beta_start,
        "beta_end": cfg.schedule.beta_end,
        "beta_schedule": beta_schedule,
        "prediction_type": sched.prediction_type,
        "variance_type": sched.variance_type.clone().unwrap_or_else(|| "fixed_small".into()),
        "clip_sample": sched.clip_sample.unwrap_or(true),
        "clip_sample_range": sched.clip_sample_range,
        "timestep_spacing": sched.timestep_spacing.clone().unwrap_or_else(|| "leading".into()),
        "steps_offset": sched.steps_offset,
        "thresholding": sched.thresholding,
        "dynamic_thresholding_ratio": sched.dynamic_thresholding_ratio,
        "sample_max_value": sched.sample_max_value,
        "rescale_betas_zero_snr": sched.rescale_betas_zero_snr,
        "set_alpha_to_one": sched.set_alpha_to_one.unwrap_or(true),
        "use_karras_sigmas": sched.use_karras_sigmas,
    }))
}

/// Writes a diffuse model as a diffusers DDPMPipeline folder (f32 weights): a diffusion model
/// with its `DDPMScheduler`, a flow-matching model with a [`FLOW_SCHEDULER`]. Files are written
/// atomically; an existing folder is refused.
pub fn export_pipeline(model: &LoadedModel, out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{} already exists; give a new folder", out.display());
    }
    let cfg = &model.config;
    if cfg.unet.text_dim.is_some() || cfg.unet.cond_channels > 0 || cfg.latent.is_some() {
        bail!(
            "{}: only unconditioned and class-conditioned pixel models export to a diffusers DDPMPipeline (this one takes text, a low-resolution image or latents)",
            model.source
        );
    }
    let sched = &model.scheduler.settings;
    let (sched_class, scheduler_json) = if cfg.prediction.is_flow() {
        (
            FLOW_SCHEDULER,
            json!({
                "_class_name": FLOW_SCHEDULER,
                "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": cfg.schedule.timesteps,
                "shift": sched.shift,
                "use_dynamic_shifting": false,
            }),
        )
    } else {
        ("DDPMScheduler", ddpm_scheduler_json(model)?)
    };
    let mut ours = NamedTensors::new();
    weights::collect(&model.unet, "", &mut ours);
    let theirs = tensors_to_diffusers(&ours)?;
    let unet_cfg = UNet2DConfig::from_unet_config(&cfg.unet);
    let mut unet_json = serde_json::to_value(&unet_cfg)?;
    unet_json["_diffusers_version"] = json!(DIFFUSERS_VERSION);
    let index_json = json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", sched_class],
        "unet": ["diffusers", "UNet2DModel"],
    });
    let pretty = |v: &Value| -> Result<Vec<u8>> {
        let mut s = serde_json::to_string_pretty(v)?;
        s.push('\n');
        Ok(s.into_bytes())
    };
    let bytes = weights::to_safetensors(&theirs, &HashMap::new(), StoreDtype::F32)?;
    crate::files::write_atomic(&out.join("unet").join(WEIGHTS), &bytes)?;
    crate::files::write_atomic(&out.join("unet").join("config.json"), &pretty(&unet_json)?)?;
    crate::files::write_atomic(
        &out.join("scheduler").join("scheduler_config.json"),
        &pretty(&scheduler_json)?,
    )?;
    crate::files::write_atomic(&out.join("model_index.json"), &pretty(&index_json)?)?;
    Ok(())
}
