//! Criterion benches of stratafs internals that need no mount: option parsing, and the
//! daemon side of merged lookup / getattr / forget, called directly on `OverlayFs`
//! (what one FUSE LOOKUP or GETATTR costs the daemon, minus the kernel round trip).
//!
//! `cargo bench --bench internals`. The end-to-end comparison is `scripts/bench`.

use std::ffi::OsString;
use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fuser::INodeNo;
use stratafs::options::MountOptions;
use stratafs::overlay::{FsConfig, OverlayFs};

const DIR_FILES: usize = 2000;

fn bench_options(c: &mut Criterion) {
    let lowers: Vec<String> = (0..20)
        .map(|i| format!("/var/lib/containers/storage/overlay/l/LAYER{i:02}ABCDEFGHIJ"))
        .collect();
    let opts = format!(
        "lowerdir={},upperdir=/var/lib/containers/storage/overlay/x/diff,\
         workdir=/var/lib/containers/storage/overlay/x/work,nodev,nosuid,noatime,\
         fsname=overlay,allow_other",
        lowers.join(":")
    );
    c.bench_function("options/parse 20 lowers", |b| {
        b.iter(|| MountOptions::parse(black_box(&opts)).unwrap())
    });
}

/// Two lowers and an upper; `d` is a merged dir whose files alternate between the lowers,
/// `w` holds a whiteout in the top lower for every other name of the bottom one.
fn make_layers(root: &Path) -> FsConfig {
    let (l1, l2, up, wk) = (
        root.join("l1"),
        root.join("l2"),
        root.join("upper"),
        root.join("work"),
    );
    for d in [&l1, &l2, &up, &wk] {
        fs::create_dir_all(d).unwrap();
    }
    fs::create_dir_all(l1.join("d")).unwrap();
    fs::create_dir_all(l2.join("d")).unwrap();
    for i in 0..DIR_FILES {
        let layer = if i % 2 == 0 { &l1 } else { &l2 };
        fs::write(layer.join("d").join(format!("f{i:05}")), b"x").unwrap();
    }
    FsConfig {
        lowers: vec![l1, l2],
        upper: Some(up),
        work: Some(wk),
        ttl: Duration::from_secs(1),
        threads: 1,
        ..FsConfig::default()
    }
}

fn bench_overlay(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = make_layers(tmp.path());
    let fs = OverlayFs::new(&cfg).expect("OverlayFs::new");
    let (dattr, _) = fs.do_lookup(INodeNo::ROOT, "d".as_ref()).unwrap();
    let dir = dattr.ino;
    let names: Vec<OsString> = (0..DIR_FILES).map(|i| format!("f{i:05}").into()).collect();

    let mut g = c.benchmark_group("overlay");
    // A name not looked up before: probe upper, both lowers, make a node, then forget it.
    let mut i = 0usize;
    g.bench_function("lookup+forget, merged dir, new node", |b| {
        b.iter(|| {
            let n = &names[i % DIR_FILES];
            i += 1;
            let (attr, _) = fs.do_lookup(dir, n).unwrap();
            fs.do_forget(attr.ino, 1);
        })
    });
    // A name whose node is alive (held by one extra lookup).
    let (held, _) = fs.do_lookup(dir, &names[1]).unwrap();
    g.bench_function("lookup+forget, merged dir, live node", |b| {
        b.iter(|| {
            let (attr, _) = fs.do_lookup(dir, &names[1]).unwrap();
            fs.do_forget(attr.ino, 1);
        })
    });
    g.bench_function("lookup of a missing name (ENOENT)", |b| {
        b.iter(|| black_box(fs.do_lookup(dir, "nope".as_ref()).is_err()))
    });
    g.bench_function("getattr, lower file", |b| {
        b.iter(|| fs.do_getattr(held.ino, None).unwrap())
    });
    g.bench_function("getattr, merged dir", |b| {
        b.iter(|| fs.do_getattr(dir, None).unwrap())
    });
    g.finish();
    fs.do_forget(held.ino, 1);
    assert!(fs.live_inodes() >= 1);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_options, bench_overlay
}
criterion_main!(benches);
