//! Hostile and unlucky inputs: each probe of issue #20 reproduced, then held. Folder walks
//! with link loops, writes that fail half-way or are killed, memory against `--n`, damaged
//! files, resume targets, concurrent writers, byte-stable files, and the messages.

use super::cli::{diffuse, fails, ok, tiny_train_args};
use super::data::fixture;
use diffuse::data::Shape;
use diffuse::device::inference_device;
use diffuse::pipeline::{Conditioning, Pipeline, Request, Seeds};
use diffuse::sampler::SamplerKind;
use diffuse::weights::{self, HostTensor, NamedTensors, StoreDtype};
use std::collections::HashMap;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

/// No process has this pid: Linux pids stay below `pid_max`, at most 2^22.
const DEAD_PID: u32 = 4_194_304;

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn temporaries_in(dir: &Path) -> Vec<String> {
    names_in(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp"))
        .collect()
}

fn tiny_png(path: &Path, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(8, 8, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

/// Runs `f` on another thread and fails the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}: a hang"))
}

#[test]
fn folder_walk_ends_on_link_loops_and_lists_each_image_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    tiny_png(&d.join("a.png"), [10, 200, 30]);
    // Two links to the folder itself (the reported hang), one back up from a subfolder, a
    // second name for the image, and a dangling link.
    symlink(".", d.join("l1")).unwrap();
    symlink(".", d.join("l2")).unwrap();
    symlink("..", d.join("sub/up")).unwrap();
    symlink("../a.png", d.join("sub/same.png")).unwrap();
    symlink("missing.png", d.join("gone.png")).unwrap();
    let dd = d.clone();
    let files = within(Duration::from_secs(30), move || {
        diffuse::data::folder::walk(&dd).map(|w| w.files)
    })
    .unwrap();
    assert_eq!(files, vec![d.join("a.png")]);
    let dd = d.clone();
    let ds = within(Duration::from_secs(30), move || {
        diffuse::data::folder::load_folder(
            &dd,
            Shape {
                size: 8,
                channels: 3,
            },
            false,
        )
    })
    .unwrap();
    assert_eq!(ds.len(), 1, "one image, however many names lead to it");
}

#[test]
#[cfg_attr(
    builds_as_root,
    ignore = "skipped: running as root, where file permissions do not apply"
)]
fn unreadable_files_and_subfolders_are_skipped_and_named() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    std::fs::create_dir_all(d.join("locked")).unwrap();
    tiny_png(&d.join("a.png"), [1, 2, 3]);
    tiny_png(&d.join("locked/b.png"), [1, 2, 3]);
    tiny_png(&d.join("c.png"), [1, 2, 3]);
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(&d.join("locked"), 0o000).unwrap();
    mode(&d.join("c.png"), 0o000).unwrap();
    let shape = Shape {
        size: 8,
        channels: 3,
    };
    let ds = diffuse::data::folder::load_folder(&d, shape, false);
    mode(&d.join("locked"), 0o755).unwrap();
    assert_eq!(ds.unwrap().len(), 1, "the readable image is kept");
    // Only unreadable files: the error says why, in words.
    std::fs::remove_file(d.join("a.png")).unwrap();
    std::fs::remove_dir_all(d.join("locked")).unwrap();
    let e = diffuse::data::folder::load_folder(&d, shape, false)
        .unwrap_err()
        .to_string();
    mode(&d.join("c.png"), 0o644).unwrap();
    assert!(e.contains("permission denied"), "{e}");
    assert!(!e.contains("decode"), "{e}");
}

/// Found by the fuzz harness (`fuzz::folder`): a 79-byte PNG whose header claims
/// 10000x10000 RGBA pixels made the folder reader allocate 400 MB before failing. Such a file
/// is now refused from its header, in words, by the folder reader and by `load_image` alike.
#[test]
fn an_image_header_claiming_a_huge_picture_is_refused_before_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    std::fs::create_dir_all(&d).unwrap();
    tiny_png(&d.join("a.png"), [9, 9, 9]);
    let mut png = std::fs::read(d.join("a.png")).unwrap();
    // IHDR: width at 16..20, height at 20..24 (big-endian), colour type at 25, CRC at 29..33.
    png[16..20].copy_from_slice(&10_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&10_000u32.to_be_bytes());
    png[25] = 6;
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    std::fs::write(d.join("huge.png"), &png).unwrap();
    let shape = Shape {
        size: 8,
        channels: 3,
    };
    let load = |d: PathBuf| {
        within(Duration::from_secs(30), move || {
            diffuse::data::folder::load_folder(&d, shape, false)
        })
    };
    assert_eq!(load(d.clone()).unwrap().len(), 1, "the real image is kept");
    std::fs::remove_file(d.join("a.png")).unwrap();
    let e = load(d.clone()).unwrap_err().to_string();
    assert!(
        e.contains("huge.png") && e.contains("claims 10000x10000"),
        "{e}"
    );
    let e = diffuse::imageio::load_image(&d.join("huge.png"), 8, 3, &inference_device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge.png") && e.contains("claims 10000x10000"),
        "{e}"
    );
}

/// Found by the fuzz harness (`fuzz::serve`): a 1 MB class name took about 250 ms to
/// validate and was echoed whole. It is now refused by length like a prompt, and a long
/// unknown name given to the library is echoed cut short.
#[test]
fn long_class_names_are_refused_and_not_echoed_whole() {
    use diffuse::serve::api::{GenerateRequest, Limits, MAX_PROMPT_BYTES, validate};
    let m = diffuse::model::load_from_bytes(
        diffuse::model::EMBEDDED_MODEL,
        "embedded",
        &inference_device(),
    )
    .unwrap();
    let limits = Limits {
        max_n: 4,
        max_steps: 1000,
        max_body_bytes: 4 << 20,
        timeout_s: 60,
    };
    let long = "\u{e9}".repeat(500_000);
    let body = serde_json::json!({ "class": long }).to_string();
    let req: GenerateRequest = serde_json::from_str(&body).unwrap();
    let e = validate(&req, &m.config, m.scheduler.len(), &limits, 0).unwrap_err();
    assert_eq!(
        e,
        format!("class is 1000000 bytes; the limit is {MAX_PROMPT_BYTES}")
    );
    let name = "x".repeat(MAX_PROMPT_BYTES);
    let e = m
        .config
        .class_index(&name, "--class")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a class of this model"), "{e}");
    assert!(
        e.len() < 400,
        "the name is echoed cut short: {} bytes",
        e.len()
    );
    // The names still resolve as before.
    assert_eq!(m.config.class_index("Ankle boot", "--class").unwrap(), 9);
    assert_eq!(m.config.class_index("ankle-boot", "--class").unwrap(), 9);
}

/// `cmd` with writes limited to `bytes` per file: a write past it fails with EFBIG, as on a
/// full disk (SIGXFSZ, which would kill the process, is ignored).
fn with_file_size_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn a_failed_write_leaves_no_temporary_and_keeps_the_old_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid.png");
    std::fs::write(&out, b"the old grid").unwrap();
    let o = with_file_size_limit(
        Command::new(BIN).args([
            "sample",
            "--n",
            "4",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]),
        64,
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("file too large"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"the old grid");
    assert_eq!(names_in(tmp.path()), vec!["grid.png"]);

    // A checkpoint that does not fit: the run fails, and its folder holds no temporary.
    let run = tmp.path().join("run");
    let data = fixture("digits.csv.gz");
    let o = with_file_size_limit(
        Command::new(BIN).args(tiny_train_args(
            data.to_str().unwrap(),
            run.to_str().unwrap(),
            "4",
        )),
        16 * 1024,
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    assert_eq!(temporaries_in(&run), Vec::<String>::new());
}

#[test]
fn temporaries_of_a_killed_write_are_removed_when_the_run_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (data, runs) = (fixture("digits.csv.gz"), run.to_str().unwrap().to_string());
    let data = data.to_str().unwrap();
    ok(&tiny_train_args(data, &runs, "4"));
    // What a kill during a checkpoint write leaves: temporaries named after a dead writer.
    for name in ["checkpoint.safetensors", "config.json"] {
        std::fs::write(run.join(format!(".{name}.tmp{DEAD_PID}")), b"half").unwrap();
    }
    let mut args = tiny_train_args(data, &runs, "6");
    args.push("--resume");
    let o = diffuse(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("removed 2 temporary file(s)"), "{err}");
    assert_eq!(temporaries_in(&run), Vec::<String>::new());
}

/// Peak resident memory of `diffuse args`, in KiB: the child's `VmHWM` (the high-water mark
/// of its own address space since `exec`), read every few milliseconds until it exits. The
/// child's `ru_maxrss` would not do: it counts the test process's pages the child had between
/// fork and exec.
fn peak_rss_kib(args: &[&str]) -> i64 {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        let hwm = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
            })
            .unwrap_or(0);
        peak = peak.max(hwm);
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "diffuse {args:?} failed");
            return peak;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn generation_memory_is_bounded_by_the_batch_not_by_n() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.png");
    let o = out.to_str().unwrap();
    let run = |n: &str, batch: &str| {
        peak_rss_kib(&[
            "sample", "--n", n, "--batch", batch, "--steps", "1", "--out", o,
        ])
    };
    let few = run("16", "16");
    let many = run("192", "16");
    let at_once = run("192", "192");
    // 12 times the images in chunks of 16: the peak stays that of 16 (plus the grid's pixels).
    assert!(
        (many as f64) < few as f64 * 1.25 + 20_000.0,
        "192 images in chunks of 16 peaked at {many} KiB, 16 images at {few} KiB"
    );
    // The bound is the chunking's doing: all 192 at once needs far more.
    assert!(
        at_once as f64 > many as f64 * 1.5,
        "192 at once peaked at {at_once} KiB, in chunks at {many} KiB"
    );
}

fn sample_bits(pipe: &Pipeline, req: &Request) -> Vec<u32> {
    pipe.run(req, &mut |_| {})
        .unwrap()
        .sample
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn chunked_generation_gives_the_same_bits_as_one_batch() {
    let dev = inference_device();
    let pipe = Pipeline::load(None, &dev).unwrap();
    for kind in [
        SamplerKind::Ddpm,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2m,
    ] {
        let mut req = Request::new(5, kind);
        req.steps = Some(3);
        req.conditioning = Conditioning::Classes(vec![0, 3, 5, 7, 9]);
        for seeds in [Seeds::One(7), Seeds::Parts(vec![(2, 1), (3, 9)])] {
            req.seeds = seeds;
            req.batch = Some(5);
            let whole = sample_bits(&pipe, &req);
            for b in [1, 2, 3] {
                req.batch = Some(b);
                assert!(
                    sample_bits(&pipe, &req) == whole,
                    "{kind:?} in chunks of {b} differs from one batch"
                );
            }
        }
    }
    let mut req = Request::new(3, SamplerKind::Ddpm);
    req.batch = Some(0);
    let e = pipe.run(&req, &mut |_| {}).err().unwrap().to_string();
    assert!(e.contains("batch must be between 1"), "{e}");
}

/// The embedded model's tensors and metadata.
fn embedded() -> (NamedTensors, HashMap<String, String>) {
    weights::from_safetensors(diffuse::model::EMBEDDED_MODEL, "the embedded model").unwrap()
}

/// A file in the safetensors format as the `safetensors` crate writes it, all tensors in f32,
/// without a checksum (what diffuse wrote before checksums).
pub fn without_checksum(t: &NamedTensors, meta: &HashMap<String, String>) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(k, v)| {
            let b = v.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), v.shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (k.clone(), v.unwrap())
        })
        .collect();
    let mut meta = meta.clone();
    meta.remove(weights::CHECKSUM_KEY);
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize(views, &meta).unwrap()
}

#[test]
fn damaged_files_are_refused_and_older_files_load_with_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    // Into the temporary folder: a sample that loads writes its grid.
    let grid = tmp.path().join("grid.png");
    let grid = grid.to_str().unwrap();
    let sample = |m: &str| {
        let args = [
            "sample", "--model", m, "--n", "1", "--steps", "1", "--out", grid,
        ];
        diffuse(&args)
    };
    let shipped = diffuse::model::EMBEDDED_MODEL;
    let (_, meta) = embedded();
    assert!(
        meta.contains_key(weights::CHECKSUM_KEY),
        "the shipped model carries a checksum"
    );
    // One flipped bit in the tensor data.
    let mut flipped = shipped.to_vec();
    let k = flipped.len() - 1000;
    flipped[k] ^= 0x10;
    let p = file("flipped.safetensors", &flipped);
    fails(
        &["sample", "--model", &p, "--n", "1", "--steps", "1"],
        "is corrupt",
    );
    // NaN weights under a valid checksum: refused, naming the tensor.
    let (mut t, meta) = embedded();
    let name = t.keys().nth(3).unwrap().clone();
    t.get_mut(&name).unwrap().data[5] = f32::NAN;
    let nan = weights::to_safetensors(&t, &meta, StoreDtype::F32).unwrap();
    let p = file("nan.safetensors", &nan);
    fails(
        &["sample", "--model", &p, "--n", "1", "--steps", "1"],
        &format!("tensor '{name}' holds a value that is not finite"),
    );
    // A file from before checksums: it loads, and says it could not be verified.
    let (t, meta) = embedded();
    let p = file("old.safetensors", &without_checksum(&t, &meta));
    let o = sample(&p);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("carries no checksum"), "{err}");
    // The same file rewritten by `convert` is verified and says nothing.
    let conv = tmp.path().join("conv.safetensors");
    ok(&[
        "convert",
        "--model",
        &p,
        "--out",
        conv.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let o = sample(conv.to_str().unwrap());
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("checksum"));
}

#[test]
fn resume_refuses_a_target_behind_the_run_and_an_impossible_step() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (data, runs) = (fixture("digits.csv.gz"), run.to_str().unwrap().to_string());
    let data = data.to_str().unwrap();
    ok(&tiny_train_args(data, &runs, "4"));
    let mut back = tiny_train_args(data, &runs, "2");
    back.push("--resume");
    fails(&back, "already at step 4, past --steps 2");
    // A checkpoint whose metadata claims step 10^12.
    let ck = run.join("checkpoint.safetensors");
    let (t, mut meta) = weights::read_safetensors(&ck).unwrap();
    meta.insert("diffuse.step".into(), "1000000000000".into());
    std::fs::write(
        &ck,
        weights::to_safetensors(&t, &meta, StoreDtype::F32).unwrap(),
    )
    .unwrap();
    let mut on = tiny_train_args(data, &runs, "8");
    on.push("--resume");
    fails(&on, "is corrupt: it claims step 1000000000000");
}

#[test]
fn one_writer_per_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let data = data.to_str().unwrap();
    let run = tmp.path().join("run");
    let runs = run.to_str().unwrap();
    // The folder exists first: a lock that creates its folder removes it again when it is
    // let go with nothing else in it (checked below).
    std::fs::create_dir_all(&run).unwrap();
    let held = diffuse::files::RunLock::acquire(&run).unwrap();
    fails(
        &tiny_train_args(data, runs, "2"),
        &format!("process {} is writing to it", std::process::id()),
    );
    drop(held);
    let fresh = tmp.path().join("fresh");
    drop(diffuse::files::RunLock::acquire(&fresh).unwrap());
    assert!(
        !fresh.exists(),
        "a folder only the lock made is gone with the lock"
    );
    // The lock file a killed trainer left: no process holds the lock, so it does not block.
    std::fs::write(run.join(diffuse::files::LOCK_FILE), format!("{DEAD_PID}\n")).unwrap();
    ok(&tiny_train_args(data, runs, "2"));
    // Two trainers started together into one folder: one trains, the other stops at once.
    let two = tmp.path().join("two");
    let args = tiny_train_args(data, two.to_str().unwrap(), "8");
    let kids: Vec<_> = (0..2)
        .map(|_| {
            Command::new(BIN)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    let refused: Vec<String> = outs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(won, 1, "exactly one trainer runs: {refused:?}");
    assert!(refused[0].contains("is in use"), "{}", refused[0]);
}

#[test]
fn saved_files_are_a_function_of_their_contents() {
    let mut t = NamedTensors::new();
    for name in ["b.weight", "a.bias", "c"] {
        t.insert(
            name.into(),
            HostTensor {
                shape: vec![2, 2],
                data: vec![1.0, -2.0, 3.5, 0.25],
            },
        );
    }
    // Two maps with the same entries iterate in different orders (each has its own hasher).
    let meta = || -> HashMap<String, String> {
        (0..32)
            .map(|i| (format!("key{i}"), i.to_string()))
            .collect()
    };
    let a = weights::to_safetensors(&t, &meta(), StoreDtype::F32).unwrap();
    let b = weights::to_safetensors(&t, &meta(), StoreDtype::F32).unwrap();
    assert!(a == b, "one state, two different files");
    let (back, m) = weights::from_safetensors(&a, "test").unwrap();
    assert_eq!(back, t);
    assert_eq!(m.len(), 33, "the metadata and the checksum");
    // Two identical training runs: byte-identical checkpoints and models.
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("digits.csv.gz");
    let runs: Vec<PathBuf> = ["x", "y"].iter().map(|r| tmp.path().join(r)).collect();
    for r in &runs {
        ok(&tiny_train_args(
            data.to_str().unwrap(),
            r.to_str().unwrap(),
            "4",
        ));
    }
    for f in ["checkpoint.safetensors", "model.safetensors"] {
        let (x, y) = (
            std::fs::read(runs[0].join(f)).unwrap(),
            std::fs::read(runs[1].join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between identical runs");
    }
}

#[test]
fn messages_name_the_input_in_the_users_terms() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let file = |name: &str, bytes: &[u8]| {
        std::fs::write(tmp.path().join(name), bytes).unwrap();
        path(name)
    };
    let sample_with = |m: &str, needle: &str| {
        fails(
            &["sample", "--model", m, "--n", "1", "--steps", "1"],
            needle,
        )
    };
    // A training checkpoint given as the model.
    let run = path("run");
    let data = fixture("digits.csv.gz");
    ok(&tiny_train_args(data.to_str().unwrap(), &run, "2"));
    sample_with(
        &format!("{run}/checkpoint.safetensors"),
        "is a training checkpoint, not a model",
    );
    // Broken files in words, never a library's error names.
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend(b"{}");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("short.safetensors", b"abc".to_vec(), "shorter than"),
        ("huge.safetensors", huge, "header claims"),
        (
            "cut.safetensors",
            diffuse::model::EMBEDDED_MODEL[..5000].to_vec(),
            "truncated",
        ),
    ];
    for (name, bytes, needle) in cases {
        let p = file(name, &bytes);
        let o = diffuse(&["sample", "--model", &p, "--n", "1", "--steps", "1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle) && err.contains(name), "{err}");
        for internal in [
            "HeaderTooLarge",
            "HeaderTooSmall",
            "InvalidHeaderLength",
            "MetadataIncompleteBuffer",
            "SafeTensorError",
        ] {
            assert!(!err.contains(internal), "{err}");
        }
    }
    // A bad value inside a model file is the file's, not a flag's.
    let (t, mut meta) = embedded();
    let mut cfg: serde_json::Value = serde_json::from_str(&meta["diffuse.config"]).unwrap();
    cfg["unet"]["image_size"] = 0.into();
    meta.insert("diffuse.config".into(), cfg.to_string());
    let p = file(
        "zero.safetensors",
        &weights::to_safetensors(&t, &meta, StoreDtype::F16).unwrap(),
    );
    let o = diffuse(&["sample", "--model", &p, "--n", "1", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the model config it carries is invalid"),
        "{err}"
    );
    assert!(!err.contains("--"), "{err}");
    // Negative numbers reach the option's own check.
    fails(
        &[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            &path("neg"),
            "--lr",
            "-1",
        ],
        "--lr must be a positive number",
    );
    let o = diffuse(&["sample", "--seed", "-1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(err.contains("--seed"), "{err}");
    // The output's format follows its extension; an unknown one, or a folder, is refused
    // before any work, leaving nothing behind.
    let jpg = path("s.jpg");
    ok(&["sample", "--n", "2", "--steps", "1", "--out", &jpg]);
    assert_eq!(&std::fs::read(&jpg).unwrap()[..3], &[0xff, 0xd8, 0xff]);
    // One quick sample with extra options, which must fail naming `needle`.
    let quick_fails = |extra: &[&str], needle: &str| {
        let mut args = vec!["sample", "--n", "1", "--steps", "1"];
        args.extend(extra);
        fails(&args, needle)
    };
    quick_fails(&["--out", &path("s.gif")], "not .gif");
    let folder = path("folder");
    std::fs::create_dir(&folder).unwrap();
    quick_fails(&["--out", &folder], "is a folder");
    quick_fails(
        &["--out", &path("t.png"), "--trajectory", &folder],
        "is a folder",
    );
    assert_eq!(temporaries_in(tmp.path()), Vec::<String>::new());
    assert_eq!(names_in(Path::new(&folder)), Vec::<String>::new());
    // The CLI's guidance bound is the server's.
    quick_fails(&["--guidance", "1e30"], "between 0 and 100");
    // The server does not echo a 309-digit number.
    let (_, meta) = embedded();
    let cfg: diffuse::model::ModelConfig = serde_json::from_str(&meta["diffuse.config"]).unwrap();
    let limits = diffuse::serve::api::Limits {
        max_n: 4,
        max_steps: 1000,
        max_body_bytes: 4096,
        timeout_s: 10,
    };
    for body in [r#"{"guidance": 1e308}"#, r#"{"eta": -1e300}"#] {
        let req: diffuse::serve::api::GenerateRequest = serde_json::from_str(body).unwrap();
        let e = diffuse::serve::api::validate(&req, &cfg, 1000, &limits, 0).unwrap_err();
        assert!(e.len() < 80 && e.contains("e30"), "{e}");
    }
}
