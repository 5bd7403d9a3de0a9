//! The `stratafs` command.
//!
//! Two shapes share one binary: the mount-program form podman, buildah and mount.fuse3 use
//! (`stratafs [SOURCE] MOUNTPOINT -o OPTS [-f] [-d]`), and subcommands (`mount`, `umount`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::{Parser, Subcommand};

use stratafs::daemon::{self, RunMode};
use stratafs::options::{MountOptions, MountPlan};
use stratafs::sys;

const HELP: &str = "\
stratafs: an overlay filesystem in user space (a drop-in for fuse-overlayfs)

Usage:
  stratafs -o lowerdir=L1:L2,upperdir=U,workdir=W[,OPTS] MOUNTPOINT [-f] [-d]
  stratafs SOURCE MOUNTPOINT -o OPTS             (as mount.fuse3 calls it)
  stratafs mount --lower L1 --lower L2 [--upper U --work W] [-o OPTS] MOUNTPOINT
  stratafs umount MOUNTPOINT

The first lowerdir is the topmost. Without upperdir the mount is read-only.
Options: lowerdir, upperdir, workdir, ro, allow_other, allow_root, default_permissions
(always on), nodev, nosuid, noexec, noatime, sync, dirsync, fsname=, subtype=, volatile,
noacl (POSIX ACLs are not enforced).
fuse-overlayfs options that do not apply yet are accepted with a warning.

  -f          stay in the foreground
  -d          log every request to stderr (implies -f)
  -V, --version
  -h, --help
";

#[derive(Parser, Debug)]
#[command(
    name = "stratafs",
    version,
    about = "An overlay filesystem in user space"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Mount layers: lowers topmost first, optionally an upper and work dir.
    Mount {
        #[arg(long = "lower", required = true)]
        lowers: Vec<PathBuf>,
        #[arg(long)]
        upper: Option<PathBuf>,
        #[arg(long)]
        work: Option<PathBuf>,
        /// Extra mount options, as with -o.
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(short = 'f')]
        foreground: bool,
        #[arg(short = 'd')]
        debug: bool,
        mountpoint: PathBuf,
    },
    /// Unmount a stratafs mount (also one whose daemon died).
    #[command(alias = "unmount")]
    Umount {
        /// Detach now, clean up when no longer busy.
        #[arg(short = 'l', long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let first = argv.get(1).and_then(|a| a.to_str());
    // The storage CLIs print listings: a reader that goes (`| head`) ends them by SIGPIPE.
    // Not `serve`, a gRPC server that writes to sockets, nor the mount daemon; a daemon these
    // commands start is this binary again, whose runtime ignores SIGPIPE anew at exec.
    if matches!(first, Some("layers" | "image" | "snapshots")) {
        sys::default_sigpipe();
    }
    let res = match first {
        Some("mount" | "umount" | "unmount" | "help") => subcommand(&argv),
        Some("layers" | "image") => stratafs::storage::layers::cli::run(&argv),
        Some("snapshots" | "serve") => stratafs::storage::snapshots::cli::run(&argv),
        _ => legacy(&argv),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratafs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn subcommand(argv: &[OsString]) -> Result<()> {
    let cli = Cli::parse_from(argv);
    match cli.cmd {
        Sub::Mount {
            lowers,
            upper,
            work,
            options,
            foreground,
            debug,
            mountpoint,
        } => {
            let mut o = MountOptions::default();
            for s in &options {
                o.parse_into(s)?;
            }
            o.lowers = lowers;
            o.upper = upper;
            o.work = work;
            let plan = MountPlan::validate(o, &mountpoint)?;
            let mode = RunMode {
                foreground: foreground || debug,
                debug,
            };
            daemon::run(&plan, mode, argv)
        }
        Sub::Umount { lazy, mountpoint } => umount(&mountpoint, lazy),
    }
}

/// Unmounts, then waits (up to `DaemonExit::LIMIT`) for the daemon to exit, so that what
/// follows finds the layers closed. A lazy unmount does not wait: the mount may stay busy
/// for long.
fn umount(mnt: &Path, lazy: bool) -> Result<()> {
    let abs = std::path::absolute(mnt)?;
    let watch = if lazy {
        None
    } else {
        daemon::DaemonExit::watch(&abs)
    };
    unmount_only(&abs, lazy)?;
    if let Some(w) = watch
        && !w.wait()
    {
        eprintln!(
            "stratafs: '{}' is unmounted, but its daemon is still running after {:?}",
            abs.display(),
            daemon::DaemonExit::LIMIT
        );
    }
    Ok(())
}

fn unmount_only(abs: &Path, lazy: bool) -> Result<()> {
    match sys::umount(abs.as_os_str(), lazy) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            // Not root: the setuid helper may unmount a FUSE mount we own.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let st = cmd.arg(abs).status()?;
            if st.success() {
                Ok(())
            } else {
                bail!("fusermount3 -u '{}' failed ({st})", abs.display())
            }
        }
        Err(e) => Err(anyhow!("cannot unmount '{}': {e}", abs.display())),
    }
}

/// Writes `text` to stdout in one write. A reader that has already gone (`--version | head`)
/// is not an error: what it wanted was delivered or not wanted.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn legacy(argv: &[OsString]) -> Result<()> {
    let mut opts = MountOptions::default();
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut mode = RunMode::default();
    let mut it = argv.iter().skip(1);
    let mut only_positional = false;
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if only_positional || !s.starts_with('-') || s == "-" {
            positional.push(PathBuf::from(a));
            continue;
        }
        match s.as_ref() {
            "--" => only_positional = true,
            "-o" => {
                let v = it.next().ok_or_else(|| anyhow!("-o needs a value"))?;
                opts.parse_into(&v.to_string_lossy())?;
            }
            "-f" | "--foreground" => mode.foreground = true,
            "-d" | "--debug" => {
                mode.debug = true;
                mode.foreground = true;
            }
            // Single-threaded / other libfuse flags: harmless to accept.
            "-s" => {}
            "-h" | "--help" => return print_out(HELP),
            "-V" | "--version" => {
                return print_out(&format!(
                    "stratafs: version {}\nFUSE library: fuser 0.18 (pure Rust, kernel interface 7.x)\n",
                    env!("CARGO_PKG_VERSION")
                ));
            }
            _ if s.starts_with("-o") => opts.parse_into(&s[2..])?,
            _ => bail!("unknown flag '{s}' (see --help)"),
        }
    }
    let mountpoint = match positional.len() {
        1 => positional.pop().expect("one"),
        2 => {
            let mnt = positional.pop().expect("two");
            let source = positional.pop().expect("two");
            if opts.fsname.is_none() {
                opts.fsname = Some(source.to_string_lossy().into_owned());
            }
            mnt
        }
        0 => bail!("no mountpoint given (see --help)"),
        _ => bail!("too many arguments: expected [SOURCE] MOUNTPOINT (see --help)"),
    };
    let plan = MountPlan::validate(opts, &mountpoint)?;
    daemon::run(&plan, mode, argv)
}
