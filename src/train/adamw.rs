//! AdamW with global-norm gradient clipping, keeping its moments by parameter path so that
//! they go into checkpoints as named tensors (Loshchilov & Hutter 2019, Algorithm 2).

use crate::weights::{HostTensor, NamedTensors};
use anyhow::{Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use std::collections::HashMap;

/// AdamW hyperparameters and state.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates applied so far (for bias correction).
    pub t: u64,
    /// First and second moments by parameter path, flattened, on the host.
    moments: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

struct SumSquares<'a> {
    grads: &'a GradientsParams,
    acc: Option<Tensor<1>>,
}

impl ModuleVisitor for SumSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.acc = Some(match self.acc.take() {
                Some(a) => a + s,
                None => s,
            });
        }
    }
}

/// The global L2 norm of all gradients of `module`: `sqrt(sum_i ||g_i||^2)`.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut v = SumSquares { grads, acc: None };
    module.visit(&mut v);
    v.acc
        .map(|a| (a.into_scalar::<f32>() as f64).sqrt())
        .unwrap_or(0.0)
}

/// The factor that clips gradients of global norm `norm` to at most `max` (0: no clipping):
/// `min(1, max / norm)` (Pascanu et al. 2013, Algorithm 1).
pub fn clip_scale(norm: f64, max: f64) -> f64 {
    if max > 0.0 && norm > max {
        max / norm
    } else {
        1.0
    }
}

struct Step<'a> {
    opt: &'a mut AdamW,
    grads: &'a GradientsParams,
    lr: f64,
    grad_scale: f64,
    path: Vec<String>,
}

impl ModuleMapper for Step<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    /// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
    /// `p = p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`, in one pass over
    /// the parameter's values on the host (see [`update`]).
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.get::<D>(param.id) else {
            return param;
        };
        let (id, p, mapper) = param.consume();
        let (dims, device) = (p.dims(), p.device());
        let grad_required = p.is_require_grad();
        let mut values = host_values(p.inner().into_data());
        let g = host_values(g.into_data());
        let o = &mut *self.opt;
        let t = o.t as i32;
        let h = Hyper {
            b1: o.beta1 as f32,
            b2: o.beta2 as f32,
            c1: (1.0 - o.beta1) as f32,
            c2: (1.0 - o.beta2) as f32,
            bc2: (1.0 - o.beta2.powi(t)) as f32,
            eps: o.eps as f32,
            decay: (1.0 - self.lr * o.weight_decay) as f32,
            step: (self.lr / (1.0 - o.beta1.powi(t))) as f32,
            grad_scale: self.grad_scale as f32,
        };
        let n = values.len();
        let (m, v) = o
            .moments
            .entry(self.path.join("."))
            .or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
        update(&mut values, &g, m, v, &h);
        let mut out = Tensor::<D>::from_data(TensorData::new(values, dims.to_vec()), &device);
        if grad_required {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}

/// A tensor's values as f32 on the host.
fn host_values(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 parameters and gradients")
}

/// The constants of one AdamW update, in f32.
struct Hyper {
    b1: f32,
    b2: f32,
    /// `1 - b1`, `1 - b2`.
    c1: f32,
    c2: f32,
    /// `1 - b2^t`.
    bc2: f32,
    eps: f32,
    /// `1 - lr·wd`.
    decay: f32,
    /// `lr / (1 - b1^t)`.
    step: f32,
    grad_scale: f32,
}

/// One AdamW update of the parameter values `p` with gradient `g` (scaled by `grad_scale`)
/// and moments `m`, `v`, element by element in one pass (Loshchilov & Hutter 2019,
/// Algorithm 2, lines 6-12), on the cores in fixed chunks: the same bits whatever the
/// number of threads.
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    type Chunks<'a> = (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);
    let one = |(((p, g), m), v): Chunks| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = if h.grad_scale != 1.0 {
                g * h.grad_scale
            } else {
                g
            };
            *m = *m * h.b1 + g * h.c1;
            *v = *v * h.b2 + g * g * h.c2;
            let denom = (*v / h.bc2).sqrt() + h.eps;
            *p = *p * h.decay - *m / denom * h.step;
        }
    };
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(one);
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            moments: HashMap::new(),
        }
    }

    /// Applies one update with learning rate `lr`, first scaling every gradient by
    /// `grad_scale` (for clipping: `min(1, max_norm / norm)`).
    pub fn step<M: Module>(
        &mut self,
        module: M,
        grads: &GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.t += 1;
        let mut s = Step {
            opt: self,
            grads,
            lr,
            grad_scale,
            path: Vec::new(),
        };
        module.map(&mut s)
    }

    /// The moments as named tensors (`{prefix}m.{path}`, `{prefix}v.{path}`).
    pub fn export(&self, prefix: &str, out: &mut NamedTensors) {
        for (k, (m, v)) in &self.moments {
            for (tag, t) in [("m", m), ("v", v)] {
                out.insert(
                    format!("{prefix}{tag}.{k}"),
                    HostTensor {
                        shape: vec![t.len()],
                        data: t.clone(),
                    },
                );
            }
        }
    }

    /// Restores moments written by [`AdamW::export`] (kept on the host).
    pub fn import(&mut self, prefix: &str, t: u64, src: &NamedTensors) -> Result<()> {
        self.import_for(prefix, "model.", t, src)
    }

    /// [`AdamW::import`] for the parameters saved under `params` (`disc.` for a GAN's
    /// discriminator), whose sizes the moments are checked against.
    pub fn import_for(
        &mut self,
        prefix: &str,
        params: &str,
        t: u64,
        src: &NamedTensors,
    ) -> Result<()> {
        self.t = t;
        self.moments.clear();
        let mp = format!("{prefix}m.");
        for (name, m) in src.range(mp.clone()..) {
            let Some(key) = name.strip_prefix(&mp) else {
                break;
            };
            let Some(v) = src.get(&format!("{prefix}v.{key}")) else {
                bail!("optimizer state for '{key}' has no second moment");
            };
            let want = src.get(&format!("{params}{key}")).map(|p| p.data.len());
            if want != Some(m.data.len()) || v.data.len() != m.data.len() {
                bail!("optimizer state for '{key}' does not match the model's parameter");
            }
            self.moments
                .insert(key.to_string(), (m.data.clone(), v.data.clone()));
        }
        Ok(())
    }
}
