//! Reliability and security of the filesystem itself (issue 8): crash consistency under
//! `kill -9`, faults from the layers (ENOSPC, EACCES, a dead layer), a seeded concurrent stress
//! run checked against a model and against the kernel's overlayfs, escape attempts through
//! symlinks and crafted markers, and bounded property tests of the pure parsers (the same
//! properties as the cargo-fuzz targets in `fuzz/`).
//!
//! Every test that mounts holds `serial()` (timing-sensitive tests must not share the two
//! cores with each other), owns its mounts through guards that unmount on drop (also on
//! panic), and prints its seed: rerun with `STRATAFS_SEED=N` to replay it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_stratafs");

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn seed(what: &str) -> u64 {
    let s = std::env::var("STRATAFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            // Fixed per test, so CI runs the same operations every time; set STRATAFS_SEED
            // (e.g. to the clock) to explore others.
            what.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        });
    println!("{what}: seed {s} (replay with STRATAFS_SEED={s})");
    s
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn ename(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ESTALE => "ESTALE",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EXDEV => "EXDEV",
        libc::EBUSY => "EBUSY",
        libc::ENODATA => "ENODATA",
        libc::EMLINK => "EMLINK",
        libc::ELOOP => "ELOOP",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("stratafs-rel-")
        .tempdir()
        .expect("tempdir")
}

fn mkdirs(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

/// The pid of the daemon serving `mnt` (the `-f` re-exec whose arguments name it).
/// `ROOT/{l,u,w}` made, and the mountpoint path `ROOT/mnt` (made too), for one mount.
fn overlay_dirs(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let [l, u, w, mnt] = ["l", "u", "w", "mnt"].map(|n| root.join(n));
    for d in [&l, &u, &w, &mnt] {
        mkdirs(d);
    }
    (l, u, w, mnt)
}

/// The `-o` options of an overlay over `overlay_dirs`' l, u and w.
fn overlay_opts(l: &Path, u: &Path, w: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        l.display(),
        u.display(),
        w.display()
    )
}

fn daemon_pid(mnt: &Path) -> Option<i32> {
    let want = mnt.as_os_str().as_bytes();
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"stratafs"))
            && args.contains(&want)
            && args.contains(&&b"-f"[..])
            && alive(pid)
        {
            return Some(pid);
        }
    }
    None
}

/// Running (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Exited for good: gone, or a zombie whose other threads have all exited too. A zombie
/// thread-group leader alone is not enough: the leader turns zombie as soon as it has exited
/// itself, while the process's other threads (the ring threads, in their io_uring teardown)
/// may still be exiting and still hold the process's fds; the fds close only when the last
/// thread has gone. `Threads:` counts the threads not yet released, the leader included.
fn exited(pid: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    field("State:").is_some_and(|s| s.starts_with('Z'))
        && field("Threads:").is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n <= 1))
}

fn kill9(pid: i32) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill -9 {pid}");
    let t = Instant::now();
    while !exited(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pid {pid} survives kill -9"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn rss_kib(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Aborts the FUSE connection of the mount at `mnt` (unblocks everything waiting on it).
fn abort_fuse(mnt: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_string_lossy();
    for l in info.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() > 4
            && stratafs::options::unescape_mountinfo(f[4]) == want
            && let Some((_, minor)) = f[2].split_once(':')
        {
            let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
        }
    }
}

fn is_mounted(p: &Path) -> bool {
    stratafs::options::is_mount_point(p)
}

/// A stratafs mount, unmounted on drop (aborting the connection first if it hangs).
struct Mount {
    mnt: PathBuf,
}

impl Mount {
    fn new(lowers: &[&Path], upper: Option<(&Path, &Path)>, mnt: &Path, extra: &str) -> Mount {
        Mount::with_env(lowers, upper, mnt, extra, &[])
    }

    /// A mount whose daemon runs with `env` added to its environment.
    fn with_env(
        lowers: &[&Path],
        upper: Option<(&Path, &Path)>,
        mnt: &Path,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Mount {
        let mut o = format!(
            "lowerdir={}",
            lowers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        );
        if let Some((u, w)) = upper {
            o.push_str(&format!(
                ",upperdir={},workdir={}",
                u.display(),
                w.display()
            ));
        }
        if !extra.is_empty() {
            o.push(',');
            o.push_str(extra);
        }
        mkdirs(mnt);
        let out = Command::new(BIN)
            .envs(env.iter().copied())
            .arg("-o")
            .arg(&o)
            .arg(mnt)
            .output()
            .expect("run stratafs");
        assert!(
            out.status.success(),
            "mount -o {o} {} failed: {}",
            mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            mnt: mnt.to_path_buf(),
        }
    }

    fn pid(&self) -> i32 {
        daemon_pid(&self.mnt).expect("the daemon of the mount is running")
    }

    /// `stratafs umount`, which must succeed (also for a mount whose daemon died).
    fn umount(&self) {
        let out = Command::new(BIN)
            .arg("umount")
            .arg(&self.mnt)
            .output()
            .expect("run stratafs umount");
        assert!(
            out.status.success(),
            "stratafs umount {} failed: {}",
            self.mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&self.mnt), "still mounted after umount");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !is_mounted(&self.mnt) {
            return;
        }
        let ok = Command::new(BIN)
            .arg("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            abort_fuse(&self.mnt);
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A kernel mount (overlay, tmpfs), unmounted on drop.
struct SysMount(PathBuf);

impl SysMount {
    fn new(args: &[&str], mnt: &Path) -> io::Result<SysMount> {
        mkdirs(mnt);
        let out = Command::new("mount").args(args).arg(mnt).output()?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(SysMount(mnt.to_path_buf()))
    }
}

impl Drop for SysMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn empty_dir(p: &Path) {
    if p.exists() {
        fs::remove_dir_all(p).unwrap_or_else(|e| panic!("rm -rf {}: {e}", p.display()));
    }
    mkdirs(p);
}

fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
        .map(|e| {
            e.expect("dirent")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A file's digest; big files through `sha256sum` (the test binary is not optimised).
fn file_digest(p: &Path, size: u64) -> String {
    if size > 4 << 20 {
        let out = Command::new("sha256sum")
            .arg(p)
            .output()
            .expect("sha256sum");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    } else {
        sha_hex(&fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
    }
}

/// Everything about a tree that a write could change: type, mode, owner, size, mtime, ctime,
/// content or link target, xattrs. Does not follow symlinks.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let p = root.join(rel);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let mut xs: Vec<String> = xattr::list(&p)
            .map(|l| {
                l.map(|n| {
                    let v = xattr::get(&p, &n).ok().flatten().unwrap_or_default();
                    format!("{}={}", n.to_string_lossy(), hex::encode(v))
                })
                .collect()
            })
            .unwrap_or_default();
        xs.sort();
        let ft = md.file_type();
        let what = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("link {}", fs::read_link(&p).expect("readlink").display())
        } else if ft.is_file() {
            format!("file {}", file_digest(&p, md.len()))
        } else {
            format!("other {:x}", md.rdev())
        };
        out.insert(
            rel.to_path_buf(),
            format!(
                "{what} mode={:o} {}:{} size={} mtime={}.{} ctime={}.{} nlink={} {}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.len(),
                md.mtime(),
                md.mtime_nsec(),
                md.ctime(),
                md.ctime_nsec(),
                md.nlink(),
                xs.join(",")
            ),
        );
        if ft.is_dir() {
            for n in entries(&p) {
                walk(root, &rel.join(n), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn assert_same_snapshot(what: &str, a: &BTreeMap<PathBuf, String>, b: &BTreeMap<PathBuf, String>) {
    if a == b {
        return;
    }
    let mut diff = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w == v => {}
            Some(w) => diff.push(format!("changed {}: {v} -> {w}", k.display())),
            None => diff.push(format!("gone {}: {v}", k.display())),
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            diff.push(format!("new {}: {w}", k.display()));
        }
    }
    diff.truncate(20);
    panic!("{what} changed:\n{}", diff.join("\n"));
}

/// Writes `blocks` MiB of seeded data (each MiB stamped with its index).
fn write_pattern(p: &Path, blocks: u64, rng: &mut StdRng) {
    let mut base = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut base);
    let mut f = File::create(p).expect("create pattern file");
    for i in 0..blocks {
        base[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&base).expect("write pattern");
    }
    f.sync_all().expect("fsync");
}

/// Is the content of `p` exactly the content of `base` followed by `tail`?
fn content_is(p: &Path, base: &Path, tail: &[u8]) -> io::Result<bool> {
    let blen = fs::metadata(base)?.len();
    let mut f = File::open(p)?;
    if f.metadata()?.len() != blen + tail.len() as u64 {
        return Ok(false);
    }
    let mut g = File::open(base)?;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut left = blen;
    while left > 0 {
        let n = left.min(a.len() as u64) as usize;
        f.read_exact(&mut a[..n])?;
        g.read_exact(&mut b[..n])?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    let mut t = Vec::new();
    f.read_to_end(&mut t)?;
    Ok(t == tail)
}

/// Runs `f` on a thread; fails the test if it does not finish within `limit` (a deadlock),
/// after aborting the FUSE connection of `mnt` so nothing stays blocked.
fn watchdog<T: Send + 'static>(
    what: &str,
    mnt: &Path,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(_) => {
            abort_fuse(mnt);
            panic!("{what}: no progress in {limit:?} (deadlock?); connection aborted");
        }
    }
}

/// Runs an operation as `nobody` (a fresh process): Ok or the errno.
fn as_nobody(op: &str, path: &Path) -> Result<(), i32> {
    let code = r#"
import os, sys
op, p = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        fd = os.open(p, os.O_RDONLY); os.read(fd, 16); os.close(fd)
    elif op == "write":
        fd = os.open(p, os.O_WRONLY); os.close(fd)
    elif op == "list":
        os.listdir(p)
    elif op == "stat":
        os.stat(p)
    elif op == "create":
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.close(fd)
    elif op == "unlink":
        os.unlink(p)
    elif op == "chmod":
        os.chmod(p, 0o777)
    print("ok")
except OSError as e:
    print(e.errno)
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", code, op])
        .arg(path)
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .output()
        .expect("python3 as nobody");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if s == "ok" {
        Ok(())
    } else {
        Err(s.parse().unwrap_or_else(|_| {
            panic!(
                "helper said {s:?} / {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Crash consistency: kill -9 of the daemon in the middle of an operation
// ---------------------------------------------------------------------------------------------

struct Layers {
    _t: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
    workdir: PathBuf,
    mnt: PathBuf,
}

impl Layers {
    fn new() -> Layers {
        let t = tmpdir();
        let l = Layers {
            lower: t.path().join("lower"),
            upper: t.path().join("upper"),
            workdir: t.path().join("work"),
            mnt: t.path().join("mnt"),
            _t: t,
        };
        for p in [&l.lower, &l.upper, &l.workdir, &l.mnt] {
            mkdirs(p);
        }
        l
    }

    fn reset_upper(&self) {
        empty_dir(&self.upper);
        empty_dir(&self.workdir);
    }

    fn mount(&self) -> Mount {
        Mount::new(
            &[&self.lower],
            Some((&self.upper, &self.workdir)),
            &self.mnt,
            "",
        )
    }

    fn work_entries(&self) -> Vec<String> {
        entries(&self.workdir.join("work"))
    }
}

/// One crash case: `setup` runs on a fresh mount, then `op` (a sequence of `steps` atomic
/// steps) on a thread, and the daemon is killed after a seeded delay. After umount (of the
/// dead mount) and remount, `check` must find a state where some prefix of the steps is done
/// and returns how many; an `op` that returned success must be entirely visible.
struct CrashCase<'a> {
    name: &'a str,
    kills: usize,
    steps: usize,
    setup: &'a dyn Fn(&Layers),
    op: fn(PathBuf) -> io::Result<()>,
    check: &'a dyn Fn(&Layers) -> Result<usize, String>,
}

#[derive(Default, Debug)]
struct CrashStats {
    kills: usize,
    /// The operation was still running at the kill (it failed).
    in_flight: usize,
    /// ...and left a half-built object in workdir/work (cleaned at the remount).
    work_leftovers: usize,
    /// Killed in the middle of a multi-step operation (some steps done, not all).
    partial: usize,
    /// The operation had finished before the kill.
    finished: usize,
}

fn run_crash_case(l: &Layers, c: &CrashCase<'_>, rng: &mut StdRng) -> CrashStats {
    let lower_before = snapshot(&l.lower);
    // An uninterrupted run: how long the operation takes, and that it ends in the new state.
    l.reset_upper();
    let m = l.mount();
    (c.setup)(l);
    let t = Instant::now();
    let mnt = l.mnt.clone();
    let op = c.op;
    watchdog(c.name, &l.mnt, Duration::from_secs(120), move || op(mnt))
        .unwrap_or_else(|e| panic!("{}: uninterrupted run failed: {e}", c.name));
    let window = t.elapsed();
    m.umount();
    drop(m);
    let m = l.mount();
    assert_eq!(
        (c.check)(l).unwrap_or_else(|e| panic!("{}: uninterrupted run: {e}", c.name)),
        c.steps,
        "{}: uninterrupted run not in the new state",
        c.name
    );
    m.umount();
    drop(m);
    println!("{}: one uninterrupted run takes {window:?}", c.name);

    let mut stats = CrashStats::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    for k in 0..c.kills {
        if Instant::now() > deadline {
            println!("{}: time budget spent after {k} kills", c.name);
            break;
        }
        l.reset_upper();
        let m = l.mount();
        (c.setup)(l);
        let pid = m.pid();
        // Log-uniform from 1 ms: short operations get kill points too.
        let ms = window.as_secs_f64() * 1e3 * 1.1;
        let delay = Duration::from_secs_f64(ms.max(2.0).powf(rng.random_range(0.0..1.0)) / 1e3);
        let (tx, rx) = mpsc::channel();
        let mnt = l.mnt.clone();
        let op = c.op;
        let h = thread::spawn(move || {
            let _ = tx.send(op(mnt));
        });
        thread::sleep(delay);
        kill9(pid);
        let res = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{}: the operation hangs after the kill", c.name));
        h.join().expect("op thread");
        m.umount();
        drop(m);
        let left = l
            .work_entries()
            .iter()
            .filter(|n| *n != "#whiteout")
            .count();
        let m = l.mount();
        let work = l.work_entries();
        assert!(
            work.is_empty(),
            "{}: workdir/work not emptied at mount: {work:?}",
            c.name
        );
        let done = (c.check)(l).unwrap_or_else(|e| {
            panic!(
                "{}: kill {k} after {delay:?} (op {res:?}): inconsistent state: {e}",
                c.name
            )
        });
        if res.is_ok() {
            assert_eq!(
                done, c.steps,
                "{}: the operation returned success but is not all visible after the crash",
                c.name
            );
        }
        stats.kills += 1;
        if res.is_ok() {
            stats.finished += 1;
        } else {
            stats.in_flight += 1;
        }
        if done > 0 && done < c.steps {
            stats.partial += 1;
        }
        if left > 0 {
            stats.work_leftovers += 1;
        }
        println!(
            "{}: kill {k} after {delay:?}: {done}/{} steps done, {left} leftovers in work, op {}",
            c.name,
            c.steps,
            match &res {
                Ok(()) => "finished".to_string(),
                Err(e) => format!("failed ({e})"),
            }
        );
        m.umount();
        drop(m);
        assert_same_snapshot(
            &format!("{}: lower layer", c.name),
            &lower_before,
            &snapshot(&l.lower),
        );
    }
    println!("{}: {stats:?}", c.name);
    assert!(stats.kills > 0, "{}: no kill point tried", c.name);
    stats
}

const TAIL: &[u8] = b"APPENDED\n";

/// Drops one file's pages from the page cache (so its copy reads the disk and takes time).
fn drop_cache(p: &Path) {
    let st = Command::new("dd")
        .arg(format!("if={}", p.display()))
        .args(["of=/dev/null", "iflag=nocache", "count=0", "status=none"])
        .status()
        .expect("dd");
    assert!(st.success());
}
const BIG_MIB: u64 = 256;

fn append_tail(mnt: PathBuf) -> io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(mnt.join("big"))?;
    f.write_all(TAIL)
}

fn metacopy_mark(p: &Path) -> bool {
    xattr::get(p, "trusted.overlay.metacopy")
        .ok()
        .flatten()
        .is_some()
        || xattr::get(p, "user.overlay.metacopy")
            .ok()
            .flatten()
            .is_some()
}

/// Old (lower) or new (lower + TAIL) content through the mount; the upper copy, if any, is
/// complete: old, new, or a metacopy file (reads go below).
fn check_big(l: &Layers) -> Result<usize, String> {
    let lower = l.lower.join("big");
    let merged = l.mnt.join("big");
    let upper = l.upper.join("big");
    let e = |e: io::Error| e.to_string();
    let new = if content_is(&merged, &lower, TAIL).map_err(e)? {
        1
    } else if content_is(&merged, &lower, b"").map_err(e)? {
        0
    } else {
        return Err(format!(
            "merged big is neither old nor new (size {:?})",
            fs::metadata(&merged).map(|m| m.len())
        ));
    };
    if upper.exists() {
        if metacopy_mark(&upper) {
            if new == 1 {
                return Err("metacopy upper file but the merged view shows new data".into());
            }
            let ul = fs::metadata(&upper).map_err(e)?.len();
            if ul != fs::metadata(&lower).map_err(e)?.len() {
                return Err(format!("metacopy upper file of size {ul}"));
            }
        } else {
            let up_new = content_is(&upper, &lower, TAIL).map_err(e)?;
            let up_old = !up_new && content_is(&upper, &lower, b"").map_err(e)?;
            if !(up_new || up_old) {
                return Err(format!(
                    "partial file in the upper layer: size {:?}",
                    fs::metadata(&upper).map(|m| m.len())
                ));
            }
            if up_new != (new == 1) {
                return Err("upper and merged view disagree".into());
            }
        }
    } else if new == 1 {
        return Err("new data visible but no upper file".into());
    }
    Ok(new)
}

#[test]
fn crash_copy_up_of_a_large_file() {
    let _s = serial();
    let mut rng = StdRng::seed_from_u64(seed("crash_copy_up_of_a_large_file"));
    let l = Layers::new();
    write_pattern(&l.lower.join("big"), BIG_MIB, &mut rng);
    let check = |l: &Layers| check_big(l);
    let setup = |l: &Layers| drop_cache(&l.lower.join("big"));
    run_crash_case(
        &l,
        &CrashCase {
            name: "copy-up by append (256 MiB)",
            kills: 8,
            steps: 1,
            setup: &setup,
            op: append_tail,
            check: &check,
        },
        &mut rng,
    );
}

#[test]
fn crash_metacopy_chmod_then_data_fill() {
    let _s = serial();
    let mut rng = StdRng::seed_from_u64(seed("crash_metacopy_chmod_then_data_fill"));
    let l = Layers::new();
    write_pattern(&l.lower.join("big"), BIG_MIB, &mut rng);
    fs::set_permissions(l.lower.join("big"), fs::Permissions::from_mode(0o644)).unwrap();
    // The chmod (metadata-only copy-up) is done before the kill; the append that follows fills
    // the data in place, and the mark is dropped last.
    let setup = |l: &Layers| {
        fs::set_permissions(l.mnt.join("big"), fs::Permissions::from_mode(0o640))
            .expect("chmod through the mount");
        drop_cache(&l.lower.join("big"));
    };
    let check = |l: &Layers| {
        let mode = fs::metadata(l.mnt.join("big"))
            .map_err(|e| e.to_string())?
            .mode()
            & 0o7777;
        if mode != 0o640 {
            return Err(format!("the finished chmod is lost: mode {mode:o}"));
        }
        check_big(l)
    };
    run_crash_case(
        &l,
        &CrashCase {
            name: "metacopy data fill by append (256 MiB)",
            kills: 8,
            steps: 1,
            setup: &setup,
            op: append_tail,
            check: &check,
        },
        &mut rng,
    );
}

const META_FILES: usize = 300;

#[test]
fn crash_chmod_of_many_lower_files() {
    let _s = serial();
    let mut rng = StdRng::seed_from_u64(seed("crash_chmod_of_many_lower_files"));
    let l = Layers::new();
    mkdirs(&l.lower.join("meta"));
    for i in 0..META_FILES {
        let mut data = vec![0u8; 8192 + i];
        rng.fill_bytes(&mut data);
        let p = l.lower.join(format!("meta/f{i:04}"));
        fs::write(&p, &data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    fn op(mnt: PathBuf) -> io::Result<()> {
        for i in 0..META_FILES {
            fs::set_permissions(
                mnt.join(format!("meta/f{i:04}")),
                fs::Permissions::from_mode(0o600),
            )?;
        }
        Ok(())
    }
    let check = |l: &Layers| {
        let mut done = 0;
        let mut seen_old = false;
        for i in 0..META_FILES {
            let name = format!("meta/f{i:04}");
            let merged = l.mnt.join(&name);
            let md = fs::metadata(&merged).map_err(|e| format!("{name}: {e}"))?;
            match md.mode() & 0o7777 {
                0o600 if seen_old => return Err(format!("{name} changed after an unchanged one")),
                0o600 => done += 1,
                0o644 => seen_old = true,
                m => return Err(format!("{name}: mode {m:o}")),
            }
            let lower = l.lower.join(&name);
            if fs::read(&merged).map_err(|e| e.to_string())? != fs::read(&lower).unwrap() {
                return Err(format!("{name}: content differs from the lower file"));
            }
            let upper = l.upper.join(&name);
            if upper.exists() {
                let ul = fs::metadata(&upper).unwrap().len();
                if ul != md.len() {
                    return Err(format!("{name}: upper copy of size {ul}"));
                }
                if !metacopy_mark(&upper) && fs::read(&upper).unwrap() != fs::read(&lower).unwrap()
                {
                    return Err(format!("{name}: partial data in the upper copy"));
                }
            }
        }
        Ok(done)
    };
    run_crash_case(
        &l,
        &CrashCase {
            name: "chmod (metacopy) of 300 lower files",
            kills: 8,
            steps: META_FILES,
            setup: &|_| {},
            op,
            check: &check,
        },
        &mut rng,
    );
}

const RENAME_DIRS: usize = 30;

/// Does `dir` (through the mount) hold exactly the tree `model` (in the lower layer)?
fn same_tree(dir: &Path, model: &Path) -> Result<(), String> {
    let (a, b) = (entries(dir), entries(model));
    if a != b {
        return Err(format!("{}: entries {a:?}, expected {b:?}", dir.display()));
    }
    for n in a {
        let (p, q) = (dir.join(&n), model.join(&n));
        let md = fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if md.is_dir() {
            same_tree(&p, &q)?;
        } else if fs::read(&p).map_err(|e| e.to_string())? != fs::read(&q).unwrap() {
            return Err(format!("{}: content differs", p.display()));
        }
    }
    Ok(())
}

#[test]
fn crash_rename_of_lower_dirs() {
    let _s = serial();
    let mut rng = StdRng::seed_from_u64(seed("crash_rename_of_lower_dirs"));
    let l = Layers::new();
    for i in 0..RENAME_DIRS {
        let d = l.lower.join(format!("dirs/d{i:02}"));
        mkdirs(&d.join("sub"));
        for j in 0..10 {
            fs::write(
                d.join(format!("f{j}")),
                format!("d{i} f{j} {}", rng.random::<u64>()),
            )
            .unwrap();
        }
        for j in 0..3 {
            fs::write(d.join(format!("sub/s{j}")), format!("d{i} s{j}")).unwrap();
        }
    }
    fn op(mnt: PathBuf) -> io::Result<()> {
        for i in 0..RENAME_DIRS {
            fs::rename(
                mnt.join(format!("dirs/d{i:02}")),
                mnt.join(format!("dirs/e{i:02}")),
            )?;
        }
        Ok(())
    }
    let check = |l: &Layers| -> Result<usize, String> {
        let mut done = 0;
        let mut seen_old = false;
        let names = entries(&l.mnt.join("dirs"));
        if names.len() != RENAME_DIRS {
            return Err(format!("{} entries in dirs: {names:?}", names.len()));
        }
        for i in 0..RENAME_DIRS {
            let (d, e) = (format!("d{i:02}"), format!("e{i:02}"));
            let model = l.lower.join("dirs").join(&d);
            match (names.contains(&d), names.contains(&e)) {
                (true, false) => {
                    seen_old = true;
                    same_tree(&l.mnt.join("dirs").join(&d), &model)?;
                }
                (false, true) => {
                    if seen_old {
                        return Err(format!("{e} renamed after an unrenamed one"));
                    }
                    done += 1;
                    same_tree(&l.mnt.join("dirs").join(&e), &model)?;
                }
                x => return Err(format!("{d}/{e}: present {x:?}")),
            }
        }
        // The rest of the renames still work on this state.
        for i in done..RENAME_DIRS {
            let dirs = l.mnt.join("dirs");
            fs::rename(dirs.join(format!("d{i:02}")), dirs.join(format!("e{i:02}")))
                .map_err(|e| format!("finishing the renames after the crash: {e}"))?;
        }
        for i in 0..RENAME_DIRS {
            same_tree(
                &l.mnt.join(format!("dirs/e{i:02}")),
                &l.lower.join(format!("dirs/d{i:02}")),
            )?;
        }
        Ok(done)
    };
    run_crash_case(
        &l,
        &CrashCase {
            name: "rename of 30 lower dirs",
            kills: 8,
            steps: RENAME_DIRS,
            setup: &|_| {},
            op,
            check: &check,
        },
        &mut rng,
    );
}

const DEL_DIRS: usize = 8;
const DEL_FILES: usize = 150;

#[test]
fn crash_rm_rf_of_lower_tree() {
    let _s = serial();
    let mut rng = StdRng::seed_from_u64(seed("crash_rm_rf_of_lower_tree"));
    let l = Layers::new();
    for i in 0..DEL_DIRS {
        let d = l.lower.join(format!("del/s{i}"));
        mkdirs(&d);
        for j in 0..DEL_FILES {
            fs::write(d.join(format!("f{j:03}")), format!("s{i}/f{j:03}")).unwrap();
        }
    }
    fn op(mnt: PathBuf) -> io::Result<()> {
        fs::remove_dir_all(mnt.join("del"))
    }
    let total = DEL_DIRS * DEL_FILES + DEL_DIRS + 1;
    let check = move |l: &Layers| -> Result<usize, String> {
        let del = l.mnt.join("del");
        let mut present = 0;
        if del.exists() {
            present += 1;
            for s in entries(&del) {
                let Some(i) = s.strip_prefix('s').and_then(|i| i.parse::<usize>().ok()) else {
                    return Err(format!("unexpected name del/{s}"));
                };
                if i >= DEL_DIRS {
                    return Err(format!("unexpected name del/{s}"));
                }
                present += 1;
                for f in entries(&del.join(&s)) {
                    let p = del.join(&s).join(&f);
                    let data = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    if data != format!("{s}/{f}").as_bytes() {
                        return Err(format!("{}: wrong content", p.display()));
                    }
                    present += 1;
                }
            }
        }
        // And the removal can be finished.
        if del.exists() {
            fs::remove_dir_all(&del).map_err(|e| format!("finishing rm -rf: {e}"))?;
        }
        if del.exists() {
            return Err("del still there after rm -rf".into());
        }
        Ok(total - present)
    };
    run_crash_case(
        &l,
        &CrashCase {
            name: "rm -rf of 1200 lower files",
            kills: 8,
            steps: total,
            setup: &|_| {},
            op,
            check: &check,
        },
        &mut rng,
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Faults from the layers
// ---------------------------------------------------------------------------------------------

fn expect_errno<T: std::fmt::Debug>(what: &str, r: io::Result<T>, want: &[i32]) -> i32 {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {:?}", names(want)),
        Err(e) => {
            let n = errno_of(&e);
            assert!(
                want.contains(&n),
                "{what}: {e} ({}), expected {:?}",
                ename(n),
                names(want)
            );
            n
        }
    }
}

fn names(v: &[i32]) -> Vec<String> {
    v.iter().map(|e| ename(*e)).collect()
}

fn assert_alive(m: &Mount, pid: i32, after: &str) {
    assert!(alive(pid), "the daemon died after {after}");
    assert_eq!(m.pid(), pid, "the daemon was replaced after {after}");
}

/// Number of entries of a tmpfs-backed dir tree (to tell an upper leak).
fn upper_names(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(p: &Path, rel: &str, out: &mut Vec<String>) {
        for n in entries(p) {
            let r = format!("{rel}{n}");
            let q = p.join(&n);
            if fs::symlink_metadata(&q).is_ok_and(|m| m.is_dir()) {
                walk(&q, &format!("{r}/"), out);
            }
            out.push(r);
        }
    }
    walk(p, "", &mut out);
    out.sort();
    out
}

#[test]
fn faults_enospc_in_a_full_upper() {
    let _s = serial();
    let mut rng = StdRng::seed_from_u64(seed("faults_enospc_in_a_full_upper"));
    let t = tmpdir();
    let lower = t.path().join("lower");
    mkdirs(&lower.join("sub"));
    write_pattern(&lower.join("big"), 12, &mut rng);
    fs::write(lower.join("small"), b"small lower file").unwrap();
    fs::write(lower.join("sub/x"), b"x").unwrap();
    let lower_before = snapshot(&lower);
    let small = t.path().join("small");
    let fs_guard = SysMount::new(
        &["-t", "tmpfs", "-o", "size=16m,nr_inodes=64", "tmpfs"],
        &small,
    )
    .expect("mount a 16 MiB tmpfs");
    let (upper, work, mnt) = (
        small.join("upper"),
        small.join("work"),
        t.path().join("mnt"),
    );
    mkdirs(&upper);
    mkdirs(&work);
    // Existing upper content: a file to keep and a filler that leaves < 12 MiB free.
    let mut keep = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut keep);
    fs::write(upper.join("keep"), &keep).unwrap();
    write_pattern(&upper.join("filler"), 8, &mut rng);
    let m = Mount::new(&[&lower], Some((&upper, &work)), &mnt, "");
    let pid = m.pid();
    let upper_before = upper_names(&upper);
    let check_intact = |what: &str| {
        assert_eq!(
            fs::read(mnt.join("keep")).unwrap(),
            keep,
            "{what}: upper file through the mount"
        );
        assert_eq!(
            fs::read(upper.join("keep")).unwrap(),
            keep,
            "{what}: upper file on disk"
        );
        assert!(
            content_is(&mnt.join("big"), &lower.join("big"), b"").unwrap(),
            "{what}: big through the mount"
        );
        assert!(
            entries(&work.join("work")).iter().all(|n| n == "#whiteout"),
            "{what}: leftovers in workdir/work: {:?}",
            entries(&work.join("work"))
        );
        assert_same_snapshot(what, &lower_before, &snapshot(&lower));
        assert_alive(&m, pid, what);
    };

    // Copy-up of a 12 MiB file into ~7 MiB.
    expect_errno(
        "append to a lower file bigger than the free space",
        OpenOptions::new().append(true).open(mnt.join("big")),
        &[libc::ENOSPC],
    );
    check_intact("failed copy-up");
    assert_eq!(
        upper_names(&upper),
        upper_before,
        "a partial copy-up is left in the upper layer"
    );

    // Metadata-only copy-up works (no data), and the data fill then fails cleanly.
    fs::set_permissions(mnt.join("big"), fs::Permissions::from_mode(0o640))
        .expect("chmod (metacopy) in a full upper");
    let r = OpenOptions::new()
        .append(true)
        .open(mnt.join("big"))
        .and_then(|mut f| f.write_all(TAIL));
    expect_errno("data fill of a metacopy file", r, &[libc::ENOSPC]);
    check_intact("failed metacopy fill");
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().mode() & 0o777, 0o640);

    // A plain write of a new file runs out of space: ENOSPC, and what was accepted is there.
    let mut f = File::create(mnt.join("new")).expect("create");
    let chunk = vec![7u8; 64 << 10];
    let mut written = 0u64;
    let err = loop {
        match f.write(&chunk) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "wrote 64 MiB into a 16 MiB tmpfs");
    };
    assert_eq!(
        errno_of(&err),
        libc::ENOSPC,
        "write into a full upper: {err}"
    );
    drop(f);
    let size = fs::metadata(mnt.join("new")).unwrap().len();
    assert_eq!(size, written, "size of a file written to ENOSPC");
    assert!(fs::read(mnt.join("new")).unwrap().iter().all(|b| *b == 7));
    check_intact("write to ENOSPC");
    fs::remove_file(mnt.join("new")).expect("unlink the partial new file");

    // Creates until the inodes run out: ENOSPC, never anything else.
    mkdirs(&mnt.join("many"));
    let mut made = 0;
    let err = loop {
        match File::create(mnt.join(format!("many/c{made}"))) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 1000, "created 1000 files in a 64-inode tmpfs");
    };
    assert_eq!(
        errno_of(&err),
        libc::ENOSPC,
        "create with no inodes left: {err}"
    );
    // A delete that needs a new upper directory (copy-up of sub) fails too, and changes nothing.
    let r = fs::remove_file(mnt.join("sub/x"));
    if let Err(e) = &r {
        assert_eq!(
            errno_of(e),
            libc::ENOSPC,
            "whiteout with no inodes left: {e}"
        );
        assert_eq!(fs::read(mnt.join("sub/x")).unwrap(), b"x");
        assert!(
            !upper.join("sub").exists(),
            "a partial copy-up of sub is left"
        );
    }
    check_intact("create to ENOSPC");
    println!(
        "enospc: {written} bytes written, {made} files created before ENOSPC; delete needing a copy-up: {r:?}"
    );

    // Space freed: everything works again.
    fs::remove_dir_all(mnt.join("many")).expect("rm -rf many");
    fs::remove_file(mnt.join("filler")).expect("unlink filler");
    let mut f = OpenOptions::new()
        .append(true)
        .open(mnt.join("big"))
        .expect("copy-up after space was freed");
    f.write_all(TAIL).expect("append after space was freed");
    drop(f);
    assert!(content_is(&mnt.join("big"), &lower.join("big"), TAIL).unwrap());
    assert!(
        !metacopy_mark(&upper.join("big")),
        "metacopy mark left after the fill"
    );
    fs::write(mnt.join("new2"), b"works").expect("create after space was freed");
    if r.is_err() {
        fs::remove_file(mnt.join("sub/x")).expect("delete after space was freed");
    }
    assert!(!mnt.join("sub/x").exists());
    assert_eq!(fs::read(mnt.join("keep")).unwrap(), keep);
    assert_alive(&m, pid, "ENOSPC cases");
    m.umount();
    drop(m);
    assert!(content_is(&upper.join("big"), &lower.join("big"), TAIL).unwrap());
    drop(fs_guard);
}

/// Clears the immutable flag on drop.
struct Immutable(PathBuf);

impl Immutable {
    fn set(p: &Path) -> Immutable {
        let st = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .status()
            .expect("chattr");
        assert!(st.success(), "chattr +i {}", p.display());
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn faults_errors_from_layers_reach_the_caller() {
    let _s = serial();
    let t = tmpdir();
    let (lower, upper, work, mnt) = overlay_dirs(t.path());
    // Traversable for nobody.
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // A lower file mode 000 owned by another user; a lower dir only its owner may read.
    fs::write(lower.join("secret"), b"secret").unwrap();
    fs::set_permissions(lower.join("secret"), fs::Permissions::from_mode(0o0)).unwrap();
    std::os::unix::fs::chown(lower.join("secret"), Some(1234), Some(1234)).unwrap();
    mkdirs(&lower.join("locked"));
    fs::write(lower.join("locked/f"), b"f").unwrap();
    fs::set_permissions(lower.join("locked"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(lower.join("locked"), Some(1234), Some(1234)).unwrap();
    fs::write(lower.join("root600"), b"root only").unwrap();
    fs::set_permissions(lower.join("root600"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(lower.join("public"), b"public").unwrap();
    fs::set_permissions(lower.join("public"), fs::Permissions::from_mode(0o644)).unwrap();
    // An upper file the upper filesystem refuses to change, even for root.
    fs::write(upper.join("imm"), b"immutable").unwrap();
    let _imm = Immutable::set(&upper.join("imm"));
    let lower_before = snapshot(&lower);

    let m = Mount::new(&[&lower], Some((&upper, &work)), &mnt, "");
    let pid = m.pid();
    let cases: Vec<(&str, &str, Result<(), i32>)> = vec![
        ("read", "secret", Err(libc::EACCES)),
        ("write", "secret", Err(libc::EACCES)),
        ("list", "locked", Err(libc::EACCES)),
        ("stat", "locked/f", Err(libc::EACCES)),
        ("read", "root600", Err(libc::EACCES)),
        ("write", "public", Err(libc::EACCES)),
        ("chmod", "public", Err(libc::EPERM)),
        ("create", "newfile", Err(libc::EACCES)),
        ("unlink", "public", Err(libc::EACCES)),
        ("read", "public", Ok(())),
    ];
    for (op, name, want) in &cases {
        let got = as_nobody(op, &mnt.join(name));
        assert_eq!(
            got.map_err(ename),
            want.map_err(ename),
            "nobody: {op} {name}"
        );
        assert_alive(&m, pid, &format!("nobody {op} {name}"));
    }
    // Root through the mount: the upper layer's EPERM comes back as EPERM.
    expect_errno(
        "write open of an immutable upper file",
        OpenOptions::new().write(true).open(mnt.join("imm")),
        &[libc::EPERM],
    );
    expect_errno(
        "setxattr on an immutable upper file",
        xattr::set(mnt.join("imm"), "user.x", b"1"),
        &[libc::EPERM],
    );
    expect_errno(
        "unlink of an immutable upper file",
        fs::remove_file(mnt.join("imm")),
        &[libc::EPERM],
    );
    assert_eq!(fs::read(mnt.join("imm")).unwrap(), b"immutable");
    assert_alive(&m, pid, "immutable upper file");
    // Root still reads the mode 000 file (as on the kernel's overlayfs).
    assert_eq!(fs::read(mnt.join("secret")).unwrap(), b"secret");
    m.umount();
    drop(m);
    assert_same_snapshot("lower layer", &lower_before, &snapshot(&lower));
    println!(
        "errors from layers: {} nobody cases + 3 immutable cases",
        cases.len()
    );
}

/// base (the inner mount's lower), inner (its mountpoint, the outer's lower), upper, work, mnt
/// under `root`, for a mount stacked on another; base, upper and work are made.
fn stacked_dirs(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    let [base, inner, upper, work, mnt] =
        ["base", "inner", "upper", "work", "mnt"].map(|n| root.join(n));
    for p in [&base, &upper, &work] {
        mkdirs(p);
    }
    (base, inner, upper, work, mnt)
}

#[test]
fn faults_dead_lower_layer() {
    // The lower layer is itself a FUSE mount whose daemon dies: every access below fails with
    // ENOTCONN. The outer daemon must pass an error on and stay up.
    let _s = serial();
    let t = tmpdir();
    let (base, inner, upper, work, mnt) = stacked_dirs(t.path());
    mkdirs(&base.join("d"));
    fs::write(base.join("seen"), b"seen").unwrap();
    fs::write(base.join("unseen"), b"unseen").unwrap();
    fs::write(base.join("d/f"), b"f").unwrap();
    fs::write(upper.join("up"), b"upper only").unwrap();
    let inner_m = Mount::new(&[&base], None, &inner, "");
    let outer = Mount::new(&[&inner], Some((&upper, &work)), &mnt, "");
    let pid = outer.pid();
    assert_eq!(fs::read(mnt.join("seen")).unwrap(), b"seen");
    kill9(inner_m.pid());
    // ECANCELED: an inner daemon served over io_uring; a request caught in the ring as its
    // threads die is cancelled rather than aborted.
    let layer_errs = [
        libc::ENOTCONN,
        libc::EIO,
        libc::ECONNABORTED,
        libc::ECANCELED,
    ];
    let mut got = BTreeSet::new();
    got.insert(expect_errno(
        "stat of a name not looked up yet",
        fs::metadata(mnt.join("unseen")),
        &layer_errs,
    ));
    got.insert(expect_errno(
        "readdir of a lower dir",
        fs::read_dir(mnt.join("d")).and_then(|mut d| d.next().transpose()),
        &layer_errs,
    ));
    got.insert(expect_errno(
        "copy-up from the dead layer",
        OpenOptions::new().append(true).open(mnt.join("seen")),
        &layer_errs,
    ));
    assert_alive(&outer, pid, "errors from a dead lower layer");
    // What lives in the upper layer alone is still served.
    assert_eq!(
        fs::read(mnt.join("up")).expect("read an upper-only file"),
        b"upper only"
    );
    assert_alive(&outer, pid, "read of an upper file over a dead lower layer");
    println!(
        "dead lower layer: errors {:?}",
        got.iter().map(|e| ename(*e)).collect::<Vec<_>>()
    );
    outer.umount();
    drop(outer);
    // The outer daemon holds the inner mount's root until it has exited.
    let t = Instant::now();
    while !exited(pid) && t.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(10));
    }
    // Under the full parallel suite the inner mount was twice still busy (EBUSY) right after
    // the outer daemon was gone, when "gone" was still read as "its leader is a zombie" (see
    // `exited`). Over a dead lower layer the kernel may also take a moment: give it up to
    // 10 s to let go of the inner mount, then the umount must succeed.
    let t = Instant::now();
    while is_mounted(&inner) && t.elapsed() < Duration::from_secs(10) {
        let out = Command::new(BIN).arg("umount").arg(&inner).output();
        if out.is_ok_and(|o| o.status.success()) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    if is_mounted(&inner) {
        inner_m.umount();
    }
    assert!(!is_mounted(&inner), "the dead inner mount is still mounted");
}

#[test]
fn faults_read_errors_below_reach_the_caller_and_leave_no_half_copy() {
    // The lower layer is itself a (read-only) stratafs mount whose READs of `bad` fail with
    // EIO, as a bad block of a lower disk would. Reads through the outer mount must
    // fail with EIO (never a short or zeroed read), a copy-up that needs the data must fail
    // and leave the upper layer as it was (a metadata-only copy stays metadata-only, reads
    // still going below), and everything else keeps working.
    let _s = serial();
    let t = tmpdir();
    let (base, inner, upper, work, mnt) = stacked_dirs(t.path());
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    for name in ["bad", "good"] {
        fs::write(base.join(name), &data).unwrap();
        fs::set_permissions(base.join(name), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let inner_m = Mount::with_env(
        &[&base],
        None,
        &inner,
        "",
        &[("STRATAFS_FAILPOINT", "eio-read:bad")],
    );
    let outer = Mount::new(&[&inner], Some((&upper, &work)), &mnt, "");
    let pid = outer.pid();
    expect_errno(
        "read through the faulty layer itself",
        fs::read(inner.join("bad")).map(|d| d.len()),
        &[libc::EIO],
    );
    expect_errno(
        "read of a file with a bad block",
        fs::read(mnt.join("bad")).map(|d| d.len()),
        &[libc::EIO],
    );
    assert_eq!(
        fs::read(mnt.join("good")).unwrap(),
        data,
        "a healthy file reads whole"
    );
    // A full copy-up (append) needs the data: it fails, and nothing of it is left.
    expect_errno(
        "copy-up of a file with a bad block",
        OpenOptions::new()
            .append(true)
            .open(mnt.join("bad"))
            .and_then(|mut f| f.write_all(b"x")),
        &[libc::EIO],
    );
    assert!(
        !upper.join("bad").exists(),
        "a failed copy-up left bad in the upper layer"
    );
    let st = fs::metadata(mnt.join("bad")).unwrap();
    assert_eq!((st.len(), st.mode() & 0o7777), (data.len() as u64, 0o644));
    // A metadata-only copy-up needs no data: it works; the first write then needs the data,
    // fails, and leaves the metadata-only copy as it was, reads still going below.
    fs::set_permissions(mnt.join("bad"), fs::Permissions::from_mode(0o600)).unwrap();
    let before = fs::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect::<Vec<_>>();
    expect_errno(
        "first write to a metadata-only copy of a file with a bad block",
        OpenOptions::new()
            .write(true)
            .open(mnt.join("bad"))
            .and_then(|mut f| f.write_all(b"y")),
        &[libc::EIO],
    );
    let st = fs::metadata(mnt.join("bad")).unwrap();
    assert_eq!((st.len(), st.mode() & 0o7777), (data.len() as u64, 0o600));
    expect_errno(
        "read after the failed data copy",
        fs::read(mnt.join("bad")).map(|d| d.len()),
        &[libc::EIO],
    );
    let after = fs::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect::<Vec<_>>();
    assert_eq!(before, after, "the upper layer changed");
    assert_eq!(
        fs::metadata(upper.join("bad")).unwrap().len(),
        data.len() as u64,
        "the metadata-only copy keeps its size"
    );
    let leftovers = fs::read_dir(work.join("work"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "scratch files left in workdir/work");
    // Everything else goes on: a healthy file copies up and takes the write.
    OpenOptions::new()
        .append(true)
        .open(mnt.join("good"))
        .and_then(|mut f| f.write_all(b"z"))
        .expect("append to a healthy lower file");
    assert_eq!(fs::read(mnt.join("good")).unwrap().len(), data.len() + 1);
    assert_alive(&outer, pid, "read errors from a lower layer");
    outer.umount();
    drop(outer);
    let t0 = Instant::now();
    while !exited(pid) && t0.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(10));
    }
    inner_m.umount();
    assert_eq!(
        fs::read(base.join("bad")).unwrap(),
        data,
        "the base layer changed"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Load: seeded concurrent stress against a model, and against the kernel's overlayfs
// ---------------------------------------------------------------------------------------------

const WORKERS: usize = 4;
const ROUNDS: usize = 5;
const OPS_PER_ROUND: usize = 600;

/// A file's data and user xattrs.
type Inode = (Vec<u8>, BTreeMap<String, Vec<u8>>);

/// One worker's subtree: paths (relative, "" is the root) to entries; files share inodes.
#[derive(Clone, Debug, Default)]
struct Model {
    dirs: BTreeSet<String>,
    files: BTreeMap<String, u32>,
    inodes: HashMap<u32, Inode>,
    next: u32,
}

impl Model {
    fn names_of(&self, ino: u32) -> usize {
        self.files.values().filter(|i| **i == ino).count()
    }
    fn join(dir: &str, name: &str) -> String {
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    }
    fn children(&self, dir: &str) -> usize {
        let pre = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let direct = |p: &String| {
            p.starts_with(&pre) && p.len() > pre.len() && !p[pre.len()..].contains('/')
        };
        self.dirs.iter().filter(|p| direct(p)).count()
            + self.files.keys().filter(|p| direct(p)).count()
    }
    fn add_file(&mut self, path: String, data: Vec<u8>) -> u32 {
        self.next += 1;
        self.inodes.insert(self.next, (data, BTreeMap::new()));
        self.files.insert(path, self.next);
        self.next
    }
    fn drop_name(&mut self, path: &str) {
        if let Some(ino) = self.files.remove(path)
            && self.names_of(ino) == 0
        {
            self.inodes.remove(&ino);
        }
    }
}

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> Option<&'a T> {
    if v.is_empty() {
        None
    } else {
        Some(&v[rng.random_range(0..v.len())])
    }
}

fn rand_data(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let mut d = vec![0u8; rng.random_range(0..max)];
    rng.fill_bytes(&mut d);
    d
}

/// The initial tree of worker `w` (deterministic in `seed`), and its layers: each entry goes to
/// the top or the bottom lower layer; some files are shadowed by the top one; one pair of hard
/// links lives in the bottom layer.
fn initial_model(seed: u64, w: usize, l1: &Path, l2: &Path) -> Model {
    let mut rng = StdRng::seed_from_u64(seed ^ (w as u64 * 7919));
    let mut m = Model::default();
    let root = format!("w{w}");
    m.dirs.insert(String::new());
    for d in ["a", "b", "a/c"] {
        m.dirs.insert(d.to_string());
        mkdirs(&l2.join(&root).join(d));
        if rng.random_bool(0.5) {
            mkdirs(&l1.join(&root).join(d));
        }
    }
    for i in 0..12 {
        let dir = *pick(&mut rng, &["", "a", "b", "a/c"]).unwrap();
        let path = Model::join(dir, &format!("l{i}"));
        let data = rand_data(&mut rng, 6000);
        let top = rng.random_bool(0.5);
        let layer = if top { l1 } else { l2 };
        mkdirs(&layer.join(&root).join(dir));
        fs::write(layer.join(&root).join(&path), &data).unwrap();
        if top && rng.random_bool(0.5) {
            fs::write(l2.join(&root).join(&path), b"shadowed").unwrap();
        }
        m.add_file(path, data);
    }
    let data = rand_data(&mut rng, 3000);
    fs::write(l2.join(&root).join("a/h1"), &data).unwrap();
    fs::hard_link(l2.join(&root).join("a/h1"), l2.join(&root).join("b/h2")).unwrap();
    let ino = m.add_file("a/h1".into(), data);
    m.files.insert("b/h2".into(), ino);
    m
}

/// Ok, or the errno; for comparing with the model.
type Outcome = Result<(), i32>;

fn out<T>(r: io::Result<T>) -> Outcome {
    r.map(drop).map_err(|e| errno_of(&e))
}

/// Errors that a race between workers in the shared subtree explains.
const RACE_ERRNOS: &[i32] = &[
    libc::ENOENT,
    libc::EEXIST,
    libc::ENOTEMPTY,
    libc::EISDIR,
    libc::ENOTDIR,
];
/// Errors that must never come from the filesystem.
const BAD_ERRNOS: &[i32] = &[
    libc::EIO,
    libc::ESTALE,
    libc::ENOTCONN,
    libc::ECONNABORTED,
    libc::EBADF,
    libc::EFAULT,
];

struct Worker {
    w: usize,
    rng: StdRng,
    model: Model,
    ops: usize,
    failures: Vec<String>,
    /// The last operations, shown with the first failure.
    hist: Vec<String>,
    /// Errno counts in the shared subtree.
    shared_errs: BTreeMap<i32, usize>,
    /// Errno counts in the own subtree (all predicted by the model).
    own_errs: BTreeMap<i32, usize>,
}

impl Worker {
    fn step(&mut self, mnt: &Path) {
        self.ops += 1;
        if self.rng.random_bool(0.2) {
            self.shared_step(mnt);
            return;
        }
        let root = mnt.join(format!("w{}", self.w));
        let rng = &mut self.rng;
        let m = &mut self.model;
        let files: Vec<String> = m.files.keys().cloned().collect();
        let dirs: Vec<String> = m.dirs.iter().cloned().collect();
        let fresh = |rng: &mut StdRng, m: &Model| {
            let d = pick(rng, &dirs).unwrap().clone();
            Model::join(
                &d,
                &format!("n{}", m.next + 1 + rng.random_range(0..1000u32) * 1000),
            )
        };
        let op = rng.random_range(0..12u32);
        let (desc, want, got): (String, Outcome, Outcome) = match op {
            0 => {
                // create (sometimes over an existing name: EEXIST)
                let (path, exists) = match pick(rng, &files) {
                    Some(f) if rng.random_bool(0.1) => (f.clone(), true),
                    _ => (fresh(rng, m), false),
                };
                if exists || m.dirs.contains(&path) {
                    let got = out(OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(root.join(&path)));
                    (format!("create {path}"), Err(libc::EEXIST), got)
                } else {
                    let data = rand_data(rng, 8192);
                    let got = out(OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(root.join(&path))
                        .and_then(|mut f| f.write_all(&data)));
                    m.add_file(path.clone(), data);
                    (format!("create {path}"), Ok(()), got)
                }
            }
            1 | 2 => {
                let Some(path) = pick(rng, &files).cloned() else {
                    return;
                };
                let ino = m.files[&path];
                if op == 1 {
                    // write at an offset (may extend, leaving a hole)
                    let data = rand_data(rng, 4096);
                    let len = m.inodes[&ino].0.len();
                    let off = rng.random_range(0..=len + 100);
                    let got = out(OpenOptions::new()
                        .write(true)
                        .open(root.join(&path))
                        .and_then(|f| f.write_all_at(&data, off as u64)));
                    let c = &mut m.inodes.get_mut(&ino).unwrap().0;
                    if c.len() < off + data.len() {
                        c.resize(off + data.len(), 0);
                    }
                    c[off..off + data.len()].copy_from_slice(&data);
                    (format!("write {path} at {off}"), Ok(()), got)
                } else {
                    let got = fs::read(root.join(&path));
                    if let Ok(d) = &got
                        && *d != m.inodes[&ino].0
                    {
                        self.failures.push(format!(
                            "w{}: read {path}: {} bytes, model has {}",
                            self.w,
                            d.len(),
                            m.inodes[&ino].0.len()
                        ));
                    }
                    (format!("read {path}"), Ok(()), out(got))
                }
            }
            3 => {
                // rename a file: to a fresh name, or over another file
                let Some(src) = pick(rng, &files).cloned() else {
                    return;
                };
                let dst = match pick(rng, &files) {
                    Some(f) if rng.random_bool(0.4) => f.clone(),
                    _ => fresh(rng, m),
                };
                let got = out(fs::rename(root.join(&src), root.join(&dst)));
                let ino = m.files[&src];
                if m.files.get(&dst) != Some(&ino) {
                    m.drop_name(&dst);
                    m.files.remove(&src);
                    m.files.insert(dst.clone(), ino);
                }
                (format!("rename {src} -> {dst}"), Ok(()), got)
            }
            4 => {
                let Some(path) = pick(rng, &files).cloned() else {
                    return;
                };
                let got = out(fs::remove_file(root.join(&path)));
                m.drop_name(&path);
                (format!("unlink {path}"), Ok(()), got)
            }
            5 => {
                let Some(src) = pick(rng, &files).cloned() else {
                    return;
                };
                let dst = fresh(rng, m);
                let got = out(fs::hard_link(root.join(&src), root.join(&dst)));
                let ino = m.files[&src];
                m.files.insert(dst.clone(), ino);
                (format!("link {src} -> {dst}"), Ok(()), got)
            }
            6 => {
                let Some(path) = pick(rng, &files).cloned() else {
                    return;
                };
                let ino = m.files[&path];
                let len = rng.random_range(0..=m.inodes[&ino].0.len() * 2 + 10);
                let got = out(OpenOptions::new()
                    .write(true)
                    .open(root.join(&path))
                    .and_then(|f| f.set_len(len as u64)));
                m.inodes.get_mut(&ino).unwrap().0.resize(len, 0);
                (format!("truncate {path} to {len}"), Ok(()), got)
            }
            7 => {
                if m.dirs.len() > 14 {
                    return;
                }
                let path = fresh(rng, m);
                let got = out(fs::create_dir(root.join(&path)));
                m.dirs.insert(path.clone());
                (format!("mkdir {path}"), Ok(()), got)
            }
            8 => {
                let cands: Vec<String> = dirs.iter().filter(|d| !d.is_empty()).cloned().collect();
                let Some(path) = pick(rng, &cands).cloned() else {
                    return;
                };
                let got = out(fs::remove_dir(root.join(&path)));
                let want = if m.children(&path) == 0 {
                    m.dirs.remove(&path);
                    Ok(())
                } else {
                    Err(libc::ENOTEMPTY)
                };
                (format!("rmdir {path}"), want, got)
            }
            9 | 10 => {
                let Some(path) = pick(rng, &files).cloned() else {
                    return;
                };
                let ino = m.files[&path];
                let key = format!("user.k{}", rng.random_range(0..3));
                if op == 9 {
                    let v = rand_data(rng, 64);
                    let got = out(xattr::set(root.join(&path), &key, &v));
                    m.inodes.get_mut(&ino).unwrap().1.insert(key.clone(), v);
                    (format!("setxattr {path} {key}"), Ok(()), got)
                } else {
                    let got = xattr::get(root.join(&path), &key);
                    if let Ok(v) = &got
                        && v.as_ref() != m.inodes[&ino].1.get(&key)
                    {
                        self.failures
                            .push(format!("w{}: getxattr {path} {key}: {v:?}", self.w));
                    }
                    (format!("getxattr {path} {key}"), Ok(()), out(got))
                }
            }
            _ => {
                // rename a directory (not the root) to a fresh name outside itself
                let cands: Vec<String> = dirs.iter().filter(|d| !d.is_empty()).cloned().collect();
                let Some(src) = pick(rng, &cands).cloned() else {
                    return;
                };
                let targets: Vec<String> = dirs
                    .iter()
                    .filter(|d| **d != src && !d.starts_with(&format!("{src}/")))
                    .cloned()
                    .collect();
                let Some(td) = pick(rng, &targets).cloned() else {
                    return;
                };
                let dst = Model::join(&td, &format!("r{}", rng.random_range(0..1_000_000u32)));
                let got = out(fs::rename(root.join(&src), root.join(&dst)));
                let moved = |p: &String| -> Option<String> {
                    if *p == src {
                        Some(dst.clone())
                    } else {
                        p.strip_prefix(&format!("{src}/"))
                            .map(|r| format!("{dst}/{r}"))
                    }
                };
                m.dirs = m
                    .dirs
                    .iter()
                    .map(|p| moved(p).unwrap_or_else(|| p.clone()))
                    .collect();
                m.files = m
                    .files
                    .iter()
                    .map(|(p, i)| (moved(p).unwrap_or_else(|| p.clone()), *i))
                    .collect();
                (format!("rename dir {src} -> {dst}"), Ok(()), got)
            }
        };
        if let Err(e) = got {
            *self.own_errs.entry(e).or_default() += 1;
        }
        self.hist.push(format!("{desc}: {:?}", got.map_err(ename)));
        if want != got {
            let ctx = if self.failures.is_empty() {
                let from = self.hist.len().saturating_sub(40);
                format!("\n  after: {}", self.hist[from..].join("\n    "))
            } else {
                String::new()
            };
            self.failures.push(format!(
                "w{}: {desc}: got {:?}, model says {:?}{ctx}",
                self.w,
                got.map_err(ename),
                want.map_err(ename)
            ));
        }
        // Keep the tree bounded: the RSS comparison needs a steady state.
        if self.model.files.len() > 60 {
            let victim = self.model.files.keys().next().unwrap().clone();
            let r = out(fs::remove_file(root.join(&victim)));
            if r.is_err() {
                self.failures
                    .push(format!("w{}: trim unlink {victim}: {r:?}", self.w));
            }
            self.model.drop_name(&victim);
        }
    }

    fn shared_step(&mut self, mnt: &Path) {
        let rng = &mut self.rng;
        let sh = mnt.join("shared");
        let name = |rng: &mut StdRng| {
            let d = *pick(rng, &["", "sd0/", "sd1/", "sd2/"]).unwrap();
            sh.join(format!("{d}s{}", rng.random_range(0..10)))
        };
        let (p, q) = (name(rng), name(rng));
        let data = rand_data(rng, 4096);
        let (desc, r): (&str, Outcome) = match rng.random_range(0..10u32) {
            0 => (
                "create",
                out(OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)
                    .and_then(|mut f| f.write_all(&data))),
            ),
            1 => (
                "write",
                out(OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.write_all_at(&data, 100))),
            ),
            2 => ("read", out(fs::read(&p))),
            3 => ("rename", out(fs::rename(&p, &q))),
            4 => ("unlink", out(fs::remove_file(&p))),
            5 => ("link", out(fs::hard_link(&p, &q))),
            6 => (
                "truncate",
                out(OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(50))),
            ),
            7 => ("mkdir", out(fs::create_dir(&p))),
            8 => ("rmdir", out(fs::remove_dir(&p))),
            _ => (
                "setxattr",
                out(xattr::set(&p, "user.s", &data[..data.len().min(32)])),
            ),
        };
        if let Err(e) = r {
            *self.shared_errs.entry(e).or_default() += 1;
            if BAD_ERRNOS.contains(&e) {
                self.failures.push(format!(
                    "w{}: shared {desc} {}: {}",
                    self.w,
                    p.display(),
                    ename(e)
                ));
            }
        }
    }
}

/// The worker's subtree through the mount equals its model: names, types, contents, xattrs,
/// link counts, and one st_ino per inode.
fn compare_with_model(mnt: &Path, w: usize, m: &Model) -> Vec<String> {
    let root = mnt.join(format!("w{w}"));
    let mut bad = Vec::new();
    let mut seen_dirs = BTreeSet::new();
    let mut seen_files = BTreeMap::new();
    fn walk(
        p: &Path,
        rel: &str,
        d: &mut BTreeSet<String>,
        f: &mut BTreeMap<String, fs::Metadata>,
        bad: &mut Vec<String>,
    ) {
        d.insert(rel.to_string());
        let rd = match fs::read_dir(p) {
            Ok(rd) => rd,
            Err(e) => return bad.push(format!("readdir {}: {e}", p.display())),
        };
        for e in rd {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            let r = Model::join(rel, &n);
            match fs::symlink_metadata(p.join(&n)) {
                Ok(md) if md.is_dir() => walk(&p.join(&n), &r, d, f, bad),
                Ok(md) => {
                    f.insert(r, md);
                }
                Err(e) => bad.push(format!("lstat {r} (listed): {e}")),
            }
        }
    }
    walk(&root, "", &mut seen_dirs, &mut seen_files, &mut bad);
    if seen_dirs != m.dirs {
        let extra: Vec<_> = seen_dirs.difference(&m.dirs).collect();
        let missing: Vec<_> = m.dirs.difference(&seen_dirs).collect();
        bad.push(format!(
            "w{w}: dirs not in the model {extra:?}, missing {missing:?}"
        ));
    }
    let names: BTreeSet<&String> = seen_files.keys().collect();
    let model_names: BTreeSet<&String> = m.files.keys().collect();
    if names != model_names {
        let extra: Vec<_> = names.difference(&model_names).collect();
        let missing: Vec<_> = model_names.difference(&names).collect();
        bad.push(format!(
            "w{w}: files not in the model {extra:?}, missing {missing:?}"
        ));
        return bad;
    }
    let mut ino_of: HashMap<u32, u64> = HashMap::new();
    for (p, md) in &seen_files {
        let ino = m.files[p];
        let (data, xs) = &m.inodes[&ino];
        match fs::read(root.join(p)) {
            Ok(d) if d == *data => {}
            Ok(d) => bad.push(format!(
                "w{w}: {p}: {} bytes, model {}",
                d.len(),
                data.len()
            )),
            Err(e) => bad.push(format!("w{w}: read {p}: {e}")),
        }
        for k in 0..3 {
            let key = format!("user.k{k}");
            let v = xattr::get(root.join(p), &key).ok().flatten();
            if v.as_ref() != xs.get(&key) {
                bad.push(format!(
                    "w{w}: {p}: xattr {key} {v:?}, model {:?}",
                    xs.get(&key)
                ));
            }
        }
        if md.nlink() != m.names_of(ino) as u64 {
            bad.push(format!(
                "w{w}: {p}: nlink {}, model {}",
                md.nlink(),
                m.names_of(ino)
            ));
        }
        if let Some(i) = ino_of.insert(ino, md.ino())
            && i != md.ino()
        {
            bad.push(format!(
                "w{w}: {p}: st_ino {} differs from its other name's {i}",
                md.ino()
            ));
        }
    }
    bad
}

/// Every name listed in the shared subtree can be stat'ed.
fn check_shared(mnt: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    fn walk(p: &Path, bad: &mut Vec<String>) {
        match fs::read_dir(p) {
            Ok(rd) => {
                for e in rd {
                    let q = e.unwrap().path();
                    match fs::symlink_metadata(&q) {
                        Ok(md) if md.is_dir() => walk(&q, bad),
                        Ok(_) => {
                            if let Err(e) = fs::read(&q) {
                                bad.push(format!("read {}: {e}", q.display()));
                            }
                        }
                        Err(e) => bad.push(format!("lstat {} (listed): {e}", q.display())),
                    }
                }
            }
            Err(e) => bad.push(format!("readdir {}: {e}", p.display())),
        }
    }
    walk(&mnt.join("shared"), &mut bad);
    bad
}

#[derive(Default, Debug)]
struct StressResult {
    ops: usize,
    failures: Vec<String>,
    own_errs: BTreeMap<i32, usize>,
    shared_errs: BTreeMap<i32, usize>,
    rss: Vec<u64>,
}

/// Runs the workload on the mount at `mnt` (`pid`: its daemon, if it is ours).
fn stress(seed: u64, mnt: &Path, models: &[Model], pid: Option<i32>, label: &str) -> StressResult {
    let mut workers: Vec<Worker> = models
        .iter()
        .enumerate()
        .map(|(w, m)| Worker {
            w,
            rng: StdRng::seed_from_u64(seed.wrapping_add(w as u64 * 104729)),
            model: m.clone(),
            ops: 0,
            failures: Vec::new(),
            hist: Vec::new(),
            shared_errs: BTreeMap::new(),
            own_errs: BTreeMap::new(),
        })
        .collect();
    let mut res = StressResult::default();
    for (w, m) in models.iter().enumerate() {
        res.failures.extend(
            compare_with_model(mnt, w, m)
                .into_iter()
                .map(|f| format!("{label} initial: {f}")),
        );
    }
    for round in 1..=ROUNDS {
        let mut handles = Vec::new();
        for mut wk in workers.drain(..) {
            let mnt = mnt.to_path_buf();
            handles.push(thread::spawn(move || {
                for _ in 0..OPS_PER_ROUND {
                    wk.step(&mnt);
                }
                wk
            }));
        }
        let t = Instant::now();
        workers = watchdog(
            &format!("{label} round {round}"),
            mnt,
            Duration::from_secs(90),
            move || {
                handles
                    .into_iter()
                    .map(|h| h.join().expect("worker panicked"))
                    .collect()
            },
        );
        let el = t.elapsed();
        for wk in &workers {
            res.failures.extend(
                compare_with_model(mnt, wk.w, &wk.model)
                    .into_iter()
                    .map(|f| format!("{label} round {round}: {f}")),
            );
        }
        res.failures.extend(
            check_shared(mnt)
                .into_iter()
                .map(|f| format!("{label} round {round}: shared: {f}")),
        );
        if let Some(pid) = pid {
            assert!(alive(pid), "{label}: the daemon died in round {round}");
            res.rss.push(rss_kib(pid));
        }
        println!(
            "{label}: round {round}: {} ops in {el:?}, rss {:?} KiB",
            WORKERS * OPS_PER_ROUND,
            res.rss.last()
        );
    }
    for wk in workers {
        // STRATAFS_STRESS_LOG=DIR keeps every worker's own-subtree operations, for a replay.
        if let Some(dir) = std::env::var_os("STRATAFS_STRESS_LOG") {
            let _ = fs::write(
                Path::new(&dir).join(format!("{label}-w{}.log", wk.w)),
                wk.hist.join("\n"),
            );
        }
        res.ops += wk.ops;
        res.failures.extend(wk.failures);
        for (e, n) in wk.own_errs {
            *res.own_errs.entry(e).or_default() += n;
        }
        for (e, n) in wk.shared_errs {
            *res.shared_errs.entry(e).or_default() += n;
        }
    }
    res
}

fn errs(m: &BTreeMap<i32, usize>) -> String {
    m.iter()
        .map(|(e, n)| format!("{}x{n}", ename(*e)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn stress_against_model_and_kernel() {
    let _s = serial();
    let seed = seed("stress_against_model_and_kernel");
    let t = tmpdir();
    let (l1, l2) = (t.path().join("l1"), t.path().join("l2"));
    let models: Vec<Model> = (0..WORKERS)
        .map(|w| initial_model(seed, w, &l1, &l2))
        .collect();
    mkdirs(&l2.join("shared/sd0"));
    mkdirs(&l1.join("shared/sd1"));
    for i in 0..5 {
        fs::write(l2.join(format!("shared/s{i}")), b"shared lower").unwrap();
        fs::write(l1.join(format!("shared/sd1/s{i}")), b"shared lower").unwrap();
    }
    let lower_before = (snapshot(&l1), snapshot(&l2));

    // stratafs
    let (u, w, mnt) = (t.path().join("u"), t.path().join("w"), t.path().join("mnt"));
    mkdirs(&u);
    mkdirs(&w);
    let m = Mount::new(&[&l1, &l2], Some((&u, &w)), &mnt, "");
    let pid = m.pid();
    let ours = stress(seed, &mnt, &models, Some(pid), "stratafs");
    m.umount();
    drop(m);

    // The kernel's overlayfs, same layers, same seed.
    let (ku, kw, kmnt) = (
        t.path().join("ku"),
        t.path().join("kw"),
        t.path().join("kmnt"),
    );
    mkdirs(&ku);
    mkdirs(&kw);
    let lower = format!("{}:{}", l1.display(), l2.display());
    let opts = |extra: &str| {
        format!(
            "lowerdir={lower},upperdir={},workdir={}{extra}",
            ku.display(),
            kw.display()
        )
    };
    let km = SysMount::new(
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts(",index=on,redirect_dir=on"),
        ],
        &kmnt,
    )
    .or_else(|_| SysMount::new(&["-t", "overlay", "overlay", "-o", &opts("")], &kmnt))
    .expect("mount the kernel's overlayfs");
    let theirs = stress(seed, &kmnt, &models, None, "kernel");
    drop(km);

    println!(
        "stress: stratafs {} ops, own errors [{}], shared errors [{}], rss KiB {:?}",
        ours.ops,
        errs(&ours.own_errs),
        errs(&ours.shared_errs),
        ours.rss
    );
    println!(
        "stress: kernel {} ops, own errors [{}], shared errors [{}]",
        theirs.ops,
        errs(&theirs.own_errs),
        errs(&theirs.shared_errs)
    );
    assert_same_snapshot("top lower layer", &lower_before.0, &snapshot(&l1));
    assert_same_snapshot("bottom lower layer", &lower_before.1, &snapshot(&l2));
    // The model is checked against the kernel too: a disagreement there is a model bug.
    assert!(
        theirs.failures.is_empty(),
        "kernel overlayfs disagrees with the model:\n{}",
        theirs.failures.join("\n")
    );
    let mut f = ours.failures.clone();
    f.truncate(30);
    assert!(
        f.is_empty(),
        "stratafs failures ({}):\n{}",
        ours.failures.len(),
        f.join("\n")
    );
    // No error kind the kernel does not give (beyond what races between workers explain).
    for e in ours.shared_errs.keys().chain(ours.own_errs.keys()) {
        assert!(
            RACE_ERRNOS.contains(e)
                || theirs.shared_errs.contains_key(e)
                || theirs.own_errs.contains_key(e),
            "stratafs gave {} which the kernel's overlayfs never gave",
            ename(*e)
        );
    }
    // Memory stays flat: no growth of 2x between round 2 and the last.
    assert!(
        ours.rss[ROUNDS - 1] < 2 * ours.rss[1],
        "daemon RSS grows: {:?} KiB",
        ours.rss
    );
}

/// Debian's stress-ng and dbench, bounded in time, on a mount (skipped, and said so, when they
/// are not installed).
#[test]
fn stress_ng_and_dbench() {
    let _s = serial();
    let have = |b: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // scripts/test installs both; in CI a missing tool is a failure, not a skip.
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            have("stress-ng"),
            "CI=true but stress-ng is not installed (scripts/test installs it)"
        );
        assert!(
            have("dbench") && Path::new("/usr/share/dbench/client.txt").exists(),
            "CI=true but dbench (with /usr/share/dbench/client.txt) is not installed \
             (scripts/test installs it)"
        );
    }
    let t = tmpdir();
    let l = t.path().join("l");
    mkdirs(&l.join("lowerdata"));
    for i in 0..50 {
        fs::write(l.join(format!("lowerdata/f{i}")), format!("{i}")).unwrap();
    }
    let (u, w, mnt) = (t.path().join("u"), t.path().join("w"), t.path().join("mnt"));
    mkdirs(&u);
    mkdirs(&w);
    let m = Mount::new(&[&l], Some((&u, &w)), &mnt, "");
    let pid = m.pid();
    let mut ran = 0;
    if have("stress-ng") {
        mkdirs(&mnt.join("sng"));
        let out = watchdog("stress-ng", &mnt, Duration::from_secs(120), {
            let dir = mnt.join("sng");
            move || {
                Command::new("stress-ng")
                    .args([
                        "--dir",
                        "2",
                        "--rename",
                        "2",
                        "--link",
                        "2",
                        "--symlink",
                        "1",
                        "--timeout",
                        "10s",
                        "--metrics-brief",
                        "--temp-path",
                    ])
                    .arg(&dir)
                    .current_dir(&dir)
                    .output()
                    .expect("stress-ng")
            }
        });
        println!(
            "stress-ng: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.contains("stressor")
                    || l.contains("bogo")
                    || l.contains(" dir ")
                    || l.contains(" rename ")
                    || l.contains(" link "))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            out.status.success(),
            "stress-ng failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_alive(&m, pid, "stress-ng");
        ran += 1;
    } else {
        println!("stress-ng: not installed (apt-get install stress-ng), SKIPPED");
    }
    if have("dbench") && Path::new("/usr/share/dbench/client.txt").exists() {
        mkdirs(&mnt.join("db"));
        let out = watchdog("dbench", &mnt, Duration::from_secs(120), {
            let dir = mnt.join("db");
            move || {
                Command::new("dbench")
                    .args(["-t", "10", "-c", "/usr/share/dbench/client.txt", "-D"])
                    .arg(&dir)
                    .arg("2")
                    .output()
                    .expect("dbench")
            }
        });
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "dbench: {}",
            text.lines()
                .filter(|l| l.contains("Throughput") || l.contains("Operation"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            out.status.success(),
            "dbench failed ({}): {text}",
            out.status
        );
        assert!(text.contains("Throughput"), "dbench did not finish: {text}");
        assert_alive(&m, pid, "dbench");
        ran += 1;
    } else {
        println!("dbench: not installed (apt-get install dbench), SKIPPED");
    }
    // The lower data is still all there, and the mount still answers.
    for i in 0..50 {
        assert_eq!(
            fs::read_to_string(mnt.join(format!("lowerdata/f{i}"))).unwrap(),
            i.to_string()
        );
    }
    m.umount();
    println!("stress-ng/dbench: {ran} of 2 ran");
}

// ---------------------------------------------------------------------------------------------
// 4. Escapes: nothing the daemon resolves itself leads outside the layers
// ---------------------------------------------------------------------------------------------

fn set_trusted(p: &Path, name: &str, v: &[u8]) {
    xattr::set(p, name, v).unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

#[test]
fn escape_symlinks_and_crafted_markers_stay_inside_the_layers() {
    let _s = serial();
    let t = tmpdir();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let canary = t.path().join("canary");
    mkdirs(&canary.join("sub"));
    fs::write(canary.join("secret"), b"outside the layers").unwrap();
    fs::write(canary.join("sub/inner"), b"inner").unwrap();
    let (l1, l2, u, w) = (
        t.path().join("l1"),
        t.path().join("l2"),
        t.path().join("u"),
        t.path().join("w"),
    );
    // The mount sits deeper, so a relative link followed by the caller lands nowhere real.
    let mnt = t.path().join("deep/er/mnt");
    for p in [&l1, &l2, &u, &w] {
        mkdirs(p);
    }
    let c = canary.display().to_string();
    // Top lower layer: links out of the layer by every route.
    symlink("/", l1.join("root_link")).unwrap();
    symlink("/etc", l1.join("etc_link")).unwrap();
    symlink(&c, l1.join("canary_abs")).unwrap();
    symlink("../canary", l1.join("dotdot")).unwrap();
    mkdirs(&l1.join("a/b"));
    symlink("../../../canary", l1.join("a/b/dd")).unwrap();
    fs::write(l1.join("a/b/file"), b"file").unwrap();
    symlink("chain2", l1.join("chain1")).unwrap();
    symlink(format!("{c}/secret"), l1.join("chain2")).unwrap();
    mkdirs(&l1.join("m2"));
    fs::write(l1.join("m2/own"), b"own").unwrap();
    symlink(&c, l1.join("sym_over_dir")).unwrap();
    // Bottom lower layer: directories the daemon would merge if it followed the links above.
    symlink(&c, l2.join("m2")).unwrap();
    mkdirs(&l2.join("sym_over_dir"));
    fs::write(l2.join("sym_over_dir/low"), b"low").unwrap();
    symlink(&c, l2.join("x")).unwrap();
    mkdirs(&l2.join("canary"));
    fs::write(l2.join("canary/decoy"), b"decoy").unwrap();
    // Upper layer: a dir over a lower symlink, and crafted redirects.
    mkdirs(&u.join("x"));
    fs::write(u.join("x/up"), b"up").unwrap();
    for (d, r) in [
        ("r1", "/../canary"),
        ("r2", "../canary"),
        ("r3", "/canary_abs"),
        ("r4", "/m2"),
        ("r5", "/a/b/dd"),
        ("r6", "/dotdot"),
    ] {
        mkdirs(&u.join(d));
        set_trusted(&u.join(d), "trusted.overlay.redirect", r.as_bytes());
    }
    let before = (snapshot(&canary), snapshot(&l1), snapshot(&l2));
    let passwd = fs::symlink_metadata("/etc/passwd").unwrap();

    let m = Mount::new(&[&l1, &l2], Some((&u, &w)), &mnt, "");
    let pid = m.pid();
    let canary_names = ["secret", "sub", "inner"];
    let mut checks = 0;
    let mut no_canary = |dir: &str, m: &Mount| {
        checks += 1;
        match fs::read_dir(mnt.join(dir)) {
            Ok(rd) => {
                let names: Vec<String> = rd
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert!(
                    !names.iter().any(|n| canary_names.contains(&n.as_str())),
                    "{dir} shows the canary's entries: {names:?}"
                );
                for n in canary_names {
                    assert!(
                        fs::symlink_metadata(mnt.join(dir).join(n)).is_err(),
                        "{dir}/{n} is reachable"
                    );
                }
            }
            Err(e) => println!("escape: {dir}: {e}"),
        }
        assert_alive(m, pid, dir);
    };
    for d in ["x", "m2", "r1", "r2", "r3", "r4", "r5", "r6", "a/b"] {
        no_canary(d, &m);
    }
    assert_eq!(entries(&mnt.join("x")), ["up"]);
    assert_eq!(entries(&mnt.join("m2")), ["own"]);
    assert!(
        fs::symlink_metadata(mnt.join("sym_over_dir"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    for (n, target) in [
        ("root_link", "/".to_string()),
        ("etc_link", "/etc".into()),
        ("canary_abs", c.clone()),
        ("dotdot", "../canary".into()),
        ("a/b/dd", "../../../canary".into()),
    ] {
        assert_eq!(
            fs::read_link(mnt.join(n)).unwrap(),
            Path::new(&target),
            "{n}"
        );
    }
    // Changes of the links themselves (never their targets).
    std::os::unix::fs::lchown(mnt.join("canary_abs"), Some(1234), Some(1234))
        .expect("lchown a symlink");
    assert_eq!(
        fs::symlink_metadata(mnt.join("canary_abs")).unwrap().uid(),
        1234
    );
    let xr = xattr::set(mnt.join("chain2"), "trusted.t", b"1");
    println!("escape: lsetxattr on a symlink: {xr:?}");
    let st = Command::new("touch")
        .args(["-h", "-d", "2001-01-01"])
        .arg(mnt.join("dotdot"))
        .status()
        .unwrap();
    assert!(st.success(), "touch -h on a symlink");
    fs::rename(mnt.join("etc_link"), mnt.join("etc_link_moved")).expect("rename a symlink");
    fs::hard_link(mnt.join("chain1"), mnt.join("chain1_link")).expect("link a symlink");
    assert_eq!(
        fs::read_link(mnt.join("chain1_link")).unwrap(),
        Path::new("chain2")
    );
    // Copy-up of the links' parent, then an O(1) rename of it.
    fs::set_permissions(mnt.join("a/b"), fs::Permissions::from_mode(0o750)).expect("chmod a/b");
    fs::write(mnt.join("a/b/new"), b"new").expect("create in a/b");
    fs::rename(mnt.join("a"), mnt.join("a_moved")).expect("rename a");
    assert_eq!(
        fs::read_link(mnt.join("a_moved/b/dd")).unwrap(),
        Path::new("../../../canary")
    );
    // Creates in the merged dirs that sit over links.
    for d in ["x", "m2", "r3", "r4"] {
        fs::write(mnt.join(d).join("new"), b"new").unwrap_or_else(|e| panic!("create in {d}: {e}"));
    }
    // O_NOFOLLOW opens of the links fail in the caller, as anywhere.
    expect_errno(
        "O_NOFOLLOW write open of a symlink",
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(mnt.join("canary_abs")),
        &[libc::ELOOP],
    );
    // Markers cannot be made through the mount.
    assert!(
        File::create(mnt.join(".wh.secret")).is_err(),
        "a .wh. name was created"
    );
    assert!(
        xattr::set(mnt.join("m2"), "trusted.overlay.opaque", b"y").is_err(),
        "overlay.opaque set through the mount"
    );
    assert!(
        xattr::set(mnt.join("m2"), "trusted.overlay.redirect", b"/../canary").is_err(),
        "overlay.redirect set through the mount"
    );
    assert!(
        xattr::get(mnt.join("r4"), "trusted.overlay.redirect")
            .ok()
            .flatten()
            .is_none(),
        "a redirect xattr shows through the mount"
    );
    // Deletes: of the links, of dirs over links, of the link over a dir.
    for d in [
        "x",
        "m2",
        "sym_over_dir",
        "root_link",
        "canary_abs",
        "dotdot",
        "a_moved",
    ] {
        let p = mnt.join(d);
        let r = if fs::symlink_metadata(&p).unwrap().is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.unwrap_or_else(|e| panic!("rm -rf {d}: {e}"));
        assert!(fs::symlink_metadata(&p).is_err(), "{d} still there");
    }
    // Unprivileged callers: default_permissions is enforced.
    assert_eq!(
        as_nobody("create", &mnt.join("by_nobody")),
        Err(libc::EACCES)
    );
    fs::write(mnt.join("root600"), b"root only").unwrap();
    fs::set_permissions(mnt.join("root600"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(as_nobody("read", &mnt.join("root600")), Err(libc::EACCES));
    assert_alive(&m, pid, "escape cases");
    m.umount();
    drop(m);
    assert_same_snapshot("canary outside the layers", &before.0, &snapshot(&canary));
    assert_same_snapshot("top lower layer", &before.1, &snapshot(&l1));
    assert_same_snapshot("bottom lower layer", &before.2, &snapshot(&l2));
    let p2 = fs::symlink_metadata("/etc/passwd").unwrap();
    assert_eq!(
        (passwd.mtime(), passwd.ctime(), passwd.uid()),
        (p2.mtime(), p2.ctime(), p2.uid()),
        "/etc/passwd touched"
    );
    // Nothing new anywhere in the test dir but the upper, work and mount dirs.
    assert_eq!(entries(t.path()), ["canary", "deep", "l1", "l2", "u", "w"]);
    println!("escape: {checks} merged dirs checked, canary unchanged");
}

// ---------------------------------------------------------------------------------------------
// 5. Bounded property tests of the parsers (the cargo-fuzz targets' properties, seeded)
// ---------------------------------------------------------------------------------------------

const TOKENS: &[&str] = &[
    "lowerdir=",
    "upperdir=",
    "workdir=",
    ",",
    ":",
    "\\",
    "\\,",
    "\\:",
    "\\\\",
    "=",
    "a",
    "/",
    "/x/y",
    "metacopy=",
    "on",
    "off",
    "uidmapping=",
    "gidmapping=",
    "0",
    "1",
    "2",
    "65536",
    "4294967295",
    "squash_to_uid=",
    "squash_to_root",
    "xattr_permissions=",
    "index=",
    "redirect_dir=",
    "follow",
    "ro",
    "x-foo",
    "é",
    "\0",
    " ",
    "fsname=",
    "subtype=",
    "volatile",
    "timeout",
    "-",
    "+",
    "777",
];

fn random_text(rng: &mut StdRng) -> String {
    (0..rng.random_range(0..14))
        .map(|_| *pick(rng, TOKENS).unwrap())
        .collect()
}

fn escape_layer(p: &str) -> String {
    p.chars()
        .flat_map(|c| {
            if c == '\\' || c == ':' {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

const PROP_ITERS: usize = 20_000;

#[test]
fn property_mount_option_parser() {
    use stratafs::options::{MountOptions, split_lowerdir, split_options};
    let mut rng = StdRng::seed_from_u64(seed("property_mount_option_parser"));
    let mut accepted = 0;
    for _ in 0..PROP_ITERS {
        let s = random_text(&mut rng);
        let items = split_options(&s);
        assert!(items.iter().all(|i| !i.is_empty()), "{s:?}");
        let a = MountOptions::parse(&s);
        if let Ok(o) = &a {
            accepted += 1;
            let mut again = MountOptions::default();
            for i in &items {
                again
                    .parse_into(&i.replace(',', "\\,"))
                    .unwrap_or_else(|e| panic!("{s:?}: item {i:?}: {e}"));
            }
            assert_eq!(&again, o, "{s:?}");
        }
        if let Ok(layers) = split_lowerdir(&s) {
            let strs: Vec<String> = layers
                .iter()
                .map(|p| p.to_str().unwrap().to_string())
                .collect();
            assert!(strs.iter().all(|l| !l.is_empty()), "{s:?}");
            let joined = strs
                .iter()
                .map(|l| escape_layer(l))
                .collect::<Vec<_>>()
                .join(":");
            assert_eq!(split_lowerdir(&joined).unwrap(), layers, "{s:?}");
        }
    }
    println!("property_mount_option_parser: {PROP_ITERS} inputs, {accepted} accepted");
}

#[test]
fn property_idmap_and_override_stat() {
    use stratafs::overlay::idmap::{IdMap, Override};
    let mut rng = StdRng::seed_from_u64(seed("property_idmap_and_override_stat"));
    let mut maps = 0;
    for _ in 0..PROP_ITERS {
        let s = if rng.random_bool(0.5) {
            let n = rng.random_range(1..8);
            let nums: Vec<String> = (0..n)
                .map(|_| match rng.random_range(0..4) {
                    0 => rng.random::<u32>().to_string(),
                    1 => "4294967295".to_string(),
                    2 => rng.random_range(0..3u32).to_string(),
                    _ => rng.random_range(0..100_000u32).to_string(),
                })
                .collect();
            format!(
                "{}{}",
                if rng.random_bool(0.3) { ":" } else { "" },
                nums.join(":")
            )
        } else {
            random_text(&mut rng)
        };
        if let Ok(m) = IdMap::parse(&s) {
            maps += 1;
            for _ in 0..8 {
                let id: u32 = if rng.random_bool(0.5) {
                    rng.random()
                } else {
                    rng.random_range(0..70000)
                };
                if let Some(h) = m.to_host(id) {
                    let _ = m.to_container(h);
                }
                let _ = m.to_container(id);
            }
        }
        // Well-formed mappings of non-overlapping ranges round-trip.
        let (c, h, n) = (
            rng.random_range(0..1000u32),
            rng.random_range(0..1_000_000u32),
            rng.random_range(1..70000u32),
        );
        // fuse-overlayfs's direction: an id stored as FIRST+i shows as SECOND+i.
        let m = IdMap::parse(&format!(":{c}:{h}:{n}")).unwrap();
        let shown = h + rng.random_range(0..n);
        assert_eq!(m.to_container(m.to_host(shown).unwrap()), shown);
        assert_eq!(m.to_host(h + n), None);
        assert_eq!(m.to_container(c), h);
        let bytes = s.as_bytes();
        if let Some(o) = Override::parse(bytes) {
            assert!(o.mode <= 0o7777);
            if !o.kind.as_deref().is_some_and(|k| k.ends_with('\0')) {
                assert_eq!(Override::parse(&o.encode()), Some(o.clone()), "{s:?}");
            }
        }
        let o = Override {
            uid: rng.random(),
            gid: rng.random(),
            mode: rng.random_range(0..0o10000),
            kind: None,
        };
        assert_eq!(Override::parse(&o.encode()), Some(o));
    }
    println!("property_idmap_and_override_stat: {PROP_ITERS} inputs, {maps} mappings parsed");
}

#[test]
fn property_origin_and_marker_names() {
    use stratafs::overlay::layer::{
        decode_origin, is_marker_name, is_private_xattr, whiteout_name,
    };
    let mut rng = StdRng::seed_from_u64(seed("property_origin_and_marker_names"));
    for _ in 0..PROP_ITERS {
        let len = rng.random_range(0..20);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        match decode_origin(&data) {
            Some(ino) => assert_eq!(&ino.to_le_bytes()[..], &data[..]),
            None => assert_ne!(len, 8),
        }
        let name = OsStr::from_bytes(&data);
        let wh = whiteout_name(name);
        assert!(is_marker_name(&wh));
        assert_eq!(&wh.as_bytes()[4..], &data[..]);
        let _ = is_private_xattr(name);
    }
    for x in [
        "trusted.overlay.opaque",
        "user.overlay.redirect",
        "trusted.stratafs.origin",
        "user.fuseoverlayfs.opaque",
    ] {
        assert!(is_private_xattr(OsStr::new(x)), "{x}");
    }
    for x in [
        "user.k",
        "security.capability",
        "trusted.overlay",
        "user.overlayx",
    ] {
        assert!(!is_private_xattr(OsStr::new(x)), "{x}");
    }
    println!("property_origin_and_marker_names: {PROP_ITERS} inputs");
}

// ---------------------------------------------------------------------------------------------
// The OCI layer reader/applier on hostile input (the `layer_apply` fuzz target's properties,
// seeded): never a panic, never a change outside the directory being filled.

/// Inputs of `property_oci_layer_apply_stays_inside`.
const APPLY_ITERS: usize = 4_000;

/// Names, sizes, modes, link counts and ctimes of everything under `p` (not following links).
fn tree_state(p: &Path) -> Vec<(String, u64, u32, u64, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.push((
            p.display().to_string(),
            m.len(),
            m.mode(),
            m.nlink(),
            m.ctime(),
            m.ctime_nsec(),
        ));
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// One tar entry with raw name bytes (the tar crate's own checks bypassed).
fn raw_tar_entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &[u8],
    link: Option<&[u8]>,
    mode: u32,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        let _ = h.set_device_major(1);
        let _ = h.set_device_minor(3);
    }
    {
        let gnu = h.as_gnu_mut().unwrap();
        let n = name.len().min(100);
        gnu.name = [0; 100];
        gnu.name[..n].copy_from_slice(&name[..n]);
        if let Some(l) = link {
            let n = l.len().min(100);
            gnu.linkname = [0; 100];
            gnu.linkname[..n].copy_from_slice(&l[..n]);
        }
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A random layer tar aimed at the applier's checks: `..`, absolute paths, names through
/// symlinks that point out of the layer (relative and absolute), hard links to outside files,
/// whiteouts, opaque markers, duplicates, devices and fifos.
fn hostile_tar(rng: &mut StdRng, canary: &Path) -> Vec<u8> {
    let canary_abs = canary.to_str().unwrap().to_owned();
    let canary_file = format!("{canary_abs}/file");
    // Half the archives use plain names only (they mostly apply), half every trick.
    let benign = rng.random_bool(0.5);
    let comps: Vec<&str> = if benign {
        vec!["a", "b", "d", "x", "\u{e9}"]
    } else {
        vec![
            "a",
            "b",
            "l",
            "..",
            ".",
            "",
            "d",
            ".wh.a",
            ".wh.b",
            ".wh..wh..opq",
            "x",
            "\u{e9}",
        ]
    };
    let mut targets: Vec<String> = vec![
        "../../canary".into(),
        "../../canary/file".into(),
        canary_abs.clone(),
        canary_file.clone(),
        "/".into(),
        "/etc".into(),
        "..".into(),
    ];
    if benign {
        // Symlink targets are data (any may be made); hard links name earlier entries.
        targets = vec!["a".into(), "a/b".into(), "x".into(), "d/x".into()];
        targets.push(
            pick(rng, &["../../canary", "/etc", "/"])
                .unwrap()
                .to_string(),
        );
    } else {
        targets.extend(["../../../canary", "a", "l", "a/b", "l/file", ""].map(String::from));
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut files: Vec<String> = Vec::new();
    for _ in 0..rng.random_range(0..9) {
        let depth = rng.random_range(1..4);
        let mut name: String = (0..depth)
            .map(|_| *pick(rng, &comps).unwrap())
            .collect::<Vec<_>>()
            .join("/");
        if benign {
            // Unique last components: no duplicates, no file where a parent dir goes.
            name.push_str(&format!("{}", b.get_ref().len()));
        }
        if benign && rng.random_bool(0.2) {
            // A whiteout of the (unique) last component, or an opaque marker in its dir.
            let (dir, last) = match name.rsplit_once('/') {
                Some((d, l)) => (format!("{d}/"), l.to_string()),
                None => (String::new(), name.clone()),
            };
            name = if rng.random_bool(0.7) {
                format!("{dir}.wh.{last}")
            } else {
                format!("{dir}.wh..wh..opq")
            };
        }
        if !benign && rng.random_bool(0.1) {
            name.insert(0, '/');
        }
        if !benign && rng.random_bool(0.1) {
            name = format!("{canary_abs}/{name}");
        }
        let target = pick(rng, &targets).unwrap().clone();
        let mode = *pick(rng, &[0o755, 0o644, 0o000, 0o4755, 0o1777, 0o7777]).unwrap();
        let data: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
        use tar::EntryType as T;
        // Plain archives: directories, files, symlinks, fifos, hard links to earlier files.
        let choice = if benign {
            *pick(rng, &[0, 0, 2, 2, 4, 7, 10]).unwrap()
        } else {
            rng.random_range(0..9)
        };
        match choice {
            10 if !files.is_empty() => {
                let to = pick(rng, &files).unwrap().clone();
                raw_tar_entry(
                    &mut b,
                    T::Link,
                    name.as_bytes(),
                    Some(to.as_bytes()),
                    0o644,
                    &[],
                );
            }
            0 | 1 | 10 => raw_tar_entry(&mut b, T::Directory, name.as_bytes(), None, mode, &[]),
            2 | 3 => {
                files.push(name.clone());
                raw_tar_entry(&mut b, T::Regular, name.as_bytes(), None, mode, &data);
            }
            4 => raw_tar_entry(
                &mut b,
                T::Symlink,
                name.as_bytes(),
                Some(target.as_bytes()),
                0o777,
                &[],
            ),
            5 => raw_tar_entry(
                &mut b,
                T::Link,
                name.as_bytes(),
                Some(target.as_bytes()),
                0o644,
                &[],
            ),
            6 => raw_tar_entry(&mut b, T::Char, name.as_bytes(), None, 0o644, &[]),
            7 => raw_tar_entry(&mut b, T::Fifo, name.as_bytes(), None, 0o644, &[]),
            _ => {
                // A name through a symlink made just before.
                raw_tar_entry(
                    &mut b,
                    T::Symlink,
                    b"l",
                    Some(target.as_bytes()),
                    0o777,
                    &[],
                );
                let through = format!("l/{}", pick(rng, &["x", "file", "d/x"]).unwrap());
                let kind = *pick(rng, &[T::Regular, T::Directory, T::Link]).unwrap();
                raw_tar_entry(
                    &mut b,
                    kind,
                    through.as_bytes(),
                    (kind == T::Link).then_some(canary_file.as_bytes()),
                    0o644,
                    if kind == T::Regular { &data } else { &[] },
                );
            }
        }
    }
    b.into_inner().unwrap()
}

/// Byte-level damage: flips, cuts, repeated blocks, random bytes.
fn mangle(rng: &mut StdRng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..4) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            1 => {
                let at = rng.random_range(0..=b.len());
                b.truncate(at);
            }
            2 if b.len() >= 512 => {
                let blk = rng.random_range(0..b.len() / 512) * 512;
                let copy = b[blk..blk + 512].to_vec();
                let at = rng.random_range(0..=b.len() / 512) * 512;
                b.splice(at..at, copy);
            }
            _ => {
                let at = rng.random_range(0..=b.len());
                let junk: Vec<u8> = (0..rng.random_range(1..600))
                    .map(|_| rng.random())
                    .collect();
                b.splice(at..at, junk);
            }
        }
    }
    b
}

#[test]
fn property_oci_layer_apply_stays_inside() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use stratafs::storage::layers::apply::{ApplyOptions, apply_layer};
    let mut rng = StdRng::seed_from_u64(seed("property_oci_layer_apply_stays_inside"));
    // On tmpfs where there is one (the applier creates files for most inputs).
    let tmp = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("stratafs-rel-")
            .tempdir_in("/dev/shm")
            .expect("tempdir")
    } else {
        tmpdir()
    };
    let base = tmp.path();
    // BASE/w/layer is filled; BASE/canary is `../../canary` from inside it.
    mkdirs(&base.join("w"));
    mkdirs(&base.join("canary/dir"));
    fs::write(base.join("canary/file"), b"canary\n").unwrap();
    let canary = base.join("canary");
    let before = tree_state(&canary);
    let etc = tree_state(Path::new("/etc/passwd"));
    let layer = base.join("w/layer");
    let (mut ok, mut refused, mut applied) = (0usize, 0usize, 0u64);
    for i in 0..APPLY_ITERS {
        let tar = hostile_tar(&mut rng, &canary);
        let input = match i % 4 {
            0 | 1 => tar,
            2 => mangle(&mut rng, tar),
            _ => {
                // The same through gzip (sometimes damaged after compression).
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&tar).unwrap();
                let z = gz.finish().unwrap();
                if rng.random_bool(0.5) {
                    mangle(&mut rng, z)
                } else {
                    z
                }
            }
        };
        let opts = if rng.random_bool(0.5) {
            ApplyOptions::default()
        } else {
            ApplyOptions {
                allow_devices: false,
                set_owners: false,
                max_entry_size: 64,
                max_entries: 6,
            }
        };
        fs::create_dir(&layer).unwrap();
        let res = catch_unwind(AssertUnwindSafe(|| apply_layer(&layer, &input[..], &opts)));
        let keep = || {
            let p = std::env::temp_dir().join(format!("stratafs-apply-input-{i}.tar"));
            fs::write(&p, &input).unwrap();
            p
        };
        match res {
            Ok(Ok(stats)) => {
                ok += 1;
                applied += stats.entries;
            }
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!(
                "input {i}: the applier panicked (input kept in {:?})",
                keep()
            ),
        }
        assert_eq!(
            entries(base),
            ["canary", "w"],
            "input {i}: wrote next to w/ ({:?})",
            keep()
        );
        assert_eq!(
            entries(&base.join("w")),
            ["layer"],
            "input {i}: wrote next to the layer ({:?})",
            keep()
        );
        assert!(
            tree_state(&canary) == before,
            "input {i}: the canary changed ({:?})",
            keep()
        );
        assert!(
            tree_state(Path::new("/etc/passwd")) == etc,
            "input {i}: /etc/passwd changed"
        );
        fs::remove_dir_all(&layer).unwrap();
    }
    println!(
        "property_oci_layer_apply_stays_inside: {APPLY_ITERS} inputs, {ok} applied ({applied} \
         entries), {refused} refused"
    );
    assert!(
        ok > APPLY_ITERS / 10 && refused > APPLY_ITERS / 10,
        "{ok} applied, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Dead mounts, allow_other as root, panic isolation
// ---------------------------------------------------------------------------------------------

/// How many mounts sit exactly at `p` (stacked mounts count each).
fn mounts_at(p: &Path) -> usize {
    let want = p.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| stratafs::options::unescape_mountinfo(m) == want)
        })
        .count()
}

/// A mount whose daemon was killed: stat gives ENOTCONN, mounting over it is refused with the
/// hint to run `stratafs umount` (and mounts nothing), `stratafs umount` removes it, and a
/// fresh mount at the same place works.
#[test]
fn dead_mount_is_detected_refused_and_cleaned() {
    let _s = serial();
    let t = tmpdir();
    let (l, u, w, mnt) = overlay_dirs(t.path());
    fs::write(l.join("f"), "lower\n").unwrap();
    let m = Mount::new(&[&l], Some((&u, &w)), &mnt, "");
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "lower\n");
    fs::write(mnt.join("new"), "upper\n").unwrap();
    kill9(m.pid());
    assert_eq!(mounts_at(&mnt), 1, "the dead mount is still listed");
    // Requests the kernel had queued when the daemon's /dev/fuse fds closed are aborted
    // (ECONNABORTED), and over io_uring those that meet its stopped queues before the ring's
    // teardown lets go of the connection are cancelled (ECANCELED); once the connection is
    // torn down every request gets ENOTCONN.
    for p in [mnt.clone(), mnt.join("f")] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let e = fs::metadata(&p).expect_err("stat of a dead mount succeeded");
            let n = errno_of(&e);
            if (n == libc::ECONNABORTED || n == libc::ECANCELED) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            assert_eq!(
                n,
                libc::ENOTCONN,
                "stat {}: {e} ({})",
                p.display(),
                ename(n)
            );
            break;
        }
    }
    // Mounting again over the dead mount: refused, with the hint, and nothing mounted.
    let o = overlay_opts(&l, &u, &w);
    let out = Command::new(BIN)
        .arg("-o")
        .arg(&o)
        .arg(&mnt)
        .output()
        .expect("run stratafs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a mount over a dead mount succeeded: {err}"
    );
    let hint = format!(
        "is a mount whose daemon died: run 'stratafs umount {}'",
        mnt.display()
    );
    assert!(err.contains(&hint), "no hint {hint:?} in: {err}");
    assert_eq!(mounts_at(&mnt), 1, "the refused mount left a mount behind");
    assert_eq!(daemon_pid(&mnt), None, "the refused mount left a daemon");
    // The dead mount as a layer is refused the same way.
    let other = t.path().join("other");
    mkdirs(&other);
    let out = Command::new(BIN)
        .arg("-o")
        .arg(format!("lowerdir={}", mnt.display()))
        .arg(&other)
        .output()
        .expect("run stratafs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a dead mount served as a lower");
    assert!(
        err.contains("is a mount whose daemon died"),
        "no hint for a dead lowerdir: {err}"
    );
    assert!(!is_mounted(&other));
    // `stratafs umount` cleans it up.
    m.umount();
    assert_eq!(mounts_at(&mnt), 0);
    assert!(fs::metadata(&mnt).unwrap().is_dir());
    // A fresh mount at the same place works, and shows what the dead one had written.
    let m2 = Mount::new(&[&l], Some((&u, &w)), &mnt, "");
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "lower\n");
    assert_eq!(fs::read_to_string(mnt.join("new")).unwrap(), "upper\n");
    fs::write(mnt.join("after"), "x").unwrap();
    assert_eq!(fs::read_to_string(u.join("after")).unwrap(), "x");
    m2.umount();
    assert_eq!(mounts_at(&mnt), 0);
    assert_eq!(fs::read_to_string(l.join("f")).unwrap(), "lower\n");
}

/// Mounted by root, the mount serves every user (as the kernel's overlayfs does), with or
/// without `allow_other`; `default_permissions` still applies the modes.
#[test]
fn allow_other_is_the_default_as_root() {
    let _s = serial();
    let t = tmpdir();
    // nobody must reach the mount point and the layers' paths do not matter (the daemon
    // resolves them); the temp dir itself is 0700.
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (l, u, w) = (t.path().join("l"), t.path().join("u"), t.path().join("w"));
    for d in [&l, &u, &w] {
        mkdirs(d);
    }
    fs::write(l.join("pub"), "public\n").unwrap();
    fs::write(l.join("priv"), "private\n").unwrap();
    fs::set_permissions(l.join("priv"), fs::Permissions::from_mode(0o600)).unwrap();
    mkdirs(&l.join("d"));
    for extra in ["", "allow_other"] {
        let mnt = t.path().join(format!("mnt{}", extra.len()));
        let m = Mount::new(&[&l], Some((&u, &w)), &mnt, extra);
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .rfind(|x| x.split(' ').nth(4) == Some(&*mnt.to_string_lossy()))
            .expect("mountinfo line");
        assert!(
            line.contains("allow_other") && line.contains("default_permissions"),
            "-o '{extra}': {line}"
        );
        assert_eq!(as_nobody("stat", &mnt), Ok(()), "-o '{extra}': stat");
        assert_eq!(as_nobody("list", &mnt), Ok(()), "-o '{extra}': list");
        assert_eq!(
            as_nobody("read", &mnt.join("pub")),
            Ok(()),
            "-o '{extra}': read"
        );
        assert_eq!(
            as_nobody("list", &mnt.join("d")),
            Ok(()),
            "-o '{extra}': list d"
        );
        assert_eq!(
            as_nobody("read", &mnt.join("priv")),
            Err(libc::EACCES),
            "-o '{extra}': read of a 0600 root file"
        );
        m.umount();
    }
}

/// A panic in a request handler fails that request alone (EIO): the failpoint
/// `STRATAFS_FAILPOINT=panic-lookup:NAME` panics in every LOOKUP of NAME. Other names keep
/// working, the daemon stays up with every worker thread (more panics than threads), and the
/// mount unmounts cleanly.
#[test]
fn panic_in_a_handler_fails_only_that_request() {
    let _s = serial();
    let t = tmpdir();
    let (l, u, w, mnt) = overlay_dirs(t.path());
    fs::write(l.join("boom"), "never seen\n").unwrap();
    for i in 0..8 {
        fs::write(l.join(format!("ok{i}")), format!("{i}\n")).unwrap();
    }
    let o = overlay_opts(&l, &u, &w);
    let out = Command::new(BIN)
        .env("STRATAFS_FAILPOINT", "panic-lookup:boom")
        .arg("-o")
        .arg(&o)
        .arg(&mnt)
        .output()
        .expect("run stratafs");
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mount { mnt: mnt.clone() };
    let pid = m.pid();
    let threads = || {
        fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .count()
    };
    // The workers start with the session; count them once it has served requests.
    for i in 0..8 {
        assert_eq!(
            fs::read_to_string(mnt.join(format!("ok{i}"))).unwrap(),
            format!("{i}\n")
        );
    }
    let threads_before = threads();
    // More panics than the daemon has worker threads (at most 16): a panic that took its
    // thread down would leave none to serve.
    for round in 0..40 {
        let e = fs::symlink_metadata(mnt.join("boom")).expect_err("lookup of boom succeeded");
        assert_eq!(
            errno_of(&e),
            libc::EIO,
            "round {round}: lookup of boom: {e}"
        );
        let e = File::open(mnt.join("boom")).expect_err("open of boom succeeded");
        assert_eq!(errno_of(&e), libc::EIO, "round {round}: open of boom: {e}");
        let i = round % 8;
        assert_eq!(
            fs::read_to_string(mnt.join(format!("ok{i}"))).unwrap(),
            format!("{i}\n"),
            "round {round}"
        );
    }
    // Creating the name needs its lookup too: it fails, and nothing is made.
    let e = fs::write(mnt.join("boom"), "x").expect_err("create over boom succeeded");
    assert_eq!(errno_of(&e), libc::EIO, "create of boom: {e}");
    assert!(
        !u.join("boom").exists(),
        "a failed request wrote to the upper"
    );
    // The daemon serves everything else: writes, creates, a listing.
    fs::write(mnt.join("ok0"), "changed\n").unwrap();
    assert_eq!(fs::read_to_string(mnt.join("ok0")).unwrap(), "changed\n");
    fs::create_dir(mnt.join("newdir")).unwrap();
    fs::write(mnt.join("newdir/f"), "f").unwrap();
    let names = entries(&mnt);
    assert!(
        names.contains(&"ok7".to_string()) && names.contains(&"newdir".to_string()),
        "{names:?}"
    );
    assert_alive(&m, pid, "40 panicking lookups");
    let threads_after = threads();
    assert!(
        threads_after >= threads_before,
        "the daemon lost threads to the panics: {threads_before} before, {threads_after} after"
    );
    println!(
        "panic isolation: 81 failed requests, daemon threads {threads_before} -> {threads_after}"
    );
    m.umount();
    let t0 = Instant::now();
    while !exited(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the daemon did not exit after the unmount"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fs::read_to_string(l.join("ok0")).unwrap(), "0\n");
    assert_eq!(fs::read_to_string(u.join("ok0")).unwrap(), "changed\n");
}
