//! The kill -9 harness shared by the storage drivers' crash tests (`tests/layers.rs`,
//! `tests/snapshots.rs`): run a CLI operation, kill it after a seeded delay calibrated on an
//! uninterrupted run, and count where the kills landed, so that a test can assert that enough
//! of them hit the operation in flight rather than before or after it.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;

/// The seed of a crash test: `STRATAFS_SEED`, else `default` (fixed, so CI runs are
/// repeatable). Printed for replay.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("STRATAFS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {s} (replay with STRATAFS_SEED={s})");
    s
}

/// A CLI child, killed and reaped on drop.
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A scratch dir on tmpfs where there is one: making thousands of files per kill point
/// stays cheap.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if Path::new("/dev/shm").is_dir() {
        b.tempdir_in("/dev/shm")
    } else {
        b.tempdir()
    }
    .unwrap()
}

#[derive(Default, Debug)]
pub struct Tally {
    /// Killed while holding an fd under the store root (the database, a lock, a directory
    /// being built or removed).
    pub in_flight: usize,
    /// Left a half-done state on disk (which cleanup then collected).
    pub leftovers: usize,
    /// Killed before it had opened anything of the store.
    pub before: usize,
    /// Exited (successfully) before the kill.
    pub finished: usize,
    pub old_state: usize,
    pub new_state: usize,
}

/// Runs `cmd`, kills it with SIGKILL after `delay` unless it has exited, and counts the
/// outcome in `tally`.
pub fn run_and_kill(mut cmd: Command, root: &Path, delay: Duration, tally: &mut Tally) {
    let mut guard = ChildGuard(Some(cmd.spawn().unwrap()));
    let child = guard.0.as_mut().unwrap();
    std::thread::sleep(delay);
    let pid = child.id();
    if let Some(st) = child.try_wait().unwrap() {
        assert!(st.success(), "{cmd:?} failed uninterrupted: {st}");
        tally.finished += 1;
        return;
    }
    let holds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .any(|t| t.starts_with(root))
        })
        .unwrap_or(false);
    child.kill().unwrap();
    let st = child.wait().unwrap();
    guard.0 = None;
    use std::os::unix::process::ExitStatusExt;
    if st.signal() == Some(9) {
        if holds {
            tally.in_flight += 1;
        } else {
            tally.before += 1;
        }
    } else {
        assert!(st.success(), "{cmd:?} failed: {st}");
        tally.finished += 1;
    }
}

/// Times one uninterrupted run of `cmd`, which must succeed.
pub fn timed(mut cmd: Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// A kill delay uniform between T/20 and `upto` x T (T: the shorter of two uninterrupted
/// runs); `upto` above 1 puts a few kills at the very end or after the exit.
pub fn kill_delay(rng: &mut StdRng, t: Duration, upto: f64) -> Duration {
    let t = t.as_secs_f64();
    Duration::from_secs_f64(rng.random_range(t / 20.0..t * upto))
}

/// What a crash case must show: enough kills in flight, optionally at least one half-done
/// state, all within `bound`.
pub struct Expect {
    pub kills: usize,
    pub leftovers: bool,
    pub bound: Duration,
}

/// Prints the tally of `op` and asserts `expect`.
pub fn report(op: &str, t: Duration, tally: &Tally, started: Instant, expect: &Expect) {
    eprintln!(
        "crash {op}: {} kill points over {t:?} runs: {} in flight ({} left half-done \
         state), {} before open, {} after exit; {} old state, {} new state; {:?}",
        expect.kills,
        tally.in_flight,
        tally.leftovers,
        tally.before,
        tally.finished,
        tally.old_state,
        tally.new_state,
        started.elapsed()
    );
    assert!(
        tally.in_flight >= 2,
        "{op}: too few kills landed during the operation: {tally:?}"
    );
    if expect.leftovers {
        assert!(
            tally.leftovers >= 1,
            "{op}: no kill left a half-done state: {tally:?}"
        );
    }
    assert!(started.elapsed() < expect.bound, "{op}: bounded time");
}
