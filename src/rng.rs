//! Seeded host-side randomness. Every random draw of training and sampling (noise, timesteps,
//! label dropout, flips, data order) comes from a ChaCha stream derived from `(seed, purpose,
//! index)`, so a run is reproducible bit for bit and can be resumed at any step without
//! saving generator state: the state is the step number.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Purposes of random streams, so that two uses of one seed never share draws.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// Model weight initialisation.
    Init = 1,
    /// Training step randomness (timesteps, noise, label dropout, flips, dropout seed).
    TrainStep = 2,
    /// Data order of one epoch.
    Epoch = 3,
    /// Sampling noise.
    Sample = 4,
    /// Preview sample grids during training.
    Preview = 5,
    /// The dropout seeds of data-parallel replicas on distinct devices.
    Replicas = 6,
}

/// A generator for `(seed, stream, index)`.
pub fn rng_for(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(((stream as u64) << 56) ^ index);
    r
}

/// `n` standard normal draws as `f32`.
pub fn normal_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Draws `n` standard normals and drops them: the generator ends where [`normal_vec`] of `n`
/// leaves it.
pub fn skip_normals(rng: &mut impl Rng, n: usize) {
    for _ in 0..n {
        std::hint::black_box(rng.sample::<f32, _>(StandardNormal));
    }
}

/// A tensor of standard normal draws with the given shape.
pub fn normal_tensor(rng: &mut impl Rng, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(normal_vec(rng, n), shape), device)
}
