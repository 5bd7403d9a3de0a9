//! The semantics stratafs has on by default beyond the kernel's defaults (directory rename
//! with redirects, hard links kept through copy-up, st_ino kept across copy-up and remounts,
//! metadata-only copy-up), each on a real mount and, where the kernel has the feature, against
//! kernel overlayfs with `redirect_dir=on,metacopy=on,index=on` over the same layers.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::mount::Layers;
use crate::util::tree::{self, Snap};
use crate::util::{Fixture, Mount};

/// The first and last 4 KiB and 4 KiB from the middle of a 1 GiB file.
fn islands(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(p).expect("open");
    let mut out = Vec::new();
    for off in [0u64, 1 << 29, (1 << 30) - 4096] {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, off).expect("read");
        out.extend_from_slice(&b);
    }
    out
}

/// Every path of a tree with its st_ino.
fn inos(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {rel}: {e}"));
        out.insert(rel.clone(), md.ino());
        if md.is_dir() {
            for e in fs::read_dir(&p).expect("readdir") {
                let name = e.expect("entry").file_name().into_string().expect("utf-8");
                stack.push(if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
    }
    out
}

/// The dpkg/rustup pattern: build `d.new`, move `d` away, move `d.new` in, delete the old one,
/// on directories with lower content. The kernel with redirects is the oracle.
#[test]
fn package_manager_directory_swap_matches_kernel_with_redirects() {
    let build = || {
        let mut fx = Fixture::new(2);
        fx.lower(1)
            .dir("usr/lib/pkg/sub")
            .file("usr/lib/pkg/a", b"1\n");
        fx.lower(1).file("usr/lib/pkg/sub/b", b"2\n");
        fx.lower(0)
            .dir("usr/lib/pkg")
            .file("usr/lib/pkg/top", b"3\n");
        fx.seal();
        fx
    };
    let script = |m: &Path| {
        let lib = m.join("usr/lib");
        fs::create_dir(lib.join("pkg.new")).expect("mkdir pkg.new");
        fs::write(lib.join("pkg.new/a"), b"new\n").expect("write");
        fs::rename(lib.join("pkg"), lib.join("pkg.old")).expect("mv pkg pkg.old");
        fs::rename(lib.join("pkg.new"), lib.join("pkg")).expect("mv pkg.new pkg");
        fs::remove_dir_all(lib.join("pkg.old")).expect("rm -rf pkg.old");
        fs::create_dir(m.join("moved")).expect("mkdir moved");
        fs::rename(lib, m.join("moved/lib")).expect("mv usr/lib moved/lib");
    };
    let fk = build();
    let fs_ = build();
    let k = fk.mount_kernel("redirect_dir=on,metacopy=on,index=on");
    let s = fs_.mount_stratafs("");
    script(k.path());
    script(s.path());
    let (kt, st) = (
        tree::snapshot(k.path(), Snap::MERGED),
        tree::snapshot(s.path(), Snap::MERGED),
    );
    let diff = tree::diff(
        "kernel",
        &kt,
        "stratafs",
        &st,
        tree::Cmp {
            mtime: None,
            ctime: false,
            nlink: true,
            ino: false,
            links: true,
            root_attrs: false,
            content: true,
        },
    );
    assert!(diff.is_empty(), "merged trees differ:\n{}", diff.join("\n"));
    k.unmount();
    s.unmount();
    // The stratafs upper layer, mounted by the kernel with redirects, shows the same tree.
    let layers = Layers {
        lowers: fs_.lowers.clone(),
        upper: Some(fs_.upper.clone()),
        work: Some(fs_.scratch("work2")),
    };
    let cross = Mount::kernel(&layers, &fs_.scratch("mnt2"), "redirect_dir=on");
    // The kernel does not hide stratafs's own bookkeeping xattrs (origin, nlink).
    let snap = Snap {
        keep_xattr: tree::keep_non_stratafs_xattr,
        ..Snap::MERGED
    };
    let ct = tree::snapshot(cross.path(), snap);
    let diff = tree::diff(
        "stratafs",
        &st,
        "kernel(stratafs upper)",
        &ct,
        tree::Cmp {
            mtime: None,
            ctime: false,
            nlink: false,
            ino: false,
            links: true,
            root_attrs: false,
            content: true,
        },
    );
    assert!(
        diff.is_empty(),
        "kernel reads the upper differently:\n{}",
        diff.join("\n")
    );
    fs_.assert_lowers_unchanged();
}

/// A 5000-entry lower directory renamed three times (across parents too) costs O(1): no
/// entry is copied, and the listing afterwards is complete.
#[test]
fn large_lower_directory_renamed_three_times_in_constant_time() {
    let mut fx = Fixture::new(1);
    let big = fx.lowers[0].join("big");
    fs::create_dir(&big).expect("mkdir");
    for i in 0..5000 {
        fs::write(big.join(format!("f{i}")), b"").expect("create");
    }
    fx.seal();
    let m = fx.mount_stratafs("");
    fs::create_dir(m.join("sub")).expect("mkdir sub");
    let t = Instant::now();
    fs::rename(m.join("big"), m.join("b1")).expect("mv 1");
    fs::rename(m.join("b1"), m.join("sub/b2")).expect("mv 2");
    fs::rename(m.join("sub/b2"), m.join("b3")).expect("mv 3");
    let took = t.elapsed();
    assert_eq!(fs::read_dir(m.join("b3")).expect("ls").count(), 5000);
    assert!(!m.join("big").exists() && !m.join("sub/b2").exists());
    m.unmount();
    let upper_entries = tree::snapshot(&fx.upper, Snap::UPPER).entries.len();
    assert!(
        upper_entries < 10,
        "renames copied entries up: {upper_entries} upper entries"
    );
    // Generous bound: a copy of 5000 entries takes far longer on this machine.
    assert!(took < Duration::from_secs(2), "three renames took {took:?}");
    fx.assert_lowers_unchanged();
}

/// Hard links below stay one inode after one name is changed: same st_ino, right nlink, the
/// write seen through every name, during the mount and after a remount.
#[test]
fn hard_links_stay_one_inode_through_copy_up_and_remount() {
    let mut fx = Fixture::new(1);
    fx.lower(0).dir("x").dir("y").file("x/a", b"orig\n");
    fx.lower(0).hardlink("x/a", "y/b").hardlink("x/a", "c");
    fx.seal();
    let check = |m: &Mount, want: &str, nlink: u64| {
        let mds: Vec<_> = ["x/a", "y/b", "c"]
            .iter()
            .map(|p| fs::metadata(m.join(p)).expect("stat"))
            .collect();
        for (p, md) in ["x/a", "y/b", "c"].iter().zip(&mds) {
            assert_eq!(md.ino(), mds[0].ino(), "{p}: st_ino");
            assert_eq!(md.nlink(), nlink, "{p}: nlink");
            assert_eq!(fs::read_to_string(m.join(p)).expect("read"), want, "{p}");
        }
        mds[0].ino()
    };
    let m = fx.mount_stratafs("");
    let ino = check(&m, "orig\n", 3);
    OpenOptions::new()
        .append(true)
        .open(m.join("y/b"))
        .and_then(|mut f| f.write_all(b"more\n"))
        .expect("append");
    assert_eq!(
        check(&m, "orig\nmore\n", 3),
        ino,
        "st_ino changed by copy-up"
    );
    fs::hard_link(m.join("c"), m.join("d")).expect("ln c d");
    assert_eq!(fs::metadata(m.join("d")).expect("stat").nlink(), 4);
    fs::remove_file(m.join("d")).expect("rm d");
    m.unmount();
    let m = fx.mount_stratafs("");
    assert_eq!(
        check(&m, "orig\nmore\n", 3),
        ino,
        "st_ino changed by remount"
    );
    fx.assert_lowers_unchanged();
}

/// Every st_ino of a multi-layer tree is the same before and after copy-ups and a remount.
#[test]
fn every_st_ino_survives_copy_up_and_remount() {
    let mut fx = Fixture::new(2);
    fx.lower(1).dir("d/e").file("d/e/f", b"1").file("d/g", b"2");
    fx.lower(0).dir("d").file("d/h", b"3").symlink("d/s", "h");
    fx.seal();
    let m = fx.mount_stratafs("");
    let before = inos(m.path());
    fs::write(m.join("d/e/f"), b"changed").expect("write");
    std::os::unix::fs::chown(m.join("d/g"), Some(7), Some(7)).expect("chown");
    std::os::unix::fs::lchown(m.join("d/s"), Some(8), Some(8)).expect("lchown");
    assert_eq!(inos(m.path()), before, "st_ino changed by copy-up");
    m.unmount();
    let m = fx.mount_stratafs("");
    assert_eq!(inos(m.path()), before, "st_ino changed by remount");
}

/// chmod of a 1 GiB lower file copies metadata only: fast, no data in the upper layer, and the
/// data is still read from below (also by the kernel with metacopy=on over our upper).
#[test]
fn chmod_of_a_large_lower_file_copies_metadata_only() {
    let mut fx = Fixture::new(1);
    fx.lower(0)
        .sparse("big", 1 << 30, &[(0, 4096), ((1 << 30) - 4096, 4096)]);
    fx.seal();
    let want = islands(&fx.lowers[0].join("big"));
    let m = fx.mount_stratafs("");
    let t = Instant::now();
    fs::set_permissions(
        m.join("big"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "chmod took {took:?}");
    let md = fs::metadata(m.join("big")).expect("stat");
    assert_eq!((md.len(), md.mode() & 0o7777), (1 << 30, 0o600));
    assert_eq!(islands(&m.join("big")), want, "data changed");
    m.unmount();
    let up = fs::metadata(fx.upper.join("big")).expect("upper");
    assert_eq!(up.blocks(), 0, "the upper copy holds data");
    let layers = Layers {
        lowers: fx.lowers.clone(),
        upper: Some(fx.upper.clone()),
        work: Some(fx.scratch("work2")),
    };
    let k = Mount::kernel(&layers, &fx.scratch("mnt2"), "metacopy=on,redirect_dir=on");
    assert_eq!(islands(&k.join("big")), want, "the kernel reads other data");
    fx.assert_lowers_unchanged();
}

/// The daemon's threads whose name starts with `prefix`, and the sum of their read syscalls
/// (`syscr`): fuser's threads make one read of /dev/fuse per request they get.
fn thread_reads(pid: u32, prefix: &str) -> (usize, u64) {
    let (mut n, mut reads) = (0, 0);
    for t in fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = t.expect("task").path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        n += 1;
        let io = fs::read_to_string(dir.join("io")).unwrap_or_default();
        reads += io
            .lines()
            .find_map(|l| l.strip_prefix("syscr:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (n, reads)
}

/// With the fuse module's `enable_uring` on, requests are served over io_uring by the ring
/// threads (one queue per CPU), and fuser's /dev/fuse threads read none of them; with it off,
/// or with STRATAFS_NO_URING, there are no ring threads and /dev/fuse carries every request.
/// Which of the two the machine has is set by scripts/test, which runs the suite once each way.
#[test]
fn requests_go_over_io_uring_exactly_when_the_kernel_offers_it() {
    let param = "/sys/module/fuse/parameters/enable_uring";
    // Without the parameter (before Linux 6.14, or a kernel built without it) it is off.
    let on = fs::read_to_string(param).is_ok_and(|v| v.trim() == "Y");
    const N: usize = 300;
    let mut fx = Fixture::new(1);
    fx.lower(0).dir("d");
    for i in 0..N {
        fx.lower(0).file(&format!("d/f{i}"), b"x");
    }
    fx.seal();
    for env in [&[][..], &[("STRATAFS_NO_URING", "1")]] {
        let m = Mount::stratafs_env(&fx.layers(), &fx.mnt, "", env);
        let pid = *crate::util::mount::daemon_pids(m.path())
            .first()
            .expect("daemon pid");
        let uring = on && env.is_empty();
        fs::read_dir(m.path()).expect("readdir").for_each(drop);
        let (rings, _) = thread_reads(pid, "uring-");
        let (fusers, before) = thread_reads(pid, "fuser-");
        assert!(fusers > 0, "no fuser threads");
        // N lookups, each a request of its own.
        for i in 0..N {
            let p = m.join(format!("d/f{i}"));
            fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
        let (_, after) = thread_reads(pid, "fuser-");
        let reads = after - before;
        if uring {
            assert!(rings > 0, "enable_uring=Y but no ring threads");
            assert!(
                reads < (N / 10) as u64,
                "{N} lookups over io_uring, yet /dev/fuse was read {reads} times"
            );
        } else {
            assert_eq!(rings, 0, "ring threads with {env:?}, enable_uring={on}");
            assert!(
                reads >= N as u64,
                "{N} lookups over /dev/fuse, which was read {reads} times"
            );
        }
        m.unmount();
    }
}

/// While the rings serve the requests, /dev/fuse carries the FORGETs (the kernel never sends
/// them over io_uring). Readers that wait between FORGETs let the kernel batch them, so an
/// `rm` of N files known to the kernel costs far fewer than N wakeups of fuser's threads:
/// about one read a millisecond, all threads together. Without rings, each unlink is a request
/// of its own over /dev/fuse, and nothing pauses.
#[test]
fn forgets_come_in_batches_while_the_rings_serve() {
    let on = fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y");
    const N: usize = 3000;
    let mut fx = Fixture::new(1);
    fx.lower(0).dir("d");
    fx.seal();
    let m = Mount::stratafs(&fx.layers(), &fx.mnt, "");
    let pid = *crate::util::mount::daemon_pids(m.path())
        .first()
        .expect("daemon pid");
    for i in 0..N {
        fs::write(m.join(format!("d/f{i}")), b"x").expect("create");
    }
    let (fusers, before) = thread_reads(pid, "fuser-");
    assert!(fusers > 0, "no fuser threads");
    let t = std::time::Instant::now();
    for i in 0..N {
        fs::remove_file(m.join(format!("d/f{i}"))).expect("unlink");
    }
    let ms = t.elapsed().as_millis() as u64;
    // The FORGETs of the last files may still be on their way.
    std::thread::sleep(Duration::from_millis(50));
    let (_, after) = thread_reads(pid, "fuser-");
    let reads = after - before;
    println!("forgets: {N} unlinks in {ms} ms, /dev/fuse read {reads} times by {fusers} threads");
    if on {
        // About one read a millisecond, whatever the number of threads; slack for the
        // first FORGET each thread takes before the waits line up, and for the 50 ms above.
        let bound = ms + 50 + 4 * fusers as u64 + 20;
        assert!(
            reads <= bound && reads < (N * 3 / 4) as u64,
            "{N} unlinks in {ms} ms over io_uring: /dev/fuse was read {reads} times \
             ({fusers} threads; at most {bound}, and fewer than {} wanted)",
            N * 3 / 4
        );
    } else {
        assert!(
            reads >= N as u64,
            "{N} unlinks over /dev/fuse, which was read only {reads} times"
        );
    }
    assert_eq!(fs::read_dir(m.join("d")).expect("readdir").count(), 0);
    m.unmount();
}

/// A ring that fails to set up part way (here: queue 1 never registered, so the kernel never
/// switches to the ring) leaves the mount working over /dev/fuse, not waiting for queues that
/// will never come.
#[test]
fn a_failed_io_uring_setup_leaves_the_mount_on_dev_fuse() {
    let cpus = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut fx = Fixture::new(1);
    fx.lower(0).dir("d").file("d/f", b"lower\n");
    fx.seal();
    let m = Mount::stratafs_env(
        &fx.layers(),
        &fx.mnt,
        "",
        &[("STRATAFS_FAILPOINT", "uring-setup:1")],
    );
    // Off the test thread, so a hang shows as a timeout instead of a stuck test.
    let root = m.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<()> {
            assert_eq!(fs::read(root.join("d/f"))?, b"lower\n");
            fs::write(root.join("d/new"), b"upper\n")?;
            assert_eq!(fs::read(root.join("d/new"))?, b"upper\n");
            fs::remove_file(root.join("d/f"))?;
            Ok(())
        })();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(r) => r.expect("I/O on a mount whose ring setup failed"),
        Err(_) => panic!("requests hang on a mount whose ring setup failed ({cpus})"),
    }
    m.unmount();
}

/// The fds the daemon holds: one per node the kernel knows (and a few of its own).
fn daemon_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count()
}

/// A mount with `var=value` in the daemon's environment fails, with a message naming `var`.
fn env_value_fails_the_mount(fx: &Fixture, var: &str, value: &str) {
    let args = [
        "-o".to_string(),
        fx.layers().options(),
        fx.mnt.display().to_string(),
    ];
    let Err(out) = Mount::stratafs_args_env(&args, &fx.mnt, None, &[(var, value)]) else {
        panic!("{var}={value} must fail the mount");
    };
    assert!(
        out.describe().contains(var),
        "unclear error: {}",
        out.describe()
    );
}

/// Looking a listed name up gives the st_ino the listing gave as d_ino.
fn d_ino_is_st_ino(e: &fs::DirEntry) {
    let st = fs::symlink_metadata(e.path()).expect("lstat");
    assert_eq!(
        e.ino(),
        st.ino(),
        "d_ino != st_ino for {}",
        e.path().display()
    );
}

/// READDIRPLUS entries are lookups done ahead, and a cold `find` that never stats the files
/// it lists is 4x slower with them. Over io_uring, files are listed without attributes (no
/// node, no fd) until the names listed that way get looked up soon after (`ls -l`, `rm -rf`);
/// then listings carry them again. Over /dev/fuse (fuser cannot send entries without
/// attributes) every entry carries them. Either way d_ino equals st_ino.
#[test]
fn readdirplus_lists_files_bare_until_their_names_get_looked_up() {
    let on = fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y");
    const N: usize = 300;
    let mut fx = Fixture::new(2);
    for d in ["a", "b", "c"] {
        fx.lower(1).dir(&format!("{d}/sub"));
        for i in 0..N {
            // Both layers: d_ino must name the top one's object.
            fx.lower(i % 2).file(&format!("{d}/f{i}"), b"x");
        }
    }
    fx.seal();
    let m = Mount::stratafs(&fx.layers(), &fx.mnt, "");
    let pid = *crate::util::mount::daemon_pids(m.path())
        .first()
        .expect("daemon pid");
    // Until the rings are up, requests go over /dev/fuse.
    let deadline = Instant::now() + Duration::from_secs(10);
    while on && thread_reads(pid, "uring-").0 == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = |d: &str| -> (Vec<fs::DirEntry>, usize) {
        let before = daemon_fds(pid);
        let v: Vec<fs::DirEntry> = fs::read_dir(m.join(d))
            .expect("readdir")
            .map(|e| e.expect("dirent"))
            .collect();
        assert_eq!(v.len(), N + 1, "{d}: entries");
        (v, daemon_fds(pid).saturating_sub(before))
    };
    let (a, fds_a) = list("a");
    println!("listing a: {fds_a} new fds (io_uring: {on})");
    if on {
        assert!(
            fds_a < 10,
            "a cold listing over io_uring made {fds_a} nodes for {N} files"
        );
    } else {
        // With FUSE_READDIRPLUS_AUTO, the kernel asks READDIRPLUS for the first chunk of a
        // listing (about 200 entries here) and plain READDIR for the rest.
        assert!(
            fds_a >= N / 2,
            "READDIRPLUS over /dev/fuse made only {fds_a} nodes"
        );
    }
    // Now every name listed is looked up, as `ls -l` does.
    a.iter().for_each(d_ino_is_st_ino);
    let (b, fds_b) = list("b");
    println!("listing b after stat'ing a: {fds_b} new fds");
    assert!(
        fds_b >= N / 2,
        "after every name of a was looked up, listing b made only {fds_b} nodes"
    );
    b.iter().for_each(d_ino_is_st_ino);
    // A fixed choice: never, which is what a plain READDIR gives.
    drop(m);
    let m = Mount::stratafs_env(
        &fx.layers(),
        &fx.mnt,
        "",
        &[("STRATAFS_READDIRPLUS_ATTRS", "never")],
    );
    for d in ["a", "b", "c"] {
        for e in fs::read_dir(m.join(d)).expect("readdir") {
            d_ino_is_st_ino(&e.expect("dirent"));
        }
    }
    drop(m);
    env_value_fails_the_mount(&fx, "STRATAFS_READDIRPLUS_ATTRS", "sometimes");
}

/// The bdi `read_ahead_kb` of the mount at `mnt`.
fn mount_read_ahead_kb(mnt: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = mnt.to_string_lossy();
    let majmin = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*want))
        .and_then(|l| l.split(' ').nth(2))
        .unwrap_or_else(|| panic!("{want} not in mountinfo"))
        .to_string();
    fs::read_to_string(format!("/sys/class/bdi/{majmin}/read_ahead_kb"))
        .expect("read_ahead_kb")
        .trim()
        .to_string()
}

/// `STRATAFS_READ_AHEAD_KB` sets the mount's readahead before the mount command returns (cold
/// sequential reads and mmap read-around then come in bigger READs); data read that way is the
/// lower file's; a bad value fails the mount and leaves nothing mounted.
#[test]
fn read_ahead_kb_sets_the_mounts_readahead() {
    let mut fx = Fixture::new(1);
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    fx.lower(0).file("big", &data);
    fx.seal();
    let m = Mount::stratafs(&fx.layers(), &fx.mnt, "");
    assert_eq!(mount_read_ahead_kb(m.path()), "128", "the kernel's default");
    drop(m);
    let m = Mount::stratafs_env(
        &fx.layers(),
        &fx.mnt,
        "",
        &[("STRATAFS_READ_AHEAD_KB", "1024")],
    );
    assert_eq!(mount_read_ahead_kb(m.path()), "1024");
    fs::write("/proc/sys/vm/drop_caches", b"1").expect("drop the page cache");
    assert!(
        fs::read(m.join("big")).expect("read") == data,
        "sequential read"
    );
    drop(m);
    fx.assert_lowers_unchanged();
    for bad in ["lots", "0", "100000"] {
        env_value_fails_the_mount(&fx, "STRATAFS_READ_AHEAD_KB", bad);
    }
}

/// `noacl` (as fuse-overlayfs has it): the kernel checks the mode bits only, and the ACLs stay
/// plain xattrs that can still be read and set. Without it the ACL below grants the access
/// (`regression::posix_acls_are_enforced_and_inherited_as_kernel_overlayfs`).
#[test]
fn noacl_checks_mode_bits_only_and_keeps_acls_as_xattrs() {
    use std::process::Command;
    let mut fx = Fixture::new(1);
    fx.lower(0).dir_mode("grant", 0o700);
    let out = Command::new("setfacl")
        .args(["-m", "u:1000:rwx"])
        .arg(fx.lower(0).path("grant"))
        .output()
        .expect("run setfacl");
    assert!(out.status.success(), "setfacl: {out:?}");
    fx.seal();
    let touch = |m: &Mount| {
        Command::new("setpriv")
            .args(["--reuid=1000", "--regid=1000", "--clear-groups", "touch"])
            .arg(m.path().join("grant/new"))
            .status()
            .expect("run setpriv")
            .success()
    };
    let m = fx.mount_stratafs("noacl");
    assert!(!touch(&m), "noacl: uid 1000 got in through the ACL");
    let acl = Command::new("getfacl")
        .args(["-cn"])
        .arg(m.path().join("grant"))
        .output()
        .expect("run getfacl");
    let text = String::from_utf8_lossy(&acl.stdout);
    assert!(text.contains("user:1000:rwx"), "noacl hid the ACL: {text}");
    m.unmount();
    let m = fx.mount_stratafs("");
    assert!(touch(&m), "without noacl the ACL grants uid 1000 access");
    m.unmount();
}
