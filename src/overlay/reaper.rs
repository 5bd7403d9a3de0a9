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
    /// Start reaping above this many nodes...
    high: usize,
    /// ...and stop below this many.
    low: usize,
    kicked: Mutex<bool>,
    cv: Condvar,
}

impl Reaper {
    pub fn new(table: Arc<InodeTable>, fd_limit: u64) -> Reaper {
        // A file's node holds one fd, a directory's one per layer (directories are a few
        // percent of a tree), and open handles need fds too: half the limit leaves room for
        // all that. Reaping drops the kernel's cached entries and listings, so a lower mark
        // makes warm walks of big trees cold (a 5k-file `find` went from 5 to 40 ms at 1/4).
        let limit = usize::try_from(fd_limit).unwrap_or(usize::MAX).min(1 << 20);
        Reaper {
            table,
            high: (limit / 2).max(128),
            low: (limit * 2 / 5).max(64),
            kicked: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    /// Called after a node was added: wakes the reaper when the table is too big.
    pub fn kick(&self) {
        if self.table.len() > self.high {
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
            while self.table.len() > self.low && stalled < 5 {
                let before = self.table.len();
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
                if self.table.len() >= before {
                    stalled += 1;
                } else {
                    stalled = 0;
                }
            }
        }
    }
}
