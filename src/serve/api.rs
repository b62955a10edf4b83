//! The JSON API's shapes: the generate request, its checks against the model and the
//! server's limits, and the error body every 4xx/5xx carries (`{"error": "..."}`).

use super::jobs::JobSpec;
use crate::model::{Family, ModelConfig};
use crate::pipeline::{CondFlags, FlagNames, Resolved, SamplerDefaults, shown};
use crate::sampler::SamplerKind;
use serde::{Deserialize, Serialize};

/// `POST /v1/generate` body. Unknown fields are refused, so a misspelt option is an error
/// rather than silently ignored.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The prompt for a text-conditioned model; for a class-conditioned model, a class name
    /// (as `class`).
    pub prompt: Option<String>,
    /// Class index or name.
    pub class: Option<ClassSpec>,
    /// Number of images (default 1).
    pub n: Option<u64>,
    /// Sampling steps (default: 50, or all T for ddpm).
    pub steps: Option<u64>,
    /// ddpm, ddim, dpmpp-2m, euler, euler-a or heun (default euler-a: at 50 steps the closest
    /// to 1000-step DDPM on the embedded model, docs/steps-quality.md).
    pub sampler: Option<String>,
    /// Classifier-free guidance weight (default 2, a distilled student's own; 1 = none).
    pub guidance: Option<f64>,
    /// Guidance only at noise levels sigma in `[lo, hi]`, `0 <= lo < hi` (default: at
    /// every step).
    pub guidance_interval: Option<[f64; 2]>,
    /// Seed of every random draw (default: drawn by the server and returned).
    pub seed: Option<u64>,
    /// DDIM noise weight, 0 to 1 (default 0).
    pub eta: Option<f64>,
    /// Autoregressive models: the sampling temperature, 0.01 to 10 (default 1).
    pub temperature: Option<f64>,
}

/// A class given as its index or its name.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassSpec {
    Index(u64),
    Name(String),
}

/// By hand rather than `#[serde(untagged)]`, whose error for `-1` or `2.5` ("did not match
/// any variant") names neither the field nor what it takes.
impl<'de> Deserialize<'de> for ClassSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ClassSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a class index (0, 1, ...) or a class name")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ClassSpec, E> {
                Ok(ClassSpec::Index(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ClassSpec, E> {
                u64::try_from(v).map(ClassSpec::Index).map_err(|_| {
                    E::custom(format!(
                        "class {v} is negative: give a class index (0, 1, ...) or a class name"
                    ))
                })
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ClassSpec, E> {
                Err(E::custom(format!(
                    "class {v} is not a whole number: give a class index (0, 1, ...) or a class name"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClassSpec, E> {
                Ok(ClassSpec::Name(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Per-request limits (`diffuse serve --max-n ...`).
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    pub max_n: usize,
    pub max_steps: usize,
    pub max_body_bytes: usize,
    pub timeout_s: u64,
}

pub use crate::pipeline::MAX_GUIDANCE;
/// The longest prompt or class name accepted, in bytes.
pub const MAX_PROMPT_BYTES: usize = 1000;

/// Checks a request against the model and the limits; the error is a message for the client.
pub fn validate(
    req: &GenerateRequest,
    model: &ModelConfig,
    schedule_len: usize,
    limits: &Limits,
    default_seed: u64,
) -> Result<JobSpec, String> {
    refuse_temperature(req, Family::Diffusion)?;
    let n = check_n(req, limits)?;
    let sampler: SamplerKind = match &req.sampler {
        None => SamplerDefaults::SERVE.for_model(model).sampler,
        Some(s) => s.parse().map_err(|e| format!("sampler: {e}"))?,
    };
    let defaults = SamplerDefaults::SERVE.for_model(model);
    // A distilled student samples in at most the steps it was trained for.
    let max_steps = limits
        .max_steps
        .min(schedule_len)
        .min(model.sampling.as_ref().map_or(usize::MAX, |s| s.max_steps));
    let steps = match (req.steps, defaults.steps) {
        (Some(s), _) => s,
        // A student's own steps whatever the sampler; otherwise a named sampler's default.
        (None, Some(d)) if req.sampler.is_none() || model.sampling.is_some() => {
            d.min(max_steps) as u64
        }
        (None, _) => sampler.default_steps(max_steps) as u64,
    };
    if steps == 0 || steps > max_steps as u64 {
        return Err(format!(
            "steps must be between 1 and {max_steps} (got {steps})"
        ));
    }
    let guidance = req
        .guidance
        .unwrap_or(crate::pipeline::Request::default_guidance(model) as f64);
    if !(guidance.is_finite() && (0.0..=MAX_GUIDANCE).contains(&guidance)) {
        return Err(format!(
            "guidance must be between 0 and {MAX_GUIDANCE} (got {})",
            shown(guidance)
        ));
    }
    if let Some([lo, hi]) = req.guidance_interval {
        crate::sampler::check_guidance_interval(lo, hi).map_err(|e| e.to_string())?;
    }
    let eta = req.eta.unwrap_or(0.0);
    if !(eta.is_finite() && (0.0..=1.0).contains(&eta)) {
        return Err(format!("eta must be between 0 and 1 (got {})", shown(eta)));
    }
    let (classes, prompt) = conditioning(req, model.cond(), n)?;
    Ok(JobSpec {
        n,
        classes,
        prompt,
        diffusion: true,
        steps: steps as usize,
        sampler,
        eta,
        guidance: guidance as f32,
        guidance_interval: req.guidance_interval.map(|[lo, hi]| (lo, hi)),
        temperature: None,
        seed: req.seed.unwrap_or(default_seed),
    })
}

/// A temperature is refused for a model of a family other than autoregressive.
fn refuse_temperature(req: &GenerateRequest, family: Family) -> Result<(), String> {
    if req.temperature.is_some() && family != Family::Autoregressive {
        return Err(format!(
            "temperature is an option of autoregressive models; the served model is {}",
            family.article_name()
        ));
    }
    Ok(())
}

/// The class or prompt of a request for `n` images, read against the model's conditioning.
fn conditioning(
    req: &GenerateRequest,
    cond: crate::model::CondSpec,
    n: usize,
) -> Result<(Option<Vec<usize>>, String), String> {
    if let Some(p) = req.prompt.as_ref().filter(|p| p.len() > MAX_PROMPT_BYTES) {
        return Err(format!(
            "prompt is {} bytes; the limit is {MAX_PROMPT_BYTES}",
            p.len()
        ));
    }
    if let Some(ClassSpec::Name(c)) = &req.class
        && c.len() > MAX_PROMPT_BYTES
    {
        return Err(format!(
            "class is {} bytes; the limit is {MAX_PROMPT_BYTES}",
            c.len()
        ));
    }
    let class = req.class.as_ref().map(|c| match c {
        ClassSpec::Index(i) => i.to_string(),
        ClassSpec::Name(s) => s.clone(),
    });
    let prompt = req.prompt.as_deref().map(str::trim);
    let flags = CondFlags {
        class: class.as_deref(),
        prompt,
        negative: None,
    };
    Ok(
        match flags
            .resolve(cond, FlagNames::JSON)
            .map_err(|e| e.to_string())?
        {
            Resolved::Class(c) => (Some(vec![c; n]), String::new()),
            Resolved::Prompt { prompt, .. } => (None, prompt),
            Resolved::Nothing => (None, String::new()),
        },
    )
}

/// What the server serves, as its request checks and `/v1/models` see it.
#[derive(Clone, Debug)]
// One per server: the size of the diffusion variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Served {
    /// A diffusion model, with its sampler options.
    Diffusion(ModelConfig),
    /// A model of another family: classes or nothing, no sampler options.
    Other {
        family: Family,
        num_classes: Option<usize>,
        class_names: Vec<String>,
        output_shape: [usize; 3],
    },
}

impl Served {
    pub fn of(g: &crate::pipeline::Generator) -> Self {
        match g.as_diffusion() {
            Some(p) => Self::Diffusion(p.model.config.clone()),
            None => {
                let c = g.cond();
                Self::Other {
                    family: g.family(),
                    num_classes: c.num_classes,
                    class_names: c.class_names.to_vec(),
                    output_shape: g.output_shape(),
                }
            }
        }
    }

    pub fn cond(&self) -> crate::model::CondSpec<'_> {
        match self {
            Self::Diffusion(m) => m.cond(),
            Self::Other {
                num_classes,
                class_names,
                ..
            } => crate::model::CondSpec {
                num_classes: *num_classes,
                text: false,
                class_names,
            },
        }
    }
}

/// [`validate`] for whatever is served: a model of another family takes `n`, `class`,
/// `prompt` (a class name) and `seed`, and refuses the sampler options by name.
pub fn validate_served(
    req: &GenerateRequest,
    served: &Served,
    schedule_len: usize,
    limits: &Limits,
    default_seed: u64,
) -> Result<JobSpec, String> {
    let family = match served {
        Served::Diffusion(m) => return validate(req, m, schedule_len, limits, default_seed),
        Served::Other { family, .. } => *family,
    };
    let given: Vec<&str> = [
        ("steps", req.steps.is_some()),
        ("sampler", req.sampler.is_some()),
        ("guidance", req.guidance.is_some()),
        ("guidance_interval", req.guidance_interval.is_some()),
        ("eta", req.eta.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, g)| g.then_some(k))
    .collect();
    if !given.is_empty() {
        return Err(format!(
            "{} {} of diffusion models; the served model is {}",
            given.join(", "),
            if given.len() == 1 {
                "is an option"
            } else {
                "are options"
            },
            family.article_name()
        ));
    }
    refuse_temperature(req, family)?;
    let range = crate::pipeline::TEMPERATURES;
    let temperature = match req.temperature {
        Some(t) if !(t.is_finite() && range.contains(&(t as f32))) => {
            return Err(format!(
                "temperature must be between {} and {} (got {})",
                range.start(),
                range.end(),
                shown(t)
            ));
        }
        t => t.map(|t| t as f32),
    };
    let n = check_n(req, limits)?;
    let (classes, prompt) = conditioning(req, served.cond(), n)?;
    Ok(JobSpec {
        n,
        classes,
        prompt,
        diffusion: false,
        steps: 1,
        sampler: SamplerKind::Ddpm,
        eta: 0.0,
        guidance: 1.0,
        guidance_interval: None,
        // Echoed in the answer: an autoregressive model's temperature, 1 when not given.
        temperature: (family == Family::Autoregressive).then(|| temperature.unwrap_or(1.0)),
        seed: req.seed.unwrap_or(default_seed),
    })
}

/// `n` (default 1) within the server's limit.
fn check_n(req: &GenerateRequest, limits: &Limits) -> Result<usize, String> {
    let n = req.n.unwrap_or(1);
    if n == 0 || n > limits.max_n as u64 {
        return Err(format!(
            "n must be between 1 and {} (got {n})",
            limits.max_n
        ));
    }
    Ok(n as usize)
}

/// `GET /v1/models`: what the served model generates and takes.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub id: String,
    /// `diffusion`, or the family of another model (which takes no sampler options).
    pub family: &'static str,
    pub image_size: usize,
    pub channels: usize,
    /// `class`, `text`, or `none` for an unconditioned model.
    pub conditioning: &'static str,
    pub classes: Vec<String>,
    /// The samplers a diffusion model takes (none for another family).
    pub samplers: Vec<&'static str>,
    /// A diffusion model's training steps T (0 for another family).
    pub timesteps: usize,
    pub limits: Limits,
}

impl ModelInfo {
    pub fn new(id: &str, served: &Served, timesteps: usize, limits: Limits) -> Self {
        let cond = served.cond();
        let classes = match cond.num_classes {
            Some(k) if cond.class_names.len() == k => cond.class_names.to_vec(),
            Some(k) => (0..k).map(|i| i.to_string()).collect(),
            None => Vec::new(),
        };
        let conditioning = if cond.num_classes.is_some() {
            "class"
        } else if cond.text {
            "text"
        } else {
            "none"
        };
        let (family, image_size, channels, samplers, timesteps) = match served {
            Served::Diffusion(cfg) => (
                Family::Diffusion,
                cfg.output_shape()[1],
                cfg.unet.in_channels,
                SamplerKind::ALL.iter().map(|k| k.name()).collect(),
                timesteps,
            ),
            Served::Other {
                family,
                output_shape,
                ..
            } => (*family, output_shape[1], output_shape[0], Vec::new(), 0),
        };
        Self {
            id: id.to_string(),
            family: family.name(),
            image_size,
            channels,
            conditioning,
            classes,
            samplers,
            timesteps,
            limits,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/generate` answer as JSON (several images, or when JSON is asked for).
#[derive(Debug, Serialize)]
pub struct GenerateResponse {
    /// Base64 PNGs, one per image.
    pub images: Vec<String>,
    pub seed: u64,
    /// Diffusion models: the sampling steps and the sampler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampler: Option<&'static str>,
    /// Autoregressive models: the sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    pub classes: Option<Vec<usize>>,
    /// Text models: the prompt used.
    pub prompt: Option<String>,
    /// Text models: true when the prompt was longer than the encoder's 256 tokens and was
    /// cut there.
    pub prompt_truncated: bool,
    pub seconds: f64,
}
