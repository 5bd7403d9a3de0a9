//! FUSE over io_uring (Linux 6.14+, `enable_uring` of the fuse module): the kernel keeps one
//! request queue per CPU and hands each request to a thread of the queue of the CPU that made
//! it. Our threads of queue N are pinned to CPU N, so a request and its reply are same-CPU
//! hand-offs instead of two cross-CPU wakeups through /dev/fuse, which on a small VM is most of
//! a metadata request's cost.
//!
//! fuser still does FUSE_INIT and reads /dev/fuse for what never comes over the ring (FORGET,
//! INTERRUPT) and for requests made before every queue is registered. Each request here calls
//! the same `do_*` methods as the fuser adapter (`fuse.rs`), with the shared parts of that
//! adapter, and encodes the reply itself (`wire.rs`).

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use fuser::{FopenFlags, INodeNo};

use super::OverlayFs;
use super::fuse::{self, errno_of};
use super::ops::Backing;
use super::privs::Caller;
use super::wire::{self, Fields, InHeader, Names, Out, op};
use crate::sys::fuse_ring::{self, Ring};
use crate::sys::{self, SetTime};

/// Threads (each with one ring entry) per queue: a request that takes long (a copy-up, an
/// fsync) holds one, and the others keep serving that CPU (requests never move to another
/// CPU's queue). Three on small machines, two from 8 online CPUs on.
fn threads_per_queue(online: usize) -> usize {
    (16 / online.max(1)).clamp(2, 3)
}

/// How long a thread polls its ring (yielding the CPU) after a reply before it sleeps: a
/// caller making request after request (untar, rm -rf) then finds this CPU busy, so the
/// scheduler wakes it here, where its next request is served, instead of on an idle CPU,
/// whose wakeup costs far more than the request on a VM. An idle mount costs nothing.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Who may use the mount, as fuser's session checks it (`SessionACL`), with the mount owner.
#[derive(Debug, Clone, Copy)]
pub struct Acl {
    pub allowed: fuser::SessionACL,
    pub owner: u32,
}

impl Acl {
    /// fuser's check: without allow_other only the owner (and root with allow_root) may make
    /// requests, except those the kernel makes on its own behalf.
    fn refuses(&self, h: &InHeader) -> bool {
        let other = match self.allowed {
            fuser::SessionACL::All => false,
            fuser::SessionACL::RootAndOwner => h.uid != self.owner && h.uid != 0,
            fuser::SessionACL::Owner => h.uid != self.owner,
        };
        other
            && !matches!(
                h.opcode,
                op::READ
                    | op::READDIR
                    | op::READDIRPLUS
                    | op::FORGET
                    | op::WRITE
                    | op::FSYNC
                    | op::FSYNCDIR
                    | op::RELEASE
                    | op::RELEASEDIR
            )
    }
}

/// The payload buffer of an entry: the kernel wants room for max_write and max_pages.
const PAYLOAD_LEN: usize = 1 << 20;

/// The number of queues the kernel keeps: one per possible CPU.
fn possible_cpus() -> Option<usize> {
    count_cpu_list(
        std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()?
            .trim(),
    )
}

/// The number of CPUs in a list such as `0-3,8-11` (`num_possible_cpus`, which the kernel
/// makes its queue count).
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(n)
}

/// How far apart fuser's threads read /dev/fuse while the rings run (see
/// `fuse::coalesce_forgets`): `STRATAFS_FORGET_COALESCE_US`, 1 ms by default, 0 for none.
pub fn forget_pause() -> std::time::Duration {
    let us = std::env::var("STRATAFS_FORGET_COALESCE_US")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1000);
    std::time::Duration::from_micros(us.min(100_000))
}

/// Starts the ring threads for the connection behind `dev`. Errors before any thread runs
/// leave everything on /dev/fuse.
pub fn start(fs: Arc<OverlayFs>, dev: OwnedFd, acl: Acl) -> io::Result<()> {
    let dev = Arc::new(dev);
    let queues = possible_cpus().ok_or_else(|| io::Error::other("cannot count the CPUs"))?;
    let threads = std::env::var("STRATAFS_URING_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or_else(|| {
            threads_per_queue(std::thread::available_parallelism().map_or(queues, |n| n.get()))
        })
        .clamp(1, 64);
    let spin = std::env::var("STRATAFS_URING_SPIN_US")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(SPIN, std::time::Duration::from_micros);
    let fail_at = fuse::failpoint("uring-setup")
        .and_then(|q| q.to_str())
        .and_then(|q| q.parse::<usize>().ok());
    for qid in 0..queues {
        if fail_at == Some(qid) {
            return Err(io::Error::other(format!("failpoint uring-setup:{qid}")));
        }
        // The thread of this queue that replied last: the one that polls.
        let last = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        for t in 0..threads {
            let fs = fs.clone();
            let dev = dev.clone();
            let last = last.clone();
            // Register in the thread: the ring belongs to the task that set it up, which is
            // where the kernel copies requests into its buffers.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("uring-{qid}.{t}"))
                .spawn(move || {
                    // An offline CPU gets no requests; its queue must still be registered.
                    let _ = sys::pin_to_cpu(qid);
                    let poller = Poller { last, me: t };
                    let mut first = Some(tx);
                    // A ring that ends for another reason than the connection going is set up
                    // again: its queue must not lose an entry, or requests from that CPU would
                    // wait for good once it had none.
                    for attempt in 0.. {
                        let ring = Ring::register(dev.clone(), qid as u16, 1, PAYLOAD_LEN);
                        let mut ring = match (ring, first.take()) {
                            (Ok(r), tx) => {
                                if let Some(tx) = tx {
                                    let _ = tx.send(Ok(()));
                                }
                                r
                            }
                            (Err(e), Some(tx)) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                            (Err(e), None) => {
                                tracing::error!("io_uring queue {qid}: cannot set up again: {e}");
                                return;
                            }
                        };
                        ring.set_spin(spin);
                        match serve(&fs, &dev, ring, acl, &poller) {
                            Ok(()) => return,
                            Err(e) if attempt < 100 => {
                                tracing::error!(
                                    "io_uring thread of queue {qid}: {e}; setting it up again"
                                );
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                            Err(e) => {
                                tracing::error!("io_uring thread of queue {qid} ends: {e}");
                                return;
                            }
                        }
                    }
                })?;
            rx.recv()
                .map_err(|_| io::Error::other("ring thread died"))??;
        }
    }
    tracing::debug!("FUSE over io_uring: {queues} queues, {threads} threads each");
    Ok(())
}

/// Which thread of a queue polls: the one that replied last, which is also the one whose
/// entry the kernel hands the next request (it takes the entry that became free last). The
/// others sleep at once instead of taking turns on the CPU with it.
struct Poller {
    last: Arc<std::sync::atomic::AtomicUsize>,
    me: usize,
}

impl Poller {
    fn replied(&self) {
        self.last
            .store(self.me, std::sync::atomic::Ordering::Relaxed);
    }
    fn mine(&self) -> bool {
        self.last.load(std::sync::atomic::Ordering::Relaxed) == self.me
    }
}

/// One thread's loop: take a request, answer it, until the connection goes (`Ok`) or the
/// ring fails otherwise (`Err`).
fn serve(
    fs: &OverlayFs,
    dev: &Arc<OwnedFd>,
    mut ring: Ring,
    acl: Acl,
    poller: &Poller,
) -> io::Result<()> {
    loop {
        // Past the fd budget no polling: lookups then wait for FORGETs (served by fuser's
        // threads) to free fds, and must not outrun them.
        let slot = match ring.next_request(|| poller.mine() && !fs.reaper.over_high()) {
            Ok(s) => s,
            // The connection going (unmount, abort) ends every thread; anything else ends
            // only this one, and its queue keeps the others.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED)
                ) =>
            {
                tracing::debug!("io_uring queue {} ends: {e}", ring.qid());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let (header, payload, len) = ring.request(slot);
        let (out_header, reply_len) = match InHeader::parse(&header[fuse_ring::IN_OUT]) {
            Some(h) => {
                let op_in: [u8; 128] = header[fuse_ring::OP_IN].try_into().expect("128 bytes");
                let len = len.min(payload.len());
                let res = if acl.refuses(&h) {
                    Err(libc::EACCES)
                } else {
                    // A panic anywhere in the request fails it alone, as `guard` does.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handle(fs, dev, &h, &op_in, payload, len)
                    }))
                    .unwrap_or_else(|_| {
                        tracing::error!("io_uring request handler panicked; EIO");
                        Err(libc::EIO)
                    })
                };
                // What `-d` shows of each request, as fuser does for /dev/fuse.
                tracing::debug!(
                    "io_uring({}) op {} node {} uid {} -> {:?}",
                    h.unique,
                    h.opcode,
                    h.nodeid,
                    h.uid,
                    res.map_err(io::Error::from_raw_os_error)
                );
                match res {
                    Ok(n) => (
                        wire::out_header(h.unique, 0, (wire::OUT_HEADER_LEN + n) as u32),
                        n,
                    ),
                    Err(code) => (
                        wire::out_header(h.unique, -code, wire::OUT_HEADER_LEN as u32),
                        0,
                    ),
                }
            }
            None => (wire::out_header(0, -libc::EIO, 16), 0),
        };
        ring.commit(slot, &out_header, reply_len)?;
        poller.replied();
    }
}

fn code(e: io::Error) -> i32 {
    errno_of(&e)
}

fn full(_: wire::Full) -> i32 {
    libc::ERANGE
}

fn inval() -> i32 {
    libc::EINVAL
}

/// A setattr time: `now` bit, seconds, nanoseconds.
fn set_time(now: bool, sec: u64, nsec: u32) -> SetTime {
    if now {
        SetTime::Now
    } else {
        SetTime::At(sec as i64, i64::from(nsec))
    }
}

/// Answers one request: the reply body goes to the start of `payload`; returns its length, or
/// the errno. The request's own payload is `payload[..len]`.
fn handle(
    fs: &OverlayFs,
    dev: &Arc<OwnedFd>,
    h: &InHeader,
    op_in: &[u8; 128],
    payload: &mut [u8],
    len: usize,
) -> Result<usize, i32> {
    let a = Fields(op_in);
    let ino = INodeNo(h.nodeid);
    let caller = Caller {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
    };
    // Names are copied out before the reply overwrites the payload.
    let first_name = || -> Result<std::ffi::OsString, i32> {
        Names(&payload[..len])
            .next_name()
            .map(OsStr::to_os_string)
            .ok_or_else(inval)
    };
    match h.opcode {
        op::LOOKUP => {
            let name = first_name()?;
            let (ttl, attr) = fuse::lookup_entry(fs, ino, &name).map_err(code)?;
            let mut out = Out::new(payload);
            out.entry(ttl, &attr).map_err(full)?;
            Ok(out.len())
        }
        op::GETATTR => {
            // struct fuse_getattr_in { getattr_flags, dummy, fh }; FUSE_GETATTR_FH = 1
            let fh = (a.u32(0).ok_or_else(inval)? & 1 != 0).then(|| a.u64(8).unwrap_or(0));
            let attr = fs.do_getattr(ino, fh).map_err(code)?;
            let mut out = Out::new(payload);
            out.attr_out(fs.ttl(), &attr).map_err(full)?;
            Ok(out.len())
        }
        op::SETATTR => {
            // struct fuse_setattr_in
            let valid = a.u32(0).ok_or_else(inval)?;
            let has = |bit: u32| valid & bit != 0;
            let fh = has(1 << 6).then(|| a.u64(8).unwrap_or(0));
            let size = has(1 << 3).then(|| a.u64(16).unwrap_or(0));
            let atime = has(1 << 4)
                .then(|| set_time(has(1 << 7), a.u64(32).unwrap_or(0), a.u32(56).unwrap_or(0)));
            let mtime = has(1 << 5)
                .then(|| set_time(has(1 << 8), a.u64(40).unwrap_or(0), a.u32(60).unwrap_or(0)));
            let mode = has(1).then(|| a.u32(68).unwrap_or(0));
            let uid = has(1 << 1).then(|| a.u32(76).unwrap_or(0));
            let gid = has(1 << 2).then(|| a.u32(80).unwrap_or(0));
            // MODE, UID, GID, SIZE, ATIME, MTIME, CTIME: none of them is the kernel's
            // file_remove_privs asking us to clear S_ISUID/S_ISGID.
            let bare = valid & (0x3f | 1 << 10) == 0;
            let attr = fs
                .do_setattr(ino, mode, uid, gid, size, atime, mtime, fh, &caller, bare)
                .map_err(code)?;
            let mut out = Out::new(payload);
            out.attr_out(fs.ttl(), &attr).map_err(full)?;
            Ok(out.len())
        }
        op::READLINK => {
            let t = fs.do_readlink(ino).map_err(code)?;
            let mut out = Out::new(payload);
            out.bytes(&t).map_err(full)?;
            Ok(out.len())
        }
        op::SYMLINK => {
            let (name, target) = {
                let mut n = Names(&payload[..len]);
                let name = n.next_name().ok_or_else(inval)?.to_os_string();
                let target = n.next_name().ok_or_else(inval)?.to_os_string();
                (name, target)
            };
            let (attr, _) = fs
                .do_symlink(ino, &name, std::path::Path::new(&target), caller)
                .map_err(code)?;
            entry(fs, payload, &attr)
        }
        op::MKNOD => {
            // struct fuse_mknod_in { mode, rdev, umask, padding }
            let name = first_name()?;
            let (mode, rdev, umask) = (
                a.u32(0).ok_or_else(inval)?,
                a.u32(4).ok_or_else(inval)?,
                a.u32(8).ok_or_else(inval)?,
            );
            let (attr, _) = fs
                .do_mknod(ino, &name, mode, umask, rdev, caller)
                .map_err(code)?;
            entry(fs, payload, &attr)
        }
        op::MKDIR => {
            // struct fuse_mkdir_in { mode, umask }
            let name = first_name()?;
            let (mode, umask) = (a.u32(0).ok_or_else(inval)?, a.u32(4).ok_or_else(inval)?);
            let (attr, _) = fs.do_mkdir(ino, &name, mode, umask, caller).map_err(code)?;
            entry(fs, payload, &attr)
        }
        op::UNLINK | op::RMDIR => {
            let name = first_name()?;
            fs.do_remove(ino, &name, h.opcode == op::RMDIR)
                .map_err(code)?;
            Ok(0)
        }
        op::RENAME | op::RENAME2 => {
            // struct fuse_rename_in { newdir } / fuse_rename2_in { newdir, flags, padding }
            let newdir = INodeNo(a.u64(0).ok_or_else(inval)?);
            let flags = if h.opcode == op::RENAME2 {
                a.u32(8).ok_or_else(inval)?
            } else {
                0
            };
            let (old, new) = {
                let mut n = Names(&payload[..len]);
                let old = n.next_name().ok_or_else(inval)?.to_os_string();
                let new = n.next_name().ok_or_else(inval)?.to_os_string();
                (old, new)
            };
            fs.do_rename(ino, &old, newdir, &new, flags, caller)
                .map_err(code)?;
            Ok(0)
        }
        op::LINK => {
            // struct fuse_link_in { oldnodeid }
            let old = INodeNo(a.u64(0).ok_or_else(inval)?);
            let name = first_name()?;
            let (attr, _) = fs.do_link(old, ino, &name).map_err(code)?;
            entry(fs, payload, &attr)
        }
        op::OPEN => {
            // struct fuse_open_in { flags, open_flags }
            let flags = a.i32(0).ok_or_else(inval)?;
            let (fh, plan) = fs.do_open(ino, flags, &caller).map_err(code)?;
            let (flags, backing) = fuse::open_flags(fs, fh, plan, |fd| register(dev, fd));
            let mut out = Out::new(payload);
            open_out(&mut out, fh, flags, backing.as_deref())?;
            Ok(out.len())
        }
        op::READ => {
            // struct fuse_read_in { fh, offset, size, ... }
            let (fh, offset, size) = (
                a.u64(0).ok_or_else(inval)?,
                a.u64(8).ok_or_else(inval)?,
                a.u32(16).ok_or_else(inval)?,
            );
            if fuse::read_fails(fs, ino) {
                return Err(libc::EIO);
            }
            // Straight into the reply buffer.
            let room = (size as usize).min(payload.len());
            fs.do_read_into(fh, offset, &mut payload[..room])
                .map_err(code)
        }
        op::WRITE => {
            // struct fuse_write_in { fh, offset, size, write_flags, ... }; the data follows.
            let (fh, offset, size, wflags) = (
                a.u64(0).ok_or_else(inval)?,
                a.u64(8).ok_or_else(inval)?,
                a.u32(16).ok_or_else(inval)? as usize,
                a.u32(20).ok_or_else(inval)?,
            );
            let data = payload.get(..size.min(len)).ok_or_else(inval)?;
            // FUSE_WRITE_KILL_SUIDGID
            let kill = (wflags & 4 != 0).then_some(caller);
            let n = fs
                .do_write(ino, fh, offset, data, kill.as_ref())
                .map_err(code)?;
            let mut out = Out::new(payload);
            out.write_out(n).map_err(full)?;
            Ok(out.len())
        }
        op::STATFS => {
            let s = fs.do_statfs().map_err(code)?;
            let mut out = Out::new(payload);
            out.statfs(&s).map_err(full)?;
            Ok(out.len())
        }
        op::RELEASE | op::RELEASEDIR => {
            fs.do_release(a.u64(0).ok_or_else(inval)?);
            Ok(0)
        }
        op::FSYNC => {
            // struct fuse_fsync_in { fh, fsync_flags }; FUSE_FSYNC_FDATASYNC = 1
            let fh = a.u64(0).ok_or_else(inval)?;
            let datasync = a.u32(8).ok_or_else(inval)? & 1 != 0;
            fs.do_fsync(fh, datasync).map_err(code)?;
            Ok(0)
        }
        op::FLUSH | op::FSYNCDIR => Ok(0),
        op::SETXATTR => {
            // struct fuse_setxattr_in without FUSE_SETXATTR_EXT: { size, flags }
            let (size, flags) = (
                a.u32(0).ok_or_else(inval)? as usize,
                a.i32(4).ok_or_else(inval)?,
            );
            let (name, value) = {
                let mut n = Names(&payload[..len]);
                let name = n.next_name().ok_or_else(inval)?.to_os_string();
                let value = n.rest().get(..size).ok_or_else(inval)?.to_vec();
                (name, value)
            };
            fs.do_setxattr(ino, &name, &value, flags, caller)
                .map_err(code)?;
            Ok(0)
        }
        op::GETXATTR | op::LISTXATTR => {
            // struct fuse_getxattr_in { size, padding }
            let size = a.u32(0).ok_or_else(inval)?;
            let value = if h.opcode == op::GETXATTR {
                let name = first_name()?;
                fs.do_getxattr(ino, &name).map_err(code)?
            } else {
                fs.do_listxattr(ino).map_err(code)?
            };
            let mut out = Out::new(payload);
            match fuse::xattr_answer(&value, size)? {
                // struct fuse_getxattr_out { size, padding }
                fuse::XattrAnswer::Size(n) => out.write_out(n),
                fuse::XattrAnswer::Data(v) => out.bytes(v),
            }
            .map_err(full)?;
            Ok(out.len())
        }
        op::REMOVEXATTR => {
            let name = first_name()?;
            fs.do_removexattr(ino, &name).map_err(code)?;
            Ok(0)
        }
        op::OPENDIR => {
            let fh = fs.do_opendir(ino).map_err(code)?;
            let mut out = Out::new(payload);
            out.open_out(fh, fuse::opendir_flags().bits(), 0)
                .map_err(full)?;
            Ok(out.len())
        }
        op::READDIR => {
            let (fh, offset, size) = (
                a.u64(0).ok_or_else(inval)?,
                a.u64(8).ok_or_else(inval)?,
                a.u32(16).ok_or_else(inval)? as usize,
            );
            let entries = fs.do_readdir(fh, offset).map_err(code)?;
            let room = size.min(payload.len());
            let mut out = Out::new(&mut payload[..room]);
            for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                if out.dirent(e.ino, (i + 1) as u64, e.kind, &e.name).is_err() {
                    break;
                }
            }
            Ok(out.len())
        }
        op::READDIRPLUS => {
            let (fh, offset, size) = (
                a.u64(0).ok_or_else(inval)?,
                a.u64(8).ok_or_else(inval)?,
                a.u32(16).ok_or_else(inval)? as usize,
            );
            let room = size.min(payload.len());
            let mut out = Out::new(&mut payload[..room]);
            fuse::readdirplus_entries(fs, ino, fh, offset, true, |next, name, e| match e {
                fuse::PlusEntry::Full(ttl, attr) => out
                    .direntplus(attr.ino.0, next, attr.kind, name, Some((ttl, attr)))
                    .is_err(),
                fuse::PlusEntry::Bare { ino, kind } => {
                    out.direntplus(ino, next, kind, name, None).is_err()
                }
            })
            .map_err(code)?;
            Ok(out.len())
        }
        op::ACCESS => {
            // struct fuse_access_in { mask, padding }
            let mask = a.i32(0).ok_or_else(inval)?;
            fs.do_access(ino, mask, caller).map_err(code)?;
            Ok(0)
        }
        op::CREATE => {
            // struct fuse_create_in { flags, mode, umask, open_flags }
            let name = first_name()?;
            let (flags, mode, umask) = (
                a.i32(0).ok_or_else(inval)?,
                a.u32(4).ok_or_else(inval)?,
                a.u32(8).ok_or_else(inval)?,
            );
            let (attr, _, fh, plan) = fs
                .do_create(ino, &name, mode, umask, flags, caller)
                .map_err(code)?;
            let (flags, backing) = fuse::open_flags(fs, fh, plan, |fd| register(dev, fd));
            let mut out = Out::new(payload);
            out.entry(fs.ttl(), &attr).map_err(full)?;
            open_out(&mut out, fh, flags, backing.as_deref())?;
            Ok(out.len())
        }
        op::FALLOCATE => {
            // struct fuse_fallocate_in { fh, offset, length, mode, padding }
            let (fh, offset, length, mode) = (
                a.u64(0).ok_or_else(inval)?,
                a.i64(8).ok_or_else(inval)?,
                a.i64(16).ok_or_else(inval)?,
                a.i32(24).ok_or_else(inval)?,
            );
            fs.do_fallocate(fh, mode, offset, length).map_err(code)?;
            Ok(0)
        }
        op::LSEEK => {
            // struct fuse_lseek_in { fh, offset, whence, padding }
            let (fh, offset, whence) = (
                a.u64(0).ok_or_else(inval)?,
                a.i64(8).ok_or_else(inval)?,
                a.i32(16).ok_or_else(inval)?,
            );
            let off = fs.do_lseek(fh, offset, whence).map_err(code)?;
            let mut out = Out::new(payload);
            out.u64(off as u64).map_err(full)?;
            Ok(out.len())
        }
        op::COPY_FILE_RANGE => {
            // struct fuse_copy_file_range_in { fh_in, off_in, nodeid_out, fh_out, off_out,
            // len, flags }
            let (fh_in, off_in, fh_out, off_out, n) = (
                a.u64(0).ok_or_else(inval)?,
                a.i64(8).ok_or_else(inval)?,
                a.u64(24).ok_or_else(inval)?,
                a.i64(32).ok_or_else(inval)?,
                a.u64(40).ok_or_else(inval)?,
            );
            let done = fs
                .do_copy_file_range(fh_in, off_in, fh_out, off_out, n)
                .map_err(code)?;
            let mut out = Out::new(payload);
            out.write_out(done).map_err(full)?;
            Ok(out.len())
        }
        // The kernel's forced FORGET of a READDIRPLUS entry it could not use (struct
        // fuse_forget_in { nlookup }); it waits for the commit, with nothing in it.
        op::FORGET => {
            fs.do_forget(ino, a.u64(0).ok_or_else(inval)?);
            Ok(0)
        }
        // We never ask for FUSE_NOTIFY_RETRIEVE data.
        op::NOTIFY_REPLY => Ok(0),
        // As fuser answers what we do not implement: the kernel then stops asking (locks,
        // ioctl, poll, bmap, tmpfile, statx, syncfs).
        _ => Err(libc::ENOSYS),
    }
}

/// A reply of one `struct fuse_entry_out` (mknod, mkdir, symlink, link).
fn entry(fs: &OverlayFs, payload: &mut [u8], attr: &fuser::FileAttr) -> Result<usize, i32> {
    let mut out = Out::new(payload);
    out.entry(fs.ttl(), attr).map_err(full)?;
    Ok(out.len())
}

fn open_out(
    out: &mut Out<'_>,
    fh: u64,
    flags: FopenFlags,
    backing: Option<&Backing>,
) -> Result<(), i32> {
    let (flags, id) = match backing {
        Some(Backing::Raw(b)) => (flags, b.id()),
        // A backing id of fuser's: none exists once the rings run (the fuser adapter then
        // opens without passthrough, see `OverlayFs::rings_running`); the daemon's I/O then.
        Some(Backing::Fuser(_)) => (FopenFlags::FOPEN_DIRECT_IO | fuse::NOFLUSH, 0),
        None => (flags, 0),
    };
    out.open_out(fh, flags.bits(), id).map_err(full)
}

fn register(dev: &Arc<OwnedFd>, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Backing> {
    sys::BackingFile::open(dev, fd).map(Backing::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_like_the_kernel() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("0,2,4-5"), Some(4));
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn two_or_three_threads_per_queue() {
        assert_eq!(threads_per_queue(1), 3);
        assert_eq!(threads_per_queue(2), 3);
        assert_eq!(threads_per_queue(8), 2);
        assert_eq!(threads_per_queue(256), 2);
    }
}
