//! Snapshot driver with containerd's semantics, and its gRPC proxy server.
//!
//! Vocabulary (containerd's `core/snapshots/snapshotter.go`):
//! - a snapshot has a *kind*: `Active` (writable, made by [`Snapshotter::prepare`]), `View`
//!   (read-only, made by [`Snapshotter::view`]) or `Committed` (immutable, made by
//!   [`Snapshotter::commit`] from an active one, usable as a parent);
//! - active snapshots and views are named by a *key*, committed ones by a *name*; keys and names
//!   share one namespace, and every snapshot lives in a containerd namespace (`ns`) of its own;
//! - the parent chain of a snapshot is made of committed snapshots only.
//!
//! Layout: `<root>/metadata.db` (redb, the source of truth) and `<root>/snapshots/<id>/{fs,work}`.
//! A snapshot's directory is built under a temporary name (`new-*`) for an id reserved (and
//! committed) beforehand, renamed to that id, and only then does its record commit; removal
//! deletes the record first and the directory after. So a crash at any point leaves no record
//! without its complete directory, only directories no record owns.
//! [`Snapshotter::cleanup`] collects directories no record points at. Paths never come from
//! user-supplied keys.
//!
//! Architecture invariant: nothing here imports FUSE types; the `fuse` backend hands out mounts
//! that the `stratafs` binary serves.

pub mod cli;
mod copy;
mod filter;
pub mod grpc;
mod metadata;
pub mod mount;
pub mod proto;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::RwLock;

use metadata::Store;

pub use filter::{Filter, FilterError};
/// The stored form of one snapshot and its codec (public for the fuzz target and tests).
pub use metadata::{Record, Stamp, decode as decode_record, encode as encode_record};

/// The longest a label's key and value may be together (containerd's `labels.Validate`).
pub const MAX_LABEL_SIZE: usize = 4096;

/// What a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The lowercase word containerd's filters and `ctr` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`Snapshotter::stat`] and [`Snapshotter::walk`] report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The committed parent, if any.
    pub parent: Option<String>,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// Disk space of the snapshot's own layer (not its parents).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Bytes allocated (`st_blocks * 512`, each inode counted once).
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// One mount to perform, as containerd's `containerd.types.Mount`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `bind`, `overlay` or `fuse3.stratafs`.
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// How the driver turns a chain of layers into a mounted tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Overlay mounts served by the `stratafs` FUSE daemon (type `fuse3.stratafs`).
    Fuse,
    /// Kernel overlayfs mounts (type `overlay`).
    Kernel,
    /// Every snapshot is a full copy of its parent (FICLONE where possible); `bind` mounts.
    Native,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Fuse => "fuse",
            Backend::Kernel => "kernel",
            Backend::Native => "native",
        }
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "fuse" => Ok(Backend::Fuse),
            "kernel" => Ok(Backend::Kernel),
            "native" => Ok(Backend::Native),
            _ => Err(Error::InvalidArgument(format!(
                "unknown backend '{s}' (fuse, kernel, native)"
            ))),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error classes, as containerd's `errdefs` (and the gRPC codes they map to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    /// Everything else (I/O, database): gRPC `Unknown`/`Internal`.
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("metadata database: {0}")]
    Database(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the snapshotter is closed")]
    Closed,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) | Error::Closed => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Database(_) | Error::Io { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(context: impl fmt::Display, source: io::Error) -> Self {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a path to an `io::Error`.
trait IoContext<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(format!("{what} {}", path.display()), e))
    }
}

/// How to build a [`Snapshotter`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `metadata.db` and `snapshots/`. Must be an absolute UTF-8 path without `,` or `:`
    /// (it ends up inside mount options).
    pub root: PathBuf,
    pub backend: Backend,
    /// The `stratafs` binary, for mounting `fuse3.stratafs` mounts ourselves ([`mount::mount_all`]).
    pub stratafs_bin: PathBuf,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>, backend: Backend) -> Self {
        Config {
            root: root.into(),
            backend,
            stratafs_bin: default_stratafs_bin(),
        }
    }
}

/// The running executable if it is `stratafs`, else `stratafs` from `PATH`.
pub fn default_stratafs_bin() -> PathBuf {
    match std::env::current_exe() {
        Ok(exe) if exe.file_name().is_some_and(|n| n == "stratafs") => exe,
        _ => PathBuf::from("stratafs"),
    }
}

/// The driver. All methods are blocking and may be called from many threads.
pub struct Snapshotter {
    config: Config,
    /// `<root>/snapshots`: one directory per snapshot id, plus `new-*` and `rm-*` scratch names.
    snapshots_dir: PathBuf,
    /// The metadata store; `None` once closed.
    store: RwLock<Option<Store>>,
    /// `<root>/lock`: shared while a `new-*` directory is being built, exclusive during
    /// [`Snapshotter::cleanup`], so a cleanup (from any process) never removes a directory that
    /// is about to be committed.
    lock_path: PathBuf,
    /// Makes scratch names unique within this process.
    scratch_seq: AtomicU64,
}

/// A scratch directory that is removed unless [`Scratch::keep`] is called.
struct Scratch {
    path: Option<PathBuf>,
}

impl Scratch {
    fn keep(mut self) -> PathBuf {
        self.path.take().expect("kept once")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// What [`Snapshotter::cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub removed: Vec<String>,
}

impl Snapshotter {
    /// Opens (creating if needed) the driver rooted at `config.root`.
    pub fn open(config: Config) -> Result<Self> {
        let root_str = config.root.to_str().ok_or_else(|| {
            Error::InvalidArgument(format!("root {} is not UTF-8", config.root.display()))
        })?;
        if !config.root.is_absolute() || root_str.contains([',', ':']) {
            return Err(Error::InvalidArgument(format!(
                "root {root_str} must be absolute and free of ',' and ':'"
            )));
        }
        let snapshots_dir = config.root.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots_dir)
            .ctx("create", &snapshots_dir)?;
        let store = Store::open(&config.root.join("metadata.db"))?;
        let lock_path = config.root.join("lock");
        Ok(Snapshotter {
            config,
            snapshots_dir,
            store: RwLock::new(Some(store)),
            lock_path,
            scratch_seq: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Closes the metadata database. Closing twice is fine; other calls then fail with
    /// [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        self.store.write().take();
        Ok(())
    }

    fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let guard = self.store.read();
        let store = guard.as_ref().ok_or(Error::Closed)?;
        f(store)
    }

    fn dir_of(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    fn lock_file(&self) -> Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .ctx("open", &self.lock_path)
    }

    /// Creates an active snapshot `key` over the committed `parent` (or none).
    pub fn prepare(
        &self,
        ns: &str,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(ns, Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view `key` of the committed `parent` (or of an empty tree).
    pub fn view(
        &self,
        ns: &str,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(ns, Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        ns: &str,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        check_key(key)?;
        validate_labels(&labels)?;
        let parent = parent.filter(|p| !p.is_empty());
        // Fail early (before building anything) on the usual errors; the write transaction
        // checks again.
        let parent_id = self.with_store(|s| s.check_create(ns, key, parent))?;

        // Held until the record has committed: a cleanup (exclusive) never sees the scratch
        // directory or the renamed one without its record.
        let lock = self.lock_file()?;
        lock.lock_shared().ctx("lock", &self.lock_path)?;
        // Crash safety (kill -9 anywhere): the id is reserved first and never reused; the tree
        // is built under `new-*` and renamed to the id; only then does the record commit. A
        // crash leaves `new-*` or an id no record owns (both collected by `cleanup`), never a
        // record without its directory nor a half-built directory under a recorded id.
        let id = self.with_store(|s| s.reserve_id())?;
        let scratch = self.build_dir(kind, parent_id)?;
        let now = SystemTime::now();
        let record = Record {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels,
            created: now.into(),
            updated: now.into(),
            usage: None,
        };
        let built = scratch.keep();
        let dir = self.dir_of(id);
        if let Err(e) = fs::rename(&built, &dir) {
            let _ = fs::remove_dir_all(&built);
            return Err(Error::io(
                format!("rename {} to {}", built.display(), dir.display()),
                e,
            ));
        }
        // Removed again if the record cannot be inserted (e.g. a concurrent create of `key`).
        let placed = Scratch {
            path: Some(dir.clone()),
        };
        self.with_store(|s| s.insert(ns, key, &record))?;
        placed.keep();
        drop(lock);
        self.mounts(ns, key)
    }

    /// Builds `new-*` with `fs` (0755) and, for layered backends, `work`.
    fn build_dir(&self, kind: Kind, parent_id: Option<u64>) -> Result<Scratch> {
        let seq = self.scratch_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .snapshots_dir
            .join(format!("new-{}-{seq}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .ctx("create", &path)?;
        let scratch = Scratch {
            path: Some(path.clone()),
        };
        let fs_dir = path.join("fs");
        match (self.config.backend, parent_id) {
            (Backend::Native, Some(pid)) => {
                copy::copy_tree(&self.dir_of(pid).join("fs"), &fs_dir)?;
            }
            _ => {
                fs::create_dir(&fs_dir).ctx("create", &fs_dir)?;
                fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755))
                    .ctx("chmod", &fs_dir)?;
            }
        }
        if self.config.backend != Backend::Native && kind == Kind::Active {
            let work = path.join("work");
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&work)
                .ctx("create", &work)?;
        }
        Ok(scratch)
    }

    /// The mounts that show snapshot `key` (active or view).
    pub fn mounts(&self, ns: &str, key: &str) -> Result<Vec<Mount>> {
        let (record, chain) = self.with_store(|s| s.chain(ns, key))?;
        if record.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed: only active snapshots and views can be mounted"
            )));
        }
        Ok(self.mounts_for(&record, &chain))
    }

    fn path_str(&self, id: u64, sub: &str) -> String {
        // The root is UTF-8 (checked at open) and ids are digits.
        self.dir_of(id).join(sub).to_string_lossy().into_owned()
    }

    fn mounts_for(&self, record: &Record, chain: &[u64]) -> Vec<Mount> {
        let bind = |id: u64, ro: bool| Mount {
            kind: "bind".into(),
            source: self.path_str(id, "fs"),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let ro = record.kind == Kind::View;
        let overlay_type = match self.config.backend {
            Backend::Native => return vec![bind(record.id, ro)],
            Backend::Kernel => "overlay",
            Backend::Fuse => "fuse3.stratafs",
        };
        if chain.is_empty() {
            return vec![bind(record.id, ro)];
        }
        let lowers: Vec<String> = chain.iter().map(|&id| self.path_str(id, "fs")).collect();
        let mut options = Vec::new();
        if ro {
            if lowers.len() == 1 {
                // Overlayfs wants two lower layers without an upper one; a read-only bind mount
                // of the single layer shows the same tree.
                return vec![bind(chain[0], true)];
            }
        } else {
            options.push(format!("workdir={}", self.path_str(record.id, "work")));
            options.push(format!("upperdir={}", self.path_str(record.id, "fs")));
        }
        options.push(format!("lowerdir={}", lowers.join(":")));
        if self.config.backend == Backend::Fuse && !ro {
            // The upper directory becomes a lower layer once committed, and is read by differs
            // and possibly kernel overlayfs: keep every copy-up a full one. (Metadata-only
            // copies in a lower layer are refused by the kernel without `metacopy=on`, and
            // stratafs itself reads zeros through them: see docs/snapshots.md.)
            options.push("metacopy=off".into());
        }
        vec![Mount {
            kind: overlay_type.into(),
            source: "overlay".into(),
            options,
        }]
    }

    /// Turns active `key` into committed `name` (the key disappears, the directory stays).
    pub fn commit(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        check_key(name)?;
        check_key(key)?;
        validate_labels(&labels)?;
        let record = self.with_store(|s| s.get(ns, key))?;
        if record.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is not active (it is {})",
                record.kind
            )));
        }
        let usage = disk_usage(&self.dir_of(record.id).join("fs"))?;
        self.with_store(|s| s.commit(ns, name, key, record.id, usage, labels))
    }

    /// Removes `key`; refused while committed children exist.
    pub fn remove(&self, ns: &str, key: &str) -> Result<()> {
        check_key(key)?;
        let id = self.with_store(|s| s.remove(ns, key))?;
        let dir = self.dir_of(id);
        let seq = self.scratch_seq.fetch_add(1, Ordering::Relaxed);
        let doomed = self
            .snapshots_dir
            .join(format!("rm-{}-{seq}", std::process::id()));
        // Rename first so that a half-deleted tree is never found under a live id. A failure
        // here leaves an orphan for `cleanup`; the snapshot itself is gone either way.
        match fs::rename(&dir, &doomed) {
            Ok(()) => {
                let _ = fs::remove_dir_all(&doomed);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => {
                let _ = fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }

    pub fn stat(&self, ns: &str, key: &str) -> Result<Info> {
        check_key(key)?;
        self.with_store(|s| s.get(ns, key)).map(|r| r.info(key))
    }

    /// Changes labels. `fieldpaths` empty: replace all labels; `labels`: the same;
    /// `labels.KEY`: set (or drop when absent/empty in `info`) that one label. Any other path
    /// is `InvalidArgument`.
    pub fn update(&self, ns: &str, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        check_key(&info.name)?;
        for path in fieldpaths {
            if path != "labels" && !path.starts_with("labels.") {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {path:?} field on snapshot {:?}",
                    info.name
                )));
            }
        }
        validate_labels(&info.labels)?;
        let updated = self.with_store(|s| {
            s.update(ns, &info.name, |labels| {
                if fieldpaths.is_empty() {
                    *labels = info.labels.clone();
                }
                for path in fieldpaths {
                    if path == "labels" {
                        *labels = info.labels.clone();
                    } else if let Some(k) = path.strip_prefix("labels.") {
                        match info.labels.get(k).filter(|v| !v.is_empty()) {
                            Some(v) => {
                                labels.insert(k.to_owned(), v.clone());
                            }
                            None => {
                                labels.remove(k);
                            }
                        }
                    }
                }
            })
        })?;
        Ok(updated.info(&info.name))
    }

    /// Every snapshot of `ns` matching any of `filters` (all when none).
    pub fn walk(&self, ns: &str, filters: &[String]) -> Result<Vec<Info>> {
        let filters = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let all = self.with_store(|s| s.list(ns))?;
        Ok(all
            .into_iter()
            .map(|(k, r)| r.info(&k))
            .filter(|info| filters.is_empty() || filters.iter().any(|f| f.matches(info)))
            .collect())
    }

    /// Space used by the snapshot's own layer: measured now for an active snapshot, recorded
    /// at commit time for a committed one.
    pub fn usage(&self, ns: &str, key: &str) -> Result<Usage> {
        check_key(key)?;
        let record = self.with_store(|s| s.get(ns, key))?;
        match (record.kind, record.usage) {
            (Kind::Committed, Some(u)) => Ok(u),
            _ => disk_usage(&self.dir_of(record.id).join("fs")),
        }
    }

    /// Removes the directories under `<root>/snapshots` that no snapshot (of any namespace)
    /// owns: leftovers of crashes and failed removals.
    pub fn cleanup(&self) -> Result<CleanupReport> {
        let lock = self.lock_file()?;
        lock.lock().ctx("lock", &self.lock_path)?;
        let live = self.with_store(|s| s.all_ids())?;
        let mut report = CleanupReport::default();
        for entry in fs::read_dir(&self.snapshots_dir).ctx("read", &self.snapshots_dir)? {
            let entry = entry.ctx("read", &self.snapshots_dir)?;
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| live.contains(&id));
            if keep {
                continue;
            }
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
            if meta.is_dir() {
                fs::remove_dir_all(&path).ctx("remove", &path)?;
            } else {
                fs::remove_file(&path).ctx("remove", &path)?;
            }
            report.removed.push(name.to_string_lossy().into_owned());
        }
        report.removed.sort();
        Ok(report)
    }

    /// The directory holding snapshot `key`'s layer (`.../fs`), for tools and tests.
    pub fn layer_dir(&self, ns: &str, key: &str) -> Result<PathBuf> {
        let record = self.with_store(|s| s.get(ns, key))?;
        Ok(self.dir_of(record.id).join("fs"))
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("empty key or name".into()));
    }
    Ok(())
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument("empty label key".into()));
        }
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label key and value longer than {MAX_LABEL_SIZE} bytes: {:.64}...",
                k
            )));
        }
    }
    Ok(())
}

/// Allocated bytes and distinct inodes under `root` (included), not crossing mounts.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let root_meta = fs::symlink_metadata(root).ctx("stat", root)?;
    let root_dev = root_meta.dev();
    let mut stack = vec![(root.to_path_buf(), root_meta)];
    while let Some((path, meta)) = stack.pop() {
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += (meta.blocks() * 512) as i64;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).ctx("read", &path)? {
                let entry = entry.ctx("read", &path)?;
                let child = entry.path();
                let m = fs::symlink_metadata(&child).ctx("stat", &child)?;
                if m.dev() == root_dev {
                    stack.push((child, m));
                }
            }
        }
    }
    Ok(usage)
}
