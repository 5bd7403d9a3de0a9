//! Keeps the daemon's open files bounded.
//!
//! Every node holds an fd of its object (see ARCHITECTURE.md), and the kernel forgets inodes
//! only under memory pressure, so walking a large tree would run into RLIMIT_NOFILE (EMFILE),
//! which root cannot always raise. When the table grows past a high-water mark, a thread asks
//! the kernel to drop cached entries (`FUSE_NOTIFY_INVAL_ENTRY`); the kernel then evicts the
//! unused inodes and sends FORGET, which closes their fds. Entries in use stay; names are
//! looked up again on the next access.

use std::sync::Arc;
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use parking_lot::{Condvar, Mutex};

use super::inode::{InodeTable, ROOT_ID};

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
        Reaper {
            table,
            high,
            low: (high * 4 / 5).max(64),
            kicked: Mutex::new(false),
            cv: Condvar::new(),
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
    pub fn kick_now(&self) {
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
            let mut stalled = 0;
            while self.table.fds() > self.low && stalled < 5 {
                let before = self.table.fds();
                // Each node holds at least one fd: this many victims bring the table down.
                let want = before - self.low;
                for (parent, name) in self.table.victims(want) {
                    if parent == ROOT_ID && name.is_empty() {
                        continue;
                    }
                    // ENOENT (already gone) and EBUSY-like refusals are fine: best effort.
                    if notifier.inval_entry(INodeNo(parent), &name).is_err() {
                        continue;
                    }
                }
                // Let the kernel evict and send its FORGETs.
                std::thread::sleep(Duration::from_millis(20));
                if self.table.fds() >= before {
                    stalled += 1;
                } else {
                    stalled = 0;
                }
            }
        }
    }
}
