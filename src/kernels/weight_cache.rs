//! Forward-convolution weights kept prepared across calls ([`PreparedWeight`]: Winograd's
//! transformed weights, or the weights packed in bf16), for models that do not change between
//! calls: sampling, serving, evaluation. Without it every call of every layer redoes the
//! preparation; sampling one image from the embedded model in f32 spent 15% of its time in
//! F(4×4, 3×3)'s weight transform (perf, 2-core AMD EPYC, 20 DPM-Solver++ steps).
//!
//! An entry is found by the address and length of the weights' storage, with the mode and the
//! convolution's shape. It holds a reference to that storage, so while the entry lives the
//! storage can be neither freed (and its address reused) nor written in place (burn-flex copies
//! shared storage before it writes): the same address and length mean the same values, without
//! comparing them. Only untracked tensors come here; training's weights change every step and
//! go through autodiff, so training holds no more memory than before.
//!
//! Bounds: entries whose storage nobody else holds any more are dropped before each insertion;
//! what the entries hold (the prepared weights, counted with the weights themselves) stays
//! under `DIFFUSE_WEIGHT_CACHE_MB` megabytes (256 by default; 0 turns the cache off); an entry
//! unused for [`STALE`] lookups gives way to a new one, and otherwise a new one is not kept (so
//! a model larger than the cap keeps its first layers cached rather than evicting each layer
//! before its next use).

use super::MatmulMode;
use super::conv2d::{self, ConvGeometry, PreparedWeight, Purpose, Winograd};
use burn_flex::FlexTensor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Lookups after which an unused entry may be evicted: far more convolutions than one forward
/// pass of any model here has, so a model in use keeps its entries.
pub const STALE: u64 = 4096;

/// What an entry is found by: the storage's address and length in floats, the mode, the
/// weights' shape `[C_out, C_in, kh, kw]` with the stride, and the Winograd algorithm (which
/// decide the preparation; in bf16 the algorithm depends on the batch and the image size too,
/// so one set of weights may have an entry for each).
type Key = (usize, usize, MatmulMode, [usize; 6], Option<Winograd>);

struct Entry {
    /// Keeps the storage alive and unwritten while the entry lives.
    weights: FlexTensor,
    prepared: Arc<PreparedWeight>,
    bytes: usize,
    last_use: u64,
}

/// Prepared weights by their storage, within a capacity (see the module comment). The kernels
/// use one for the whole process ([`global`]); tests make their own.
pub struct WeightCache {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    clock: u64,
}

impl State {
    fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.bytes).sum()
    }
}

impl WeightCache {
    /// An empty cache that holds at most `capacity` bytes (prepared weights, and the weights
    /// themselves once nothing else holds them).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The weights `w` (contiguous f32 values, untracked) of the forward convolution `g`
    /// prepared for `mode`: from the cache when it holds them, else prepared now and kept if
    /// there is room.
    pub fn get(&self, mode: MatmulMode, w: &FlexTensor, g: &ConvGeometry) -> Arc<PreparedWeight> {
        let values: &[f32] = w.storage();
        let prepare = || Arc::new(PreparedWeight::new(mode, Purpose::Inference, values, g));
        if self.capacity == 0 || !PreparedWeight::needed(mode, Purpose::Inference, g) {
            return prepare();
        }
        let key = (
            values.as_ptr() as usize,
            values.len(),
            mode,
            PreparedWeight::key(g),
            conv2d::winograd_of(mode, g, Purpose::Inference),
        );
        {
            let mut s = self.state();
            s.clock += 1;
            let now = s.clock;
            if let Some(e) = s.entries.get_mut(&key) {
                e.last_use = now;
                return e.prepared.clone();
            }
        }
        // Prepared outside the lock, so that other threads' lookups do not wait on it.
        let prepared = prepare();
        let bytes = prepared.bytes() + 4 * values.len();
        let mut s = self.state();
        let s = &mut *s;
        let now = s.clock;
        s.entries.retain(|_, e| !e.weights.is_unique());
        while s.bytes() + bytes > self.capacity {
            let stale = s
                .entries
                .iter()
                .filter(|(_, e)| now.saturating_sub(e.last_use) > STALE)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k);
            match stale {
                Some(k) => s.entries.remove(&k),
                None => break,
            };
        }
        if s.bytes() + bytes <= self.capacity {
            let entry = Entry {
                weights: w.clone(),
                prepared: prepared.clone(),
                bytes,
                last_use: now,
            };
            s.entries.insert(key, entry);
        }
        prepared
    }

    /// The number of entries and the bytes they hold.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.state();
        (s.entries.len(), s.bytes())
    }
}

/// The process's cache, of `DIFFUSE_WEIGHT_CACHE_MB` megabytes (256 by default).
pub fn global() -> &'static WeightCache {
    static CACHE: OnceLock<WeightCache> = OnceLock::new();
    CACHE.get_or_init(|| {
        let mb = match std::env::var("DIFFUSE_WEIGHT_CACHE_MB") {
            Err(_) => 256,
            Ok(v) => v.trim().parse::<usize>().unwrap_or_else(|_| {
                eprintln!(
                    "warning: DIFFUSE_WEIGHT_CACHE_MB={v:?} is not a whole number of megabytes; using 256"
                );
                256
            }),
        };
        WeightCache::new(mb.saturating_mul(1 << 20))
    })
}
