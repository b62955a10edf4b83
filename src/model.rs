//! A trained model as a file: its weights in safetensors, with its config as JSON in the
//! file's metadata (key `diffuse.config`) and beside it in `config.json` inside a run folder.
//! Also the models embedded in the binary.
//!
//! One format for every family ([`Family`]): the config of a diffusion model is a
//! [`ModelConfig`] with no `family` key (every file written before families existed, so their
//! bits are unchanged); any other family's config carries `"family": "<name>"` beside its own
//! fields ([`FamilyConfig`]).

use crate::sampler::{SamplerKind, Scheduler};
use crate::schedule::{Prediction, ScheduleConfig};
use crate::unet::{UNet, UNetConfig};
use crate::weights::{self, NamedTensors, StoreDtype};
use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Metadata key holding the model config JSON in a safetensors file.
pub const CONFIG_KEY: &str = "diffuse.config";

/// The class-conditioned Fashion-MNIST model shipped inside the binary (the default model).
pub static EMBEDDED_MODEL: &[u8] = include_bytes!("../models/fashion-mnist.safetensors");

/// The text-conditioned 32x32 Noto emoji model shipped inside the binary (`--model emoji`).
pub static EMOJI_MODEL: &[u8] = include_bytes!("../models/emoji.safetensors");

/// The Fashion-MNIST student distilled from a flow-matching teacher (`diffuse distill`),
/// sampling in 4 model evaluations by default (`--model fashion-mnist-fast`; docs/fast-generation.md).
pub static FAST_MODEL: &[u8] = include_bytes!("../models/fashion-mnist-fast.safetensors");

/// The class-conditioned Fashion-MNIST gated PixelCNN (`--model fashion-mnist-autoregressive`;
/// docs/FAMILIES.md).
pub static AUTOREGRESSIVE_MODEL: &[u8] =
    include_bytes!("../models/fashion-mnist-autoregressive.safetensors");

/// The class-conditioned Fashion-MNIST GAN (`--model fashion-mnist-gan`; docs/FAMILIES.md).
pub static GAN_MODEL: &[u8] = include_bytes!("../models/fashion-mnist-gan.safetensors");

/// The class-conditioned Fashion-MNIST VAE (`--model fashion-mnist-vae`; docs/FAMILIES.md).
pub static VAE_MODEL: &[u8] = include_bytes!("../models/fashion-mnist-vae.safetensors");

/// Models shipped inside the binary, by the name `--model` takes.
pub const NAMED_MODELS: &[(&str, &[u8])] = &[
    ("fashion-mnist", EMBEDDED_MODEL),
    ("fashion-mnist-fast", FAST_MODEL),
    ("emoji", EMOJI_MODEL),
    ("fashion-mnist-gan", GAN_MODEL),
    ("fashion-mnist-autoregressive", AUTOREGRESSIVE_MODEL),
    ("fashion-mnist-vae", VAE_MODEL),
];

/// The bytes of a shipped model, by name.
pub fn named_model(name: &str) -> Option<&'static [u8]> {
    NAMED_MODELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

/// The kinds of generative model a file can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Denoising diffusion or flow matching: a U-Net and a noise schedule.
    Diffusion,
    /// A generative adversarial network ([`crate::gan`]).
    Gan,
    /// An autoregressive model over pixels, a gated PixelCNN ([`crate::pixelcnn`]).
    Autoregressive,
    /// A variational autoencoder sampled from its prior ([`crate::vae::generator`]).
    Vae,
}

impl Family {
    pub const ALL: [Family; 4] = [
        Family::Diffusion,
        Family::Gan,
        Family::Autoregressive,
        Family::Vae,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusion => "diffusion",
            Self::Gan => "gan",
            Self::Autoregressive => "autoregressive",
            Self::Vae => "vae",
        }
    }

    /// How messages call models of the family ("GANs").
    pub fn plural(self) -> &'static str {
        match self {
            Self::Diffusion => "diffusion models",
            Self::Gan => "GANs",
            Self::Autoregressive => "autoregressive models",
            Self::Vae => "VAEs",
        }
    }

    /// How messages call a model of the family ("a GAN").
    pub fn article_name(self) -> &'static str {
        match self {
            Self::Diffusion => "a diffusion model",
            Self::Gan => "a GAN",
            Self::Autoregressive => "an autoregressive model",
            Self::Vae => "a VAE",
        }
    }
}

/// The config of a model of a family other than diffusion, as files store it: the family's
/// own fields with `"family": "<name>"` beside them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "kebab-case")]
pub enum FamilyConfig {
    Gan(crate::gan::GanConfig),
    Autoregressive(crate::pixelcnn::PixelCnnConfig),
    Vae(crate::vae::generator::VaeGenConfig),
}

impl FamilyConfig {
    pub fn family(&self) -> Family {
        match self {
            Self::Gan(_) => Family::Gan,
            Self::Autoregressive(_) => Family::Autoregressive,
            Self::Vae(_) => Family::Vae,
        }
    }
}

/// A family's own config, which files store inside [`FamilyConfig`] (tagged with the family).
pub trait FamilyPart: Sized + Clone {
    fn wrap(self) -> FamilyConfig;
    fn unwrap(c: FamilyConfig) -> Option<Self>;
}

impl FamilyPart for crate::gan::GanConfig {
    fn wrap(self) -> FamilyConfig {
        FamilyConfig::Gan(self)
    }
    fn unwrap(c: FamilyConfig) -> Option<Self> {
        match c {
            FamilyConfig::Gan(c) => Some(c),
            _ => None,
        }
    }
}

impl FamilyPart for crate::pixelcnn::PixelCnnConfig {
    fn wrap(self) -> FamilyConfig {
        FamilyConfig::Autoregressive(self)
    }
    fn unwrap(c: FamilyConfig) -> Option<Self> {
        match c {
            FamilyConfig::Autoregressive(c) => Some(c),
            _ => None,
        }
    }
}

impl FamilyPart for crate::vae::generator::VaeGenConfig {
    fn wrap(self) -> FamilyConfig {
        FamilyConfig::Vae(self)
    }
    fn unwrap(c: FamilyConfig) -> Option<Self> {
        match c {
            FamilyConfig::Vae(c) => Some(c),
            _ => None,
        }
    }
}

/// Checks the classes of a family's config: a class count from 1 to 100,000 and, where names
/// are given, one name per class.
pub fn check_classes(num_classes: Option<usize>, class_names: &[String]) -> Result<()> {
    let k = num_classes.unwrap_or(0);
    if num_classes.is_some_and(|k| !(1..=100_000).contains(&k)) {
        bail!("the class count must be between 1 and 100000 (got {k})");
    }
    if !class_names.is_empty() && class_names.len() != k {
        bail!("it names {} classes for a model of {k}", class_names.len());
    }
    Ok(())
}

/// Builds a family's network from a model file's tensors (`what` names the file): its config
/// checked by `validate`, a file holding fewer than `least` weights refused before the network
/// is allocated (a damaged or hostile config cannot make it allocate far more than the file
/// holds), then `make` and the weights applied.
pub fn build_network<M: burn::module::Module>(
    validate: Result<()>,
    least: usize,
    tensors: &NamedTensors,
    what: &str,
    make: impl FnOnce() -> Result<M>,
) -> Result<M> {
    validate.map_err(|e| anyhow!("{what}: the model config it carries is invalid: {e}"))?;
    let held: usize = tensors.values().map(|t| t.data.len()).sum();
    if least > held {
        bail!(
            "{what} does not match its config: the config describes at least {least} weights, the file holds {held}"
        );
    }
    weights::apply(make()?, tensors, "")
        .map_err(|e| anyhow!("{what} does not match its config: {e}"))
}

/// serde's `with` for a family's own config in a run config: stored as [`FamilyConfig`], so
/// with its `"family"` tag.
pub mod tagged {
    use super::{FamilyConfig, FamilyPart};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<C: FamilyPart, S: Serializer>(c: &C, s: S) -> Result<S::Ok, S::Error> {
        c.clone().wrap().serialize(s)
    }

    pub fn deserialize<'de, C: FamilyPart, D: Deserializer<'de>>(d: D) -> Result<C, D::Error> {
        let c = FamilyConfig::deserialize(d)?;
        let family = c.family().name();
        C::unwrap(c).ok_or_else(|| {
            serde::de::Error::custom(format!("the run's model is of another family ({family})"))
        })
    }
}

/// Which family a config's JSON belongs to: its `family` key, absent for diffusion. `what`
/// names the source in errors.
pub fn family_of(json: &str, what: &str) -> Result<Family> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| anyhow!("{what}: the model config in its metadata is invalid ({e})"))?;
    let Some(f) = v.get("family") else {
        return Ok(Family::Diffusion);
    };
    let Some(name) = f.as_str() else {
        bail!("{what}: the model config's family key is {f}, not a family name");
    };
    Family::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Family::ALL.iter().map(|k| k.name()).collect();
            let shown: String = name.chars().take(40).collect();
            anyhow!(
                "{what}: model family '{shown}' is unknown to this build ({})",
                names.join(", ")
            )
        })
}

/// Everything needed to rebuild and sample a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub unet: UNetConfig,
    pub schedule: ScheduleConfig,
    pub prediction: Prediction,
    /// Class names by index (empty for an unconditioned model).
    #[serde(default)]
    pub class_names: Vec<String>,
    /// A super-resolution model: the denoiser also reads the low-resolution image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superres: Option<SuperResConfig>,
    /// A latent diffusion model: the denoiser works on a VAE's scaled latents; the VAE's
    /// weights travel in the same file under `vae.` (in diffusers' names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentConfig>,
    /// How the model samples when nothing is asked for: set for a distilled student
    /// (`diffuse distill`), which was trained for few steps; `None`: each command's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingConfig>,
}

/// A model's own sampling defaults (a distilled student's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    pub sampler: crate::sampler::SamplerKind,
    /// Steps when none are asked for.
    pub steps: usize,
    /// The most steps it was trained for (a student's time grid); more are refused.
    pub max_steps: usize,
    /// The guidance weight when none is asked for (1 for a student with guidance distilled
    /// into it).
    pub guidance: f32,
}

/// SR3 super-resolution (Saharia et al. 2021): the `S/scale` low-resolution image, upsampled
/// bicubically to `S`, is concatenated to the noisy image as extra input channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuperResConfig {
    /// How many times larger each side of the output is than the input.
    pub scale: usize,
}

/// Latent diffusion (Rombach et al. 2022): the autoencoder the denoiser's latents belong to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatentConfig {
    pub vae: crate::vae::VaeConfig,
    /// Side of the images (the VAE's input and output).
    pub image_size: usize,
}

/// The prefix of the VAE's tensors inside a latent model's file.
pub const VAE_PREFIX: &str = "vae.";

impl ModelConfig {
    /// Checks everything the config says before anything is built: the network, the noise
    /// schedule, the class names, and the super-resolution or latent settings.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        crate::schedule::NoiseSchedule::new(&self.schedule)?;
        let k = self.unet.num_classes.unwrap_or(0);
        if !self.class_names.is_empty() && self.class_names.len() != k {
            bail!(
                "it names {} classes for a model of {k}",
                self.class_names.len()
            );
        }
        if let Some(sr) = &self.superres
            && (!(2..=16).contains(&sr.scale) || !self.unet.image_size.is_multiple_of(sr.scale))
        {
            bail!(
                "super-resolution scale {} must be between 2 and 16 and divide the image size {}",
                sr.scale,
                self.unet.image_size
            );
        }
        if let Some(s) = &self.sampling {
            let t = self.schedule.timesteps;
            if !(1..=s.max_steps).contains(&s.steps) || s.max_steps > t {
                bail!(
                    "its sampling defaults ({} steps, at most {}) do not fit its {t} training steps",
                    s.steps,
                    s.max_steps
                );
            }
            if !(s.guidance.is_finite() && (0.0..=100.0).contains(&s.guidance)) {
                bail!("its default guidance {} is out of range", s.guidance);
            }
            if !self.prediction.is_flow()
                || !matches!(s.sampler, SamplerKind::Euler | SamplerKind::Heun)
            {
                bail!(
                    "its default sampler {} is not a flow model's (euler or heun on a flow-matching model)",
                    s.sampler.name()
                );
            }
        }
        if let Some(l) = &self.latent {
            l.vae.validate()?;
            let f = l.vae.downscale();
            if !(1..=4096).contains(&l.image_size)
                || l.image_size.div_ceil(f) != self.unet.image_size
            {
                bail!(
                    "the latent model's image size {} does not shrink by the VAE's factor {f} to its U-Net's {}",
                    l.image_size,
                    self.unet.image_size
                );
            }
            if l.vae.latent_channels != self.unet.in_channels {
                bail!(
                    "the VAE's {} latent channels do not match the U-Net's {} input channels",
                    l.vae.latent_channels,
                    self.unet.in_channels
                );
            }
        }
        Ok(())
    }

    /// `[channels, height, width]` of what the denoiser generates (latents for a latent
    /// model, else images).
    pub fn image_shape(&self) -> [usize; 3] {
        let s = self.unet.image_size;
        [self.unet.in_channels, s, s]
    }

    /// `[channels, height, width]` of the output images.
    pub fn output_shape(&self) -> [usize; 3] {
        match &self.latent {
            Some(l) => [l.vae.out_channels, l.image_size, l.image_size],
            None => self.image_shape(),
        }
    }

    /// What the model is conditioned on.
    pub fn cond(&self) -> CondSpec<'_> {
        CondSpec {
            num_classes: self.unet.num_classes,
            text: self.unet.text_dim.is_some(),
            class_names: &self.class_names,
        }
    }

    /// Resolves a class option ([`CondSpec::class_index`]).
    pub fn class_index(&self, spec: &str, flag: &str) -> Result<usize> {
        self.cond().class_index(spec, flag)
    }
}

/// What a model of any family is conditioned on: classes (with their names), text, or
/// nothing.
#[derive(Clone, Copy, Debug)]
pub struct CondSpec<'a> {
    pub num_classes: Option<usize>,
    pub text: bool,
    pub class_names: &'a [String],
}

impl CondSpec<'_> {
    /// Resolves a class option (`flag` names it in errors): an index, or a class name
    /// (case-insensitive; `-`, `_`, spaces and `/` ignored).
    pub fn class_index(&self, spec: &str, flag: &str) -> Result<usize> {
        let Some(k) = self.num_classes else {
            bail!("{flag} was given, but this model is not class-conditioned");
        };
        if let Ok(i) = spec.parse::<usize>() {
            if i < k {
                return Ok(i);
            }
            bail!(
                "{flag} {i} is out of range: this model has classes 0..{}",
                k - 1
            );
        }
        let norm = |s: &str| s.to_lowercase().replace(['-', '_', ' ', '/'], "");
        // The given name is normalised once, and echoed at most 60 characters long.
        let (spec_norm, spec_lower) = (norm(spec), spec.to_lowercase());
        self.class_names
            .iter()
            .position(|n| norm(n) == spec_norm || n.to_lowercase() == spec_lower)
            .ok_or_else(|| {
                let shown: String = if spec.chars().count() > 60 {
                    spec.chars().take(60).chain("...".chars()).collect()
                } else {
                    spec.to_string()
                };
                anyhow!(
                    "{flag} '{shown}' is not a class of this model (classes: {})",
                    self.class_names.join(", ")
                )
            })
    }
}

/// A model ready to sample: config, schedule and weights on a device.
#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    /// The noise schedule with the sampler settings: diffusers' scheduler config for a
    /// pipeline folder, else those the diffuse model implies.
    pub scheduler: Scheduler,
    pub unet: UNet,
    /// Where it came from, for messages.
    pub source: String,
    /// The autoencoder of a latent model.
    pub vae: Option<crate::vae::LoadedVae>,
}

impl LoadedModel {
    /// A sampler of `kind` over this model's own noise schedule and sampler settings.
    pub fn sampler(
        &self,
        kind: crate::sampler::SamplerKind,
        choice: &crate::sampler::SamplerChoice,
    ) -> Result<Box<dyn crate::sampler::Sampler>> {
        self.scheduler.sampler(kind, choice)
    }

    /// What the sampler produced to images in `[-1, 1]`: decoded by the VAE for a latent
    /// model, as it is otherwise.
    pub fn to_images(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.vae {
            Some(v) => v.decode_scaled(x),
            None => x,
        }
    }

    /// Images in `[-1, 1]` to what the sampler works on (scaled latents for a latent model).
    pub fn from_images(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.vae {
            Some(v) => v.encode_scaled(x),
            None => x,
        }
    }
}

/// Serialises a model (weights and config) as safetensors bytes.
pub fn model_bytes(
    config: &ModelConfig,
    tensors: &NamedTensors,
    dtype: StoreDtype,
) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(config)?);
    weights::to_safetensors(tensors, &meta, dtype)
}

/// Serialises a model of another family (weights and tagged config) as safetensors bytes.
pub fn family_model_bytes(
    config: &FamilyConfig,
    tensors: &NamedTensors,
    dtype: StoreDtype,
) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(config)?);
    weights::to_safetensors(tensors, &meta, dtype)
}

/// A loaded model of any family.
#[derive(Debug)]
// One or two per process: the size of the diffusion variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    Diffusion(LoadedModel),
    Gan(crate::gan::LoadedGan),
    Autoregressive(crate::pixelcnn::LoadedPixelCnn),
    Vae(crate::vae::generator::LoadedVaeGen),
}

impl Loaded {
    pub fn family(&self) -> Family {
        match self {
            Self::Diffusion(_) => Family::Diffusion,
            Self::Gan(_) => Family::Gan,
            Self::Autoregressive(_) => Family::Autoregressive,
            Self::Vae(_) => Family::Vae,
        }
    }

    /// Where it came from, for messages.
    pub fn source(&self) -> &str {
        match self {
            Self::Diffusion(m) => &m.source,
            Self::Gan(m) => &m.source,
            Self::Autoregressive(m) => &m.source,
            Self::Vae(m) => &m.source,
        }
    }

    /// A diffusion model, or one line saying that `command` takes only those.
    pub fn into_diffusion(self, command: &str) -> Result<LoadedModel> {
        match self {
            Self::Diffusion(m) => Ok(m),
            other => bail!(
                "{} is {}; {command} takes diffusion models",
                other.source(),
                other.family().article_name()
            ),
        }
    }
}

/// Builds a diffusion model from safetensors bytes that carry their config; a model of another
/// family is refused with one line ([`load_any_from_bytes`] takes every family).
pub fn load_from_bytes(bytes: &[u8], what: &str, device: &Device) -> Result<LoadedModel> {
    load_any_from_bytes(bytes, what, device)?.into_diffusion("this command")
}

/// Builds a model of any family from safetensors bytes that carry their config.
pub fn load_any_from_bytes(bytes: &[u8], what: &str, device: &Device) -> Result<Loaded> {
    let (tensors, meta) = weights::from_safetensors(bytes, what)?;
    if meta.contains_key(crate::train::checkpoint::RUN_KEY) {
        bail!(
            "{what} is a training checkpoint, not a model: give its run folder (`--model RUN`) or the model.safetensors beside it"
        );
    }
    let Some(cfg_json) = meta.get(CONFIG_KEY) else {
        bail!("{what} has no diffuse model config in its metadata (not a diffuse model file)");
    };
    let family = family_of(cfg_json, what)?;
    weights::note_if_unverified(
        &meta,
        what,
        "`diffuse convert --model FILE --out NEW.safetensors --dtype f32` writes a copy with one",
    );
    let invalid =
        |e: serde_json::Error| anyhow!("{what}: the model config in its metadata is invalid ({e})");
    Ok(match family {
        Family::Diffusion => {
            let config: ModelConfig = serde_json::from_str(cfg_json).map_err(invalid)?;
            Loaded::Diffusion(build(config, &tensors, "", what, device)?)
        }
        Family::Gan | Family::Autoregressive | Family::Vae => {
            match serde_json::from_str(cfg_json).map_err(invalid)? {
                FamilyConfig::Gan(c) => Loaded::Gan(crate::gan::build(c, &tensors, what, device)?),
                FamilyConfig::Autoregressive(c) => {
                    Loaded::Autoregressive(crate::pixelcnn::build(c, &tensors, what, device)?)
                }
                FamilyConfig::Vae(c) => {
                    Loaded::Vae(crate::vae::generator::build(c, &tensors, what, device)?)
                }
            }
        }
    })
}

/// Builds a model from a config and named tensors (`prefix` in front of every name).
pub fn build(
    config: ModelConfig,
    tensors: &NamedTensors,
    prefix: &str,
    what: &str,
    device: &Device,
) -> Result<LoadedModel> {
    config
        .validate()
        .map_err(|e| anyhow!("{what}: the model config it carries is invalid: {e}"))?;
    // Building a U-Net allocates its weights: refuse a config that asks for far more than
    // the file holds before doing so (a damaged or hostile config cannot allocate more than
    // a few times the file's size).
    let held: usize = tensors
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, t)| t.data.len())
        .sum();
    let least = config.unet.min_parameters();
    if least > held {
        bail!(
            "{what} does not match its config: the config describes a U-Net of at least {least} weights, the file holds {held}"
        );
    }
    let unet =
        UNet::new(&config.unet, device).with_context(|| format!("{what}: invalid model config"))?;
    let unet = weights::apply(unet, tensors, prefix)
        .map_err(|e| anyhow!("{what} does not match its config: {e}"))?;
    let scheduler = Scheduler::for_model(&config.schedule, config.prediction)?;
    let vae = match &config.latent {
        Some(l) => Some(crate::vae::build(
            l.vae.clone(),
            tensors,
            &format!("{prefix}{VAE_PREFIX}"),
            what,
            device,
        )?),
        None => None,
    };
    Ok(LoadedModel {
        config,
        scheduler,
        unet,
        source: what.to_string(),
        vae,
    })
}

/// The model file inside a run folder.
pub fn model_file_in(run: &Path) -> PathBuf {
    run.join("model.safetensors")
}
