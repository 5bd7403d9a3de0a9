//! Seeded random operation sequences, compared against kernel overlayfs like the scripted
//! differential test. The seed is fixed unless `STRATAFS_SEED` is set; the op count can be
//! raised with `STRATAFS_RANDOM_OPS`. A failure prints the seed and the operations leading to
//! it, so `STRATAFS_SEED=<seed> cargo test --test tests random` replays it.

use std::time::{Duration, Instant};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::differential::{self, COMPAT, Driver, NATIVE, Profile};
use crate::util::ops::Op;
use crate::util::sys::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use crate::util::tree::{self, Kind, Snap};

const DEFAULT_OPS: usize = 300;
/// A sequence stops early after this long (slow machine), whatever the count.
const TIME_BUDGET: Duration = Duration::from_secs(40);

fn seed(default: u64) -> u64 {
    std::env::var("STRATAFS_SEED")
        .ok()
        .map(|s| s.parse().expect("STRATAFS_SEED must be a u64"))
        .unwrap_or(default)
}

fn op_count() -> usize {
    std::env::var("STRATAFS_RANDOM_OPS")
        .ok()
        .map(|s| s.parse().expect("STRATAFS_RANDOM_OPS must be a number"))
        .unwrap_or(DEFAULT_OPS)
}

/// Operations between two whole-tree comparisons, unless `STRATAFS_CHECK_EVERY` says.
const DEFAULT_CHECK_EVERY: usize = 50;

/// `STRATAFS_CHECK_EVERY`, when set: a replay that compares that often.
fn check_every() -> Option<usize> {
    std::env::var("STRATAFS_CHECK_EVERY").ok().map(|s| {
        s.parse::<usize>()
            .expect("STRATAFS_CHECK_EVERY must be a number")
            .max(1)
    })
}

/// Names that exist now (from the kernel's merged view: the oracle decides), split into all
/// paths and directories.
struct Pool {
    paths: Vec<String>,
    dirs: Vec<String>,
}

fn pool(d: &Driver) -> Pool {
    let t = tree::snapshot(d.kernel.path(), Snap::MERGED);
    let mut paths = Vec::new();
    let mut dirs = vec![String::new()];
    for (p, e) in &t.entries {
        if p.is_empty() {
            continue;
        }
        // Big files stay in the pool but are not favoured: data copies cost time.
        paths.push(p.clone());
        if e.kind == Kind::Dir {
            dirs.push(p.clone());
        }
    }
    Pool { paths, dirs }
}

fn data(rng: &mut StdRng) -> Vec<u8> {
    let n = *[1usize, 7, 100, 4096, 5000].choose(rng).expect("non-empty");
    let b: u8 = rng.random();
    (0..n).map(|i| b.wrapping_add(i as u8)).collect()
}

fn gen_op(rng: &mut StdRng, pool: &Pool, counter: &mut u32) -> Op {
    let existing = pool.paths.choose(rng).cloned().unwrap_or_default();
    let dir = pool.dirs.choose(rng).cloned().unwrap_or_default();
    *counter += 1;
    let fresh = if dir.is_empty() {
        format!("r{counter}")
    } else {
        format!("{dir}/r{counter}")
    };
    // Either an existing name or a fresh one.
    let target = if rng.random_bool(0.5) {
        fresh.clone()
    } else {
        pool.paths.choose(rng).cloned().unwrap_or_default()
    };
    let t = |rng: &mut StdRng| {
        (
            rng.random_range(1_000_000_000..1_700_000_000),
            rng.random_range(0..1_000_000_000),
        )
    };
    let xname = |rng: &mut StdRng| format!("user.r{}", rng.random_range(0..3));
    match rng.random_range(0..100) {
        0..12 => {
            let offset = if rng.random_bool(0.3) {
                None
            } else {
                Some(rng.random_range(0..70_000))
            };
            Op::Write {
                path: existing,
                offset,
                data: data(rng),
            }
        }
        12..16 => Op::Truncate {
            path: existing,
            len: *[0u64, 1, 10, 5000, 70_000].choose(rng).expect("non-empty"),
        },
        16..18 => Op::OpenTrunc { path: existing },
        18..23 => Op::Chmod {
            path: existing,
            mode: *[0o644, 0o600, 0o755, 0o4755, 0o1777, 0o2750, 0o000]
                .choose(rng)
                .expect("non-empty"),
        },
        23..26 => {
            let (uid, gid) = *[(0, 0), (1000, 1000), (1234, 5678)]
                .choose(rng)
                .expect("non-empty");
            Op::Chown {
                path: existing,
                uid,
                gid,
            }
        }
        26..30 => Op::Utimes {
            path: existing,
            atime: t(rng),
            mtime: t(rng),
        },
        30..35 => Op::SetXattr {
            path: existing,
            name: xname(rng),
            value: data(rng)
                .into_iter()
                .take(3)
                .chain(std::iter::once(b'!'))
                .collect(),
            flags: *[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]
                .choose(rng)
                .expect("non-empty"),
        },
        35..38 => Op::RemoveXattr {
            path: existing,
            name: xname(rng),
        },
        38..46 => Op::Unlink { path: existing },
        46..51 => Op::Rmdir {
            path: if rng.random_bool(0.7) { dir } else { existing },
        },
        51..57 => Op::Mkdir {
            path: target,
            mode: 0o755,
        },
        57..64 => Op::Create {
            path: fresh,
            data: data(rng),
        },
        64..75 => {
            let flags = match rng.random_range(0..10) {
                0 => RENAME_NOREPLACE,
                1 => RENAME_EXCHANGE,
                _ => 0,
            };
            Op::Rename {
                from: existing,
                to: target,
                flags,
            }
        }
        75..78 => Op::Symlink {
            target: (*[
                "a.txt",
                "dir1",
                "nowhere",
                "dir1/sub/deep/file",
                "merged/both",
            ]
            .choose(rng)
            .expect("non-empty"))
            .to_string(),
            path: target,
        },
        78..82 => Op::Link {
            from: existing,
            to: target,
        },
        82..84 => Op::Mkfifo { path: target },
        84..92 => Op::Read { path: existing },
        92..95 => Op::ReadDir { path: dir },
        95..98 => Op::Stat { path: existing },
        _ => Op::ListXattr { path: existing },
    }
}

fn random_run(profile: &Profile, default_seed: u64) {
    let seed = seed(default_seed);
    let count = op_count();
    let context = format!(
        "random, seed {seed} (replay: STRATAFS_SEED={seed} cargo test --test tests {})",
        profile.name
    );
    eprintln!(
        "random differential [{}]: seed {seed}, {count} ops",
        profile.name
    );
    let mut done: Vec<Op> = Vec::new();
    let result = differential::compare(profile, true, |d| {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let mut p = pool(d);
        let mut counter = 0;
        let replay = check_every();
        let every = replay.unwrap_or(DEFAULT_CHECK_EVERY);
        for i in 0..count {
            // A replay that compares often (`STRATAFS_CHECK_EVERY`) runs to the end.
            if replay.is_none() && start.elapsed() > TIME_BUDGET {
                eprintln!("random: time budget reached after {i} ops");
                break;
            }
            if i % 20 == 0 {
                p = pool(d);
            }
            let op = gen_op(&mut rng, &p, &mut counter);
            if !profile.hardlink_ops && differential::touches_hardlinks(&op) {
                continue; // see Profile::hardlink_ops
            }
            d.step(&op);
            done.push(op);
            if d.stopped {
                return;
            }
            // Compare whole trees now and then, so a divergence is found near its cause
            // (`STRATAFS_CHECK_EVERY=1` while replaying a failure finds the very op).
            if i % every == every - 1 && !d.check_trees(&format!("after op #{i}")) {
                d.stopped = true;
                return;
            }
        }
    });
    let Err(report) = result else { return };
    if std::env::var_os("STRATAFS_MINIMIZE").is_some() {
        let small = minimize(profile, done);
        eprintln!(
            "random differential [{}], seed {seed}: a failing sequence of {} operation(s):\n{}",
            profile.name,
            small.len(),
            small
                .iter()
                .map(|op| format!("    {op}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    panic!("differential [{}] {context}: {report}", profile.name);
}

/// `STRATAFS_MINIMIZE=1`: shrinks a failing sequence by delta debugging (drop a chunk, keep
/// the rest if it still fails, halve the chunks when none can go), replaying each candidate
/// on fresh fixtures. Any difference counts as failing, so the result may show another
/// difference than the full run: each is a real one.
fn minimize(profile: &Profile, mut ops: Vec<Op>) -> Vec<Op> {
    let fails = |ops: &[Op]| {
        differential::compare(profile, true, |d| {
            for op in ops {
                d.step(op);
                if d.stopped {
                    return;
                }
            }
        })
        .is_err()
    };
    let mut chunks = 2;
    while ops.len() >= 2 {
        let size = ops.len().div_ceil(chunks);
        let mut shrunk = false;
        for start in (0..ops.len()).step_by(size) {
            let rest: Vec<Op> = ops[..start]
                .iter()
                .chain(&ops[(start + size).min(ops.len())..])
                .cloned()
                .collect();
            if fails(&rest) {
                eprintln!("minimize: {} -> {} operations", ops.len(), rest.len());
                ops = rest;
                chunks = (chunks - 1).max(2);
                shrunk = true;
                break;
            }
        }
        if !shrunk {
            if chunks >= ops.len() {
                break;
            }
            chunks = (chunks * 2).min(ops.len());
        }
    }
    ops
}

#[test]
fn random_ops_match_kernel_compat() {
    random_run(&COMPAT, 0x5eed_0001);
}

#[test]
fn random_ops_match_kernel_native() {
    random_run(&NATIVE, 0x5eed_0002);
}
