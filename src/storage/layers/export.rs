//! Reading a layer back: the OCI tar of its changes (`diff`), the change list (`changes`) and
//! its size (`diff-size`).
//!
//! The layer's `diff/` is an overlay upper directory. Its whiteouts (char 0/0, or `.wh.` files)
//! become `.wh.NAME` entries, opaque directories get a `.wh..wh..opq` entry right after their
//! own entry, and the overlay's private xattrs never reach the tar. Two formats of the
//! filesystem are resolved against the parent chain (`lowers`, topmost first): a metacopy file
//! (`overlay.metacopy`: data still below) is written with the data found below, and a
//! directory renamed during a mount (`overlay.redirect`) is written as an opaque directory with
//! its whole merged content, so the tar never depends on the layers it came from.
//!
//! Ordering (image spec, "Changesets"): a directory comes before anything in it; within a
//! directory the opaque marker comes first, then whiteouts, then the other entries by name.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::digest::HashingWriter;
use super::error::{Error, IoContext, Result};
use crate::overlay::layer::{self as marker, is_private_xattr};

/// What exporting produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStats {
    /// sha256 of the tar written: its DiffID.
    pub diff_id: String,
    pub tar_size: u64,
}

/// One line of `changes`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    /// `/`-rooted path in the merged tree.
    pub path: PathBuf,
    pub kind: ChangeKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    Added,
    Changed,
    Deleted,
}

impl ChangeKind {
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Added => 'A',
            ChangeKind::Changed => 'C',
            ChangeKind::Deleted => 'D',
        }
    }
}

/// What one name in an upper directory is.
enum Kind {
    /// Hides the lower object of that name (`victim`).
    Whiteout(OsString),
    /// `.wh..wh..opq` (its directory is opaque).
    OpaqueMarker,
    Object(Metadata),
}

fn classify(dir: &Path, name: &OsStr) -> Result<Kind> {
    let p = dir.join(name);
    let md = fs::symlink_metadata(&p).ctx(|| format!("stat {}", p.display()))?;
    let b = name.as_bytes();
    if b == marker::OPAQUE_WHITEOUT.as_bytes() {
        return Ok(Kind::OpaqueMarker);
    }
    if let Some(v) = b.strip_prefix(marker::WHITEOUT_PREFIX) {
        return Ok(Kind::Whiteout(OsStr::from_bytes(v).to_os_string()));
    }
    if md.file_type().is_char_device() && md.rdev() == 0 {
        let dev_mark = xattr::get(&p, marker::DEVICE_MARK).ok().flatten().is_some();
        if !dev_mark {
            return Ok(Kind::Whiteout(name.to_os_string()));
        }
    }
    Ok(Kind::Object(md))
}

fn sorted_names(dir: &Path) -> Result<Vec<OsString>> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .ctx(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .ctx(|| format!("read {}", dir.display()))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn marks(path: &Path, dir: bool) -> Result<marker::Marks> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    marker::marks(f.as_fd(), dir).ctx(|| format!("read markers of {}", path.display()))
}

/// `rel` joined to `base`, with no component of `base/rel` being a symlink (the lower layers
/// are ours, but a layer's content is not trusted).
fn lookup(base: &Path, rel: &Path) -> Option<(PathBuf, Metadata)> {
    let mut cur = base.to_path_buf();
    let mut md = fs::symlink_metadata(&cur).ok()?;
    for c in rel.components() {
        if !md.is_dir() {
            return None;
        }
        cur.push(c);
        md = fs::symlink_metadata(&cur).ok()?;
    }
    Some((cur, md))
}

/// A whiteout or opaque directory at or above `rel` in a layer (which then hides everything
/// below): `Hidden` stops the search, `Found` has it, `Absent` looks further down.
enum Below {
    Found,
    Hidden,
    Absent,
}

fn probe(layer: &Path, rel: &Path) -> Below {
    let comps: Vec<_> = rel.components().collect();
    let mut cur = layer.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        let name = c.as_os_str();
        match classify(&cur, name) {
            Ok(Kind::Whiteout(_)) => return Below::Hidden,
            Ok(Kind::Object(md)) => {
                if i + 1 == comps.len() {
                    return Below::Found;
                }
                if !md.is_dir() {
                    return Below::Absent;
                }
            }
            _ => {
                if cur
                    .join(marker::whiteout_name(name))
                    .symlink_metadata()
                    .is_ok()
                {
                    return Below::Hidden;
                }
                return Below::Absent;
            }
        }
        cur.push(name);
        if i + 1 < comps.len() && marks(&cur, true).map(|m| m.opaque).unwrap_or(false) {
            // Below this directory, lower layers do not show.
            return match probe_exact(&cur, &comps[i + 1..]) {
                true => Below::Found,
                false => Below::Hidden,
            };
        }
    }
    Below::Absent
}

fn probe_exact(dir: &Path, rest: &[std::path::Component<'_>]) -> bool {
    let rel: PathBuf = rest.iter().collect();
    lookup(dir, &rel).is_some()
}

/// Does `rel` exist in the merged view of `lowers`?
fn exists_below(lowers: &[PathBuf], rel: &Path) -> bool {
    for l in lowers {
        match probe(l, rel) {
            Below::Found => return true,
            Below::Hidden => return false,
            Below::Absent => {}
        }
    }
    false
}

/// The data file of a metacopy `rel`: the first regular file at its redirect (or its own path)
/// in the lowers.
fn metacopy_data(lowers: &[PathBuf], rel: &Path, redirect: Option<&OsStr>) -> Result<PathBuf> {
    let target: PathBuf = match redirect {
        Some(r) if r.as_bytes().starts_with(b"/") => {
            PathBuf::from(OsStr::from_bytes(&r.as_bytes()[1..]))
        }
        Some(r) => rel.parent().unwrap_or(Path::new("")).join(r),
        None => rel.to_path_buf(),
    };
    for l in lowers {
        if let Some((p, md)) = lookup(l, &target)
            && md.is_file()
        {
            return Ok(p);
        }
    }
    Err(Error::Invalid(format!(
        "metacopy file {} has no data below",
        rel.display()
    )))
}

struct Exporter<W: Write> {
    tar: tar::Builder<W>,
    lowers: Vec<PathBuf>,
    /// (dev, ino) of multiply linked files already written, and where.
    links: HashMap<(u64, u64), PathBuf>,
}

/// Writes the OCI tar of the layer `diff` (whose parent chain is `lowers`, topmost first).
pub fn export_layer<W: Write>(diff: &Path, lowers: &[PathBuf], out: W) -> Result<(W, ExportStats)> {
    let mut tar = tar::Builder::new(HashingWriter::new(out));
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    let mut ex = Exporter {
        tar,
        lowers: lowers.to_vec(),
        links: HashMap::new(),
    };
    let root_marks = marks(diff, true)?;
    if root_marks.opaque {
        ex.marker(Path::new(marker::OPAQUE_WHITEOUT))?;
    }
    ex.upper_dir(diff, Path::new(""))?;
    let hw = ex.tar.into_inner().ctx(|| "finish tar".into())?;
    let tar_size = hw.count;
    let (w, diff_id) = hw.finish();
    Ok((w, ExportStats { diff_id, tar_size }))
}

impl<W: Write> Exporter<W> {
    fn marker(&mut self, path: &Path) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        self.tar
            .append_data(&mut h, path, io::empty())
            .ctx(|| format!("write {}", path.display()))
    }

    /// The entries of upper directory `dir` (at `rel`): whiteouts first, then objects.
    fn upper_dir(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut objects = Vec::new();
        for name in sorted_names(dir)? {
            match classify(dir, &name)? {
                Kind::OpaqueMarker => {} // written with the directory
                Kind::Whiteout(victim) => {
                    self.marker(&rel.join(marker::whiteout_name(&victim)))?;
                }
                Kind::Object(md) => objects.push((name, md)),
            }
        }
        for (name, md) in objects {
            let src = dir.join(&name);
            let r = rel.join(&name);
            if md.is_dir() {
                let m = marks(&src, true)?;
                self.object(&src, &r, &md, None)?;
                if let Some(redirect) = m.redirect {
                    // Renamed during a mount: its lower part lives at `redirect`. Written
                    // whole, as an opaque directory.
                    self.marker(&r.join(marker::OPAQUE_WHITEOUT))?;
                    let from: PathBuf = if redirect.as_bytes().starts_with(b"/") {
                        PathBuf::from(OsStr::from_bytes(&redirect.as_bytes()[1..]))
                    } else {
                        rel.join(&redirect)
                    };
                    let mut sources = vec![src.clone()];
                    for l in &self.lowers {
                        if let Some((p, md)) = lookup(l, &from)
                            && md.is_dir()
                        {
                            let opaque = marks(&p, true)?.opaque;
                            sources.push(p);
                            if opaque {
                                break;
                            }
                        }
                    }
                    self.merged_dir(&sources, &r)?;
                } else {
                    if m.opaque {
                        self.marker(&r.join(marker::OPAQUE_WHITEOUT))?;
                    }
                    self.upper_dir(&src, &r)?;
                }
            } else {
                let data = if md.is_file() {
                    let m = marks(&src, false)?;
                    if m.metacopy {
                        Some(metacopy_data(&self.lowers, &r, m.redirect.as_deref())?)
                    } else {
                        None
                    }
                } else {
                    None
                };
                self.object(&src, &r, &md, data.as_deref())?;
            }
        }
        Ok(())
    }

    /// The merged content of `sources` (directories, topmost first), written in full.
    fn merged_dir(&mut self, sources: &[PathBuf], rel: &Path) -> Result<()> {
        // name -> index of the source that defines it (None: whited out)
        let mut chosen: BTreeMap<Vec<u8>, Option<(usize, Metadata)>> = BTreeMap::new();
        for (i, s) in sources.iter().enumerate() {
            for name in sorted_names(s)? {
                match classify(s, &name)? {
                    Kind::OpaqueMarker => {}
                    Kind::Whiteout(v) => {
                        chosen.entry(v.as_bytes().to_vec()).or_insert(None);
                    }
                    Kind::Object(md) => {
                        chosen
                            .entry(name.as_bytes().to_vec())
                            .or_insert(Some((i, md)));
                    }
                }
            }
        }
        for (name, pick) in chosen {
            let Some((i, md)) = pick else { continue };
            let name = OsStr::from_bytes(&name);
            let src = sources[i].join(name);
            let r = rel.join(name);
            if md.is_dir() {
                self.object(&src, &r, &md, None)?;
                let mut sub = vec![src.clone()];
                if !marks(&src, true)?.opaque {
                    for s in &sources[i + 1..] {
                        let p = s.join(name);
                        match classify(s, name) {
                            Ok(Kind::Object(m)) if m.is_dir() => {
                                let opaque = marks(&p, true)?.opaque;
                                sub.push(p);
                                if opaque {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
                self.merged_dir(&sub, &r)?;
            } else {
                let data = if md.is_file() && marks(&src, false)?.metacopy {
                    let below: Vec<PathBuf> = sources[i + 1..].to_vec();
                    Some(metacopy_data(&below, Path::new(name), None)?)
                } else {
                    None
                };
                self.object(&src, &r, &md, data.as_deref())?;
            }
        }
        Ok(())
    }

    /// One object: PAX xattrs, then its header (and data, from `data` if given).
    fn object(&mut self, src: &Path, rel: &Path, md: &Metadata, data: Option<&Path>) -> Result<()> {
        let what = || format!("export {}", rel.display());
        let ft = md.file_type();
        if !ft.is_symlink() {
            let mut records = Vec::new();
            for name in xattr::list(src).ctx(what)? {
                if is_private_xattr(&name) {
                    continue;
                }
                if let Some(v) = xattr::get(src, &name).ctx(what)? {
                    let mut key = b"SCHILY.xattr.".to_vec();
                    key.extend_from_slice(name.as_bytes());
                    records.push((key, v));
                }
            }
            if !records.is_empty() {
                self.pax(rel, &records)?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(u64::from(md.uid()));
        h.set_gid(u64::from(md.gid()));
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            let mut p = rel.as_os_str().as_bytes().to_vec();
            p.push(b'/');
            return self
                .tar
                .append_data(&mut h, OsStr::from_bytes(&p), io::empty())
                .ctx(what);
        }
        if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(src).ctx(what)?;
            return self.tar.append_link(&mut h, rel, target).ctx(what);
        }
        if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                    h.set_entry_type(tar::EntryType::Link);
                    let first = first.clone();
                    return self.tar.append_link(&mut h, rel, first).ctx(what);
                }
                self.links.insert((md.dev(), md.ino()), rel.to_path_buf());
            }
            let from = data.unwrap_or(src);
            let f = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(from)
                .ctx(what)?;
            let len = f.metadata().ctx(what)?.len();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(len);
            return self.tar.append_data(&mut h, rel, f).ctx(what);
        }
        let kind = if ft.is_char_device() {
            tar::EntryType::Char
        } else if ft.is_block_device() {
            tar::EntryType::Block
        } else if ft.is_fifo() {
            tar::EntryType::Fifo
        } else {
            return Err(Error::Invalid(format!(
                "{}: sockets cannot be exported",
                rel.display()
            )));
        };
        h.set_entry_type(kind);
        if kind != tar::EntryType::Fifo {
            h.set_device_major(libc::major(md.rdev())).ctx(what)?;
            h.set_device_minor(libc::minor(md.rdev())).ctx(what)?;
        }
        self.tar.append_data(&mut h, rel, io::empty()).ctx(what)
    }

    /// A PAX extended header (`x`) with `records` for the entry that follows.
    fn pax(&mut self, rel: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.push(b' ');
            data.extend_from_slice(k);
            data.push(b'=');
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        let mut name = b"PaxHeaders/".to_vec();
        let base = rel.file_name().map(|n| n.as_bytes()).unwrap_or(b"root");
        name.extend_from_slice(&base[..base.len().min(80)]);
        h.set_path(OsStr::from_bytes(&name))
            .ctx(|| "PAX header".into())?;
        h.set_cksum();
        self.tar
            .append(&h, &data[..])
            .ctx(|| "write PAX header".into())
    }
}

/// The changes the layer `diff` makes over `lowers` (topmost first), sorted by path.
pub fn changes(diff: &Path, lowers: &[PathBuf]) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    changes_in(diff, Path::new(""), lowers, &mut out)?;
    out.sort();
    out.dedup();
    Ok(out)
}

fn changes_in(dir: &Path, rel: &Path, lowers: &[PathBuf], out: &mut Vec<Change>) -> Result<()> {
    let push = |out: &mut Vec<Change>, r: &Path, kind| {
        out.push(Change {
            path: Path::new("/").join(r),
            kind,
        })
    };
    let opaque = marks(dir, true)?.opaque;
    let mut present = std::collections::HashSet::new();
    for name in sorted_names(dir)? {
        match classify(dir, &name)? {
            Kind::OpaqueMarker => {}
            Kind::Whiteout(v) => {
                let r = rel.join(&v);
                if exists_below(lowers, &r) {
                    push(out, &r, ChangeKind::Deleted);
                }
                present.insert(v);
            }
            Kind::Object(md) => {
                let r = rel.join(&name);
                let below = exists_below(lowers, &r);
                push(
                    out,
                    &r,
                    if below {
                        ChangeKind::Changed
                    } else {
                        ChangeKind::Added
                    },
                );
                if md.is_dir() {
                    changes_in(&dir.join(&name), &r, lowers, out)?;
                }
                present.insert(name);
            }
        }
    }
    if opaque && !rel.as_os_str().is_empty() {
        // Everything the lowers had here and the layer does not is gone.
        for l in lowers {
            if let Some((p, md)) = lookup(l, rel)
                && md.is_dir()
            {
                for name in sorted_names(&p)? {
                    if present.contains(&name) || name.as_bytes().starts_with(b".wh.") {
                        continue;
                    }
                    let r = rel.join(&name);
                    push(out, &r, ChangeKind::Deleted);
                    present.insert(name);
                }
            }
        }
    }
    Ok(())
}

/// Bytes of regular file data in `diff` (each inode once), whiteouts and markers excluded.
pub fn diff_size(diff: &Path) -> Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![diff.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ctx(|| format!("read {}", d.display()))? {
            let e = e.ctx(|| format!("read {}", d.display()))?;
            let md = e
                .metadata()
                .ctx(|| format!("stat {}", e.path().display()))?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && seen.insert((md.dev(), md.ino())) {
                total += md.size();
            }
        }
    }
    Ok(total)
}
