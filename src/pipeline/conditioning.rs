//! How a user's class and prompt options are read, the same for the command line and the
//! HTTP API: a text model takes a prompt (and a negative prompt); a class-conditioned model
//! takes a class index or name, or a class name given as the prompt; an unconditioned model
//! takes neither. An empty prompt means "unconditional" everywhere.

use crate::model::CondSpec;
use anyhow::{Result, bail};

/// The names of the options in messages (`--class` on the command line, `class` in JSON).
#[derive(Clone, Copy, Debug)]
pub struct FlagNames {
    pub class: &'static str,
    pub prompt: &'static str,
    pub negative: &'static str,
}

impl FlagNames {
    pub const CLI: FlagNames = FlagNames {
        class: "--class",
        prompt: "--prompt",
        negative: "--negative-prompt",
    };
    pub const JSON: FlagNames = FlagNames {
        class: "class",
        prompt: "prompt",
        negative: "negative_prompt",
    };
}

/// The options as given.
#[derive(Clone, Copy, Debug, Default)]
pub struct CondFlags<'a> {
    pub class: Option<&'a str>,
    pub prompt: Option<&'a str>,
    pub negative: Option<&'a str>,
}

/// What the options ask of the model.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolved {
    /// No class or prompt (the caller picks its default: unconditional, or every class).
    Nothing,
    Class(usize),
    /// A text model's prompt (as given; empty is unconditional) and negative prompt.
    Prompt {
        prompt: String,
        negative: Option<String>,
    },
}

impl CondFlags<'_> {
    /// Reads the options against the model; errors name the options by `names`.
    pub fn resolve(&self, cfg: CondSpec, names: FlagNames) -> Result<Resolved> {
        let text_model = cfg.text;
        let FlagNames {
            class: cf,
            prompt: pf,
            negative: nf,
        } = names;
        if text_model && self.class.is_some() {
            bail!("{cf} was given, but this model is text-conditioned: use {pf}");
        }
        if self.negative.is_some() && !text_model {
            bail!("{nf} is for text-conditioned models");
        }
        if self.class.is_some() && self.prompt.is_some() {
            bail!("give either {cf} or {pf}, not both");
        }
        if text_model {
            return Ok(Resolved::Prompt {
                prompt: self.prompt.unwrap_or_default().to_string(),
                negative: self.negative.map(str::to_string),
            });
        }
        match (self.class, self.prompt) {
            (Some(c), _) => Ok(Resolved::Class(cfg.class_index(c, cf)?)),
            (None, Some(p)) if p.trim().is_empty() => Ok(Resolved::Nothing),
            (None, Some(p)) if cfg.num_classes.is_some() => {
                Ok(Resolved::Class(cfg.class_index(p.trim(), pf)?))
            }
            (None, Some(_)) => bail!("{pf} was given, but this model is unconditioned"),
            (None, None) => Ok(Resolved::Nothing),
        }
    }
}
