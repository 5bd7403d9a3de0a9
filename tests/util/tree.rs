//! Snapshots of directory trees and a readable comparison of two of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
    /// A char device 0/0 in an upper or lower layer (only when snapshotting a layer).
    Whiteout,
}

/// What one path is, as far as the comparison cares.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Not for directories: their size is the host filesystem's business.
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub target: Option<String>,
    pub xattrs: BTreeMap<String, String>,
    pub nlink: u64,
    pub rdev: Option<(u32, u32)>,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub ino: u64,
    pub blocks: u64,
    /// Other paths of this snapshot with the same st_ino (non-directories only).
    pub same_inode_as: Vec<String>,
}

/// Sorted map: relative path ("" is the root) -> entry.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub entries: BTreeMap<String, Entry>,
}

/// How to take a snapshot.
#[derive(Clone, Copy)]
pub struct Snap {
    /// Which xattr names to record.
    pub keep_xattr: fn(&str) -> bool,
    /// Treat char 0/0 as [`Kind::Whiteout`] (for layer directories, not merged views).
    pub layer: bool,
    /// Top-level names to leave out (e.g. the work dir's scratch).
    pub skip_top: &'static [&'static str],
}

pub fn keep_all_xattrs(_: &str) -> bool {
    true
}

/// Upper layers of kernel and stratafs are compared without private bookkeeping xattrs:
/// `trusted.stratafs.*` and every `trusted.overlay.*` except the opaque marker.
pub fn keep_upper_xattr(name: &str) -> bool {
    if name.starts_with("trusted.stratafs.") {
        return false;
    }
    if name.starts_with("trusted.overlay.") {
        return name == "trusted.overlay.opaque";
    }
    true
}

/// A kernel mount of a stratafs upper shows stratafs's private xattrs (the kernel hides only
/// its own); they are bookkeeping, not content.
pub fn keep_non_stratafs_xattr(name: &str) -> bool {
    !name.starts_with("trusted.stratafs.")
}

impl Snap {
    pub const MERGED: Snap = Snap {
        keep_xattr: keep_all_xattrs,
        layer: false,
        skip_top: &[],
    };
    pub const UPPER: Snap = Snap {
        keep_xattr: keep_upper_xattr,
        layer: true,
        skip_top: &[],
    };
    pub const LOWER: Snap = Snap {
        keep_xattr: keep_all_xattrs,
        layer: true,
        skip_top: &[],
    };
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Content digest: SHA-256 over the file's bytes, except that each all-zero 64 KiB block
/// (block-aligned) is fed as a short marker. Equal content gives equal digests; it keeps
/// hashing of large sparse files fast in debug builds (the test profile is unoptimized).
pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    const BLOCK: usize = 64 * 1024;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        // Fill a whole block unless EOF comes first.
        let mut n = 0;
        while n < BLOCK {
            let r = f.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        if n == BLOCK && buf[..] == ZEROS[..] {
            h.update(b"\0<zero block>\0");
        } else {
            h.update(&buf[..n]);
        }
        if n < BLOCK {
            break;
        }
    }
    Ok(hex(&h.finalize()))
}

/// Digests of real (non-FUSE) files by (dev, ino, size, mtime, ctime): any write changes
/// ctime, so a hit is the same content. Used only for layer directories, never for a mount
/// under test (whose reported ctime is itself under test).
fn cached_digest(p: &Path, md: &fs::Metadata) -> std::io::Result<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Key = (u64, u64, u64, i64, i64, i64, i64);
    static CACHE: Mutex<Option<HashMap<Key, String>>> = Mutex::new(None);
    let key = (
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec(),
    );
    if let Some(d) = CACHE
        .lock()
        .expect("cache")
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok(d.clone());
    }
    let d = sha256_file(p)?;
    CACHE
        .lock()
        .expect("cache")
        .get_or_insert_with(HashMap::new)
        .insert(key, d.clone());
    Ok(d)
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// Shows an xattr value as text when it is printable, else as hex.
pub fn show_bytes(v: &[u8]) -> String {
    if v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(v))
    } else {
        format!("0x{}", hex(v))
    }
}

fn kind_of(md: &fs::Metadata, layer: bool) -> Kind {
    let ft = md.file_type();
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        if layer && md.rdev() == 0 {
            Kind::Whiteout
        } else {
            Kind::Char
        }
    } else if ft.is_block_device() {
        Kind::Block
    } else {
        Kind::Socket
    }
}

fn entry(p: &Path, snap: &Snap) -> std::io::Result<Entry> {
    let md = fs::symlink_metadata(p)?;
    let kind = kind_of(&md, snap.layer);
    let mut xattrs = BTreeMap::new();
    match sys::llistxattr(p) {
        Ok(names) => {
            for n in names {
                if !(snap.keep_xattr)(&n) {
                    continue;
                }
                let v = sys::lgetxattr(p, &n)
                    .map(|v| show_bytes(&v))
                    .unwrap_or_else(|e| format!("<listed but getxattr failed: {e}>"));
                xattrs.insert(n, v);
            }
        }
        Err(e) if sys::is_errno(&e, libc::EOPNOTSUPP) => {}
        Err(e) => {
            xattrs.insert("<listxattr>".into(), e.to_string());
        }
    }
    let rdev = matches!(kind, Kind::Char | Kind::Block)
        .then(|| (libc::major(md.rdev()), libc::minor(md.rdev())));
    Ok(Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: (kind != Kind::Dir).then_some(md.size()),
        sha256: if kind == Kind::File {
            let d = if snap.layer {
                cached_digest(p, &md)
            } else {
                sha256_file(p)
            };
            Some(d.unwrap_or_else(|e| format!("<read failed: {e}>")))
        } else {
            None
        },
        target: if kind == Kind::Symlink {
            Some(fs::read_link(p)?.to_string_lossy().into_owned())
        } else {
            None
        },
        xattrs,
        nlink: md.nlink(),
        rdev,
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
        ino: md.ino(),
        blocks: md.blocks(),
        same_inode_as: Vec::new(),
    })
}

/// Walks `root` without following symlinks.
pub fn snapshot(root: &Path, snap: Snap) -> Tree {
    let mut entries = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let e = entry(&p, &snap).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        if e.kind == Kind::Dir {
            let rd = fs::read_dir(&p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()));
            for d in rd {
                let d = d.unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()));
                let name = d.file_name().to_string_lossy().into_owned();
                if rel.is_empty() && snap.skip_top.contains(&name.as_str()) {
                    continue;
                }
                stack.push(if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
        entries.insert(rel, e);
    }
    // Hard-link groups by st_ino (whiteouts share one inode by design: not a group).
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, e) in &entries {
        if !matches!(e.kind, Kind::Dir | Kind::Whiteout) {
            by_ino.entry(e.ino).or_default().push(p.clone());
        }
    }
    for group in by_ino.values().filter(|g| g.len() > 1) {
        for p in group {
            let others = group.iter().filter(|q| *q != p).cloned().collect();
            entries.get_mut(p).expect("in map").same_inode_as = others;
        }
    }
    Tree { entries }
}

/// Paths whose mtime an operation set to "now" (so they differ between two runs).
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    paths: BTreeSet<String>,
}

pub fn parent_of(p: &str) -> String {
    match p.rsplit_once('/') {
        Some((d, _)) => d.to_string(),
        None => String::new(),
    }
}

impl Dirty {
    pub fn mark(&mut self, p: &str) {
        self.paths.insert(p.to_string());
    }
    pub fn mark_parent(&mut self, p: &str) {
        self.paths.insert(parent_of(p));
    }
    pub fn clear(&mut self, p: &str) {
        self.paths.remove(p);
    }
    pub fn contains(&self, p: &str) -> bool {
        self.paths.contains(p)
    }
    /// An object moved from `from` to `to` keeps its own mtime (and its subtree's).
    pub fn moved(&mut self, from: &str, to: &str) {
        let pre = format!("{from}/");
        let moved: Vec<String> = self
            .paths
            .iter()
            .filter(|p| *p == from || p.starts_with(&pre))
            .cloned()
            .collect();
        let to_pre = format!("{to}/");
        self.paths.retain(|p| p != to && !p.starts_with(&to_pre));
        for p in moved {
            self.paths.remove(&p);
            self.paths.insert(format!("{to}{}", &p[from.len()..]));
        }
    }
    /// Two objects swapped places (RENAME_EXCHANGE).
    pub fn exchanged(&mut self, a: &str, b: &str) {
        let tmp = "\u{0}exchange";
        self.moved(a, tmp);
        self.moved(b, a);
        self.moved(tmp, b);
    }
}

/// Which fields to compare.
#[derive(Clone, Copy)]
pub struct Cmp<'a> {
    /// `None`: mtimes are not compared; `Some(d)`: compared except for paths in `d`.
    pub mtime: Option<&'a Dirty>,
    pub ctime: bool,
    pub nlink: bool,
    pub ino: bool,
    pub links: bool,
    /// Compare the owner/mode/mtime of the root directory.
    pub root_attrs: bool,
    /// Compare size and content of regular files.
    pub content: bool,
}

impl Cmp<'_> {
    pub const STRICT: Cmp<'static> = Cmp {
        mtime: Some(&EMPTY_DIRTY),
        ctime: true,
        nlink: true,
        ino: true,
        links: true,
        root_attrs: true,
        content: true,
    };
}

static EMPTY_DIRTY: Dirty = Dirty {
    paths: BTreeSet::new(),
};

fn show_entry(e: &Entry) -> String {
    let mut s = format!(
        "{:?} {:04o} {}:{} nlink={}",
        e.kind, e.mode, e.uid, e.gid, e.nlink
    );
    if let Some(sz) = e.size {
        let _ = write!(s, " size={sz}");
    }
    if let Some(h) = &e.sha256 {
        let _ = write!(s, " sha={}", &h[..h.len().min(12)]);
    }
    if let Some(t) = &e.target {
        let _ = write!(s, " -> {t:?}");
    }
    if let Some((a, b)) = e.rdev {
        let _ = write!(s, " rdev={a}:{b}");
    }
    if !e.xattrs.is_empty() {
        let _ = write!(s, " xattrs={:?}", e.xattrs);
    }
    s
}

/// Human-readable differences, one block per differing path; empty when equal.
pub fn diff(a_name: &str, a: &Tree, b_name: &str, b: &Tree, cmp: Cmp) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = a.entries.keys().chain(b.entries.keys()).collect();
    let w = a_name.len().max(b_name.len());
    for k in keys {
        let shown = format!("/{k}");
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(x), None) => out.push(format!("{shown}: only in {a_name}: {}", show_entry(x))),
            (None, Some(y)) => out.push(format!("{shown}: only in {b_name}: {}", show_entry(y))),
            (Some(x), Some(y)) => {
                let mut d: Vec<(String, String, String)> = Vec::new();
                let mut f = |name: &str, l: String, r: String| {
                    if l != r {
                        d.push((name.to_string(), l, r));
                    }
                };
                let root = k.is_empty();
                let whiteout = x.kind == Kind::Whiteout && y.kind == Kind::Whiteout;
                f("type", format!("{:?}", x.kind), format!("{:?}", y.kind));
                if !whiteout && (!root || cmp.root_attrs) {
                    f("mode", format!("{:04o}", x.mode), format!("{:04o}", y.mode));
                    f(
                        "owner",
                        format!("{}:{}", x.uid, x.gid),
                        format!("{}:{}", y.uid, y.gid),
                    );
                }
                if cmp.content || x.kind != Kind::File || y.kind != Kind::File {
                    f("size", format!("{:?}", x.size), format!("{:?}", y.size));
                    f(
                        "sha256",
                        format!("{:?}", x.sha256),
                        format!("{:?}", y.sha256),
                    );
                }
                f(
                    "target",
                    format!("{:?}", x.target),
                    format!("{:?}", y.target),
                );
                f("rdev", format!("{:?}", x.rdev), format!("{:?}", y.rdev));
                f(
                    "xattrs",
                    format!("{:?}", x.xattrs),
                    format!("{:?}", y.xattrs),
                );
                // nlink 1 on a directory means "not counted" (find(1) knows): the kernel says
                // so for every merged directory. The other side may instead give the true
                // count (2 + its subdirectories), as ext4 does: stratafs for a directory
                // that stayed lower-only where the kernel copied it up as the parent of a
                // hard link's name (see `Profile::upper_hardlinks`).
                let counted = |t: &Tree, n: u64| {
                    let subdirs = t
                        .entries
                        .iter()
                        .filter(|(p, e)| {
                            e.kind == Kind::Dir && !p.is_empty() && parent_of(p) == **k
                        })
                        .count() as u64;
                    n == 2 + subdirs
                };
                let uncounted = x.kind == Kind::Dir
                    && y.kind == Kind::Dir
                    && ((x.nlink == 1 && counted(b, y.nlink))
                        || (y.nlink == 1 && counted(a, x.nlink)));
                if cmp.nlink && !whiteout && !uncounted {
                    f("nlink", x.nlink.to_string(), y.nlink.to_string());
                }
                if cmp.links && !whiteout {
                    f(
                        "same inode as",
                        format!("{:?}", x.same_inode_as),
                        format!("{:?}", y.same_inode_as),
                    );
                }
                if cmp.ino {
                    f("st_ino", x.ino.to_string(), y.ino.to_string());
                }
                if let Some(dirty) = cmp.mtime
                    && !whiteout
                    && !dirty.contains(k)
                    && !x.same_inode_as.iter().any(|o| dirty.contains(o))
                    && !y.same_inode_as.iter().any(|o| dirty.contains(o))
                    && (!root || cmp.root_attrs)
                {
                    f(
                        "mtime",
                        format!("{}.{:09}", x.mtime.0, x.mtime.1),
                        format!("{}.{:09}", y.mtime.0, y.mtime.1),
                    );
                }
                if cmp.ctime {
                    f(
                        "ctime",
                        format!("{}.{:09}", x.ctime.0, x.ctime.1),
                        format!("{}.{:09}", y.ctime.0, y.ctime.1),
                    );
                }
                if !d.is_empty() {
                    let mut s = format!("{shown}:");
                    for (field, l, r) in d {
                        let _ = write!(
                            s,
                            "\n    {field}: {a_name:>w$}: {l}\n    {field}: {b_name:>w$}: {r}"
                        );
                    }
                    out.push(s);
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

/// Panics with the differing paths only.
pub fn assert_same(what: &str, a_name: &str, a: &Tree, b_name: &str, b: &Tree, cmp: Cmp) {
    let d = diff(a_name, a, b_name, b, cmp);
    assert!(
        d.is_empty(),
        "{what}: {} differing path(s):\n{}",
        d.len(),
        d.join("\n")
    );
}
