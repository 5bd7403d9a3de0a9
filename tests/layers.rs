//! Layer store, OCI layer apply/export and images, with real mounts on both backends
//! (stratafs FUSE and kernel overlayfs).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use stratafs::storage::layers::apply::{ApplyOptions, apply_layer};
use stratafs::storage::layers::digest;
use stratafs::storage::layers::image::{ImageStore, Quiet};
use stratafs::storage::layers::{Backend, Error, LayerStore};

const BIN: &str = env!("CARGO_BIN_EXE_stratafs");
const BACKENDS: [Backend; 2] = [Backend::Stratafs, Backend::Kernel];

fn store(dir: &Path, backend: Backend) -> LayerStore {
    let mut s = LayerStore::open(dir.join("store")).unwrap();
    s.backend = backend;
    s.stratafs_bin = PathBuf::from(BIN);
    s
}

/// `put`s a `get` when dropped, also on panic.
struct Got<'a> {
    store: &'a LayerStore,
    id: String,
    path: PathBuf,
}

impl<'a> Got<'a> {
    fn new(store: &'a LayerStore, id: &str) -> Got<'a> {
        let path = store.get(id).unwrap();
        Got {
            store,
            id: id.into(),
            path,
        }
    }
}

impl Drop for Got<'_> {
    fn drop(&mut self) {
        if self.store.put(&self.id).is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Unmounts an image mount when dropped.
struct ImageMount<'a> {
    images: &'a ImageStore,
    mnt: PathBuf,
}

impl<'a> ImageMount<'a> {
    /// Mounts image `name` at `mnt` (read-only or with a fresh container layer); unmounted
    /// on drop.
    fn new(images: &'a ImageStore, name: &str, mnt: &Path, readonly: bool) -> ImageMount<'a> {
        images.mount(name, mnt, readonly).unwrap();
        ImageMount {
            images,
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for ImageMount<'_> {
    fn drop(&mut self) {
        if self.images.umount(&self.mnt).is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Builds tars entry by entry with raw headers (so hostile ones can be made).
struct TarBuf {
    b: tar::Builder<Vec<u8>>,
}

impl TarBuf {
    fn new() -> TarBuf {
        TarBuf {
            b: tar::Builder::new(Vec::new()),
        }
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }
    /// Sets the name bytes directly (no sanitizing by the tar crate).
    fn raw(
        &mut self,
        mut h: tar::Header,
        name: &str,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                gnu.linkname = [0; 100];
                gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }
    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(
            Self::header(tar::EntryType::Directory, mode, 0),
            name,
            None,
            &[],
        )
    }
    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(
            Self::header(tar::EntryType::Regular, mode, data.len() as u64),
            name,
            None,
            data,
        )
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            Self::header(tar::EntryType::Symlink, 0o777, 0),
            name,
            Some(target),
            &[],
        )
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            Self::header(tar::EntryType::Link, 0o644, 0),
            name,
            Some(target),
            &[],
        )
    }
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let h = Self::header(tar::EntryType::XHeader, 0o644, data.len() as u64);
        self.raw(h, "PaxHeaders/x", None, &data.clone())
    }
    fn dev(&mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o640, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.raw(h, name, None, &[])
    }
    fn done(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// One line per object: path, type, mode, owner, size, content hash or target, rdev, and the
/// mtime of non-directories.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let ft = md.file_type();
        let what = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("link->{}", fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            format!("file {}", digest::sha256_str(&fs::read(&p).unwrap()))
        } else {
            format!("special {:o} {}", md.mode() & libc::S_IFMT, md.rdev())
        };
        let mtime = if ft.is_dir() { 0 } else { md.mtime() };
        out.insert(
            rel,
            format!(
                "{what} mode={:o} {}:{} size={} mtime={mtime}",
                md.mode() & 0o7777,
                md.uid(),
                md.gid(),
                if ft.is_dir() { 0 } else { md.size() }
            ),
        );
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}

fn base_tar() -> Vec<u8> {
    let mut t = TarBuf::new();
    t.dir("etc/", 0o755)
        .file("etc/hello", 0o644, b"hello\n")
        .file("etc/gone", 0o600, b"to be deleted\n")
        .dir("etc/sub/", 0o700)
        .file("etc/sub/deep", 0o644, b"deep\n")
        .dir("opq/", 0o755)
        .file("opq/old", 0o644, b"old\n")
        .dir("bin/", 0o755)
        .file("bin/tool", 0o4755, b"#!/bin/sh\n")
        .hardlink("bin/tool2", "bin/tool")
        .symlink("bin/abs", "/etc/passwd")
        .symlink("bin/up", "../../../../etc/shadow");
    t.done()
}

/// A layer over `base_tar` with whiteouts and an opaque dir, markers in awkward places.
fn top_tar() -> Vec<u8> {
    let mut t = TarBuf::new();
    // Opaque marker before its directory's own entry.
    t.file("opq/.wh..wh..opq", 0o644, b"")
        .dir("opq/", 0o751)
        .file("opq/new", 0o644, b"new\n")
        .file("etc/.wh.gone", 0o644, b"")
        .pax(&[
            ("SCHILY.xattr.user.color", b"blue"),
            ("mtime", b"1700000000.25"),
        ])
        .file("etc/hello", 0o640, b"hello again\n")
        .file("added", 0o644, b"added\n");
    t.done()
}

fn apply_ok(dir: &Path, tar: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    apply_layer(dir, tar, &ApplyOptions::default()).unwrap();
}

#[test]
fn apply_whiteouts_opaque_xattrs_links_modes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    apply_ok(&d, &base_tar());
    apply_ok(&t.path().join("top"), &top_tar());
    let top = t.path().join("top");
    let st = fs::symlink_metadata(top.join("etc/gone")).unwrap();
    assert!(
        st.file_type().is_char_device() && st.rdev() == 0,
        "whiteout is char 0/0"
    );
    assert_eq!(
        xattr::get(top.join("opq"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!top.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        fs::metadata(top.join("opq")).unwrap().mode() & 0o7777,
        0o751
    );
    assert_eq!(
        xattr::get(top.join("etc/hello"), "user.color")
            .unwrap()
            .as_deref(),
        Some(&b"blue"[..])
    );
    let h = fs::metadata(top.join("etc/hello")).unwrap();
    assert_eq!((h.mtime(), h.mtime_nsec()), (1_700_000_000, 250_000_000));
    assert_eq!(h.mode() & 0o7777, 0o640);
    let tool = fs::metadata(d.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(tool.ino(), fs::metadata(d.join("bin/tool2")).unwrap().ino());
    assert_eq!(
        fs::read_link(d.join("bin/abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::metadata(d.join("etc/sub")).unwrap().mode() & 0o777,
        0o700
    );
    assert_eq!(
        fs::metadata(d.join("etc/sub")).unwrap().mtime(),
        1_600_000_000
    );
}

#[test]
fn apply_devices_fifos_owners_and_compression() {
    let t = tempfile::tempdir().unwrap();
    let mut tb = TarBuf::new();
    tb.dev("dev/null", tar::EntryType::Char, 1, 3)
        .dev("dev/loop9", tar::EntryType::Block, 7, 9)
        .dev("fifo", tar::EntryType::Fifo, 0, 0);
    let mut h = TarBuf::header(tar::EntryType::Regular, 0o600, 3);
    h.set_uid(1234);
    h.set_gid(4321);
    tb.raw(h, "owned", None, b"abc");
    let plain = tb.done();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 1).unwrap();
    let want = digest::sha256_str(&plain);
    for (i, data) in [plain.clone(), gz, zst].iter().enumerate() {
        let d = t.path().join(format!("d{i}"));
        fs::create_dir(&d).unwrap();
        let stats = apply_layer(&d, &data[..], &ApplyOptions::default()).unwrap();
        assert_eq!(stats.diff_id, want, "DiffID is of the uncompressed tar");
        let null = fs::symlink_metadata(d.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), libc::makedev(1, 3));
        assert!(
            fs::symlink_metadata(d.join("dev/loop9"))
                .unwrap()
                .file_type()
                .is_block_device()
        );
        assert!(
            fs::symlink_metadata(d.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let o = fs::metadata(d.join("owned")).unwrap();
        assert_eq!((o.uid(), o.gid(), o.size()), (1234, 4321, 3));
    }
}

#[test]
fn unprivileged_apply_writes_wh_files_and_refuses_devices() {
    let t = tempfile::tempdir().unwrap();
    let opts = ApplyOptions {
        allow_devices: false,
        set_owners: false,
        ..ApplyOptions::default()
    };
    let d = t.path().join("d");
    fs::create_dir(&d).unwrap();
    apply_layer(&d, &top_tar()[..], &opts).unwrap();
    assert!(
        fs::symlink_metadata(d.join("etc/.wh.gone"))
            .unwrap()
            .is_file()
    );
    let d2 = t.path().join("d2");
    fs::create_dir(&d2).unwrap();
    let mut tb = TarBuf::new();
    tb.dev("dev/null", tar::EntryType::Char, 1, 3);
    let err = apply_layer(&d2, &tb.done()[..], &opts).unwrap_err();
    assert!(matches!(err, Error::Hostile { .. }), "{err}");
    assert!(!d2.join("dev/null").exists());
}

/// Each hostile archive: a clear error, no layer left in the store, nothing outside written.
#[test]
fn hostile_archives_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path(), Backend::Stratafs);
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    fs::write(&victim, b"original").unwrap();
    let out = outside.display().to_string();
    let rel_out = format!("../../../../../../../..{out}");

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut tb = TarBuf::new();
    tb.file(&format!("{rel_out}/victim"), 0o644, b"pwned");
    cases.push(("dotdot", tb.done()));
    let mut tb = TarBuf::new();
    tb.file(&format!("{out}/victim"), 0o644, b"pwned");
    cases.push(("absolute", tb.done()));
    let mut tb = TarBuf::new();
    tb.symlink("esc", &out).file("esc/victim", 0o644, b"pwned");
    cases.push(("symlinked parent", tb.done()));
    let mut tb = TarBuf::new();
    tb.symlink("esc", &out).file("esc/new", 0o644, b"pwned");
    cases.push(("symlinked parent, new file", tb.done()));
    let mut tb = TarBuf::new();
    tb.hardlink("hl", &format!("{out}/victim"));
    cases.push(("hard link outside (absolute)", tb.done()));
    let mut tb = TarBuf::new();
    tb.hardlink("hl", &format!("{rel_out}/victim"));
    cases.push(("hard link outside (..)", tb.done()));
    let mut tb = TarBuf::new();
    tb.symlink("esc", &out).hardlink("hl", "esc/victim");
    cases.push(("hard link through a symlink", tb.done()));
    let mut tb = TarBuf::new();
    tb.file("a", 0o644, b"1").file("a", 0o644, b"2");
    cases.push(("duplicate", tb.done()));
    let mut tb = TarBuf::new();
    tb.file("./a", 0o644, b"1").file("a", 0o644, b"2");
    cases.push(("duplicate, spelled differently", tb.done()));
    let mut tb = TarBuf::new();
    tb.file("dir/.wh.", 0o644, b"");
    cases.push(("bare .wh.", tb.done()));
    let mut tb = TarBuf::new();
    tb.file(".wh...", 0o644, b"");
    cases.push((".wh...", tb.done()));
    let mut tb = TarBuf::new();
    tb.file("f", 0o644, b"x").file("f/under", 0o644, b"y");
    cases.push(("entry under a file", tb.done()));
    let mut big = TarBuf::header(tar::EntryType::Regular, 0o644, 0);
    big.set_size(1 << 50);
    let mut raw = {
        let mut tb = TarBuf::new();
        tb.file("ok", 0o644, b"fine");
        let mut v = tb.done();
        v.truncate(v.len() - 1024);
        v
    };
    {
        let gnu = big.as_gnu_mut().unwrap();
        gnu.name[..4].copy_from_slice(b"huge");
    }
    big.set_cksum();
    raw.extend_from_slice(big.as_bytes());
    raw.extend_from_slice(&[7u8; 4096]);
    cases.push(("absurd size", raw));
    let full = base_tar();
    cases.push(("truncated mid-file", full[..700].to_vec()));
    cases.push(("truncated at an entry boundary", full[..1024].to_vec()));
    let mut corrupt = full.clone();
    corrupt[520] ^= 0x55;
    corrupt[600] ^= 0x55;
    cases.push(("corrupt header", corrupt));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&full).unwrap();
    let gz = gz.finish().unwrap();
    cases.push(("truncated gzip", gz[..gz.len() / 2].to_vec()));
    let mut tb = TarBuf::new();
    tb.dev("dev/sda", tar::EntryType::Block, 8, 0);
    let unpriv_dev = tb.done();

    for (i, (what, data)) in cases.iter().enumerate() {
        let id = format!("h{i}");
        let err = s
            .create_from_tar(&id, None, &data[..], None)
            .expect_err(what);
        assert!(
            matches!(err, Error::Hostile { .. } | Error::Corrupt(_)),
            "{what}: unexpected error kind {err:?}"
        );
        if *what == "absurd size" {
            // The size limit refuses it, from the header alone (the data is not there).
            assert!(
                matches!(&err, Error::Hostile { path, why }
                    if path == "huge" && why == "absurd size 1125899906842624 (limit 1099511627776)"),
                "{what}: {err:?}"
            );
        }
        assert!(!s.exists(&id), "{what}: layer left behind");
        assert!(
            !s.root().join(&id).exists(),
            "{what}: directory left behind"
        );
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"original",
            "{what}: wrote outside"
        );
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "{what}: created outside"
        );
        assert_eq!(
            fs::read_dir(s.root().join(".tmp")).unwrap().count(),
            0,
            "{what}: scratch left"
        );
    }
    // The size limit on a complete, well-formed archive: a lowered limit refuses the file
    // that the default accepts, with the limit named in the error.
    let mut tb = TarBuf::new();
    tb.dir("d/", 0o755)
        .file("d/small", 0o644, b"ok")
        .file("d/big", 0o644, &[b'x'; 5000]);
    let sized = tb.done();
    let mut limited = store(t.path(), Backend::Stratafs);
    limited.apply.max_entry_size = 4096;
    let err = limited
        .create_from_tar("hsize", None, &sized[..], None)
        .unwrap_err();
    match &err {
        Error::Hostile { path, why } => {
            assert_eq!(path, "d/big");
            assert_eq!(why, "absurd size 5000 (limit 4096)");
        }
        e => panic!("size limit: {e:?}"),
    }
    assert_eq!(
        err.to_string(),
        "refusing archive entry \"d/big\": absurd size 5000 (limit 4096)"
    );
    assert!(!limited.exists("hsize") && !s.root().join("hsize").exists());
    assert_eq!(fs::read_dir(s.root().join(".tmp")).unwrap().count(), 0);
    limited.apply.max_entry_size = 5000;
    limited
        .create_from_tar("hsize", None, &sized[..], None)
        .unwrap();
    assert_eq!(
        fs::read(s.root().join("hsize/diff/d/big")).unwrap().len(),
        5000
    );
    limited.remove("hsize").unwrap();

    // Device nodes in an unprivileged apply.
    let mut unpriv = store(t.path(), Backend::Stratafs);
    unpriv.apply.allow_devices = false;
    let err = unpriv
        .create_from_tar("hdev", None, &unpriv_dev[..], None)
        .unwrap_err();
    assert!(matches!(err, Error::Hostile { .. }), "{err}");
    assert!(!unpriv.exists("hdev"));

    // A symlink pointing outside is fine to create, as data.
    let mut tb = TarBuf::new();
    tb.symlink("esc", &out).symlink("up", "../../../x");
    s.create_from_tar("fine", None, &tb.done()[..], None)
        .unwrap();
    assert_eq!(
        fs::read_link(s.root().join("fine/diff/esc")).unwrap(),
        outside
    );
    // A failed apply-diff leaves the layer empty and usable.
    s.create("empty", None, false).unwrap();
    assert!(s.apply_diff("empty", &cases[2].1[..]).is_err());
    assert_eq!(
        fs::read_dir(s.root().join("empty/diff")).unwrap().count(),
        0
    );
    let stats = s.apply_diff("empty", &base_tar()[..]).unwrap();
    assert!(stats.size > 0);
    assert!(matches!(
        s.apply_diff("empty", &base_tar()[..]),
        Err(Error::NotEmpty(_))
    ));
}

#[test]
fn store_layout_depth_and_cleanup() {
    let t = tempfile::tempdir().unwrap();
    let mut s = store(t.path(), Backend::Stratafs);
    s.create("a", None, false).unwrap();
    s.create("b", Some("a"), false).unwrap();
    s.create("c", Some("b"), true).unwrap();
    let root = s.root().to_path_buf();
    let lid = |id: &str| fs::read_to_string(root.join(id).join("link")).unwrap();
    assert_eq!(lid("a").len(), 26);
    assert!(
        lid("a")
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    );
    assert_eq!(
        fs::read_link(root.join("l").join(lid("a"))).unwrap(),
        Path::new("../a/diff")
    );
    assert!(!root.join("a/lower").exists() && !root.join("a/work").exists());
    assert_eq!(
        fs::read_to_string(root.join("c/lower")).unwrap(),
        format!("l/{}:l/{}", lid("b"), lid("a"))
    );
    assert!(root.join("a/committed").exists() && root.join("b/committed").exists());
    assert!(!root.join("c/committed").exists());
    let mode = |p: &str| fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        (mode("c"), mode("c/diff"), mode("c/work"), mode("l")),
        (0o710, 0o755, 0o700, 0o700)
    );
    assert!(matches!(s.create("a", None, false), Err(Error::Exists(_))));
    assert!(matches!(
        s.create("../x", None, false),
        Err(Error::InvalidId(_))
    ));
    assert!(matches!(s.remove("b"), Err(Error::InUse { .. })));

    // Depth: a chain of 5 is fine with max 5, the sixth is refused.
    s.set_max_depth(5).unwrap();
    s.create("d", Some("c"), false).unwrap();
    s.create("e", Some("d"), false).unwrap();
    assert!(matches!(
        s.create("f", Some("e"), false),
        Err(Error::TooDeep { depth: 6, max: 5 })
    ));
    assert!(s.set_max_depth(501).is_err());

    // Orphans: a half-built layer, a dangling short link, a lost short link.
    fs::create_dir_all(root.join(".tmp/new-x-123/diff")).unwrap();
    std::os::unix::fs::symlink("../ghost/diff", root.join("l/GHOSTGHOSTGHOSTGHOSTGHOST2")).unwrap();
    fs::remove_file(root.join("l").join(lid("e"))).unwrap();
    let rep = s.cleanup().unwrap();
    assert_eq!(rep.scratch.len(), 1);
    assert_eq!(rep.dangling_links.len(), 1);
    assert_eq!(rep.relinked, vec!["e".to_string()]);
    assert!(root.join("l").join(lid("e")).exists());
    for id in ["e", "d", "c", "b", "a"] {
        s.remove(id).unwrap();
    }
    assert_eq!(fs::read_dir(root.join("l")).unwrap().count(), 0);
    assert!(s.list().unwrap().is_empty());
}

/// Chains of the default limit (128) mount on both backends and read through to the bottom;
/// with `--max-depth 500` the stratafs backend mounts 500 layers, and the kernel backend
/// refuses, at create and at get, a chain whose options do not fit mount(2)'s one page.
#[test]
fn deep_chains_on_both_backends() {
    let t = tempfile::tempdir().unwrap();
    let mut s = store(t.path(), Backend::Stratafs);
    s.set_max_depth(500).unwrap();
    let mut tb = TarBuf::new();
    tb.dir("d/", 0o755).file("d/bottom", 0o644, b"bottom\n");
    s.create_from_tar("l0", None, &tb.done()[..], None).unwrap();
    for i in 1..500 {
        // Every layer holds a file, so every one takes part in the root's lookups.
        let mut tb = TarBuf::new();
        tb.file(&format!("f{i}"), 0o644, i.to_string().as_bytes());
        s.create_from_tar(
            &format!("l{i}"),
            Some(&format!("l{}", i - 1)),
            &tb.done()[..],
            None,
        )
        .unwrap();
    }
    s.create("c128", Some("l126"), true).unwrap();
    let check = |m: &Path, depth: usize, what: &str| {
        assert_eq!(fs::read(m.join("d/bottom")).unwrap(), b"bottom\n", "{what}");
        let mid = depth / 2;
        assert_eq!(
            fs::read_to_string(m.join(format!("f{mid}"))).unwrap(),
            mid.to_string(),
            "{what}"
        );
        assert_eq!(fs::read_dir(m).unwrap().count(), depth, "{what}");
    };
    for backend in BACKENDS {
        let mut s = s.clone();
        s.backend = backend;
        let ro = Got::new(&s, "l127");
        check(&ro.path, 128, &format!("{backend:?} 128 read-only"));
        let rw = Got::new(&s, "c128");
        check(
            &rw.path,
            127,
            &format!("{backend:?} 128 with a container layer"),
        );
        fs::write(rw.path.join("d/new"), b"new").unwrap();
        drop(rw);
        assert_eq!(fs::read(s.root().join("c128/diff/d/new")).unwrap(), b"new");
        fs::remove_file(s.root().join("c128/diff/d/new")).unwrap();
    }
    // 500 layers on stratafs.
    {
        let g = Got::new(&s, "l499");
        check(&g.path, 500, "stratafs 500");
        assert_eq!(fs::read_to_string(g.path.join("f1")).unwrap(), "1");
    }
    // The kernel: the deepest chain whose options fit is created and mounts; one more layer is
    // refused at create, and a deeper chain (made with the stratafs backend) at get, with a
    // clear error and nothing mounted or left behind.
    let mut k = s.clone();
    k.backend = Backend::Kernel;
    let mut deepest = 0;
    for depth in 129..=500 {
        match k.create(
            &format!("k{depth}"),
            Some(&format!("l{}", depth - 2)),
            false,
        ) {
            Ok(()) => deepest = depth,
            Err(e) => {
                assert!(
                    matches!(e, Error::KernelOptionsTooLong { layers, max: 4095, .. } if layers == depth),
                    "{e:?}"
                );
                assert!(e.to_string().contains("use the stratafs backend"), "{e}");
                break;
            }
        }
    }
    // 29 bytes per `l/<LID>:`, plus `lowerdir=` and `,index=off,ro`.
    assert_eq!(deepest, (4095 - 21) / 29, "deepest kernel chain");
    assert!(!k.exists(&format!("k{}", deepest + 1)));
    assert_eq!(fs::read_dir(s.root().join(".tmp")).unwrap().count(), 0);
    {
        let g = Got::new(&k, &format!("k{deepest}"));
        // k<depth> holds no file of its own.
        check(&g.path, deepest - 1, "kernel, deepest");
    }
    for id in [format!("l{deepest}"), "l499".to_string()] {
        let err = k.get(&id).unwrap_err();
        assert!(matches!(err, Error::KernelOptionsTooLong { .. }), "{err:?}");
        assert!(
            !s.root().join(&id).join("merged").exists(),
            "{id}: merged left"
        );
        assert_eq!(k.meta(&id).unwrap().mounts, 0);
    }
    // The same through the command line.
    let out = Command::new(BIN)
        .args([
            "layers",
            "--backend",
            "kernel",
            "--max-depth",
            "500",
            "--root",
        ])
        .arg(s.root())
        .args(["get", "l499"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("kernel overlayfs cannot mount 500 layers") && err.len() < 1000,
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["layers", "--max-depth", "500", "--root"])
        .arg(s.root())
        .args(["get", "l499"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let read = fs::read(m.join("d/bottom"));
    let put = s.put("l499");
    assert_eq!(read.unwrap(), b"bottom\n");
    assert_eq!(put.unwrap(), 0);
    assert!(!stratafs::storage::layers::store::is_mountpoint(&m));
}

/// Mounts on both backends: refcounts, what the merged view shows, changes, diff round trip.
#[test]
fn mounts_changes_and_diff_round_trip_on_both_backends() {
    for backend in BACKENDS {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path(), backend);
        s.create_from_tar("base", None, &base_tar()[..], None)
            .unwrap();
        s.create_from_tar("top", Some("base"), &top_tar()[..], None)
            .unwrap();
        s.create("ctr", Some("top"), true).unwrap();
        {
            let ro = Got::new(&s, "top");
            let m = &ro.path;
            assert_eq!(
                fs::read(m.join("etc/hello")).unwrap(),
                b"hello again\n",
                "{backend:?}"
            );
            assert!(!m.join("etc/gone").exists(), "{backend:?}: whiteout");
            assert!(!m.join("opq/old").exists(), "{backend:?}: opaque");
            assert!(m.join("opq/new").exists());
            assert_eq!(fs::read(m.join("etc/sub/deep")).unwrap(), b"deep\n");
            assert!(
                fs::write(m.join("x"), b"x").is_err(),
                "{backend:?}: read-only layer"
            );
        }

        {
            let g1 = Got::new(&s, "ctr");
            let g2 = Got::new(&s, "ctr");
            assert_eq!(g1.path, g2.path);
            assert_eq!(s.meta("ctr").unwrap().mounts, 2);
            let m = &g1.path;
            fs::write(m.join("etc/hello"), b"changed\n").unwrap();
            fs::remove_file(m.join("added")).unwrap();
            fs::create_dir(m.join("newdir")).unwrap();
            fs::write(m.join("newdir/f"), b"f").unwrap();
            fs::remove_dir_all(m.join("opq")).unwrap();
            fs::create_dir(m.join("opq")).unwrap();
            fs::write(m.join("opq/again"), b"again").unwrap();
            fs::set_permissions(m.join("bin"), fs::Permissions::from_mode(0o750)).unwrap();
            // mv: an O(1) redirect on stratafs, a copy where the kernel says EXDEV.
            sh(Command::new("mv")
                .arg(m.join("etc/sub"))
                .arg(m.join("etc/moved")));
            drop(g2);
            assert!(stratafs::storage::layers::store::is_mountpoint(m));
        }
        assert!(
            !s.root().join("ctr/merged").exists(),
            "{backend:?}: unmounted at zero"
        );
        // What the layer holds, from a fresh mount (a live stratafs view can differ for hard
        // links below: see docs/layers.md, "Known problems").
        let merged_before = tree(&Got::new(&s, "ctr").path);
        assert!(merged_before["bin"].contains("mode=750"));
        assert!(
            merged_before["etc/moved/deep"].contains("file"),
            "{backend:?}: renamed dir kept its content"
        );
        assert!(matches!(s.put("ctr"), Err(Error::NotMounted(_))));
        let ch: Vec<String> = s
            .changes("ctr")
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c.kind.letter(), c.path.display()))
            .collect();
        for want in [
            "C /etc/hello",
            "A /newdir",
            "A /newdir/f",
            "C /opq",
            "A /opq/again",
            "D /etc/sub",
            "A /etc/moved",
            "C /bin",
            "D /added",
        ] {
            assert!(
                ch.contains(&want.to_string()),
                "{backend:?}: {want} missing in {ch:?}"
            );
        }
        assert!(s.diff_size("ctr").unwrap() > 0);

        // Export, re-apply on the same parent: the same tree.
        let (tarbytes, stats) = s.diff("ctr", Vec::new()).unwrap();
        assert_eq!(stats.diff_id, digest::sha256_str(&tarbytes));
        s.create_from_tar("again", Some("top"), &tarbytes[..], Some(&stats.diff_id))
            .unwrap();
        let g = Got::new(&s, "again");
        assert_eq!(
            tree(&g.path),
            merged_before,
            "{backend:?}: re-applied diff differs"
        );
        drop(g);
        // Opaque marker ordering: right after its directory.
        let names: Vec<String> = tar::Archive::new(&tarbytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        let opq = names.iter().position(|n| n == "opq/.wh..wh..opq").unwrap();
        assert_eq!(names[opq - 1], "opq/");
        s.remove("again").unwrap();
        s.remove("ctr").unwrap();
    }
}

/// An image with two layers written with the tar crate in three shapes.
fn fixture_layers() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let config = |ids: &[String]| {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": { "Cmd": ["/bin/sh"] },
            "rootfs": { "type": "layers", "diff_ids": ids },
        }))
        .unwrap()
    };
    let (l0, l1) = (base_tar(), top_tar());
    let ids = vec![digest::sha256_str(&l0), digest::sha256_str(&l1)];
    let cfg = config(&ids);
    let cfg_d = digest::sha256_str(&cfg);
    let hex = |d: &str| d["sha256:".len()..].to_string();
    let add = |b: &mut tar::Builder<Vec<u8>>, p: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    };
    // docker save, old shape: <id>/layer.tar
    let mut old = tar::Builder::new(Vec::new());
    add(&mut old, &format!("{}.json", hex(&cfg_d)), &cfg);
    add(&mut old, "aaaa/layer.tar", &l0);
    add(&mut old, "bbbb/layer.tar", &l1);
    let man = serde_json::json!([{ "Config": format!("{}.json", hex(&cfg_d)),
        "RepoTags": ["fixture/old:1"], "Layers": ["aaaa/layer.tar", "bbbb/layer.tar"] }]);
    add(
        &mut old,
        "manifest.json",
        &serde_json::to_vec(&man).unwrap(),
    );
    // OCI layout, second layer gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&l1).unwrap();
    let l1gz = gz.finish().unwrap();
    let l1gz_d = digest::sha256_str(&l1gz);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": cfg.len() },
        "layers": [
            { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ids[0], "size": l0.len() },
            { "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1gz_d, "size": l1gz.len() }
        ] }))
    .unwrap();
    let man_d = digest::sha256_str(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": [
        { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d, "size": manifest.len(),
          "annotations": { "org.opencontainers.image.ref.name": "fixture/oci:2" } } ] }))
    .unwrap();
    let mut oci = tar::Builder::new(Vec::new());
    add(&mut oci, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add(&mut oci, "index.json", &index);
    for (d, data) in [
        (&cfg_d, &cfg),
        (&man_d, &manifest),
        (&ids[0], &l0),
        (&l1gz_d, &l1gz),
    ] {
        add(&mut oci, &format!("blobs/sha256/{}", hex(d)), data);
    }
    // The same OCI layout with a corrupted layer blob.
    let mut bad = tar::Builder::new(Vec::new());
    add(&mut bad, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add(&mut bad, "index.json", &index);
    let mut l0bad = l0.clone();
    l0bad[1024] ^= 1; // data of etc/hello: a valid tar, another DiffID
    for (d, data) in [
        (&cfg_d, &cfg),
        (&man_d, &manifest),
        (&ids[0], &l0bad),
        (&l1gz_d, &l1gz),
    ] {
        add(&mut bad, &format!("blobs/sha256/{}", hex(d)), data);
    }
    (
        old.into_inner().unwrap(),
        oci.into_inner().unwrap(),
        bad.into_inner().unwrap(),
    )
}

/// How a layer blob of [`image_archive`] is spoiled.
#[derive(Clone, Copy, PartialEq)]
enum Spoil {
    None,
    /// One data byte of its first entry (a file) flipped: still a valid tar, another DiffID.
    Data,
    /// Gzipped with another header mtime: the same tar and DiffID, another blob digest (only
    /// found after the layer is applied).
    GzipHeader,
}

/// An image archive of `layers` (plain tars, bottom first): an OCI layout tar (the last layer
/// gzip-compressed) or, with `docker`, a `docker save` tar of the old `<id>/layer.tar` shape.
/// `spoil` changes the last layer blob only.
fn image_archive(layers: &[Vec<u8>], name: &str, docker: bool, spoil: Spoil) -> Vec<u8> {
    let ids: Vec<String> = layers.iter().map(|l| digest::sha256_str(l)).collect();
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": ids },
    }))
    .unwrap();
    let cfg_d = digest::sha256_str(&cfg);
    let hex = |d: &str| d["sha256:".len()..].to_string();
    let add = |b: &mut tar::Builder<Vec<u8>>, p: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    };
    let last = layers.len() - 1;
    let mut b = tar::Builder::new(Vec::new());
    if docker {
        add(&mut b, &format!("{}.json", hex(&cfg_d)), &cfg);
        let mut paths = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let mut l = l.clone();
            if i == last && spoil == Spoil::Data {
                l[512] ^= 1;
            }
            let p = format!("{i:04}/layer.tar");
            add(&mut b, &p, &l);
            paths.push(p);
        }
        let man = serde_json::json!([{ "Config": format!("{}.json", hex(&cfg_d)),
            "RepoTags": [name], "Layers": paths }]);
        add(&mut b, "manifest.json", &serde_json::to_vec(&man).unwrap());
        return b.into_inner().unwrap();
    }
    let mut descs = Vec::new();
    let mut blobs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (blob, mt) = if i == last {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(l).unwrap();
            let gz = gz.finish().unwrap();
            (gz, "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (l.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        let d = digest::sha256_str(&blob);
        descs.push(serde_json::json!({ "mediaType": mt, "digest": d, "size": blob.len() }));
        let mut stored = blob;
        if i == last {
            match spoil {
                Spoil::None => {}
                Spoil::Data => {
                    // Re-compress a tar with one data byte flipped.
                    let mut l = l.clone();
                    l[512] ^= 1;
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&l).unwrap();
                    stored = gz.finish().unwrap();
                }
                Spoil::GzipHeader => stored[4] ^= 1, // MTIME: the same content
            }
        }
        blobs.push((d, stored));
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": cfg.len() },
        "layers": descs }))
    .unwrap();
    let man_d = digest::sha256_str(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": [
        { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d, "size": manifest.len(),
          "annotations": { "org.opencontainers.image.ref.name": name } } ] }))
    .unwrap();
    add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add(&mut b, "index.json", &index);
    add(&mut b, &format!("blobs/sha256/{}", hex(&cfg_d)), &cfg);
    add(&mut b, &format!("blobs/sha256/{}", hex(&man_d)), &manifest);
    for (d, data) in &blobs {
        add(&mut b, &format!("blobs/sha256/{}", hex(d)), data);
    }
    b.into_inner().unwrap()
}

fn third_tar() -> Vec<u8> {
    let mut t = TarBuf::new();
    t.file("third", 0o644, b"third layer\n")
        .file(".wh.added", 0o644, b"")
        .dir("etc/", 0o755)
        .file("etc/hello", 0o644, b"hello three\n");
    t.done()
}

/// A failed import removes every layer it created (the last layer spoiled, so the ones below
/// were already in) and keeps the layers that were there before, shared with another image.
#[test]
fn failed_import_leaves_no_orphan_layers() {
    let t = tempfile::tempdir().unwrap();
    let images = ImageStore::new(store(t.path(), Backend::Stratafs)).unwrap();
    let layers = [base_tar(), top_tar(), third_tar()];
    let shared = t.path().join("shared.tar");
    fs::write(
        &shared,
        image_archive(&layers[..1], "fixture/shared:1", false, Spoil::None),
    )
    .unwrap();
    let base = images.import(&shared, None, &mut Quiet).unwrap();
    let before = images.layers.list().unwrap();
    assert_eq!(before, base.layer_ids());
    let base_diff = tree(&images.layers.root().join(&before[0]).join("diff"));
    for (what, docker, spoil) in [
        ("oci, data of the last layer", false, Spoil::Data),
        (
            "oci, gzip header of the last layer",
            false,
            Spoil::GzipHeader,
        ),
        ("docker save, data of the last layer", true, Spoil::Data),
    ] {
        let bad = t.path().join("bad.tar");
        fs::write(&bad, image_archive(&layers, "fixture/bad:1", docker, spoil)).unwrap();
        let err = images.import(&bad, None, &mut Quiet).unwrap_err();
        assert!(matches!(err, Error::Digest { .. }), "{what}: {err}");
        assert_eq!(
            images.layers.list().unwrap(),
            before,
            "{what}: layers the failed import made are left"
        );
        assert_eq!(
            tree(&images.layers.root().join(&before[0]).join("diff")),
            base_diff,
            "{what}: the shared layer changed"
        );
        assert_eq!(images.list().unwrap(), vec![base.clone()], "{what}");
        assert!(matches!(
            images.find("fixture/bad:1"),
            Err(Error::ImageNotFound(_))
        ));
        assert_eq!(
            fs::read_dir(images.layers.root().join(".tmp"))
                .unwrap()
                .count(),
            0,
            "{what}: scratch left"
        );
        assert_eq!(
            fs::read_dir(images.layers.root().join("l"))
                .unwrap()
                .count(),
            1,
            "{what}: short links left"
        );
    }
    // The same archives unspoiled import, onto the shared layer.
    for docker in [false, true] {
        let good = t.path().join("good.tar");
        fs::write(
            &good,
            image_archive(&layers, "fixture/good:1", docker, Spoil::None),
        )
        .unwrap();
        let rec = images.import(&good, None, &mut Quiet).unwrap();
        assert_eq!(rec.layer_ids()[0], before[0]);
        assert_eq!(images.layers.list().unwrap().len(), 3);
    }
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let _g = ImageMount::new(&images, "fixture/good:1", &mnt, true);
    assert_eq!(fs::read(mnt.join("etc/hello")).unwrap(), b"hello three\n");
    assert_eq!(fs::read(mnt.join("third")).unwrap(), b"third layer\n");
    assert!(!mnt.join("added").exists() && !mnt.join("etc/gone").exists());
}

#[test]
fn images_import_share_mount_commit_export_rm() {
    let t = tempfile::tempdir().unwrap();
    let (old, oci, bad) = fixture_layers();
    for (n, b) in [("old.tar", &old), ("oci.tar", &oci), ("bad.tar", &bad)] {
        fs::write(t.path().join(n), b).unwrap();
    }
    for backend in BACKENDS {
        let root = t.path().join(format!("{backend:?}"));
        let images = ImageStore::new(store(&root, backend)).unwrap();
        let err = images
            .import(&t.path().join("bad.tar"), None, &mut Quiet)
            .unwrap_err();
        assert!(matches!(err, Error::Digest { .. }), "{err}");
        assert!(
            images.layers.list().unwrap().is_empty(),
            "nothing kept from a bad import"
        );
        let a = images
            .import(&t.path().join("old.tar"), None, &mut Quiet)
            .unwrap();
        let b = images
            .import(&t.path().join("oci.tar"), None, &mut Quiet)
            .unwrap();
        assert_eq!(a.id, b.id, "same config");
        assert_eq!(images.layers.list().unwrap().len(), 2, "layers stored once");
        let rec = images.find("fixture/oci:2").unwrap();
        assert!(rec.names.contains(&"fixture/old:1".to_string()));
        assert_eq!(rec.chain_ids, digest::chain_ids(&rec.diff_ids));

        let mnt = t.path().join(format!("mnt-{backend:?}"));
        fs::create_dir(&mnt).unwrap();
        let committed;
        {
            let _g = ImageMount::new(&images, "fixture/old:1", &mnt, false);
            assert_eq!(fs::read(mnt.join("etc/hello")).unwrap(), b"hello again\n");
            assert!(!mnt.join("etc/gone").exists());
            fs::write(mnt.join("etc/motd"), b"committed\n").unwrap();
            fs::remove_file(mnt.join("bin/tool2")).unwrap();
            committed = images.commit(&mnt, "fixture/committed").unwrap();
        }
        assert!(!stratafs::storage::layers::store::is_mountpoint(&mnt));
        assert_eq!(committed.diff_ids.len(), 3);
        assert_eq!(committed.diff_ids[..2], rec.diff_ids[..]);
        {
            let _g = ImageMount::new(&images, "fixture/committed:latest", &mnt, true);
            assert_eq!(fs::read(mnt.join("etc/motd")).unwrap(), b"committed\n");
            assert!(!mnt.join("bin/tool2").exists());
            assert!(fs::write(mnt.join("x"), b"x").is_err(), "--readonly");
        }
        // Export and re-import into a fresh store: the same rootfs.
        let exported = t.path().join(format!("export-{backend:?}.tar"));
        images.export("fixture/committed", &exported).unwrap();
        let images2 =
            ImageStore::new(store(&t.path().join(format!("{backend:?}-2")), backend)).unwrap();
        let back = images2.import(&exported, None, &mut Quiet).unwrap();
        assert_eq!(back.names, vec!["fixture/committed:latest".to_string()]);
        let mnt2 = t.path().join(format!("mnt2-{backend:?}"));
        fs::create_dir(&mnt2).unwrap();
        {
            let _g = ImageMount::new(&images, "fixture/committed", &mnt, true);
            let _g2 = ImageMount::new(&images2, "fixture/committed", &mnt2, true);
            assert_eq!(
                tree(&mnt),
                tree(&mnt2),
                "{backend:?}: export/import changed the tree"
            );
        }
        // rm keeps shared layers.
        images.remove("fixture/old:1").unwrap();
        assert_eq!(
            images.layers.list().unwrap().len(),
            3,
            "committed image still uses them"
        );
        images.remove("fixture/committed").unwrap();
        assert!(images.layers.list().unwrap().is_empty());
        assert!(matches!(
            images.find("fixture/committed"),
            Err(Error::ImageNotFound(_))
        ));
    }
}

/// An OCI image layout as a directory (the fixture's OCI tar unpacked by tar(1)) imports to
/// the same image and rootfs as the tar.
#[test]
fn oci_layout_directory_imports_like_the_tar() {
    let t = tempfile::tempdir().unwrap();
    let (_, oci, bad) = fixture_layers();
    let (tar_path, dir, bad_dir) = (
        t.path().join("oci.tar"),
        t.path().join("oci-dir"),
        t.path().join("bad-dir"),
    );
    fs::write(&tar_path, &oci).unwrap();
    fs::write(t.path().join("bad.tar"), &bad).unwrap();
    for (d, from) in [(&dir, &tar_path), (&bad_dir, &t.path().join("bad.tar"))] {
        fs::create_dir(d).unwrap();
        sh(Command::new("tar").arg("-C").arg(d).arg("-xf").arg(from));
    }
    assert!(dir.join("index.json").is_file() && dir.join("blobs/sha256").is_dir());
    for backend in BACKENDS {
        let from_dir =
            ImageStore::new(store(&t.path().join(format!("d-{backend:?}")), backend)).unwrap();
        let from_tar =
            ImageStore::new(store(&t.path().join(format!("t-{backend:?}")), backend)).unwrap();
        // Digests are verified from a directory too, and nothing is kept.
        let err = from_dir.import(&bad_dir, None, &mut Quiet).unwrap_err();
        assert!(matches!(err, Error::Digest { .. }), "{err}");
        assert!(from_dir.layers.list().unwrap().is_empty());
        let a = from_dir.import(&dir, None, &mut Quiet).unwrap();
        let b = from_tar.import(&tar_path, None, &mut Quiet).unwrap();
        assert_eq!(a, b, "{backend:?}: the same record");
        assert_eq!(a.names, vec!["fixture/oci:2".to_string()]);
        assert_eq!(from_dir.layers.list().unwrap(), a.layer_ids());
        let (m1, m2) = (
            t.path().join(format!("m1-{backend:?}")),
            t.path().join(format!("m2-{backend:?}")),
        );
        fs::create_dir(&m1).unwrap();
        fs::create_dir(&m2).unwrap();
        let _g1 = ImageMount::new(&from_dir, "fixture/oci:2", &m1, true);
        let _g2 = ImageMount::new(&from_tar, "fixture/oci:2", &m2, true);
        let got = tree(&m1);
        assert_eq!(got, tree(&m2), "{backend:?}");
        assert!(
            got["etc/hello"].contains("mode=640"),
            "{backend:?}: top layer"
        );
        assert!(!got.contains_key("etc/gone") && !got.contains_key("opq/old"));
    }
}

fn podman() -> Option<PathBuf> {
    let ok = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| PathBuf::from("podman"))
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// podman with private storage and configuration under `dir` (the kernel's overlay driver,
/// runc, cgroupfs, no network: the configuration scripts/podman-test uses), so nothing in
/// /etc/containers or /var/lib/containers is touched. Dropping it resets that storage and
/// unmounts whatever is left under `dir`.
struct Podman {
    bin: PathBuf,
    dir: PathBuf,
}

impl Podman {
    fn new(bin: PathBuf, dir: &Path) -> Podman {
        fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\"\n"
            ),
        )
        .unwrap();
        fs::write(
            dir.join("containers.conf"),
            format!(
                r#"[containers]
netns = "none"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{d}/tmp"
static_dir = "{d}/graph/libpod"
volume_path = "{d}/graph/volumes"

[network]
network_config_dir = "{d}/net"
"#
            ),
        )
        .unwrap();
        fs::write(
            dir.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();
        Podman {
            bin,
            dir: dir.to_path_buf(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            );
        c
    }

    fn run(&self, args: &[&OsStr]) -> String {
        sh(self.cmd().args(args))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["image", "unmount", "-a"]).output();
        let _ = self.cmd().args(["system", "reset", "-f"]).output();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Names of the entries of every layer tar inside an image archive (docker-archive or
/// oci-archive; gzip layers are unpacked).
fn layer_entries(archive: &Path) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(File::open(archive).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if data.starts_with(&[0x1f, 0x8b]) {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&data[..])
                .read_to_end(&mut plain)
                .unwrap();
            data = plain;
        }
        if data.len() < 512 || &data[257..262] != b"ustar" {
            continue; // a config, manifest or index
        }
        out.push(
            tar::Archive::new(&data[..])
                .entries()
                .unwrap()
                .map(|e| {
                    let n = e.unwrap().path().unwrap().display().to_string();
                    n.trim_start_matches("./").to_string()
                })
                .collect(),
        );
    }
    out
}

/// Archives podman wrote (docker-archive, oci-archive and oci-dir) import to the rootfs
/// podman mounts: of an imported rootfs, and of an image `podman build` made from it with
/// files created and removed in separate steps, a file and a directory of the base removed
/// and a directory replaced (layers with `.wh.` and `.wh..wh..opq` entries).
#[test]
fn podman_archives_match_podman_rootfs() {
    let Some(podman) = podman() else {
        println!("NOTE: podman is not available; skipping the comparison with podman's rootfs");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let p = Podman::new(podman, &t.path().join("podman"));
    let rootfs = t.path().join("rootfs");
    apply_ok(&rootfs, &base_tar());
    fs::write(rootfs.join("etc/extra"), b"x".repeat(100_000)).unwrap();
    // A shell for the RUN steps (busybox-static, as scripts/podman-test uses).
    let busybox = Path::new("/bin/busybox");
    let build = busybox.exists();
    if build {
        fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    } else {
        println!("NOTE: no /bin/busybox; skipping the podman build part");
    }
    let rt = t.path().join("rootfs.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("--numeric-owner")
        .arg("-cf")
        .arg(&rt)
        .arg("."));
    let tag = "localhost/stratafs-test:1";
    let built = "localhost/stratafs-test-built:1";
    p.run(&["import".as_ref(), rt.as_os_str(), tag.as_ref()]);
    let mut tags = vec![tag];
    if build {
        let ctx = t.path().join("ctx");
        fs::create_dir(&ctx).unwrap();
        fs::write(
            ctx.join("Containerfile"),
            format!(
                "FROM {tag}\n\
                 RUN echo x > /file\n\
                 RUN rm /file\n\
                 RUN mkdir /d\n\
                 RUN rm /etc/gone && rm -r /etc/sub\n\
                 RUN rm -r /opq && mkdir /opq && echo n > /opq/n\n"
            ),
        )
        .unwrap();
        p.run(&[
            "build".as_ref(),
            "--network".as_ref(),
            "none".as_ref(),
            "-t".as_ref(),
            built.as_ref(),
            "-f".as_ref(),
            ctx.join("Containerfile").as_os_str(),
            ctx.as_os_str(),
        ]);
        tags.push(built);
    }
    for tag in tags {
        let safe = tag.replace(['/', ':'], "_");
        let dock = t.path().join(format!("{safe}-docker.tar"));
        let oci = t.path().join(format!("{safe}-oci.tar"));
        let ocidir = t.path().join(format!("{safe}-oci-dir"));
        for (format, out) in [
            ("docker-archive", &dock),
            ("oci-archive", &oci),
            ("oci-dir", &ocidir),
        ] {
            p.run(&[
                "save".as_ref(),
                "--format".as_ref(),
                format.as_ref(),
                "-o".as_ref(),
                out.as_os_str(),
                tag.as_ref(),
            ]);
        }
        assert!(ocidir.join("index.json").is_file());
        if tag == built {
            for archive in [&dock, &oci] {
                let layers = layer_entries(archive);
                assert_eq!(layers.len(), 6, "{}: {layers:?}", archive.display());
                for want in [
                    ".wh.file",
                    "etc/.wh.gone",
                    "etc/.wh.sub",
                    "opq/.wh..wh..opq",
                ] {
                    assert!(
                        layers.iter().any(|l| l.iter().any(|n| n == want)),
                        "{}: no {want} in any layer: {layers:?}",
                        archive.display()
                    );
                }
            }
        }
        let pmnt = PathBuf::from(
            p.run(&["image".as_ref(), "mount".as_ref(), tag.as_ref()])
                .trim(),
        );
        let want = tree(&pmnt);
        p.run(&["image".as_ref(), "unmount".as_ref(), tag.as_ref()]);
        assert!(want.contains_key("etc/extra"));
        if tag == built {
            for gone in ["file", "etc/gone", "etc/sub", "etc/sub/deep", "opq/old"] {
                assert!(!want.contains_key(gone), "podman's rootfs has {gone}");
            }
            assert!(want["d"].starts_with("dir") && want["opq/n"].starts_with("file"));
        }
        for backend in BACKENDS {
            let images =
                ImageStore::new(store(&t.path().join(format!("{backend:?}")), backend)).unwrap();
            for archive in [&dock, &oci, &ocidir] {
                let rec = images.import(archive, None, &mut Quiet).unwrap();
                assert!(
                    rec.names.iter().any(|n| n.ends_with(tag)),
                    "{:?}",
                    rec.names
                );
                let mnt = t.path().join("mnt");
                fs::create_dir_all(&mnt).unwrap();
                images.mount(&rec.id, &mnt, true).unwrap();
                let _g = ImageMount {
                    images: &images,
                    mnt: mnt.clone(),
                };
                let got = tree(&mnt);
                assert_eq!(got, want, "{backend:?} {}", archive.display());
            }
        }
    }
    drop(p);
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// `stratafs image --root ROOT ARGS...`, which must succeed; its stdout.
fn image_cli(root: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("image")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command line, end to end.
#[test]
fn cli_layers_and_image() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let run = |args: &[&str]| -> (bool, String) {
        let out = Command::new(BIN)
            .arg("layers")
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    fs::write(t.path().join("base.tar"), base_tar()).unwrap();
    let base = t.path().join("base.tar").display().to_string();
    assert!(run(&["create", "base"]).0);
    let (ok, size) = run(&["apply-diff", "base", &base]);
    assert!(ok);
    assert!(size.trim().parse::<u64>().unwrap() > 0);
    assert!(run(&["create-rw", "c", "base"]).0);
    assert!(run(&["exists", "c"]).0);
    assert!(!run(&["exists", "nope"]).0);
    let (ok, m) = run(&["get", "c"]);
    assert!(ok);
    let m = PathBuf::from(m.trim());
    let res = std::panic::catch_unwind(|| {
        fs::write(m.join("etc/cli"), b"cli").unwrap();
        let (_, changes) = run(&["changes", "c"]);
        assert!(changes.contains("A /etc/cli"), "{changes}");
        let (_, md) = run(&["metadata", "c"]);
        let v: serde_json::Value = serde_json::from_str(&md).unwrap();
        assert!(v["LowerDir"].as_str().unwrap().ends_with("/base/diff"));
    });
    assert!(run(&["put", "c"]).0);
    res.unwrap();
    let (ok, status) = run(&["status"]);
    assert!(ok && status.contains("Layers: 2"), "{status}");
    let mut child = Command::new(BIN)
        .args(["layers", "--root"])
        .arg(&root)
        .args(["diff", "c", "-"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut tarbytes = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut tarbytes)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let names: Vec<String> = tar::Archive::new(&tarbytes[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, vec!["etc/", "etc/cli"]);
    // image commands
    let (old, _, _) = fixture_layers();
    fs::write(t.path().join("old.tar"), old).unwrap();
    let img = |args: &[&str]| image_cli(&root, args);
    img(&["import", &t.path().join("old.tar").display().to_string()]);
    assert!(img(&["ls"]).contains("fixture/old:1"));
    assert!(img(&["inspect", "fixture/old:1"]).contains("diff_ids"));
    img(&["rm", "fixture/old:1"]);
    assert!(!img(&["ls"]).contains("fixture/old:1"));

    // A read-only layer with a parent, diff-size, both backends, remove, cleanup.
    assert!(run(&["create", "mid", "base"]).0);
    assert_eq!(run(&["diff-size", "base"]).1.trim(), size.trim());
    assert_eq!(run(&["diff-size", "mid"]), (true, "0\n".to_string()));
    for (backend, fstype) in [("stratafs", "fuse.stratafs"), ("kernel", "overlay")] {
        let (ok, m) = run(&["--backend", backend, "get", "mid"]);
        assert!(ok, "get with {backend}");
        let m = PathBuf::from(m.trim());
        let res = std::panic::catch_unwind(|| {
            assert_eq!(fstype_of(&m).as_deref(), Some(fstype), "{backend}");
            assert_eq!(fs::read(m.join("etc/hello")).unwrap(), b"hello\n");
            assert!(
                fs::write(m.join("x"), b"x").is_err(),
                "{backend}: read-only"
            );
        });
        assert!(run(&["--backend", backend, "put", "mid"]).0);
        res.unwrap();
        assert!(!stratafs::storage::layers::store::is_mountpoint(&m));
    }
    assert!(!run(&["remove", "base"]).0, "base is a parent");
    assert!(run(&["remove", "mid"]).0);
    assert!(!run(&["exists", "mid"]).0);
    assert!(run(&["exists", "base"]).0);
    let scratch = root.join(".tmp/new-x-1");
    fs::create_dir_all(scratch.join("diff")).unwrap();
    let (ok, out) = run(&["cleanup"]);
    assert!(ok);
    assert!(
        out.contains(&format!("removed {}", scratch.display())),
        "{out}"
    );
    assert!(!scratch.exists());
    assert_eq!(run(&["cleanup"]), (true, String::new()), "nothing left");

    // image mount, commit, umount, export; the export imported elsewhere and mounted with
    // the kernel backend.

    img(&["import", &t.path().join("old.tar").display().to_string()]);
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mnt.display().to_string();
    let _unmount = scopeguard(|| {
        if stratafs::storage::layers::store::is_mountpoint(&mnt) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
    });
    img(&["mount", "fixture/old:1", &m]);
    assert_eq!(fstype_of(&mnt).as_deref(), Some("fuse.stratafs"));
    fs::write(mnt.join("etc/cli"), b"committed by the cli\n").unwrap();
    fs::remove_file(mnt.join("etc/hello")).unwrap();
    let id = img(&["commit", &m, "fixture/cli:1"]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    img(&["umount", &m]);
    assert!(!stratafs::storage::layers::store::is_mountpoint(&mnt));
    assert!(img(&["ls"]).contains("fixture/cli:1"));
    let exported = t.path().join("cli.tar");
    img(&["export", "fixture/cli:1", &exported.display().to_string()]);
    let root2 = t.path().join("root2");
    image_cli(&root2, &["import", &exported.display().to_string()]);
    image_cli(
        &root2,
        &[
            "--backend",
            "kernel",
            "mount",
            "--readonly",
            "fixture/cli:1",
            &m,
        ],
    );
    let res = std::panic::catch_unwind(|| {
        assert_eq!(fstype_of(&mnt).as_deref(), Some("overlay"));
        assert_eq!(
            fs::read(mnt.join("etc/cli")).unwrap(),
            b"committed by the cli\n"
        );
        assert!(!mnt.join("etc/hello").exists());
        assert!(!mnt.join("etc/gone").exists());
        assert!(fs::write(mnt.join("x"), b"x").is_err(), "--readonly");
    });
    image_cli(&root2, &["umount", &m]);
    res.unwrap();
    assert!(!stratafs::storage::layers::store::is_mountpoint(&mnt));
}

/// The filesystem type mounted at `path`, from /proc/self/mountinfo.
fn fstype_of(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.display().to_string();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|r| r.split(' ').next())
        .map(str::to_owned)
}

/// An unmounted tmpfs of `size` at a fresh directory; unmounted on drop, also on panic.
struct Tmpfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("stratafs-layers-tmpfs-")
            .tempdir()
            .unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {mnt:?}");
        Tmpfs { mnt, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// `n` files of `size` bytes (distinct content) under `dir/`, plus a small file.
fn sized_tar(dir: &str, n: usize, size: usize) -> Vec<u8> {
    let mut t = TarBuf::new();
    t.dir(&format!("{dir}/"), 0o755);
    for i in 0..n {
        let mut data = vec![(i % 251) as u8; size];
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        t.file(&format!("{dir}/f{i}"), 0o644, &data);
    }
    t.file(&format!("{dir}/small"), 0o600, b"small\n");
    t.done()
}

/// The scratch an interrupted or failed apply could leave in the store: `.tmp/` entries and,
/// in layer directories, `.diff-*` dirs, pending records and `write_atomic` temp files.
fn store_scratch(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(root.join(".tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.starts_with('.') || !p.is_dir() {
            continue;
        }
        for e in fs::read_dir(&p).unwrap() {
            let q = e.unwrap().path();
            if q.file_name().unwrap().as_encoded_bytes().starts_with(b".") {
                out.push(q);
            }
        }
    }
    out
}

/// A full disk during a layer apply: ENOSPC reaches the caller as ENOSPC (not as a corrupt
/// archive), no half layer is left, the other layers are intact, and once space is freed the
/// same tar applies.
#[test]
fn enospc_during_layer_apply() {
    let fs8 = Tmpfs::new("8m");
    let s = LayerStore::open(fs8.mnt.join("store")).unwrap();
    let root = s.root().to_path_buf();
    s.create("base", None, false).unwrap();
    s.apply_diff("base", &base_tar()[..]).unwrap();
    let base_tree = tree(&root.join("base/diff"));
    let base_meta = s.meta("base").unwrap();
    let links = fs::read_dir(root.join("l")).unwrap().count();
    // 6 MiB of data: fits the empty tmpfs, not with the 4 MiB filler next to the store.
    let tar = sized_tar("data", 6, 1 << 20);
    let reference = tempfile::tempdir().unwrap();
    apply_ok(&reference.path().join("ref"), &tar);
    let want = tree(&reference.path().join("ref"));
    let filler = fs8.mnt.join("filler");
    fs::write(&filler, vec![1u8; 4 << 20]).unwrap();
    let is_enospc = |e: &Error| match e {
        Error::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    };
    let intact = |what: &str| {
        assert_eq!(
            tree(&root.join("base/diff")),
            base_tree,
            "{what}: base changed"
        );
        assert_eq!(
            s.meta("base").unwrap(),
            base_meta,
            "{what}: base record changed"
        );
        assert_eq!(
            store_scratch(&root),
            Vec::<PathBuf>::new(),
            "{what}: scratch left"
        );
        assert_eq!(
            fs::read_dir(root.join("l")).unwrap().count(),
            links + usize::from(s.exists("big")),
            "{what}: short links"
        );
    };

    // apply-diff into an existing layer: the layer stays empty.
    s.create("big", Some("base"), false).unwrap();
    let err = s.apply_diff("big", &tar[..]).unwrap_err();
    assert!(is_enospc(&err), "apply-diff on a full disk: {err}");
    assert_eq!(fs::read_dir(root.join("big/diff")).unwrap().count(), 0);
    assert_eq!(s.meta("big").unwrap().diff_id, None);
    intact("apply-diff");

    // A layer made from the tar (what an image import does): no layer at all.
    let err = s
        .create_from_tar("big2", Some("base"), &tar[..], None)
        .unwrap_err();
    assert!(is_enospc(&err), "create from tar on a full disk: {err}");
    assert!(!s.exists("big2") && !root.join("big2").exists());
    intact("create from tar");

    // The command line says so.
    let tarfile = reference.path().join("big.tar");
    fs::write(&tarfile, &tar).unwrap();
    let out = Command::new(BIN)
        .args(["layers", "--root"])
        .arg(&root)
        .args(["apply-diff", "big"])
        .arg(&tarfile)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(!msg.contains("corrupt"), "{msg}");
    intact("the command line");

    // Space freed: the same tar applies, to exactly the reference tree.
    fs::remove_file(&filler).unwrap();
    let stats = s.apply_diff("big", &tar[..]).unwrap();
    assert_eq!(stats.diff_id, digest::sha256_str(&tar));
    assert_eq!(tree(&root.join("big/diff")), want);
    assert_eq!(s.meta("big").unwrap().diff_id, Some(stats.diff_id));
    intact("after freeing space");
    s.remove("big").unwrap();
    assert_eq!(s.list().unwrap(), vec!["base".to_string()]);
}

/// An `apply-diff` that died between renaming the content in and writing its record: cleanup
/// completes the record (content in place) or drops it (content still in scratch).
#[test]
fn cleanup_completes_or_drops_an_interrupted_apply_record() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path(), Backend::Stratafs);
    let root = s.root().to_path_buf();
    let tar = base_tar();
    let diff_id = digest::sha256_str(&tar);
    s.create("done", None, false).unwrap();
    s.create("undone", None, false).unwrap();
    // "done": content renamed in, record still pending.
    apply_ok(&root.join("done/diff"), &tar);
    let mut meta = s.meta("done").unwrap();
    meta.diff_id = Some(diff_id.clone());
    fs::write(
        root.join("done/.stratafs.json.pending-ABC"),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    // "undone": content still in its scratch dir, next to its pending record.
    apply_ok(&root.join("undone/.diff-XYZ"), &tar);
    fs::write(
        root.join("undone/.stratafs.json.pending-XYZ"),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    fs::write(root.join("undone/.stratafs.json.tmp-123"), b"{").unwrap();
    let rep = s.cleanup().unwrap();
    assert_eq!(rep.completed, vec!["done".to_string()]);
    assert_eq!(rep.scratch.len(), 4, "{:?}", rep.scratch);
    assert_eq!(s.meta("done").unwrap().diff_id, Some(diff_id));
    assert_eq!(s.meta("undone").unwrap().diff_id, None);
    assert_eq!(fs::read_dir(root.join("undone/diff")).unwrap().count(), 0);
    assert_eq!(store_scratch(&root), Vec::<PathBuf>::new());
    // The undone layer takes the tar now.
    s.apply_diff("undone", &tar[..]).unwrap();
    assert_eq!(
        tree(&root.join("undone/diff")),
        tree(&root.join("done/diff"))
    );
}

#[path = "common/crash.rs"]
mod crash_kit;

/// `kill -9` of `stratafs layers apply-diff` and `stratafs image import` at seeded points (the
/// approach of `tests/snapshots.rs`' `crash::*`): after each kill the store reopens, the
/// operation shows the old state or the new one, and `cleanup` leaves no scratch or orphan.
mod crash {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use super::crash_kit as kit;
    use kit::{Expect, Tally, kill_delay, report, run_and_kill, scratch_dir, seed, timed};

    /// Kill points per operation.
    const KILLS: usize = 10;
    /// Default seed (STRATAFS_SEED overrides).
    const SEED: u64 = 20261201;
    const EXPECT: Expect = Expect {
        kills: KILLS,
        leftovers: true,
        bound: Duration::from_secs(30),
    };

    /// Held by each crash test: they calibrate and kill on the same cores, so one at a time
    /// (across nextest's processes too).
    fn serial() -> File {
        let f = File::create(std::env::temp_dir().join("stratafs-layers-crash.lock")).unwrap();
        f.lock().unwrap();
        f
    }

    fn cli(kind: &str, root: &Path, args: &[&OsStr]) -> Command {
        let mut c = Command::new(BIN);
        c.arg(kind)
            .arg("--root")
            .arg(root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// A layer of `dirs` x `files` small files and a file of `big` bytes: an apply that takes
    /// a while.
    fn many_files_tar(tag: &str, dirs: usize, files: usize, big: usize) -> Vec<u8> {
        let mut t = TarBuf::new();
        for d in 0..dirs {
            t.dir(&format!("{tag}{d}/"), 0o755);
            for f in 0..files {
                t.file(
                    &format!("{tag}{d}/f{f}"),
                    0o644,
                    format!("{tag} {d}/{f}\n").as_bytes(),
                );
            }
        }
        t.file(&format!("{tag}-big"), 0o600, &vec![7u8; big]);
        t.done()
    }

    fn entries(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn kill_9_during_apply_diff() {
        let _serial = serial();
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed(SEED));
        let tmp = scratch_dir("stratafs-layercrash-");
        let s = LayerStore::open(tmp.path().join("store")).unwrap();
        let root = s.root().to_path_buf();
        // Another layer of the store, which no kill may touch.
        s.create("base", None, false).unwrap();
        s.apply_diff("base", &base_tar()[..]).unwrap();
        let base_tree = tree(&root.join("base/diff"));
        let base_meta = s.meta("base").unwrap();
        let tar = many_files_tar("d", 12, 300, 2 << 20);
        let diff_id = digest::sha256_str(&tar);
        let tarfile = tmp.path().join("layer.tar");
        fs::write(&tarfile, &tar).unwrap();
        apply_ok(&tmp.path().join("reference"), &tar);
        let want = tree(&tmp.path().join("reference"));
        fs::remove_dir_all(tmp.path().join("reference")).unwrap();
        let apply = |id: &str| {
            cli(
                "layers",
                &root,
                &[
                    OsStr::new("apply-diff"),
                    OsStr::new(id),
                    tarfile.as_os_str(),
                ],
            )
        };
        let mut t = Duration::MAX;
        for _ in 0..2 {
            s.create("calibrate", Some("base"), false).unwrap();
            t = t.min(timed(apply("calibrate")));
            assert_eq!(tree(&root.join("calibrate/diff")), want);
            s.remove("calibrate").unwrap();
        }
        let mut tally = Tally::default();
        for i in 0..KILLS {
            let id = format!("l{i}");
            s.create(&id, Some("base"), false).unwrap();
            let delay = kill_delay(&mut rng, t, 1.1);
            run_and_kill(apply(&id), &root, delay, &mut tally);
            let ctx = format!("kill {i} after {delay:?}");
            // Reopened, as the next process would.
            let s = LayerStore::open(&root).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
            assert!(s.exists(&id), "{ctx}: the layer went away");
            let rep = s
                .cleanup()
                .unwrap_or_else(|e| panic!("{ctx}: cleanup: {e}"));
            if !rep.scratch.is_empty() || !rep.completed.is_empty() {
                tally.leftovers += 1;
            }
            assert_eq!(store_scratch(&root), Vec::<PathBuf>::new(), "{ctx}");
            let diff = root.join(&id).join("diff");
            if entries(&diff) == 0 {
                tally.old_state += 1;
                assert_eq!(s.meta(&id).unwrap().diff_id, None, "{ctx}");
            } else {
                tally.new_state += 1;
                assert_eq!(tree(&diff), want, "{ctx}: half a layer");
                assert_eq!(
                    s.meta(&id).unwrap().diff_id.as_deref(),
                    Some(&*diff_id),
                    "{ctx}"
                );
            }
            assert_eq!(
                tree(&root.join("base/diff")),
                base_tree,
                "{ctx}: base changed"
            );
            assert_eq!(
                s.meta("base").unwrap(),
                base_meta,
                "{ctx}: base record changed"
            );
            assert_eq!(s.list().unwrap(), vec!["base".to_string(), id.clone()]);
            s.remove(&id).unwrap();
            assert_eq!(entries(&root.join("l")), 1, "{ctx}: short links");
        }
        // The store works on: a fresh layer takes the tar, complete.
        s.create("final", Some("base"), false).unwrap();
        timed(apply("final"));
        assert_eq!(tree(&root.join("final/diff")), want);
        assert_eq!(s.meta("final").unwrap().diff_id, Some(diff_id));
        assert!(s.cleanup().unwrap().scratch.is_empty());
        report("apply-diff", t, &tally, started, &EXPECT);
    }

    #[test]
    fn kill_9_during_image_import() {
        let _serial = serial();
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed(SEED + 1));
        let tmp = scratch_dir("stratafs-imagecrash-");
        let images = ImageStore::new(LayerStore::open(tmp.path().join("store")).unwrap()).unwrap();
        let root = images.layers.root().to_path_buf();
        // Three layers: the bottom one shared with an image already there, two this import
        // makes: a small one, then a big one (gzipped), so that many kills fall after the
        // first new layer is in and before the image record.
        let layers = [
            base_tar(),
            many_files_tar("a", 4, 100, 1 << 20),
            many_files_tar("b", 10, 250, 4 << 20),
        ];
        let shared = tmp.path().join("shared.tar");
        fs::write(
            &shared,
            image_archive(&layers[..1], "crash/shared:1", false, Spoil::None),
        )
        .unwrap();
        let base = images.import(&shared, None, &mut Quiet).unwrap();
        let before = images.layers.list().unwrap();
        let shared_tree = tree(&root.join(&before[0]).join("diff"));
        let archive = tmp.path().join("image.tar");
        fs::write(
            &archive,
            image_archive(&layers, "crash/image:1", false, Spoil::None),
        )
        .unwrap();
        let import = || cli("image", &root, &[OsStr::new("import"), archive.as_os_str()]);
        let mut t = Duration::MAX;
        let mut want = None;
        for _ in 0..2 {
            t = t.min(timed(import()));
            let rec = images.find("crash/image:1").unwrap();
            let trees: Vec<_> = rec
                .layer_ids()
                .iter()
                .map(|l| tree(&root.join(l).join("diff")))
                .collect();
            assert_eq!(trees.len(), 3);
            assert_eq!(trees[0], shared_tree);
            want = Some((rec, trees));
            images.remove("crash/image:1").unwrap();
            assert_eq!(images.layers.list().unwrap(), before);
        }
        let (want_rec, want_trees) = want.unwrap();
        let (mut orphans, mut tally) = (0, Tally::default());
        for i in 0..KILLS {
            let delay = kill_delay(&mut rng, t, 1.1);
            run_and_kill(import(), &root, delay, &mut tally);
            let ctx = format!("kill {i} after {delay:?}");
            let images = ImageStore::new(
                LayerStore::open(&root).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}")),
            )
            .unwrap();
            let rep = images
                .cleanup()
                .unwrap_or_else(|e| panic!("{ctx}: cleanup: {e}"));
            orphans += rep.orphan_layers.len();
            if !rep.orphan_layers.is_empty()
                || !rep.scratch.is_empty()
                || !rep.layers.scratch.is_empty()
                || !rep.layers.dangling_links.is_empty()
            {
                tally.leftovers += 1;
            }
            assert_eq!(store_scratch(&root), Vec::<PathBuf>::new(), "{ctx}");
            let journals: Vec<_> = fs::read_dir(root.join(".images"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".json") && !n.ends_with(".config") && n != "containers")
                .collect();
            assert_eq!(journals, Vec::<String>::new(), "{ctx}: left in .images");
            match images.find("crash/image:1") {
                Ok(rec) => {
                    tally.new_state += 1;
                    assert_eq!(rec, want_rec, "{ctx}");
                    for (l, want) in rec.layer_ids().iter().zip(&want_trees) {
                        assert_eq!(&tree(&root.join(l).join("diff")), want, "{ctx}: layer {l}");
                    }
                    let mut all = rec.layer_ids();
                    all.sort();
                    assert_eq!(images.layers.list().unwrap(), all, "{ctx}");
                    assert_eq!(entries(&root.join("l")), 3, "{ctx}: short links");
                    images.remove("crash/image:1").unwrap();
                }
                Err(Error::ImageNotFound(_)) => {
                    tally.old_state += 1;
                    assert_eq!(images.list().unwrap(), vec![base.clone()], "{ctx}");
                    assert_eq!(
                        entries(&root.join(".images")),
                        3,
                        "{ctx}: records and configs"
                    );
                }
                Err(e) => panic!("{ctx}: {e}"),
            }
            assert_eq!(
                images.layers.list().unwrap(),
                before,
                "{ctx}: orphan layers"
            );
            assert_eq!(entries(&root.join("l")), 1, "{ctx}: short links left");
            assert_eq!(
                tree(&root.join(&before[0]).join("diff")),
                shared_tree,
                "{ctx}"
            );
        }
        // A re-import after all those kills succeeds, complete.
        timed(import());
        let rec = images.find("crash/image:1").unwrap();
        assert_eq!(rec, want_rec);
        for (l, want) in rec.layer_ids().iter().zip(&want_trees) {
            assert_eq!(&tree(&root.join(l).join("diff")), want, "layer {l}");
        }
        assert!(images.cleanup().unwrap().orphan_layers.is_empty());
        eprintln!("crash image import: {orphans} orphan layers removed by cleanup");
        report("image import", t, &tally, started, &EXPECT);
        assert!(orphans >= 1, "no kill fell between two layers: {tally:?}");
    }
}
