//! The command line: mount forms, option parsing, errors (non-zero exit, one line on stderr,
//! nothing mounted), unmounting, version and help.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::mount::{self, Backend, escape_layer, is_mounted, run_cmd, run_stratafs};
use crate::util::{Fixture, Mount};

/// A sealed fixture with one lower file, for option tests.
fn fixture() -> Fixture {
    let mut fx = Fixture::new(2);
    fx.lower(1).file("bottom", b"bottom\n");
    fx.lower(0).file("top", b"top\n");
    fx.seal();
    fx
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// Runs stratafs with `args` and asserts a clean refusal: non-zero exit, exactly one line on
/// stderr, nothing mounted at `mnt`. Returns that line.
#[track_caller]
fn assert_refused(args: &[OsString], mnt: &Path) -> String {
    let out = run_stratafs(args, None);
    if out.status.success() {
        // Unmount before failing, so the failure leaves nothing behind.
        Mount::adopt(mnt, Backend::Stratafs).unmount();
        panic!("stratafs {args:?} should fail but exited 0");
    }
    assert!(
        !is_mounted(mnt),
        "failed mount left {} mounted",
        mnt.display()
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got: {:?}",
        out.stderr
    );
    assert!(
        mount::daemon_pids(mnt).is_empty(),
        "a daemon is left running after a refused mount"
    );
    lines[0].to_string()
}

fn upper_work(fx: &Fixture) -> String {
    format!(
        "upperdir={},workdir={}",
        fx.upper.display(),
        fx.work.display()
    )
}

fn lowers(fx: &Fixture) -> String {
    let l: Vec<String> = fx.lowers.iter().map(|p| escape_layer(p)).collect();
    format!("lowerdir={}", l.join(":"))
}

#[test]
fn missing_lowerdir_is_refused() {
    let fx = fixture();
    let opts = upper_work(&fx);
    let line = assert_refused(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt);
    assert!(
        line.contains("lowerdir"),
        "message should name lowerdir: {line}"
    );
}

#[test]
fn lowerdir_that_is_not_a_directory_is_refused() {
    let fx = fixture();
    let file = fx.root().join("plainfile");
    fs::write(&file, b"x").unwrap();
    let missing = fx.root().join("missing");
    for bad in [&file, &missing] {
        let opts = format!("lowerdir={},{}", bad.display(), upper_work(&fx));
        assert_refused(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt);
    }
}

#[test]
fn unknown_option_is_refused() {
    let fx = fixture();
    let opts = format!("{},{},no_such_option_xyz", lowers(&fx), upper_work(&fx));
    let line = assert_refused(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt);
    assert!(
        line.contains("no_such_option_xyz"),
        "message should name the option: {line}"
    );
    // An unknown flag as well.
    let opts = format!("{},{}", lowers(&fx), upper_work(&fx));
    assert_refused(
        &os(&["--no-such-flag", "-o", &opts, fx.mnt.to_str().unwrap()]),
        &fx.mnt,
    );
}

#[test]
fn upperdir_without_workdir_is_refused() {
    let fx = fixture();
    let opts = format!("{},upperdir={}", lowers(&fx), fx.upper.display());
    assert_refused(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(Option<Mount>);

impl Tmpfs {
    fn new(at: &Path) -> Tmpfs {
        let out = run_cmd(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=16m",
                "tmpfs",
                at.to_str().unwrap(),
            ],
            None,
        );
        assert!(out.status.success(), "mount tmpfs: {}", out.describe());
        Tmpfs(Some(Mount::adopt(at, Backend::Kernel)))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            drop(m);
        }
    }
}

#[test]
fn workdir_on_another_filesystem_than_upperdir_is_refused() {
    let fx = fixture();
    let tmpfs_root = fx.scratch("tmpfs");
    let _t = Tmpfs::new(&tmpfs_root);
    let work = tmpfs_root.join("work");
    fs::create_dir(&work).unwrap();
    let opts = format!(
        "{},upperdir={},workdir={}",
        lowers(&fx),
        fx.upper.display(),
        work.display()
    );
    assert_refused(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt);
}

#[test]
fn upperdir_inside_a_lowerdir_is_refused() {
    let fx = fixture();
    let upper = fx.lowers[1].join("nested_upper");
    let work = fx.lowers[1].join("nested_work");
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&work).unwrap();
    let opts = format!(
        "{},upperdir={},workdir={}",
        lowers(&fx),
        upper.display(),
        work.display()
    );
    assert_refused(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt);
}

#[test]
fn escaped_colon_in_lowerdir() {
    let fx = fixture();
    let odd = fx.root().join("with:colon");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join("odd"), b"odd\n").unwrap();
    let opts = format!(
        "lowerdir={}:{},{}",
        escape_layer(&odd),
        escape_layer(&fx.lowers[0]),
        upper_work(&fx)
    );
    assert!(opts.contains("with\\:colon"));
    let m = Mount::stratafs_args(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt, None)
        .unwrap_or_else(|o| panic!("mount with \\: failed: {}", o.describe()));
    assert_eq!(fs::read_to_string(m.join("odd")).unwrap(), "odd\n");
    assert_eq!(fs::read_to_string(m.join("top")).unwrap(), "top\n");
    m.unmount();
}

#[test]
fn relative_paths_are_resolved_against_the_working_directory() {
    let fx = fixture();
    let m = Mount::stratafs_args(
        &os(&["-o", "lowerdir=l0:l1,upperdir=upper,workdir=work", "mnt"]),
        &fx.mnt,
        Some(fx.root()),
    )
    .unwrap_or_else(|o| panic!("relative mount failed: {}", o.describe()));
    assert_eq!(fs::read_to_string(m.join("top")).unwrap(), "top\n");
    assert_eq!(fs::read_to_string(m.join("bottom")).unwrap(), "bottom\n");
    fs::write(m.join("new"), b"new").unwrap();
    m.unmount();
    assert_eq!(fs::read(fx.upper.join("new")).unwrap(), b"new");
}

#[test]
fn empty_option_items_and_volatile_are_accepted() {
    let fx = fixture();
    let opts = format!(",,{},,{},volatile,", lowers(&fx), upper_work(&fx));
    let m = Mount::stratafs_args(&os(&["-o", &opts, fx.mnt.to_str().unwrap()]), &fx.mnt, None)
        .unwrap_or_else(|o| panic!("mount failed: {}", o.describe()));
    assert_eq!(fs::read_to_string(m.join("top")).unwrap(), "top\n");
    m.unmount();
}

#[test]
fn mount_helper_form_with_source_and_extra_options() {
    let fx = fixture();
    let opts = format!("{},{},dev,suid,rw", lowers(&fx), upper_work(&fx));
    let m = Mount::stratafs_args(
        &os(&["overlay-src", fx.mnt.to_str().unwrap(), "-o", &opts]),
        &fx.mnt,
        None,
    )
    .unwrap_or_else(|o| panic!("mount.fuse3 form failed: {}", o.describe()));
    let info = mount::mount_info(m.path()).expect("mounted");
    assert_eq!(info.fstype, "fuse.stratafs");
    assert_eq!(
        info.source, "overlay-src",
        "SOURCE shows in mountinfo: {info:?}"
    );
    fs::write(m.join("w"), b"w").expect("rw mount is writable");
    m.unmount();
}

#[test]
fn stratafs_umount_and_other_unmount_commands() {
    let fx = fixture();
    // `stratafs umount MNT`.
    let m = fx.mount_stratafs("");
    let out = run_stratafs(&[OsString::from("umount"), fx.mnt.clone().into()], None);
    assert!(out.status.success(), "stratafs umount: {}", out.describe());
    assert!(!is_mounted(&fx.mnt));
    assert!(
        mount::wait_daemon_gone(&fx.mnt, Duration::from_secs(10)),
        "daemon still running"
    );
    m.forget();
    // Unmounting what is not mounted fails.
    let out = run_stratafs(&[OsString::from("umount"), fx.mnt.clone().into()], None);
    assert!(!out.status.success(), "umount of a non-mount must fail");
    // umount(8) and fusermount3 -u.
    for (prog, args) in [("umount", vec![]), ("fusermount3", vec!["-u"])] {
        let m = fx.mount_stratafs("");
        let mut a: Vec<OsString> = args.iter().map(OsString::from).collect();
        a.push(fx.mnt.clone().into());
        let out = run_cmd(prog, &a, None);
        assert!(out.status.success(), "{prog}: {}", out.describe());
        assert!(!is_mounted(&fx.mnt), "{prog} left it mounted");
        assert!(
            mount::wait_daemon_gone(&fx.mnt, Duration::from_secs(10)),
            "daemon still running after {prog}"
        );
        m.forget();
    }
}

#[test]
fn foreground_mode_serves_until_unmounted() {
    let fx = fixture();
    let opts = format!("{},{}", lowers(&fx), upper_work(&fx));
    let mut child = std::process::Command::new(mount::bin())
        .args(["-f", "-o", &opts, fx.mnt.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn -f");
    let start = Instant::now();
    while !is_mounted(&fx.mnt) {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("stratafs -f exited before mounting: {st}");
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stratafs -f did not mount within 20s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = Mount::adopt(&fx.mnt, Backend::Stratafs);
    assert_eq!(fs::read_to_string(m.join("top")).unwrap(), "top\n");
    assert!(
        child.try_wait().unwrap().is_none(),
        "-f must stay in the foreground"
    );
    m.unmount();
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("stratafs -f still running 10s after unmount");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "stratafs -f exit status after unmount: {st}");
}

#[test]
fn mount_unmount_remount_loop_at_one_path() {
    let fx = fixture();
    for i in 0..10 {
        let m = fx.mount_stratafs("");
        let prev = fs::read_to_string(m.join("counter")).unwrap_or_default();
        let want = if i == 0 {
            String::new()
        } else {
            format!("{}\n", i - 1)
        };
        assert_eq!(prev, want, "iteration {i}: content of the previous mount");
        fs::write(m.join("counter"), format!("{i}\n")).unwrap();
        assert_eq!(fs::read_to_string(m.join("top")).unwrap(), "top\n");
        m.unmount();
        assert!(!is_mounted(&fx.mnt));
    }
    fx.assert_lowers_unchanged();
}

#[test]
fn version_and_help() {
    let out = run_stratafs(&["--version"], None);
    assert!(out.status.success(), "--version: {}", out.describe());
    assert!(
        out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version should print {}: {:?}",
        env!("CARGO_PKG_VERSION"),
        out.stdout
    );
    let out = run_stratafs(&["--help"], None);
    assert!(out.status.success(), "--help: {}", out.describe());
    for word in ["lowerdir", "upperdir", "workdir", "umount"] {
        assert!(out.stdout.contains(word), "--help should mention {word}");
    }
}

#[test]
fn no_mountpoint_is_refused() {
    let fx = fixture();
    let opts = format!("{},{}", lowers(&fx), upper_work(&fx));
    let out = run_stratafs(&["-o", &opts], None);
    assert!(!out.status.success());
    assert_eq!(out.stderr.lines().count(), 1, "{:?}", out.stderr);
}
