//! Full tree copies for the `native` backend: data shared by FICLONE where the filesystem can,
//! else copied; owners, modes, xattrs, times, symlinks, device nodes and hard links kept.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::{IoContext, Result};
use crate::sys;

/// Copies the tree at `src` to the new path `dst`.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut links = HashMap::new();
    let meta = fs::symlink_metadata(src).ctx("stat", src)?;
    copy_entry(src, dst, &meta, &mut links)
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    meta: &fs::Metadata,
    links: &mut HashMap<(u64, u64), std::path::PathBuf>,
) -> Result<()> {
    let ft = meta.file_type();
    if !ft.is_dir() && meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            return fs::hard_link(first, dst).ctx("link", dst);
        }
        links.insert((meta.dev(), meta.ino()), dst.to_path_buf());
    }
    if ft.is_dir() {
        fs::create_dir(dst).ctx("create", dst)?;
        for entry in fs::read_dir(src).ctx("read", src)? {
            let entry = entry.ctx("read", src)?;
            let child = entry.path();
            let m = fs::symlink_metadata(&child).ctx("stat", &child)?;
            copy_entry(&child, &dst.join(entry.file_name()), &m, links)?;
        }
    } else if ft.is_file() {
        let from = File::open(src).ctx("open", src)?;
        let to = File::create_new(dst).ctx("create", dst)?;
        copy_data(&from, &to, meta.len()).ctx("copy data to", dst)?;
    } else if ft.is_symlink() {
        let target = fs::read_link(src).ctx("readlink", src)?;
        std::os::unix::fs::symlink(&target, dst).ctx("symlink", dst)?;
    } else {
        // Devices, FIFOs, sockets.
        let parent = dst.parent().expect("a child path has a parent");
        let dir = File::open(parent).ctx("open", parent)?;
        let name = dst.file_name().unwrap_or(OsStr::new(""));
        sys::mknodat(dir.as_fd(), name, meta.mode(), meta.rdev()).ctx("mknod", dst)?;
    }
    copy_metadata(src, dst, meta)
}

fn copy_data(from: &File, to: &File, len: u64) -> io::Result<()> {
    if sys::ficlone(to.as_fd(), from.as_fd()).is_ok() {
        return Ok(());
    }
    let (mut off_in, mut off_out) = (0i64, 0i64);
    while (off_in as u64) < len {
        let want = (len - off_in as u64).min(1 << 30) as usize;
        match sys::copy_file_range(from.as_fd(), &mut off_in, to.as_fd(), &mut off_out, want) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if off_in == 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                    ) =>
            {
                let mut r = from;
                let mut w = to;
                io::copy(&mut r, &mut w)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_metadata(src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<()> {
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid())).ctx("chown", dst)?;
    for name in xattr::list(src).ctx("list xattrs of", src)? {
        if let Some(value) = xattr::get(src, &name).ctx("read xattr of", src)? {
            xattr::set(dst, &name, &value).ctx("set xattr on", dst)?;
        }
    }
    let is_link = meta.file_type().is_symlink();
    if !is_link {
        // After chown, which clears set-id bits.
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .ctx("chmod", dst)?;
    }
    let flags = libc::O_PATH | libc::O_NOFOLLOW;
    let fd = sys::open(&sys::cstr(dst.as_os_str()).ctx("open", dst)?, flags, 0).ctx("open", dst)?;
    sys::utimens_fd(
        fd.as_fd(),
        sys::SetTime::At(meta.atime(), meta.atime_nsec()),
        sys::SetTime::At(meta.mtime(), meta.mtime_nsec()),
    )
    .ctx("set times of", dst)
}
