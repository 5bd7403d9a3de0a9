//! Running a mount: in the foreground, or detached the way mount programs must be (the caller
//! gets its exit status once the mount is live, and no inherited stdio stays open).
//!
//! Detaching re-executes this binary with `-f` and the `STRATAFS_NOTIFY` variable set; the child
//! reports on its stdout (a pipe to the parent) either `ready` or the error line, then points
//! stdout at /dev/null. No fork after threads exist.

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use fuser::{Config, MountOption, SessionACL};

use crate::options::MountPlan;
use crate::overlay::{FsConfig, FuseFs, OverlayFs, uring};
use crate::sys;

const NOTIFY_ENV: &str = "STRATAFS_NOTIFY";

/// How the daemon runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunMode {
    pub foreground: bool,
    pub debug: bool,
}

/// Mounts `plan`. Detached (the default), returns once the mount is live; in the foreground,
/// returns when it is unmounted.
pub fn run(plan: &MountPlan, mode: RunMode, argv: &[OsString]) -> Result<()> {
    if !mode.foreground {
        return spawn_detached(argv);
    }
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    if notify {
        // SAFETY-free: setsid fails only if we already lead a group, which is harmless.
        let _ = sys::setsid();
    }
    match serve(plan, mode, notify) {
        Ok(()) => Ok(()),
        Err(e) if notify => {
            // The parent prints it; our stderr is closed.
            let _ = writeln!(io::stdout(), "error: {e:#}");
            Err(e)
        }
        Err(e) => Err(e),
    }
}

fn spawn_detached(argv: &[OsString]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the stratafs binary")?;
    let mut child = Command::new(exe)
        .args(&argv[1..])
        .arg("-f")
        .env(NOTIFY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the stratafs daemon")?;
    let out = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(out).lines();
    let mut errors = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap_or_default();
        if line == "ready" {
            return Ok(());
        }
        if let Some(w) = line.strip_prefix("warning: ") {
            eprintln!("stratafs: warning: {w}");
        } else {
            errors.push(line);
        }
    }
    let status = child.wait()?;
    let msg = errors
        .iter()
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("; ");
    if msg.is_empty() {
        Err(anyhow!(
            "the daemon exited before the mount was live ({status})"
        ))
    } else {
        Err(anyhow!(msg))
    }
}

fn serve(plan: &MountPlan, mode: RunMode, notify: bool) -> Result<()> {
    let o = &plan.options;
    for w in &o.ignored {
        let line = format!("warning: option '{w}' is accepted but not applied yet");
        if notify {
            println!("{line}");
        } else {
            eprintln!("stratafs: {line}");
        }
    }
    // Modes of new objects come from the caller's request, not from our umask.
    sys::set_umask(0);
    // As many fds as the kernel allows a process (fs.nr_open), up to 2^20: a node holds one
    // per layer object, and past 3/4 of the limit the reaper makes the kernel forget cached
    // entries (and their listings), so a low limit makes warm walks of big trees cold again.
    // STRATAFS_NOFILE_MAX caps it (the reaper's own test runs with a small limit).
    let number = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let want = [
        number(std::fs::read_to_string("/proc/sys/fs/nr_open").ok()),
        number(std::env::var("STRATAFS_NOFILE_MAX").ok()),
    ]
    .into_iter()
    .flatten()
    .fold(1 << 20, u64::min);
    let fd_limit = sys::raise_nofile_limit(want).unwrap_or(1024);
    let read_ahead_kb = read_ahead_from_env().map_err(anyhow::Error::msg)?;
    let root = sys::geteuid() == 0;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        // At least 4: a worker waiting for fds (see `openat_retry`) must leave others to
        // serve the FORGETs that free them.
        .clamp(4, 16);
    let cfg = FsConfig {
        lowers: plan.lowers.clone(),
        upper: if o.read_only {
            None
        } else {
            plan.upper.clone()
        },
        work: if o.read_only { None } else { plan.work.clone() },
        // Every change goes through the kernel, which updates or drops what it cached; the
        // layers are not to be changed behind the mount's back (as with the kernel's overlayfs).
        ttl: Duration::from_secs(3600),
        threads,
        // Passthrough needs CAP_SYS_ADMIN in the initial user namespace, not just uid 0.
        passthrough: root
            && initial_user_namespace()
            && std::env::var_os("STRATAFS_NO_PASSTHROUGH").is_none(),
        // FUSE over io_uring when the kernel offers it (the fuse module's enable_uring),
        // unless turned off.
        uring: std::env::var_os("STRATAFS_NO_URING").is_none(),
        metacopy: o.metacopy.unwrap_or(true),
        redirect_dir: o.redirect_dir.unwrap_or(true),
        index: o.index.unwrap_or(true),
        ownership: o.ownership.clone(),
        fd_limit,
        readdirplus_attrs: crate::overlay::rdplus::Mode::from_env().map_err(anyhow::Error::msg)?,
        posix_acl: !o.noacl && o.ownership.is_plain(),
    };
    let fs = Arc::new(OverlayFs::new(&cfg).context("cannot open the layers")?);
    let served = fs.clone();
    let dev_cell = fs.mount_dev_cell();
    let reaper = fs.reaper();
    let notifier_cell = fs.notifier_cell();
    let mut mount_options = vec![
        MountOption::FSName(o.fsname.clone().unwrap_or_else(|| "stratafs".to_string())),
        MountOption::Subtype(o.subtype.clone().unwrap_or_else(|| "stratafs".to_string())),
        MountOption::DefaultPermissions,
    ];
    if o.read_only || plan.upper.is_none() {
        mount_options.push(MountOption::RO);
    }
    for (on, opt) in [
        (o.nodev, MountOption::NoDev),
        (o.nosuid, MountOption::NoSuid),
        (o.noexec, MountOption::NoExec),
        (o.noatime, MountOption::NoAtime),
        (o.sync, MountOption::Sync),
        (o.dirsync, MountOption::DirSync),
    ] {
        if on {
            mount_options.push(opt);
        }
    }
    if root && !o.nodev {
        mount_options.push(MountOption::Dev);
    }
    if root && !o.nosuid {
        mount_options.push(MountOption::Suid);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    // As root the mount serves every user, as the kernel's overlayfs does; otherwise only
    // when asked.
    config.acl = if o.allow_other || root {
        SessionACL::All
    } else if o.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(threads);
    config.clone_fd = true;
    if mode.debug {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(io::stderr)
            .try_init();
    }
    // Signals are waited for by one thread; block them before any thread starts.
    sys::block_termination_signals()?;
    let mnt = plan.mountpoint.clone();
    let (session, mut unmount): (_, Box<dyn FnMut() + Send>) = if root {
        // Our own mount(2): the mount shows as fuse.SUBTYPE, and nothing at exit unmounts
        // whatever a later mount put at the same path.
        let fstype = format!("fuse.{}", o.subtype.as_deref().unwrap_or("stratafs"));
        let source = o.fsname.clone().unwrap_or_else(|| "stratafs".to_string());
        let mut data = String::from("default_permissions");
        if !matches!(config.acl, SessionACL::Owner) {
            data.push_str(",allow_other");
        }
        let flags = sys::MountFlags {
            read_only: o.read_only || plan.upper.is_none(),
            nosuid: o.nosuid,
            nodev: o.nodev,
            noexec: o.noexec,
            noatime: o.noatime,
            sync: o.sync,
            dirsync: o.dirsync,
        };
        let dev = sys::mount_fuse(OsStr::new(&source), mnt.as_os_str(), &fstype, flags, &data)
            .with_context(|| format!("cannot mount on '{}'", mnt.display()))?;
        let session = match fuser::Session::from_fd(FuseFs(fs), dev, config.acl, config.clone()) {
            Ok(s) => s,
            Err(e) => {
                let _ = sys::umount(mnt.as_os_str(), true);
                return Err(e).context("FUSE handshake failed");
            }
        };
        let m = mnt.clone();
        (
            session,
            Box::new(move || {
                if sys::umount(m.as_os_str(), false).is_err() {
                    let _ = sys::umount(m.as_os_str(), true);
                }
            }),
        )
    } else {
        let mut session = fuser::Session::new(FuseFs(fs), &mnt, &config)
            .with_context(|| format!("cannot mount on '{}'", mnt.display()))?;
        let mut unmounter = session.unmount_callable();
        (
            session,
            Box::new(move || {
                let _ = unmounter.unmount();
            }),
        )
    };
    if served.uring_offered() {
        let started = session.as_fd().try_clone_to_owned().and_then(|dev| {
            let acl = uring::Acl {
                allowed: config.acl,
                owner: sys::geteuid(),
            };
            uring::start(served.clone(), dev, acl)
        });
        match started {
            Ok(()) => served.set_rings_running(uring::forget_pause()),
            Err(e) => tracing::warn!("FUSE over io_uring not started ({e}); serving /dev/fuse"),
        }
    }
    // The mount's st_dev, from mountinfo: a stat of the mountpoint would wait on ourselves.
    if let Some((maj, min)) = mount_majmin(&mnt) {
        let _ = dev_cell.set(sys::makedev(maj, min));
        if let Some(kb) = read_ahead_kb {
            set_read_ahead(maj, min, kb);
        }
        hold_exit_socket(maj, min);
    }
    if notify {
        println!("ready");
        let _ = io::stdout().flush();
        let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        sys::dup2(devnull.as_fd(), 1)?;
    }
    let notifier = session.notifier();
    let _ = notifier_cell.set(session.notifier());
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper.run(notifier))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            sys::wait_termination_signal();
            unmount();
        })?;
    session.run().context("FUSE session failed")?;
    // `STRATAFS_FAILPOINT=slow-exit:MS`: the daemon outlives its mount by MS milliseconds
    // (what a daemon still closing many files looks like to `stratafs umount`).
    if let Some(ms) = crate::overlay::failpoint("slow-exit").and_then(|v| v.to_str()?.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    Ok(())
}

/// How many exit sockets a device number has. The kernel gives a freed minor to the next mount
/// at once, while the daemon of the earlier mount may still be closing its layers and holding
/// the first name; the new daemon then takes the next free slot.
const EXIT_SLOTS: u32 = 8;

/// The abstract unix socket in `slot` for the mount with device `maj:min`.
fn exit_socket(maj: u32, min: u32, slot: u32) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    let name = match slot {
        0 => format!("stratafs/daemon/{maj}:{min}"),
        k => format!("stratafs/daemon/{maj}:{min}.{k}"),
    };
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

/// Binds the first free exit socket of the mount and leaks it: it closes only when the process
/// ends, which is what `stratafs umount` waits for. Nothing accepts on it; a connection waits in
/// the backlog and is reset when the listener goes.
fn hold_exit_socket(maj: u32, min: u32) {
    let mut last = None;
    for slot in 0..EXIT_SLOTS {
        match exit_socket(maj, min, slot)
            .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
        {
            Ok(l) => {
                std::mem::forget(l);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    if let Some(e) = last {
        tracing::warn!("no exit socket ({e}): `stratafs umount` will not wait for us");
    }
}

/// Connections to the exit sockets of a mount's device, made before unmounting it: the daemon
/// serving it, and any earlier daemon of a mount with the same device number that is still
/// exiting. Waiting for those too is conservative: they are on their way out.
pub struct DaemonExit(Vec<std::os::unix::net::UnixStream>);

impl DaemonExit {
    /// Connects to the exit sockets of the stratafs daemon serving `mnt`, if there is one (not
    /// for another filesystem, a daemon that died, or one in another network namespace).
    /// Only sockets held by root or by the mount's owner (`user_id=`) count: another user
    /// squatting a name cannot make an unmount wait.
    pub fn watch(mnt: &std::path::Path) -> Option<DaemonExit> {
        let line = mountinfo_line(mnt)?;
        let (maj, min) = majmin_of(&line)?;
        let owner = owner_of(&line);
        let conns: Vec<_> = (0..EXIT_SLOTS)
            .filter_map(|slot| {
                let addr = exit_socket(maj, min, slot).ok()?;
                let s = std::os::unix::net::UnixStream::connect_addr(&addr).ok()?;
                let uid = sys::peer_uid(s.as_fd()).ok()?;
                (uid == 0 || Some(uid) == owner).then_some(s)
            })
            .collect();
        (!conns.is_empty()).then_some(DaemonExit(conns))
    }

    /// How long an unmounter waits for the daemon to exit.
    pub const LIMIT: Duration = Duration::from_secs(60);

    /// Waits until every watched daemon has exited (its socket closed), at most
    /// [`Self::LIMIT`] in all. False: one still runs then.
    pub fn wait(self) -> bool {
        let deadline = std::time::Instant::now() + Self::LIMIT;
        self.0.into_iter().all(|s| closed_by(s, deadline))
    }
}

/// Reads `s` until its peer has gone (EOF or reset) or `deadline` passes (false).
fn closed_by(mut s: std::os::unix::net::UnixStream, deadline: std::time::Instant) -> bool {
    use std::io::Read;
    let mut b = [0u8; 1];
    loop {
        // Past the deadline, one last look that does not wait: a peer gone just then counts.
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(1));
        if s.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// `STRATAFS_READ_AHEAD_KB=N` (4..=65536): the readahead of this mount, which the kernel starts
/// at 128 KiB for every FUSE mount. Larger makes cold sequential reads and mmap read-around
/// come in fewer, bigger READs (up to the 1 MiB a request carries), at the cost of reading more
/// around random page faults, so it is not the default.
fn read_ahead_from_env() -> Result<Option<u32>, String> {
    let Ok(v) = std::env::var("STRATAFS_READ_AHEAD_KB") else {
        return Ok(None);
    };
    match v.trim().parse::<u32>() {
        Ok(kb) if (4..=65536).contains(&kb) => Ok(Some(kb)),
        _ => Err(format!(
            "STRATAFS_READ_AHEAD_KB={v}: want a number of KiB from 4 to 65536"
        )),
    }
}

/// Sets the mount's bdi `read_ahead_kb` (root only: where it cannot, the mount goes on with
/// the kernel's 128 KiB, and says so).
fn set_read_ahead(maj: u32, min: u32, kb: u32) {
    let path = format!("/sys/class/bdi/{maj}:{min}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{kb}\n")) {
        tracing::warn!("readahead stays at the kernel's ({path}: {e})");
    }
}

/// The line of /proc/self/mountinfo for the mount at `mnt` (the topmost one there).
fn mountinfo_line(mnt: &std::path::Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_string_lossy();
    info.lines()
        .rev()
        .find(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| crate::options::unescape_mountinfo(m) == want)
        })
        .map(str::to_owned)
}

/// The `user_id=` (the uid that mounted it) of a FUSE mount's mountinfo line.
fn owner_of(line: &str) -> Option<u32> {
    let (_, post) = line.split_once(" - ")?;
    post.split(' ')
        .nth(2)?
        .split(',')
        .find_map(|o| o.strip_prefix("user_id=")?.parse().ok())
}

/// The `major:minor` of a mountinfo line.
fn majmin_of(line: &str) -> Option<(u32, u32)> {
    let (maj, min) = line.split(' ').nth(2)?.split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// The `major:minor` of the mount at `mnt`, read from /proc/self/mountinfo.
pub(crate) fn mount_majmin(mnt: &std::path::Path) -> Option<(u32, u32)> {
    majmin_of(&mountinfo_line(mnt)?)
}

/// Are we in the initial user namespace (where uid 0 holds real capabilities)?
fn initial_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        f == ["0", "0", "4294967295"]
    })
}
