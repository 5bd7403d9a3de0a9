//! Mounting stratafs or kernel overlayfs, and a guard that always unmounts.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::sys;

/// The stratafs binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stratafs")
}

/// How long a mount command may take before the test gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Layer directories for one mount: lowers topmost first, optional upper and work.
#[derive(Clone, Debug)]
pub struct Layers {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
}

/// Escapes a path for a lowerdir list (`\`, `:` and `,`).
pub fn escape_layer(p: &Path) -> String {
    let mut out = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, '\\' | ':' | ',') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Layers {
    /// `lowerdir=..,upperdir=..,workdir=..` as fuse-overlayfs and the kernel take it.
    pub fn options(&self) -> String {
        let lowers: Vec<String> = self.lowers.iter().map(|l| escape_layer(l)).collect();
        let mut s = format!("lowerdir={}", lowers.join(":"));
        if let Some(u) = &self.upper {
            s.push_str(&format!(",upperdir={}", u.display()));
        }
        if let Some(w) = &self.work {
            s.push_str(&format!(",workdir={}", w.display()));
        }
        s
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    pub fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the stratafs binary with `args` (in `cwd` if given) and waits for it to exit.
///
/// Output goes to files, not pipes: a daemon that detaches may keep inherited pipes open,
/// and reading them to EOF would then wait for the daemon's end.
pub fn run_stratafs<S: AsRef<OsStr>>(args: &[S], cwd: Option<&Path>) -> RunOutput {
    run_cmd(bin(), args, cwd)
}

/// Runs any program as [`run_stratafs`] does.
pub fn run_cmd<S: AsRef<OsStr>>(program: &str, args: &[S], cwd: Option<&Path>) -> RunOutput {
    run_cmd_env(program, args, cwd, &[])
}

/// As [`run_cmd`], with `env` added to the environment.
pub fn run_cmd_env<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    cwd: Option<&Path>,
    env: &[(&str, &str)],
) -> RunOutput {
    let out = tempfile::tempfile().expect("stdout file");
    let err = tempfile::tempfile().expect("stderr file");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} {:?} did not exit within {COMMAND_TIMEOUT:?}",
                args.iter().map(|a| a.as_ref()).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |mut f: fs::File| {
        use std::io::{Read, Seek};
        let mut s = String::new();
        f.seek(std::io::SeekFrom::Start(0)).expect("seek");
        f.read_to_string(&mut s).expect("read output");
        s
    };
    RunOutput {
        status,
        stdout: read(out),
        stderr: read(err),
    }
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = oct.iter().fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub major_minor: String,
    pub mount_point: String,
    pub options: String,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// The topmost mount at `path` (as the kernel spells it), if any.
pub fn mount_info(path: &Path) -> Option<MountInfo> {
    let want = path.to_string_lossy();
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let p: Vec<&str> = post.split(' ').collect();
            Some(MountInfo {
                major_minor: f.get(2)?.to_string(),
                mount_point: unescape_mountinfo(f.get(4)?),
                options: f.get(5)?.to_string(),
                fstype: p.first()?.to_string(),
                source: p.get(1).map(|s| unescape_mountinfo(s)).unwrap_or_default(),
                super_options: p.get(2).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .rfind(|m| m.mount_point == want)
}

pub fn is_mounted(path: &Path) -> bool {
    mount_info(path).is_some()
}

/// Live stratafs daemons serving `mnt` (matched by executable and an argument naming `mnt`).
pub fn daemon_pids(mnt: &Path) -> Vec<u32> {
    let want_exe = fs::canonicalize(bin()).ok();
    let mnt_s = mnt.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let dir = e.path();
        if fs::read_link(dir.join("exe")).ok() != want_exe {
            continue;
        }
        let Ok(cmd) = fs::read(dir.join("cmdline")) else {
            continue;
        };
        let hit = cmd.split(|b| *b == 0).any(|a| {
            let a = String::from_utf8_lossy(a);
            a == mnt_s || (a.len() > 1 && mnt_s.ends_with(&*a) && !a.starts_with('-'))
        });
        let zombie = fs::read_to_string(dir.join("stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if hit && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until no stratafs daemon serves `mnt`; false on timeout.
pub fn wait_daemon_gone(mnt: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if daemon_pids(mnt).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon_pids(mnt).is_empty()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Stratafs,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Stratafs => "stratafs",
        }
    }
}

/// A live mount, unmounted when dropped (also while a test panics).
#[derive(Debug)]
pub struct Mount {
    path: PathBuf,
    pub backend: Backend,
    live: bool,
}

impl Mount {
    /// Mounts kernel overlayfs; panics with mount(8)'s message if that fails.
    pub fn kernel(layers: &Layers, mnt: &Path, extra: &str) -> Mount {
        let mnt = fs::canonicalize(mnt).expect("mountpoint");
        let mut opts = layers.options();
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        let args: Vec<OsString> = vec![
            "-t".into(),
            "overlay".into(),
            "overlay".into(),
            "-o".into(),
            opts.clone().into(),
            mnt.clone().into(),
        ];
        let out = run_cmd("mount", &args, None);
        assert!(
            out.status.success(),
            "kernel overlay mount -o {opts} failed: {}",
            out.describe()
        );
        Mount {
            path: mnt,
            backend: Backend::Kernel,
            live: true,
        }
    }

    /// Mounts stratafs with `-o LAYERS[,extra] MNT`; panics if it fails.
    pub fn stratafs(layers: &Layers, mnt: &Path, extra: &str) -> Mount {
        Mount::stratafs_env(layers, mnt, extra, &[])
    }

    /// Runs stratafs with exactly `args`; on exit 0 checks that `mnt` is a live
    /// `fuse.stratafs` mount and returns its guard, else returns what the command printed.
    pub fn stratafs_args<S: AsRef<OsStr>>(
        args: &[S],
        mnt: &Path,
        cwd: Option<&Path>,
    ) -> Result<Mount, RunOutput> {
        Mount::stratafs_args_env(args, mnt, cwd, &[])
    }

    /// As [`Mount::stratafs`], with `env` (e.g. `STRATAFS_NO_PASSTHROUGH`) set for the daemon.
    pub fn stratafs_env(layers: &Layers, mnt: &Path, extra: &str, env: &[(&str, &str)]) -> Mount {
        let mut opts = layers.options();
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        let mnt = fs::canonicalize(mnt).expect("mountpoint");
        let args: Vec<OsString> = vec!["-o".into(), opts.into(), mnt.clone().into()];
        Mount::stratafs_args_env(&args, &mnt, None, env).unwrap_or_else(|o| {
            panic!("stratafs mount failed: {}", o.describe());
        })
    }

    /// As [`Mount::stratafs_args`], with `env` set for the daemon.
    pub fn stratafs_args_env<S: AsRef<OsStr>>(
        args: &[S],
        mnt: &Path,
        cwd: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Mount, RunOutput> {
        let mnt = fs::canonicalize(mnt).expect("mountpoint");
        let out = run_cmd_env(bin(), args, cwd, env);
        let info = mount_info(&mnt);
        if !out.status.success() {
            assert!(
                info.is_none(),
                "stratafs failed but left a mount at {}: {}",
                mnt.display(),
                out.describe()
            );
            return Err(out);
        }
        // Guard first, so that a failed check below still unmounts.
        let m = Mount {
            path: mnt.clone(),
            backend: Backend::Stratafs,
            live: info.is_some(),
        };
        let info = info.unwrap_or_else(|| {
            panic!(
                "stratafs exited 0 but {} is not mounted (the mount must be live on return): {}",
                mnt.display(),
                out.describe()
            )
        });
        assert_eq!(
            info.fstype, "fuse.stratafs",
            "fstype in mountinfo: {info:?}"
        );
        Ok(m)
    }

    /// Adopts a mount made some other way (e.g. `stratafs -f` in a child) at `path`.
    pub fn adopt(path: &Path, backend: Backend) -> Mount {
        Mount {
            path: fs::canonicalize(path).expect("mountpoint"),
            backend,
            live: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        if rel.as_os_str().is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    /// Unmounts now and checks that it worked (and that a stratafs daemon exited).
    pub fn unmount(self) {
        if let Err(e) = self.unmount_checked() {
            panic!("{e}");
        }
    }

    /// As [`Mount::unmount`], returning what went wrong instead of panicking.
    pub fn unmount_checked(mut self) -> Result<(), String> {
        let r = self.try_unmount();
        self.live = false;
        r.map_err(|e| format!("unmount {} failed: {e}", self.path.display()))?;
        if is_mounted(&self.path) {
            return Err(format!(
                "{} still mounted after umount",
                self.path.display()
            ));
        }
        if self.backend == Backend::Stratafs
            && !wait_daemon_gone(&self.path, Duration::from_secs(10))
        {
            let pids = daemon_pids(&self.path);
            return Err(format!(
                "stratafs daemon for {} still running 10s after unmount: {}",
                self.path.display(),
                pids.iter()
                    .map(|p| describe_process(*p))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(())
    }

    /// Tells the guard the mount is gone already (unmounted by the test itself).
    pub fn forget(mut self) {
        self.live = false;
    }

    /// `umount MNT`, retried while busy, then a lazy detach as the last resort.
    fn try_unmount(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for i in 0..10 {
            match sys::umount2(&self.path, 0) {
                Ok(()) => return Ok(()),
                Err(e) if sys::is_errno(&e, libc::EINVAL) && !is_mounted(&self.path) => {
                    return Err(format!("not mounted: {e}"));
                }
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(50 * (i + 1)));
                }
            }
        }
        sys::umount2(&self.path, libc::MNT_DETACH)
            .map_err(|e| format!("umount: {last}; umount -l: {e}"))?;
        Err(format!("busy ({last}); detached lazily"))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        self.live = false;
        if let Err(e) = self.try_unmount() {
            eprintln!("warning: unmount {} in drop: {e}", self.path.display());
        }
        if self.backend == Backend::Stratafs {
            wait_daemon_gone(&self.path, Duration::from_secs(2));
        }
    }
}

/// pid, state and each thread's name and wait channel, for a daemon that did not exit.
pub fn describe_process(pid: u32) -> String {
    let dir = format!("/proc/{pid}");
    let state = fs::read_to_string(format!("{dir}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim().chars().next().unwrap_or('?'))
        })
        .unwrap_or('?');
    let mut threads = Vec::new();
    if let Ok(rd) = fs::read_dir(format!("{dir}/task")) {
        for t in rd.flatten() {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let wchan = fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            threads.push(format!("{}:{}", comm.trim(), wchan.trim()));
        }
    }
    format!("pid {pid} state {state} threads [{}]", threads.join(", "))
}

/// A tmpfs mounted for a test (its own filesystem, so its inode numbers start afresh), unmounted
/// when dropped, also while a test panics.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a small tmpfs on the existing directory `path`.
    pub fn mount(path: &Path) -> Tmpfs {
        let path = fs::canonicalize(path).expect("tmpfs mountpoint");
        let out = run_cmd(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("tmpfs"),
                OsStr::new("-o"),
                OsStr::new("size=16m,mode=0755"),
                OsStr::new("stratafs-test"),
                path.as_os_str(),
            ],
            None,
        );
        assert!(out.status.success(), "mount tmpfs: {}", out.describe());
        Tmpfs { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if sys::umount2(&self.path, 0).is_err() {
            // Busy (a mount above still holds it): detach, it goes when the last user does.
            let _ = sys::umount2(&self.path, libc::MNT_DETACH);
        }
    }
}
