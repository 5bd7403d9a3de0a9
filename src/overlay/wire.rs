//! The FUSE wire format, for the io_uring transport (`uring.rs`); the /dev/fuse transport
//! leaves this to fuser. Plain byte slices in and out, native endian, no unsafe: a request is
//! its header, its per-opcode argument struct (`op`) and the rest of its arguments (`payload`:
//! names and data, one after the other).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

/// Opcodes (include/uapi/linux/fuse.h). INIT, INTERRUPT, BATCH_FORGET and the FORGETs of
/// evicted inodes come on /dev/fuse, which fuser serves; only a forced FORGET comes here.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
}

pub const OUT_HEADER_LEN: usize = 16;
pub const ENTRY_OUT_LEN: usize = 128;

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        let r = Fields(b);
        Some(InHeader {
            len: r.u32(0)?,
            opcode: r.u32(4)?,
            unique: r.u64(8)?,
            nodeid: r.u64(16)?,
            uid: r.u32(24)?,
            gid: r.u32(28)?,
            pid: r.u32(32)?,
        })
    }
}

/// `struct fuse_out_header`: `error` is 0 or a negated errno.
pub fn out_header(unique: u64, error: i32, len: u32) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Fixed-offset fields of an argument struct; `None` when the struct is too short.
#[derive(Clone, Copy)]
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    pub fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(self.0.get(at..at + 4)?.try_into().ok()?))
    }
    pub fn i32(&self, at: usize) -> Option<i32> {
        Some(i32::from_ne_bytes(self.0.get(at..at + 4)?.try_into().ok()?))
    }
    pub fn u64(&self, at: usize) -> Option<u64> {
        Some(u64::from_ne_bytes(self.0.get(at..at + 8)?.try_into().ok()?))
    }
    pub fn i64(&self, at: usize) -> Option<i64> {
        Some(i64::from_ne_bytes(self.0.get(at..at + 8)?.try_into().ok()?))
    }
}

/// The NUL-terminated strings of a payload, one after the other.
pub struct Names<'a>(pub &'a [u8]);

impl<'a> Names<'a> {
    pub fn next_name(&mut self) -> Option<&'a OsStr> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let (name, rest) = self.0.split_at(end);
        self.0 = &rest[1..];
        Some(OsStr::from_bytes(name))
    }
    /// What follows the names (a setxattr value).
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

/// A reply body under construction, bounded by the buffer the kernel gave us.
pub struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

/// The reply does not fit the reply buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl<'a> Out<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Out { buf, len: 0 }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), Full> {
        let end = self.len + b.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(Full)?
            .copy_from_slice(b);
        self.len = end;
        Ok(())
    }
    pub fn u32(&mut self, v: u32) -> Result<(), Full> {
        self.bytes(&v.to_ne_bytes())
    }
    pub fn u64(&mut self, v: u64) -> Result<(), Full> {
        self.bytes(&v.to_ne_bytes())
    }
    fn zeros(&mut self, n: usize) -> Result<(), Full> {
        let end = self.len + n;
        self.buf.get_mut(self.len..end).ok_or(Full)?.fill(0);
        self.len = end;
        Ok(())
    }
    /// `struct fuse_attr`.
    pub fn attr(&mut self, a: &FileAttr) -> Result<(), Full> {
        let (at, atn) = kernel_time(a.atime);
        let (mt, mtn) = kernel_time(a.mtime);
        let (ct, ctn) = kernel_time(a.ctime);
        self.u64(a.ino.0)?;
        self.u64(a.size)?;
        self.u64(a.blocks)?;
        self.u64(at as u64)?;
        self.u64(mt as u64)?;
        self.u64(ct as u64)?;
        self.u32(atn)?;
        self.u32(mtn)?;
        self.u32(ctn)?;
        self.u32(mode(a.kind, a.perm))?;
        self.u32(a.nlink)?;
        self.u32(a.uid)?;
        self.u32(a.gid)?;
        self.u32(a.rdev)?;
        self.u32(a.blksize)?;
        // fuse_attr.flags (FUSE_ATTR_SUBMOUNT, FUSE_ATTR_DAX): none of ours, as fuser sends.
        self.u32(0)
    }

    /// `struct fuse_entry_out`, with `attr.ino` as the node id (as fuser does: the two
    /// transports hand the kernel the same ids).
    pub fn entry(&mut self, ttl: Duration, a: &FileAttr) -> Result<(), Full> {
        self.u64(a.ino.0)?;
        self.u64(0)?; // generation
        self.u64(ttl.as_secs())?;
        self.u64(ttl.as_secs())?;
        self.u32(ttl.subsec_nanos())?;
        self.u32(ttl.subsec_nanos())?;
        self.attr(a)
    }

    /// `struct fuse_attr_out`.
    pub fn attr_out(&mut self, ttl: Duration, a: &FileAttr) -> Result<(), Full> {
        self.u64(ttl.as_secs())?;
        self.u32(ttl.subsec_nanos())?;
        self.u32(0)?;
        self.attr(a)
    }

    /// `struct fuse_open_out`.
    pub fn open_out(&mut self, fh: u64, flags: u32, backing_id: u32) -> Result<(), Full> {
        self.u64(fh)?;
        self.u32(flags)?;
        self.u32(backing_id)
    }

    /// `struct fuse_write_out`.
    pub fn write_out(&mut self, size: u32) -> Result<(), Full> {
        self.u32(size)?;
        self.u32(0)
    }

    /// One `struct fuse_dirent` and its name, padded to 8 bytes. Full if it does not fit.
    pub fn dirent(
        &mut self,
        ino: u64,
        next: u64,
        kind: FileType,
        name: &OsStr,
    ) -> Result<(), Full> {
        let name = name.as_bytes();
        let size = (24 + name.len()).next_multiple_of(8);
        if self.len + size > self.buf.len() {
            return Err(Full);
        }
        self.u64(ino)?;
        self.u64(next)?;
        self.u32(name.len() as u32)?;
        self.u32(mode(kind, 0) >> 12)?;
        self.bytes(name)?;
        self.zeros(size - 24 - name.len())
    }

    /// One `struct fuse_direntplus` and its name, with the entry of a lookup the kernel
    /// counts, or without (`None`: node id 0, no attributes; the kernel makes no dentry and
    /// looks the name up when it needs it). Full if it does not fit.
    pub fn direntplus(
        &mut self,
        ino: u64,
        next: u64,
        kind: FileType,
        name: &OsStr,
        entry: Option<(Duration, &FileAttr)>,
    ) -> Result<(), Full> {
        let size = (ENTRY_OUT_LEN + 24 + name.len()).next_multiple_of(8);
        if self.len + size > self.buf.len() {
            return Err(Full);
        }
        match entry {
            Some((ttl, a)) => self.entry(ttl, a)?,
            None => self.zeros(ENTRY_OUT_LEN)?,
        }
        self.dirent(ino, next, kind, name)
    }

    /// `struct fuse_kstatfs` from statvfs.
    pub fn statfs(&mut self, s: &libc::statvfs) -> Result<(), Full> {
        self.u64(s.f_blocks)?;
        self.u64(s.f_bfree)?;
        self.u64(s.f_bavail)?;
        self.u64(s.f_files)?;
        self.u64(s.f_ffree)?;
        self.u32(s.f_bsize as u32)?;
        self.u32(255)?;
        self.u32(s.f_frsize as u32)?;
        self.zeros(4 + 6 * 4)
    }
}

/// `S_IF*` of a kind, with the permission bits.
pub fn mode(kind: FileType, perm: u16) -> u32 {
    let fmt = match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    };
    fmt | u32::from(perm)
}

/// (seconds, nanoseconds) of a time as the kernel keeps it: seconds rounded down, so
/// 0.5 s before the epoch is (-1, 500000000).
pub fn kernel_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() == 0 {
                (-secs, 0)
            } else {
                (-secs - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::INodeNo;

    fn attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(42),
            size: 7,
            blocks: 8,
            atime: UNIX_EPOCH - Duration::new(0, 500_000_000),
            mtime: UNIX_EPOCH + Duration::new(10, 5),
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o4755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    #[test]
    fn entry_out_has_the_kernels_layout() {
        let mut buf = [0u8; 256];
        let mut out = Out::new(&mut buf);
        out.entry(Duration::new(3, 7), &attr()).unwrap();
        assert_eq!(out.len(), ENTRY_OUT_LEN);
        let f = Fields(&buf);
        assert_eq!(f.u64(0), Some(42)); // nodeid
        assert_eq!(f.u64(16), Some(3)); // entry_valid
        assert_eq!(f.u32(32), Some(7)); // entry_valid_nsec
        assert_eq!(f.u64(40), Some(42)); // attr.ino
        assert_eq!(f.u64(48), Some(7)); // attr.size
        assert_eq!(f.i64(64), Some(-1)); // atime
        assert_eq!(f.u64(72), Some(10)); // mtime
        assert_eq!(f.u32(88), Some(500_000_000)); // atimensec
        assert_eq!(f.u32(92), Some(5)); // mtimensec
        assert_eq!(f.u32(100), Some(libc::S_IFREG | 0o4755)); // mode
        assert_eq!(f.u32(104), Some(2)); // nlink
        assert_eq!(f.u32(108), Some(1000)); // uid
        assert_eq!(f.u32(124), Some(0)); // flags
    }

    #[test]
    fn dirents_are_padded_and_never_split() {
        let mut buf = [0xffu8; 64];
        let mut out = Out::new(&mut buf);
        out.dirent(5, 1, FileType::Directory, OsStr::new("abc"))
            .unwrap();
        assert_eq!(out.len(), 32);
        // 24 + 9 rounds up to 40, which does not fit the 32 bytes left.
        assert_eq!(
            out.dirent(6, 2, FileType::RegularFile, OsStr::new("123456789")),
            Err(Full)
        );
        assert_eq!(out.len(), 32);
        let f = Fields(&buf);
        assert_eq!(f.u32(20), Some(4)); // DT_DIR
        assert_eq!(&buf[24..27], b"abc");
        assert_eq!(&buf[27..32], &[0u8; 5]);
    }

    #[test]
    fn names_split_at_nul() {
        let mut n = Names(b"old\0new\0value");
        assert_eq!(n.next_name(), Some(OsStr::new("old")));
        assert_eq!(n.next_name(), Some(OsStr::new("new")));
        assert_eq!(n.rest(), b"value");
        assert_eq!(n.next_name(), None);
    }

    #[test]
    fn headers_round_trip() {
        let mut b = [0u8; 40];
        b[0..4].copy_from_slice(&64u32.to_ne_bytes());
        b[4..8].copy_from_slice(&op::LOOKUP.to_ne_bytes());
        b[8..16].copy_from_slice(&9u64.to_ne_bytes());
        b[16..24].copy_from_slice(&1u64.to_ne_bytes());
        b[24..28].copy_from_slice(&1000u32.to_ne_bytes());
        let h = InHeader::parse(&b).unwrap();
        assert_eq!((h.opcode, h.unique, h.nodeid, h.uid), (1, 9, 1, 1000));
        assert!(InHeader::parse(&b[..20]).is_none());
        let o = out_header(9, -2, 16);
        assert_eq!(Fields(&o).i32(4), Some(-2));
    }
}
