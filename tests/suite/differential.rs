//! Differential tests: the same fixture and the same operations on kernel overlayfs (the
//! oracle) and on stratafs; every result, the merged trees, the upper layers left behind, and
//! a kernel mount of the stratafs upper layer must all agree.
//!
//! What is compared and why:
//! - each operation's result (Ok with its value, or the errno);
//! - merged trees: type, mode, owner, size, content, link target, xattrs (all of them: no
//!   marker may leak), nlink, rdev and hard-link groups. Not st_ino (two fixtures have
//!   different inode numbers) and not atime/ctime (they record when the test ran). mtime is
//!   compared for every path no operation stamped with "now" (`Dirty`): the fixtures give
//!   every entry a fixed, per-path time, so copy-up must carry times over exactly, and
//!   utimensat sets explicit times that are compared as well;
//! - upper layers after unmount, with whiteouts normalized (char 0/0) and bookkeeping xattrs
//!   dropped (`trusted.stratafs.*`, `trusted.overlay.*` except `opaque`);
//! - the stratafs upper (with its lowers) mounted by the kernel, against the kernel's own
//!   merged tree: the on-disk format must be the kernel's.

use crate::util::mount::Layers;
use crate::util::ops::{self, Op, Outcome};
use crate::util::sys::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use crate::util::tree::{self, Cmp, Dirty, Snap, Tree};
use crate::util::{Fixture, Mount};

/// Mount options for one comparison.
pub struct Profile {
    pub name: &'static str,
    pub kernel_opts: &'static str,
    pub stratafs_opts: &'static str,
    /// Options for the kernel mount of the stratafs upper; `None` skips that check.
    pub cross_opts: Option<&'static str>,
    /// Compare the lower hard links (every name of `hl1`'s inode) in that kernel mount. Off
    /// with stratafs's `index=on`: its hard-link index (`workdir/stratafs-index`, joined by
    /// `stratafs.origin`) is not the kernel's (`workdir/index`, keyed by file handles), so a
    /// kernel mount shows a name not yet copied up as its own lower inode (README, ARCHITECTURE).
    pub cross_hardlinks: bool,
    /// Compare file content in the upper layers. Off with metacopy: which of the two keeps
    /// data or only metadata in an upper file is an implementation choice (the merged view,
    /// always compared in full, is what must agree).
    pub upper_content: bool,
    /// Run operations on the lower hard links (`hl1`, `hl2`, `hl_dir/hl3`). Off in the compat
    /// profile: with `index=off`, which name of a lower hard link a copy-up breaks away depends
    /// on the name the syscall used, and FUSE passes an inode, not a name, for open, setattr
    /// and link; stratafs's answer (documented in the README) differs from the kernel's. The
    /// native profile (`index=on`) covers hard links.
    pub hardlink_ops: bool,
    /// Compare hard-linked files in the upper layers. Off in the native profile: which names
    /// of an indexed hard link also appear in the upper layer is the implementation's choice
    /// (the kernel puts the syscall's name there; stratafs, not seeing it, a name whose parent
    /// is already up); the merged view, compared in full, must agree.
    pub upper_hardlinks: bool,
}

/// Names of the fixture's lower hard links.
pub const HARDLINK_FAMILY: [&str; 3] = ["hl1", "hl2", "hl3"];

/// Does this operation name a lower hard link (or a link made from one)?
pub fn touches_hardlinks(op: &Op) -> bool {
    let text = op.to_string();
    HARDLINK_FAMILY.iter().any(|n| text.contains(n))
}

/// The kernel's defaults on most distributions, spelled out (module parameters may differ):
/// no redirects (lower directories cannot be renamed: EXDEV), no metacopy, no index (a
/// copy-up breaks a hard link). stratafs is asked for the same formats.
pub const COMPAT: Profile = Profile {
    name: "compat",
    kernel_opts: "redirect_dir=off,index=off,metacopy=off",
    stratafs_opts: "redirect_dir=off,index=off,metacopy=off",
    cross_opts: Some("redirect_dir=off,index=off,metacopy=off"),
    cross_hardlinks: true,
    upper_content: true,
    hardlink_ops: false,
    upper_hardlinks: true,
};

/// stratafs defaults (redirect_dir, metacopy and index on) against the kernel with the same
/// features. The kernel mounts the stratafs upper with redirects and metacopy; without index,
/// and without comparing the lower hard links: by design stratafs keeps its hard-link index in
/// `workdir/stratafs-index` and not in the kernel's `workdir/index` (keyed by file handles),
/// so a kernel mount (index=on or off) does not find the index entries.
pub const NATIVE: Profile = Profile {
    name: "native",
    kernel_opts: "redirect_dir=on,index=on,metacopy=on",
    stratafs_opts: "",
    cross_opts: Some("redirect_dir=on,metacopy=on,index=off"),
    cross_hardlinks: false,
    upper_content: false,
    hardlink_ops: true,
    upper_hardlinks: false,
};

/// Both mounts of a running comparison; operations go through [`Driver::step`].
pub struct Driver {
    pub kernel: Mount,
    pub stratafs: Mount,
    pub dirty: Dirty,
    pub failures: Vec<String>,
    pub log: Vec<String>,
    /// Stop comparing at the first different result (the states diverge after it).
    pub stop_on_mismatch: bool,
    pub stopped: bool,
    /// Names the fixture's lower hard links have now: `HARDLINK_FAMILY` and whatever
    /// renames and links made of them (the kernel can't read our hard-link index).
    pub family: std::collections::BTreeSet<String>,
}

impl Driver {
    /// Runs `op` on the kernel mount, then on stratafs; returns the kernel's outcome.
    pub fn step(&mut self, op: &Op) -> Outcome {
        // A write or truncate through a symlink stamps the target's mtime: resolve it first.
        let target = match op {
            Op::Write { path, .. } | Op::Truncate { path, .. } | Op::OpenTrunc { path } => {
                let root = self.kernel.path().to_path_buf();
                std::fs::canonicalize(root.join(path)).ok().and_then(|t| {
                    t.strip_prefix(&root)
                        .ok()
                        .map(|r| r.to_string_lossy().into_owned())
                })
            }
            _ => None,
        };
        // The other names of a hard-linked file get the same times: they stay dirty (or
        // clean) when this name goes away.
        let siblings = match (op, &target) {
            (_, Some(t)) => other_names(self.kernel.path(), t),
            (Op::Utimes { path, .. }, None) => other_names(self.kernel.path(), path),
            _ => Vec::new(),
        };
        let i = self.log.len();
        let k = ops::apply(self.kernel.path(), op);
        let s = ops::apply(self.stratafs.path(), op);
        self.log.push(format!("#{i} {op} => {k}"));
        if k != s && !self.stopped && !self.uncounted_dir_nlink(op, &k, &s) {
            self.failures
                .push(format!("op #{i} `{op}`: kernel {k}, stratafs {s}"));
            if self.stop_on_mismatch {
                self.stopped = true;
            }
        }
        ops::track(&mut self.dirty, op, &k);
        if k.is_ok() {
            if let Some(t) = &target {
                self.dirty.mark(t);
            }
            for n in &siblings {
                if target.is_some() {
                    self.dirty.mark(n);
                } else {
                    self.dirty.clear(n);
                }
            }
            self.track_family(op);
        }
        k
    }

    /// `lstat` of a directory: the kernel's nlink 1 ("not counted", every merged directory)
    /// against stratafs's true count, as in the tree comparison (`tree::diff`).
    fn uncounted_dir_nlink(&self, op: &Op, k: &Outcome, s: &Outcome) -> bool {
        let (Op::Stat { path }, Outcome::Value(kv), Outcome::Value(sv)) = (op, k, s) else {
            return false;
        };
        let dir = self.stratafs.path().join(path);
        if !kv.starts_with("mode=40") || !kv.ends_with(" nlink=1") || !dir.is_dir() {
            return false;
        }
        let subdirs = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .count()
            })
            .unwrap_or(0);
        kv.trim_end_matches(" nlink=1") == sv.trim_end_matches(&format!(" nlink={}", 2 + subdirs))
    }

    fn track_family(&mut self, op: &Op) {
        let is = |f: &std::collections::BTreeSet<String>, p: &str| {
            f.contains(p) || HARDLINK_FAMILY.iter().any(|n| p.ends_with(n))
        };
        match op {
            Op::Link { from, to } if is(&self.family, from) => {
                self.family.insert(to.clone());
            }
            Op::Unlink { path } => {
                self.family.remove(path);
            }
            Op::Rename { from, to, flags } => {
                let (a, b) = (is(&self.family, from), is(&self.family, to));
                let exchange = *flags & RENAME_EXCHANGE != 0;
                // Names at and below the source move to the target (and back for an
                // exchange); a name the rename replaced is gone.
                let swap = |m: &str| -> Option<String> {
                    let under = |m: &str, src: &str, dst: &str| {
                        if m == src {
                            Some(dst.to_string())
                        } else {
                            m.strip_prefix(&format!("{src}/"))
                                .map(|rest| format!("{dst}/{rest}"))
                        }
                    };
                    if let Some(n) = under(m, from, to) {
                        return Some(n);
                    }
                    if exchange {
                        return under(m, to, from).or_else(|| Some(m.to_string()));
                    }
                    let replaced = m == to.as_str() || m.starts_with(&format!("{to}/"));
                    (!replaced).then(|| m.to_string())
                };
                let mut family: std::collections::BTreeSet<String> =
                    self.family.iter().filter_map(|m| swap(m)).collect();
                if a {
                    family.insert(to.clone());
                }
                if exchange && b {
                    family.insert(from.clone());
                }
                self.family = family;
            }
            _ => {}
        }
    }

    pub fn merged_cmp(&self) -> Cmp<'_> {
        Cmp {
            mtime: Some(&self.dirty),
            ctime: false,
            nlink: true,
            ino: false,
            links: true,
            root_attrs: true,
            content: true,
        }
    }

    /// Compares the two merged trees now; returns false (and records why) if they differ.
    pub fn check_trees(&mut self, when: &str) -> bool {
        let k = tree::snapshot(self.kernel.path(), Snap::MERGED);
        let s = tree::snapshot(self.stratafs.path(), Snap::MERGED);
        let d = tree::diff("kernel", &k, "stratafs", &s, self.merged_cmp());
        if d.is_empty() {
            return true;
        }
        self.failures
            .push(format!("merged trees differ {when}:\n{}", d.join("\n")));
        false
    }
}

fn diff_block(
    what: &str,
    a: &Tree,
    a_name: &str,
    b: &Tree,
    b_name: &str,
    cmp: Cmp,
) -> Option<String> {
    let d = tree::diff(a_name, a, b_name, b, cmp);
    (!d.is_empty()).then(|| format!("{what}: {} path(s) differ:\n{}", d.len(), d.join("\n")))
}

/// The other paths under `root` of the regular file at `rel` when it has more than one
/// link (a walk of the mount: rare, and the fixture is small).
fn other_names(root: &std::path::Path, rel: &str) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(root.join(rel)) else {
        return Vec::new();
    };
    if !md.is_file() || md.nlink() <= 1 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                todo.push(e.path());
            } else if (m.dev(), m.ino()) == (md.dev(), md.ino())
                && let Ok(r) = e.path().strip_prefix(root)
            {
                let r = r.to_string_lossy().into_owned();
                if r != rel {
                    found.push(r);
                }
            }
        }
    }
    found
}

fn lower_changes(fx: &Fixture, who: &str) -> Option<String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fx.assert_lowers_unchanged()
    }))
    .err()
    .map(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "panic".into());
        format!("{who}: {msg}")
    })
}

/// Builds two standard fixtures, mounts kernel and stratafs, lets `drive` run operations,
/// then compares everything. Panics with every difference found (and `context`).
pub fn run(
    profile: &Profile,
    context: &str,
    stop_on_mismatch: bool,
    drive: impl FnOnce(&mut Driver),
) {
    if let Err(report) = compare(profile, stop_on_mismatch, drive) {
        panic!("differential [{}] {context}: {report}", profile.name);
    }
}

/// As [`run`], returning the report of the differences instead of panicking.
pub fn compare(
    profile: &Profile,
    stop_on_mismatch: bool,
    drive: impl FnOnce(&mut Driver),
) -> Result<(), String> {
    let fk = Fixture::standard();
    let fs = Fixture::standard();
    let mut d = Driver {
        kernel: fk.mount_kernel(profile.kernel_opts),
        stratafs: fs.mount_stratafs(profile.stratafs_opts),
        dirty: Dirty::default(),
        failures: Vec::new(),
        log: Vec::new(),
        stop_on_mismatch,
        stopped: false,
        family: Default::default(),
    };
    let initial_ok = d.check_trees("right after mounting (before any operation)");
    if initial_ok {
        drive(&mut d);
    }
    let kernel_merged = tree::snapshot(d.kernel.path(), Snap::MERGED);
    if initial_ok && !d.stopped {
        d.check_trees("after all operations");
    }
    let Driver {
        kernel,
        stratafs,
        dirty,
        mut failures,
        log,
        family,
        ..
    } = d;
    failures.extend(kernel.unmount_checked().err());
    failures.extend(stratafs.unmount_checked().err());

    {
        let mut ku = tree::snapshot(&fk.upper, Snap::UPPER);
        let mut su = tree::snapshot(&fs.upper, Snap::UPPER);
        if !profile.upper_hardlinks {
            for t in [&mut ku, &mut su] {
                t.entries.retain(|p, e| {
                    !(e.kind == tree::Kind::File
                        && (e.nlink > 1 || HARDLINK_FAMILY.iter().any(|n| p.ends_with(n))))
                });
            }
        }
        drop_plain_copies(&mut ku, &su, &fk, &dirty);
        drop_idle_opaque(&mut ku, &su, &fk);
        let cmp = Cmp {
            mtime: Some(&dirty),
            ctime: false,
            nlink: true,
            ino: false,
            links: true,
            root_attrs: true,
            content: true,
        };
        let upper_cmp = Cmp {
            content: profile.upper_content,
            ..cmp
        };
        failures.extend(diff_block(
            "upper layers after unmount",
            &ku,
            "kernel upper",
            &su,
            "stratafs upper",
            upper_cmp,
        ));

        if let Some(opts) = profile.cross_opts {
            let layers = Layers {
                lowers: fs.lowers.clone(),
                upper: Some(fs.upper.clone()),
                work: Some(fs.scratch("work2")),
            };
            let mnt = fs.scratch("mnt2");
            let m = Mount::kernel(&layers, &mnt, opts);
            let snap = Snap {
                keep_xattr: tree::keep_non_stratafs_xattr,
                ..Snap::MERGED
            };
            let mut cross = tree::snapshot(m.path(), snap);
            m.unmount();
            let mut want = kernel_merged.clone();
            if !profile.cross_hardlinks {
                drop_lower_hardlinks(&mut want, &mut cross, &family);
            }
            failures.extend(diff_block(
                "kernel mount of the stratafs upper vs the kernel's own merged view",
                &want,
                "kernel",
                &cross,
                "kernel(stratafs upper)",
                cmp,
            ));
        }
    }
    failures.extend(lower_changes(&fk, "kernel fixture"));
    failures.extend(lower_changes(&fs, "stratafs fixture"));
    if !failures.is_empty() {
        let tail: Vec<&String> = log
            .iter()
            .rev()
            // `STRATAFS_DIFF_TAIL=N`: how many of the last operations to print (default 40).
            .take(
                std::env::var("STRATAFS_DIFF_TAIL")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(40),
            )
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(format!(
            "{} failure(s)\n\n{}\n\nlast operations (kernel results):\n{}",
            failures.len(),
            failures.join("\n\n"),
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    Ok(())
}

/// What the topmost lower layer that has an entry at `p` holds there.
fn topmost_lower(fx: &Fixture, p: &str) -> Option<std::fs::Metadata> {
    fx.lowers
        .iter()
        .find_map(|l| std::fs::symlink_metadata(l.join(p)).ok())
}

/// Drops from the kernel's upper tree the directories stratafs's upper does not have and
/// that are plain copies of their lower directory: nothing below them is left in the upper
/// tree, no xattr is on them (bookkeeping ones are not in the snapshot), and mode, owner
/// and mtime (unless stamped with "now", see `Dirty`) are the topmost lower directory's. Their parents' nlink is counted down.
/// The kernel leaves such copies where stratafs changes nothing: it copies a directory up
/// before a rename that then fails (redirect_dir=on: ENOTEMPTY, EXDEV...), and it copies up
/// the parents of the name of a hard link a syscall used, where stratafs, not given the
/// name by FUSE, uses a name whose parent is already up (see `Profile::upper_hardlinks`).
/// Such a copy hides nothing, and the merged views are compared in full. Deepest first, so
/// a chain of them goes as a whole.
fn drop_plain_copies(ku: &mut Tree, su: &Tree, fx: &Fixture, dirty: &Dirty) {
    use std::os::unix::fs::MetadataExt;
    let mut dirs: Vec<String> = ku
        .entries
        .iter()
        .filter(|(p, e)| !p.is_empty() && e.kind == tree::Kind::Dir && !su.entries.contains_key(*p))
        .map(|(p, _)| p.clone())
        .collect();
    dirs.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for p in dirs {
        let e = &ku.entries[&p];
        let prefix = format!("{p}/");
        if !e.xattrs.is_empty() || ku.entries.keys().any(|k| k.starts_with(&prefix)) {
            continue;
        }
        let plain = topmost_lower(fx, &p).is_some_and(|m| {
            m.is_dir()
                && m.mode() & 0o7777 == e.mode
                && (m.uid(), m.gid()) == (e.uid, e.gid)
                && (dirty.contains(&p) || (m.mtime(), m.mtime_nsec()) == e.mtime)
        });
        if !plain {
            continue;
        }
        ku.entries.remove(&p);
        if let Some(parent) = ku.entries.get_mut(&tree::parent_of(&p)) {
            parent.nlink -= 1;
        }
    }
}

/// Drops the kernel's opaque mark from an upper directory that stratafs keeps unmarked when
/// the mark cannot hide anything: no lower layer has an entry at its path and no redirect is
/// on the directory or above it. The kernel leaves such marks behind after a *failed* rename:
/// ovl_rename marks a pure-upper source dir opaque when its new parent is merged, then the
/// upper filesystem's rename fails (ENOTEMPTY) and the mark stays. stratafs changes nothing
/// on a failed operation; the merged views, compared in full, show the two are the same.
fn drop_idle_opaque(kernel_upper: &mut Tree, stratafs_upper: &Tree, fk: &Fixture) {
    const OPAQUE: &str = "trusted.overlay.opaque";
    for (p, e) in kernel_upper.entries.iter_mut() {
        if p.is_empty() || e.kind != tree::Kind::Dir || !e.xattrs.contains_key(OPAQUE) {
            continue;
        }
        let Some(ours) = stratafs_upper.entries.get(p) else {
            continue;
        };
        if ours.kind != tree::Kind::Dir || ours.xattrs.contains_key(OPAQUE) {
            continue;
        }
        let in_lower = topmost_lower(fk, p).is_some();
        let redirected = std::path::Path::new(p.as_str())
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| {
                crate::util::sys::lgetxattr(&fk.upper.join(a), "trusted.overlay.redirect").is_ok()
            });
        if !in_lower && !redirected {
            e.xattrs.remove(OPAQUE);
        }
    }
}

/// Removes from both trees every name of the fixture's lower hard links (and of links made
/// from them, whatever they were renamed to) that either tree shows.
fn drop_lower_hardlinks(a: &mut Tree, b: &mut Tree, moved: &std::collections::BTreeSet<String>) {
    let family = |p: &str| {
        moved
            .iter()
            .any(|m| p.trim_start_matches('/') == m.trim_start_matches('/'))
            || HARDLINK_FAMILY.iter().any(|n| p.ends_with(n))
    };
    let mut names = std::collections::BTreeSet::new();
    for t in [&*a, &*b] {
        for (p, e) in &t.entries {
            if e.kind == tree::Kind::File
                && (family(p) || e.same_inode_as.iter().any(|q| family(q)))
            {
                names.insert(p.clone());
                names.extend(e.same_inode_as.iter().cloned());
            }
        }
    }
    for t in [a, b] {
        t.entries.retain(|p, _| !names.contains(p));
    }
}

fn s(x: &str) -> String {
    x.to_string()
}

/// The scripted sequence: every kind of change, on every kind of fixture entry.
pub fn scripted_ops() -> Vec<Op> {
    let t1 = (1_234_567_890, 123_456_789);
    let t2 = (1_111_111_111, 5);
    vec![
        // Reads first: the merged view as built.
        Op::Read { path: s("a.txt") },
        Op::Read { path: s("b.txt") },
        Op::Read { path: s("c.txt") },
        Op::Read { path: s("dir1/f1") },
        Op::Read { path: s("dir1/f2") },
        Op::Read {
            path: s("opq/hidden"),
        },
        Op::ReadDir { path: s("") },
        Op::ReadDir { path: s("merged") },
        Op::ReadDir {
            path: s("merged/inner"),
        },
        Op::ReadDir { path: s("opq") },
        Op::ReadDir { path: s("opq_up") },
        Op::ReadDir { path: s("dir1") },
        Op::ReadDir {
            path: s("dir_over_file"),
        },
        Op::Stat { path: s("merged") },
        Op::Stat { path: s("hl2") },
        Op::ListXattr { path: s("xa") },
        Op::ListXattr { path: s("opq") },
        Op::GetXattr {
            path: s("opq"),
            name: s("trusted.overlay.opaque"),
        },
        Op::GetXattr {
            path: s("opq_up"),
            name: s("trusted.overlay.opaque"),
        },
        // Data changes: copy-up.
        Op::write("a.txt", None, b"more\n"),
        Op::write("big.bin", Some(4 << 20), &[0x5a; 4096]),
        Op::write("sparse.img", Some(32 << 20), b"island in the middle"),
        Op::write("dir_link/f3", None, b"through a symlinked dir\n"),
        Op::write("dir1/sub/deep/file", Some(2), b"EE"),
        Op::Truncate {
            path: s("b.txt"),
            len: 3,
        },
        Op::Truncate {
            path: s("dir1/f3"),
            len: 100_000,
        },
        Op::OpenTrunc {
            path: s("merged/both"),
        },
        Op::OpenTrunc { path: s("c.txt") },
        Op::write("rel_link", None, b"no follow\n"),
        // Metadata changes.
        Op::Chmod {
            path: s("modes/m600"),
            mode: 0o640,
        },
        Op::Chmod {
            path: s("modes/sticky"),
            mode: 0o755,
        },
        Op::Chmod {
            path: s("l1only"),
            mode: 0o700,
        },
        Op::Chmod {
            path: s("rel_link"),
            mode: 0o604,
        },
        Op::Chown {
            path: s("xa"),
            uid: 1234,
            gid: 5678,
        },
        Op::Chown {
            path: s("dangling"),
            uid: 42,
            gid: 43,
        },
        Op::Chown {
            path: s("modes/sgid"),
            uid: 7,
            gid: 8,
        },
        Op::Utimes {
            path: s("top.txt"),
            atime: t2,
            mtime: t1,
        },
        Op::Utimes {
            path: s("merged/inner"),
            atime: t1,
            mtime: t2,
        },
        Op::Utimes {
            path: s("abs_link"),
            atime: t1,
            mtime: t1,
        },
        Op::Utimes {
            path: s("fifo"),
            atime: t2,
            mtime: t2,
        },
        Op::SetXattr {
            path: s("dir1/f1"),
            name: s("user.new"),
            value: b"val".to_vec(),
            flags: 0,
        },
        Op::SetXattr {
            path: s("xa"),
            name: s("user.foo"),
            value: b"x".to_vec(),
            flags: libc::XATTR_CREATE,
        },
        Op::SetXattr {
            path: s("xa"),
            name: s("user.none"),
            value: b"x".to_vec(),
            flags: libc::XATTR_REPLACE,
        },
        Op::SetXattr {
            path: s("l2only"),
            name: s("user.dirx"),
            value: b"on a lower dir".to_vec(),
            flags: 0,
        },
        Op::RemoveXattr {
            path: s("xa"),
            name: s("user.foo"),
        },
        Op::RemoveXattr {
            path: s("xa"),
            name: s("user.nope"),
        },
        Op::RemoveXattr {
            path: s("l1only"),
            name: s("user.dir"),
        },
        Op::ListXattr { path: s("xa") },
        Op::GetXattr {
            path: s("xa"),
            name: s("user.bar"),
        },
        Op::GetXattr {
            path: s("xa"),
            name: s("user.bin"),
        },
        // Removal.
        Op::Unlink { path: s("hl1") },
        Op::Stat { path: s("hl2") },
        Op::Unlink { path: s("c.txt") },
        Op::Unlink {
            path: s("up_only.txt"),
        },
        Op::Unlink { path: s("fifo") },
        Op::Unlink { path: s("chardev") },
        Op::Rmdir { path: s("merged") },
        Op::Unlink {
            path: s("merged/from_l0"),
        },
        Op::Unlink {
            path: s("merged/from_l1"),
        },
        Op::Unlink {
            path: s("merged/from_l2"),
        },
        Op::Unlink {
            path: s("merged/from_up"),
        },
        Op::Unlink {
            path: s("merged/both"),
        },
        Op::Unlink {
            path: s("merged/inner/x"),
        },
        Op::Unlink {
            path: s("merged/inner/y"),
        },
        Op::Rmdir {
            path: s("merged/inner"),
        },
        Op::Rmdir { path: s("merged") },
        Op::Stat { path: s("merged") },
        Op::Rmdir { path: s("opq") },
        Op::Unlink {
            path: s("opq/visible"),
        },
        Op::Rmdir { path: s("opq") },
        Op::Rmdir {
            path: s("empty_dir"),
        },
        Op::Unlink { path: s("dir1") },
        Op::Rmdir { path: s("a.txt") },
        // Names reused: mkdir over whiteouts (must be opaque), files over removed dirs.
        Op::Mkdir {
            path: s("wh_target"),
            mode: 0o755,
        },
        Op::ReadDir {
            path: s("wh_target"),
        },
        Op::Create {
            path: s("wh_target/inside"),
            data: b"inside\n".to_vec(),
        },
        Op::Mkdir {
            path: s("wh_dir"),
            mode: 0o711,
        },
        Op::ReadDir { path: s("wh_dir") },
        Op::Mkdir {
            path: s("merged"),
            mode: 0o755,
        },
        Op::ReadDir { path: s("merged") },
        Op::Create {
            path: s("opq"),
            data: b"file where opq was\n".to_vec(),
        },
        Op::Unlink {
            path: s("file_over_dir"),
        },
        Op::Mkdir {
            path: s("file_over_dir"),
            mode: 0o755,
        },
        Op::ReadDir {
            path: s("file_over_dir"),
        },
        Op::Rmdir {
            path: s("dir_over_file"),
        },
        Op::Unlink {
            path: s("dir_over_file/z"),
        },
        Op::Rmdir {
            path: s("dir_over_file"),
        },
        Op::Create {
            path: s("dir_over_file"),
            data: b"file again\n".to_vec(),
        },
        Op::Read {
            path: s("dir_over_file"),
        },
        // Creation.
        Op::Create {
            path: s("dir1/sub/new.txt"),
            data: b"new\n".to_vec(),
        },
        Op::Create {
            path: s("top.txt"),
            data: b"exists\n".to_vec(),
        },
        Op::Create {
            path: s("hl1"),
            data: b"recreated\n".to_vec(),
        },
        Op::Mkdir {
            path: s("dir1"),
            mode: 0o755,
        },
        Op::Mkdir {
            path: s("newdir/deeper"),
            mode: 0o755,
        },
        Op::Mkdir {
            path: s("newdir"),
            mode: 0o750,
        },
        Op::Mkdir {
            path: s("newdir/deeper"),
            mode: 0o700,
        },
        Op::Symlink {
            target: s("a.txt"),
            path: s("newlink"),
        },
        Op::Symlink {
            target: s("nowhere/at/all"),
            path: s("dir1/newdangling"),
        },
        Op::Symlink {
            target: s("x"),
            path: s("rel_link"),
        },
        Op::Link {
            from: s("hl2"),
            to: s("hl2_link"),
        },
        Op::Link {
            from: s("a.txt"),
            to: s("dir1/a_link"),
        },
        Op::Link {
            from: s("dir1/f2"),
            to: s("f2_link"),
        },
        Op::Link {
            from: s("l1only"),
            to: s("dirlink"),
        },
        Op::Stat { path: s("hl2") },
        Op::Stat {
            path: s("hl_dir/hl3"),
        },
        Op::Mkfifo { path: s("newfifo") },
        Op::Mknod {
            path: s("newchr"),
            major: 1,
            minor: 3,
        },
        Op::Mknod {
            path: s("l2only/newnull"),
            major: 1,
            minor: 5,
        },
        // Renames.
        Op::rename("dir1/f1", "dir1/f1_renamed"),
        Op::rename("b.txt", "dir1/b_moved"),
        Op::rename("newlink", "a.txt"),
        Op::rename("top.txt", "l2only/f"),
        Op::rename("c.txt", "c2.txt"),
        Op::rename("dir1/f3", "wh_dir/f3"),
        Op::rename("modes/m755", "modes/private/m755"),
        Op::rename("dir1", "dir1_moved"),
        Op::rename("l2only", "l2only_moved"),
        Op::rename("newdir", "newdir_moved"),
        Op::rename("wh_target", "newdir_moved/wh_target"),
        Op::rename("up_dir", "up_dir_moved"),
        Op::rename("xa", "l1only"),
        Op::rename("l1only/inner", "l1only/inner2"),
        Op::rename("empty_dir", "wh_dir"),
        Op::rename_flags("hl2_link", "dir1/a_link", RENAME_NOREPLACE),
        Op::rename_flags("hl2_link", "hl2_link_nr", RENAME_NOREPLACE),
        Op::rename_flags("modes/suid", "modes/ro", RENAME_EXCHANGE),
        Op::rename_flags("modes/suid", "modes/none", RENAME_EXCHANGE),
        Op::rename_flags("newfifo", "dir1/f_up", RENAME_EXCHANGE),
        // The state after all of it, read through the mount.
        Op::ReadDir { path: s("") },
        Op::ReadDir { path: s("dir1") },
        Op::ReadDir { path: s("modes") },
        Op::ReadDir { path: s("wh_dir") },
        Op::Read { path: s("a.txt") },
        Op::Read {
            path: s("modes/ro"),
        },
        Op::Read {
            path: s("l2only/f"),
        },
        Op::Stat { path: s("dir1") },
        Op::Stat { path: s("modes") },
        Op::Stat { path: s("") },
    ]
}

#[test]
fn scripted_ops_match_kernel_compat() {
    run(&COMPAT, "scripted", false, |d| {
        for op in scripted_ops() {
            if COMPAT.hardlink_ops || !touches_hardlinks(&op) {
                d.step(&op);
            }
        }
    });
}

#[test]
fn scripted_ops_match_kernel_native() {
    run(&NATIVE, "scripted", false, |d| {
        for op in scripted_ops() {
            d.step(&op);
        }
    });
}

/// The merged view right after mounting, with no operation at all, matches the kernel's
/// (and so does a stratafs-written upper after a mount that changed nothing).
#[test]
fn untouched_mount_matches_kernel() {
    run(&COMPAT, "no operations", false, |_| {});
}

/// Where the kernel leaves upper-layer traces that change nothing in the merged view, and
/// stratafs leaves none (found by the random differential; see `drop_plain_copies`,
/// `drop_idle_opaque` and the directory nlink rule in `tree::diff`): each must still match.
#[test]
fn kernel_only_traces_in_the_upper_layer_match() {
    // The kernel copies up hl_dir, the parent of the name used; stratafs links a name whose
    // parent is already up, and hl_dir stays lower-only (nlink counted, not 1).
    run(
        &NATIVE,
        "truncate of a hard link in a lower dir",
        true,
        |d| {
            d.step(&Op::Truncate {
                path: s("hl_dir/hl3"),
                len: 10,
            });
            d.step(&Op::Stat { path: s("hl_dir") });
        },
    );
    // redirect_dir=on: the kernel copies the source up, then finds the target not empty.
    run(&NATIVE, "refused rename of a lower dir", true, |d| {
        d.step(&Op::rename("dir_over_file", "opq_up"));
    });
    // A new directory renamed onto a non-empty merged one: the kernel marks it opaque
    // before the upper rename fails with ENOTEMPTY.
    for profile in [&COMPAT, &NATIVE] {
        run(profile, "refused rename of a new dir", true, |d| {
            d.step(&Op::Mkdir {
                path: s("dir_over_file/new"),
                mode: 0o755,
            });
            d.step(&Op::rename("dir_over_file/new", "opq_up"));
        });
    }
}
