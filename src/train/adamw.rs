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
    /// First and second moments by parameter path, flattened.
    moments: HashMap<String, (Tensor<1>, Tensor<1>)>,
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
    /// `p = p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.get::<D>(param.id) else {
            return param;
        };
        let (id, p, mapper) = param.consume();
        let dims = p.dims();
        let n: usize = dims.iter().product();
        let grad_required = p.is_require_grad();
        let p1: Tensor<1> = p.inner().reshape([n]);
        let g: Tensor<1> = g.reshape([n]);
        let g = if self.grad_scale != 1.0 {
            g * (self.grad_scale as f32)
        } else {
            g
        };
        let o = &mut *self.opt;
        let key = self.path.join(".");
        let (m, v) = match o.moments.remove(&key) {
            Some((m, v)) => (
                m * (o.beta1 as f32) + g.clone() * ((1.0 - o.beta1) as f32),
                v * (o.beta2 as f32) + g.square() * ((1.0 - o.beta2) as f32),
            ),
            None => (
                g.clone() * ((1.0 - o.beta1) as f32),
                g.square() * ((1.0 - o.beta2) as f32),
            ),
        };
        let t = o.t as i32;
        let bc1 = 1.0 - o.beta1.powi(t);
        let bc2 = 1.0 - o.beta2.powi(t);
        let step_size = (self.lr / bc1) as f32;
        let denom = (v.clone() / (bc2 as f32)).sqrt() + (o.eps as f32);
        let decayed = p1 * ((1.0 - self.lr * o.weight_decay) as f32);
        let updated = decayed - m.clone() / denom * step_size;
        o.moments.insert(key, (m, v));
        let mut out = Tensor::<D>::from_inner(updated.reshape(dims));
        if grad_required {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
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
                let data = t
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32 moments");
                out.insert(
                    format!("{prefix}{tag}.{k}"),
                    HostTensor {
                        shape: vec![data.len()],
                        data,
                    },
                );
            }
        }
    }

    /// Restores moments written by [`AdamW::export`] onto `device`.
    pub fn import(
        &mut self,
        prefix: &str,
        t: u64,
        src: &NamedTensors,
        device: &burn::tensor::Device,
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
            let want = src.get(&format!("model.{key}")).map(|p| p.data.len());
            if want != Some(m.data.len()) || v.data.len() != m.data.len() {
                bail!("optimizer state for '{key}' does not match the model's parameter");
            }
            let mk = |h: &HostTensor| {
                Tensor::<1>::from_data(TensorData::new(h.data.clone(), [h.data.len()]), device)
            };
            self.moments.insert(key.to_string(), (mk(m), mk(v)));
        }
        Ok(())
    }
}
