//! The inode table: one [`Node`] per merged object the kernel knows about.
//!
//! One map, private to this file: FUSE node id (= the st_ino the mount reports) -> node.
//! Locking happens only inside this file and inside each node's own `RwLock`; no lock here is held
//! across I/O.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use parking_lot::{Mutex, RwLock};

use super::LowerObj;

pub const ROOT_ID: u64 = 1;

/// One object of the merged view.
#[derive(Debug)]
pub struct Node {
    /// The st_ino the mount reports for this object, which is also its FUSE node id; fixed for
    /// the node's life.
    pub st_ino: u64,
    pub is_dir: bool,
    /// Kernel lookup count; the node is dropped from the table when it reaches zero.
    lookups: AtomicU64,
    /// The reaper asked the kernel to forget this node and no lookup came since: its FORGET is
    /// on the way (or the entry is in use, and goes once it is let go), so it is not asked again.
    reap_asked: AtomicBool,
    /// The table's lookup clock at this node's last kernel lookup: the reaper asks the kernel
    /// to forget the longest unused first (and so stays out of the directories being walked,
    /// whose locks its invalidations would wait for).
    used: AtomicU64,
    /// Layer state; read far more often than written.
    pub state: RwLock<NodeState>,
    /// Serialises copy-up of this node, so two writers never copy it twice. Only this node's
    /// requests wait on it; everything else goes on.
    pub copy_lock: Mutex<()>,
    /// How this node's open files do I/O; see `ops::OpenPlan`.
    pub io: Mutex<NodeIo>,
    /// Open files (FUSE handles) of this node.
    pub opens: AtomicU64,
    /// A READDIRPLUS of this directory sent entries without attributes (see `rdplus`).
    pub listed_bare: AtomicBool,
    /// The fds this node held when made (one per layer object), as counted in the table's
    /// budget; fixed, so the table's sum never drifts. A later copy-up adds one the budget's
    /// reserve covers.
    weight: usize,
}

/// I/O mode bookkeeping of a node's open files. The kernel allows either page-cached opens or
/// passthrough opens of one inode at a time, and only one backing file for all its passthrough
/// opens.
#[derive(Debug, Default)]
pub struct NodeIo {
    /// The upper file's backing id, shared by this node's passthrough opens. Weak: it closes
    /// with the last open that uses it.
    pub backing: Option<Weak<super::ops::Backing>>,
    /// Open files of this node in page-cached mode (read-only opens of a lower file).
    pub cached_opens: usize,
}

/// Where the object lives in the layers.
#[derive(Debug)]
pub struct NodeState {
    /// The directory this object was last seen in (None for the root), kept alive by this node.
    pub parent: Option<Arc<Node>>,
    /// The name it was last seen under.
    pub name: OsString,
    /// The object in the upper layer (`O_PATH`, or `O_RDONLY` for directories).
    pub upper: Option<Arc<OwnedFd>>,
    /// Lower objects, topmost first, as (layer index, fd). A non-directory has at most one; a
    /// directory lists every lower directory that contributes to it (stopping at an opaque one).
    pub lowers: Vec<LowerObj>,
    /// The upper directory is opaque (lowers are then empty).
    pub opaque: bool,
    /// The upper directory holds xattr whiteouts (`overlay.opaque=x`).
    pub xwhiteouts: bool,
    /// The upper directory's redirect to its lower origin (`overlay.redirect`), as stored.
    pub redirect: Option<OsString>,
    /// The upper directory holds entries whose st_ino comes from an origin xattr.
    pub impure: bool,
    /// The upper file holds metadata only (`overlay.metacopy`); the data is `lowers[0]`.
    pub metacopy: bool,
    /// The copied-up inode of this lower hard link (from the index), while this name is not
    /// in the upper layer itself.
    pub index: Option<Arc<OwnedFd>>,
    /// The name was removed while the kernel still held the inode (open files).
    pub unlinked: bool,
    /// Other names this object was seen under (hard links), besides `parent`/`name`.
    pub aliases: Vec<(Arc<Node>, OsString)>,
}

impl NodeState {
    /// The topmost real object: upper if copied up, else the indexed inode of a hard link
    /// another name of which was copied up (its metadata and xattrs are the object's now),
    /// else the topmost lower.
    pub fn top(&self) -> Option<&Arc<OwnedFd>> {
        self.upper
            .as_ref()
            .or(self.index.as_ref())
            .or_else(|| self.lowers.first().map(|l| &l.fd))
    }

    /// Where the data of a file is: below for a metacopy file, else the topmost object.
    pub fn data(&self) -> Option<&Arc<OwnedFd>> {
        if let Some(up) = &self.upper
            && !self.metacopy
        {
            return Some(up);
        }
        if let Some(ix) = &self.index {
            return Some(ix);
        }
        self.lowers.iter().find(|l| !l.metacopy).map(|l| &l.fd)
    }

    /// Does a lower layer hold this object (so removing it needs a whiteout)?
    pub fn in_lower(&self) -> bool {
        !self.lowers.is_empty()
    }

    /// Records that the object was seen as `parent/name`, which becomes its primary name.
    pub fn note_name(&mut self, parent: &Arc<Node>, name: &OsStr) {
        let same = |p: &Arc<Node>, n: &OsStr| p.st_ino == parent.st_ino && n == name;
        if let Some(p) = &self.parent
            && same(p, &self.name)
        {
            return;
        }
        self.aliases.retain(|(p, n)| !same(p, n));
        // A removed last name stays primary only to say where the object was: it is no alias
        // (a copy-up through it would link into a whiteout).
        if let Some(old) = self.parent.take()
            && !self.unlinked
        {
            self.aliases.push((old, std::mem::take(&mut self.name)));
            if self.aliases.len() > 16 {
                self.aliases.remove(0);
            }
        }
        self.parent = Some(parent.clone());
        self.name = name.to_os_string();
        self.unlinked = false;
    }

    /// Forgets the name `parent/name` (removed); the object is unlinked once it has no known
    /// name left.
    pub fn drop_name(&mut self, parent: u64, name: &OsStr) {
        let primary = self
            .parent
            .as_ref()
            .is_some_and(|p| p.st_ino == parent && self.name == name);
        if primary {
            match self.aliases.pop() {
                Some((p, n)) => {
                    self.parent = Some(p);
                    self.name = n;
                }
                None => self.unlinked = true,
            }
        } else {
            self.aliases
                .retain(|(p, n)| !(p.st_ino == parent && n.as_os_str() == name));
        }
    }

    /// Renames the known name `from` to `to`.
    pub fn move_name(&mut self, from: (u64, &OsStr), to: (&Arc<Node>, &OsStr)) {
        let primary = self
            .parent
            .as_ref()
            .is_some_and(|p| p.st_ino == from.0 && self.name == from.1);
        if primary {
            self.parent = Some(to.0.clone());
            self.name = to.1.to_os_string();
        } else {
            self.aliases
                .retain(|(p, n)| !(p.st_ino == from.0 && n.as_os_str() == from.1));
            self.note_name(to.0, to.1);
        }
    }

    /// How many layers contribute to this directory (the kernel calls >1 a "merge" dir).
    pub fn layer_count(&self) -> usize {
        usize::from(self.upper.is_some()) + self.lowers.len()
    }
}

impl Node {
    pub fn new(st_ino: u64, is_dir: bool, state: NodeState) -> Node {
        let weight = state.layer_count().max(1);
        Node {
            weight,
            st_ino,
            is_dir,
            lookups: AtomicU64::new(0),
            reap_asked: AtomicBool::new(false),
            used: AtomicU64::new(0),
            state: RwLock::new(state),
            copy_lock: Mutex::new(()),
            io: Mutex::new(NodeIo::default()),
            opens: AtomicU64::new(0),
            listed_bare: AtomicBool::new(false),
        }
    }

    /// One more kernel lookup of a node in the table, at lookup clock `tick`.
    fn looked_up(&self, tick: u64) {
        self.lookups.fetch_add(1, Ordering::AcqRel);
        self.reap_asked.store(false, Ordering::Relaxed);
        self.used.store(tick, Ordering::Relaxed);
    }
}

/// All live nodes, keyed by FUSE node id. fuser makes the node id and the reported st_ino one
/// number, so the key is the st_ino: stable for an object, and every name of one object (hard
/// links, or the same path looked up twice) is one FUSE inode. A real inode number cannot be
/// reused while its node lives, because the node holds an fd of it.
#[derive(Debug)]
pub struct InodeTable {
    by_id: DashMap<u64, Arc<Node>>,
    /// Sum of the nodes' weights: about the fds the table holds (what the reaper bounds).
    fds: AtomicUsize,
    /// Counts kernel lookups; a node's `used` is this clock at its last one.
    clock: AtomicU64,
    /// Where forgotten nodes were last seen, so a file handle (`open_by_handle_at`, NFS
    /// export) that outlived the kernel's inode can find its object again. Bounded.
    past: Mutex<PastNames>,
}

/// st_ino -> (parent st_ino, name) of forgotten nodes, oldest dropped first past [`PAST_MAX`].
#[derive(Debug, Default)]
struct PastNames {
    map: std::collections::HashMap<u64, (u64, OsString)>,
    order: std::collections::VecDeque<u64>,
}

/// How many forgotten names are kept for file handles (about 64 bytes each).
const PAST_MAX: usize = 1 << 16;

impl InodeTable {
    pub fn new(root: NodeState) -> InodeTable {
        let table = InodeTable {
            by_id: DashMap::new(),
            fds: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            past: Mutex::new(PastNames::default()),
        };
        let node = Arc::new(Node::new(ROOT_ID, true, root));
        node.lookups.store(1, Ordering::Relaxed);
        table.fds.fetch_add(node.weight, Ordering::Relaxed);
        table.by_id.insert(ROOT_ID, node);
        table
    }

    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.by_id.get(&id).map(|n| n.clone())
    }

    /// Returns the node for `st_ino`, creating it with `make` if there is none, and counts one
    /// kernel lookup on it. The bool tells whether it existed already.
    pub fn lookup_or_insert(
        &self,
        st_ino: u64,
        is_dir: bool,
        make: impl FnOnce() -> NodeState,
    ) -> (Arc<Node>, bool) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        match self.by_id.entry(st_ino) {
            Entry::Occupied(mut e) => {
                if e.get().is_dir == is_dir {
                    e.get().looked_up(tick);
                    return (e.get().clone(), true);
                }
                // The number now names an object of another type: the old node is stale.
                let node = Arc::new(Node::new(st_ino, is_dir, make()));
                node.lookups.store(1, Ordering::Relaxed);
                node.used.store(tick, Ordering::Relaxed);
                self.fds.fetch_add(node.weight, Ordering::Relaxed);
                let old = e.insert(node.clone());
                self.fds.fetch_sub(old.weight, Ordering::Relaxed);
                (node, false)
            }
            Entry::Vacant(e) => {
                let node = Arc::new(Node::new(st_ino, is_dir, make()));
                node.lookups.store(1, Ordering::Relaxed);
                node.used.store(tick, Ordering::Relaxed);
                self.fds.fetch_add(node.weight, Ordering::Relaxed);
                e.insert(node.clone());
                (node, false)
            }
        }
    }

    /// Counts one kernel lookup on a node the caller already holds (`.` and `..` lookups),
    /// putting it back in the table if it had been forgotten.
    pub fn reference(&self, node: &Arc<Node>) -> Arc<Node> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        match self.by_id.entry(node.st_ino) {
            Entry::Occupied(e) => {
                e.get().looked_up(tick);
                e.get().clone()
            }
            Entry::Vacant(e) => {
                node.lookups.store(1, Ordering::Release);
                node.used.store(tick, Ordering::Relaxed);
                self.fds.fetch_add(node.weight, Ordering::Relaxed);
                e.insert(node.clone());
                node.clone()
            }
        }
    }

    /// Drops `n` kernel references; removes the node at zero. Saturating: a confused kernel
    /// client cannot underflow the count.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        // The count changes only under the map's shard lock, so a concurrent lookup either
        // sees the node before it is removed (and keeps it) or after (and makes a new one).
        let removed = self.by_id.remove_if(&id, |_, node| {
            let cur = node.lookups.load(Ordering::Acquire);
            let new = cur.saturating_sub(n);
            node.lookups.store(new, Ordering::Release);
            new == 0
        });
        if let Some((_, node)) = removed {
            self.fds.fetch_sub(node.weight, Ordering::Relaxed);
            let s = node.state.read();
            if let Some(parent) = &s.parent
                && !s.unlinked
            {
                self.remember(id, parent.st_ino, &s.name);
            }
        }
    }

    /// Records where the forgotten node `id` was last seen.
    fn remember(&self, id: u64, parent: u64, name: &OsStr) {
        let mut past = self.past.lock();
        if past.map.insert(id, (parent, name.to_os_string())).is_none() {
            past.order.push_back(id);
        }
        while past.order.len() > PAST_MAX {
            if let Some(old) = past.order.pop_front() {
                past.map.remove(&old);
            }
        }
    }

    /// Where the forgotten node `id` was last seen: (parent st_ino, name).
    pub fn past_name(&self, id: u64) -> Option<(u64, OsString)> {
        self.past.lock().map.get(&id).cloned()
    }

    /// A name of the forgotten node `id` was renamed to `parent/name`, or removed (`None`).
    pub fn past_moved(&self, id: u64, to: Option<(u64, &OsStr)>) {
        let mut past = self.past.lock();
        match to {
            Some((p, n)) => {
                if let Some(e) = past.map.get_mut(&id) {
                    *e = (p, n.to_os_string());
                }
            }
            None => {
                past.map.remove(&id);
            }
        }
    }

    /// Up to `n` (parent st_ino, name) pairs of nodes the kernel could forget, files before
    /// directories and each the longest unused first: the reaper invalidates these entries to
    /// keep the daemon's fds bounded. A node handed out is not handed out again until the
    /// kernel looks it up again.
    pub fn victims(&self, n: usize) -> Vec<(u64, OsString)> {
        let mut cands: Vec<(bool, u64, u64)> = self
            .by_id
            .iter()
            .filter(|e| e.key() != &ROOT_ID && !e.value().reap_asked.load(Ordering::Relaxed))
            .map(|e| {
                (
                    e.value().is_dir,
                    e.value().used.load(Ordering::Relaxed),
                    *e.key(),
                )
            })
            .collect();
        if cands.len() > n {
            cands.select_nth_unstable_by_key(n, |c| (c.0, c.1));
            cands.truncate(n);
        }
        cands
            .into_iter()
            .filter_map(|(_, _, id)| {
                let node = self.get(id)?;
                let s = node.state.try_read()?;
                let entry = (s.parent.as_ref()?.st_ino, s.name.clone());
                node.reap_asked.store(true, Ordering::Relaxed);
                Some(entry)
            })
            .collect()
    }

    /// Does the table still hold the fd of a removed upper object? Its space comes back
    /// only once the kernel forgets it (then the fd closes).
    pub fn holds_removed(&self) -> bool {
        self.by_id.iter().any(|e| {
            e.value()
                .state
                .try_read()
                .is_some_and(|s| s.unlinked && s.upper.is_some())
        })
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// About how many fds the nodes hold (each node's weight, summed).
    pub fn fds(&self) -> usize {
        self.fds.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
