//! Files that survive kills and full disks: atomic writes (a temporary file in the same
//! folder, then a rename) that never leave the temporary behind, the removal of temporaries a
//! killed process left, one writer per run folder (an advisory `flock`), and I/O errors in a
//! user's words.

use anyhow::{Result, anyhow, bail};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// An I/O error in a user's words ("permission denied", "no space left on device"), without
/// the OS error number.
pub fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied => "permission denied".into(),
        ErrorKind::NotFound => "no such file or folder".into(),
        ErrorKind::IsADirectory => "it is a folder".into(),
        ErrorKind::NotADirectory => "a part of the path is not a folder".into(),
        ErrorKind::StorageFull => "no space left on device".into(),
        ErrorKind::FileTooLarge => "file too large".into(),
        ErrorKind::ReadOnlyFilesystem => "read-only file system".into(),
        _ => {
            let s = e.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_lowercase(),
                None => s,
            }
        }
    }
}

/// An error saying that a file or folder the user named does not exist: `message` as an I/O
/// error of kind `NotFound`, so that a front end can tell it from other errors (the Python
/// package raises `FileNotFoundError` for it).
pub fn not_found(message: String) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::new(std::io::ErrorKind::NotFound, message))
}

/// The temporary `path` is written to before the rename: `.NAME.tmpPID` beside it.
fn temp_path(path: &Path, file_name: &str) -> PathBuf {
    path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed to disk,
/// then a rename, so a kill leaves the old file or the new one, never half of one. On any
/// failure (a full disk, a folder in the way) the temporary is removed and the error names
/// `path`; what was at `path` before is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.is_dir() {
        bail!(
            "cannot write {}: it is a folder (give a file name)",
            path.display()
        );
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d)
            .map_err(|e| anyhow!("cannot create folder {}: {}", d.display(), io_reason(&e)))?;
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let tmp = temp_path(path, &file_name);
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {}", path.display(), io_reason(&e));
    }
    Ok(())
}

/// The pid in a temporary's name: `.NAME.tmpPID` (a file of [`write_atomic`]) or
/// `.NAME.downloadPID` (a scratch folder of the download cache).
fn temp_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix('.')?;
    let pid = [".tmp", ".download"]
        .iter()
        .find_map(|m| rest.rsplit_once(m).map(|(_, pid)| pid))?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// True when a process with this pid exists (it may belong to another user).
fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temporaries in `dir` whose writer is no longer running (a kill during a
/// write or a download): the files of [`write_atomic`] and the cache's scratch folders.
/// Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let me = std::process::id() as i32;
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(temp_owner) else {
            continue;
        };
        if pid == me || pid <= 0 || process_alive(pid) {
            continue;
        }
        let gone = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(e.path()).is_ok(),
            Ok(t) if t.is_file() => std::fs::remove_file(e.path()).is_ok(),
            _ => false,
        };
        removed += gone as usize;
    }
    removed
}

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".diffuse.lock";

/// One writer per run folder: an exclusive advisory lock (`flock`) on `DIR/.diffuse.lock`,
/// held for as long as this value lives. The kernel drops it when the holder exits, however
/// it exits, so the lock a killed process leaves never blocks; the file holds the holder's
/// pid for the message a second writer gets. Within one process the lock is shared: taking
/// it again (the CLI, then the library's training loop) returns the lock already held.
/// A folder the lock created is removed again when the last holder lets go and nothing but
/// the lock file is in it (a command that failed before writing anything leaves no trace).
#[derive(Debug)]
pub struct RunLock {
    _held: Arc<HeldLock>,
}

/// The open lock file, and the folder when taking the lock created it.
#[derive(Debug)]
struct HeldLock {
    _file: File,
    created: Option<PathBuf>,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else { return };
        let only_lock = std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| e.file_name().to_str() == Some(LOCK_FILE))
        });
        if only_lock {
            let _ = std::fs::remove_file(dir.join(LOCK_FILE));
            // Fails harmlessly if another process put something there meanwhile.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The run folders this process holds, by canonical path.
static HELD: Mutex<Vec<(PathBuf, Weak<HeldLock>)>> = Mutex::new(Vec::new());

impl RunLock {
    /// Takes the lock of `dir` (created if missing), or fails at once naming the pid that
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let existed = dir.exists();
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow!("cannot create folder {}: {}", dir.display(), io_reason(&e)))?;
        let key = dir
            .canonicalize()
            .map_err(|e| anyhow!("cannot open folder {}: {}", dir.display(), io_reason(&e)))?;
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(_, f)| f.strong_count() > 0);
        if let Some(f) = held
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, f)| f.upgrade())
        {
            return Ok(Self { _held: f });
        }
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow!("cannot open {}: {}", path.display(), io_reason(&e)))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                };
                bail!(
                    "{} is in use: {who} is writing to it (one run per folder); wait for it to finish or give another --out",
                    dir.display()
                );
            }
            bail!("cannot lock {}: {}", path.display(), io_reason(&e));
        }
        let _ = file.set_len(0);
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        let held_lock = Arc::new(HeldLock {
            _file: file,
            created: (!existed).then(|| key.clone()),
        });
        held.push((key, Arc::downgrade(&held_lock)));
        Ok(Self { _held: held_lock })
    }
}
