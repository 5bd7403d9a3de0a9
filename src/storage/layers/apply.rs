//! Applying an OCI layer tar to a layer directory, in the overlay on-disk format.
//!
//! Architecture Invariant: nothing is written outside the directory being filled. Every entry's
//! parent is reached one component at a time with `*at` calls and `O_NOFOLLOW` from an fd of
//! that directory; a symlink is only ever created (its target is data), never walked through;
//! a hard link may only name an entry this same archive created. The archive is validated as it
//! is read (paths, duplicates, sizes, types), so a hostile one stops with [`Error::Hostile`] or
//! [`Error::Corrupt`]; the caller builds into a scratch directory and throws it away then.
//!
//! Whiteouts: `.wh.NAME` becomes a char 0/0 device (a `.wh.NAME` file where mknod is not
//! allowed), `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr (the marker file where that
//! xattr cannot be set). Per the image spec a marker only hides what lower layers hold, so the
//! result does not depend on where in the archive it sits.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::digest::HashingReader;
use super::error::{Error, IoContext, Result};
use crate::overlay::layer::is_private_xattr;
use crate::sys::{self, SetTime};

/// What the applier may do; defaults follow the caller's privileges.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Create device nodes (needs CAP_MKNOD); otherwise a device entry is an error.
    pub allow_devices: bool,
    /// chown entries to the archive's owners (needs CAP_CHOWN).
    pub set_owners: bool,
    /// Largest regular file accepted.
    pub max_entry_size: u64,
    /// Most entries accepted.
    pub max_entries: u64,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        let root = sys::geteuid() == 0;
        ApplyOptions {
            allow_devices: root,
            set_owners: root,
            max_entry_size: 1 << 40,
            max_entries: 10_000_000,
        }
    }
}

/// What applying produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyStats {
    /// sha256 of the uncompressed tar: the layer's DiffID.
    pub diff_id: String,
    /// Bytes of uncompressed tar read.
    pub tar_size: u64,
    /// Bytes of regular file data written (hard links counted once).
    pub size: u64,
    /// Entries applied.
    pub entries: u64,
}

/// The compression of a layer stream, by its magic number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Looks at the first bytes of `r` without consuming them.
pub fn detect(r: &mut impl BufRead) -> io::Result<Compression> {
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// A reader of the uncompressed tar behind a plain, gzip or zstd stream.
pub fn decompress<'a, R: Read + 'a>(input: R) -> Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(256 * 1024, input);
    let kind = detect(&mut buf).ctx(|| "read layer stream".into())?;
    Ok(match kind {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buf)),
        Compression::Zstd => {
            Box::new(zstd::Decoder::with_buffer(buf).ctx(|| "start zstd decoder".into())?)
        }
    })
}

/// What this archive already put at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// A directory made because an entry below it came first.
    Implicit,
    Dir,
    /// Any other object; `true` for a hard-linkable one (not a directory or whiteout).
    Object,
    /// A whiteout (device or `.wh.` file) hiding the lower object of that name.
    Whiteout {
        device: bool,
    },
}

const OPAQUE: &[u8] = b".wh..wh..opq";
const WH: &[u8] = b".wh.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

struct Applier<'a> {
    root: OwnedFd,
    opts: &'a ApplyOptions,
    seen: HashMap<Vec<u8>, Seen>,
    /// Every entry path (markers included), to reject duplicates.
    paths: std::collections::HashSet<Vec<u8>>,
    /// Directories whose mode and times are set last (children change mtimes).
    dirs: Vec<(Vec<u8>, u32, SetTime, SetTime)>,
    stats: ApplyStats,
}

/// Applies the (plain, gzip or zstd) layer tar `input` to the directory `dir`.
pub fn apply_layer(dir: &Path, input: impl Read, opts: &ApplyOptions) -> Result<ApplyStats> {
    let root = sys::open(
        &sys::cstr(dir.as_os_str()).ctx(|| format!("{}", dir.display()))?,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .ctx(|| format!("open {}", dir.display()))?;
    let plain = decompress(input)?;
    let mut hr = HashingReader::new(plain);
    let mut ap = Applier {
        root,
        opts,
        seen: HashMap::new(),
        paths: Default::default(),
        dirs: Vec::new(),
        stats: ApplyStats {
            diff_id: String::new(),
            tar_size: 0,
            size: 0,
            entries: 0,
        },
    };
    {
        let mut archive = tar::Archive::new(&mut hr);
        let entries = archive
            .entries()
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::Corrupt(e.to_string()))?;
            ap.stats.entries += 1;
            if ap.stats.entries > opts.max_entries {
                return Err(Error::Corrupt(format!(
                    "more than {} entries",
                    opts.max_entries
                )));
            }
            ap.entry(entry)?;
        }
    }
    if !hr.ends_in_zero_block() {
        return Err(Error::Corrupt(
            "archive ends without its end-of-archive block".into(),
        ));
    }
    io::copy(&mut hr, &mut io::sink()).map_err(|e| Error::Corrupt(e.to_string()))?;
    ap.finish_dirs()?;
    let mut stats = ap.stats;
    stats.tar_size = hr.count;
    stats.diff_id = hr.digest();
    Ok(stats)
}

/// The path of an entry as components, or why it is refused.
fn normalize(raw: &[u8]) -> Result<Vec<&[u8]>> {
    if raw.starts_with(b"/") {
        return Err(Error::hostile(raw, "absolute path"));
    }
    if raw.len() > 4096 {
        return Err(Error::hostile(&raw[..64], "path longer than 4096 bytes"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Error::hostile(raw, "'..' in path")),
            c if c.contains(&0) => return Err(Error::hostile(raw, "NUL in path")),
            c if c.len() > 255 => return Err(Error::hostile(raw, "name longer than 255 bytes")),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn name(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Parses a PAX time (`1234.5678`) into seconds and nanoseconds.
fn pax_time(v: &[u8]) -> Option<(i64, i64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    let mut ns = 0i64;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        ns += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
    }
    if sec < 0 && ns > 0 {
        return Some((sec - 1, 1_000_000_000 - ns));
    }
    Some((sec, ns))
}

/// Metadata of one entry, PAX records applied.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SetTime,
    atime: SetTime,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl<'a> Applier<'a> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        let comps = normalize(&raw)?;
        let key = comps.join(&b'/');
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            return Ok(());
        }
        if !self.paths.insert(key.clone()) {
            return Err(Error::hostile(&raw, "duplicate path"));
        }
        let meta = self.meta(&mut entry, &raw)?;
        let Some((&last, parents)) = comps.split_last() else {
            // The layer's root itself: only its metadata.
            if !kind.is_dir() {
                return Err(Error::hostile(&raw, "the root is not a directory"));
            }
            self.dirs
                .push((Vec::new(), meta.mode, meta.atime, meta.mtime));
            return Ok(());
        };
        if parents.iter().any(|c| c.starts_with(WH)) {
            return Err(Error::hostile(&raw, "entry below a whiteout name"));
        }
        let parent_key = parents.join(&b'/');
        if last == OPAQUE {
            let dir = self.walk(parents, &raw, true)?;
            return self.opaque(dir.as_fd(), &raw);
        }
        if let Some(victim) = last.strip_prefix(WH) {
            if victim.is_empty() || victim == b"." || victim == b".." {
                return Err(Error::hostile(&raw, "bare whiteout names no entry"));
            }
            if victim.starts_with(WH) {
                // aufs metadata (`.wh..wh.plnk` and such): means nothing here.
                return Ok(());
            }
            let dir = self.walk(parents, &raw, true)?;
            let vkey = join(&parent_key, victim);
            return self.whiteout(dir.as_fd(), victim, vkey, &raw);
        }
        let size = entry.header().entry_size().unwrap_or(0);
        if size > self.opts.max_entry_size {
            return Err(Error::hostile(
                &raw,
                format!("absurd size {size} (limit {})", self.opts.max_entry_size),
            ));
        }
        let dir = self.walk(parents, &raw, true)?;
        let dirfd = dir.as_fd();
        // What is already there: an implicit directory, or a whiteout this archive wrote.
        match self.seen.get(&key).copied() {
            None => {}
            Some(Seen::Whiteout { device }) => {
                if device {
                    sys::unlinkat(dirfd, name(last), 0)
                } else {
                    sys::unlinkat(dirfd, &wh_name(last), 0)
                }
                .ctx(|| format!("replace whiteout {}", String::from_utf8_lossy(&key)))?;
                self.seen.remove(&key);
            }
            Some(Seen::Implicit) if kind.is_dir() => {}
            Some(_) => return Err(Error::hostile(&raw, "conflicts with an earlier entry")),
        }
        let what = || String::from_utf8_lossy(&raw).into_owned();
        let lname = name(last);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = sys::openat(
                    dirfd,
                    lname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .ctx(|| format!("create {}", what()))?;
                let mut f = File::from(fd);
                let n = copy_data(&mut entry, &mut f, &raw)?;
                self.stats.size += n;
                self.finish(dirfd, lname, &meta, false, &raw)?;
                self.seen.insert(key, Seen::Object);
            }
            tar::EntryType::Directory => {
                if self.seen.get(&key) != Some(&Seen::Implicit) {
                    sys::mkdirat(dirfd, lname, 0o700).ctx(|| format!("mkdir {}", what()))?;
                }
                self.finish(dirfd, lname, &meta, true, &raw)?;
                self.dirs
                    .push((key.clone(), meta.mode, meta.atime, meta.mtime));
                self.seen.insert(key, Seen::Dir);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::hostile(&raw, "symlink without a target"))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(Error::hostile(&raw, "empty symlink target"));
                }
                sys::symlinkat(name(&target), dirfd, lname)
                    .ctx(|| format!("symlink {}", what()))?;
                self.finish(dirfd, lname, &meta, false, &raw)?;
                self.seen.insert(key, Seen::Object);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::hostile(&raw, "hard link without a target"))?
                    .into_owned();
                let tcomps = normalize(&target)
                    .map_err(|_| Error::hostile(&raw, "hard link target leaves the layer"))?;
                let tkey = tcomps.join(&b'/');
                if self.seen.get(&tkey) != Some(&Seen::Object) {
                    return Err(Error::hostile(
                        &raw,
                        "hard link to something this layer does not contain",
                    ));
                }
                let (tlast, tparents) = tcomps.split_last().expect("an object has a name");
                let tdir = self.walk(tparents, &target, false)?;
                sys::linkat(tdir.as_fd(), name(tlast), dirfd, lname)
                    .ctx(|| format!("hard link {}", what()))?;
                self.seen.insert(key, Seen::Object);
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (fmt, dev) = match kind {
                    tar::EntryType::Fifo => (libc::S_IFIFO, 0),
                    _ => {
                        if !self.opts.allow_devices {
                            return Err(Error::hostile(
                                &raw,
                                "device node in an unprivileged apply",
                            ));
                        }
                        let h = entry.header();
                        let major = h.device_major().ok().flatten().unwrap_or(0);
                        let minor = h.device_minor().ok().flatten().unwrap_or(0);
                        let fmt = if kind == tar::EntryType::Char {
                            libc::S_IFCHR
                        } else {
                            libc::S_IFBLK
                        };
                        (fmt, sys::makedev(major, minor))
                    }
                };
                sys::mknodat(dirfd, lname, fmt | 0o600, dev).map_err(|e| {
                    if errno(&e) == libc::EPERM {
                        Error::hostile(&raw, "device node: mknod not permitted")
                    } else {
                        Error::io(format!("mknod {}", what()), e)
                    }
                })?;
                self.finish(dirfd, lname, &meta, false, &raw)?;
                self.seen.insert(key, Seen::Object);
            }
            other => {
                return Err(Error::hostile(
                    &raw,
                    format!("unsupported entry type {other:?}"),
                ));
            }
        }
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<Meta> {
        let h = entry.header();
        let bad =
            |what: &str| Error::Corrupt(format!("{}: bad {what}", String::from_utf8_lossy(raw)));
        let mut m = Meta {
            mode: h.mode().map_err(|_| bad("mode"))? & 0o7777,
            uid: h.uid().map_err(|_| bad("uid"))? as u32,
            gid: h.gid().map_err(|_| bad("gid"))? as u32,
            mtime: SetTime::At(h.mtime().map_err(|_| bad("mtime"))? as i64, 0),
            atime: SetTime::Omit,
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| Error::Corrupt(e.to_string()))?
        {
            for ext in exts {
                let ext = ext.map_err(|e| Error::Corrupt(e.to_string()))?;
                let key = ext.key_bytes();
                let val = ext.value_bytes();
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    m.xattrs.push((name(x).to_os_string(), val.to_vec()));
                } else if key == b"mtime" {
                    let (s, n) = pax_time(val).ok_or_else(|| bad("PAX mtime"))?;
                    m.mtime = SetTime::At(s, n);
                } else if key == b"atime" {
                    let (s, n) = pax_time(val).ok_or_else(|| bad("PAX atime"))?;
                    m.atime = SetTime::At(s, n);
                } else if key == b"uid" || key == b"gid" {
                    let v: u32 = std::str::from_utf8(val)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("PAX owner"))?;
                    if key == b"uid" {
                        m.uid = v;
                    } else {
                        m.gid = v;
                    }
                }
            }
        }
        if matches!(m.atime, SetTime::Omit) {
            m.atime = m.mtime;
        }
        Ok(m)
    }

    /// Owner, xattrs, mode and times of a freshly made `dir/name` (directories: no mode and
    /// times yet, see `finish_dirs`).
    fn finish(
        &self,
        dir: BorrowedFd<'_>,
        lname: &OsStr,
        m: &Meta,
        is_dir: bool,
        raw: &[u8],
    ) -> Result<()> {
        let what = || String::from_utf8_lossy(raw).into_owned();
        let fd = sys::openat(dir, lname, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .ctx(|| format!("open {}", what()))?;
        let st = sys::fstat(fd.as_fd()).ctx(|| format!("stat {}", what()))?;
        let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if self.opts.set_owners {
            sys::fchown(fd.as_fd(), Some(m.uid), Some(m.gid))
                .ctx(|| format!("chown {}", what()))?;
        }
        if !symlink {
            for (k, v) in &m.xattrs {
                if is_private_xattr(k) {
                    // The overlay's own markers come from whiteout entries, never from data.
                    continue;
                }
                match sys::set_xattr(fd.as_fd(), k, v, 0) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(errno(&e), libc::EPERM | libc::EOPNOTSUPP)
                            && !k.as_bytes().starts_with(b"user.") => {}
                    Err(e) => {
                        return Err(Error::io(
                            format!("set xattr {} on {}", k.to_string_lossy(), what()),
                            e,
                        ));
                    }
                }
            }
            if !is_dir {
                sys::chmod_fd(fd.as_fd(), m.mode).ctx(|| format!("chmod {}", what()))?;
            }
        }
        if !is_dir {
            sys::utimens_fd(fd.as_fd(), m.atime, m.mtime)
                .ctx(|| format!("set times of {}", what()))?;
        }
        Ok(())
    }

    /// Opens the directory `comps` below the root, never following a symlink; with `create`,
    /// missing directories are made (implicitly, mode 0755).
    fn walk(&mut self, comps: &[&[u8]], raw: &[u8], create: bool) -> Result<OwnedFd> {
        let mut cur = sys::openat(
            self.root.as_fd(),
            OsStr::new("."),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .ctx(|| "reopen layer root".into())?;
        let mut key: Vec<u8> = Vec::new();
        for c in comps {
            if !key.is_empty() {
                key.push(b'/');
            }
            key.extend_from_slice(c);
            if let Some(Seen::Whiteout { device }) = self.seen.get(&key).copied() {
                if !create {
                    return Err(Error::hostile(raw, "parent is a whiteout"));
                }
                if device {
                    sys::unlinkat(cur.as_fd(), name(c), 0)
                } else {
                    sys::unlinkat(cur.as_fd(), &wh_name(c), 0)
                }
                .ctx(|| "replace whiteout".into())?;
                self.seen.remove(&key);
            }
            match sys::fstatat(cur.as_fd(), name(c), libc::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR => {}
                    libc::S_IFLNK => {
                        return Err(Error::hostile(raw, "a parent directory is a symlink"));
                    }
                    _ => return Err(Error::hostile(raw, "a parent is not a directory")),
                },
                Err(e) if errno(&e) == libc::ENOENT && create => {
                    sys::mkdirat(cur.as_fd(), name(c), 0o755).ctx(|| "mkdir parent".into())?;
                    self.seen.insert(key.clone(), Seen::Implicit);
                }
                Err(e) => return Err(Error::io("look up parent", e)),
            }
            cur = sys::openat(
                cur.as_fd(),
                name(c),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| {
                if errno(&e) == libc::ENOTDIR || errno(&e) == libc::ELOOP {
                    Error::hostile(raw, "a parent is not a directory")
                } else {
                    Error::io("open parent", e)
                }
            })?;
        }
        Ok(cur)
    }

    fn whiteout(
        &mut self,
        dir: BorrowedFd<'_>,
        victim: &[u8],
        vkey: Vec<u8>,
        raw: &[u8],
    ) -> Result<()> {
        match self.seen.get(&vkey) {
            // The same layer put something there: a marker only hides lower layers.
            Some(Seen::Object | Seen::Dir | Seen::Implicit) => return Ok(()),
            Some(Seen::Whiteout { .. }) => return Err(Error::hostile(raw, "duplicate whiteout")),
            None => {}
        }
        let device = if self.opts.allow_devices {
            match sys::mknodat(dir, name(victim), libc::S_IFCHR, 0) {
                Ok(()) => true,
                Err(e) if errno(&e) == libc::EPERM => false,
                Err(e) => return Err(Error::io("make whiteout", e)),
            }
        } else {
            false
        };
        if !device {
            sys::openat(
                dir,
                &wh_name(victim),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
            .ctx(|| "make .wh. whiteout".into())?;
        }
        self.seen.insert(vkey, Seen::Whiteout { device });
        Ok(())
    }

    fn opaque(&mut self, dir: BorrowedFd<'_>, _raw: &[u8]) -> Result<()> {
        let fd = sys::openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .ctx(|| "open opaque directory".into())?;
        match sys::set_xattr(fd.as_fd(), OsStr::new(OPAQUE_XATTR), b"y", 0) {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), libc::EPERM | libc::EOPNOTSUPP) => {
                sys::openat(
                    dir,
                    name(OPAQUE),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .ctx(|| "make .wh..wh..opq".into())?;
                Ok(())
            }
            Err(e) => Err(Error::io("mark directory opaque", e)),
        }
    }

    /// Mode and times of directories, deepest first, once nothing more is created in them.
    fn finish_dirs(&mut self) -> Result<()> {
        let dirs = std::mem::take(&mut self.dirs);
        for (key, mode, atime, mtime) in dirs.iter().rev() {
            let comps: Vec<&[u8]> = if key.is_empty() {
                Vec::new()
            } else {
                key.split(|b| *b == b'/').collect()
            };
            let fd = self.walk(&comps, key, false)?;
            sys::chmod_fd(fd.as_fd(), *mode).ctx(|| "chmod directory".into())?;
            sys::utimens_fd(fd.as_fd(), *atime, *mtime).ctx(|| "set directory times".into())?;
        }
        Ok(())
    }
}

/// Copies an entry's data into its file. A read error is the archive's fault
/// ([`Error::Corrupt`]); a write error (ENOSPC, EDQUOT, EIO) is the disk's and keeps its errno
/// ([`Error::Io`]), so a full disk is not reported as a corrupt archive.
fn copy_data(entry: &mut impl Read, f: &mut File, raw: &[u8]) -> Result<u64> {
    let mut buf = [0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = match entry.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Corrupt(format!(
                    "{}: {e}",
                    String::from_utf8_lossy(raw)
                )));
            }
        };
        f.write_all(&buf[..k])
            .ctx(|| format!("write {}", String::from_utf8_lossy(raw)))?;
        n += k as u64;
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut k = parent.to_vec();
    if !k.is_empty() {
        k.push(b'/');
    }
    k.extend_from_slice(name);
    k
}

fn wh_name(victim: &[u8]) -> OsString {
    let mut v = WH.to_vec();
    v.extend_from_slice(victim);
    OsStr::from_bytes(&v).to_os_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rejects_escapes() {
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"a/../../b").is_err());
        assert_eq!(normalize(b"./a//b/").unwrap(), vec![&b"a"[..], &b"b"[..]]);
        assert!(normalize(b"./").unwrap().is_empty());
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(pax_time(b"7"), Some((7, 0)));
        assert_eq!(pax_time(b"x"), None);
    }
}
