//! Keeps the daemon's open files bounded.
//!
//! Every node holds an fd of its object (see ARCHITECTURE.md), and the kernel forgets inodes
//! only under memory pressure, so walking a large tree would run into RLIMIT_NOFILE (EMFILE),
//! which root cannot always raise. When the table grows past a high-water mark, a thread asks
//! the kernel to drop cached entries (`FUSE_NOTIFY_INVAL_ENTRY`); the kernel then evicts the
//! unused inodes and sends FORGET, which closes their fds. Entries in use stay; names are
//! looked up again on the next access.
//!
//! A lookup that still meets EMFILE holds the kernel's lock of its directory while it waits,
//! and the reaper's FUSE_NOTIFY_INVAL_ENTRY for any entry of that directory needs the same
//! lock: waiting there would stall both. So the reaper keeps a reserve of fds (of /dev/null)
//! that such a lookup closes one at a time to go on at once; the reserve is refilled once the
//! table is back under its low mark.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use parking_lot::{Condvar, Mutex};

use super::inode::InodeTable;

/// Shared between the filesystem (which kicks) and the reaper thread.
#[derive(Debug)]
pub struct Reaper {
    table: Arc<InodeTable>,
    /// Start reaping when the table holds more fds than this...
    high: usize,
    /// ...and stop below this many.
    low: usize,
    kicked: Mutex<bool>,
    cv: Condvar,
    /// Spare fds given up one by one to lookups that meet EMFILE.
    reserve: Mutex<Vec<OwnedFd>>,
    reserve_size: usize,
}

impl Reaper {
    pub fn new(table: Arc<InodeTable>, fd_limit: u64) -> Reaper {
        // The table counts the fds its nodes hold (one per layer object); a quarter of the
        // limit is left for copy-ups made since, open handles and the daemon's own files.
        // Reaping drops the kernel's cached entries and listings, so a low mark makes warm
        // walks of big trees cold (a warm `find` of 5k lower files: 5 ms unreaped, 40 ms
        // reaped at a quarter of the limit in nodes).
        let limit = usize::try_from(fd_limit).unwrap_or(usize::MAX).min(1 << 20);
        // At least 512 stay free: lookups can outrun the reaper by that much.
        let high = (limit * 3 / 4).min(limit.saturating_sub(512)).max(128);
        let reaper = Reaper {
            table,
            high,
            low: (high * 4 / 5).max(64),
            kicked: Mutex::new(false),
            cv: Condvar::new(),
            reserve: Mutex::new(Vec::new()),
            reserve_size: (limit / 16).min(256),
        };
        reaper.refill();
        reaper
    }

    /// Closes one spare fd so that a caller that met EMFILE can retry at once; false when the
    /// reserve is spent. Also wakes the reaper.
    pub fn give_up_spare(&self) -> bool {
        self.kick_now();
        self.reserve.lock().pop().is_some()
    }

    /// Tops the reserve up to its size (best effort: an fd it cannot open now, it opens later).
    fn refill(&self) {
        let mut r = self.reserve.lock();
        while r.len() < self.reserve_size {
            match std::fs::File::open("/dev/null") {
                Ok(f) => r.push(OwnedFd::from(f)),
                Err(_) => break,
            }
        }
    }

    /// Does the table hold more fds than the high-water mark?
    pub fn over_high(&self) -> bool {
        self.table.fds() > self.high
    }

    /// Called after a node was added: wakes the reaper when the table is too big.
    pub fn kick(&self) {
        if self.over_high() {
            let mut k = self.kicked.lock();
            if !*k {
                *k = true;
                self.cv.notify_one();
            }
        }
    }

    /// Wakes the reaper whatever the table's size (the daemon ran out of fds).
    fn kick_now(&self) {
        let mut k = self.kicked.lock();
        if !*k {
            *k = true;
            self.cv.notify_one();
        }
    }

    /// The reaper thread's loop: runs for the life of the mount.
    pub fn run(&self, notifier: Notifier) {
        loop {
            {
                let mut k = self.kicked.lock();
                while !*k {
                    self.cv.wait(&mut k);
                }
                *k = false;
            }
            // Lookups go on while the reaper works (a serial lstat walk makes tens of
            // thousands a second): ask for what is over the low mark now, then watch for
            // FORGETs in 1 ms steps, and ask again once they stop coming or new lookups
            // have eaten a quarter of the gap between the marks. Choosing victims scans the
            // table, so rounds must not be back to back while FORGETs are still on the way.
            // Nodes already asked are not asked twice; the reaper goes back to sleep below
            // the low mark, or when for a while there was nothing left to ask and nothing
            // came back. (Fixed 20 ms pauses let a walk run through the fds left, EMFILE.)
            let slack = ((self.high - self.low) / 4).max(16);
            let mut idle = 0;
            while self.table.fds() > self.low && idle < 25 {
                let before = self.table.fds();
                let victims = self.table.victims(before - self.low);
                let asked = victims.len();
                for (parent, name) in victims {
                    // ENOENT (already gone) and EBUSY-like refusals are fine: best effort.
                    let _ = notifier.inval_entry(INodeNo(parent), &name);
                }
                let mut last = self.table.fds();
                for _ in 0..20 {
                    std::thread::sleep(Duration::from_millis(1));
                    let now = self.table.fds();
                    if now <= self.low || now > last + slack || (asked > 0 && now >= last) {
                        break;
                    }
                    last = now;
                }
                if asked == 0 && self.table.fds() >= before {
                    idle += 1;
                } else {
                    idle = 0;
                }
            }
            if self.table.fds() <= self.low {
                self.refill();
            }
        }
    }
}
