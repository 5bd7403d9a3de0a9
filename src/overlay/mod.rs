//! The overlay filesystem: merged lookup, attributes and every change to the upper layer.
//!
//! `OverlayFs` holds the layers and the inode table; the `do_*` methods (here, in `ops.rs`,
//! `dir.rs` and `copy_up.rs`) return `io::Result` and know nothing of FUSE replies; `fuse.rs` is
//! the thin `fuser::Filesystem` adapter over them.
//!
//! Architecture invariants: nothing here writes to a lower layer (lower fds are opened `O_PATH` or
//! read-only); every name is resolved with `*at` calls relative to a layer fd, one component at a
//! time, never following a symlink; no lock is held while data is copied.

mod acl;
mod copy_up;
mod dir;
mod fuse;
pub(crate) use fuse::failpoint;
pub mod idmap;
pub mod inode;
pub mod layer;
mod ops;
pub mod privs;
pub mod rdplus;
pub mod reaper;
pub mod uring;
mod wire;

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{FileAttr, FileType, INodeNo};

use crate::sys;
use inode::{InodeTable, Node, NodeState};
use layer::{Layer, MarkerStyle};

pub use dir::DirEntry;
pub use fuse::FuseFs;

/// What a mount is made of, after the command line was validated.
#[derive(Clone, Debug, Default)]
pub struct FsConfig {
    /// Lower layer directories, topmost first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// Number of FUSE worker threads.
    pub threads: usize,
    /// Use kernel passthrough for file I/O when the kernel offers it (needs CAP_SYS_ADMIN).
    pub passthrough: bool,
    /// Serve requests over io_uring when the kernel offers it (`uring.rs`).
    pub uring: bool,
    /// Metadata changes to a lower file copy metadata only (the kernel's `metacopy=on`).
    pub metacopy: bool,
    /// Merged directories move with a redirect (the kernel's `redirect_dir=on`); off: EXDEV.
    pub redirect_dir: bool,
    /// Hard links below stay one inode through copy-up (the kernel's `index=on`).
    pub index: bool,
    /// How ownership is translated between disk and container.
    pub ownership: idmap::Ownership,
    /// RLIMIT_NOFILE the daemon runs with.
    pub fd_limit: u64,
    /// Which READDIRPLUS entries carry attributes (`rdplus`).
    pub readdirplus_attrs: rdplus::Mode,
    /// Ask the kernel to enforce POSIX ACLs (FUSE_POSIX_ACL); off with `noacl`, and where
    /// ownership is translated (ids inside ACLs are not).
    pub posix_acl: bool,
}

/// A lower object found by lookup.
#[derive(Clone, Debug)]
pub struct LowerObj {
    pub layer: usize,
    pub fd: Arc<OwnedFd>,
    /// For directories: holds xattr whiteouts (`overlay.opaque=x`).
    pub xwhiteouts: bool,
    /// A metacopy file: its data is in the next lower object.
    pub metacopy: bool,
    /// For directories: the names a `.wh.NAME` entry hides here, once a full listing has read
    /// them (lower layers do not change under the mount). A lookup of a name missing in this
    /// directory then needs no `.wh.` probe.
    pub wh_names: WhNames,
}

/// See `LowerObj::wh_names`; shared by the clones of one lower directory object.
pub type WhNames = Arc<std::sync::OnceLock<std::collections::HashSet<OsString>>>;

/// How `probe` tells a missing name from a whited-out one.
#[derive(Clone, Copy)]
enum Wh<'a> {
    /// Look for `.wh.NAME` in the directory.
    Ask,
    /// The directory's `.wh.` names, once a full listing has read them (else as `Ask`).
    Listed(&'a WhNames),
    /// No layer lies below this directory: a missing name is missing, whiteout or not.
    NothingBelow,
}

/// The merged filesystem.
#[derive(Debug)]
pub struct OverlayFs {
    /// Layer 0 is the upper layer when `has_upper`; the rest are lowers, topmost first.
    layers: Vec<Layer>,
    has_upper: bool,
    /// `<workdir>/work`: where copy-ups and whiteouts are built before they are renamed into
    /// the upper layer, so a crash never leaves half an object there.
    work: Option<OwnedFd>,
    style: MarkerStyle,
    /// All layers on one filesystem: st_ino is the real inode number, as with the kernel.
    single_dev: bool,
    table: Arc<InodeTable>,
    /// Bounds the fds the table holds (see `reaper`).
    reaper: Arc<reaper::Reaper>,
    handles: DashMap<u64, Arc<ops::Handle>>,
    next_fh: AtomicU64,
    /// Upper inode number -> the st_ino its object had before copy-up, so st_ino stays stable
    /// for a path across copy-up during the mount.
    copied: DashMap<u64, u64>,
    tmp_counter: AtomicU64,
    ttl: Duration,
    /// Kernel passthrough for regular files is on (root, and a kernel that has it).
    passthrough: AtomicBool,
    /// The kernel's writeback cache is on (when passthrough is not: the two exclude each other).
    writeback: AtomicBool,
    /// Ask for passthrough at init.
    want_passthrough: bool,
    want_uring: bool,
    /// The kernel offered FUSE over io_uring at FUSE_INIT.
    uring: AtomicBool,
    /// Ask for FUSE_POSIX_ACL at init.
    want_posix_acl: bool,
    /// The kernel enforces POSIX ACLs and leaves the umask to us (see `acl`).
    posix_acl: AtomicBool,
    /// The io_uring transport serves the requests (every queue registered).
    rings: AtomicBool,
    /// While the rings run: the spacing of fuser's reads of /dev/fuse, in µs (0: none), and
    /// when the next may come (see `fuse::coalesce_forgets`).
    forget_pause_us: AtomicU64,
    pub(super) next_forget_read: parking_lot::Mutex<Option<std::time::Instant>>,
    metacopy: bool,
    redirect_dir: bool,
    /// `<workdir>/stratafs-index`: one hard link per copied-up inode that has several names
    /// below, named by its st_ino, so every name joins the same upper inode (`index=on`).
    index: Option<OwnedFd>,
    /// Ownership translation (id maps, squashing, xattr-kept permissions).
    own: idmap::Ownership,
    /// Serialises read-modify-write of indexed link counts.
    nlink_lock: parking_lot::Mutex<()>,
    /// Counts copy-ups (and index entries made), so a lookup that raced one can tell that what
    /// it found may be stale (see `intern`).
    copy_gen: AtomicU64,
    /// The kernel notifier, once mounted: tells the kernel when stratafs itself changed what
    /// it may have cached.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// The mount's st_dev, once mounted (see `executing`).
    mount_dev: Arc<std::sync::OnceLock<u64>>,
    /// Which READDIRPLUS entries carry attributes.
    rdplus: rdplus::Policy,
}

/// How a name looks in one layer directory.
enum Probe {
    Missing,
    Whiteout,
    Found(OwnedFd, sys::Stat),
    /// A non-directory that a node already holds, and knows to carry none of the markers a
    /// lookup reads (metacopy, redirect, origin, index): its fd is shared, nothing is opened
    /// and no xattr is read (see `known_plain`).
    Plain(Arc<OwnedFd>, sys::Stat),
}

/// An object found by merged lookup, before it becomes a node.
#[derive(Default)]
pub struct Found {
    upper: Option<(Arc<OwnedFd>, sys::Stat)>,
    lowers: Vec<(LowerObj, sys::Stat)>,
    opaque: bool,
    xwhiteouts: bool,
    /// The upper directory's redirect xattr, as stored.
    redirect: Option<OsString>,
    /// The upper object's st_ino from before its copy-up.
    origin: Option<u64>,
    /// The upper directory holds entries with an origin.
    impure: bool,
    /// The upper file holds metadata only; its data is `lowers[0]`.
    metacopy: bool,
    /// The copied-up inode of a lower hard link, from the index, when this name itself is not
    /// in the upper layer yet.
    index: Option<(Arc<OwnedFd>, sys::Stat)>,
    /// `OverlayFs::copy_gen` when the lookup started: a copy-up since may have put this name
    /// (or its hard link's inode) above what was found.
    seen_gen: u64,
}

/// Where a lookup continues in the lower layers.
enum Target {
    /// This name, in the parent's directory of each layer.
    Name(OsString),
    /// This path from each layer's root (an absolute redirect): parent components and leaf.
    Path(Vec<OsString>, OsString),
}

impl Target {
    /// Parses a redirect xattr: `/a/b/c` (absolute, from the layer roots) or `name` (the same
    /// parent, another name). Empty, `.`/`..` components or a slash in a relative redirect
    /// make it invalid, as for the kernel (EIO).
    fn parse(r: &OsStr) -> io::Result<Target> {
        use std::os::unix::ffi::OsStrExt;
        let b = r.as_bytes();
        let bad = || errno(libc::EIO);
        if let Some(rest) = b.strip_prefix(b"/") {
            let mut comps: Vec<OsString> = Vec::new();
            for c in rest.split(|x| *x == b'/') {
                if c.is_empty() || c == b"." || c == b".." || c.len() > 255 {
                    return Err(bad());
                }
                comps.push(OsStr::from_bytes(c).to_os_string());
            }
            let leaf = comps.pop().ok_or_else(bad)?;
            Ok(Target::Path(comps, leaf))
        } else {
            if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." || b.len() > 255 {
                return Err(bad());
            }
            Ok(Target::Name(r.to_os_string()))
        }
    }
}

/// The result of walking a path in one layer.
enum Walk {
    Dir(OwnedFd),
    Missing,
    /// A whiteout or a non-directory on the way: the layers below are hidden too.
    Stop,
}

impl Found {
    /// The upper inode this name shows, in the upper layer or through the index.
    fn upper_inode(&self) -> Option<&Arc<OwnedFd>> {
        self.upper
            .as_ref()
            .or(self.index.as_ref())
            .map(|(fd, _)| fd)
    }

    fn top_stat(&self) -> &sys::Stat {
        match (&self.upper, &self.index) {
            (Some((_, st)), _) | (None, Some((_, st))) => st,
            _ => &self.lowers[0].1,
        }
    }
}

pub fn is_dir(st: &sys::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn is_enoent(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

impl OverlayFs {
    /// Opens every layer and prepares the work directory. Fails, changing nothing but the work
    /// directory's scratch area, when a layer cannot be opened.
    pub fn new(cfg: &FsConfig) -> io::Result<OverlayFs> {
        let mut layers = Vec::new();
        if let Some(upper) = &cfg.upper {
            layers.push(Layer::open(upper.clone())?);
        }
        for lower in &cfg.lowers {
            layers.push(Layer::open(lower.clone())?);
        }
        let mut devs: Vec<u64> = Vec::new();
        for layer in &mut layers {
            layer.fsid = match devs.iter().position(|d| *d == layer.dev) {
                Some(i) => i as u64,
                None => {
                    devs.push(layer.dev);
                    (devs.len() - 1) as u64
                }
            };
        }
        let (work, index) = match &cfg.work {
            Some(w) if cfg.upper.is_some() => {
                let (work, index) = prepare_work(w)?;
                (Some(work), Some(index))
            }
            _ => (None, None),
        };
        let index = if cfg.index { index } else { None };
        let style = match &work {
            Some(w) => MarkerStyle::probe(w.as_fd()),
            None => MarkerStyle {
                char_whiteout: true,
                trusted_xattrs: true,
            },
        };
        let has_upper = cfg.upper.is_some();
        let first_lower = usize::from(has_upper);
        let root_lowers: Vec<LowerObj> = (first_lower..layers.len())
            .map(|i| {
                let fd = sys::openat(
                    layers[i].root.as_fd(),
                    OsStr::new("."),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                )?;
                let xwhiteouts = layer::marks(fd.as_fd(), true)?.xwhiteouts;
                Ok(LowerObj {
                    layer: i,
                    fd: Arc::new(fd),
                    xwhiteouts,
                    metacopy: false,
                    wh_names: WhNames::default(),
                })
            })
            .collect::<io::Result<_>>()?;
        let root_upper = if has_upper {
            Some(Arc::new(sys::openat(
                layers[0].root.as_fd(),
                OsStr::new("."),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )?))
        } else {
            None
        };
        let root_marks = match &root_upper {
            Some(fd) => layer::marks(fd.as_fd(), true)?,
            None => layer::Marks::default(),
        };
        if root_upper.is_none() && root_lowers.is_empty() {
            return Err(errno(libc::EINVAL));
        }
        let single_dev = devs.len() == 1;
        let root = NodeState {
            parent: None,
            name: OsString::new(),
            upper: root_upper,
            lowers: root_lowers,
            opaque: false,
            xwhiteouts: root_marks.xwhiteouts,
            redirect: None,
            impure: root_marks.impure,
            metacopy: false,
            index: None,
            unlinked: false,
            aliases: Vec::new(),
        };
        let table = Arc::new(InodeTable::new(root));
        Ok(OverlayFs {
            rdplus: rdplus::Policy::new(cfg.readdirplus_attrs),
            layers,
            has_upper,
            work,
            style,
            single_dev,
            reaper: Arc::new(reaper::Reaper::new(table.clone(), cfg.fd_limit)),
            table,
            handles: DashMap::new(),
            next_fh: AtomicU64::new(1),
            copied: DashMap::new(),
            tmp_counter: AtomicU64::new(0),
            ttl: cfg.ttl,
            passthrough: AtomicBool::new(false),
            writeback: AtomicBool::new(false),
            want_passthrough: cfg.passthrough,
            want_uring: cfg.uring,
            uring: AtomicBool::new(false),
            want_posix_acl: cfg.posix_acl,
            posix_acl: AtomicBool::new(false),
            rings: AtomicBool::new(false),
            forget_pause_us: AtomicU64::new(0),
            next_forget_read: parking_lot::Mutex::new(None),
            metacopy: cfg.metacopy,
            redirect_dir: cfg.redirect_dir,
            mount_dev: Arc::new(std::sync::OnceLock::new()),
            notifier: Arc::new(std::sync::OnceLock::new()),
            index,
            nlink_lock: parking_lot::Mutex::new(()),
            copy_gen: AtomicU64::new(0),
            own: cfg.ownership.clone(),
        })
    }

    /// The fd reaper, for the daemon to run in a thread of its own once mounted.
    pub fn reaper(&self) -> Arc<reaper::Reaper> {
        self.reaper.clone()
    }

    /// Where the daemon puts the session's notifier once mounted.
    pub fn notifier_cell(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Drops the kernel's cached attributes of an inode (not its data): safe from inside a
    /// request, it takes no lock the request may hold.
    fn invalidate_attr(&self, st_ino: u64) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_inode(INodeNo(st_ino), -1, 0);
        }
    }

    /// Where the daemon records the mount's st_dev once the mount exists.
    pub fn mount_dev_cell(&self) -> Arc<std::sync::OnceLock<u64>> {
        self.mount_dev.clone()
    }

    /// Is some process executing the file with this st_ino from this mount? Asked only for the
    /// rare `O_RDONLY|O_TRUNC` open: the kernel sends its truncation to us before it checks for
    /// a running executable, so without this check the binary would be cut to zero.
    fn executing(&self, st_ino: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(dev) = self.mount_dev.get().copied() else {
            return false;
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return false;
        };
        procs.flatten().any(|p| {
            p.file_name().as_bytes().iter().all(u8::is_ascii_digit)
                && std::fs::metadata(p.path().join("exe"))
                    .is_ok_and(|m| m.dev() == dev && m.ino() == st_ino)
        })
    }

    pub fn style(&self) -> MarkerStyle {
        self.style
    }

    /// Number of live inodes (for memory reports and tests).
    pub fn live_inodes(&self) -> usize {
        self.table.len()
    }

    fn node(&self, ino: INodeNo) -> io::Result<Arc<Node>> {
        self.table.get(ino.0).ok_or_else(|| errno(libc::ESTALE))
    }

    fn work(&self) -> io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or_else(|| errno(libc::EROFS))
    }

    fn tmp_name(&self) -> OsString {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!("#{n:x}"))
    }

    /// st_ino for a real inode of layer `layer`.
    fn encode(&self, layer: usize, real_ino: u64) -> u64 {
        encode_ino(self.single_dev, self.layers[layer].fsid, real_ino)
    }

    /// st_ino of an upper object: the pre-copy-up number if we copied it up.
    fn upper_stino(&self, real_ino: u64) -> u64 {
        match self.copied.get(&real_ino) {
            Some(v) => *v,
            None => self.encode(0, real_ino),
        }
    }

    /// Was the object `st_ino`, whose upper inode has stat `upper`, made in the upper layer?
    /// It is then known by its own upper number and has no index entry and no merged link
    /// count to keep: copied-up lower hard links keep the number of their origin.
    fn made_in_upper(&self, st_ino: u64, upper: &sys::Stat) -> bool {
        st_ino == self.encode(0, upper.st_ino)
    }

    fn stino_of(&self, found: &Found) -> u64 {
        match &found.upper {
            Some(_) if found.origin.is_some() => found.origin.unwrap_or_default(),
            Some((_, st)) => self.upper_stino(st.st_ino),
            None => self.encode(found.lowers[0].0.layer, found.lowers[0].1.st_ino),
        }
    }

    /// Looks at `name` in one layer directory: layer `layer` of the parent's, when given, which
    /// lets a non-directory a node already holds be shared instead of opened again; `wh` says
    /// how to tell whether a missing name is whited out (see `Wh`).
    fn probe(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        xwhiteouts: bool,
        layer: Option<usize>,
        wh: Wh<'_>,
    ) -> io::Result<Probe> {
        let st = match sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) if is_enoent(&e) => {
                let listed = match wh {
                    Wh::NothingBelow => return Ok(Probe::Missing),
                    Wh::Listed(w) => w.get(),
                    Wh::Ask => None,
                };
                let hidden = match listed {
                    Some(names) => names.contains(name),
                    None => layer::exists(dir, &layer::whiteout_name(name))?,
                };
                return Ok(if hidden {
                    Probe::Whiteout
                } else {
                    Probe::Missing
                });
            }
            Err(e) => return Err(e),
        };
        if layer::is_char_whiteout(dir, name, &st)? {
            return Ok(Probe::Whiteout);
        }
        if let Some(li) = layer
            && !xwhiteouts
            && !is_dir(&st)
            && let Some(fd) = self.known_plain(li, &st)
        {
            return Ok(Probe::Plain(fd, st));
        }
        let flags = if is_dir(&st) {
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
        } else {
            libc::O_PATH | libc::O_NOFOLLOW
        };
        let fd = self.openat_retry(dir, name, flags)?;
        if xwhiteouts && layer::is_xattr_whiteout(fd.as_fd(), &st)? {
            return Ok(Probe::Whiteout);
        }
        Ok(Probe::Found(fd, st))
    }

    /// The fd of the object `st` (found in layer `layer`) that a node already holds, when that
    /// node knows the object to be plain: a non-directory with no metacopy, redirect, origin or
    /// index entry, nothing above or below it. The node's key is what `stino_of` makes of such
    /// an object, and the held fd must still be that inode (it cannot be reused while held), so
    /// the node is this object. Lookups meet known objects all the time: READDIRPLUS of a
    /// directory the kernel has entries of, the UNLINK of a name it listed, `git add` and `tar c`
    /// over a walked tree. Each then costs an fstat instead of an openat, a listxattr through
    /// /proc and a close. Contended nodes are left alone (`try_read`): the caller holds the
    /// parent's state lock.
    fn known_plain(&self, layer: usize, st: &sys::Stat) -> Option<Arc<OwnedFd>> {
        let upper = self.has_upper && layer == 0;
        let key = if upper {
            self.upper_stino(st.st_ino)
        } else {
            self.encode(layer, st.st_ino)
        };
        let node = self.table.get(key)?;
        if node.is_dir {
            return None;
        }
        let fd = {
            let s = node.state.try_read()?;
            if s.metacopy || s.redirect.is_some() || s.index.is_some() {
                return None;
            }
            if upper {
                if !s.lowers.is_empty() {
                    return None;
                }
                s.upper.clone()?
            } else {
                let l = match (&s.upper, s.lowers.as_slice()) {
                    (None, [l]) if l.layer == layer && !l.metacopy => l,
                    _ => return None,
                };
                l.fd.clone()
            }
        };
        let held = sys::fstat(fd.as_fd()).ok()?;
        (held.st_ino == st.st_ino && held.st_dev == st.st_dev).then_some(fd)
    }

    /// openat that, when the daemon is out of fds (EMFILE), takes one of the reaper's spare
    /// fds, or once those are spent has the reaper free some and tries again for up to five
    /// seconds, instead of failing the lookup.
    fn openat_retry(&self, dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<OwnedFd> {
        let mut tries = 0;
        loop {
            match sys::openat(dir, name, flags, 0) {
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) && tries < 500 => {
                    if !self.reaper.give_up_spare() {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                r => return r,
            }
        }
    }

    /// Merged lookup of `name` in a directory: walks the layers top-down, honouring whiteouts
    /// and opaque directories. `Ok(None)` when the name does not exist in the merged view.
    fn resolve(&self, parent: &NodeState, name: &OsStr) -> io::Result<Option<Found>> {
        self.resolve_in(
            parent.upper.as_ref(),
            parent.xwhiteouts,
            &parent.lowers,
            name,
        )
    }

    /// Does a lower layer of this directory show `name` (so removing it from the upper layer
    /// needs a whiteout, and a directory put there must be opaque)?
    fn lower_has(&self, parent: &NodeState, name: &OsStr) -> io::Result<bool> {
        if parent.lowers.is_empty() {
            return Ok(false);
        }
        Ok(self
            .resolve_in(None, false, &parent.lowers, name)?
            .is_some())
    }

    fn resolve_in(
        &self,
        upper: Option<&Arc<OwnedFd>>,
        upper_xwh: bool,
        lowers: &[LowerObj],
        name: &OsStr,
    ) -> io::Result<Option<Found>> {
        if name.len() > 255 {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if layer::is_marker_name(name) {
            return Ok(None);
        }
        let mut found = Found {
            seen_gen: self.copy_gen.load(Ordering::SeqCst),
            ..Found::default()
        };
        // Where to look in the layers below: this name in the parent's layer dirs, until a
        // redirect says otherwise.
        let mut target = Target::Name(name.to_os_string());
        if let Some(up) = upper {
            // With no layer below, a whiteout would hide nothing: a missing name is missing,
            // and no `.wh.NAME` probe (a dcache miss in the upper dir, `git add` makes one per
            // object it looks for) is needed to say so.
            let wh = if lowers.is_empty() {
                Wh::NothingBelow
            } else {
                Wh::Ask
            };
            match self.probe(up.as_fd(), name, upper_xwh, Some(0), wh)? {
                Probe::Whiteout => return Ok(None),
                Probe::Missing => {}
                Probe::Plain(fd, st) => {
                    found.upper = Some((fd, st));
                    return Ok(Some(found));
                }
                Probe::Found(fd, st) => {
                    let dir = is_dir(&st);
                    let marks = layer::marks(fd.as_fd(), dir)?;
                    found.origin = marks.origin;
                    found.upper = Some((Arc::new(fd), st));
                    if !dir {
                        if !(marks.metacopy && st.st_mode & libc::S_IFMT == libc::S_IFREG) {
                            return Ok(Some(found));
                        }
                        // Metadata only: the data is the same name (or the redirect) below.
                        found.metacopy = true;
                    } else {
                        found.opaque = marks.opaque;
                        found.xwhiteouts = marks.xwhiteouts;
                        found.impure = marks.impure;
                        if marks.opaque {
                            return Ok(Some(found));
                        }
                    }
                    if let Some(r) = marks.redirect {
                        target = Target::parse(&r)?;
                        found.redirect = Some(r);
                    }
                }
            }
        }
        let first_lower = usize::from(self.has_upper);
        let last = self.layers.len().saturating_sub(1);
        for li in first_lower..self.layers.len() {
            let (dir, leaf, xwh, wh): (Arc<OwnedFd>, OsString, bool, Option<&WhNames>) =
                match &target {
                    Target::Name(n) => match lowers.iter().find(|l| l.layer == li) {
                        Some(l) => (l.fd.clone(), n.clone(), l.xwhiteouts, Some(&l.wh_names)),
                        None => continue,
                    },
                    Target::Path(parents, leaf) => match self.walk_layer(li, parents)? {
                        Walk::Dir(fd) => (Arc::new(fd), leaf.clone(), false, None),
                        Walk::Missing => continue,
                        Walk::Stop => break,
                    },
                };
            let wh = wh.map_or(Wh::Ask, Wh::Listed);
            match self.probe(dir.as_fd(), &leaf, xwh, Some(li), wh)? {
                Probe::Whiteout => break,
                Probe::Missing => continue,
                Probe::Plain(fd, st) => {
                    // As a plain file found below in the arm after this one.
                    let need_data =
                        found.metacopy || found.lowers.last().is_some_and(|(l, _)| l.metacopy);
                    let first = found.upper.is_none() && found.lowers.is_empty();
                    if first || need_data {
                        found.lowers.push((
                            LowerObj {
                                layer: li,
                                fd,
                                xwhiteouts: false,
                                metacopy: false,
                                wh_names: WhNames::default(),
                            },
                            st,
                        ));
                    }
                    break;
                }
                Probe::Found(fd, st) => {
                    // A metacopy file above (upper or lower) still needs its data from here.
                    let need_data =
                        found.metacopy || found.lowers.last().is_some_and(|(l, _)| l.metacopy);
                    let first = found.upper.is_none() && found.lowers.is_empty();
                    if need_data && is_dir(&st) {
                        break; // no data below a metacopy file: reads fail with EIO
                    }
                    if !is_dir(&st) {
                        if !(first || need_data) {
                            break; // a non-directory below a directory hides nothing
                        }
                        // A metacopy file in a lower layer (an upper that became a lower)
                        // has its data further down, like one in the upper layer.
                        let marks = if li < last && st.st_mode & libc::S_IFMT == libc::S_IFREG {
                            layer::lower_file_marks(dir.as_fd(), &leaf, fd.as_fd())?
                        } else {
                            layer::Marks::default()
                        };
                        found.lowers.push((
                            LowerObj {
                                layer: li,
                                fd: Arc::new(fd),
                                xwhiteouts: false,
                                metacopy: marks.metacopy,
                                wh_names: WhNames::default(),
                            },
                            st,
                        ));
                        if !marks.metacopy {
                            break;
                        }
                        if let Some(r) = marks.redirect {
                            target = Target::parse(&r)?;
                        }
                        continue;
                    }
                    // Markers in the bottom layer hide nothing: skip reading them.
                    let marks = if li < last {
                        layer::marks(fd.as_fd(), true)?
                    } else {
                        layer::Marks::default()
                    };
                    found.lowers.push((
                        LowerObj {
                            layer: li,
                            fd: Arc::new(fd),
                            xwhiteouts: marks.xwhiteouts,
                            metacopy: false,
                            wh_names: WhNames::default(),
                        },
                        st,
                    ));
                    if marks.opaque {
                        break;
                    }
                    if let Some(r) = marks.redirect {
                        // Redirects work in lower layers too: they steer the layers below.
                        target = Target::parse(&r)?;
                    }
                }
            }
        }
        if found.upper.is_none() && found.lowers.is_empty() {
            return Ok(None);
        }
        if found.upper.is_none()
            && let Some((l, st)) = found.lowers.first()
            && !is_dir(st)
            && st.st_nlink > 1
        {
            let key = self.encode(l.layer, st.st_ino);
            found.index = self.index_lookup(key)?;
        }
        Ok(Some(found))
    }

    /// The index entry of a copied-up hard-linked inode, by its st_ino.
    fn index_lookup(&self, key: u64) -> io::Result<Option<(Arc<OwnedFd>, sys::Stat)>> {
        let Some(index) = &self.index else {
            return Ok(None);
        };
        match sys::openat(
            index.as_fd(),
            &index_name(key),
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        ) {
            Ok(fd) => {
                let st = sys::fstat(fd.as_fd())?;
                Ok(Some((Arc::new(fd), st)))
            }
            Err(e) if is_enoent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Walks the directories `parents` from the root of layer `li`, one component at a time,
    /// never following a symlink.
    fn walk_layer(&self, li: usize, parents: &[OsString]) -> io::Result<Walk> {
        let mut cur = sys::openat(
            self.layers[li].root.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        for comp in parents {
            match self.probe(cur.as_fd(), comp, false, None, Wh::Ask)? {
                Probe::Missing => return Ok(Walk::Missing),
                Probe::Whiteout => return Ok(Walk::Stop),
                Probe::Found(fd, st) if is_dir(&st) => cur = fd,
                Probe::Found(..) | Probe::Plain(..) => return Ok(Walk::Stop),
            }
        }
        Ok(Walk::Dir(cur))
    }

    /// Turns a lookup result into a node (existing or new) and counts one kernel lookup.
    fn intern(&self, parent: &Arc<Node>, name: &OsStr, found: Found) -> (Arc<Node>, sys::Stat) {
        let st_ino = self.stino_of(&found);
        let mut st = *found.top_stat();
        let dir = is_dir(&st);
        let seen_gen = found.seen_gen;
        let below_only = found.upper.is_none() && found.index.is_none();
        let Found {
            upper,
            lowers,
            opaque,
            xwhiteouts,
            redirect,
            impure,
            metacopy,
            index,
            ..
        } = found;
        let index_fd = index.map(|(fd, _)| fd);
        let upper_fd = upper.map(|(fd, _)| fd);
        let lower_objs: Vec<LowerObj> = lowers.into_iter().map(|(l, _)| l).collect();
        let make = || NodeState {
            parent: Some(parent.clone()),
            name: name.to_os_string(),
            upper: upper_fd.clone(),
            lowers: lower_objs.clone(),
            opaque,
            xwhiteouts,
            redirect: redirect.clone(),
            impure,
            metacopy,
            index: index_fd.clone(),
            unlinked: false,
            aliases: Vec::new(),
        };
        let (node, existed) = self.table.lookup_or_insert(st_ino, dir, make);
        if existed {
            let mut s = node.state.write();
            s.note_name(parent, name);
            merge_above(&mut s, upper_fd, index_fd, opaque, xwhiteouts);
            drop(s);
            return (node, st);
        }
        self.reaper.kick();
        if below_only && self.copy_gen.load(Ordering::SeqCst) != seen_gen {
            // A copy-up ran while this name was looked up, and the kernel had forgotten the
            // node meanwhile (so it was made afresh from what was found): the name, or another
            // name of its hard link, may now be above. Copy-ups of this node from now on see
            // the node in the table; look once more for what came before.
            let again = self.resolve(&parent.state.read(), name).ok().flatten();
            if let Some(f) = again
                && self.stino_of(&f) == st_ino
                && is_dir(f.top_stat()) == dir
            {
                st = *f.top_stat();
                let mut s = node.state.write();
                let had_upper = s.upper.is_some();
                merge_above(
                    &mut s,
                    f.upper.map(|(fd, _)| fd),
                    f.index.map(|(fd, _)| fd),
                    f.opaque,
                    f.xwhiteouts,
                );
                if !had_upper && s.upper.is_some() {
                    s.metacopy = f.metacopy;
                    s.impure = f.impure;
                    s.redirect = f.redirect;
                }
                drop(s);
            }
        }
        (node, st)
    }

    /// The attributes the mount reports for `node`, whose topmost object has stat `st`.
    fn attr(&self, node: &Node, st: &sys::Stat) -> FileAttr {
        let state = node.state.read();
        let mut nlink = st.st_nlink as u32;
        if node.is_dir && state.layer_count() > 1 {
            // Like the kernel: counting subdirectories across layers is not worth it, and
            // nlink=1 tells find(1) and friends not to rely on it.
            nlink = 1;
        } else if state.unlinked && state.upper.is_none() && state.index.is_none() {
            nlink = 0;
        } else if !node.is_dir
            && (st.st_nlink > 1 || state.index.is_some())
            && !(state.index.is_none()
                && state.upper.is_some()
                && self.made_in_upper(node.st_ino, st))
            && let Some(n) = state
                .upper
                .as_ref()
                .or(state.index.as_ref())
                .and_then(|fd| self.index_nlink(fd.as_fd()))
        {
            // An indexed hard link: the names the merged view shows, kept on the inode.
            nlink = n;
        }
        let top = state.top().cloned();
        drop(state);
        let mut attr = stat_to_attr(node.st_ino, st, nlink);
        if !self.own.is_plain() {
            (attr.uid, attr.gid) = self.own.show(st.st_uid, st.st_gid);
            if let (Some(xp), Some(fd)) = (self.own.xattr_perms, top)
                && let Ok(Some(v)) = if node.is_dir {
                    sys::get_xattr(fd.as_fd(), xp.xattr())
                } else {
                    sys::get_xattr_path(fd.as_fd(), xp.xattr())
                }
                && let Some(o) = idmap::Override::parse(&v)
            {
                attr.uid = o.uid;
                attr.gid = o.gid;
                attr.perm = o.mode as u16;
            }
        }
        attr
    }

    /// fstat of the topmost object of a node.
    fn stat_node(&self, node: &Node) -> io::Result<sys::Stat> {
        let fd = node
            .state
            .read()
            .top()
            .cloned()
            .ok_or_else(|| errno(libc::ESTALE))?;
        sys::fstat(fd.as_fd())
    }

    pub fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> io::Result<(FileAttr, u64)> {
        let parent = if name == "." || name == ".." {
            // Asked by the kernel to reconnect file handles (name_to_handle_at / NFS export),
            // also for files, and for objects it has forgotten.
            self.reconnect(parent.0, 0)?
        } else {
            self.node(parent)?
        };
        if name == "." || name == ".." {
            let target = if name == "." {
                parent.clone()
            } else {
                if !parent.is_dir {
                    return Err(errno(libc::ENOTDIR));
                }
                let up = parent.state.read().parent.clone();
                up.unwrap_or_else(|| parent.clone())
            };
            let node = self.table.reference(&target);
            let st = self.stat_node(&node)?;
            return Ok((self.attr(&node, &st), node.st_ino));
        }
        if !parent.is_dir {
            return Err(errno(libc::ENOTDIR));
        }
        let found = {
            let state = parent.state.read();
            self.resolve(&state, name)?
        };
        let found = found.ok_or_else(|| errno(libc::ENOENT))?;
        let (node, st) = self.intern(&parent, name, found);
        Ok((self.attr(&node, &st), node.st_ino))
    }

    /// The node `st_ino`, found again by the name it was last seen under if the kernel has
    /// forgotten it (a file handle outlives the kernel's inode). Counts no kernel lookup.
    /// ESTALE when that name now holds another object or nothing.
    fn reconnect(&self, st_ino: u64, depth: usize) -> io::Result<Arc<Node>> {
        if let Some(n) = self.table.get(st_ino) {
            return Ok(n);
        }
        let stale = || errno(libc::ESTALE);
        if depth > 4096 {
            return Err(stale());
        }
        let (pino, name) = self.table.past_name(st_ino).ok_or_else(stale)?;
        let parent = self.reconnect(pino, depth + 1)?;
        let found = {
            let state = parent.state.read();
            self.resolve(&state, &name).map_err(|_| stale())?
        };
        let found = found.ok_or_else(stale)?;
        if self.stino_of(&found) != st_ino {
            return Err(stale());
        }
        // `intern` counts a lookup the kernel did not make: undo it. The node stays alive
        // through the Arc (and a child's parent link), and the caller references it.
        let (node, _) = self.intern(&parent, &name, found);
        self.table.forget(node.st_ino, 1);
        Ok(node)
    }

    pub fn do_forget(&self, ino: INodeNo, n: u64) {
        self.table.forget(ino.0, n);
    }

    pub fn do_getattr(&self, ino: INodeNo, fh: Option<u64>) -> io::Result<FileAttr> {
        let node = self.node(ino)?;
        // An open made below the upper file answers for the node as it is now, not for the
        // object it was opened on.
        if let Some(h) = fh.and_then(|fh| self.handles.get(&fh).map(|h| h.clone()))
            && let ops::Handle::File(f) = &*h
            && f.follow.is_none()
        {
            let st = sys::fstat(f.fd.as_fd())?;
            return Ok(self.attr(&node, &st));
        }
        let st = self.stat_node(&node)?;
        Ok(self.attr(&node, &st))
    }

    /// A READDIRPLUS reply of directory `dir` went out with `bare` entries without attributes
    /// and `full` non-directories with them.
    fn rdplus_sent(&self, dir: INodeNo, bare: u64, full: u64) {
        if bare > 0
            && let Some(d) = self.table.get(dir.0)
        {
            d.listed_bare.store(true, Ordering::Relaxed);
        }
        self.rdplus.sent(bare, full);
    }

    /// The kernel looked up a name of `parent` and found `attr`: if the name may have been
    /// listed bare, the listing's caller wanted attributes after all.
    fn rdplus_looked_up(&self, parent: INodeNo, attr: &FileAttr) {
        if attr.kind != FileType::Directory
            && self.rdplus.learning()
            && let Some(p) = self.table.get(parent.0)
            && p.listed_bare.load(Ordering::Relaxed)
        {
            self.rdplus.hit();
        }
    }

    /// Did FUSE_INIT offer FUSE over io_uring? (Then `uring::start` may serve requests.)
    pub fn uring_offered(&self) -> bool {
        self.uring.load(Ordering::Relaxed)
    }

    /// From now on the io_uring transport serves the requests (`uring::start` succeeded), and
    /// fuser's threads space their reads of what still comes over /dev/fuse by `forget_pause`.
    pub fn set_rings_running(&self, forget_pause: Duration) {
        let us = u64::try_from(forget_pause.as_micros()).unwrap_or(u64::MAX);
        self.forget_pause_us.store(us, Ordering::Relaxed);
        self.rings.store(true, Ordering::SeqCst);
    }

    /// The spacing of fuser's reads of /dev/fuse: zero unless the rings run.
    pub fn forget_pause(&self) -> Duration {
        Duration::from_micros(self.forget_pause_us.load(Ordering::Relaxed))
    }

    /// Does the io_uring transport serve the requests? Then what still reaches fuser's
    /// /dev/fuse threads was queued before the rings were ready, and an open among it must
    /// not pass through: its backing id would be fuser's, which the rings cannot send, so a
    /// later open of the same inode over the ring could neither share it nor do without it.
    pub fn rings_running(&self) -> bool {
        self.rings.load(Ordering::SeqCst)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The timeout of an entry a lookup hands the kernel. Past the fd budget a non-directory's
    /// is zero: the kernel then drops the entry (and FORGETs its inode, closing the node's fd)
    /// as soon as the last user lets go of it, without waiting for the reaper, whose
    /// invalidations need the directory's lock a walk in that directory keeps taking.
    /// Directories keep theirs: a zero timeout would make every path walk through them look
    /// them up again, and they are few.
    pub fn entry_ttl(&self, attr: &FileAttr) -> Duration {
        if attr.kind != FileType::Directory && self.reaper.over_high() {
            Duration::ZERO
        } else {
            self.ttl
        }
    }
}

impl OverlayFs {
    /// Counts a copy-up (or a new index entry), after it is on disk.
    fn copied_up(&self) {
        self.copy_gen.fetch_add(1, Ordering::SeqCst);
    }
}

/// Takes the upper object (or the indexed inode of a hard link) a later lookup found for a
/// node that was known only below.
fn merge_above(
    s: &mut NodeState,
    upper: Option<Arc<OwnedFd>>,
    index: Option<Arc<OwnedFd>>,
    opaque: bool,
    xwhiteouts: bool,
) {
    if s.upper.is_none() && upper.is_some() {
        s.upper = upper;
        s.opaque = opaque;
        s.xwhiteouts = xwhiteouts;
    }
    if s.upper.is_none() && s.index.is_none() && index.is_some() {
        s.index = index;
    }
}

/// The index entry name of an inode.
fn index_name(key: u64) -> OsString {
    OsString::from(format!("{key:016x}"))
}

/// Like the kernel's xino: on one filesystem the real inode number; across filesystems the
/// filesystem's index in the top bits.
/// Number 1 is the mount's root; a real inode 1 inside a layer (tmpfs numbers from 1) moves to
/// the top of the range.
fn encode_ino(single_dev: bool, fsid: u64, ino: u64) -> u64 {
    let v = if single_dev {
        ino
    } else {
        (fsid << 56) | (ino & ((1u64 << 56) - 1))
    };
    if v == inode::ROOT_ID { u64::MAX - 1 } else { v }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::new(0, nsec as u32)
    }
}

fn stat_to_attr(ino: u64, st: &sys::Stat, nlink: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Opens `<workdir>/work`, creating it, and empties it: whatever is there is the leftover of an
/// interrupted copy-up or delete and was never visible in the merged view. Also opens (creating
/// it) `<workdir>/stratafs-index`, the hard-link index, which persists.
fn prepare_work(workdir: &std::path::Path) -> io::Result<(OwnedFd, OwnedFd)> {
    let c = sys::cstr(workdir.as_os_str())?;
    let wd = sys::open(&c, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let sub = |name: &str| -> io::Result<OwnedFd> {
        match sys::mkdirat(wd.as_fd(), OsStr::new(name), 0o700) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        sys::openat(
            wd.as_fd(),
            OsStr::new(name),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
    };
    let work = sub("work")?;
    dir::remove_contents(work.as_fd())?;
    let index = sub("stratafs-index")?;
    Ok((work, index))
}
