//! Overlay semantics on real stratafs mounts, one property per test. Where the kernel's
//! behaviour is the reference, the expected values below are what kernel overlayfs does
//! (checked against it where a comparison is cheap).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::util::fixture::{MIB, big_content};
use crate::util::sys::{self, RENAME_EXCHANGE, RENAME_NOREPLACE};
use crate::util::tree::{self, Kind, Snap};
use crate::util::{Fixture, Mount, assert_errno, expect_errno};

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dirent")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn upper_kind(fx: &Fixture, rel: &str) -> Option<Kind> {
    let p = fx.upper.join(rel);
    fs::symlink_metadata(&p).ok()?;
    tree::snapshot(&p, Snap::UPPER)
        .entries
        .get("")
        .map(|e| e.kind)
}

#[test]
fn whiteouts_and_opaque_dirs_in_every_form() {
    let mut fx = Fixture::new(2);
    let bottom = fx.lower(1);
    for f in ["wh_char", "wh_file", "wh_char_up", "wh_file_up", "keep"] {
        bottom.file(f, b"bottom\n");
    }
    for d in [
        "opq_trusted",
        "opq_user",
        "opq_wh",
        "opq_trusted_up",
        "opq_user_up",
        "opq_wh_up",
    ] {
        bottom.file(&format!("{d}/old"), b"old\n");
    }
    bottom.file("dir_wh/a", b"a\n");
    fx.lower(0)
        .whiteout("wh_char")
        .wh_file("wh_file")
        .wh_file("dir_wh")
        .opaque("opq_trusted")
        .opaque_user("opq_user")
        .opaque_wh("opq_wh");
    for d in ["opq_trusted", "opq_user", "opq_wh"] {
        fx.lower(0).file(&format!("{d}/new"), b"new\n");
    }
    fx.upper_layer()
        .whiteout("wh_char_up")
        .wh_file("wh_file_up")
        .opaque("opq_trusted_up")
        .opaque_user("opq_user_up")
        .opaque_wh("opq_wh_up");
    for d in ["opq_trusted_up", "opq_user_up", "opq_wh_up"] {
        fx.upper_layer().file(&format!("{d}/new"), b"new\n");
    }
    fx.seal();
    let m = fx.mount_stratafs("");

    let opaque = [
        "opq_trusted",
        "opq_user",
        "opq_wh",
        "opq_trusted_up",
        "opq_user_up",
        "opq_wh_up",
    ];
    let mut want = set(&opaque);
    want.insert("keep".into());
    assert_eq!(names(m.path()), want, "root listing");
    for hidden in ["wh_char", "wh_file", "wh_char_up", "wh_file_up", "dir_wh"] {
        assert_errno(
            &format!("lstat {hidden}"),
            fs::symlink_metadata(m.join(hidden)),
            libc::ENOENT,
        );
        assert_errno(
            &format!("open {hidden}"),
            File::open(m.join(hidden)),
            libc::ENOENT,
        );
    }
    for d in opaque {
        assert_eq!(
            names(&m.join(d)),
            set(&["new"]),
            "{d} must show only its own entries"
        );
        assert_errno(
            &format!("lstat {d}/old"),
            fs::symlink_metadata(m.join(d).join("old")),
            libc::ENOENT,
        );
        for x in ["trusted.overlay.opaque", "user.overlay.opaque"] {
            assert_errno(
                &format!("getxattr {d} {x}"),
                sys::lgetxattr(&m.join(d), x),
                libc::ENODATA,
            );
        }
        let listed = sys::llistxattr(&m.join(d)).expect("listxattr");
        assert!(
            !listed.iter().any(|n| n.contains("overlay.")),
            "{d}: listxattr shows markers: {listed:?}"
        );
    }
    // The marker files themselves are never names in the merged view.
    for marker in [
        ".wh.wh_file",
        ".wh.wh_file_up",
        ".wh.dir_wh",
        "opq_wh/.wh..wh..opq",
    ] {
        assert_errno(
            &format!("lstat {marker}"),
            fs::symlink_metadata(m.join(marker)),
            libc::ENOENT,
        );
    }
    let merged = tree::snapshot(m.path(), Snap::MERGED);
    for (p, e) in &merged.entries {
        assert!(!p.contains(".wh."), "marker visible: {p}");
        assert!(
            !(e.kind == Kind::Char && e.rdev == Some((0, 0))),
            "whiteout visible: {p}"
        );
    }
    // A whited-out name can be created again; it shows only the new object.
    fs::write(m.join("wh_file"), b"again\n").expect("recreate wh_file");
    assert_eq!(read(&m.join("wh_file")), "again\n");
    fs::create_dir(m.join("dir_wh")).expect("mkdir over .wh. whiteout");
    assert!(
        names(&m.join("dir_wh")).is_empty(),
        "new dir over a whiteout must be empty"
    );
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn markers_cannot_be_created_through_the_mount() {
    let mut fx = Fixture::new(1);
    fx.lower(0).file("d/f", b"f\n");
    fx.seal();
    let m = fx.mount_stratafs("");
    expect_errno(
        "setxattr trusted.overlay.opaque",
        sys::lsetxattr(&m.join("d"), "trusted.overlay.opaque", b"y", 0),
    );
    assert_eq!(
        names(&m.join("d")),
        set(&["f"]),
        "d must not have turned opaque"
    );
    assert!(
        !sys::llistxattr(&m.join("d"))
            .expect("listxattr")
            .iter()
            .any(|n| n.starts_with("trusted.overlay.")),
    );
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn copy_up_keeps_mode_owner_times_and_xattrs() {
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .file_mode("f", b"content\n", 0o640)
        .chown("f", 1000, 2000)
        .xattr("f", "user.a", b"1")
        .xattr("f", "user.b", b"two")
        .xattr("f", "trusted.x", b"3")
        .symlink("s", "f")
        .chown("s", 5, 6)
        .file("d/inner", b"inner\n")
        .chmod("d", 0o710)
        .chown("d", 7, 8)
        .xattr("d", "user.d", b"dd");
    fx.seal();
    let m = fx.mount_stratafs("");
    let before = tree::snapshot(m.path(), Snap::MERGED);

    // Open for writing copies up; nothing is written, so nothing may change.
    drop(
        OpenOptions::new()
            .write(true)
            .open(m.join("f"))
            .expect("open rw"),
    );
    std::os::unix::fs::lchown(m.join("s"), Some(9), Some(10)).expect("lchown symlink");
    fs::write(m.join("d/new"), b"new\n").expect("create in lower dir");
    let after = tree::snapshot(m.path(), Snap::MERGED);
    for p in ["f", "d/inner"] {
        let (b, a) = (&before.entries[p], &after.entries[p]);
        let key = |e: &tree::Entry| {
            (
                e.kind,
                e.mode,
                e.uid,
                e.gid,
                e.size,
                e.sha256.clone(),
                e.xattrs.clone(),
                e.mtime,
                e.ino,
            )
        };
        assert_eq!(
            key(a),
            key(b),
            "copy-up changed {p} (kind, mode, uid, gid, size, sha, xattrs, mtime, ino)"
        );
    }
    let (b, a) = (&before.entries["s"], &after.entries["s"]);
    assert_eq!((a.uid, a.gid), (9, 10));
    assert_eq!(
        (a.target.as_deref(), a.mtime),
        (b.target.as_deref(), b.mtime)
    );
    let (b, a) = (&before.entries["d"], &after.entries["d"]);
    assert_eq!(
        (a.mode, a.uid, a.gid, &a.xattrs),
        (b.mode, b.uid, b.gid, &b.xattrs)
    );
    m.unmount();

    // The upper copies carry the same metadata.
    let up = tree::snapshot(&fx.upper, Snap::UPPER);
    let lo = tree::snapshot(&fx.lowers[0], Snap::LOWER);
    for p in ["f", "d"] {
        let (u, l) = (&up.entries[p], &lo.entries[p]);
        assert_eq!(
            (u.kind, u.mode, u.uid, u.gid, &u.sha256, &u.xattrs),
            (l.kind, l.mode, l.uid, l.gid, &l.sha256, &l.xattrs),
            "upper copy of {p}"
        );
    }
    assert_eq!(
        up.entries["f"].mtime, lo.entries["f"].mtime,
        "upper f mtime"
    );
    assert_eq!(up.entries["s"].kind, Kind::Symlink);
    assert_eq!(up.entries["s"].target.as_deref(), Some("f"));
    fx.assert_lowers_unchanged();
}

const SP_SIZE: u64 = 64 * MIB;
const SP_ISLANDS: &[(u64, u64)] = &[(0, 4096), (16 * MIB, 4096), (SP_SIZE - 4096, 4096)];

#[test]
fn copy_up_keeps_sparse_files_sparse_and_seek_data_works() {
    let mut fx = Fixture::new(1);
    fx.lower(0).sparse("sp", SP_SIZE, SP_ISLANDS);
    fx.seal();
    let m = fx.mount_stratafs("");
    let p = m.join("sp");
    {
        // Before copy-up: holes are found through the mount.
        let f = File::open(&p).expect("open");
        assert_eq!(
            sys::lseek(&f, 4096, libc::SEEK_DATA).expect("SEEK_DATA"),
            16 * MIB
        );
        assert_eq!(sys::lseek(&f, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"), 4096);
    }
    // Copy-up by a one-byte write into a hole.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open rw");
    f.write_all_at(b"X", 8 * MIB).expect("pwrite");
    f.sync_all().expect("fsync");
    let md = fs::metadata(fx.upper.join("sp")).expect("upper copy exists");
    assert_eq!(md.len(), SP_SIZE);
    assert!(
        md.blocks() * 512 < MIB,
        "upper copy is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
    assert!(
        fs::metadata(&p).expect("stat").blocks() * 512 < MIB,
        "merged st_blocks too large"
    );
    assert_eq!(
        sys::lseek(&f, 4096, libc::SEEK_DATA).expect("SEEK_DATA"),
        8 * MIB
    );
    assert_eq!(
        sys::lseek(&f, 8 * MIB, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        8 * MIB + 4096
    );
    assert_eq!(
        sys::lseek(&f, 8 * MIB + 4096, libc::SEEK_DATA).expect("SEEK_DATA"),
        16 * MIB
    );
    assert_errno(
        "SEEK_DATA past the last island",
        sys::lseek(&f, SP_SIZE, libc::SEEK_DATA),
        libc::ENXIO,
    );
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 16 * MIB).expect("read island");
    assert!(buf.iter().all(|b| *b == b'B'), "second island");
    // Punch the first island out, then allocate past the end.
    sys::fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        4096,
    )
    .expect("punch hole");
    f.read_exact_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|b| *b == 0), "punched range reads zeros");
    assert_eq!(
        sys::lseek(&f, 0, libc::SEEK_DATA).expect("SEEK_DATA"),
        8 * MIB
    );
    sys::fallocate(&f, 0, SP_SIZE, MIB).expect("fallocate");
    assert_eq!(f.metadata().expect("fstat").len(), SP_SIZE + MIB);
    drop(f);
    // Same content as the same operations on a plain local file.
    let local = fx.scratch("local").join("sp");
    crate::util::Layer {
        root: local.parent().expect("dir").to_path_buf(),
    }
    .sparse("sp", SP_SIZE, SP_ISLANDS);
    let lf = OpenOptions::new()
        .write(true)
        .open(&local)
        .expect("open local");
    lf.write_all_at(b"X", 8 * MIB).expect("pwrite");
    lf.write_all_at(&[0; 4096], 0).expect("zero");
    lf.set_len(SP_SIZE + MIB).expect("extend");
    assert_eq!(
        tree::sha256_file(&p).expect("digest"),
        tree::sha256_file(&local).expect("digest")
    );
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn open_with_o_trunc_on_a_lower_file() {
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .file_mode("f", b"lower data\n", 0o600)
        .xattr("f", "user.k", b"v");
    fx.seal();
    let m = fx.mount_stratafs("");
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.join("f"))
        .expect("open O_TRUNC");
    assert_eq!(f.metadata().expect("fstat").len(), 0);
    f.write_all(b"new\n").expect("write");
    drop(f);
    assert_eq!(read(&m.join("f")), "new\n");
    let md = fs::metadata(m.join("f")).expect("stat");
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_eq!(sys::lgetxattr(&m.join("f"), "user.k").expect("xattr"), b"v");
    assert_eq!(read(&fx.upper.join("f")), "new\n");
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn unlink_and_rmdir_leave_whiteouts_only_where_needed() {
    let mut fx = Fixture::new(1);
    fx.lower(0).file("a", b"a\n").file("d/x", b"x\n");
    fx.upper_layer().file("u", b"u\n");
    fx.seal();
    let m = fx.mount_stratafs("");
    fs::remove_file(m.join("a")).expect("unlink lower file");
    fs::remove_file(m.join("u")).expect("unlink upper-only file");
    fs::write(m.join("n"), b"n").expect("create");
    fs::remove_file(m.join("n")).expect("unlink new file");
    fs::remove_file(m.join("d/x")).expect("unlink lower file in lower dir");
    fs::remove_dir(m.join("d")).expect("rmdir emptied lower dir");
    assert!(names(m.path()).is_empty(), "root: {:?}", names(m.path()));
    m.unmount();
    assert_eq!(upper_kind(&fx, "a"), Some(Kind::Whiteout), "upper/a");
    assert_eq!(upper_kind(&fx, "d"), Some(Kind::Whiteout), "upper/d");
    assert_eq!(
        upper_kind(&fx, "u"),
        None,
        "no whiteout needed for an upper-only file"
    );
    assert_eq!(
        upper_kind(&fx, "n"),
        None,
        "no whiteout needed for a new file"
    );
    let md = fs::symlink_metadata(fx.upper.join("a")).expect("whiteout");
    assert_eq!(md.rdev(), 0, "whiteout is char 0/0");
    fx.assert_lowers_unchanged();
}

#[test]
fn rmdir_of_a_merged_dir_once_all_layers_are_emptied() {
    let mut fx = Fixture::new(2);
    fx.lower(1).file("m/a", b"a").file("m/sub/x", b"x");
    fx.lower(0).file("m/b", b"b").dir("m/sub");
    fx.upper_layer().file("m/c", b"c");
    fx.seal();
    let m = fx.mount_stratafs("");
    assert_eq!(names(&m.join("m")), set(&["a", "b", "c", "sub"]));
    assert_errno(
        "rmdir non-empty",
        fs::remove_dir(m.join("m")),
        libc::ENOTEMPTY,
    );
    for f in ["m/a", "m/b", "m/c", "m/sub/x"] {
        fs::remove_file(m.join(f)).unwrap_or_else(|e| panic!("unlink {f}: {e}"));
    }
    assert_errno(
        "rmdir with merged subdir",
        fs::remove_dir(m.join("m")),
        libc::ENOTEMPTY,
    );
    fs::remove_dir(m.join("m/sub")).expect("rmdir m/sub");
    fs::remove_dir(m.join("m")).expect("rmdir m");
    assert_errno("lstat m", fs::symlink_metadata(m.join("m")), libc::ENOENT);
    fs::create_dir(m.join("m")).expect("mkdir m again");
    assert!(
        names(&m.join("m")).is_empty(),
        "recreated dir shows lower entries"
    );
    m.unmount();
    assert_eq!(
        sys::lgetxattr(&fx.upper.join("m"), "trusted.overlay.opaque").expect("opaque xattr"),
        b"y"
    );
    fx.assert_lowers_unchanged();
}

#[test]
fn renameat2_noreplace_and_exchange() {
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .file("a", b"A\n")
        .file("b", b"B\n")
        .file("d/c", b"C\n");
    fx.seal();
    let m = fx.mount_stratafs("");
    assert_errno(
        "NOREPLACE onto existing",
        sys::renameat2(&m.join("a"), &m.join("b"), RENAME_NOREPLACE),
        libc::EEXIST,
    );
    sys::renameat2(&m.join("a"), &m.join("a2"), RENAME_NOREPLACE).expect("NOREPLACE to new name");
    sys::renameat2(&m.join("a2"), &m.join("d/c"), RENAME_EXCHANGE).expect("EXCHANGE");
    assert_eq!(read(&m.join("a2")), "C\n");
    assert_eq!(read(&m.join("d/c")), "A\n");
    assert_errno(
        "EXCHANGE with a missing name",
        sys::renameat2(&m.join("b"), &m.join("missing"), RENAME_EXCHANGE),
        libc::ENOENT,
    );
    assert_eq!(names(m.path()), set(&["a2", "b", "d"]));
    m.unmount();
    // Remounted, the result persists.
    let m = fx.mount_stratafs("");
    assert_eq!(read(&m.join("a2")), "C\n");
    assert_eq!(read(&m.join("d/c")), "A\n");
    assert_errno("lstat a", fs::symlink_metadata(m.join("a")), libc::ENOENT);
    m.unmount();
    fx.assert_lowers_unchanged();
}

fn dir_inos_match_stat(dir: &Path) {
    for e in fs::read_dir(dir).expect("readdir") {
        let e = e.expect("dirent");
        let st = fs::symlink_metadata(e.path()).expect("lstat").ino();
        assert_eq!(e.ino(), st, "d_ino != st_ino for {}", e.path().display());
    }
}

#[test]
fn st_ino_is_stable_across_copy_up_and_matches_d_ino() {
    let mut fx = Fixture::new(2);
    fx.lower(1)
        .file("m/x", b"x")
        .file("f", b"f")
        .file("g", b"g");
    fx.lower(0)
        .file("m/y", b"y")
        .file("h", b"h")
        .dir("only0/sub");
    fx.seal();
    let m = fx.mount_stratafs("");
    let ino = |p: &str| fs::symlink_metadata(m.join(p)).expect("lstat").ino();
    let before: Vec<u64> = ["f", "g", "m", "m/x", "only0"]
        .iter()
        .map(|p| ino(p))
        .collect();
    for d in ["", "m", "only0"] {
        dir_inos_match_stat(&m.join(d));
    }
    fs::OpenOptions::new()
        .append(true)
        .open(m.join("f"))
        .expect("open")
        .write_all(b"more")
        .expect("append");
    fs::set_permissions(m.join("g"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::write(m.join("m/x"), b"changed").expect("write");
    fs::write(m.join("only0/new"), b"n").expect("create");
    let after: Vec<u64> = ["f", "g", "m", "m/x", "only0"]
        .iter()
        .map(|p| ino(p))
        .collect();
    assert_eq!(before, after, "st_ino changed by copy-up");
    let distinct: BTreeSet<u64> = after.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        after.len(),
        "distinct objects share an st_ino"
    );
    for d in ["", "m", "only0"] {
        dir_inos_match_stat(&m.join(d));
    }
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn st_ino_is_stable_across_remount() {
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .file("same", b"s")
        .file("copied", b"c")
        .file("d/inner", b"i");
    fx.seal();
    let paths = ["same", "copied", "d", "d/inner"];
    let inos = |m: &Mount| -> Vec<u64> {
        paths
            .iter()
            .map(|p| fs::symlink_metadata(m.join(p)).expect("lstat").ino())
            .collect()
    };
    let m = fx.mount_stratafs("");
    let first = inos(&m);
    fs::write(m.join("copied"), b"changed").expect("write");
    let during = inos(&m);
    m.unmount();
    let m = fx.mount_stratafs("");
    let second = inos(&m);
    m.unmount();
    assert_eq!(first, during, "st_ino changed by copy-up");
    assert_eq!(first, second, "st_ino changed across remount ({paths:?})");
    fx.assert_lowers_unchanged();
}

#[test]
fn read_only_mount_without_upperdir_gives_erofs() {
    let mut fx = Fixture::new(2);
    fx.lower(1).file("f", b"f\n").file("d/x", b"x");
    fx.lower(0).file("g", b"g\n");
    fx.seal();
    let m = Mount::stratafs(&fx.ro_layers(), &fx.mnt, "");
    assert_eq!(read(&m.join("f")), "f\n");
    assert_eq!(names(m.path()), set(&["d", "f", "g"]));
    let rofs = libc::EROFS;
    assert_errno(
        "open rw",
        OpenOptions::new().write(true).open(m.join("f")),
        rofs,
    );
    assert_errno("create", File::create(m.join("new")), rofs);
    assert_errno("mkdir", fs::create_dir(m.join("nd")), rofs);
    assert_errno("unlink", fs::remove_file(m.join("g")), rofs);
    assert_errno("rename", fs::rename(m.join("f"), m.join("f2")), rofs);
    assert_errno(
        "chmod",
        fs::set_permissions(m.join("f"), fs::Permissions::from_mode(0o600)),
        rofs,
    );
    assert_errno(
        "setxattr",
        sys::lsetxattr(&m.join("f"), "user.x", b"1", 0),
        rofs,
    );
    assert_errno("truncate", sys::truncate(&m.join("f"), 0), rofs);
    let st = sys::statvfs(m.path()).expect("statvfs");
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0, "statvfs must say read-only");
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn statfs_reports_the_upper_filesystem() {
    let mut fx = Fixture::new(1);
    fx.lower(0).file("f", b"f");
    fx.seal();
    let m = fx.mount_stratafs("");
    let s = sys::statvfs(m.path()).expect("statvfs on mount");
    let u = sys::statvfs(&fx.upper).expect("statvfs on upper");
    assert!(s.f_bsize > 0 && s.f_blocks > 0, "empty statfs");
    assert_eq!(
        s.f_blocks * s.f_frsize,
        u.f_blocks * u.f_frsize,
        "total size != upper fs"
    );
    assert_eq!(s.f_namemax, 255);
    assert_eq!(s.f_flag & libc::ST_RDONLY, 0);
    m.unmount();
}

#[test]
fn xattrs_get_set_list_remove() {
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .file("f", b"f")
        .xattr("f", "user.low", b"L")
        .dir("d")
        .xattr("d", "user.dl", b"D")
        .symlink("s", "f")
        .xattr("s", "trusted.sl", b"S");
    fx.seal();
    let m = fx.mount_stratafs("");
    let f = m.join("f");
    assert_eq!(sys::lgetxattr(&f, "user.low").expect("get"), b"L");
    sys::lsetxattr(&f, "user.new", b"N", 0).expect("set");
    assert_errno(
        "XATTR_CREATE on existing",
        sys::lsetxattr(&f, "user.new", b"x", libc::XATTR_CREATE),
        libc::EEXIST,
    );
    assert_errno(
        "XATTR_REPLACE on missing",
        sys::lsetxattr(&f, "user.none", b"x", libc::XATTR_REPLACE),
        libc::ENODATA,
    );
    sys::lsetxattr(&f, "user.new", b"N2", libc::XATTR_REPLACE).expect("replace");
    let big = vec![b'v'; 4000];
    sys::lsetxattr(&f, "user.big", &big, 0).expect("set 4000-byte value");
    assert_eq!(sys::lgetxattr(&f, "user.big").expect("get big"), big);
    let mut l = sys::llistxattr(&f).expect("list");
    l.sort();
    assert_eq!(l, ["user.big", "user.low", "user.new"]);
    sys::lremovexattr(&f, "user.low").expect("remove lower xattr");
    assert_errno("get removed", sys::lgetxattr(&f, "user.low"), libc::ENODATA);
    assert_errno(
        "remove missing",
        sys::lremovexattr(&f, "user.low"),
        libc::ENODATA,
    );
    assert_eq!(sys::lgetxattr(&f, "user.new").expect("get"), b"N2");
    sys::lsetxattr(&m.join("d"), "user.dn", b"x", 0).expect("set on dir");
    let mut l = sys::llistxattr(&m.join("d")).expect("list dir");
    l.sort();
    assert_eq!(l, ["user.dl", "user.dn"]);
    assert_eq!(
        sys::lgetxattr(&m.join("s"), "trusted.sl").expect("get on symlink"),
        b"S"
    );
    m.unmount();
    // The changes persist in the upper layer.
    let m = fx.mount_stratafs("");
    assert_errno(
        "after remount",
        sys::lgetxattr(&m.join("f"), "user.low"),
        libc::ENODATA,
    );
    assert_eq!(
        sys::lgetxattr(&m.join("f"), "user.new").expect("get"),
        b"N2"
    );
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn mknod_fifo_and_char_device() {
    let mut fx = Fixture::new(1);
    fx.lower(0).dir("dev");
    fx.seal();
    let m = fx.mount_stratafs("");
    sys::mkfifo(&m.join("dev/fifo"), 0o640).expect("mkfifo");
    sys::mknod(&m.join("dev/null2"), libc::S_IFCHR | 0o666, 1, 3).expect("mknod c 1 3");
    sys::mknod(&m.join("dev/blk"), libc::S_IFBLK | 0o600, 7, 1).expect("mknod b 7 1");
    let t = tree::snapshot(&m.join("dev"), Snap::MERGED);
    let e = |p: &str| t.entries.get(p).unwrap_or_else(|| panic!("{p} missing"));
    assert_eq!((e("fifo").kind, e("fifo").mode), (Kind::Fifo, 0o640));
    assert_eq!(
        (e("null2").kind, e("null2").rdev),
        (Kind::Char, Some((1, 3)))
    );
    assert_eq!((e("blk").kind, e("blk").rdev), (Kind::Block, Some((7, 1))));
    // By design stratafs differs from the kernel here: the kernel refuses `mknod c 0 0`
    // through an overlay (EPERM); stratafs makes a real device (pjdfstest expects mknod to
    // work), marked `trusted.stratafs.device` in the upper so it is not read as a whiteout.
    sys::mknod(&m.join("dev/zero0"), libc::S_IFCHR | 0o600, 0, 0).expect("mknod c 0 0");
    let md = fs::symlink_metadata(m.join("dev/zero0")).expect("a 0/0 device is visible");
    assert_eq!((md.mode() & libc::S_IFMT, md.rdev()), (libc::S_IFCHR, 0));
    assert!(names(&m.join("dev")).contains("zero0"));
    m.unmount();
    let up = tree::snapshot(&fx.upper.join("dev"), Snap::UPPER);
    assert_eq!(up.entries["null2"].rdev, Some((1, 3)));
    assert_eq!(up.entries["fifo"].kind, Kind::Fifo);
    let m = fx.mount_stratafs("");
    assert!(
        names(&m.join("dev")).contains("zero0"),
        "user-made 0/0 device must survive a remount (not turn into a whiteout)"
    );
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn names_of_255_bytes_work_and_256_give_enametoolong() {
    let n255 = "n".repeat(255);
    let n256 = "n".repeat(256);
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .file(&n255, b"lower")
        .file(&format!("d/{}", "d".repeat(255)), b"x");
    fx.seal();
    let m = fx.mount_stratafs("");
    assert_eq!(read(&m.join(&n255)), "lower");
    fs::write(m.join("c".repeat(255)), b"new").expect("create 255");
    fs::create_dir(m.join("m".repeat(255))).expect("mkdir 255");
    // Whiteout for a 255-byte lower name (no room for a ".wh." prefix: char 0/0 form).
    fs::remove_file(m.join(&n255)).expect("unlink 255-byte lower name");
    assert!(!names(m.path()).contains(&n255));
    fs::rename(
        m.join(format!("d/{}", "d".repeat(255))),
        m.join(format!("d/{}", "e".repeat(255))),
    )
    .expect("rename 255 -> 255");
    assert_errno(
        "create 256",
        File::create(m.join(&n256)),
        libc::ENAMETOOLONG,
    );
    assert_errno(
        "mkdir 256",
        fs::create_dir(m.join(&n256)),
        libc::ENAMETOOLONG,
    );
    assert_errno(
        "lstat 256",
        fs::symlink_metadata(m.join(&n256)),
        libc::ENAMETOOLONG,
    );
    m.unmount();
    let m = fx.mount_stratafs("");
    assert_errno(
        "whited-out 255 name",
        fs::symlink_metadata(m.join(&n255)),
        libc::ENOENT,
    );
    assert_eq!(names(&m.join("d")), set(&[&"e".repeat(255)]));
    m.unmount();
    fx.assert_lowers_unchanged();
}

#[test]
fn other_files_stay_usable_while_a_large_copy_up_runs() {
    const SIZE: u64 = 48 * MIB;
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .big("huge", SIZE, 11)
        .file("small", b"small file\n")
        .file("d/other", b"other\n");
    fx.seal();
    let m = fx.mount_stratafs("");
    let huge = m.join("huge");
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut stats = 0u64;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut f = OpenOptions::new()
                .append(true)
                .open(&huge)
                .expect("open huge");
            f.write_all(b"tail").expect("append");
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            assert_eq!(fs::metadata(m.join("small")).expect("stat").len(), 11);
            assert_eq!(read(&m.join("d/other")), "other\n");
            assert_eq!(names(m.path()), set(&["d", "huge", "small"]));
            stats += 1;
        }
        writer.join().expect("writer thread");
    });
    assert!(stats > 0);
    let mut want = big_content(SIZE, 11);
    want.extend_from_slice(b"tail");
    assert_eq!(
        tree::sha256_file(&huge).expect("digest"),
        tree::sha256_bytes(&want),
        "copied-up content"
    );
    let mut f = File::open(&huge).expect("open");
    f.seek(SeekFrom::Start(SIZE - 4)).expect("seek");
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).expect("read");
    assert_eq!(&tail[4..], b"tail");
    drop(f);
    m.unmount();
    fx.assert_lowers_unchanged();
}

/// A lookup of a name missing in a lower directory asks for `.wh.NAME` there, until a full
/// listing of that directory has read its `.wh.` names; from then on it asks the list. Both
/// ways must hide and show the same names, in the directory and below a redirect-free subdir.
#[test]
fn wh_file_whiteouts_hide_the_same_names_before_and_after_a_listing() {
    let mut fx = Fixture::new(2);
    for f in ["d/gone", "d/kept", "d/sub/gone", "d/sub/kept"] {
        fx.lower(1).file(f, b"bottom\n");
    }
    fx.lower(0)
        .file("d/mid", b"mid\n")
        .wh_file("d/gone")
        .file("d/sub/mid", b"mid\n")
        .wh_file("d/sub/gone");
    fx.seal();
    let m = fx.mount_stratafs("");
    let check = |when: &str| {
        for d in ["d", "d/sub"] {
            assert_errno(
                &format!("lstat {d}/gone {when}"),
                fs::symlink_metadata(m.join(d).join("gone")),
                libc::ENOENT,
            );
            assert_errno(
                &format!("lstat {d}/never {when}"),
                fs::symlink_metadata(m.join(d).join("never")),
                libc::ENOENT,
            );
            for f in ["kept", "mid"] {
                fs::symlink_metadata(m.join(d).join(f))
                    .unwrap_or_else(|e| panic!("lstat {d}/{f} {when}: {e}"));
            }
        }
    };
    check("before any listing");
    for d in ["d", "d/sub"] {
        assert_eq!(names(&m.join(d)).len(), if d == "d" { 3 } else { 2 }, "{d}");
    }
    // The kernel forgets the entries of the names (negative ones too), so each is looked up
    // again; the open directories, and with them their nodes and listings, stay.
    let held: Vec<File> = ["d", "d/sub"]
        .iter()
        .map(|d| File::open(m.join(d)).expect("open dir"))
        .collect();
    fs::write("/proc/sys/vm/drop_caches", b"2").expect("drop dentries and inodes");
    check("after a listing");
    assert_eq!(names(&m.join("d")), set(&["kept", "mid", "sub"]));
    assert_eq!(names(&m.join("d/sub")), set(&["kept", "mid"]));
    drop(held);
}
