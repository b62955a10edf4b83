//! The scheduler settings, with the keys and meanings of diffusers' `scheduler_config.json`,
//! and the one place where a sampler is built from them.
//!
//! A key that is absent takes the default of the diffusers scheduler class that reads it (as
//! `Scheduler.from_config` does): for instance `timestep_spacing` defaults to `leading` for
//! DDPM and DDIM but to `linspace` for Euler, Heun and DPM-Solver. Unknown keys are ignored,
//! as diffusers ignores them; a known key with a value outside its range is an error naming it.

use super::ddim::{DdimOptions, DdimSampler};
use super::ddpm::{DdpmOptions, DdpmSampler, VarianceType};
use super::dpm_solver::{DpmSolverOptions, DpmSolverSampler};
use super::euler::{EulerOptions, EulerSampler};
use super::flow::{FlowOptions, FlowSampler};
use super::heun::{HeunOptions, HeunSampler};
use super::{Sampler, X0Clamp};
use crate::schedule::{BetaSchedule, NoiseSchedule, Prediction, ScheduleConfig, TimestepSpacing};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The reverse-process method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Ancestral DDPM (Ho et al. 2020, Algorithm 2).
    Ddpm,
    /// DDIM (Song et al. 2021), deterministic at `eta = 0`.
    Ddim,
    /// DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2).
    #[value(name = "dpmpp-2m", aliases = ["dpm++2m", "dpmpp_2m", "dpm-solver++"])]
    DpmPp2m,
    /// Euler in sigma space (Karras et al. 2022, Algorithm 1 without the second-order step).
    Euler,
    /// Euler with fresh noise after each step (k-diffusion's `sample_euler_ancestral`).
    #[value(name = "euler-a", aliases = ["euler_a", "euler-ancestral"])]
    EulerAncestral,
    /// Heun in sigma space (Karras et al. 2022, Algorithm 1).
    Heun,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 6] = [
        Self::Ddpm,
        Self::Ddim,
        Self::DpmPp2m,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::DpmPp2m => "dpmpp-2m",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Heun => "heun",
        }
    }

    /// Sampling steps when none are asked for, as diffusers' pipelines run them: DDPM over
    /// all `t` steps, the others 50 (at most `t`).
    pub fn default_steps(self, t: usize) -> usize {
        match self {
            Self::Ddpm => t,
            _ => t.min(50),
        }
    }

    /// Model evaluations for `steps` steps (Heun evaluates twice per step but the last).
    pub fn evaluations(self, steps: usize) -> usize {
        match self {
            Self::Heun => 2 * steps - 1,
            _ => steps,
        }
    }
}

/// The names and aliases of [`clap::ValueEnum`], case-insensitive; the error lists the names.
impl std::str::FromStr for SamplerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            anyhow::anyhow!(
                "unknown sampler '{}' (expected {})",
                s.to_ascii_lowercase(),
                names.join(", ")
            )
        })
    }
}

/// `--sampler` on the command line: [`SamplerKind`]'s own parser, so a bad name gets its
/// message (the names are listed in the option's help).
pub fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// The settings of diffusers' `scheduler_config.json`. `None` means "absent": the default of
/// the scheduler class applies (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2` (or diffuse's `sigmoid`).
    pub beta_schedule: String,
    /// Explicit betas: not supported (an error names the key).
    pub trained_betas: Option<serde_json::Value>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    pub timestep_spacing: Option<String>,
    pub steps_offset: usize,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    /// `fixed_small` or `fixed_large` (DDPM).
    pub variance_type: Option<String>,
    /// Rescale betas to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules
    /// and Sample Steps are Flawed", Algorithm 1).
    pub rescale_betas_zero_snr: bool,
    pub use_karras_sigmas: bool,
    /// DPM-Solver: only 2 is supported here.
    pub solver_order: Option<usize>,
    /// DPM-Solver: only `dpmsolver++` is supported here.
    pub algorithm_type: Option<String>,
    pub lower_order_final: Option<bool>,
    /// Euler/DPM-Solver: only `zero` is supported here.
    pub final_sigmas_type: Option<String>,
    /// Flow-matching models: the time shift of the sampling times (diffusers'
    /// `FlowMatchEulerDiscreteScheduler.shift`; 1 keeps them evenly spaced).
    pub shift: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            variance_type: None,
            rescale_betas_zero_snr: false,
            use_karras_sigmas: false,
            solver_order: None,
            algorithm_type: None,
            lower_order_final: None,
            final_sigmas_type: None,
            shift: 1.0,
        }
    }
}

/// Per-call choices that override the config (the command line's `--steps`, `--eta`, ...).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerChoice {
    pub steps: usize,
    /// DDIM noise weight.
    pub eta: f64,
    pub spacing: Option<TimestepSpacing>,
    pub variance: Option<VarianceType>,
    pub karras: Option<bool>,
    /// DDPM and DDIM: clip `x0_hat` to the clip range (`None`: the config's `clip_sample`).
    pub clip_sample: Option<bool>,
}

impl SchedulerConfig {
    /// The settings a diffuse model implies: its schedule and objective, trailing spacing,
    /// `x0_hat` clipped to `[-1, 1]`.
    pub fn for_model(schedule: &ScheduleConfig, prediction: Prediction) -> Self {
        let name = match schedule.beta_schedule {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::Cosine => "squaredcos_cap_v2",
            BetaSchedule::Sigmoid => "sigmoid",
        };
        Self {
            num_train_timesteps: schedule.timesteps,
            beta_start: schedule.beta_start,
            beta_end: schedule.beta_end,
            beta_schedule: name.into(),
            prediction_type: match prediction {
                Prediction::Epsilon => "epsilon",
                Prediction::V => "v_prediction",
                Prediction::X0 => "sample",
                Prediction::Flow => "flow",
            }
            .into(),
            timestep_spacing: Some("trailing".into()),
            clip_sample: Some(true),
            ..Self::default()
        }
    }

    /// Parses the JSON of a `scheduler_config.json`; `what` names it in errors. Python's
    /// `NaN`/`Infinity` tokens (diffusers writes `lambda_min_clipped: -Infinity`) read as null.
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(&python_json(json))
            .with_context(|| format!("{what} is not a valid scheduler config"))?;
        cfg.validate().with_context(|| what.to_string())?;
        Ok(cfg)
    }

    /// Reads a `scheduler_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Checks every key this crate reads.
    pub fn validate(&self) -> Result<()> {
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("scheduler key trained_betas is not supported");
        }
        self.schedule_config()?;
        self.prediction()?;
        if self.steps_offset >= self.num_train_timesteps {
            bail!(
                "scheduler key steps_offset = {} must be below num_train_timesteps ({})",
                self.steps_offset,
                self.num_train_timesteps
            );
        }
        if self.rescale_betas_zero_snr && self.num_train_timesteps < 2 {
            bail!("scheduler key rescale_betas_zero_snr needs at least 2 timesteps");
        }
        if let Some(s) = &self.timestep_spacing {
            s.parse::<TimestepSpacing>()
                .with_context(|| "scheduler key timestep_spacing")?;
        }
        if let Some(v) = &self.variance_type {
            v.parse::<VarianceType>()
                .with_context(|| "scheduler key variance_type")?;
        }
        // Written so that NaN fails too.
        if self.clip_sample_range.is_nan() || self.clip_sample_range <= 0.0 {
            bail!(
                "scheduler key clip_sample_range must be positive (got {})",
                self.clip_sample_range
            );
        }
        if self.thresholding
            && !(self.dynamic_thresholding_ratio > 0.0 && self.dynamic_thresholding_ratio <= 1.0)
        {
            bail!("scheduler key dynamic_thresholding_ratio must be in (0, 1]");
        }
        if self.thresholding && (self.sample_max_value.is_nan() || self.sample_max_value < 1.0) {
            bail!("scheduler key sample_max_value must be at least 1");
        }
        if self.solver_order.is_some_and(|o| o != 2) {
            bail!(
                "scheduler key solver_order = {} is not supported (only 2)",
                self.solver_order.unwrap_or(0)
            );
        }
        if let Some(a) = self
            .algorithm_type
            .as_deref()
            .filter(|a| *a != "dpmsolver++")
        {
            bail!("scheduler key algorithm_type = '{a}' is not supported (only dpmsolver++)");
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            bail!(
                "scheduler key shift must be a positive number (got {})",
                self.shift
            );
        }
        if let Some(f) = self.final_sigmas_type.as_deref().filter(|f| *f != "zero") {
            bail!("scheduler key final_sigmas_type = '{f}' is not supported (only zero)");
        }
        Ok(())
    }

    /// The forward-process settings.
    pub fn schedule_config(&self) -> Result<ScheduleConfig> {
        let beta_schedule: BetaSchedule = self
            .beta_schedule
            .parse()
            .with_context(|| "scheduler key beta_schedule")?;
        Ok(ScheduleConfig {
            beta_schedule,
            timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
        })
    }

    /// The schedule as diffusers builds it: f32 betas, optionally rescaled to zero terminal SNR.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        let s = NoiseSchedule::new(&self.schedule_config()?)?.with_f32_betas();
        Ok(if self.rescale_betas_zero_snr {
            s.rescaled_zero_terminal_snr()
        } else {
            s
        })
    }

    pub fn prediction(&self) -> Result<Prediction> {
        self.prediction_type
            .parse()
            .with_context(|| "scheduler key prediction_type")
    }

    fn clamp(&self, clip_default: bool, choice: &SamplerChoice) -> X0Clamp {
        if self.thresholding {
            X0Clamp::Dynamic {
                ratio: self.dynamic_thresholding_ratio,
                max: self.sample_max_value,
            }
        } else if choice
            .clip_sample
            .or(self.clip_sample)
            .unwrap_or(clip_default)
        {
            X0Clamp::Clip(self.clip_sample_range)
        } else {
            X0Clamp::None
        }
    }

    /// Builds a sampler of the given kind over `schedule` (normally [`Self::noise_schedule`]).
    pub fn build(
        &self,
        kind: SamplerKind,
        schedule: &NoiseSchedule,
        choice: &SamplerChoice,
    ) -> Result<Box<dyn Sampler>> {
        self.validate()?;
        let prediction = self.prediction()?;
        if choice.clip_sample.is_some() && !matches!(kind, SamplerKind::Ddpm | SamplerKind::Ddim) {
            bail!(
                "--clip-sample is an option of the ddpm and ddim samplers; {} does not clip its x0 estimate",
                kind.name()
            );
        }
        if prediction.is_flow() {
            return self.build_flow(kind, schedule.len(), choice);
        }
        if choice.eta != 0.0 && kind != SamplerKind::Ddim {
            bail!(
                "--eta (fresh noise in each step) is an option of the ddim sampler (and of euler on a flow model); {} has no such setting",
                kind.name()
            );
        }
        let spacing = |class_default: TimestepSpacing| -> Result<TimestepSpacing> {
            Ok(match (choice.spacing, &self.timestep_spacing) {
                (Some(s), _) => s,
                (None, Some(s)) => s.parse()?,
                (None, None) => class_default,
            })
        };
        let karras = choice.karras.unwrap_or(self.use_karras_sigmas);
        let steps = choice.steps;
        let offset = self.steps_offset;
        Ok(match kind {
            SamplerKind::Ddpm => Box::new(DdpmSampler::new(
                schedule,
                prediction,
                DdpmOptions {
                    steps,
                    spacing: spacing(TimestepSpacing::Leading)?,
                    steps_offset: offset,
                    variance: match (choice.variance, &self.variance_type) {
                        (Some(v), _) => v,
                        (None, Some(v)) => v.parse()?,
                        (None, None) => VarianceType::FixedSmall,
                    },
                    clamp: self.clamp(true, choice),
                },
            )?),
            SamplerKind::Ddim => Box::new(DdimSampler::new(
                schedule,
                prediction,
                DdimOptions {
                    steps,
                    eta: choice.eta,
                    spacing: spacing(TimestepSpacing::Leading)?,
                    steps_offset: offset,
                    set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
                    clamp: self.clamp(true, choice),
                },
            )?),
            SamplerKind::DpmPp2m => Box::new(DpmSolverSampler::new(
                schedule,
                prediction,
                DpmSolverOptions {
                    steps,
                    spacing: spacing(TimestepSpacing::Linspace)?,
                    steps_offset: offset,
                    karras,
                    round_karras_timesteps: self.beta_schedule != "squaredcos_cap_v2",
                    lower_order_final: self.lower_order_final.unwrap_or(true),
                    clamp: if self.thresholding {
                        self.clamp(false, choice)
                    } else {
                        X0Clamp::None
                    },
                },
            )?),
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let ancestral = kind == SamplerKind::EulerAncestral;
                Box::new(EulerSampler::new(
                    schedule,
                    prediction,
                    EulerOptions {
                        steps,
                        spacing: spacing(TimestepSpacing::Linspace)?,
                        steps_offset: offset,
                        ancestral,
                        karras: karras && !ancestral,
                    },
                )?)
            }
            SamplerKind::Heun => Box::new(HeunSampler::new(
                schedule,
                prediction,
                HeunOptions {
                    steps,
                    spacing: spacing(TimestepSpacing::Linspace)?,
                    steps_offset: offset,
                    karras,
                    clamp: if self.clip_sample.unwrap_or(false) {
                        X0Clamp::Clip(self.clip_sample_range)
                    } else {
                        X0Clamp::None
                    },
                },
            )?),
        })
    }
}

impl SchedulerConfig {
    /// The sampler of a flow-matching model: Euler or Heun in flow time; the diffusion
    /// samplers and the options that only they read are refused, naming what to use.
    fn build_flow(
        &self,
        kind: SamplerKind,
        train_steps: usize,
        choice: &SamplerChoice,
    ) -> Result<Box<dyn Sampler>> {
        let heun = match kind {
            SamplerKind::Euler => false,
            SamplerKind::Heun => true,
            other => bail!(
                "--sampler {} samples the diffusion process, but this model was trained with --objective flow: use --sampler euler or heun",
                other.name()
            ),
        };
        if choice.karras == Some(true) {
            bail!(
                "--karras spaces diffusion noise levels; a flow model samples at evenly spaced times (leave out --karras)"
            );
        }
        if let Some(s) = choice.spacing {
            bail!(
                "--spacing {} picks diffusion timesteps; a flow model samples at evenly spaced times (leave out --spacing)",
                format!("{s:?}").to_lowercase()
            );
        }
        if choice.variance.is_some() {
            bail!("--variance is an option of the ddpm sampler, not of a flow model's samplers");
        }
        Ok(Box::new(FlowSampler::new(
            train_steps,
            FlowOptions {
                steps: choice.steps,
                heun,
                shift: self.shift,
                eta: choice.eta,
            },
        )?))
    }
}

/// A model's one schedule object: its sampler settings and the noise schedule they run over,
/// built together so that a sampler always runs over the schedule the model was trained on.
#[derive(Clone, Debug)]
pub struct Scheduler {
    pub settings: SchedulerConfig,
    pub schedule: NoiseSchedule,
}

impl Scheduler {
    /// A diffuse model's: its schedule in f64 ([`NoiseSchedule::new`]) and the settings it
    /// implies ([`SchedulerConfig::for_model`]).
    pub fn for_model(schedule: &ScheduleConfig, prediction: Prediction) -> Result<Self> {
        Ok(Self {
            settings: SchedulerConfig::for_model(schedule, prediction),
            schedule: NoiseSchedule::new(schedule)?,
        })
    }

    /// A diffusers pipeline's: the schedule as diffusers builds it from the settings
    /// ([`SchedulerConfig::noise_schedule`]).
    pub fn from_settings(settings: SchedulerConfig) -> Result<Self> {
        let schedule = settings.noise_schedule()?;
        Ok(Self { settings, schedule })
    }

    /// Training steps `T`.
    pub fn len(&self) -> usize {
        self.schedule.len()
    }

    /// True for an empty schedule (never, once built).
    pub fn is_empty(&self) -> bool {
        self.schedule.is_empty()
    }

    /// A sampler of `kind` over this schedule with these settings.
    /// Settings whose arithmetic breaks down (a sigma of zero or infinity where the sampler
    /// needs a finite one) are refused rather than run on NaN timesteps.
    pub fn sampler(&self, kind: SamplerKind, choice: &SamplerChoice) -> Result<Box<dyn Sampler>> {
        let s = self.settings.build(kind, &self.schedule, choice)?;
        let t = self.len() as f64;
        if let Some(bad) = s.timesteps().iter().find(|x| !(0.0..=t).contains(*x)) {
            bail!(
                "{} with these scheduler settings visits timestep {bad}, outside 0..{t} (a beta that rounds alpha_bar to exactly 1 or 0?)",
                kind.name()
            );
        }
        let n = s.timesteps().len();
        if let Some(i) = (0..=n).find(|&i| {
            let (a, sd) = s.state_scales(i);
            a.is_nan() || sd.is_nan()
        }) {
            bail!(
                "{} with these scheduler settings has no defined noise level at position {i} (alpha_bar reaches 0 or 1 exactly there; ddim and ddpm work on x_t and take such schedules)",
                kind.name()
            );
        }
        if !s.init_noise_sigma().is_finite() {
            bail!(
                "{} with these scheduler settings starts from an infinite noise level (zero terminal SNR needs a sampler that works on x_t, such as ddim or ddpm)",
                kind.name()
            );
        }
        Ok(s)
    }
}

/// Replaces Python's non-standard JSON number tokens (`NaN`, `Infinity`, `-Infinity`) outside
/// strings with `null`.
pub fn python_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            out.push_str("null");
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}
