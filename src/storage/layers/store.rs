//! The overlay2 layer store: Docker's on-disk layout under one root directory.
//!
//! ```text
//! <root>/l/<LID> -> ../<id>/diff     26-char base32 short names, so long chains fit a page
//! <root>/<id>/diff/                  the layer's content (an overlay upper dir)
//! <root>/<id>/link                   its LID
//! <root>/<id>/lower                  l/<LID>:l/<LID>... of its parents, topmost first
//! <root>/<id>/work/                  overlay workdir (layers with a parent)
//! <root>/<id>/merged/                mount point while mounted
//! <root>/<id>/committed              written into a parent when a child is made
//! <root>/<id>/stratafs.json          ours: parent, read-write or not, mount count
//! <root>/.tmp/                       layers being built or removed (collected by cleanup)
//! <root>/.lock                       flock held by every change
//! ```
//!
//! Architecture Invariant: a layer directory only appears complete. It is built under `.tmp/`
//! (content applied there too) and renamed to `<id>` as the last step; removal renames it away
//! first. Metadata files are written to a temporary name and renamed.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::apply::{self, ApplyOptions, ApplyStats};
use super::error::{Error, IoContext, Result};
use super::export::{self, Change, ExportStats};
use crate::sys;

/// Default root, as Docker's `/var/lib/docker/overlay2`.
pub const DEFAULT_ROOT: &str = "/var/lib/stratafs/overlay2";
/// Default and largest chain depth.
pub const DEFAULT_MAX_DEPTH: usize = 128;
pub const MAX_MAX_DEPTH: usize = 500;
/// The longest option string kernel overlayfs can be given: mount(2) copies its data argument
/// in one (4 KiB) page, NUL included. With 29 bytes per `l/<LID>:` that is about 140 layers;
/// deeper chains mount with the stratafs backend only (its options travel in argv).
pub const KERNEL_MOUNT_DATA_MAX: usize = 4095;

/// Which filesystem mounts a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The `stratafs` FUSE daemon.
    Stratafs,
    /// Kernel overlayfs.
    Kernel,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backend> {
        match s {
            "stratafs" | "fuse" => Ok(Backend::Stratafs),
            "kernel" | "overlay" => Ok(Backend::Kernel),
            _ => Err(Error::Invalid(format!(
                "unknown backend {s:?} (stratafs or kernel)"
            ))),
        }
    }
}

/// Per-layer record (`stratafs.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerMeta {
    pub parent: Option<String>,
    /// A container layer (`create-rw`): mounted with its `diff` as the upper dir.
    pub rw: bool,
    /// Outstanding `get`s.
    pub mounts: u32,
    /// Who mounted `merged` (while `mounts > 0`).
    pub mounted_by: Option<Backend>,
    /// Where it is mounted when not at `merged` (image mounts).
    pub mountpoint: Option<PathBuf>,
    /// DiffID of the tar applied, when known.
    pub diff_id: Option<String>,
}

/// What `metadata` reports (Docker's `GetMetadata`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Metadata {
    pub upper_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_dir: Option<String>,
    pub work_dir: PathBuf,
    pub merged_dir: PathBuf,
}

/// What `cleanup` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub scratch: Vec<PathBuf>,
    pub dangling_links: Vec<PathBuf>,
    pub relinked: Vec<String>,
    pub stale_mounts: Vec<String>,
    /// Layers whose `apply-diff` had put the content in place when it was interrupted: their
    /// record (the DiffID) was completed from the pending one.
    pub completed: Vec<String>,
}

/// The store. Cheap to build; every call takes the store's lock for its duration.
#[derive(Clone, Debug)]
pub struct LayerStore {
    root: PathBuf,
    pub max_depth: usize,
    pub backend: Backend,
    /// The `stratafs` binary for FUSE mounts.
    pub stratafs_bin: PathBuf,
    pub apply: ApplyOptions,
}

/// `std::env::current_exe()` when that is `stratafs`, else `stratafs` from PATH.
pub fn default_stratafs_bin() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) if p.file_name() == Some(OsStr::new("stratafs")) => p,
        _ => PathBuf::from("stratafs"),
    }
}

/// `<id>/.diff-R`: the content an `apply-diff` builds; `<id>/.stratafs.json.pending-R`: the
/// record that goes with it.
const SCRATCH_DIFF: &str = ".diff-";
const PENDING_META: &str = ".stratafs.json.pending-";

/// Held while the store changes.
struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .ctx(|| format!("create {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .ctx(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .ctx(|| format!("mkdir {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", path.display()))
}

/// 26 characters of base32 from 16 random bytes (Docker's `generateID(idLength)`).
/// `N` random bytes from the kernel.
pub(super) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .ctx(|| "read /dev/urandom".into())?;
    Ok(b)
}

fn new_lid() -> Result<String> {
    let b = random_bytes::<16>()?;
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for x in b {
        acc = (acc << 8) | u32::from(x);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHA[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHA[((acc << (5 - bits)) & 31) as usize] as char);
    }
    Ok(out)
}

fn random_suffix() -> String {
    new_lid().unwrap_or_else(|_| std::process::id().to_string())
}

/// Layer ids are file names under the root: `[A-Za-z0-9_.-]{1,128}`, not starting with `.`,
/// and not `l`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id != "l"
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_owned()))
    }
}

/// Is something mounted at `path` (per /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|line| {
        line.split(|b| *b == b' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want)
    })
}

fn unescape_mountinfo(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::Mount(format!("run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Mount(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl LayerStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<LayerStore> {
        let root = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .ctx(|| "current dir".into())?
                .join(root)
        };
        if !root.exists() {
            fs::create_dir_all(&root).ctx(|| format!("create {}", root.display()))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o710))
                .ctx(|| format!("chmod {}", root.display()))?;
        }
        for (d, mode) in [("l", 0o700), (".tmp", 0o700)] {
            let p = root.join(d);
            if !p.exists() {
                mkdir(&p, mode)?;
            }
        }
        Ok(LayerStore {
            root,
            max_depth: DEFAULT_MAX_DEPTH,
            backend: Backend::Stratafs,
            stratafs_bin: default_stratafs_bin(),
            apply: ApplyOptions::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn set_max_depth(&mut self, depth: usize) -> Result<()> {
        if depth == 0 || depth > MAX_MAX_DEPTH {
            return Err(Error::Invalid(format!(
                "max depth must be 1..={MAX_MAX_DEPTH}"
            )));
        }
        self.max_depth = depth;
        Ok(())
    }

    fn lock(&self) -> Result<Lock> {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.root.join(".lock"))
            .ctx(|| "open store lock".into())?;
        f.lock().ctx(|| "lock store".into())?;
        Ok(Lock(f))
    }

    pub fn layer_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn read_meta(&self, id: &str) -> Result<LayerMeta> {
        validate_id(id)?;
        let p = self.layer_dir(id).join("stratafs.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Invalid(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.layer_dir(id).join("diff").is_dir() {
                    // A layer another tool made: no parent record beyond `lower`.
                    Ok(LayerMeta::default())
                } else {
                    Err(Error::NotFound(id.to_owned()))
                }
            }
            Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
        }
    }

    fn write_meta(&self, dir: &Path, meta: &LayerMeta) -> Result<()> {
        let json = serde_json::to_vec_pretty(meta).expect("layer metadata serializes");
        write_atomic(&dir.join("stratafs.json"), &json, 0o600)
    }

    /// Does the layer exist?
    pub fn exists(&self, id: &str) -> bool {
        validate_id(id).is_ok() && self.layer_dir(id).join("link").is_file()
    }

    fn read_small(&self, path: &Path) -> Result<String> {
        fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .ctx(|| format!("read {}", path.display()))
    }

    /// `lower` of a layer (empty when it has no parent).
    pub fn lower(&self, id: &str) -> Result<String> {
        let p = self.layer_dir(id).join("lower");
        if p.exists() {
            self.read_small(&p)
        } else {
            Ok(String::new())
        }
    }

    /// The diff directories of a layer's parents, topmost first.
    pub fn lower_dirs(&self, id: &str) -> Result<Vec<PathBuf>> {
        let lower = self.lower(id)?;
        lower
            .split(':')
            .filter(|s| !s.is_empty())
            .map(|s| {
                let p = self.root.join(s);
                fs::canonicalize(&p).ctx(|| format!("resolve {}", p.display()))
            })
            .collect::<Result<_>>()
    }

    /// Creates a read-only layer (`rw = false`) or a container layer on `parent`.
    pub fn create(&self, id: &str, parent: Option<&str>, rw: bool) -> Result<()> {
        self.create_with(id, parent, rw, None).map(drop)
    }

    /// Creates a layer whose content is the layer tar `input`, atomically: on any error
    /// nothing is left behind.
    /// With `expect_diff_id`, a tar whose DiffID differs is refused (and nothing is kept).
    pub fn create_from_tar(
        &self,
        id: &str,
        parent: Option<&str>,
        input: impl Read,
        expect_diff_id: Option<&str>,
    ) -> Result<ApplyStats> {
        self.create_with(id, parent, false, Some((Box::new(input), expect_diff_id)))
            .map(|s| s.expect("applied"))
    }

    fn create_with(
        &self,
        id: &str,
        parent: Option<&str>,
        rw: bool,
        input: Option<(Box<dyn Read + '_>, Option<&str>)>,
    ) -> Result<Option<ApplyStats>> {
        validate_id(id)?;
        let _lock = self.lock()?;
        if self.layer_dir(id).exists() {
            return Err(Error::Exists(id.to_owned()));
        }
        let lower = match parent {
            None => None,
            Some(p) => {
                validate_id(p)?;
                if !self.exists(p) {
                    return Err(Error::NotFound(p.to_owned()));
                }
                let plink = self.read_small(&self.layer_dir(p).join("link"))?;
                let plower = self.lower(p)?;
                let depth = plower.split(':').filter(|s| !s.is_empty()).count() + 2;
                if depth > self.max_depth {
                    return Err(Error::TooDeep {
                        depth,
                        max: self.max_depth,
                    });
                }
                Some(if plower.is_empty() {
                    format!("l/{plink}")
                } else {
                    format!("l/{plink}:{plower}")
                })
            }
        };
        let lid = new_lid()?;
        if self.backend == Backend::Kernel {
            // Refused now rather than at the first mount: every way this layer could be
            // mounted must fit the kernel's one page of options.
            let lower = lower.as_deref().unwrap_or("");
            self.check_kernel_options(id, &self.overlay_options(id, &lid, lower, rw, false).0)?;
            if rw {
                self.check_kernel_options(id, &self.overlay_options(id, &lid, lower, rw, true).0)?;
            }
        }
        let tmp = self
            .root
            .join(".tmp")
            .join(format!("new-{id}-{}", random_suffix()));
        let built = (|| -> Result<Option<ApplyStats>> {
            mkdir(&tmp, 0o710)?;
            mkdir(&tmp.join("diff"), 0o755)?;
            write_atomic(&tmp.join("link"), lid.as_bytes(), 0o644)?;
            if let Some(lower) = &lower {
                write_atomic(&tmp.join("lower"), lower.as_bytes(), 0o644)?;
                mkdir(&tmp.join("work"), 0o700)?;
            }
            let stats = match input {
                Some((r, expect)) => {
                    let stats = apply::apply_layer(&tmp.join("diff"), r, &self.apply)?;
                    if let Some(want) = expect
                        && want != stats.diff_id
                    {
                        return Err(Error::Digest {
                            what: format!("DiffID of layer {id}"),
                            expected: want.to_owned(),
                            actual: stats.diff_id,
                        });
                    }
                    Some(stats)
                }
                None => None,
            };
            let meta = LayerMeta {
                parent: parent.map(str::to_owned),
                rw,
                diff_id: stats.as_ref().map(|s| s.diff_id.clone()),
                ..Default::default()
            };
            self.write_meta(&tmp, &meta)?;
            if let Some(p) = parent {
                write_atomic(&self.layer_dir(p).join("committed"), b"", 0o600)?;
            }
            // The short link first (dangling for a moment; cleanup removes it if we die),
            // then the layer appears, complete, in one rename.
            let link = self.root.join("l").join(&lid);
            std::os::unix::fs::symlink(format!("../{id}/diff"), &link)
                .ctx(|| format!("symlink {}", link.display()))?;
            let rootfd = self.root_fd()?;
            if let Err(e) = sys::renameat2(
                rootfd.as_fd(),
                tmp.strip_prefix(&self.root)
                    .expect("under root")
                    .as_os_str(),
                rootfd.as_fd(),
                OsStr::new(id),
                sys::RENAME_NOREPLACE,
            ) {
                let _ = fs::remove_file(&link);
                return Err(Error::io(format!("rename layer {id} into place"), e));
            }
            Ok(stats)
        })();
        if built.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        built
    }

    fn root_fd(&self) -> Result<std::os::fd::OwnedFd> {
        sys::open(
            &sys::cstr(self.root.as_os_str()).ctx(|| "root path".into())?,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .ctx(|| format!("open {}", self.root.display()))
    }

    /// Applies a layer tar (plain, gzip or zstd) to an empty layer, atomically. Returns the
    /// bytes of file data applied.
    pub fn apply_diff(&self, id: &str, input: impl Read) -> Result<ApplyStats> {
        validate_id(id)?;
        let _lock = self.lock()?;
        let mut meta = self.read_meta(id)?;
        if meta.mounts > 0 {
            return Err(Error::InUse {
                id: id.into(),
                why: "mounted".into(),
            });
        }
        let dir = self.layer_dir(id);
        let diff = dir.join("diff");
        if fs::read_dir(&diff)
            .ctx(|| format!("read {}", diff.display()))?
            .next()
            .is_some()
        {
            return Err(Error::NotEmpty(id.into()));
        }
        // Built in `.diff-R`; the record with the DiffID is written first as
        // `.stratafs.json.pending-R`, then the content appears in one rename and the record
        // follows. A crash between the two renames is completed by `cleanup` (`.diff-R` gone:
        // the content is in place), any earlier one rolled back (both removed).
        let suffix = random_suffix();
        let tmp = dir.join(format!("{SCRATCH_DIFF}{suffix}"));
        let pending = dir.join(format!("{PENDING_META}{suffix}"));
        mkdir(&tmp, 0o755)?;
        let res = apply::apply_layer(&tmp, input, &self.apply).and_then(|stats| {
            meta.diff_id = Some(stats.diff_id.clone());
            let json = serde_json::to_vec_pretty(&meta).expect("layer metadata serializes");
            write_atomic(&pending, &json, 0o600)?;
            fs::rename(&tmp, &diff).ctx(|| format!("rename onto {}", diff.display()))?;
            Ok(stats)
        });
        match res {
            Ok(stats) => {
                fs::rename(&pending, dir.join("stratafs.json"))
                    .ctx(|| format!("rename {} into place", pending.display()))?;
                Ok(stats)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                let _ = fs::remove_file(&pending);
                Err(e)
            }
        }
    }

    /// Ids of all layers.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).ctx(|| format!("read {}", self.root.display()))? {
            let e = e.ctx(|| "read root".into())?;
            if let Some(name) = e.file_name().to_str()
                && validate_id(name).is_ok()
                && self.exists(name)
            {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a layer that is neither mounted nor a parent.
    pub fn remove(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let _lock = self.lock()?;
        self.remove_locked(id)
    }

    fn remove_locked(&self, id: &str) -> Result<()> {
        let meta = self.read_meta(id)?;
        let dir = self.layer_dir(id);
        if meta.mounts > 0 || is_mountpoint(&dir.join("merged")) {
            return Err(Error::InUse {
                id: id.into(),
                why: "mounted".into(),
            });
        }
        for other in self.list()? {
            if other != id && self.read_meta(&other)?.parent.as_deref() == Some(id) {
                return Err(Error::InUse {
                    id: id.into(),
                    why: format!("parent of {other}"),
                });
            }
        }
        let lid = self.read_small(&dir.join("link")).unwrap_or_default();
        let gone = self
            .root
            .join(".tmp")
            .join(format!("rm-{id}-{}", random_suffix()));
        fs::rename(&dir, &gone).ctx(|| format!("move {} away", dir.display()))?;
        if !lid.is_empty() {
            let _ = fs::remove_file(self.root.join("l").join(&lid));
        }
        fs::remove_dir_all(&gone).ctx(|| format!("remove {}", gone.display()))
    }

    /// Docker's `GetMetadata`.
    pub fn metadata(&self, id: &str) -> Result<Metadata> {
        let _ = self.read_meta(id)?;
        let dir = self.layer_dir(id);
        let lowers = self.lower_dirs(id)?;
        Ok(Metadata {
            upper_dir: dir.join("diff"),
            lower_dir: (!lowers.is_empty()).then(|| {
                lowers
                    .iter()
                    .map(|p| fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            work_dir: dir.join("work"),
            merged_dir: dir.join("merged"),
        })
    }

    /// Mounts the layer (once; later calls count) and returns its root. A layer without a
    /// parent needs no mount: its `diff` is returned.
    pub fn get(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        let _lock = self.lock()?;
        let dir = self.layer_dir(id);
        let mut meta = self.read_meta(id)?;
        if self.lower(id)?.is_empty() {
            return Ok(dir.join("diff"));
        }
        let merged = dir.join("merged");
        if meta.mounts > 0 && is_mountpoint(&merged) {
            meta.mounts += 1;
            self.write_meta(&dir, &meta)?;
            return Ok(merged);
        }
        if !merged.exists() {
            mkdir(&merged, 0o700)?;
        }
        if let Err(e) = self.mount_at(id, &meta, &merged, false) {
            let _ = fs::remove_dir(&merged);
            return Err(e);
        }
        meta.mounts = 1;
        meta.mounted_by = Some(self.backend);
        self.write_meta(&dir, &meta)?;
        Ok(merged)
    }

    /// The overlay options that mount layer `id` (short name `lid`, parents `lower`): a
    /// container layer with its diff as the upper dir, a read-only one (or any, with
    /// `readonly`) as lowers only. Returns them and whether there is an upper dir.
    fn overlay_options(
        &self,
        id: &str,
        lid: &str,
        lower: &str,
        rw: bool,
        readonly: bool,
    ) -> (String, bool) {
        let dir = self.layer_dir(id);
        let upper = rw && !readonly;
        let lowers = if upper {
            lower.to_owned()
        } else if lower.is_empty() {
            format!("l/{lid}")
        } else {
            format!("l/{lid}:{lower}")
        };
        let mut opts = format!("lowerdir={lowers}");
        if upper {
            opts.push_str(&format!(
                ",upperdir={},workdir={}",
                dir.join("diff").display(),
                dir.join("work").display()
            ));
        }
        // As Docker mounts the kernel's (and so stratafs too): hard links below are not
        // joined through an index in the workdir, which a layer tar could not carry.
        opts.push_str(",index=off");
        if !upper {
            opts.push_str(",ro");
        }
        (opts, upper)
    }

    /// Kernel overlayfs options must fit [`KERNEL_MOUNT_DATA_MAX`]; longer ones would only get
    /// an obscure error from mount(8) ("special device overlay does not exist").
    fn check_kernel_options(&self, id: &str, opts: &str) -> Result<()> {
        if opts.len() <= KERNEL_MOUNT_DATA_MAX {
            return Ok(());
        }
        let lowers = opts
            .strip_prefix("lowerdir=")
            .and_then(|o| o.split(',').next())
            .unwrap_or("");
        Err(Error::KernelOptionsTooLong {
            id: id.to_owned(),
            layers: lowers.split(':').filter(|s| !s.is_empty()).count(),
            len: opts.len(),
            max: KERNEL_MOUNT_DATA_MAX,
        })
    }

    /// Mounts layer `id` at `target` (see [`overlay_options`](Self::overlay_options)).
    fn mount_at(&self, id: &str, meta: &LayerMeta, target: &Path, readonly: bool) -> Result<()> {
        let dir = self.layer_dir(id);
        let lower = self.lower(id)?;
        let lid = self.read_small(&dir.join("link"))?;
        let (opts, upper) = self.overlay_options(id, &lid, &lower, meta.rw, readonly);
        match self.backend {
            Backend::Kernel => {
                if !upper && lower.is_empty() {
                    // overlayfs wants two lowers without an upper: a plain read-only bind.
                    return run(Command::new("mount")
                        .args(["--bind", "-o", "ro"])
                        .arg(dir.join("diff"))
                        .arg(target));
                }
                self.check_kernel_options(id, &opts)?;
                run(Command::new("mount")
                    .current_dir(&self.root)
                    .args(["-t", "overlay", "overlay", "-o"])
                    .arg(&opts)
                    .arg(target))
            }
            Backend::Stratafs => run(Command::new(&self.stratafs_bin)
                .current_dir(&self.root)
                .arg("-o")
                .arg(&opts)
                .arg(target)),
        }
    }

    fn unmount(&self, backend: Backend, target: &Path) -> Result<()> {
        if !is_mountpoint(target) {
            return Ok(());
        }
        match backend {
            Backend::Stratafs => run(Command::new(&self.stratafs_bin).arg("umount").arg(target)),
            Backend::Kernel => sys::umount(target.as_os_str(), false)
                .map_err(|e| Error::Mount(format!("umount {}: {e}", target.display()))),
        }
    }

    /// Drops one `get`; unmounts at zero. Returns the remaining count.
    pub fn put(&self, id: &str) -> Result<u32> {
        validate_id(id)?;
        let _lock = self.lock()?;
        let dir = self.layer_dir(id);
        let mut meta = self.read_meta(id)?;
        if self.lower(id)?.is_empty() {
            return Ok(0);
        }
        if meta.mounts == 0 {
            return Err(Error::NotMounted(id.into()));
        }
        meta.mounts -= 1;
        if meta.mounts == 0 {
            let merged = dir.join("merged");
            self.unmount(meta.mounted_by.unwrap_or(self.backend), &merged)?;
            let _ = fs::remove_dir(&merged);
            meta.mounted_by = None;
        }
        self.write_meta(&dir, &meta)?;
        Ok(meta.mounts)
    }

    /// Mounts layer `id` at an arbitrary `target` (image mounts); recorded in its metadata.
    pub fn mount_to(&self, id: &str, target: &Path, readonly: bool) -> Result<()> {
        validate_id(id)?;
        let _lock = self.lock()?;
        let dir = self.layer_dir(id);
        let mut meta = self.read_meta(id)?;
        if meta.mounts > 0 {
            return Err(Error::InUse {
                id: id.into(),
                why: "already mounted".into(),
            });
        }
        self.mount_at(id, &meta, target, readonly)?;
        meta.mounts = 1;
        meta.mounted_by = Some(self.backend);
        meta.mountpoint = Some(target.to_path_buf());
        self.write_meta(&dir, &meta)
    }

    /// Undoes [`mount_to`](Self::mount_to).
    pub fn unmount_from(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let _lock = self.lock()?;
        let dir = self.layer_dir(id);
        let mut meta = self.read_meta(id)?;
        let target = meta
            .mountpoint
            .clone()
            .ok_or_else(|| Error::NotMounted(id.into()))?;
        self.unmount(meta.mounted_by.unwrap_or(self.backend), &target)?;
        meta.mounts = 0;
        meta.mounted_by = None;
        meta.mountpoint = None;
        self.write_meta(&dir, &meta)
    }

    /// The layer's record.
    pub fn meta(&self, id: &str) -> Result<LayerMeta> {
        self.read_meta(id)
    }

    /// Writes the OCI tar of the layer's changes.
    pub fn diff<W: std::io::Write>(&self, id: &str, out: W) -> Result<(W, ExportStats)> {
        let _ = self.read_meta(id)?;
        export::export_layer(&self.layer_dir(id).join("diff"), &self.lower_dirs(id)?, out)
    }

    /// A/C/D list against the parent chain.
    pub fn changes(&self, id: &str) -> Result<Vec<Change>> {
        let _ = self.read_meta(id)?;
        export::changes(&self.layer_dir(id).join("diff"), &self.lower_dirs(id)?)
    }

    /// Bytes of file data the layer holds.
    pub fn diff_size(&self, id: &str) -> Result<u64> {
        let _ = self.read_meta(id)?;
        export::diff_size(&self.layer_dir(id).join("diff"))
    }

    /// Status lines (Docker's `Status`).
    pub fn status(&self) -> Result<Vec<(String, String)>> {
        let layers = self.list()?;
        Ok(vec![
            ("Root Dir".into(), self.root.display().to_string()),
            (
                "Backing Filesystem".into(),
                backing_fs(&self.root).unwrap_or_else(|| "unknown".into()),
            ),
            (
                "Mount Backend".into(),
                format!("{:?}", self.backend).to_lowercase(),
            ),
            ("Supports d_type".into(), "true".into()),
            ("Native Overlay Diff".into(), "true".into()),
            ("Layers".into(), layers.len().to_string()),
            ("Max Depth".into(), self.max_depth.to_string()),
        ])
    }

    /// Removes what a crash left: scratch directories, dangling short links, stale mount
    /// counts; re-creates missing short links.
    pub fn cleanup(&self) -> Result<CleanupReport> {
        let _lock = self.lock()?;
        let mut rep = CleanupReport::default();
        let tmp = self.root.join(".tmp");
        for e in fs::read_dir(&tmp).ctx(|| "read .tmp".into())? {
            let p = e.ctx(|| "read .tmp".into())?.path();
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p).ctx(|| format!("remove {}", p.display()))?;
            } else {
                fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
            }
            rep.scratch.push(p);
        }
        let ldir = self.root.join("l");
        for e in fs::read_dir(&ldir).ctx(|| "read l/".into())? {
            let p = e.ctx(|| "read l/".into())?.path();
            if fs::metadata(&p).is_err() {
                fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
                rep.dangling_links.push(p);
            }
        }
        for id in self.list()? {
            let dir = self.layer_dir(&id);
            let lid = self.read_small(&dir.join("link"))?;
            let link = ldir.join(&lid);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("../{id}/diff"), &link)
                    .ctx(|| format!("symlink {}", link.display()))?;
                rep.relinked.push(id.clone());
            }
            let mut names: Vec<Vec<u8>> = Vec::new();
            for e in fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
                names.push(
                    e.ctx(|| "read layer".into())?
                        .file_name()
                        .as_bytes()
                        .to_vec(),
                );
            }
            // Pending records first: whether `.diff-R` is still there decides their fate.
            names.sort_by_key(|n| !n.starts_with(PENDING_META.as_bytes()));
            for n in names {
                let p = dir.join(OsStr::from_bytes(&n));
                if let Some(suffix) = n.strip_prefix(PENDING_META.as_bytes()) {
                    let scratch = dir.join(OsStr::from_bytes(
                        &[SCRATCH_DIFF.as_bytes(), suffix].concat(),
                    ));
                    if fs::symlink_metadata(&scratch).is_err() {
                        // The content was renamed in: take the DiffID, keep the rest (mount
                        // counts may have changed since).
                        let done: LayerMeta = serde_json::from_slice(
                            &fs::read(&p).ctx(|| format!("read {}", p.display()))?,
                        )
                        .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
                        let mut meta = self.read_meta(&id)?;
                        meta.diff_id = done.diff_id;
                        self.write_meta(&dir, &meta)?;
                        rep.completed.push(id.clone());
                    }
                    fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
                    rep.scratch.push(p);
                } else if n.starts_with(SCRATCH_DIFF.as_bytes()) {
                    fs::remove_dir_all(&p).ctx(|| format!("remove {}", p.display()))?;
                    rep.scratch.push(p);
                } else if n.starts_with(b".")
                    && n.windows(5).any(|w| w == b".tmp-")
                    && !fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
                {
                    // A metadata file `write_atomic` did not get to rename.
                    fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
                    rep.scratch.push(p);
                }
            }
            let mut meta = self.read_meta(&id)?;
            let target = meta
                .mountpoint
                .clone()
                .unwrap_or_else(|| dir.join("merged"));
            if meta.mounts > 0 && !is_mountpoint(&target) {
                meta.mounts = 0;
                meta.mounted_by = None;
                meta.mountpoint = None;
                self.write_meta(&dir, &meta)?;
                rep.stale_mounts.push(id.clone());
            }
            if meta.mounts == 0
                && dir.join("merged").is_dir()
                && !is_mountpoint(&dir.join("merged"))
            {
                let _ = fs::remove_dir(dir.join("merged"));
            }
        }
        Ok(rep)
    }
}

fn backing_fs(root: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mounts").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let mut f = line.split(' ');
        let (_, mp, fstype) = (f.next()?, f.next()?, f.next()?);
        if root.starts_with(mp) && best.as_ref().is_none_or(|(l, _)| mp.len() > *l) {
            best = Some((mp.len(), fstype.to_owned()));
        }
    }
    best.map(|(_, t)| t)
}
