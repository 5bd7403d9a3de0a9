//! Thin wrappers over the libc calls std lacks. Every `unsafe` of the test suite lives here.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A path as a C string (test paths never hold NUL bytes).
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("name without NUL")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mknod(2); `mode` includes the file type bits (S_IFCHR, S_IFBLK, S_IFIFO).
pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) })
}

/// The kernel's whiteout: a character device 0/0.
pub fn whiteout(p: &Path) -> io::Result<()> {
    mknod(p, libc::S_IFCHR, 0, 0)
}

pub fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::mkfifo(c.as_ptr(), mode) })
}

/// lsetxattr(2) with `flags` 0, XATTR_CREATE or XATTR_REPLACE.
pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: both strings are NUL-terminated and live; `value` is a valid slice of
    // `value.len()` bytes.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// lgetxattr(2), growing the buffer until the value fits.
pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), cstr(name));
    let mut cap = 256;
    loop {
        let mut buf = vec![0u8; cap];
        // SAFETY: `buf` has `buf.len()` writable bytes; the strings are NUL-terminated.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && cap < (1 << 20) {
            cap *= 4;
            continue;
        }
        return Err(e);
    }
}

/// llistxattr(2): the names, in the order the filesystem gives them.
pub fn llistxattr(p: &Path) -> io::Result<Vec<String>> {
    let c = cpath(p);
    let mut cap = 1024;
    loop {
        let mut buf = vec![0u8; cap];
        // SAFETY: `buf` has `buf.len()` writable bytes; `c` is NUL-terminated.
        let r = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && cap < (1 << 20) {
            cap *= 4;
            continue;
        }
        return Err(e);
    }
}

pub fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: both strings are NUL-terminated and live across the call.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

/// utimensat(2) without following a final symlink. Times are (seconds, nanoseconds).
pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: `c` is NUL-terminated, `ts` is an array of two timespecs as utimensat expects.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

/// renameat2(2) with the given flags.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both strings are NUL-terminated and live across the call.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

/// truncate(2) by path.
pub fn truncate(p: &Path, len: u64) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated and live.
    check(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) })
}

pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = cpath(p);
    // SAFETY: all-zero is a valid bit pattern for the plain C struct `statvfs`.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated, `st` is a valid out-pointer.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: the fd is owned by `f`, which is borrowed for the duration of the call.
    check(unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// lseek(2); used with SEEK_DATA / SEEK_HOLE.
pub fn lseek(f: &File, offset: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: the fd is owned by `f`, which is borrowed for the duration of the call.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// umount2(2) with MNT_* flags.
pub fn umount2(p: &Path, flags: i32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: `c` is NUL-terminated and live.
    check(unsafe { libc::umount2(c.as_ptr(), flags) })
}

/// Is `e` the error number `n`?
pub fn is_errno(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

/// The symbolic name of an errno, for readable test output.
pub fn errno_name(n: i32) -> String {
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        _ => return format!("errno {n}"),
    };
    name.to_string()
}

/// Writes `data` at `offset` of `f` through a shared writable mapping of its first `len`
/// bytes, then msync(MS_SYNC) and munmap, as an editor or a database does.
pub fn mmap_write(f: &File, len: usize, offset: usize, data: &[u8]) -> io::Result<()> {
    assert!(offset + data.len() <= len, "write beyond the mapping");
    // SAFETY: a fresh shared mapping of `len` bytes of an fd `f` owns; no Rust reference to
    // it exists outside this function.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p` maps `len` bytes, `offset + data.len() <= len` (checked above), and the
    // source slice cannot overlap a mapping made just now.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(offset), data.len()) };
    // SAFETY: `p` and `len` are exactly the mapping made above.
    let synced = check(unsafe { libc::msync(p, len, libc::MS_SYNC) });
    // SAFETY: as above; the mapping is not used after this.
    let unmapped = check(unsafe { libc::munmap(p, len) });
    synced.and(unmapped)
}

pub const RENAME_WHITEOUT: u32 = libc::RENAME_WHITEOUT;

/// MAX_HANDLE_SZ of <fcntl.h>.
const MAX_HANDLE_SZ: usize = 128;

/// A file handle from name_to_handle_at(2): `struct file_handle` and its bytes, in a u32
/// buffer so the header is aligned.
#[derive(Clone, Debug)]
pub struct FileHandle {
    buf: Vec<u32>,
}

/// name_to_handle_at(2) of `p` (not following a final symlink).
pub fn name_to_handle(p: &Path) -> io::Result<FileHandle> {
    let c = cpath(p);
    let mut buf = vec![0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a `struct file_handle` header (handle_bytes set to the MAX_HANDLE_SZ
    // bytes that follow it) plus room for that many bytes; `c` is NUL-terminated and
    // `mount_id` a valid out-pointer.
    check(unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            &mut mount_id,
            0,
        )
    })?;
    Ok(FileHandle { buf })
}

/// open_by_handle_at(2) through the mount that `mount_fd` is on.
pub fn open_by_handle(mount_fd: &File, h: &FileHandle, flags: i32) -> io::Result<File> {
    let mut buf = h.buf.clone();
    // SAFETY: `buf` is the `struct file_handle` name_to_handle_at filled in, with its bytes;
    // the fd is owned by `mount_fd`, borrowed across the call.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sets the real, effective and saved uid of the calling thread only (the raw syscall, not
/// libc's wrapper, which changes every thread of the process). Cannot be undone when giving
/// up root: use it on a thread of its own.
pub fn thread_setresuid(uid: u32) -> io::Result<()> {
    // SAFETY: setresuid takes three plain integers; on failure nothing changed.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
