//! Filesystem operations that run identically on two mounts, with comparable outcomes.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::sys;
use super::tree::{self, Dirty};

/// One operation; paths are relative to the mount root.
#[derive(Clone, Debug)]
pub enum Op {
    /// pwrite at `offset`, or append when `None`.
    Write {
        path: String,
        offset: Option<u64>,
        data: Vec<u8>,
    },
    Truncate {
        path: String,
        len: u64,
    },
    /// open(O_WRONLY|O_TRUNC) and close.
    OpenTrunc {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    /// lchown.
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    /// utimensat without following symlinks; explicit (sec, nsec) times.
    Utimes {
        path: String,
        atime: (i64, i64),
        mtime: (i64, i64),
    },
    SetXattr {
        path: String,
        name: String,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    GetXattr {
        path: String,
        name: String,
    },
    ListXattr {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    /// open(O_CREAT|O_EXCL) and write `data`.
    Create {
        path: String,
        data: Vec<u8>,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Link {
        from: String,
        to: String,
    },
    Mkfifo {
        path: String,
    },
    Mknod {
        path: String,
        major: u32,
        minor: u32,
    },
    Read {
        path: String,
    },
    ReadDir {
        path: String,
    },
    Stat {
        path: String,
    },
}

impl Op {
    /// Op with `path` fields given as &str.
    pub fn write(path: &str, offset: Option<u64>, data: &[u8]) -> Op {
        Op::Write {
            path: path.into(),
            offset,
            data: data.to_vec(),
        }
    }
    pub fn rename(from: &str, to: &str) -> Op {
        Op::Rename {
            from: from.into(),
            to: to.into(),
            flags: 0,
        }
    }
    pub fn rename_flags(from: &str, to: &str, flags: u32) -> Op {
        Op::Rename {
            from: from.into(),
            to: to.into(),
            flags,
        }
    }
}

fn short(data: &[u8]) -> String {
    if data.len() <= 24 {
        tree::show_bytes(data)
    } else {
        format!(
            "<{} bytes sha {}>",
            data.len(),
            &tree::sha256_bytes(data)[..10]
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { path, offset, data } => match offset {
                Some(o) => write!(f, "pwrite {path} @{o} {}", short(data)),
                None => write!(f, "append {path} {}", short(data)),
            },
            Op::Truncate { path, len } => write!(f, "truncate {path} {len}"),
            Op::OpenTrunc { path } => write!(f, "open(O_TRUNC) {path}"),
            Op::Chmod { path, mode } => write!(f, "chmod {mode:04o} {path}"),
            Op::Chown { path, uid, gid } => write!(f, "lchown {uid}:{gid} {path}"),
            Op::Utimes { path, atime, mtime } => {
                write!(f, "utimes {path} a={atime:?} m={mtime:?}")
            }
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => write!(f, "setxattr {path} {name}={} flags={flags}", short(value)),
            Op::RemoveXattr { path, name } => write!(f, "removexattr {path} {name}"),
            Op::GetXattr { path, name } => write!(f, "getxattr {path} {name}"),
            Op::ListXattr { path } => write!(f, "listxattr {path}"),
            Op::Unlink { path } => write!(f, "unlink {path}"),
            Op::Rmdir { path } => write!(f, "rmdir {path}"),
            Op::Mkdir { path, mode } => write!(f, "mkdir {mode:04o} {path}"),
            Op::Create { path, data } => write!(f, "create {path} {}", short(data)),
            Op::Rename { from, to, flags } => write!(f, "rename {from} -> {to} flags={flags}"),
            Op::Symlink { target, path } => write!(f, "symlink {path} -> {target}"),
            Op::Link { from, to } => write!(f, "link {from} -> {to}"),
            Op::Mkfifo { path } => write!(f, "mkfifo {path}"),
            Op::Mknod { path, major, minor } => write!(f, "mknod c {major}:{minor} {path}"),
            Op::Read { path } => write!(f, "read {path}"),
            Op::ReadDir { path } => write!(f, "readdir {path}"),
            Op::Stat { path } => write!(f, "lstat {path}"),
        }
    }
}

/// What an operation returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Ok with a result to compare (read data, names, attributes).
    Value(String),
    Err(i32),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        !matches!(self, Outcome::Err(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => write!(f, "Ok"),
            Outcome::Value(v) => write!(f, "Ok({v})"),
            Outcome::Err(e) => write!(f, "Err({})", sys::errno_name(*e)),
        }
    }
}

fn at(root: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

fn res(r: io::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(e.raw_os_error().unwrap_or(-1)),
    }
}

fn val(r: io::Result<String>) -> Outcome {
    match r {
        Ok(v) => Outcome::Value(v),
        Err(e) => Outcome::Err(e.raw_os_error().unwrap_or(-1)),
    }
}

/// Runs `op` under `root`. Never follows a final symlink when opening files for data (so no
/// operation can reach outside the mount through an absolute link).
pub fn apply(root: &Path, op: &Op) -> Outcome {
    match op {
        Op::Write { path, offset, data } => res((|| {
            let mut o = OpenOptions::new();
            // O_NONBLOCK: a fifo without a reader fails with ENXIO instead of blocking.
            o.write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
            if offset.is_none() {
                o.append(true);
            }
            let mut f = o.open(at(root, path))?;
            match offset {
                Some(off) => f.write_all_at(data, *off),
                None => f.write_all(data),
            }
        })()),
        Op::Truncate { path, len } => res(sys::truncate(&at(root, path), *len)),
        Op::OpenTrunc { path } => res(OpenOptions::new()
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(at(root, path))
            .map(drop)),
        Op::Chmod { path, mode } => res(fs::set_permissions(
            at(root, path),
            fs::Permissions::from_mode(*mode),
        )),
        Op::Chown { path, uid, gid } => res(std::os::unix::fs::lchown(
            at(root, path),
            Some(*uid),
            Some(*gid),
        )),
        Op::Utimes { path, atime, mtime } => res(sys::set_times(&at(root, path), *atime, *mtime)),
        Op::SetXattr {
            path,
            name,
            value,
            flags,
        } => res(sys::lsetxattr(&at(root, path), name, value, *flags)),
        Op::RemoveXattr { path, name } => res(sys::lremovexattr(&at(root, path), name)),
        Op::GetXattr { path, name } => {
            val(sys::lgetxattr(&at(root, path), name).map(|v| tree::show_bytes(&v)))
        }
        Op::ListXattr { path } => val(sys::llistxattr(&at(root, path)).map(|mut v| {
            v.sort();
            v.join(",")
        })),
        Op::Unlink { path } => res(fs::remove_file(at(root, path))),
        Op::Rmdir { path } => res(fs::remove_dir(at(root, path))),
        Op::Mkdir { path, mode } => res({
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new().mode(*mode).create(at(root, path))
        }),
        Op::Create { path, data } => res((|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(at(root, path))?;
            f.write_all(data)
        })()),
        Op::Rename { from, to, flags } => {
            res(sys::renameat2(&at(root, from), &at(root, to), *flags))
        }
        Op::Symlink { target, path } => res(std::os::unix::fs::symlink(target, at(root, path))),
        Op::Link { from, to } => res(fs::hard_link(at(root, from), at(root, to))),
        Op::Mkfifo { path } => res(sys::mkfifo(&at(root, path), 0o640)),
        Op::Mknod { path, major, minor } => res(sys::mknod(
            &at(root, path),
            libc::S_IFCHR | 0o600,
            *major,
            *minor,
        )),
        Op::Read { path } => val((|| {
            let mut f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(at(root, path))?;
            if !f.metadata()?.is_file() {
                return Ok("<not a regular file>".into());
            }
            let mut v = Vec::new();
            f.read_to_end(&mut v)?;
            Ok(short(&v))
        })()),
        Op::ReadDir { path } => val((|| {
            let mut names: Vec<String> = fs::read_dir(at(root, path))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<_>>()?;
            names.sort();
            Ok(names.join(","))
        })()),
        Op::Stat { path } => val((|| {
            let md = fs::symlink_metadata(at(root, path))?;
            // Directories: no size (host-specific). nlink is compared (kernel: 1 for merged).
            let size = if md.is_dir() { 0 } else { md.size() };
            Ok(format!(
                "mode={:o} {}:{} size={} nlink={}",
                md.mode(),
                md.uid(),
                md.gid(),
                size,
                md.nlink()
            ))
        })()),
    }
}

/// Records which paths `op` (which returned `outcome`) gave a "now" mtime.
pub fn track(dirty: &mut Dirty, op: &Op, outcome: &Outcome) {
    if !outcome.is_ok() {
        // Kernel overlayfs with redirect_dir=on copies a directory up before it checks the
        // rename (ENOTEMPTY, EEXIST...), so a failed rename can still stamp the source's
        // parent with "now"; ext4 and stratafs leave it. Not a time to compare.
        if let Op::Rename { from, .. } = op {
            dirty.mark_parent(from);
        }
        return;
    }
    match op {
        Op::Write { path, .. } | Op::Truncate { path, .. } | Op::OpenTrunc { path } => {
            dirty.mark(path);
        }
        Op::Utimes { path, .. } => dirty.clear(path),
        Op::Unlink { path } | Op::Rmdir { path } => {
            dirty.mark_parent(path);
            dirty.moved(path, "\u{0}gone");
        }
        Op::Mkdir { path, .. }
        | Op::Create { path, .. }
        | Op::Symlink { path, .. }
        | Op::Mkfifo { path }
        | Op::Mknod { path, .. } => {
            dirty.mark(path);
            dirty.mark_parent(path);
        }
        Op::Link { from, to } => {
            dirty.mark_parent(to);
            if dirty.contains(from) {
                dirty.mark(to);
            }
        }
        Op::Rename { from, to, flags } => {
            dirty.mark_parent(from);
            dirty.mark_parent(to);
            if *flags & sys::RENAME_EXCHANGE != 0 {
                dirty.exchanged(from, to);
            } else {
                dirty.moved(from, to);
            }
        }
        Op::Chmod { .. }
        | Op::Chown { .. }
        | Op::SetXattr { .. }
        | Op::RemoveXattr { .. }
        | Op::GetXattr { .. }
        | Op::ListXattr { .. }
        | Op::Read { .. }
        | Op::ReadDir { .. }
        | Op::Stat { .. } => {}
    }
}
