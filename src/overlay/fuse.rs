//! The `fuser::Filesystem` adapter: decodes each request, calls the matching `do_*` method and
//! turns its `io::Result` into a reply. No overlay logic lives here.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::debug;

use super::OverlayFs;
use super::ops::{Backing, OpenPlan};
use super::privs::Caller;
use crate::sys::SetTime;
use std::sync::atomic::Ordering;

fn errno(e: io::Error) -> Errno {
    Errno::from_i32(errno_of(&e))
}

/// The errno a failed request answers with.
pub(super) fn errno_of(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(code) if code > 0 => code,
        _ => libc::EIO,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => kernel_time(t),
    })
}

/// The kernel's (sec, nsec) of a setattr time, undoing fuser 0.18's decoding.
///
/// fuser 0.18 (`system_time_from_time`) builds a pre-1970 time as
/// `UNIX_EPOCH - Duration::new(-sec, nsec)`: the kernel's (-1, 500000000), which is -0.5 s,
/// arrives as -1.5 s. So the distance before the epoch holds `-sec` in its seconds and the
/// kernel's `nsec` unchanged in its nanoseconds; read them back as they are. (After 1970 the
/// conversion is exact.)
fn kernel_time(t: SystemTime) -> SetTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SetTime::At(d.as_secs() as i64, i64::from(d.subsec_nanos())),
        Err(e) => {
            let d = e.duration();
            SetTime::At(
                (d.as_secs() as i64).wrapping_neg(),
                i64::from(d.subsec_nanos()),
            )
        }
    }
}

const GEN: Generation = Generation(0);

/// The daemon keeps no per-open state that a close must flush, so the kernel need not send
/// FLUSH on every close (one round trip less per file).
pub(super) const NOFLUSH: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// While the rings serve the requests, what still comes over /dev/fuse is FORGET (the kernel
/// never sends it over io_uring) and the rare INTERRUPT. Queueing a FORGET wakes a waiting
/// /dev/fuse reader: a context switch per removed file on `rm -rf`. Readers that wait before
/// taking the next one let the kernel queue FORGETs without a wakeup and hand them over
/// together as one BATCH_FORGET. The waits are staggered across the threads, one `pause`
/// apart, so all of them together read /dev/fuse about once a pause; a FORGET (or an
/// INTERRUPT) waits at most a pause per thread.
///
/// fuser hands a BATCH_FORGET over as one `forget` call per node, all with the request's
/// `unique`: the wait comes once per request, at its first node.
fn coalesce_forgets(fs: &FuseFs, unique: u64) {
    thread_local! {
        static LAST: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
    }
    if LAST.replace(unique) == unique {
        return;
    }
    let pause = fs.forget_pause();
    if pause.is_zero() {
        return;
    }
    let now = std::time::Instant::now();
    let at = {
        let mut next = fs.next_forget_read.lock();
        let at = next.map_or(now, |n| n.max(now));
        *next = Some(at + pause);
        at
    };
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// Runs one request's work; a panic fails that request alone (EIO) instead of taking a worker
/// thread, and the caller waiting on it, down.
pub(super) fn guard<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("request handler panicked; failing the request with EIO");
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }
}

/// Test hooks, from `STRATAFS_FAILPOINT=KIND:NAME` in the daemon's environment, read once
/// (unset, the normal case, a check costs one load):
/// - `panic-lookup:NAME`: a LOOKUP of NAME panics inside its handler, so tests can check that
///   [`guard`] fails that request alone;
/// - `eio-read:NAME`: every READ of a file last seen under the name NAME fails with EIO, as a
///   bad block of a lower disk would, for a mount stacked on this one;
/// - `uring-setup:N`: setting up the io_uring transport fails at queue N, after the queues
///   before it were registered;
/// - `slow-copy-up:NAME`: a copy-up of a file last seen under the name NAME first waits 2 s
///   (holding a request of its CPU's queue, as a copy-up of a big file does).
pub(crate) fn failpoint(kind: &str) -> Option<&'static OsStr> {
    use std::os::unix::ffi::OsStrExt;
    static FP: std::sync::OnceLock<Option<(String, std::ffi::OsString)>> =
        std::sync::OnceLock::new();
    let (k, name) = FP
        .get_or_init(|| {
            let v = std::env::var_os("STRATAFS_FAILPOINT")?;
            let at = v.as_bytes().iter().position(|&b| b == b':')?;
            let (k, n) = v.as_bytes().split_at(at);
            Some((
                String::from_utf8_lossy(k).into_owned(),
                OsStr::from_bytes(&n[1..]).to_os_string(),
            ))
        })
        .as_ref()?;
    (k == kind).then_some(name.as_os_str())
}

/// The filesystem as fuser serves it: the same [`OverlayFs`] the io_uring transport
/// (`uring.rs`) serves, when the kernel offers that.
pub struct FuseFs(pub std::sync::Arc<OverlayFs>);

impl std::ops::Deref for FuseFs {
    type Target = OverlayFs;
    fn deref(&self) -> &OverlayFs {
        &self.0
    }
}

/// A LOOKUP's answer: the entry and its timeout; ENOENT is a negative entry (node id 0) the
/// kernel may cache, as every change of this name goes through the kernel, which drops it.
pub(super) fn lookup_entry(
    fs: &OverlayFs,
    parent: INodeNo,
    name: &OsStr,
) -> io::Result<(std::time::Duration, fuser::FileAttr)> {
    let res = guard(|| {
        if failpoint("panic-lookup") == Some(name) {
            panic!("failpoint panic-lookup:{}", name.to_string_lossy());
        }
        fs.do_lookup(parent, name)
    });
    match res {
        Ok((attr, _)) => {
            fs.rdplus_looked_up(parent, &attr);
            Ok((fs.entry_ttl(&attr), attr))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((fs.ttl(), negative_attr())),
        Err(e) => Err(e),
    }
}

/// Is this READ to fail (the `eio-read` failpoint)?
pub(super) fn read_fails(fs: &OverlayFs, ino: INodeNo) -> bool {
    failpoint("eio-read").is_some_and(|bad| fs.node(ino).is_ok_and(|n| n.state.read().name == bad))
}

/// The open flags of an open or create, and the backing file to pass through to, if any.
/// `register` opens a backing id for an fd.
pub(super) fn open_flags(
    fs: &OverlayFs,
    fh: u64,
    plan: OpenPlan,
    register: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<super::ops::Backing>,
) -> (FopenFlags, Option<std::sync::Arc<super::ops::Backing>>) {
    match plan {
        OpenPlan::Cached => (FopenFlags::FOPEN_KEEP_CACHE | NOFLUSH, None),
        OpenPlan::DirectIo => (FopenFlags::FOPEN_DIRECT_IO | NOFLUSH, None),
        OpenPlan::Passthrough(node) => match fs.attach_backing(fh, &node, register) {
            Some(id) => (NOFLUSH | FopenFlags::FOPEN_PASSTHROUGH, Some(id)),
            None => (FopenFlags::FOPEN_DIRECT_IO | NOFLUSH, None),
        },
    }
}

/// The open flags of an OPENDIR.
pub(super) fn opendir_flags() -> FopenFlags {
    // The kernel may keep listings in its page cache: every change of a directory goes
    // through it, and it drops the cached listing then.
    if std::env::var_os("STRATAFS_NO_CACHE_DIR").is_none() {
        FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

/// One READDIRPLUS entry: with the attributes of a lookup the kernel counts, or bare (node
/// id 0, no attributes: the kernel makes no dentry and looks the name up when it needs it).
pub(super) enum PlusEntry<'a> {
    Full(std::time::Duration, &'a fuser::FileAttr),
    Bare { ino: u64, kind: fuser::FileType },
}

/// Fills a READDIRPLUS reply: `add(next offset, name, entry)` says true when the entry did not
/// fit. An error is for the whole reply only when no entry went in. `bare_ok`: the transport
/// can send bare entries; `rdplus::Policy` then says whether non-directories go bare.
pub(super) fn readdirplus_entries(
    fs: &OverlayFs,
    ino: INodeNo,
    fh: u64,
    offset: u64,
    bare_ok: bool,
    mut add: impl FnMut(u64, &OsStr, PlusEntry<'_>) -> bool,
) -> io::Result<()> {
    let entries = guard(|| fs.do_readdir(fh, offset))?;
    let ttl = fs.ttl();
    let bare_files = bare_ok && !fs.rdplus.attrs();
    let (mut bare, mut full) = (0u64, 0u64);
    let mut added = false;
    for (i, e) in entries.iter().enumerate().skip(offset as usize) {
        let next = (i + 1) as u64;
        if e.name == "." || e.name == ".." {
            // The kernel takes no reference for these two, whatever we send.
            let mut attr = negative_attr();
            attr.ino = INodeNo(e.ino);
            attr.kind = fuser::FileType::Directory;
            if add(next, &e.name, PlusEntry::Full(ttl, &attr)) {
                break;
            }
            added = true;
            continue;
        }
        let is_dir = e.kind == fuser::FileType::Directory;
        if bare_files && !is_dir {
            let entry = PlusEntry::Bare {
                ino: e.ino,
                kind: e.kind,
            };
            if add(next, &e.name, entry) {
                break;
            }
            added = true;
            bare += 1;
            continue;
        }
        // Past the fd budget this reply ends early: the kernel holds the directory's lock
        // while it waits for us, and the reaper needs that lock to free fds. The rest
        // comes in the next request, once the lock has been let go.
        if added && fs.reaper.over_high() {
            break;
        }
        // Each entry sent is a lookup the kernel counts; one that does not fit is undone.
        match guard(|| fs.do_lookup(ino, &e.name)) {
            Ok((attr, id)) => {
                if add(next, &e.name, PlusEntry::Full(fs.entry_ttl(&attr), &attr)) {
                    fs.do_forget(INodeNo(id), 1);
                    break;
                }
                added = true;
                if !is_dir {
                    full += 1;
                }
            }
            // Removed since the listing was taken.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            // Never leave an entry out: send what is there, or the error.
            Err(_) if added => break,
            Err(e) => return Err(e),
        }
    }
    if bare_ok {
        fs.rdplus_sent(ino, bare, full);
    }
    Ok(())
}

impl FuseFs {
    /// An open served here while the rings run does its I/O through the daemon (see
    /// `OverlayFs::rings_running`).
    fn fuser_plan(&self, plan: OpenPlan) -> OpenPlan {
        match plan {
            OpenPlan::Passthrough(_) if self.rings_running() => OpenPlan::DirectIo,
            p => p,
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_EXPORT_SUPPORT,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            // Optional: a kernel without one of these still works, only slower.
            let _ = config.add_capabilities(cap);
        }
        if std::env::var_os("STRATAFS_NO_READDIRPLUS").is_none() {
            let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
            let _ = config.add_capabilities(InitFlags::FUSE_READDIRPLUS_AUTO);
        }
        // Passthrough lets the kernel do file I/O on the layer file itself. Stack depth 1: the
        // layers may not be stacked filesystems, and one more overlay may sit on this mount.
        let passthrough = self.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        if !passthrough {
            let wb = config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
            self.writeback.store(wb, Ordering::Relaxed);
        }
        // The kernel then caches "nothing to kill" per inode instead of asking for
        // security.capability before every write; S_ISUID/S_ISGID are ours to clear (privs.rs).
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // POSIX ACLs: the kernel checks them (fetching system.posix_acl_access and caching it
        // per inode, as it does for any filesystem) and leaves the umask to us, which a
        // default ACL replaces (`acl.rs`).
        let acl = self.want_posix_acl
            && config.add_capabilities(InitFlags::FUSE_POSIX_ACL).is_ok()
            && config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_ok();
        self.posix_acl.store(acl, Ordering::Relaxed);
        let _ = config.set_max_write(1 << 20);
        // The kernel offers FUSE over io_uring when the fuse module's enable_uring is on. We
        // register rings without asking for it here: asked for, the kernel holds every request
        // until all queues are registered, so a ring that failed to set up would hang the
        // mount; not asked for, requests stay on /dev/fuse until the rings are ready.
        let uring = self.want_uring
            && config
                .capabilities()
                .contains(InitFlags::FUSE_OVER_IO_URING);
        self.uring.store(uring, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match lookup_entry(self, parent, name) {
            Ok((ttl, attr)) => reply.entry(&ttl, &attr, GEN),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        coalesce_forgets(self, req.unique().0);
        self.do_forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match guard(|| self.do_getattr(ino, fh.map(|f| f.0))) {
            Ok(attr) => reply.attr(&self.ttl(), &attr),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Nothing to set: the kernel's file_remove_privs asks us to clear S_ISUID/S_ISGID
        // (FUSE_HANDLE_KILLPRIV_V2).
        let bare = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none()
            && ctime.is_none()
            && crtime.is_none()
            && chgtime.is_none()
            && bkuptime.is_none()
            && flags.is_none();
        let caller = caller(req);
        let res = guard(|| {
            self.do_setattr(
                ino,
                mode,
                uid,
                gid,
                size,
                set_time(atime),
                set_time(mtime),
                fh.map(|f| f.0),
                &caller,
                bare,
            )
        });
        match res {
            Ok(attr) => reply.attr(&self.ttl(), &attr),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match guard(|| self.do_readlink(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match guard(|| self.do_mknod(parent, name, mode, umask, rdev, caller(req))) {
            Ok((attr, _)) => reply.entry(&self.ttl(), &attr, GEN),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match guard(|| self.do_mkdir(parent, name, mode, umask, caller(req))) {
            Ok((attr, _)) => reply.entry(&self.ttl(), &attr, GEN),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match guard(|| self.do_remove(parent, name, false)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match guard(|| self.do_remove(parent, name, true)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match guard(|| self.do_symlink(parent, link_name, target, caller(req))) {
            Ok((attr, _)) => reply.entry(&self.ttl(), &attr, GEN),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match guard(|| self.do_rename(parent, name, newparent, newname, flags.bits(), caller(req)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match guard(|| self.do_link(ino, newparent, newname)) {
            Ok((attr, _)) => reply.entry(&self.ttl(), &attr, GEN),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fh, plan) = match guard(|| self.do_open(ino, flags.0, &caller(req))) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(e)),
        };
        let plan = self.fuser_plan(plan);
        let (flags, backing) = open_flags(self, fh, plan, |fd| {
            reply.open_backing(fd).map(Backing::Fuser)
        });
        match backing.as_deref() {
            Some(Backing::Fuser(id)) => {
                reply.opened_passthrough(FileHandle(fh), flags - FopenFlags::FOPEN_PASSTHROUGH, id)
            }
            // A backing id of the io_uring transport: fuser cannot send it. Unreachable: once
            // the ring serves requests, no OPEN comes here.
            Some(Backing::Raw(_)) => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO | NOFLUSH)
            }
            None => reply.opened(FileHandle(fh), flags),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if read_fails(self, ino) {
            return reply.error(Errno::EIO);
        }
        match guard(|| self.do_read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| caller(req));
        match guard(|| self.do_write(ino, fh.0, offset, data, kill.as_ref())) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match guard(|| self.do_fsync(fh.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match guard(|| self.do_opendir(ino)) {
            Ok(fh) => reply.opened(FileHandle(fh), opendir_flags()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match guard(|| self.do_readdir(fh.0, offset)) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // fuser writes the attributes' ino as the node id: no bare entries this way.
        let res = readdirplus_entries(self, ino, fh.0, offset, false, |next, name, e| match e {
            PlusEntry::Full(ttl, attr) => reply.add(attr.ino, next, name, &ttl, attr, GEN),
            PlusEntry::Bare { .. } => unreachable!("bare READDIRPLUS entry over /dev/fuse"),
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match guard(|| self.do_statfs()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match guard(|| self.do_setxattr(ino, name, value, flags, caller(req))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match guard(|| self.do_getxattr(ino, name)) {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match guard(|| self.do_listxattr(ino)) {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match guard(|| self.do_removexattr(ino, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match guard(|| self.do_access(ino, mask.bits(), caller(req))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (attr, fh, plan) =
            match guard(|| self.do_create(parent, name, mode, umask, flags, caller(req))) {
                Ok((attr, _, fh, plan)) => (attr, fh, self.fuser_plan(plan)),
                Err(e) => return reply.error(errno(e)),
            };
        let ttl = self.ttl();
        let (flags, backing) = open_flags(self, fh, plan, |fd| {
            reply.open_backing(fd).map(Backing::Fuser)
        });
        match backing.as_deref() {
            Some(Backing::Fuser(id)) => reply.created_passthrough(
                &ttl,
                &attr,
                GEN,
                FileHandle(fh),
                flags - FopenFlags::FOPEN_PASSTHROUGH,
                id,
            ),
            Some(Backing::Raw(_)) => reply.created(
                &ttl,
                &attr,
                GEN,
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | NOFLUSH,
            ),
            None => reply.created(&ttl, &attr, GEN, FileHandle(fh), flags),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match guard(|| self.do_fallocate(fh.0, mode, offset as i64, length as i64)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match guard(|| self.do_lseek(fh.0, offset, whence)) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let res = guard(|| {
            self.do_copy_file_range(fh_in.0, offset_in as i64, fh_out.0, offset_out as i64, len)
        });
        match res {
            Ok(n) => reply.written(n),
            Err(e) => {
                debug!("copy_file_range: {e}");
                reply.error(errno(e))
            }
        }
    }
}

fn negative_attr() -> fuser::FileAttr {
    fuser::FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// What a GETXATTR or LISTXATTR answers for a buffer of `size` bytes: the length when asked
/// for it (size 0), ERANGE when the value does not fit, else the value.
pub(super) enum XattrAnswer<'a> {
    Size(u32),
    Data(&'a [u8]),
}

pub(super) fn xattr_answer(value: &[u8], size: u32) -> Result<XattrAnswer<'_>, i32> {
    if size == 0 {
        Ok(XattrAnswer::Size(value.len() as u32))
    } else if value.len() > size as usize {
        Err(libc::ERANGE)
    } else {
        Ok(XattrAnswer::Data(value))
    }
}

fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    match xattr_answer(value, size) {
        Ok(XattrAnswer::Size(n)) => reply.size(n),
        Ok(XattrAnswer::Data(v)) => reply.data(v),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What fuser 0.18 hands us for the kernel's (sec, nsec).
    fn from_kernel(sec: i64, nsec: u32) -> SystemTime {
        if sec >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(sec as u64, nsec)
        } else {
            SystemTime::UNIX_EPOCH - Duration::new((-sec) as u64, nsec)
        }
    }

    #[test]
    fn kernel_times_round_trip_through_fuser() {
        for (sec, nsec) in [
            (0, 0),
            (1, 5),
            (1_700_000_000, 999_999_999),
            (-1, 0),
            (-1, 500_000_000),
            (-86_400, 0),
            (-315_619_200, 123_456_789),
        ] {
            match kernel_time(from_kernel(sec, nsec)) {
                SetTime::At(s, n) => assert_eq!((s, n), (sec, i64::from(nsec))),
                other => panic!("{other:?}"),
            }
        }
    }
}
