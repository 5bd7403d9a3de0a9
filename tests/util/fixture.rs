//! Layered test trees: a builder for single layers and the standard fixture.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::mount::{Layers, Mount};
use super::sys;
use super::tree::{self, Cmp, Snap, Tree};

/// One layer directory, built by path relative to its root. Parents are created as needed
/// (mode 0755). Every method panics on failure: a broken fixture is a broken test.
pub struct Layer {
    pub root: PathBuf,
}

pub const MIB: u64 = 1 << 20;

impl Layer {
    pub fn path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn parent(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        let parent = p.parent().expect("has parent").to_path_buf();
        fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        p
    }

    pub fn file(&self, rel: &str, content: &[u8]) -> &Self {
        let p = self.parent(rel);
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    pub fn file_mode(&self, rel: &str, content: &[u8], mode: u32) -> &Self {
        self.file(rel, content).chmod(rel, mode)
    }

    pub fn chmod(&self, rel: &str, mode: u32) -> &Self {
        let p = self.path(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    pub fn chown(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let p = self.path(rel);
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        self
    }

    pub fn dir(&self, rel: &str) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        self
    }

    pub fn dir_mode(&self, rel: &str, mode: u32) -> &Self {
        self.dir(rel).chmod(rel, mode)
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        let p = self.parent(rel);
        std::os::unix::fs::symlink(target, &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self
    }

    pub fn hardlink(&self, existing: &str, rel: &str) -> &Self {
        let p = self.parent(rel);
        fs::hard_link(self.path(existing), &p)
            .unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
        self
    }

    pub fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> &Self {
        let p = self.path(rel);
        sys::lsetxattr(&p, name, value, 0)
            .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
        self
    }

    /// Kernel-style whiteout: char device 0/0.
    pub fn whiteout(&self, rel: &str) -> &Self {
        let p = self.parent(rel);
        sys::whiteout(&p).unwrap_or_else(|e| panic!("mknod 0/0 {}: {e}", p.display()));
        self
    }

    /// fuse-overlayfs/aufs-style whiteout: an empty file `.wh.NAME` beside NAME.
    pub fn wh_file(&self, rel: &str) -> &Self {
        let (dir, name) = match rel.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), rel),
        };
        self.file(&format!("{dir}.wh.{name}"), b"")
    }

    /// Opaque directory, kernel style: `trusted.overlay.opaque=y`.
    pub fn opaque(&self, rel: &str) -> &Self {
        self.dir(rel).xattr(rel, "trusted.overlay.opaque", b"y")
    }

    /// Opaque directory, unprivileged style: `user.overlay.opaque=y`.
    pub fn opaque_user(&self, rel: &str) -> &Self {
        self.dir(rel).xattr(rel, "user.overlay.opaque", b"y")
    }

    /// Opaque directory, aufs style: a `.wh..wh..opq` file inside it.
    pub fn opaque_wh(&self, rel: &str) -> &Self {
        self.dir(rel).file(&format!("{rel}/.wh..wh..opq"), b"")
    }

    pub fn fifo(&self, rel: &str) -> &Self {
        let p = self.parent(rel);
        sys::mkfifo(&p, 0o644).unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
        self
    }

    pub fn chardev(&self, rel: &str, major: u32, minor: u32) -> &Self {
        let p = self.parent(rel);
        sys::mknod(&p, libc::S_IFCHR | 0o666, major, minor)
            .unwrap_or_else(|e| panic!("mknod c {}: {e}", p.display()));
        self
    }

    pub fn blockdev(&self, rel: &str, major: u32, minor: u32) -> &Self {
        let p = self.parent(rel);
        sys::mknod(&p, libc::S_IFBLK | 0o660, major, minor)
            .unwrap_or_else(|e| panic!("mknod b {}: {e}", p.display()));
        self
    }

    /// A sparse file of `size` bytes with data only in the given `(offset, len)` islands.
    pub fn sparse(&self, rel: &str, size: u64, islands: &[(u64, u64)]) -> &Self {
        let p = self.parent(rel);
        let f = fs::File::create(&p).expect("create sparse");
        f.set_len(size).expect("set_len");
        for (i, (off, len)) in islands.iter().enumerate() {
            let fill = b'A' + (i as u8 % 26);
            f.write_all_at(&vec![fill; *len as usize], *off)
                .expect("write island");
        }
        self
    }

    /// `size` bytes of seeded pseudo-random data ([`big_content`]).
    pub fn big(&self, rel: &str, size: u64, seed: u64) -> &Self {
        let p = self.parent(rel);
        fs::write(&p, big_content(size, seed))
            .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }
}

/// Seeded pseudo-random bytes (xorshift64*: cheap enough for unoptimized test builds).
pub fn big_content(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size as usize + 8);
    while (out.len() as u64) < size {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(size as usize);
    out
}

/// A temp dir holding lower layers `l0` (topmost) .. `lN`, `upper`, `work` and `mnt`.
pub struct Fixture {
    pub dir: TempDir,
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
    lower_snapshot: Option<Tree>,
}

/// The fixed time every fixture entry gets when sealed (varied per path, so a copy-up that
/// takes times from the wrong object shows).
fn fixed_time(rel: &str) -> (i64, i64) {
    let h = rel.bytes().fold(1469598103934665603u64, |a, b| {
        (a ^ u64::from(b)).wrapping_mul(1099511628211)
    });
    (
        1_500_000_000 + (h % 10_000_000) as i64,
        (h % 1_000_000_000) as i64,
    )
}

impl Fixture {
    pub fn new(n_lowers: usize) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("stratafs-test-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let root = fs::canonicalize(dir.path()).expect("canonical tempdir");
        let lowers: Vec<PathBuf> = (0..n_lowers).map(|i| root.join(format!("l{i}"))).collect();
        for l in &lowers {
            fs::create_dir(l).expect("mkdir lower");
        }
        let (upper, work, mnt) = (root.join("upper"), root.join("work"), root.join("mnt"));
        for d in [&upper, &work, &mnt] {
            fs::create_dir(d).expect("mkdir");
        }
        Fixture {
            dir,
            lowers,
            upper,
            work,
            mnt,
            lower_snapshot: None,
        }
    }

    pub fn root(&self) -> &Path {
        self.upper.parent().expect("root")
    }

    /// Lower layer `i` (0 is the topmost).
    pub fn lower(&self, i: usize) -> Layer {
        Layer {
            root: self.lowers[i].clone(),
        }
    }

    pub fn upper_layer(&self) -> Layer {
        Layer {
            root: self.upper.clone(),
        }
    }

    /// A fresh empty directory inside the fixture.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.root().join(name);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Gives every entry of every layer fixed times, then records the lowers.
    pub fn seal(&mut self) {
        let mut all = self.lowers.clone();
        all.push(self.upper.clone());
        for layer in &all {
            let t = tree::snapshot(layer, Snap::LOWER);
            for rel in t.entries.keys() {
                let p = if rel.is_empty() {
                    layer.clone()
                } else {
                    layer.join(rel)
                };
                let ts = fixed_time(rel);
                sys::set_times(&p, ts, ts)
                    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
            }
        }
        self.lower_snapshot = Some(self.snapshot_lowers());
    }

    fn snapshot_lowers(&self) -> Tree {
        let mut all = Tree::default();
        for (i, l) in self.lowers.iter().enumerate() {
            for (k, v) in tree::snapshot(l, Snap::LOWER).entries {
                all.entries.insert(format!("l{i}:{k}"), v);
            }
        }
        all
    }

    /// Lower layers are never written: same entries, content, xattrs, ctimes and inodes.
    pub fn assert_lowers_unchanged(&self) {
        let before = self
            .lower_snapshot
            .as_ref()
            .expect("fixture sealed before use");
        tree::assert_same(
            "lower layers changed",
            "before",
            before,
            "after",
            &self.snapshot_lowers(),
            Cmp::STRICT,
        );
    }

    pub fn layers(&self) -> Layers {
        Layers {
            lowers: self.lowers.clone(),
            upper: Some(self.upper.clone()),
            work: Some(self.work.clone()),
        }
    }

    /// Lowers only: a read-only mount.
    pub fn ro_layers(&self) -> Layers {
        Layers {
            lowers: self.lowers.clone(),
            upper: None,
            work: None,
        }
    }

    pub fn mount_stratafs(&self, extra: &str) -> Mount {
        Mount::stratafs(&self.layers(), &self.mnt, extra)
    }

    pub fn mount_kernel(&self, extra: &str) -> Mount {
        Mount::kernel(&self.layers(), &self.mnt, extra)
    }

    /// The kernel's overlayfs (the oracle) or stratafs, with no extra options.
    pub fn mount_oracle_or_stratafs(&self, kernel: bool) -> Mount {
        if kernel {
            self.mount_kernel("")
        } else {
            self.mount_stratafs("")
        }
    }

    /// The standard three-lower fixture, sealed. Built identically every time.
    pub fn standard() -> Fixture {
        let mut fx = Fixture::new(3);
        build_standard(&fx);
        fx.seal();
        fx
    }
}

pub const BIG_SIZE: u64 = 8 * MIB;
pub const BIG_SEED: u64 = 7;
pub const SPARSE_SIZE: u64 = 64 * MIB;
pub const SPARSE_ISLANDS: &[(u64, u64)] =
    &[(0, 4096), (16 * MIB + 12288, 4096), (64 * MIB - 4096, 4096)];

/// Layers, bottom to top: l2, l1, l0, upper. The names say what each entry is for.
fn build_standard(fx: &Fixture) {
    let l2 = fx.lower(2);
    l2.file("a.txt", b"alpha\n")
        .file("b.txt", b"bravo from l2\n")
        .file("c.txt", b"charlie\n")
        .big("big.bin", BIG_SIZE, BIG_SEED)
        .sparse("sparse.img", SPARSE_SIZE, SPARSE_ISLANDS)
        .file("hl1", b"hardlinked\n")
        .hardlink("hl1", "hl2")
        .hardlink("hl1", "hl_dir/hl3")
        .symlink("rel_link", "a.txt")
        .symlink("abs_link", "/nonexistent/stratafs-abs-target")
        .symlink("dangling", "nowhere")
        .symlink("dir_link", "dir1")
        .file("xa", b"xattrs\n")
        .xattr("xa", "user.foo", b"1")
        .xattr("xa", "user.bar", b"two")
        .xattr("xa", "trusted.t", b"tv")
        .xattr("xa", "user.bin", &[0, 1, 2, 255])
        .fifo("fifo")
        .chardev("chardev", 1, 3)
        .blockdev("blockdev", 7, 0)
        .file_mode("modes/m600", b"600\n", 0o600)
        .file_mode("modes/m755", b"755\n", 0o755)
        .file_mode("modes/suid", b"suid\n", 0o4755)
        .file_mode("modes/ro", b"ro\n", 0o444)
        .chown("modes/ro", 1000, 1000)
        .dir_mode("modes/sticky", 0o1777)
        .file("modes/private/inner", b"inner\n")
        .chmod("modes/private", 0o700)
        .dir("modes/sgid")
        .chown("modes/sgid", 0, 100)
        .chmod("modes/sgid", 0o2775)
        .file("dir1/f1", b"f1 from l2\n")
        .file("dir1/f2", b"f2 from l2\n")
        .file("dir1/sub/deep/file", b"deep\n")
        .symlink("dir1/sub/rel2", "deep/file")
        .file("merged/from_l2", b"l2\n")
        .file("merged/both", b"both from l2\n")
        .file("merged/inner/x", b"x\n")
        .file("opq/hidden", b"hidden\n")
        .file("opq/sub/h2", b"h2\n")
        .file("opq_up/old", b"old\n")
        .file("wh_target", b"to be whited out\n")
        .file("wh_dir/a", b"a\n")
        .file("wh_dir/b", b"b\n")
        .file("file_over_dir/child", b"child\n")
        .file("dir_over_file", b"was a file\n")
        .dir("empty_dir")
        .file("l2only/f", b"l2only\n");

    let l1 = fx.lower(1);
    l1.file("merged/from_l1", b"l1\n")
        .file("merged/both", b"both from l1\n")
        .file("merged/inner/y", b"y\n")
        .opaque("opq")
        .file("opq/visible", b"visible\n")
        .whiteout("wh_target")
        .whiteout("wh_dir")
        .file("file_over_dir", b"file now\n")
        .file("dir_over_file/z", b"z\n")
        .file("b.txt", b"bravo from l1\n")
        .file("dir1/f1", b"f1 from l1\n")
        .file("l1only/inner/f", b"l1only\n")
        .xattr("l1only", "user.dir", b"d");

    let l0 = fx.lower(0);
    l0.file("merged/from_l0", b"l0\n")
        .file("top.txt", b"top\n")
        .file("dir1/f3", b"f3 from l0\n")
        .whiteout("c.txt")
        .dir("merged/inner");

    let up = fx.upper_layer();
    up.file("up_only.txt", b"upper only\n")
        .file("merged/from_up", b"up\n")
        .file("dir1/f_up", b"f_up\n")
        .whiteout("dir1/f2")
        .opaque("opq_up")
        .file("opq_up/new", b"new\n")
        .dir("up_dir/nested");
}
