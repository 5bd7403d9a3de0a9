//! `stratafs layers ...` and `stratafs image ...`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use super::image::{ImageStore, Progress};
use super::store::{Backend, DEFAULT_ROOT, LayerStore};

#[derive(Args, Debug)]
struct Common {
    /// Store root (Docker's overlay2 layout).
    #[arg(long, default_value = DEFAULT_ROOT, global = true)]
    root: PathBuf,
    /// Mount with stratafs (FUSE) or kernel overlayfs.
    #[arg(long, default_value = "stratafs", global = true)]
    backend: String,
    /// Longest parent chain accepted (up to 500).
    #[arg(long, default_value_t = super::store::DEFAULT_MAX_DEPTH, global = true)]
    max_depth: usize,
    /// The stratafs binary used for FUSE mounts.
    #[arg(long, global = true)]
    stratafs_bin: Option<PathBuf>,
}

impl Common {
    fn store(&self) -> Result<LayerStore> {
        let mut s = LayerStore::open(&self.root)?;
        s.backend = self.backend.parse::<Backend>()?;
        s.set_max_depth(self.max_depth)?;
        if let Some(b) = &self.stratafs_bin {
            s.stratafs_bin = b.clone();
        }
        Ok(s)
    }
}

#[derive(Parser, Debug)]
#[command(name = "stratafs layers", about = "overlay2-style layer store")]
struct LayersCli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: LayersCmd,
}

#[derive(Subcommand, Debug)]
enum LayersCmd {
    /// Create a read-only layer.
    Create { id: String, parent: Option<String> },
    /// Create a read-write (container) layer.
    CreateRw { id: String, parent: Option<String> },
    /// Remove a layer (not mounted, no children).
    Remove { id: String },
    /// Mount a layer (counted) and print its root.
    Get { id: String },
    /// Release one `get`; unmounts at zero.
    Put { id: String },
    /// Exit 0 if the layer exists, 1 otherwise.
    Exists { id: String },
    /// Store status.
    Status,
    /// UpperDir, LowerDir, WorkDir, MergedDir as JSON.
    Metadata { id: String },
    /// Remove leftovers of interrupted operations.
    Cleanup,
    /// Apply a layer tar (plain, gzip or zstd; `-` for stdin) to an empty layer.
    ApplyDiff { id: String, tar: PathBuf },
    /// Write the layer's changes as an OCI layer tar (`-` for stdout).
    Diff { id: String, out: PathBuf },
    /// List the layer's changes (A/C/D PATH).
    Changes { id: String },
    /// Bytes of file data in the layer.
    DiffSize { id: String },
    /// List layer ids.
    Ls,
}

#[derive(Parser, Debug)]
#[command(
    name = "stratafs image",
    about = "OCI / docker images on the layer store"
)]
struct ImageCli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Import an OCI layout (dir or tar) or a `docker save` archive.
    Import {
        archive: PathBuf,
        /// Name:tag to record (default: the archive's own).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    Ls,
    /// Show an image's record as JSON.
    Inspect { name: String },
    /// Remove an image (layers other images use stay).
    Rm { name: String },
    /// Write an image as an OCI layout tar (with a docker `manifest.json`).
    Export { name: String, file: PathBuf },
    /// Mount a fresh container layer over the image at MNT.
    Mount {
        name: String,
        mnt: PathBuf,
        #[arg(long)]
        readonly: bool,
    },
    /// Unmount MNT and drop its container layer.
    Umount { mnt: PathBuf },
    /// Record the container layer at MNT as a new image NAME.
    Commit { mnt: PathBuf, name: String },
}

/// Entry point for `stratafs layers|image ...` (`argv[1]` is the subcommand word).
pub fn run(argv: &[OsString]) -> Result<()> {
    let word = argv[1].to_string_lossy().into_owned();
    let rest = std::iter::once(OsString::from(format!("stratafs {word}")))
        .chain(argv[2..].iter().cloned());
    if word == "layers" {
        layers(LayersCli::parse_from(rest))
    } else {
        image(ImageCli::parse_from(rest))
    }
}

fn open_in(p: &PathBuf) -> Result<Box<dyn io::Read>> {
    Ok(if p.as_os_str() == "-" {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(p).with_context(|| format!("open {}", p.display()))?)
    })
}

fn layers(cli: LayersCli) -> Result<()> {
    let store = cli.common.store()?;
    let mut out = io::stdout().lock();
    match cli.cmd {
        LayersCmd::Create { id, parent } => store.create(&id, parent.as_deref(), false)?,
        LayersCmd::CreateRw { id, parent } => store.create(&id, parent.as_deref(), true)?,
        LayersCmd::Remove { id } => store.remove(&id)?,
        LayersCmd::Get { id } => writeln!(out, "{}", store.get(&id)?.display())?,
        LayersCmd::Put { id } => {
            store.put(&id)?;
        }
        LayersCmd::Exists { id } => {
            if !store.exists(&id) {
                anyhow::bail!("layer {id} does not exist");
            }
        }
        LayersCmd::Status => {
            for (k, v) in store.status()? {
                writeln!(out, "{k}: {v}")?;
            }
        }
        LayersCmd::Metadata { id } => {
            serde_json::to_writer_pretty(&mut out, &store.metadata(&id)?)?;
            writeln!(out)?;
        }
        LayersCmd::Cleanup => {
            // With images, their crashed imports and commits first (their layers are the
            // store's orphans then).
            let r = if store.root().join(".images").is_dir() {
                let r = ImageStore::new(store)?.cleanup()?;
                for id in &r.orphan_layers {
                    writeln!(out, "removed layer {id} of an interrupted import")?;
                }
                for p in &r.scratch {
                    writeln!(out, "removed {}", p.display())?;
                }
                r.layers
            } else {
                store.cleanup()?
            };
            for id in &r.completed {
                writeln!(out, "completed the record of {id}")?;
            }
            for p in r.scratch.iter().chain(&r.dangling_links) {
                writeln!(out, "removed {}", p.display())?;
            }
            for id in &r.relinked {
                writeln!(out, "relinked {id}")?;
            }
            for id in &r.stale_mounts {
                writeln!(out, "reset mount count of {id}")?;
            }
        }
        LayersCmd::ApplyDiff { id, tar } => {
            let stats = store.apply_diff(&id, open_in(&tar)?)?;
            writeln!(out, "{}", stats.size)?;
        }
        LayersCmd::Diff { id, out: path } => {
            if path.as_os_str() == "-" {
                store.diff(&id, BufWriter::new(&mut out))?;
            } else {
                let f =
                    File::create(&path).with_context(|| format!("create {}", path.display()))?;
                let (w, _) = store.diff(&id, BufWriter::new(f))?;
                w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
        }
        LayersCmd::Changes { id } => {
            for c in store.changes(&id)? {
                writeln!(out, "{} {}", c.kind.letter(), c.path.display())?;
            }
        }
        LayersCmd::DiffSize { id } => writeln!(out, "{}", store.diff_size(&id)?)?,
        LayersCmd::Ls => {
            for id in store.list()? {
                writeln!(out, "{id}")?;
            }
        }
    }
    Ok(())
}

/// A bar on a terminal, plain lines otherwise.
struct CliProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for CliProgress {
    fn layer(&mut self, index: usize, total: usize, what: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total as u64);
                bar.set_position(index as u64);
                bar.set_message(what.to_owned());
            }
            None => eprintln!("[{}/{total}] {what}", index + 1),
        }
    }
}

fn image(cli: ImageCli) -> Result<()> {
    let images = ImageStore::new(cli.common.store()?)?;
    let mut out = io::stdout().lock();
    match cli.cmd {
        ImageCmd::Import { archive, name } => {
            let bar = io::stderr().is_terminal().then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} layers {msg}")
                        .expect("valid template"),
                );
                b
            });
            let mut progress = CliProgress { bar };
            let rec = images.import(&archive, name.as_deref(), &mut progress)?;
            if let Some(b) = progress.bar {
                b.finish_and_clear();
            }
            writeln!(out, "{}", rec.id)?;
        }
        ImageCmd::Ls => {
            for rec in images.list()? {
                let names = if rec.names.is_empty() {
                    "<none>".to_owned()
                } else {
                    rec.names.join(",")
                };
                writeln!(
                    out,
                    "{}  {}  {} layers",
                    &rec.id[..19.min(rec.id.len())],
                    names,
                    rec.diff_ids.len()
                )?;
            }
        }
        ImageCmd::Inspect { name } => {
            serde_json::to_writer_pretty(&mut out, &images.inspect(&name)?)?;
            writeln!(out)?;
        }
        ImageCmd::Rm { name } => images.remove(&name)?,
        ImageCmd::Export { name, file } => images.export(&name, &file)?,
        ImageCmd::Mount {
            name,
            mnt,
            readonly,
        } => {
            images.mount(&name, &mnt, readonly)?;
        }
        ImageCmd::Umount { mnt } => images.umount(&mnt)?,
        ImageCmd::Commit { mnt, name } => {
            let rec = images.commit(&mnt, &name)?;
            writeln!(out, "{}", rec.id)?;
        }
    }
    Ok(())
}
