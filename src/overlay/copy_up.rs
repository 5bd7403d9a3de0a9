//! Copy-up: bringing a lower object into the upper layer before it is changed.
//!
//! The copy is built under a temporary name in the work directory (same filesystem as the
//! upper) and renamed into place as the last step, so the upper layer only ever holds the old
//! state (nothing) or the complete copy. Parents are copied first. Data goes by FICLONE, then
//! copy_file_range over the data extents only (holes stay holes), then read/write.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::inode::Node;
use super::{OverlayFs, errno, is_dir, layer};
use crate::sys::{self, SetTime};

/// How much of an object a change needs in the upper layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyUp {
    /// Everything, data included (a write).
    Data,
    /// Metadata only (chmod, chown, utimens, xattrs): a regular file becomes a metacopy file,
    /// its data staying below until the first write.
    Meta,
    /// Metadata, and the data is about to be truncated away (`O_TRUNC`, truncate to 0).
    Truncate,
}

impl OverlayFs {
    /// Makes sure `node` exists in the upper layer with what `how` needs, and returns its
    /// upper fd.
    pub(super) fn copy_up(&self, node: &Arc<Node>, how: CopyUp) -> io::Result<Arc<OwnedFd>> {
        {
            let s = node.state.read();
            if let Some(fd) = &s.upper
                && (!s.metacopy || how == CopyUp::Meta)
            {
                return Ok(fd.clone());
            }
        }
        self.work()?;
        let _guard = node.copy_lock.lock();
        if let Some(slow) = super::fuse::failpoint("slow-copy-up")
            && node.state.read().name == slow
        {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        let (parent, name, src) = {
            let s = node.state.read();
            if let Some(fd) = s.upper.clone() {
                if !s.metacopy || how == CopyUp::Meta {
                    return Ok(fd);
                }
                let src = s.lowers.iter().find(|l| !l.metacopy).map(|l| l.fd.clone());
                drop(s);
                self.fill_metacopy(node, &fd, src, how)?;
                return Ok(fd);
            }
            if s.unlinked {
                // Its name is gone: a copy would bring a deleted file back.
                return Err(errno(libc::ENOENT));
            }
            // Which name of a hard link a change came through, FUSE does not say: prefer one
            // whose directory is in the upper layer already, so no directory is copied up
            // for it.
            let (parent, name) = match s
                .aliases
                .iter()
                .rev()
                .find(|(p, _)| p.state.read().upper.is_some())
            {
                Some((p, n))
                    if s.parent
                        .as_ref()
                        .is_none_or(|pp| pp.state.read().upper.is_none()) =>
                {
                    (p.clone(), n.clone())
                }
                _ => (
                    s.parent.clone().ok_or_else(|| errno(libc::ESTALE))?,
                    s.name.clone(),
                ),
            };
            if let Some(index) = s.index.clone() {
                // Another name of this hard link was copied up already: join its inode.
                drop(s);
                self.copy_up(&parent, CopyUp::Meta)?;
                let fd = self.link_indexed(&parent, &name, index.as_fd())?;
                self.copied_up();
                let mut s = node.state.write();
                s.upper = Some(fd.clone());
                s.index = None;
                return Ok(fd);
            }
            let src = s.lowers.first().map(|l| l.fd.clone());
            let data = s.data().cloned();
            (
                parent,
                name,
                (src.ok_or_else(|| errno(libc::ESTALE))?, data),
            )
        };
        let (src, data) = src;
        self.copy_up(&parent, CopyUp::Meta)?;
        let how = if self.metacopy {
            how
        } else if how == CopyUp::Meta {
            CopyUp::Data
        } else {
            how
        };
        let data_fd = data.as_ref().map(|d| d.as_fd());
        let (fd, meta) = self.retry_enospc(|| {
            self.copy_up_obj(&parent, &name, src.as_fd(), data_fd, how, node.st_ino)
        })?;
        self.copied_up();
        let mut s = node.state.write();
        s.upper = Some(fd.clone());
        s.metacopy = meta;
        drop(s);
        if node.is_dir {
            // Now merged: its link count shows as 1, as the kernel shows merged dirs.
            self.invalidate_attr(node.st_ino);
        }
        Ok(fd)
    }

    /// Runs `op` (a copy into the upper layer, which must be safe to redo) again on ENOSPC
    /// while space may be on its way back: a removed file's space returns only when the
    /// kernel forgets its inode (the daemon holds an fd until then), so while the table
    /// still holds a removed object, pending FORGETs get a moment (up to 3 s on a loaded
    /// machine). A truly full upper fails after 200 ms.
    fn retry_enospc<T>(&self, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let mut tries = 0;
        loop {
            match op() {
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOSPC)
                        && tries < 60
                        && (tries < 4 || self.table.holds_removed()) =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    /// Completes a metacopy file: copies the data into the upper file itself, then drops the
    /// metacopy mark. Until the mark is gone the data is read from below, so a crash in between
    /// leaves the old state.
    fn fill_metacopy(
        &self,
        node: &Node,
        upper: &OwnedFd,
        src: Option<Arc<OwnedFd>>,
        how: CopyUp,
    ) -> io::Result<()> {
        let times = sys::fstat(upper.as_fd())?;
        let out = sys::reopen(upper.as_fd(), libc::O_WRONLY)?;
        if how == CopyUp::Truncate {
            sys::ftruncate(out.as_fd(), 0)?;
        } else {
            let src = src.ok_or_else(|| errno(libc::EIO))?;
            let input = sys::reopen(src.as_fd(), libc::O_RDONLY)?;
            let size = sys::fstat(input.as_fd())?.st_size;
            // Redoing the copy rewrites the same bytes; the mark stays until it succeeded.
            self.retry_enospc(|| {
                copy_data(input.as_fd(), out.as_fd(), size)?;
                sys::fsync(out.as_fd(), true)
            })?;
        }
        // Filling in the data is not a change the user made: keep the file's times.
        restore_times(out.as_fd(), &times)?;
        match sys::remove_xattr(upper.as_fd(), self.style.metacopy_xattr()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
        node.state.write().metacopy = false;
        Ok(())
    }

    /// Copies the lower object `src` to `name` in `parent`'s upper directory and returns an fd
    /// of the copy, and whether it is a metacopy file. The caller guarantees the name is free
    /// there.
    pub(super) fn copy_up_obj(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        src: BorrowedFd<'_>,
        data: Option<BorrowedFd<'_>>,
        how: CopyUp,
        st_ino: u64,
    ) -> io::Result<(Arc<OwnedFd>, bool)> {
        let pupper = parent
            .state
            .read()
            .upper
            .clone()
            .ok_or_else(|| errno(libc::ESTALE))?;
        let work = self.work()?;
        let st = sys::fstat(src)?;
        let indexed =
            self.index.is_some() && st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink > 1;
        if indexed && let Some((fd, _)) = self.index_lookup(st_ino)? {
            return Ok((self.link_indexed(parent, name, fd.as_fd())?, false));
        }
        // Hard links are copied whole: a metacopy inode shared by names in other
        // directories could not find its data by name.
        let meta = how == CopyUp::Meta
            && self.metacopy
            && !indexed
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_size > 0;
        let tmp = self.tmp_name();
        let mut origin_written = false;
        let built = self
            .build_copy(work, &tmp, src, data.unwrap_or(src), &st, how, meta, st_ino)
            .and_then(|written| {
                origin_written = written;
                if !indexed {
                    return Ok(());
                }
                // Every name of this inode below joins this copy through the index; it counts
                // the names the merged view shows.
                sys::set_xattr(
                    sys_fd_of(work, &tmp)?.as_fd(),
                    self.style.nlink_xattr(),
                    &(st.st_nlink as u32).to_le_bytes(),
                    0,
                )?;
                let index = self.index.as_ref().ok_or_else(|| errno(libc::EIO))?;
                sys::linkat(work, &tmp, index.as_fd(), &super::index_name(st_ino))
            })
            .and_then(|()| {
                // A copy-up is no change of the parent: keep its times, as the kernel does.
                let times = sys::fstat(pupper.as_fd())?;
                sys::renameat2(work, &tmp, pupper.as_fd(), name, sys::RENAME_NOREPLACE)?;
                restore_times(pupper.as_fd(), &times)
            });
        if let Err(e) = built {
            let _ = super::dir::remove_entry(work, &tmp);
            return Err(e);
        }
        self.mark_impure(parent)?;
        let flags = if is_dir(&st) {
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
        } else {
            libc::O_PATH | libc::O_NOFOLLOW
        };
        let fd = sys::openat(pupper.as_fd(), name, flags, 0)?;
        if !origin_written {
            // Only where the origin xattr could not be written: a stale entry would give a
            // later object reusing this inode number the wrong st_ino.
            let ust = sys::fstat(fd.as_fd())?;
            self.copied.insert(ust.st_ino, st_ino);
        }
        Ok((Arc::new(fd), meta))
    }

    /// Puts a copy of the lower hard link `src` into the index only (no name in the upper
    /// layer), or returns the index entry that exists: done before a name of it goes away, so
    /// the other names keep one inode and a link count.
    pub(super) fn index_only(
        &self,
        parent: &Arc<Node>,
        src: BorrowedFd<'_>,
        st_ino: u64,
    ) -> io::Result<Arc<OwnedFd>> {
        if let Some((fd, _)) = self.index_lookup(st_ino)? {
            return Ok(fd);
        }
        self.copy_up(parent, CopyUp::Meta)?;
        let work = self.work()?;
        let index = self.index.as_ref().ok_or_else(|| errno(libc::EIO))?;
        let st = sys::fstat(src)?;
        let tmp = self.tmp_name();
        let built = self
            .build_copy(work, &tmp, src, src, &st, CopyUp::Data, false, st_ino)
            .and_then(|_| {
                sys::set_xattr(
                    sys_fd_of(work, &tmp)?.as_fd(),
                    self.style.nlink_xattr(),
                    &(st.st_nlink as u32).to_le_bytes(),
                    0,
                )
            })
            .and_then(|()| sys::linkat(work, &tmp, index.as_fd(), &super::index_name(st_ino)));
        let _ = super::dir::remove_entry(work, &tmp);
        match built {
            Ok(()) => self.copied_up(),
            // Someone indexed it meanwhile: theirs counts.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        self.index_lookup(st_ino)?
            .map(|(fd, _)| fd)
            .ok_or_else(|| errno(libc::EIO))
    }

    /// Links the indexed inode `index` as `name` in `parent`'s upper directory.
    pub(super) fn link_indexed(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        index: BorrowedFd<'_>,
    ) -> io::Result<Arc<OwnedFd>> {
        let pupper = parent
            .state
            .read()
            .upper
            .clone()
            .ok_or_else(|| errno(libc::ESTALE))?;
        let times = sys::fstat(pupper.as_fd())?;
        match sys::link_fd(index, pupper.as_fd(), name) {
            Ok(()) => restore_times(pupper.as_fd(), &times)?,
            // This name was linked already (through another of the inode's names): fine if it
            // is the same inode.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        self.mark_impure(parent)?;
        let fd = sys::openat(pupper.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        if sys::fstat(fd.as_fd())?.st_ino != sys::fstat(index)?.st_ino {
            return Err(errno(libc::EEXIST));
        }
        Ok(Arc::new(fd))
    }

    /// The merged link count kept on an indexed inode, if `fd` is one.
    pub(super) fn index_nlink(&self, fd: BorrowedFd<'_>) -> Option<u32> {
        // Hard links are never directories: the fd is O_PATH.
        let v = sys::get_xattr_path(fd, self.style.nlink_xattr()).ok()??;
        Some(u32::from_le_bytes(v.try_into().ok()?))
    }

    /// Adds `delta` to the merged link count of an indexed inode (no-op for other inodes);
    /// at zero the index entry `key` goes too.
    pub(super) fn adjust_nlink(&self, fd: BorrowedFd<'_>, delta: i32, key: u64) -> io::Result<()> {
        let _guard = self.nlink_lock.lock();
        if let Some(n) = self.index_nlink(fd) {
            let n = n.saturating_add_signed(delta);
            sys::set_xattr(fd, self.style.nlink_xattr(), &n.to_le_bytes(), 0)?;
            if n == 0
                && let Some(index) = &self.index
            {
                let _ = sys::unlinkat(index.as_fd(), &super::index_name(key), 0);
            }
        }
        Ok(())
    }

    /// Marks an upper directory as holding entries whose st_ino comes from an origin, so
    /// readdir reads their origins (the kernel's `overlay.impure`).
    pub(super) fn mark_impure(&self, dir: &Arc<Node>) -> io::Result<()> {
        if dir.state.read().impure {
            return Ok(());
        }
        let Some(up) = dir.state.read().upper.clone() else {
            return Ok(());
        };
        sys::set_xattr(up.as_fd(), self.style.impure_xattr(), b"y", 0)?;
        dir.state.write().impure = true;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn build_copy(
        &self,
        work: BorrowedFd<'_>,
        tmp: &OsStr,
        src: BorrowedFd<'_>,
        data: BorrowedFd<'_>,
        st: &sys::Stat,
        how: CopyUp,
        meta: bool,
        st_ino: u64,
    ) -> io::Result<bool> {
        let fmt = st.st_mode & libc::S_IFMT;
        let dst = match fmt {
            libc::S_IFDIR => {
                sys::mkdirat(work, tmp, 0o700)?;
                sys::openat(
                    work,
                    tmp,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?
            }
            libc::S_IFREG => {
                let dst = sys::openat(
                    work,
                    tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )?;
                if meta {
                    // The size, no data: reads go below until the first write.
                    sys::ftruncate(dst.as_fd(), st.st_size as u64)?;
                    sys::set_xattr(dst.as_fd(), self.style.metacopy_xattr(), b"", 0)?;
                } else if how != CopyUp::Truncate && st.st_size > 0 {
                    let input = sys::reopen(data, libc::O_RDONLY)?;
                    copy_data(input.as_fd(), dst.as_fd(), st.st_size)?;
                }
                dst
            }
            libc::S_IFLNK => {
                let target = sys::readlink_fd(src)?;
                sys::symlinkat(&target, work, tmp)?;
                sys::openat(work, tmp, libc::O_PATH | libc::O_NOFOLLOW, 0)?
            }
            _ => {
                sys::mknodat(work, tmp, fmt | 0o600, st.st_rdev)?;
                let fd = sys::openat(work, tmp, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                if layer::is_char_0_0(st) {
                    // Only a marked 0/0 device is visible to copy up; keep it a device.
                    layer::mark_device(fd.as_fd())?;
                }
                fd
            }
        };
        copy_meta(src, dst.as_fd(), st)?;
        // st_ino stays what it was below, across this copy-up and later mounts.
        match sys::set_xattr(
            dst.as_fd(),
            self.style.origin_xattr(),
            &st_ino.to_le_bytes(),
            0,
        ) {
            Ok(()) => Ok(true),
            // user.* xattrs exist only on files and directories; the in-memory map keeps
            // st_ino stable for this mount instead.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Owner, xattrs (ACLs and capabilities included), mode and times, in the order that keeps each
/// one: chown first (it clears set-id bits and capabilities), times last.
pub(super) fn copy_meta(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    st: &sys::Stat,
) -> io::Result<()> {
    let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
    sys::fchown(dst, Some(st.st_uid), Some(st.st_gid))?;
    for name in sys::list_xattr(src)? {
        if layer::is_private_xattr(&name) {
            continue;
        }
        if let Some(value) = sys::get_xattr(src, &name)? {
            match sys::set_xattr(dst, &name, &value, 0) {
                Ok(()) => {}
                // The upper filesystem cannot hold this xattr at all: the kernel's overlayfs
                // skips it too rather than fail the copy-up.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) if symlink && e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => return Err(e),
            }
        }
    }
    if !symlink {
        sys::chmod_fd(dst, st.st_mode & 0o7777)?;
    }
    sys::utimens_fd(
        dst,
        SetTime::At(st.st_atime, st.st_atime_nsec),
        SetTime::At(st.st_mtime, st.st_mtime_nsec),
    )
}

/// Copies `size` bytes, keeping holes: reflink if the filesystem can, else only the data extents.
pub fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, size: i64) -> io::Result<()> {
    if sys::ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut off = 0i64;
    while off < size {
        let data = match sys::lseek(src, off, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                copy_range(src, dst, off, size)?;
                break;
            }
            Err(e) => return Err(e),
        };
        let hole = sys::lseek(src, data, libc::SEEK_HOLE)?.min(size);
        copy_range(src, dst, data, hole)?;
        off = hole;
    }
    sys::ftruncate(dst, size as u64)
}

fn copy_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, start: i64, end: i64) -> io::Result<()> {
    let mut off_in = start;
    let mut off_out = start;
    while off_in < end {
        let len = (end - off_in).min(1 << 30) as usize;
        match sys::copy_file_range(src, &mut off_in, dst, &mut off_out, len) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) =>
            {
                return copy_rw(src, dst, off_in, end);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_rw(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, mut off: i64, end: i64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = sys::pread(src, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done += sys::pwrite(dst, &buf[done..n], off + done as i64)?;
        }
        off += n as i64;
    }
    Ok(())
}

/// An `O_PATH` fd of `dir/name`.
fn sys_fd_of(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Puts back the atime and mtime of `st` on `fd`.
fn restore_times(fd: BorrowedFd<'_>, st: &sys::Stat) -> io::Result<()> {
    sys::utimens_fd(
        fd,
        SetTime::At(st.st_atime, st.st_atime_nsec),
        SetTime::At(st.st_mtime, st.st_mtime_nsec),
    )
}
