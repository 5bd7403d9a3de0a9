//! Performing the mounts the driver hands out (what containerd's `mount.All` does), for the
//! CLI's `mount` command and for tests.
//!
//! - `bind`: `mount -o OPTS SOURCE TARGET` (util-linux remounts read-only binds itself);
//! - `overlay`: `mount -t overlay`; when the options do not fit in the kernel's one page, the
//!   lower directories are given relative to their common parent (the command runs there), as
//!   containerd does;
//! - `fuse3.stratafs` (or `fuse.stratafs`): `stratafs overlay TARGET -o OPTS`, which returns
//!   once the mount is live.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::process::Command;

use super::{Error, Mount, Result};
use crate::sys;

/// The kernel copies at most one page of mount data.
const PAGE_SIZE: usize = 4096;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::io(format!("run {cmd:?}"), e))?;
    if !out.status.success() {
        return Err(Error::io(
            format!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            io::Error::other("mount failed"),
        ));
    }
    Ok(())
}

/// Mounts `mounts` one over the other at `target`.
pub fn mount_all(mounts: &[Mount], target: &Path, stratafs_bin: &Path) -> Result<()> {
    for m in mounts {
        mount_one(m, target, stratafs_bin)?;
    }
    Ok(())
}

fn mount_one(m: &Mount, target: &Path, stratafs_bin: &Path) -> Result<()> {
    match m.kind.as_str() {
        "bind" | "rbind" => {
            let mut opts = m.options.clone();
            if !opts.iter().any(|o| o == "bind" || o == "rbind") {
                opts.push("bind".into());
            }
            run(Command::new("mount")
                .arg("-o")
                .arg(opts.join(","))
                .arg(&m.source)
                .arg(target))
        }
        "overlay" => {
            let opts = m.options.join(",");
            let mut cmd = Command::new("mount");
            let opts = if opts.len() >= PAGE_SIZE {
                let (dir, compact) = compact_lowerdirs(&m.options).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "overlay options of {} bytes do not fit in a page",
                        opts.len()
                    ))
                })?;
                cmd.current_dir(dir);
                compact
            } else {
                opts
            };
            run(cmd
                .args(["-t", "overlay", "-o"])
                .arg(opts)
                .arg(&m.source)
                .arg(target))
        }
        "fuse3.stratafs" | "fuse.stratafs" => run(Command::new(stratafs_bin)
            .arg(&m.source)
            .arg(target)
            .arg("-o")
            .arg(m.options.join(","))),
        other => Err(Error::InvalidArgument(format!(
            "unsupported mount type {other}"
        ))),
    }
}

/// Rewrites `lowerdir=` relative to the lower directories' common parent: returns that parent
/// and the new option string.
fn compact_lowerdirs(options: &[String]) -> Option<(String, String)> {
    let lowers: Vec<&str> = options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))?
        .split(':')
        .collect();
    let first = Path::new(lowers[0]);
    let mut common = first.parent()?;
    // The common prefix of all lowers' grandparents (`<root>/snapshots/<id>/fs` → `<root>/snapshots`).
    while !lowers.iter().all(|l| Path::new(l).starts_with(common)) {
        common = common.parent()?;
    }
    if common == Path::new("/") {
        return None;
    }
    let prefix = common.to_str()?;
    let rel: Vec<&str> = lowers
        .iter()
        .map(|l| l[prefix.len()..].trim_start_matches('/'))
        .collect();
    let opts: Vec<String> = options
        .iter()
        .map(|o| {
            if o.starts_with("lowerdir=") {
                format!("lowerdir={}", rel.join(":"))
            } else {
                o.clone()
            }
        })
        .collect();
    let joined = opts.join(",");
    (joined.len() < PAGE_SIZE).then(|| (prefix.to_owned(), joined))
}

/// Unmounts `target`, retrying a few times while it is busy. A stratafs mount's daemon is
/// waited for (up to `DaemonExit::LIMIT`), so that the snapshot's dirs are closed when this
/// returns.
pub fn unmount(target: &Path) -> Result<()> {
    let mut delay = std::time::Duration::from_millis(10);
    let watch = crate::daemon::DaemonExit::watch(target);
    for attempt in 0.. {
        match sys::umount(OsStr::new(target), false) {
            Ok(()) => {
                if let Some(w) = watch
                    && !w.wait()
                {
                    tracing::warn!(
                        "{}: the daemon still runs {:?} after unmount",
                        target.display(),
                        crate::daemon::DaemonExit::LIMIT
                    );
                }
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 8 => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => return Err(Error::io(format!("unmount {}", target.display()), e)),
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_to_common_parent() {
        let lowers: Vec<String> = (1..=200)
            .map(|i| format!("/var/lib/stratafs/snapshots/{i}/fs"))
            .collect();
        let opts = vec![
            "workdir=/var/lib/stratafs/snapshots/300/work".to_string(),
            "upperdir=/var/lib/stratafs/snapshots/300/fs".to_string(),
            format!("lowerdir={}", lowers.join(":")),
        ];
        let (dir, compact) = compact_lowerdirs(&opts).unwrap();
        assert_eq!(dir, "/var/lib/stratafs/snapshots");
        assert!(compact.contains("lowerdir=1/fs:2/fs:"));
        assert!(compact.starts_with("workdir=/var/lib/stratafs/snapshots/300/work,"));
        assert!(compact.len() < PAGE_SIZE);
    }
}
