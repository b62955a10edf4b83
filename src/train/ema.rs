//! Exponential moving average of the weights, the model used for sampling by default
//! (DDPM, appendix B; Karras et al. 2024 discuss its length).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use std::collections::VecDeque;

/// The EMA decay after `updates` steps: `min(max_decay, (1 + n) / (10 + n))`, a warm-up that
/// lets the average follow the fast early changes of a fresh model (as in Tensorflow's
/// `ExponentialMovingAverage` with `num_updates`).
pub fn decay_at(max_decay: f64, updates: u64) -> f64 {
    let n = updates as f64;
    max_decay.min((1.0 + n) / (10.0 + n))
}

struct Gather {
    /// Current parameter values (without autodiff), flattened, in visiting order.
    values: VecDeque<Tensor<1>>,
}

impl ModuleVisitor for Gather {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().inner();
        let n: usize = t.dims().iter().product();
        self.values.push_back(t.reshape([n]));
    }
}

struct Blend {
    values: VecDeque<Tensor<1>>,
    decay: f32,
}

impl ModuleMapper for Blend {
    /// `ema = decay * ema + (1 - decay) * param`.
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let cur = self
            .values
            .pop_front()
            .expect("EMA and model have the same parameters");
        let d = self.decay;
        param.map(|e| {
            let dims = e.dims();
            e * d + cur.reshape(dims) * (1.0 - d)
        })
    }
}

/// Moves the EMA model `ema` (no autodiff) towards the training model `model` with `decay`.
pub fn update<M: Module>(ema: M, model: &M, decay: f64) -> M {
    let mut g = Gather {
        values: VecDeque::new(),
    };
    model.visit(&mut g);
    let mut b = Blend {
        values: g.values,
        decay: decay as f32,
    };
    ema.map(&mut b)
}
