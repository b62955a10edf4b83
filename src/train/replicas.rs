//! Data-parallel training: one replica of the model per device, each on its share of the
//! global batch, the replicas' gradients summed on the first device before the one optimiser
//! step there (burn's multi-device strategy, `MultiDeviceOptim::OptimMainDevice` of burn-train
//! 0.22: each replica forks the model to its device, its gradients are moved to the main
//! device by `GradientsParams::to_device` and summed by burn-optim's `GradientsAccumulator`).
//!
//! Why not burn's collective all-reduce (`DistributedOps`): in burn 0.22.1 only the CUDA and
//! remote backends implement it; Flex's and Vulkan's `all_reduce` are the trait's
//! `unimplemented!()` default, and the dispatch backend's `submit_gradient_sync` is
//! `unimplemented!()` too (burn-backend `distributed/ops.rs`, burn-dispatch
//! `ops/distributed.rs`). The gather used here runs on every backend burn has, so the CUDA
//! build needs no other code once it builds.
//!
//! The update is the one-device update of the whole batch: shard `i` of `b_i` images computes
//! its mean loss scaled by `b_i / B`, so the summed gradients are those of the mean over all
//! `B` images (group norm is per image; no statistic crosses images). A batch that does not
//! divide splits as evenly as it can (the first `B mod N` shards take one image more). Only
//! the order of the f32 sums differs from one device: `tests/all/replicas.rs` bounds the
//! difference. Replicas that share a device (the CPU) run one after the other, so the
//! device's random draws (dropout) come in a fixed order and a run repeats its bits; replicas
//! on distinct devices run at once, one thread each, each device seeded from the step.

use crate::rng::{Stream, rng_for};
use anyhow::{Result, anyhow};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use rand::RngCore;
use std::ops::Range;

/// The devices of a run, one replica each; the first holds the model and the optimiser.
#[derive(Clone, Debug)]
pub struct Replicas {
    devices: Vec<Device>,
    /// The devices' names in messages (`cpu:1`).
    names: Vec<String>,
}

impl Replicas {
    /// Replicas on `devices` (autodiff devices, with their names; at least one), as
    /// [`crate::device::parse_devices`] gives them.
    pub fn new(devices: Vec<(String, Device)>) -> Result<Self> {
        if devices.is_empty() {
            return Err(anyhow!("a run needs at least one device"));
        }
        let (names, devices) = devices.into_iter().unzip();
        Ok(Self { devices, names })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The device of the model and the optimiser.
    pub fn main(&self) -> &Device {
        &self.devices[0]
    }

    /// Refuses a global batch that leaves a replica without an image.
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        if batch < self.len() {
            return Err(anyhow!(
                "--devices: {} devices need a batch of at least {} (one image each); the run's batch is {batch}",
                self.len(),
                self.len()
            ));
        }
        Ok(())
    }

    /// The images of each replica in a batch of `b`: consecutive ranges, the first `b mod N`
    /// one image longer.
    pub fn shares(&self, b: usize) -> Vec<Range<usize>> {
        let n = self.len();
        let mut start = 0;
        (0..n)
            .map(|i| {
                let len = b / n + usize::from(i < b % n);
                let r = start..start + len;
                start += len;
                r
            })
            .collect()
    }

    /// The loss and the gradients (on the main device) of one step over all replicas:
    /// `loss_of(i, replica, device)` is replica `i`'s loss on its share, already scaled by
    /// its share of the batch; the returned loss is their sum. Errors name the failing device.
    pub fn gradients<M>(
        &self,
        model: &M,
        seed: u64,
        step: usize,
        loss_of: &(dyn Fn(usize, &M, &Device) -> Tensor<1> + Sync),
    ) -> Result<(f64, GradientsParams)>
    where
        M: Module + Clone + Send + Sync,
    {
        let main = self.main();
        let names = &self.names;
        let one = |i: usize, dev: &Device| -> Result<(f64, GradientsParams)> {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                fail_point(&names[i], step);
                let replica = model.clone().fork(dev);
                let loss = loss_of(i, &replica, dev);
                let mut grads = GradientsParams::from_grads(loss.backward(), &replica);
                if dev != main {
                    grads = grads.to_device(main, model);
                }
                (loss.into_scalar::<f32>() as f64, grads)
            }))
            .map_err(|p| {
                let msg = crate::panic_message(p.as_ref());
                anyhow!("device {} failed at step {}: {msg}", names[i], step + 1)
            })
        };
        let d = &self.devices;
        let shared = (0..d.len()).any(|i| d[i + 1..].contains(&d[i]));
        let parts: Vec<Result<(f64, GradientsParams)>> = if shared {
            self.devices
                .iter()
                .enumerate()
                .map(|(i, d)| one(i, d))
                .collect()
        } else {
            // Distinct devices: each draws its dropout from its own seed of this step.
            let mut rng = rng_for(seed, Stream::Replicas, step as u64);
            for d in &self.devices[1..] {
                d.seed(rng.next_u64());
            }
            std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .devices
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let one = &one;
                        s.spawn(move || one(i, d))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow!("a replica's thread died")))
                    })
                    .collect()
            })
        };
        let mut acc = GradientsAccumulator::<M>::new();
        let mut loss = 0.0;
        for p in parts {
            let (l, g) = p?;
            loss += l;
            acc.accumulate(model, g);
        }
        Ok((loss, acc.grads()))
    }
}

/// A test hook: `DIFFUSE_FAIL_REPLICA=NAME@STEP` makes replica `NAME` (`cpu:1`) panic at the
/// (1-based) step `STEP`, as a device failing mid-run would; read once.
fn fail_point(name: &str, step: usize) {
    static AT: std::sync::OnceLock<Option<(String, usize)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("DIFFUSE_FAIL_REPLICA").ok()?;
        let (n, s) = v.split_once('@')?;
        Some((n.to_string(), s.parse().ok()?))
    });
    if let Some((n, s)) = at
        && n == name
        && *s == step + 1
    {
        panic!("injected failure (DIFFUSE_FAIL_REPLICA)");
    }
}
