//! The OCI layer reader/applier: any byte string, read as a (possibly compressed) layer tar
//! and applied to a fresh directory, never panics and never changes anything outside it.
//!
//! Each input is applied to `BASE/w/layer`; `BASE/canary` (a file, a dir) sits next to it,
//! reachable by `../../canary` or its absolute path from inside. After every input, `BASE`
//! and `BASE/w` must hold exactly those names and the canary must be unchanged (names, sizes,
//! modes, link counts, ctimes).
#![no_main]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stratafs::storage::layers::apply::{ApplyOptions, apply_layer};

struct World {
    base: PathBuf,
    canary: Vec<(String, u64, u32, u64, i64, i64)>,
}

fn canary_state(base: &Path) -> Vec<(String, u64, u32, u64, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![base.join("canary")];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).expect("canary entry");
        out.push((
            p.display().to_string(),
            m.len(),
            m.mode(),
            m.nlink(),
            m.ctime(),
            m.ctime_nsec(),
        ));
        if m.is_dir() {
            for e in fs::read_dir(&p).expect("canary dir") {
                stack.push(e.expect("canary entry").path());
            }
        }
    }
    out.sort();
    out
}

fn names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        // On tmpfs where there is one: the applier creates files for every input.
        let tmp = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let base = tmp.join(format!("stratafs-fuzz-apply-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("w")).unwrap();
        fs::create_dir_all(base.join("canary/dir")).unwrap();
        fs::write(base.join("canary/file"), b"canary\n").unwrap();
        let canary = canary_state(&base);
        World { base, canary }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let layer = w.base.join("w/layer");
    let _ = fs::remove_dir_all(&layer);
    fs::create_dir(&layer).unwrap();
    let opts = ApplyOptions {
        allow_devices: false,
        set_owners: false,
        max_entry_size: 1 << 20,
        max_entries: 4096,
    };
    let _ = apply_layer(&layer, data, &opts);
    assert_eq!(
        names(&w.base),
        ["canary", "w"],
        "something was created next to w/"
    );
    assert_eq!(
        names(&w.base.join("w")),
        ["layer"],
        "something was created next to the layer"
    );
    assert_eq!(canary_state(&w.base), w.canary, "the canary changed");
    fs::remove_dir_all(&layer).unwrap();
});
