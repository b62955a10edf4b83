//! Fuzz and property tests of every reader of untrusted input, on stable Rust: safetensors
//! files and the model config inside them, TorchScript pickles, IDX files (plain and gzipped),
//! `captions.jsonl`, `scheduler_config.json`, image folders, and the server's request bodies.
//!
//! How it works:
//!
//! - **Inputs.** Each target starts from seed inputs: the files in `tests/fixtures/fuzz/<target>/`
//!   (written by `tests/fixtures/fuzz/make_seeds.py`) and a few built here with the library
//!   (tiny model files, JPEG and WebP images). Input `i` of a target is seed `i` unchanged for
//!   the first few, then a seed put through 1 to 8 random mutations ([`Mutator`]): bit flips,
//!   bytes and words set to interesting values, inserts, deletes, duplicated and removed
//!   chunks, truncation, splices of two seeds, and for text and JSON token-aware changes
//!   (numbers to `1e308`, `-1`, `18446744073709551615`, ...; strings to very long strings;
//!   values to `[[[[...` nested thousands deep). Safetensors headers and the model config in
//!   them are also mutated as parsed JSON. The random stream of input `i` is seeded from
//!   `(FUZZ_SEED, target, i)` alone, so any input can be rebuilt from those three numbers.
//! - **Oracle.** A reader may return `Ok` or `Err`; it must not panic, hang, or allocate
//!   absurd amounts of memory. Some targets also check a property of an `Ok` result (the
//!   IDX data has the size its dimensions say, an accepted request is within the limits).
//! - **Panics** are caught per input with `catch_unwind`; a panic hook installed once keeps
//!   the fuzz threads quiet (other threads get the previous hook) and records the message and
//!   location. Any panic fails the test, which lists the first few with their saved inputs.
//! - **Hangs.** Inputs run on a worker thread; the test's thread watches when the current
//!   input started and fails the test when one runs past `FUZZ_TIME_LIMIT_S` (default 10 s),
//!   leaving the stuck worker behind (it ends with the process).
//! - **Memory.** The test binary's global allocator ([`Guarded`]) checks, on a fuzz worker
//!   thread while an input runs, every allocation: one above `FUZZ_MAX_ALLOC_MB` (default
//!   256), or one that brings the input's net allocations above `FUZZ_MAX_LIVE_MB` (default
//!   2048), is refused with a line on stderr naming its size, the target and the input (saved
//!   to a file). A refused allocation normally aborts the process: a loud failure, the
//!   point. Elsewhere the allocator costs one thread-local read per call. (Allocations a
//!   reader makes on other threads, e.g. a rayon pool, are not checked.)
//!
//! A failing input is written to `std::env::temp_dir()`, named by target, seed and index, and
//! its path printed. To rerun one input: `FUZZ_SEED=S FUZZ_INDEX=I cargo test --release --test
//! all fuzz::TARGET -- --nocapture`; to run a saved file: `FUZZ_REPLAY=path` (with the same
//! target filter); a run of one `FUZZ_INDEX` also saves its input and prints its path. Other
//! knobs: `FUZZ_ITERS_SCALE` (a float, default 1: the number of inputs per target, sized so
//! that the whole module stays well under a minute on two cores in a release build; about 20 s
//! when written), `FUZZ_VERBOSE=1` (one line per input). `scripts/fuzz.sh` runs a longer
//! campaign with a random seed.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The guarded allocator.
// ---------------------------------------------------------------------------------------------

/// `System` with a check of every allocation made on a thread that is running a fuzz input
/// (see the module docs). The test binary has no other global allocator.
struct Guarded;

#[global_allocator]
static GUARDED: Guarded = Guarded;

/// The largest single allocation allowed while fuzzing, in bytes.
static MAX_ALLOC: AtomicUsize = AtomicUsize::new(256 << 20);
/// The most bytes one input may hold at once (allocated minus freed, on its thread).
static MAX_LIVE: AtomicUsize = AtomicUsize::new(2048 << 20);

thread_local! {
    /// On while this thread runs a fuzz input.
    static GUARD: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated minus bytes freed on this thread since the input started.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The largest single allocation of this thread while guarded.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Allocations refused on this thread (normally the process aborts at the first).
    static REFUSED: Cell<usize> = const { Cell::new(0) };
    /// The input this thread is running, for the refusal report.
    static CURRENT: RefCell<Option<Arc<Mutex<Current>>>> = const { RefCell::new(None) };
    /// On for the fuzz worker threads: the panic hook records instead of printing.
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
    /// What the panic hook recorded of the last panic on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn guarded() -> bool {
    GUARD.try_with(Cell::get).unwrap_or(false)
}

/// Accounts for a new block of `size` bytes replacing one of `freed` bytes; false when the
/// allocation is refused (after reporting it).
fn admit(size: usize, freed: usize) -> bool {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let delta = size as isize - freed as isize;
    let live = LIVE
        .try_with(|l| {
            let v = l.get().saturating_add(delta);
            l.set(v);
            v
        })
        .unwrap_or(0);
    let over_one = size > MAX_ALLOC.load(Relaxed);
    let over_live = live > MAX_LIVE.load(Relaxed) as isize;
    if over_one || over_live {
        let _ = LIVE.try_with(|l| l.set(l.get() - delta));
        refuse(size, live, over_one);
        return false;
    }
    true
}

fn release(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - size as isize));
}

/// Reports a refused allocation on stderr (directly, past the test harness's capture, since an
/// abort follows) and saves the input. The guard is turned off first, so this may allocate.
#[cold]
fn refuse(size: usize, live: isize, single: bool) {
    let _ = GUARD.try_with(|g| g.set(false));
    let _ = REFUSED.try_with(|r| r.set(r.get() + 1));
    let current = CURRENT
        .try_with(|c| c.try_borrow().ok().and_then(|c| c.clone()))
        .ok()
        .flatten();
    let what = match current.as_ref().and_then(|c| c.try_lock().ok()) {
        Some(c) => {
            let saved = save_input(c.target, c.seed, c.index, &c.bytes);
            format!(
                "target {} input {} (FUZZ_SEED={}), saved to {}",
                c.target, c.index, c.seed, saved
            )
        }
        None => "an unknown input".to_string(),
    };
    let why = if single {
        format!(
            "a single allocation of {size} bytes ({:.1} MiB) is above FUZZ_MAX_ALLOC_MB={}",
            mib(size),
            MAX_ALLOC.load(Relaxed) >> 20
        )
    } else {
        format!(
            "an allocation of {size} bytes brings the input's live memory to {:.1} MiB, above FUZZ_MAX_LIVE_MB={}",
            mib(live.max(0) as usize),
            MAX_LIVE.load(Relaxed) >> 20
        )
    };
    let line = format!(
        "\nfuzz: REFUSED ALLOCATION: {why}; in {what}. The allocation fails (the process \
         normally aborts now).\n"
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

// SAFETY: every call is passed on to `System` unchanged, or fails with a null pointer, which
// `GlobalAlloc` allows.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if guarded() && !admit(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if guarded() && !admit(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if guarded() {
            release(layout.size());
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if guarded() && !admit(new_size, layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

// ---------------------------------------------------------------------------------------------
// Settings.
// ---------------------------------------------------------------------------------------------

/// The default seed, so that a plain `cargo test` is deterministic.
const DEFAULT_SEED: u64 = 0x5eed_d1ff;

/// The harness's settings, from the environment.
#[derive(Clone, Debug)]
struct Settings {
    seed: u64,
    scale: f64,
    time_limit: Duration,
    /// Run only this input index of each target.
    only_index: Option<u64>,
    /// Run only this saved input.
    replay: Option<PathBuf>,
    verbose: bool,
}

fn env_parse<T: std::str::FromStr>(key: &str) -> Option<T> {
    let v = std::env::var(key).ok()?;
    match v.trim().parse() {
        Ok(x) => Some(x),
        Err(_) => panic!("{key}={v} is not a valid value"),
    }
}

impl Settings {
    fn from_env() -> Self {
        let max_alloc_mb: usize = env_parse("FUZZ_MAX_ALLOC_MB").unwrap_or(256);
        let max_live_mb: usize = env_parse("FUZZ_MAX_LIVE_MB").unwrap_or(2048);
        MAX_ALLOC.store(max_alloc_mb << 20, Relaxed);
        MAX_LIVE.store(max_live_mb << 20, Relaxed);
        let scale: f64 = env_parse("FUZZ_ITERS_SCALE").unwrap_or(1.0);
        assert!(scale >= 0.0, "FUZZ_ITERS_SCALE must not be negative");
        let limit: f64 = env_parse("FUZZ_TIME_LIMIT_S").unwrap_or(10.0);
        assert!(limit > 0.0, "FUZZ_TIME_LIMIT_S must be positive");
        Self {
            seed: env_parse("FUZZ_SEED").unwrap_or(DEFAULT_SEED),
            scale,
            time_limit: Duration::from_secs_f64(limit),
            only_index: env_parse("FUZZ_INDEX"),
            replay: std::env::var_os("FUZZ_REPLAY").map(PathBuf::from),
            verbose: std::env::var("FUZZ_VERBOSE").is_ok_and(|v| v != "0"),
        }
    }
}

/// Where a failing input of `target` is saved.
fn input_path(target: &str, seed: u64, index: u64) -> PathBuf {
    std::env::temp_dir().join(format!("diffuse-fuzz-{target}-seed{seed}-input{index}.bin"))
}

/// Saves an input; returns its path as text (or why it could not be saved).
fn save_input(target: &str, seed: u64, index: u64, bytes: &[u8]) -> String {
    let p = input_path(target, seed, index);
    match std::fs::write(&p, bytes) {
        Ok(()) => p.display().to_string(),
        Err(e) => format!("(not saved: {e})"),
    }
}

// ---------------------------------------------------------------------------------------------
// The mutation engine.
// ---------------------------------------------------------------------------------------------

/// Inputs larger than this after a mutation are cut back to it.
const MAX_INPUT: usize = 8 << 20;

/// Numbers that break parsers and size computations, as JSON text.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "8",
    "16",
    "17",
    "32",
    "64",
    "65",
    "100",
    "255",
    "256",
    "1000",
    "1001",
    "1024",
    "1025",
    "2048",
    "4096",
    "65535",
    "65536",
    "100000",
    "100001",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e308",
    "-1e308",
    "1e309",
    "1e-300",
    "5e-324",
    "-1e-300",
    "0.5",
    "0.999999",
    "1.0000001",
    "1e5",
    "1e20",
    "-2147483649",
    "NaN",
    "Infinity",
    "-Infinity",
    "0.0",
    "-0.0",
    "1.5",
    "00",
    "01",
    "1e",
    "-",
    "1.",
    ".5",
    "0x10",
];

/// JSON values of other types, to put where a value was.
const VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "\"\"",
    "[1,2,3]",
    "{\"a\":1}",
    "\"x\"",
    "[null]",
    "[[]]",
    "{\"file\":\"a.png\",\"text\":\"t\"}",
    "[16,16,16,16,16,16,16,16]",
    "[1024]",
];

/// Pieces of JSON syntax, to insert between tokens.
const FRAGMENTS: &[&str] = &[
    ",",
    ":",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\\",
    "\n",
    ",\"extra\":1",
    "\u{0}",
    "//",
    "NaN",
    "\"n\":",
    " ",
    "\r\n",
    "\u{feff}",
    "/*",
    "\"\\u0000\"",
];

/// What very long strings are made of.
const STRING_UNITS: &[&str] = &[
    "a",
    "\u{e9}",
    "\\u0000",
    "\\\"",
    "../",
    "\\ud800",
    " ",
    "\\n",
    "\u{1f600}",
    "/",
];

/// Interesting single bytes.
const BYTES: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'\n', b'"', b'-', b'.', b'(', b'q'];

/// A JSON-ish token of a text input.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tok {
    Str,
    Num,
    Word,
    Punct,
}

/// The tokens of a text input as `(start, end, kind)`; lenient (any bytes are accepted).
fn tokens(d: &[u8]) -> Vec<(usize, usize, Tok)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < d.len() {
        let c = d[i];
        let start = i;
        let kind = if c == b'"' {
            i += 1;
            while i < d.len() && d[i] != b'"' {
                i += if d[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(d.len());
            Tok::Str
        } else if c.is_ascii_digit() || (c == b'-' && d.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            i += 1;
            while i < d.len() && matches!(d[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                i += 1;
            }
            Tok::Num
        } else if c.is_ascii_alphabetic() {
            while i < d.len() && d[i].is_ascii_alphanumeric() {
                i += 1;
            }
            Tok::Word
        } else if b"{}[],:".contains(&c) {
            i += 1;
            Tok::Punct
        } else {
            i += 1;
            continue;
        };
        out.push((start, i, kind));
    }
    out
}

/// A seeded stream of mutations over a target's seed inputs.
struct Mutator<'a> {
    rng: ChaCha8Rng,
    seeds: &'a [Vec<u8>],
}

/// The random stream of input `index` of `target`: a function of the three alone.
fn input_rng(seed: u64, target: &str, index: u64) -> ChaCha8Rng {
    // FNV-1a of the name, mixed with the seed and the index (splitmix64's finaliser).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ seed.rotate_left(29) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

impl<'a> Mutator<'a> {
    fn new(seed: u64, target: &str, index: u64, seeds: &'a [Vec<u8>]) -> Self {
        Self {
            rng: input_rng(seed, target, index),
            seeds,
        }
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        items.choose(&mut self.rng).expect("a non-empty list")
    }

    fn seed(&mut self) -> Vec<u8> {
        if self.seeds.is_empty() {
            return Vec::new();
        }
        self.pick(self.seeds).clone()
    }

    /// A position in `0..=len`.
    fn pos(&mut self, len: usize) -> usize {
        self.rng.gen_range(0..=len)
    }

    /// A length, mostly short.
    fn span(&mut self, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let cap = *self.pick(&[4usize, 16, 64, 1024]);
        self.rng.gen_range(1..=max.min(cap))
    }

    /// How many mutations to stack: 1, 2, 4 or 8.
    fn stack(&mut self) -> usize {
        1 << self.rng.gen_range(0..4)
    }

    /// The mutations of one input, `text` the probability of a token-aware one.
    fn havoc(&mut self, d: &mut Vec<u8>, text: f64) {
        for _ in 0..self.stack() {
            if self.rng.gen_bool(text) {
                self.text_op(d);
            } else {
                self.byte_op(d);
            }
            d.truncate(MAX_INPUT);
        }
    }

    /// One byte-level mutation.
    fn byte_op(&mut self, d: &mut Vec<u8>) {
        let n = d.len();
        match self.rng.gen_range(0..13) {
            0 if n > 0 => {
                let i = self.rng.gen_range(0..n);
                d[i] ^= 1 << self.rng.gen_range(0..8);
            }
            1 if n > 0 => {
                let i = self.rng.gen_range(0..n);
                d[i] = if self.rng.gen_bool(0.3) {
                    b'0' + self.rng.gen_range(0..10)
                } else {
                    *self.pick(BYTES)
                };
            }
            2 if n > 0 => {
                // A 2-, 4- or 8-byte integer, either endianness, set to an interesting value.
                let w = *self.pick(&[2usize, 4, 8]);
                let i = self.rng.gen_range(0..n);
                let v: u64 = *self.pick(&[
                    0,
                    1,
                    0x7f,
                    0x80,
                    0xff,
                    0x7fff,
                    0x8000,
                    0xffff,
                    0x7fff_ffff,
                    0x8000_0000,
                    0xffff_ffff,
                    1 << 32,
                    (1 << 62) + 1,
                    u64::MAX,
                    n as u64,
                    n as u64 + 1,
                    (n as u64).saturating_sub(9),
                ]);
                let bytes = if self.rng.gen_bool(0.5) {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let src = if self.rng.gen_bool(0.5) {
                    &bytes[..w]
                } else {
                    &bytes[8 - w..]
                };
                for (k, b) in src.iter().enumerate() {
                    if let Some(x) = d.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            3 if n > 0 => {
                let i = self.rng.gen_range(0..n);
                d[i] = d[i].wrapping_add(self.rng.gen_range(1..=35) * *self.pick(&[1u8, 255]));
            }
            4 => {
                let at = self.pos(n);
                let k = self.span(16);
                let bytes: Vec<u8> = (0..k).map(|_| self.rng.r#gen()).collect();
                d.splice(at..at, bytes);
            }
            5 => {
                let at = self.pos(n);
                let k = *self.pick(&[1usize, 7, 64, 4096]);
                let b = *self.pick(BYTES);
                d.splice(at..at, std::iter::repeat_n(b, k));
            }
            6 if n > 0 => {
                let at = self.rng.gen_range(0..n);
                let k = self.span(n - at);
                d.drain(at..at + k);
            }
            7 if n > 0 => {
                let at = self.rng.gen_range(0..n);
                let k = self.span(n - at);
                let chunk = d[at..at + k].to_vec();
                let to = self.pos(n);
                d.splice(to..to, chunk);
            }
            8 if n > 1 => {
                let at = self.rng.gen_range(0..n);
                let k = self.rng.gen_range(1..=(n - at).min(n / 2).max(1));
                d.drain(at..at + k);
            }
            9 if n > 0 => {
                let at = self.rng.gen_range(0..n);
                d.truncate(at);
            }
            10 => {
                // Splice: this input's head with another seed's tail.
                let other = self.seed();
                let a = self.pos(n);
                let b = self.pos(other.len());
                d.truncate(a);
                d.extend_from_slice(&other[b..]);
            }
            11 if n > 0 => {
                // Overwrite a chunk with the same bytes of another seed.
                let other = self.seed();
                let at = self.rng.gen_range(0..n);
                let k = self.span(n - at);
                for (i, slot) in d.iter_mut().enumerate().skip(at).take(k) {
                    if let Some(b) = other.get(i) {
                        *slot = *b;
                    }
                }
            }
            _ => {
                // Swap two single bytes (or grow an empty input).
                if n > 1 {
                    let (a, b) = (self.rng.gen_range(0..n), self.rng.gen_range(0..n));
                    d.swap(a, b);
                } else {
                    d.push(*self.pick(BYTES));
                }
            }
        }
    }

    /// A very long JSON string (with its quotes).
    fn long_string(&mut self) -> String {
        let unit = *self.pick(STRING_UNITS);
        // A megabyte now and then: long enough to find quadratic work, rare enough to be cheap.
        let k = if self.rng.gen_bool(0.03) {
            1 << 20
        } else {
            *self.pick(&[100usize, 1000, 1001, 4096, 65536])
        };
        let mut s = String::with_capacity(k * unit.len() + 2);
        s.push('"');
        for _ in 0..k {
            s.push_str(unit);
        }
        s.push('"');
        s
    }

    /// `[[[[...]]]]` (or `{"a":{"a":...}}`) nested deep, sometimes unclosed.
    fn deep(&mut self) -> String {
        let depth = *self.pick(&[16usize, 63, 64, 65, 127, 128, 129, 1000, 5000, 50000]);
        let (open, close) = *self.pick(&[("[", "]"), ("{\"a\":", "}")]);
        let closed = self.rng.gen_bool(0.7);
        let mut s = open.repeat(depth);
        s.push_str(if open == "[" { "1" } else { "null" });
        if closed {
            s.push_str(&close.repeat(depth));
        }
        s
    }

    /// One token-aware mutation of a text input (a byte mutation when it has no tokens).
    fn text_op(&mut self, d: &mut Vec<u8>) {
        let toks = tokens(d);
        let of = |k: Tok| -> Vec<(usize, usize)> {
            toks.iter()
                .filter(|t| t.2 == k)
                .map(|t| (t.0, t.1))
                .collect()
        };
        let values: Vec<(usize, usize)> = toks
            .iter()
            .filter(|t| t.2 != Tok::Punct)
            .map(|t| (t.0, t.1))
            .collect();
        let replace = |d: &mut Vec<u8>, (a, b): (usize, usize), with: &[u8]| {
            d.splice(a..b, with.iter().copied());
        };
        match self.rng.gen_range(0..8) {
            0 | 1 => {
                let nums = of(Tok::Num);
                if nums.is_empty() {
                    return self.byte_op(d);
                }
                let at = *self.pick(&nums);
                let with = *self.pick(NUMBERS);
                replace(d, at, with.as_bytes());
            }
            2 => {
                let strs = of(Tok::Str);
                if strs.is_empty() {
                    return self.byte_op(d);
                }
                let at = *self.pick(&strs);
                let with = match self.rng.gen_range(0..4) {
                    0 => "\"\"".to_string(),
                    1 => format!(
                        "\"{}\"",
                        self.pick(&[
                            "../a.png",
                            "/",
                            ".",
                            "a.png\\u0000",
                            "sub",
                            "\\ud800",
                            "\u{0}"
                        ])
                    ),
                    _ => self.long_string(),
                };
                replace(d, at, with.as_bytes());
            }
            3 => {
                if values.is_empty() {
                    return self.byte_op(d);
                }
                let at = *self.pick(&values);
                let with = if self.rng.gen_bool(0.4) {
                    self.deep()
                } else {
                    self.pick(VALUES).to_string()
                };
                replace(d, at, with.as_bytes());
            }
            4 => {
                // Duplicate, delete or swap lines (JSON Lines, pretty-printed JSON).
                let text = String::from_utf8_lossy(d).into_owned();
                let mut lines: Vec<&str> = text.split('\n').collect();
                let n = lines.len();
                let i = self.rng.gen_range(0..n);
                match self.rng.gen_range(0..3) {
                    0 => {
                        let l = lines[i];
                        let k = *self.pick(&[1usize, 2, 100]);
                        for _ in 0..k {
                            lines.insert(i, l);
                        }
                    }
                    1 if n > 1 => {
                        lines.remove(i);
                    }
                    _ => {
                        let j = self.rng.gen_range(0..n);
                        lines.swap(i, j);
                    }
                }
                *d = lines.join("\n").into_bytes();
            }
            5 => {
                let at = if toks.is_empty() {
                    self.pos(d.len())
                } else {
                    let t = *self.pick(&toks);
                    if self.rng.gen_bool(0.5) { t.0 } else { t.1 }
                };
                let with = *self.pick(FRAGMENTS);
                d.splice(at..at, with.bytes());
            }
            6 => {
                if toks.is_empty() {
                    return self.byte_op(d);
                }
                let t = *self.pick(&toks);
                d.drain(t.0..t.1);
            }
            _ => {
                // Duplicate a run of tokens (a key and its value, an array element...).
                if toks.is_empty() {
                    return self.byte_op(d);
                }
                let i = self.rng.gen_range(0..toks.len());
                let j = (i + self.rng.gen_range(1..=4)).min(toks.len());
                let (a, b) = (toks[i].0, toks[j - 1].1);
                let chunk = d[a..b].to_vec();
                d.splice(b..b, chunk);
            }
        }
    }

    /// An interesting JSON value to put in a config (numbers mostly).
    fn json_value(&mut self) -> Value {
        match self.rng.gen_range(0..10) {
            0..=6 => {
                let n = *self.pick(NUMBERS);
                serde_json::from_str(n).unwrap_or(Value::String(n.into()))
            }
            7 => serde_json::from_str(self.pick::<&str>(VALUES)).expect("valid JSON"),
            8 => Value::String(
                self.pick(&["", "x", "linear", "epsilon", "a/b", "\u{0}"])
                    .to_string(),
            ),
            _ => {
                let s = self.long_string();
                serde_json::from_str(&s).unwrap_or(Value::String(s))
            }
        }
    }

    /// Mutates one node of a parsed JSON document.
    fn json_op(&mut self, v: &mut Value) {
        let mut paths = Vec::new();
        json_paths(v, String::new(), &mut paths);
        let Some(path) = paths.choose(&mut self.rng).cloned() else {
            return;
        };
        let node = v.pointer_mut(&path).expect("a path of the document");
        match self.rng.gen_range(0..6) {
            0..=2 => *node = self.json_value(),
            3 => {
                // Remove it from its parent.
                let (parent, key) = path.rsplit_once('/').expect("a non-root path");
                match v.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>() {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
            }
            4 => match node {
                Value::Array(a) => {
                    let x = self.json_value();
                    let k = *self.pick(&[1usize, 8, 100]);
                    a.extend(std::iter::repeat_n(x, k));
                }
                Value::Object(m) => {
                    let x = self.json_value();
                    m.insert(
                        self.pick(&["extra", "", "image_size", "vae"]).to_string(),
                        x,
                    );
                }
                other => *other = Value::Array(vec![other.clone()]),
            },
            _ => {
                let s = serde_json::to_string(node).expect("serialisable");
                let mut b = s.into_bytes();
                self.text_op(&mut b);
                *node = serde_json::from_slice(&b).unwrap_or(Value::Null);
            }
        }
    }
}

/// JSON pointers to every node of `v` but the root.
fn json_paths(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                json_paths(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                json_paths(x, p, out);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Structure-aware mutations: safetensors and images.
// ---------------------------------------------------------------------------------------------

/// A safetensors buffer split into its parsed header and its data.
fn split_safetensors(d: &[u8]) -> Option<(serde_json::Map<String, Value>, Vec<u8>)> {
    let n = u64::from_le_bytes(d.get(..8)?.try_into().ok()?) as usize;
    let header = d.get(8..8usize.checked_add(n)?)?;
    match serde_json::from_slice(header).ok()? {
        Value::Object(m) => Some((m, d[8 + n..].to_vec())),
        _ => None,
    }
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

impl Mutator<'_> {
    /// One mutation of a safetensors file; `config` mutates the diffuse model config in its
    /// metadata more often.
    fn safetensors_op(&mut self, d: &mut Vec<u8>, config: bool) {
        let Some((mut header, mut data)) = split_safetensors(d) else {
            return self.byte_op(d);
        };
        let roll = self.rng.gen_range(0..10);
        if roll >= 8 {
            return self.byte_op(d);
        }
        if roll == 7 {
            // Data cut or grown, the header kept.
            let h = serde_json::to_vec(&header).expect("serialisable");
            if self.rng.gen_bool(0.5) && !data.is_empty() {
                let at = self.rng.gen_range(0..data.len());
                data.truncate(at);
            } else {
                data.extend(std::iter::repeat_n(0u8, self.span(1024)));
            }
            *d = join_safetensors(&h, &data);
            return;
        }
        if roll == 6 {
            // Token-aware mutations of the header text, the length fixed up (usually).
            let mut h = serde_json::to_vec(&header).expect("serialisable");
            self.text_op(&mut h);
            *d = join_safetensors(&h, &data);
            if self.rng.gen_bool(0.2) {
                let lie = (h.len() as u64).wrapping_add(*self.pick(&[1u64, u64::MAX, 8, 1 << 40]));
                d[..8].copy_from_slice(&lie.to_le_bytes());
            }
            return;
        }
        let has_config = header
            .get("__metadata__")
            .and_then(|m| m.get("diffuse.config"))
            .is_some_and(Value::is_string);
        if has_config && ((config && roll < 4) || roll == 0) {
            self.config_op(&mut header);
        } else {
            self.tensor_entry_op(&mut header);
        }
        let mut h = serde_json::to_vec(&header).expect("serialisable");
        if self.rng.gen_bool(0.3) {
            // The format pads headers with spaces to 8 bytes.
            let pad = self.span(16);
            h.extend(std::iter::repeat_n(b' ', pad));
        }
        *d = join_safetensors(&h, &data);
    }

    /// Mutates the model config (a JSON string in the metadata) as parsed JSON, or as text.
    fn config_op(&mut self, header: &mut serde_json::Map<String, Value>) {
        let meta = header.get_mut("__metadata__").expect("checked");
        let text = meta["diffuse.config"]
            .as_str()
            .expect("checked")
            .to_string();
        let new = match serde_json::from_str::<Value>(&text) {
            Ok(mut cfg) if self.rng.gen_bool(0.85) => {
                if self.rng.gen_bool(0.3) {
                    self.big_model(&mut cfg);
                } else {
                    for _ in 0..self.rng.gen_range(1..=3) {
                        self.json_op(&mut cfg);
                    }
                }
                serde_json::to_string(&cfg).expect("serialisable")
            }
            _ => {
                let mut b = text.into_bytes();
                self.text_op(&mut b);
                String::from_utf8_lossy(&b).into_owned()
            }
        };
        meta["diffuse.config"] = Value::String(new);
    }

    /// Pushes the U-Net config toward sizes its validation accepts but no small file can
    /// hold: wide channels, many levels and blocks, large images.
    fn big_model(&mut self, cfg: &mut Value) {
        let Some(unet) = cfg.get_mut("unet").and_then(Value::as_object_mut) else {
            return;
        };
        match self.rng.gen_range(0..5) {
            0 => {
                unet.insert(
                    "base_channels".into(),
                    (*self.pick(&[64u64, 256, 512, 1024])).into(),
                );
            }
            1 => {
                let mult: Vec<u64> = match self.rng.gen_range(0..3) {
                    0 => vec![16],
                    1 => vec![1, 16],
                    _ => vec![4; 8],
                };
                unet.insert("channel_mult".into(), mult.into());
                unet.insert("attention_resolutions".into(), Value::Array(Vec::new()));
            }
            2 => {
                unet.insert("num_res_blocks".into(), (*self.pick(&[4u64, 16])).into());
            }
            3 => {
                unet.insert(
                    "image_size".into(),
                    (*self.pick(&[64u64, 256, 1024])).into(),
                );
            }
            _ => {
                unet.insert("base_channels".into(), 1024.into());
                unet.insert("channel_mult".into(), vec![16u64].into());
                unet.insert("attention_resolutions".into(), Value::Array(Vec::new()));
            }
        }
    }

    /// Mutates one tensor entry of a safetensors header (or the metadata map).
    fn tensor_entry_op(&mut self, header: &mut serde_json::Map<String, Value>) {
        let names: Vec<String> = header.keys().cloned().collect();
        if names.is_empty() {
            header.insert(
                "t".into(),
                serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
            );
            return;
        }
        let name = self.pick(&names).clone();
        let huge = [0u64, 1, 2, 3, 1 << 31, 1 << 32, 1 << 40, 1 << 62, u64::MAX];
        let entry = header.get_mut(&name).expect("a key");
        match self.rng.gen_range(0..8) {
            0 => {
                let dtype = *self.pick(&[
                    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32",
                    "U64", "BOOL", "F8_E4M3", "F8_E5M2", "f32", "", "F4",
                ]);
                match entry.as_object_mut() {
                    Some(o) => {
                        o.insert("dtype".into(), dtype.into());
                    }
                    None => *entry = dtype.into(),
                }
            }
            1 | 2 => {
                if let Some(shape) = entry.get_mut("shape").and_then(Value::as_array_mut) {
                    match self.rng.gen_range(0..4) {
                        0 if !shape.is_empty() => {
                            let i = self.rng.gen_range(0..shape.len());
                            shape[i] = (*self.pick(&huge)).into();
                        }
                        1 => shape.push((*self.pick(&huge)).into()),
                        2 => {
                            shape.pop();
                        }
                        _ => *shape = vec![1u64.into(); *self.pick(&[0usize, 9, 1000])],
                    }
                } else {
                    *entry = self.json_value();
                }
            }
            3 | 4 => {
                if let Some(off) = entry.get_mut("data_offsets").and_then(Value::as_array_mut) {
                    match self.rng.gen_range(0..4) {
                        0 if !off.is_empty() => {
                            let i = self.rng.gen_range(0..off.len());
                            off[i] = (*self.pick(&huge)).into();
                        }
                        1 => off.reverse(),
                        2 => off.push(0.into()),
                        _ => *off = vec![0.into(), 0.into()],
                    }
                } else {
                    *entry = self.json_value();
                }
            }
            5 => {
                header.remove(&name);
            }
            6 => {
                // A copy under another name.
                let copy = entry.clone();
                let new = self
                    .pick(&["", "vae.x", "__metadata__", "unet.conv_in.weight", "a\u{0}"])
                    .to_string();
                header.insert(format!("{new}{}", self.rng.gen_range(0..3)), copy);
            }
            _ => self.json_op(entry),
        }
    }

    /// One mutation of an image file: header fields such as the dimensions set to large
    /// values with the checksums fixed (so that decoders get past them), or byte mutations.
    fn image_op(&mut self, d: &mut Vec<u8>) {
        let png = d.starts_with(b"\x89PNG\r\n\x1a\n");
        let bmp = d.starts_with(b"BM") && d.len() >= 26;
        let dims = [
            0u32,
            1,
            0x7fff,
            0xffff,
            10_000,
            30_000,
            1 << 20,
            0x7fff_ffff,
            u32::MAX,
        ];
        if png && d.len() >= 24 && self.rng.gen_bool(0.3) {
            // IHDR's width (16..20) or height (20..24), big-endian.
            let at = *self.pick(&[16usize, 20]);
            d[at..at + 4].copy_from_slice(&self.pick(&dims).to_be_bytes());
        } else if bmp && self.rng.gen_bool(0.3) {
            // BITMAPINFOHEADER's width (18..22) or height (22..26), little-endian, signed.
            let at = *self.pick(&[18usize, 22]);
            let v = *self.pick(&dims) as i32 * *self.pick(&[1i32, -1]);
            d[at..at + 4].copy_from_slice(&v.to_le_bytes());
        } else {
            self.byte_op(d);
        }
        if png && self.rng.gen_bool(0.7) {
            fix_png_crcs(d);
        }
    }

    /// One opcode of the pickle machine, with well-formed operands.
    fn pickle_opcode(&mut self) -> Vec<u8> {
        let mut op = vec![*self.pick(&[
            b'(', b')', b't', 0x85, 0x86, 0x87, b'}', b']', b'u', b's', b'a', b'e', b'N', 0x88,
            0x89, b'Q', b'R', 0x81, b'b', b'.', b'J', b'K', b'M', 0x8a, b'G', b'X', 0x8c, b'q',
            b'r', b'h', b'j', b'c', 0x80,
        ])];
        let small = self.rng.gen_range(0..4u8);
        match op[0] {
            b'K' | b'q' | b'h' | 0x80 => op.push(small),
            b'M' => op.extend_from_slice(&(small as u16).to_le_bytes()),
            b'J' | b'r' | b'j' => {
                let v = *self.pick(&[0u32, 1, 2, u32::MAX, 0x8000_0000]);
                op.extend_from_slice(&v.to_le_bytes());
            }
            0x8a => {
                let n = *self.pick(&[0u8, 1, 8, 9, 255]);
                op.push(n);
                op.extend(std::iter::repeat_n(0xff, n as usize));
            }
            b'G' => op.extend_from_slice(
                &self
                    .pick(&[f64::NAN, f64::INFINITY, -0.0, 1e308])
                    .to_be_bytes(),
            ),
            b'X' | 0x8c => {
                let texts: [&[u8]; 5] = [b"storage", b"0", b"", b"weight", b"\xff\xfe"];
                let text: &[u8] = self.pick::<&[u8]>(&texts);
                if op[0] == b'X' {
                    op.extend_from_slice(&(text.len() as u32).to_le_bytes());
                } else {
                    op.push(text.len() as u8);
                }
                op.extend_from_slice(text);
            }
            b'c' => {
                let globals: [&[u8]; 5] = [
                    b"torch._utils\n_rebuild_tensor_v2\n",
                    b"torch\nFloatStorage\n",
                    b"torch.jit._pickle\nbuild_intlist\n",
                    b"collections\nOrderedDict\n",
                    b"\n\n",
                ];
                op.extend_from_slice(self.pick::<&[u8]>(&globals))
            }
            _ => {}
        }
        op
    }

    /// One mutation of a pickle: opcodes inserted, a run of them repeated, or bytes changed.
    fn pickle_op(&mut self, d: &mut Vec<u8>) {
        match self.rng.gen_range(0..4) {
            0 | 1 => {
                let at = self.pos(d.len());
                let ops: Vec<u8> = (0..self.rng.gen_range(1..=4))
                    .flat_map(|_| self.pickle_opcode())
                    .collect();
                d.splice(at..at, ops);
            }
            2 => {
                // Repeat a short run many times (memo gets and appends grow structures fast).
                let n = d.len();
                if n == 0 {
                    return;
                }
                let at = self.rng.gen_range(0..n);
                let k = self.span((n - at).min(12));
                let run = d[at..at + k].to_vec();
                let times = *self.pick(&[2usize, 16, 100, 1000]);
                d.splice(at..at, run.iter().copied().cycle().take(k * times));
            }
            _ => self.byte_op(d),
        }
    }
}

/// Recomputes the CRC of every complete PNG chunk.
fn fix_png_crcs(d: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= d.len() {
        let len = u32::from_be_bytes(d[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e + 4 <= d.len()) else {
            return;
        };
        let mut crc = flate2::Crc::new();
        crc.update(&d[at + 4..end]);
        d[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
        at = end + 4;
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// The input a worker is running, shared with the watching thread and the allocator.
struct Current {
    target: &'static str,
    seed: u64,
    index: u64,
    bytes: Vec<u8>,
}

/// A panic caught on one input.
struct PanicRecord {
    index: u64,
    message: String,
    saved: String,
}

/// What a worker found over all inputs of a target.
#[derive(Default)]
struct Tally {
    inputs: u64,
    panics: u64,
    /// The first few panics, and the first of each other location.
    records: Vec<PanicRecord>,
    errors: u64,
    largest: usize,
    slowest: Duration,
    /// Inputs that finished, but after the time limit (a hang the watcher did not catch in
    /// time), with their saved paths.
    slow: Vec<(u64, Duration, String)>,
    refused: usize,
}

/// The worker's start time (milliseconds since the harness started) when no input runs.
const IDLE: u64 = u64::MAX;

/// Installs, once, a panic hook that records panics of the fuzz workers (message and location)
/// and leaves every other thread's panics to the previous hook.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_WORKER.try_with(Cell::get).unwrap_or(false) {
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a non-string panic payload)".into());
                let at = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_else(|| "an unknown location".into());
                let _ =
                    LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(format!("{payload} (at {at})")));
            } else {
                previous(info);
            }
        }));
    });
}

/// The number of inputs of a target by default, scaled.
fn iterations(default: u64, s: &Settings) -> u64 {
    ((default as f64) * s.scale).round().max(1.0) as u64
}

/// Seed files of a target: `tests/fixtures/fuzz/<target>/*`, sorted.
fn seed_files(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("a seed file"))
        .collect()
}

/// Fuzzes one target: `default_iters` inputs (scaled by `FUZZ_ITERS_SCALE`), the `seeds`
/// first as they are, then inputs made by `make` from a [`Mutator`] over the seeds seeded for
/// that input. `setup` builds, on the worker thread before any input, the function that runs
/// one input (with what it needs: a device, a folder); it returns `Err` when the reader
/// refused the input, which is fine. Fails on a panic, an input past the time limit, or a
/// refused allocation the reader survived (an unsurvived one aborts).
fn fuzz<S, M>(target: &'static str, default_iters: u64, seeds: Vec<Vec<u8>>, setup: S, make: M)
where
    S: FnOnce() -> Box<dyn FnMut(&[u8]) -> Result<(), String>> + Send + 'static,
    M: Fn(&mut Mutator) -> Vec<u8> + Send + 'static,
{
    let settings = Settings::from_env();
    install_quiet_hook();
    let seed = settings.seed;
    let replay = settings
        .replay
        .as_ref()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("FUZZ_REPLAY {}: {e}", p.display())));
    let indices: Vec<u64> = match (&replay, settings.only_index) {
        (Some(_), _) => vec![0],
        (None, Some(i)) => vec![i],
        (None, None) => (0..iterations(default_iters, &settings)).collect(),
    };
    let current = Arc::new(Mutex::new(Current {
        target,
        seed,
        index: 0,
        bytes: Vec::new(),
    }));
    let epoch = Instant::now();
    let started = Arc::new(AtomicU64::new(IDLE));
    let index_now = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<Tally>();
    let worker = {
        let current = current.clone();
        let started = started.clone();
        let index_now = index_now.clone();
        let verbose = settings.verbose;
        let time_limit = settings.time_limit;
        // One input asked for (FUZZ_INDEX): say what it did and save it.
        let single = settings.only_index.is_some() && replay.is_none();
        std::thread::Builder::new()
            .name(format!("fuzz-{target}"))
            // As much stack as a main thread has.
            .stack_size(8 << 20)
            .spawn(move || {
                CURRENT.with(|c| *c.borrow_mut() = Some(current.clone()));
                let mut run = setup();
                let mut t = Tally::default();
                let mut locations: Vec<String> = Vec::new();
                for &i in &indices {
                    index_now.store(i, Relaxed);
                    started.store(epoch.elapsed().as_millis() as u64, Relaxed);
                    let input = match &replay {
                        Some(b) => b.clone(),
                        None if (i as usize) < seeds.len() => seeds[i as usize].clone(),
                        None => make(&mut Mutator::new(seed, target, i, &seeds)),
                    };
                    {
                        let mut c = current.lock().unwrap_or_else(|p| p.into_inner());
                        c.index = i;
                        c.bytes.clear();
                        c.bytes.extend_from_slice(&input);
                    }
                    LIVE.with(|l| l.set(0));
                    let t0 = Instant::now();
                    IN_WORKER.with(|w| w.set(true));
                    GUARD.with(|g| g.set(true));
                    let outcome = catch_unwind(AssertUnwindSafe(|| run(&input)));
                    GUARD.with(|g| g.set(false));
                    IN_WORKER.with(|w| w.set(false));
                    let took = t0.elapsed();
                    t.slowest = t.slowest.max(took);
                    if took > time_limit {
                        t.slow.push((i, took, save_input(target, seed, i, &input)));
                    }
                    t.inputs += 1;
                    let verdict = match outcome {
                        Ok(Ok(())) => "ok".to_string(),
                        Ok(Err(e)) => {
                            t.errors += 1;
                            format!("error: {}", e.lines().next().unwrap_or(""))
                        }
                        Err(_) => {
                            t.panics += 1;
                            let message = LAST_PANIC
                                .with(|p| p.borrow_mut().take())
                                .unwrap_or_else(|| "(no message recorded)".into());
                            let location = message
                                .rsplit_once(" (at ")
                                .map_or(message.clone(), |(_, l)| l.to_string());
                            let new_location = !locations.contains(&location);
                            if new_location {
                                locations.push(location);
                            }
                            if t.records.len() < 5 || (new_location && t.records.len() < 20) {
                                let saved = save_input(target, seed, i, &input);
                                t.records.push(PanicRecord {
                                    index: i,
                                    message: message.clone(),
                                    saved,
                                });
                            }
                            format!("PANIC: {message}")
                        }
                    };
                    if verbose || single {
                        let v: String = verdict.chars().take(200).collect();
                        eprintln!("fuzz {target} #{i} ({} bytes, {took:?}): {v}", input.len());
                    }
                    if single {
                        eprintln!("  input saved to {}", save_input(target, seed, i, &input));
                    }
                }
                started.store(IDLE, Relaxed);
                t.largest = LARGEST.with(Cell::get);
                t.refused = REFUSED.with(Cell::get);
                let _ = tx.send(t);
            })
            .expect("a worker thread")
    };
    // Watch the worker: it either reports, or one input runs past the time limit.
    let tally = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(t) => break t,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = worker.join();
                panic!(
                    "fuzz {target}: the worker thread died without a report (a panic of the harness \
                     itself, outside any input: see above)"
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let s = started.load(Relaxed);
                let now = epoch.elapsed().as_millis() as u64;
                if s != IDLE && now.saturating_sub(s) > settings.time_limit.as_millis() as u64 {
                    let i = index_now.load(Relaxed);
                    // The worker holds the lock only while it copies an input in.
                    let bytes = current.lock().map(|c| c.bytes.clone()).unwrap_or_default();
                    let saved = save_input(target, seed, i, &bytes);
                    println!(
                        "fuzz {target}: 1 hang: input {i} ({} bytes) still running after {:?} (FUZZ_TIME_LIMIT_S); saved to {saved}",
                        bytes.len(),
                        settings.time_limit
                    );
                    let rerun = match &settings.replay {
                        Some(p) => format!("FUZZ_REPLAY={}", p.display()),
                        None => format!("FUZZ_SEED={seed} FUZZ_INDEX={i}"),
                    };
                    panic!(
                        "fuzz {target}: HANG: input {i} (FUZZ_SEED={seed}) ran past the time limit of {:?}; \
                         input saved to {saved}; rerun it with {rerun} \
                         (the stuck worker thread is left behind)",
                        settings.time_limit
                    );
                }
            }
        }
    };
    let _ = worker.join();
    println!(
        "fuzz {target}: {} inputs, {} panics, {} hangs, largest allocation {:.1} MiB, slowest input {} ms, {} errors returned",
        tally.inputs,
        tally.panics,
        tally.slow.len(),
        mib(tally.largest),
        tally.slowest.as_millis(),
        tally.errors
    );
    let mut problems = Vec::new();
    for r in &tally.records {
        problems.push(format!(
            "  input {} panicked: {}\n    saved to {}; rerun: FUZZ_SEED={seed} FUZZ_INDEX={} cargo test --release --test all fuzz::{target} -- --nocapture",
            r.index, r.message, r.saved, r.index
        ));
    }
    for (i, took, saved) in &tally.slow {
        problems.push(format!(
            "  input {i} took {took:?}, past the time limit of {:?} (FUZZ_TIME_LIMIT_S): HANG\n    saved to {saved}; rerun: FUZZ_SEED={seed} FUZZ_INDEX={i} cargo test --release --test all fuzz::{target} -- --nocapture",
            settings.time_limit
        ));
    }
    if tally.refused > 0 {
        problems.push(format!(
            "  {} allocation(s) were refused (see the REFUSED ALLOCATION lines above) and the reader survived them",
            tally.refused
        ));
    }
    if !problems.is_empty() {
        panic!(
            "fuzz {target}: {} of {} inputs panicked, {} ran past the time limit (the first few \
             panics and the first of each location below, seed {seed})\n{}",
            tally.panics,
            tally.inputs,
            tally.slow.len(),
            problems.join("\n")
        );
    }
}

/// A property violation of an accepted input: fails the input like a panic.
macro_rules! property {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!("property violated: {}", format!($($msg)+));
        }
    };
}

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("{e:#}")
}

// ---------------------------------------------------------------------------------------------
// Seeds built with the library.
// ---------------------------------------------------------------------------------------------

/// Tiny model files of every kind the config allows: unconditioned, class- and
/// text-conditioned, super-resolution and latent, as the library writes them.
fn tiny_models() -> Vec<Vec<u8>> {
    use diffuse::model::{LatentConfig, ModelConfig, SuperResConfig, model_bytes};
    use diffuse::schedule::{Prediction, ScheduleConfig};
    use diffuse::unet::{UNet, UNetConfig};
    use diffuse::weights::{self, NamedTensors, StoreDtype};
    let dev = diffuse::device::inference_device();
    let unet = UNetConfig {
        image_size: 4,
        in_channels: 1,
        out_channels: 1,
        base_channels: 4,
        channel_mult: vec![1, 2],
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        dropout: 0.0,
        norm_groups: 2,
        num_classes: None,
        ..UNetConfig::default()
    };
    let base = ModelConfig {
        unet: unet.clone(),
        schedule: ScheduleConfig {
            timesteps: 10,
            ..ScheduleConfig::default()
        },
        prediction: Prediction::Epsilon,
        class_names: Vec::new(),
        superres: None,
        latent: None,
        sampling: None,
    };
    let mut configs = vec![base.clone()];
    let mut class = base.clone();
    class.unet.num_classes = Some(3);
    class.unet.attention_head_dim = Some(2);
    class.class_names = vec!["a".into(), "b".into(), "c".into()];
    configs.push(class);
    let mut text = base.clone();
    text.unet.text_dim = Some(4);
    text.unet.cross_attention_resolutions = vec![2];
    text.prediction = Prediction::V;
    configs.push(text);
    let mut sr = base.clone();
    sr.unet.cond_channels = 1;
    sr.superres = Some(SuperResConfig { scale: 2 });
    configs.push(sr);
    let vae: diffuse::vae::VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [2],
        "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"],
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 1,
        "norm_num_groups": 1,
        "sample_size": 4
    }))
    .expect("a VAE config");
    let mut latent = base.clone();
    latent.latent = Some(LatentConfig {
        vae: vae.clone(),
        image_size: 4,
    });
    configs.push(latent);
    let mut out = Vec::new();
    for cfg in configs {
        let m = UNet::new(&cfg.unet, &dev).expect("a tiny U-Net");
        let mut t = NamedTensors::new();
        weights::collect(&m, "", &mut t);
        if let Some(l) = &cfg.latent {
            let v = diffuse::vae::Vae::new(&l.vae, &dev).expect("a tiny VAE");
            let mut ours = NamedTensors::new();
            weights::collect(&v, "", &mut ours);
            for (k, x) in diffuse::vae::to_diffusers_names(&ours) {
                t.insert(format!("{}{k}", diffuse::model::VAE_PREFIX), x);
            }
        }
        out.push(model_bytes(&cfg, &t, StoreDtype::F16).expect("model bytes"));
    }
    out
}

/// The embedded model's header with only the first bytes of its data: its real config, and
/// offsets a small file cannot satisfy.
fn embedded_header_seed() -> Vec<u8> {
    let full = diffuse::model::EMBEDDED_MODEL;
    let n = u64::from_le_bytes(full[..8].try_into().expect("8 bytes")) as usize;
    full[..(8 + n + 64).min(full.len())].to_vec()
}

/// Tiny JPEG, WebP and 16-bit PNG images written by the image crate.
fn library_images() -> Vec<Vec<u8>> {
    let rgb = image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 120, 200]));
    let img = image::DynamicImage::ImageRgb8(rgb);
    let mut out = Vec::new();
    for f in [
        image::ImageFormat::Jpeg,
        image::ImageFormat::WebP,
        image::ImageFormat::Png,
    ] {
        let img = if f == image::ImageFormat::Png {
            image::DynamicImage::ImageLuma16(img.to_luma16())
        } else {
            img.clone()
        };
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, f).expect("an encoded image");
        out.push(buf.into_inner());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Targets.
// ---------------------------------------------------------------------------------------------

/// Safetensors parsing: `weights::from_safetensors`.
#[test]
fn safetensors() {
    let mut seeds = seed_files("safetensors");
    seeds.extend(tiny_models().into_iter().take(2));
    seeds.push(embedded_header_seed());
    fuzz(
        "safetensors",
        5000,
        seeds,
        || {
            Box::new(|b: &[u8]| {
                let (tensors, _) = diffuse::weights::from_safetensors(b, "fuzz").map_err(err)?;
                for (name, t) in &tensors {
                    let n: usize = t.shape.iter().product();
                    property!(
                        n == t.data.len(),
                        "tensor {name}: shape {:?} but {} values",
                        t.shape,
                        t.data.len()
                    );
                }
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            for _ in 0..m.stack() {
                m.safetensors_op(&mut d, false);
            }
            d
        },
    );
}

/// A model from a file: `model::load_from_bytes` (the header, the config in its metadata,
/// building the U-Net and VAE the config describes, and matching the weights to it).
#[test]
fn model() {
    let mut seeds = tiny_models();
    // The harness's own check: every tiny model the library wrote loads back.
    let dev = diffuse::device::inference_device();
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = diffuse::model::load_from_bytes(s, "seed", &dev) {
            panic!("fuzz model: seed {i} does not load: {e:#}");
        }
    }
    seeds.push(embedded_header_seed());
    fuzz(
        "model",
        1500,
        seeds,
        || {
            let dev = diffuse::device::inference_device();
            Box::new(move |b: &[u8]| {
                diffuse::model::load_from_bytes(b, "fuzz", &dev).map_err(err)?;
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            for _ in 0..m.rng.gen_range(1..=3) {
                m.safetensors_op(&mut d, true);
            }
            d
        },
    );
}

/// The TorchScript pickle reader: `eval::pickle::parse`, then `flatten` of what it built.
#[test]
fn pickle() {
    fuzz(
        "pickle",
        4000,
        seed_files("pickle"),
        || {
            Box::new(|b: &[u8]| {
                let v = diffuse::eval::pickle::parse(b).map_err(err)?;
                let (mut t, mut a) = (Vec::new(), Vec::new());
                diffuse::eval::pickle::flatten(&v, "", &mut t, &mut a);
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            for _ in 0..m.stack() {
                if m.rng.gen_bool(0.1) {
                    m.text_op(&mut d);
                } else {
                    m.pickle_op(&mut d);
                }
            }
            d
        },
    );
}

/// IDX buffers: `data::idx::parse_idx`.
#[test]
fn idx() {
    fuzz(
        "idx",
        12000,
        seed_files("idx"),
        || {
            Box::new(|b: &[u8]| {
                let (dims, data) = diffuse::data::idx::parse_idx(b, "fuzz").map_err(err)?;
                let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                property!(
                    n == Some(data.len()),
                    "dimensions {dims:?} but {} bytes",
                    data.len()
                );
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            m.havoc(&mut d, 0.0);
            d
        },
    );
}

/// IDX image files, gzipped or not, through the path-based loader: `data::idx::load_idx`.
#[test]
fn idx_gz() {
    fuzz(
        "idx_gz",
        3000,
        seed_files("idx_gz"),
        || {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let path = dir.path().join("fuzz-images-idx3-ubyte.gz");
            Box::new(move |b: &[u8]| {
                std::fs::write(&path, b).map_err(err)?;
                let ds = diffuse::data::idx::load_idx(&path).map_err(err)?;
                property!(
                    ds.pixels.len() % (ds.size * ds.size).max(1) == 0,
                    "{} pixels for images of side {}",
                    ds.pixels.len(),
                    ds.size
                );
                let _ = &dir;
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            // Half the time the gzip stream is rebuilt around a mutated IDX, so that the
            // mutations reach the parser rather than the CRC check.
            if d.starts_with(&[0x1f, 0x8b]) && m.rng.gen_bool(0.5) {
                let mut raw = Vec::new();
                let _ =
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&d[..]), &mut raw);
                m.havoc(&mut raw, 0.0);
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&raw).expect("in memory");
                d = e.finish().expect("in memory");
            } else {
                m.havoc(&mut d, 0.0);
            }
            d
        },
    );
}

/// `captions.jsonl`: `data::captions::read` over a folder holding a.png, b.jpg and
/// sub/c.png.
#[test]
fn captions() {
    fuzz(
        "captions",
        3000,
        seed_files("captions"),
        || {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let root = dir.path().to_path_buf();
            std::fs::create_dir(root.join("sub")).expect("a subfolder");
            let files: Vec<PathBuf> = ["a.png", "b.jpg", "sub/c.png"]
                .iter()
                .map(|f| root.join(f))
                .collect();
            for f in &files {
                std::fs::write(f, b"not decoded here").expect("a file");
            }
            Box::new(move |b: &[u8]| {
                std::fs::write(root.join(diffuse::data::captions::FILE), b).map_err(err)?;
                let caps = diffuse::data::captions::read(&root, &files).map_err(err)?;
                if let Some(c) = caps {
                    property!(
                        c.len() == files.len(),
                        "{} caption lists for {} files",
                        c.len(),
                        files.len()
                    );
                }
                let _ = &dir;
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            m.havoc(&mut d, 0.7);
            d
        },
    );
}

/// `scheduler_config.json`: `SchedulerConfig::from_json`, `Scheduler::from_settings`, and
/// every sampler kind at several step counts and overrides. An accepted config must give
/// timesteps within `0..=T` and no NaN noise scales.
#[test]
fn scheduler() {
    use diffuse::sampler::{SamplerChoice, SamplerKind, Scheduler, SchedulerConfig, VarianceType};
    use diffuse::schedule::TimestepSpacing;
    fuzz(
        "scheduler",
        1500,
        seed_files("scheduler"),
        || {
            Box::new(|b: &[u8]| {
                let text = std::str::from_utf8(b).map_err(err)?;
                let cfg = SchedulerConfig::from_json(text, "fuzz").map_err(err)?;
                let s = Scheduler::from_settings(cfg).map_err(err)?;
                let t = s.len();
                let mut steps = vec![
                    1,
                    2,
                    3,
                    10,
                    50,
                    t / 2,
                    t.saturating_sub(1),
                    t,
                    t + 1,
                    0,
                    usize::MAX,
                ];
                steps.sort();
                steps.dedup();
                let choices = [
                    SamplerChoice::default(),
                    SamplerChoice {
                        eta: 1.0,
                        spacing: Some(TimestepSpacing::Trailing),
                        variance: Some(VarianceType::FixedLarge),
                        karras: Some(true),
                        ..SamplerChoice::default()
                    },
                    SamplerChoice {
                        spacing: Some(TimestepSpacing::Leading),
                        karras: Some(false),
                        ..SamplerChoice::default()
                    },
                ];
                let mut accepted = 0;
                for kind in SamplerKind::ALL {
                    for &k in &steps {
                        for c in &choices {
                            // --eta is a DDIM option (and refused by the others).
                            let choice = SamplerChoice {
                                steps: k,
                                eta: if kind == SamplerKind::Ddim {
                                    c.eta
                                } else {
                                    0.0
                                },
                                ..c.clone()
                            };
                            let Ok(sampler) = s.sampler(kind, &choice) else {
                                continue;
                            };
                            accepted += 1;
                            let ts = sampler.timesteps();
                            property!(!ts.is_empty(), "{kind:?} with {k} steps visits no timestep");
                            if let Some(bad) = ts.iter().find(|x| !(0.0..=t as f64).contains(*x)) {
                                property!(
                                    false,
                                    "{kind:?} with {k} steps of T={t} visits timestep {bad}"
                                );
                            }
                            for i in 0..=ts.len() {
                                let (a, sd) = sampler.state_scales(i);
                                property!(
                                    !a.is_nan() && !sd.is_nan(),
                                    "{kind:?} with {k} steps of T={t}: state scales ({a}, {sd}) at position {i}"
                                );
                            }
                        }
                    }
                }
                if accepted == 0 {
                    return Err("no sampler accepted the config".into());
                }
                Ok(())
            })
        },
        |m| {
            let mut d = m.seed();
            if m.rng.gen_bool(0.5) {
                // As parsed JSON: keys set to interesting values.
                let python = diffuse::sampler::config::python_json(&String::from_utf8_lossy(&d));
                if let Ok(mut v) = serde_json::from_str::<Value>(&python) {
                    for _ in 0..m.rng.gen_range(1..=3) {
                        m.json_op(&mut v);
                    }
                    return serde_json::to_vec(&v).expect("serialisable");
                }
            }
            m.havoc(&mut d, 0.8);
            d
        },
    );
}

/// `POST /v1/generate` bodies: `serde_json::from_slice::<GenerateRequest>`, then
/// `serve::api::validate` against a class-conditioned, a text-conditioned and an
/// unconditioned model. An accepted request must be within the limits.
#[test]
fn serve() {
    use diffuse::serve::api::{GenerateRequest, Limits, validate};
    let dev = diffuse::device::inference_device();
    let class = diffuse::model::load_from_bytes(diffuse::model::EMBEDDED_MODEL, "embedded", &dev)
        .expect("the embedded model");
    let schedule_len = class.scheduler.len();
    let class_cfg = class.config.clone();
    drop(class);
    let (_, meta) = diffuse::weights::from_safetensors(diffuse::model::EMOJI_MODEL, "emoji")
        .expect("the emoji model");
    let text_cfg: diffuse::model::ModelConfig =
        serde_json::from_str(&meta[diffuse::model::CONFIG_KEY]).expect("its config");
    let mut uncond_cfg = class_cfg.clone();
    uncond_cfg.unet.num_classes = None;
    uncond_cfg.class_names.clear();
    fuzz(
        "serve",
        10000,
        seed_files("serve"),
        move || {
            let limits = Limits {
                max_n: 16,
                max_steps: 1000,
                max_body_bytes: 1 << 20,
                timeout_s: 300,
            };
            Box::new(move |b: &[u8]| {
                let req: GenerateRequest = serde_json::from_slice(b).map_err(err)?;
                let mut any = false;
                let mut last = String::new();
                for (cfg, len) in [
                    (&class_cfg, schedule_len),
                    (&text_cfg, schedule_len),
                    (&uncond_cfg, 7),
                ] {
                    match validate(&req, cfg, len, &limits, 0) {
                        Ok(spec) => {
                            any = true;
                            property!((1..=limits.max_n).contains(&spec.n), "n = {}", spec.n);
                            property!(
                                (1..=limits.max_steps.min(len)).contains(&spec.steps),
                                "steps = {} with T = {len}",
                                spec.steps
                            );
                            if let Some(c) = &spec.classes {
                                let k = cfg.unet.num_classes.unwrap_or(0);
                                property!(
                                    c.len() == spec.n && c.iter().all(|&x| x < k),
                                    "classes {c:?} for n = {}",
                                    spec.n
                                );
                            }
                            property!(
                                spec.guidance.is_finite() && spec.eta.is_finite(),
                                "guidance or eta not finite"
                            );
                        }
                        Err(e) => last = e,
                    }
                }
                if any { Ok(()) } else { Err(last) }
            })
        },
        |m| {
            if m.rng.gen_bool(0.03) {
                return large_body(m);
            }
            let mut d = m.seed();
            m.havoc(&mut d, 0.75);
            d
        },
    );
}

/// A request body of about a megabyte: a long prompt or class name, padding, a long unknown
/// field, or many repeated keys; sometimes mutated once more.
fn large_body(m: &mut Mutator) -> Vec<u8> {
    let k = *m.pick(&[1000usize, 300_000, 1 << 20]);
    let unit = *m.pick(&["ab ", "\\u00e9", " ", "\\\"", "\u{1f600}"]);
    let long = unit.repeat(k / unit.len().max(1));
    let mut d = match m.rng.gen_range(0..5) {
        0 => format!("{{\"prompt\":\"{long}\",\"n\":1}}"),
        1 => format!("{{\"class\":\"{long}\"}}"),
        2 => format!("{}{{\"n\":2}}{}", " ".repeat(k), "\n".repeat(k)),
        3 => format!("{{\"steps\":10,\"{long}\":1}}"),
        _ => format!("{{{}\"n\":1}}", "\"seed\":1,".repeat(k / 9)),
    }
    .into_bytes();
    if m.rng.gen_bool(0.3) {
        m.byte_op(&mut d);
    }
    d
}

// ---------------------------------------------------------------------------------------------
// The image-folder target: random trees described by a small recipe.
// ---------------------------------------------------------------------------------------------

/// The recipe of a folder tree and a load, as text lines (files carry their bytes inline):
///
/// ```text
/// O <with_classes 0|1> <size> <channels>
/// D <path>
/// F <length> <path>\n<bytes>\n
/// L <path> -> <link target>
/// ```
///
/// Paths are relative to the tree's root (they may hold spaces); link targets are relative to
/// the link's folder and stay inside the tree (or dangle). Being plain bytes, a recipe is
/// saved and replayed like any other input.
struct Recipe {
    out: Vec<u8>,
}

impl Recipe {
    fn line(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'\n');
    }
    fn file(&mut self, path: &str, bytes: &[u8]) {
        self.line(&format!("F {} {path}", bytes.len()));
        self.out.extend_from_slice(bytes);
        self.out.push(b'\n');
    }
    fn link(&mut self, path: &str, target: &str) {
        self.line(&format!("L {path} -> {target}"));
    }
}

/// What a recipe asks to load.
struct LoadOptions {
    with_classes: bool,
    size: usize,
    channels: usize,
}

/// Builds a recipe's tree under `root` (which exists); returns its load options.
fn materialize(recipe: &[u8], root: &Path) -> Result<LoadOptions, String> {
    let mut opts = LoadOptions {
        with_classes: false,
        size: 8,
        channels: 3,
    };
    let inside = |p: &str| -> Result<PathBuf, String> {
        let rel = Path::new(p);
        if p.is_empty() || rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            return Err(format!("recipe path {p:?} is outside the tree"));
        }
        Ok(root.join(rel))
    };
    let in_parent = |p: &str| -> Result<PathBuf, String> {
        let p = inside(p)?;
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        Ok(p)
    };
    let mut at = 0;
    while at < recipe.len() {
        let end = recipe[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(recipe.len(), |e| at + e);
        let line = String::from_utf8_lossy(&recipe[at..end]).into_owned();
        at = end + 1;
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match kind {
            "O" => {
                let v: Vec<usize> = rest
                    .split(' ')
                    .map(|x| x.parse().map_err(err))
                    .collect::<Result<_, _>>()?;
                let [classes, size, channels] = v[..] else {
                    return Err("recipe: bad options line".into());
                };
                opts = LoadOptions {
                    with_classes: classes == 1,
                    size,
                    channels,
                };
            }
            "D" => std::fs::create_dir_all(inside(rest)?).map_err(err)?,
            "F" => {
                let (n, path) = rest.split_once(' ').ok_or("recipe: bad file line")?;
                let n: usize = n.parse().map_err(err)?;
                let bytes = at
                    .checked_add(n)
                    .and_then(|e| recipe.get(at..e))
                    .ok_or("recipe: file cut short")?;
                at += n + 1;
                std::fs::write(in_parent(path)?, bytes).map_err(err)?;
            }
            "L" => {
                let (path, target) = rest.split_once(" -> ").ok_or("recipe: bad link line")?;
                std::os::unix::fs::symlink(target, in_parent(path)?).map_err(err)?;
            }
            "" => {}
            other => return Err(format!("recipe: unknown line kind {other:?}")),
        }
    }
    Ok(opts)
}

/// A random folder tree: nested folders, images (valid, mutated, empty, of another format
/// than their extension), `.txt` sidecars, symbolic links to ancestors, siblings, themselves
/// and nothing, and sometimes a `captions.jsonl`.
fn folder_recipe(m: &mut Mutator) -> Vec<u8> {
    let mut r = Recipe { out: Vec::new() };
    let size = *m.pick(&[1usize, 2, 3, 8, 16]);
    let channels = *m.pick(&[1usize, 3]);
    r.line(&format!(
        "O {} {size} {channels}",
        u8::from(m.rng.gen_bool(0.4))
    ));
    // Folders end in '/', the root is "".
    let names = [
        "a",
        "b",
        "cls",
        "deep",
        "x y",
        "\u{fc}n\u{ef}",
        ".hidden",
        "sub",
    ];
    let mut dirs: Vec<String> = vec![String::new()];
    for _ in 0..m.rng.gen_range(0..6) {
        let parent = m.pick(&dirs).clone();
        if parent.matches('/').count() >= 3 {
            continue;
        }
        let d = format!("{parent}{}/", m.pick(&names));
        if !dirs.contains(&d) {
            r.line(&format!("D {}", d.trim_end_matches('/')));
            dirs.push(d);
        }
    }
    let mut files = Vec::new();
    let exts = ["png", "PNG", "jpg", "jpeg", "bmp", "webp", "txt", "gif", ""];
    for k in 0..m.rng.gen_range(0..9) {
        let dir = m.pick(&dirs).clone();
        let ext = *m.pick(&exts);
        let stem = format!("{}{k}", m.pick(&["img", "a", "b", "Z"]));
        let path = if ext.is_empty() {
            format!("{dir}{stem}")
        } else {
            format!("{dir}{stem}.{ext}")
        };
        let mut bytes = m.seed();
        match m.rng.gen_range(0..10) {
            0..=5 => {
                for _ in 0..m.rng.gen_range(1..=4) {
                    m.image_op(&mut bytes);
                }
            }
            6 => bytes.clear(),
            7 => bytes = (0..m.span(64)).map(|_| m.rng.r#gen()).collect(),
            8 if ext == "txt" => bytes = b"a caption\n\nanother one\n".to_vec(),
            _ => {}
        }
        r.file(&path, &bytes);
        files.push(path);
    }
    for k in 0..m.rng.gen_range(0..5) {
        let dir = m.pick(&dirs).clone();
        let up = "../".repeat(dir.matches('/').count());
        let file_name = format!("link{k}{}", m.pick(&["", ".png", ".jpg"]));
        let target = match m.rng.gen_range(0..7) {
            // An ancestor: a loop.
            0 if !up.is_empty() => up[..3 * m.rng.gen_range(1..=up.len() / 3)].to_string(),
            0 | 1 => ".".to_string(),
            // Itself (ELOOP), or something that is not there.
            2 => file_name.clone(),
            3 => "missing/nothing.png".to_string(),
            // Any folder (a sibling, itself, the root) or a file, seen from here.
            4 => format!("{up}{}", m.pick(&dirs)),
            5 if !files.is_empty() => format!("{up}{}", m.pick(&files)),
            // Another link (a chain, possibly a cycle of links).
            _ => format!("link{}", m.rng.gen_range(0..5)),
        };
        let target = if target.is_empty() {
            ".".to_string()
        } else {
            target
        };
        r.link(&format!("{dir}{file_name}"), &target);
    }
    if m.rng.gen_bool(0.3) {
        let mut jsonl = Vec::new();
        for f in &files {
            if m.rng.gen_bool(0.8) {
                let line = serde_json::json!({"file": f, "text": "a caption"}).to_string();
                jsonl.extend_from_slice(line.as_bytes());
                jsonl.push(b'\n');
            }
        }
        if m.rng.gen_bool(0.5) {
            m.havoc(&mut jsonl, 0.8);
        }
        let dir = if m.rng.gen_bool(0.8) {
            String::new()
        } else {
            m.pick(&dirs).clone()
        };
        r.file(&format!("{dir}captions.jsonl"), &jsonl);
    }
    r.out
}

/// The classic loops, always input 0 of the folder target: links back to the root and to a
/// parent, and a link to itself.
fn loop_recipe(seed_png: &[u8]) -> Vec<u8> {
    let mut r = Recipe { out: Vec::new() };
    r.line("O 1 4 3");
    r.file("cls/a.png", seed_png);
    r.file("cls/deeper/b.png", seed_png);
    r.link("cls/root", ".");
    r.link("cls/deeper/up", "..");
    r.link("cls/deeper/up2", "../..");
    r.link("cls/self", "self");
    r.link("cls/dangling.png", "missing.png");
    r.out
}

/// Image folders: `data::folder::load_folder` on random small trees. A tree is built fresh
/// for each input in a temporary folder (left on disk when the input hangs).
#[test]
fn folder() {
    let mut images = seed_files("folder");
    images.extend(library_images());
    let first = loop_recipe(&images[0]);
    fuzz(
        "folder",
        400,
        vec![first],
        || {
            Box::new(|b: &[u8]| {
                let dir = tempfile::Builder::new()
                    .prefix("diffuse-fuzz-folder-")
                    .tempdir()
                    .map_err(err)?;
                let opts = materialize(b, dir.path())?;
                let shape = diffuse::data::Shape {
                    size: opts.size,
                    channels: opts.channels,
                };
                let ds = diffuse::data::folder::load_folder(dir.path(), shape, opts.with_classes)
                    .map_err(err)?;
                property!(
                    ds.pixels.len() % (opts.channels * opts.size * opts.size) == 0,
                    "{} pixel bytes",
                    ds.pixels.len()
                );
                if let Some(l) = &ds.labels {
                    property!(
                        l.len() == ds.len(),
                        "{} labels for {} images",
                        l.len(),
                        ds.len()
                    );
                }
                if let Some(c) = &ds.captions {
                    property!(
                        c.len() == ds.len(),
                        "{} captions for {} images",
                        c.len(),
                        ds.len()
                    );
                }
                Ok(())
            })
        },
        move |m| {
            let mut sub = Mutator {
                rng: ChaCha8Rng::from_rng(&mut m.rng).expect("a generator"),
                seeds: &images,
            };
            folder_recipe(&mut sub)
        },
    );
}
