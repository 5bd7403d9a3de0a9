//! `stratafs snapshots ...` and `stratafs serve ...`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use super::{Backend, Config, Info, Kind, Mount, Snapshotter, grpc, mount};

const DEFAULT_ROOT: &str = "/var/lib/stratafs/snapshotter";

#[derive(Args, Debug)]
struct DriverArgs {
    /// Directory holding metadata.db and snapshots/.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// fuse (stratafs mounts), kernel (overlayfs) or native (full copies, bind mounts).
    #[arg(long, default_value = "fuse")]
    backend: Backend,
}

impl DriverArgs {
    fn open(&self) -> anyhow::Result<Snapshotter> {
        let root = std::path::absolute(&self.root)
            .with_context(|| format!("root {}", self.root.display()))?;
        Snapshotter::open(Config::new(root, self.backend))
            .with_context(|| format!("open the snapshotter at {}", self.root.display()))
    }
}

/// Snapshot driver with containerd's semantics.
#[derive(Parser, Debug)]
#[command(name = "stratafs snapshots")]
struct SnapshotsCli {
    #[command(flatten)]
    driver: DriverArgs,
    /// containerd namespace the snapshots live in.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an active snapshot KEY over committed PARENT; prints its mounts.
    Prepare {
        key: String,
        parent: Option<String>,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// Create a read-only view KEY of committed PARENT; prints its mounts.
    View {
        key: String,
        parent: Option<String>,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// Commit active snapshot KEY as NAME.
    Commit {
        name: String,
        key: String,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// Remove snapshots (refused while they have children).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show one snapshot as JSON.
    Stat { key: String },
    /// List snapshots; each FILTER (containerd syntax) is or-ed, commas inside one are and-ed.
    #[command(alias = "list")]
    Ls { filters: Vec<String> },
    /// Disk usage of one snapshot's own layer, or of all.
    Usage { key: Option<String> },
    /// Print the mounts of an active snapshot or view.
    Mounts { key: String },
    /// Show snapshots as a tree of parents and children.
    Tree,
    /// Remove directories no snapshot owns.
    Cleanup,
    /// Set (K=V) or remove (K=) labels; prints the resulting labels.
    Label {
        key: String,
        #[arg(required = true, value_name = "K=V")]
        labels: Vec<String>,
    },
    /// Mount snapshot KEY at MNT (unmount with `umount MNT` / `stratafs umount MNT`).
    Mount { key: String, mountpoint: PathBuf },
}

/// Serve containerd's snapshots gRPC API (a proxy snapshotter) on a unix socket.
#[derive(Parser, Debug)]
#[command(name = "stratafs serve")]
struct ServeCli {
    #[command(flatten)]
    driver: DriverArgs,
    /// The unix socket to listen on (a stale one is replaced).
    #[arg(long)]
    socket: PathBuf,
}

/// Entry point for `stratafs snapshots|serve ...` (`argv[1]` is the subcommand word).
pub fn run(argv: &[OsString]) -> anyhow::Result<()> {
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("serve") => serve(ServeCli::parse_from(&argv[1..])),
        _ => snapshots(SnapshotsCli::parse_from(&argv[1..])),
    }
}

fn parse_labels(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("label {l:?} is not KEY=VALUE"),
        })
        .collect()
}

fn print_mounts(mounts: &[Mount], target: &str) {
    for m in mounts {
        println!(
            "mount -t {} {} {} -o {}",
            m.kind,
            m.source,
            target,
            m.options.join(",")
        );
    }
}

fn rfc3339ish(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn info_json(i: &Info) -> serde_json::Value {
    serde_json::json!({
        "name": i.name,
        "parent": i.parent,
        "kind": i.kind.as_str(),
        "labels": i.labels,
        "created": rfc3339ish(i.created),
        "updated": rfc3339ish(i.updated),
    })
}

fn snapshots(cli: SnapshotsCli) -> anyhow::Result<()> {
    let s = cli.driver.open()?;
    let ns = cli.namespace.as_str();
    match cli.cmd {
        Cmd::Prepare {
            key,
            parent,
            labels,
        } => {
            let m = s.prepare(ns, &key, parent.as_deref(), parse_labels(&labels)?)?;
            print_mounts(&m, "TARGET");
        }
        Cmd::View {
            key,
            parent,
            labels,
        } => {
            let m = s.view(ns, &key, parent.as_deref(), parse_labels(&labels)?)?;
            print_mounts(&m, "TARGET");
        }
        Cmd::Commit { name, key, labels } => s.commit(ns, &name, &key, parse_labels(&labels)?)?,
        Cmd::Rm { keys } => {
            for k in keys {
                s.remove(ns, &k).with_context(|| format!("remove {k}"))?;
            }
        }
        Cmd::Stat { key } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&info_json(&s.stat(ns, &key)?))?
            );
        }
        Cmd::Ls { filters } => {
            println!("{:<40} {:<40} KIND", "KEY", "PARENT");
            for i in s.walk(ns, &filters)? {
                println!(
                    "{:<40} {:<40} {}",
                    i.name,
                    i.parent.as_deref().unwrap_or(""),
                    i.kind
                );
            }
        }
        Cmd::Usage { key } => {
            let keys = match key {
                Some(k) => vec![k],
                None => s.walk(ns, &[])?.into_iter().map(|i| i.name).collect(),
            };
            println!("{:<40} {:>14} INODES", "KEY", "SIZE");
            for k in keys {
                let u = s.usage(ns, &k)?;
                println!("{k:<40} {:>14} {}", u.size, u.inodes);
            }
        }
        Cmd::Mounts { key } => print_mounts(&s.mounts(ns, &key)?, "TARGET"),
        Cmd::Tree => print_tree(&s.walk(ns, &[])?),
        Cmd::Cleanup => {
            for d in s.cleanup()?.removed {
                println!("removed {d}");
            }
        }
        Cmd::Label { key, labels } => {
            let mut info = s.stat(ns, &key)?;
            let mut paths = Vec::new();
            for (k, v) in parse_labels(&labels)? {
                paths.push(format!("labels.{k}"));
                info.labels.insert(k, v);
            }
            let info = s.update(ns, &info, &paths)?;
            for (k, v) in info.labels {
                println!("{k}={v}");
            }
        }
        Cmd::Mount { key, mountpoint } => {
            let mounts = s.mounts(ns, &key)?;
            mount::mount_all(&mounts, &mountpoint, &s.config().stratafs_bin)
                .with_context(|| format!("mount {key} at {}", mountpoint.display()))?;
        }
    }
    Ok(())
}

fn print_tree(all: &[Info]) {
    let mut children: BTreeMap<Option<&str>, Vec<&Info>> = BTreeMap::new();
    for i in all {
        children.entry(i.parent.as_deref()).or_default().push(i);
    }
    fn walk(children: &BTreeMap<Option<&str>, Vec<&Info>>, parent: Option<&str>, depth: usize) {
        for i in children.get(&parent).into_iter().flatten() {
            let mark = match i.kind {
                Kind::Committed => "",
                Kind::Active => " (active)",
                Kind::View => " (view)",
            };
            println!("{}{}{mark}", "  ".repeat(depth), i.name);
            if i.kind == Kind::Committed {
                walk(children, Some(&i.name), depth + 1);
            }
        }
    }
    walk(&children, None, 0);
}

fn serve(cli: ServeCli) -> anyhow::Result<()> {
    let snapshotter = Arc::new(cli.driver.open()?);
    let socket = std::path::absolute(&cli.socket)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install the SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!("stratafs serve: shutting down");
        };
        eprintln!(
            "stratafs serve: {} backend, root {}, listening on {}",
            snapshotter.config().backend,
            snapshotter.config().root.display(),
            socket.display()
        );
        grpc::serve(snapshotter, Path::new(&socket), shutdown)
            .await
            .context("serve")
    })
}
