//! Images on the layer store: import of OCI image layouts (directory or tar) and `docker save`
//! archives (`blobs/sha256/...` and the older `<id>/layer.tar` shapes), export as an OCI
//! layout tar that also carries Docker's `manifest.json`, and image mounts and commits.
//!
//! Each layer is stored once, under its ChainID (hex) as layer id, so images sharing a base
//! share its layers. Records live in `<root>/.images/`: `<config-hex>.json` (the
//! [`ImageRecord`]), `<config-hex>.config` (the config blob as imported) and
//! `containers/<layer-id>.json` for mounted container layers.
//!
//! Imports and commits are all or nothing, also across a crash: each keeps a journal,
//! `import-<rand>.journal`, flock'ed while its process lives, naming every layer before the
//! layer is created; the image record is written last and the journal removed after it.
//! [`ImageStore::cleanup`] removes the layers a dead process's journal names that no image
//! record (or container) uses.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::digest::{self, HashingReader, HashingWriter};
use super::error::{Error, IoContext, Result};
use super::store::{CleanupReport, LayerStore};

/// What an image is, as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// `sha256:` digest of the config: the image id.
    pub id: String,
    /// `name:tag` references.
    pub names: Vec<String>,
    pub diff_ids: Vec<String>,
    pub chain_ids: Vec<String>,
}

impl ImageRecord {
    /// Layer store ids, bottom first.
    pub fn layer_ids(&self) -> Vec<String> {
        self.chain_ids
            .iter()
            .map(|c| digest::hex_part(c).unwrap_or(c).to_owned())
            .collect()
    }
}

/// A container layer mounted by `image mount`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Container {
    layer: String,
    image: String,
    mountpoint: PathBuf,
}

/// Told about each layer as an import proceeds.
pub trait Progress {
    fn layer(&mut self, index: usize, total: usize, what: &str);
}

/// Progress that says nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn layer(&mut self, _: usize, _: usize, _: &str) {}
}

/// What [`ImageStore::cleanup`] removed.
#[derive(Clone, Debug, Default)]
pub struct ImageCleanup {
    /// Layers an interrupted import or commit had created, used by no image.
    pub orphan_layers: Vec<String>,
    /// Journals of dead imports and commits, half-written records and configs.
    pub scratch: Vec<PathBuf>,
    /// What the layer store's own cleanup did.
    pub layers: CleanupReport,
}

const JOURNAL_PREFIX: &str = "import-";
const JOURNAL_SUFFIX: &str = ".journal";
/// A journal before it is locked (renamed to `.journal` once it is).
const JOURNAL_NEW_SUFFIX: &str = ".new";

fn random_hex() -> Result<String> {
    Ok(hex::encode(super::store::random_bytes::<8>()?))
}

/// The layers an import or commit is creating, one id a line, each written (and synced)
/// before its layer is created. Locked while its process lives; removed when it is done.
struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    fn begin(dir: &Path) -> Result<Journal> {
        let name = format!("{JOURNAL_PREFIX}{}", random_hex()?);
        // Locked under a name cleanup does not treat as a journal yet, so it never sees it
        // unlocked while its process lives.
        let new = dir.join(format!("{name}{JOURNAL_NEW_SUFFIX}"));
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&new)
            .ctx(|| format!("create {}", new.display()))?;
        file.lock().ctx(|| format!("lock {}", new.display()))?;
        let path = dir.join(format!("{name}{JOURNAL_SUFFIX}"));
        fs::rename(&new, &path).ctx(|| format!("rename {}", new.display()))?;
        Ok(Journal { file, path })
    }

    fn add(&mut self, layer: &str) -> Result<()> {
        writeln!(self.file, "{layer}")
            .and_then(|()| self.file.sync_data())
            .ctx(|| format!("write {}", self.path.display()))
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

pub struct ImageStore {
    pub layers: LayerStore,
    dir: PathBuf,
}

/// Where the files of an archive come from.
trait Source {
    fn open(&mut self, path: &str) -> Result<Box<dyn Read + '_>>;
    fn exists(&mut self, path: &str) -> bool;
    fn read_small(&mut self, path: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.open(path)?
            .take(64 << 20)
            .read_to_end(&mut v)
            .ctx(|| format!("read {path}"))?;
        Ok(v)
    }
}

/// `a/./b/../c` → `a/c`, refusing to climb out.
fn clean(path: &str) -> Result<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()
                    .ok_or_else(|| Error::BadImage(format!("path {path:?} leaves the archive")))?;
            }
            c => out.push(c),
        }
    }
    Ok(out.join("/"))
}

struct DirSource(PathBuf);

impl Source for DirSource {
    fn open(&mut self, path: &str) -> Result<Box<dyn Read + '_>> {
        let p = self.0.join(clean(path)?);
        Ok(Box::new(
            File::open(&p).ctx(|| format!("open {}", p.display()))?,
        ))
    }
    fn exists(&mut self, path: &str) -> bool {
        clean(path).is_ok_and(|p| self.0.join(p).is_file())
    }
}

struct Member {
    offset: u64,
    size: u64,
    link: Option<String>,
}

/// A tar read by seeking to its members (symlinked members, as podman writes, are followed
/// within the archive).
struct TarSource {
    file: File,
    members: HashMap<String, Member>,
}

impl TarSource {
    fn new(path: &Path) -> Result<TarSource> {
        let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
        let mut members = HashMap::new();
        let mut ar = tar::Archive::new(&f);
        for e in ar.entries().map_err(|e| Error::Corrupt(e.to_string()))? {
            let e = e.map_err(|e| Error::Corrupt(e.to_string()))?;
            let name = clean(&String::from_utf8_lossy(&e.path_bytes()))?;
            let link = match e.header().entry_type() {
                tar::EntryType::Symlink => {
                    let t = e.link_name_bytes().unwrap_or_default();
                    let t = String::from_utf8_lossy(&t).into_owned();
                    let base = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    Some(clean(&format!("{base}/{t}"))?)
                }
                tar::EntryType::Link => Some(clean(&String::from_utf8_lossy(
                    &e.link_name_bytes().unwrap_or_default(),
                ))?),
                _ => None,
            };
            members.insert(
                name,
                Member {
                    offset: e.raw_file_position(),
                    size: e.header().entry_size().unwrap_or(0),
                    link,
                },
            );
        }
        Ok(TarSource {
            file: File::open(path).ctx(|| format!("open {}", path.display()))?,
            members,
        })
    }

    fn resolve(&self, path: &str) -> Result<&Member> {
        let mut p = clean(path)?;
        for _ in 0..16 {
            let m = self
                .members
                .get(&p)
                .ok_or_else(|| Error::BadImage(format!("{path} is not in the archive")))?;
            match &m.link {
                Some(t) => p = t.clone(),
                None => return Ok(m),
            }
        }
        Err(Error::BadImage(format!("{path}: too many links")))
    }
}

impl Source for TarSource {
    fn open(&mut self, path: &str) -> Result<Box<dyn Read + '_>> {
        let (off, size) = {
            let m = self.resolve(path)?;
            (m.offset, m.size)
        };
        self.file
            .seek(SeekFrom::Start(off))
            .ctx(|| format!("seek to {path}"))?;
        Ok(Box::new((&self.file).take(size)))
    }
    fn exists(&mut self, path: &str) -> bool {
        self.resolve(path).is_ok()
    }
}

/// One image to import: config location and layer locations, bottom first.
struct Plan {
    config: String,
    /// Expected config digest, if the archive names one.
    config_digest: Option<String>,
    layers: Vec<(String, Option<String>)>,
    names: Vec<String>,
}

fn json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadImage(format!("{what}: {e}")))
}

fn blob_path(digest: &str) -> Result<String> {
    let hex = digest::hex_part(digest)
        .ok_or_else(|| Error::BadImage(format!("unsupported digest {digest:?}")))?;
    Ok(format!("blobs/sha256/{hex}"))
}

/// The digest a docker-archive path implies (`<hex>.json`, `blobs/sha256/<hex>`).
fn digest_in_name(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    let d = format!("sha256:{hex}");
    digest::hex_part(&d).is_some().then_some(d)
}

fn plans_docker(src: &mut dyn Source) -> Result<Vec<Plan>> {
    let m = json(&src.read_small("manifest.json")?, "manifest.json")?;
    let list = m
        .as_array()
        .ok_or_else(|| Error::BadImage("manifest.json is not a list".into()))?;
    let mut out = Vec::new();
    for e in list {
        let config = e["Config"]
            .as_str()
            .ok_or_else(|| Error::BadImage("manifest.json entry without Config".into()))?
            .to_owned();
        let layers = e["Layers"]
            .as_array()
            .ok_or_else(|| Error::BadImage("manifest.json entry without Layers".into()))?
            .iter()
            .map(|l| {
                l.as_str()
                    .map(|s| {
                        (
                            s.to_owned(),
                            digest_in_name(s).filter(|_| s.starts_with("blobs/")),
                        )
                    })
                    .ok_or_else(|| Error::BadImage("layer path is not a string".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let names = e["RepoTags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Plan {
            config_digest: digest_in_name(&config),
            config,
            layers,
            names,
        });
    }
    Ok(out)
}

fn read_blob(src: &mut dyn Source, desc: &Value) -> Result<Vec<u8>> {
    let d = desc["digest"]
        .as_str()
        .ok_or_else(|| Error::BadImage("descriptor without digest".into()))?;
    let bytes = src.read_small(&blob_path(d)?)?;
    let got = digest::sha256_str(&bytes);
    if got != d {
        return Err(Error::Digest {
            what: format!("blob {d}"),
            expected: d.into(),
            actual: got,
        });
    }
    Ok(bytes)
}

fn plans_oci(src: &mut dyn Source) -> Result<Vec<Plan>> {
    let index = json(&src.read_small("index.json")?, "index.json")?;
    let mut out = Vec::new();
    let mut stack: Vec<(Value, Vec<String>)> = vec![(index, Vec::new())];
    while let Some((idx, names)) = stack.pop() {
        for desc in idx["manifests"].as_array().cloned().unwrap_or_default() {
            let mut names = names.clone();
            for key in [
                "io.containerd.image.name",
                "org.opencontainers.image.ref.name",
            ] {
                if let Some(n) = desc["annotations"][key].as_str() {
                    names.push(n.to_owned());
                    break;
                }
            }
            let mt = desc["mediaType"].as_str().unwrap_or("");
            let body = json(&read_blob(src, &desc)?, "manifest")?;
            if mt.contains("index") || mt.contains("manifest.list") || body["manifests"].is_array()
            {
                stack.push((body, names));
                continue;
            }
            let cfg = &body["config"];
            let cfg_digest = cfg["digest"]
                .as_str()
                .ok_or_else(|| Error::BadImage("manifest without config".into()))?;
            let layers = body["layers"]
                .as_array()
                .ok_or_else(|| Error::BadImage("manifest without layers".into()))?
                .iter()
                .map(|l| {
                    let d = l["digest"]
                        .as_str()
                        .ok_or_else(|| Error::BadImage("layer without digest".into()))?;
                    Ok((blob_path(d)?, Some(d.to_owned())))
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(Plan {
                config: blob_path(cfg_digest)?,
                config_digest: Some(cfg_digest.to_owned()),
                layers,
                names,
            });
        }
    }
    if out.is_empty() {
        return Err(Error::BadImage("index.json lists no image".into()));
    }
    Ok(out)
}

/// `name` with `:latest` when it has no tag.
pub fn normalize_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

impl ImageStore {
    pub fn new(layers: LayerStore) -> Result<ImageStore> {
        let dir = layers.root().join(".images");
        fs::create_dir_all(dir.join("containers")).ctx(|| format!("create {}", dir.display()))?;
        Ok(ImageStore { layers, dir })
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir
            .join(format!("{}.json", digest::hex_part(id).unwrap_or(id)))
    }

    fn config_path(&self, id: &str) -> PathBuf {
        self.dir
            .join(format!("{}.config", digest::hex_part(id).unwrap_or(id)))
    }

    fn write(&self, path: &Path, data: &[u8]) -> Result<()> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        fs::write(&tmp, data).ctx(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))
    }

    /// All images.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).ctx(|| "read image records".into())? {
            let p = e.ctx(|| "read image records".into())?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let b = fs::read(&p).ctx(|| format!("read {}", p.display()))?;
                out.push(
                    serde_json::from_slice(&b)
                        .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?,
                );
            }
        }
        out.sort_by(|a: &ImageRecord, b| a.names.cmp(&b.names).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// By `name[:tag]`, full id or an id prefix of at least 4 hex digits.
    pub fn find(&self, name: &str) -> Result<ImageRecord> {
        let full = normalize_name(name);
        let bare = name.strip_prefix("sha256:").unwrap_or(name);
        let all = self.list()?;
        if let Some(r) = all.iter().find(|r| r.names.contains(&full)) {
            return Ok(r.clone());
        }
        let hits: Vec<_> = all
            .iter()
            .filter(|r| bare.len() >= 4 && r.id["sha256:".len()..].starts_with(bare))
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(Error::ImageNotFound(name.to_owned())),
        }
    }

    fn save(&self, rec: &ImageRecord, config: &[u8]) -> Result<()> {
        // A name points to one image.
        for mut other in self.list()? {
            if other.id != rec.id && other.names.iter().any(|n| rec.names.contains(n)) {
                other.names.retain(|n| !rec.names.contains(n));
                self.write(
                    &self.record_path(&other.id),
                    &serde_json::to_vec_pretty(&other).expect("serializes"),
                )?;
            }
        }
        self.write(&self.config_path(&rec.id), config)?;
        self.write(
            &self.record_path(&rec.id),
            &serde_json::to_vec_pretty(rec).expect("serializes"),
        )
    }

    /// Imports every image of an OCI layout (directory or tar) or a `docker save` archive;
    /// returns the first. `name` overrides the archive's names.
    pub fn import(
        &self,
        archive: &Path,
        name: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<ImageRecord> {
        let mut src: Box<dyn Source> = if archive.is_dir() {
            Box::new(DirSource(archive.to_path_buf()))
        } else {
            Box::new(TarSource::new(archive)?)
        };
        let plans = if src.exists("manifest.json") {
            plans_docker(src.as_mut())?
        } else if src.exists("index.json") {
            plans_oci(src.as_mut())?
        } else {
            return Err(Error::BadImage(
                "neither manifest.json (docker save) nor index.json (OCI layout)".into(),
            ));
        };
        // All or nothing: the layers this import creates are removed again when any later
        // step fails (layers that were already there, shared with other images, stay), and
        // records are written only once every image's layers are in.
        let mut created: Vec<String> = Vec::new();
        let mut new_records: Vec<String> = Vec::new();
        // Across a crash too: the journal names each layer before it is made, and goes once
        // the records are written (`cleanup` removes what a dead import's journal names).
        let mut journal = Journal::begin(&self.dir)?;
        let res = (|| -> Result<ImageRecord> {
            let mut staged = Vec::new();
            for plan in plans {
                staged.push(self.import_one(
                    src.as_mut(),
                    plan,
                    name,
                    progress,
                    &mut journal,
                    &mut created,
                )?);
            }
            let mut first = None;
            for (rec, config) in staged {
                if !self.record_path(&rec.id).exists() {
                    new_records.push(rec.id.clone());
                }
                self.save(&rec, &config)?;
                first.get_or_insert(rec);
            }
            Ok(first.expect("at least one plan"))
        })();
        if res.is_err() {
            for id in &new_records {
                let _ = fs::remove_file(self.record_path(id));
                let _ = fs::remove_file(self.config_path(id));
            }
            // Children first. A layer another process has meanwhile built on stays (InUse):
            // it is no orphan then.
            for lid in created.iter().rev() {
                let _ = self.layers.remove(lid);
            }
        }
        drop(journal);
        res
    }

    /// Stores the layers of one image (appending the ids of those it creates to `created`);
    /// returns the record and config to save.
    fn import_one(
        &self,
        src: &mut dyn Source,
        plan: Plan,
        name: Option<&str>,
        progress: &mut dyn Progress,
        journal: &mut Journal,
        created: &mut Vec<String>,
    ) -> Result<(ImageRecord, Vec<u8>)> {
        let config = src.read_small(&plan.config)?;
        let id = digest::sha256_str(&config);
        if let Some(want) = &plan.config_digest
            && *want != id
        {
            return Err(Error::Digest {
                what: "image config".into(),
                expected: want.clone(),
                actual: id,
            });
        }
        let cfg = json(&config, "image config")?;
        let diff_ids: Vec<String> = cfg["rootfs"]["diff_ids"]
            .as_array()
            .ok_or_else(|| Error::BadImage("config without rootfs.diff_ids".into()))?
            .iter()
            .map(|d| d.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::BadImage("a diff_id is not a string".into()))?;
        if diff_ids.len() != plan.layers.len() {
            return Err(Error::BadImage(format!(
                "{} layers but {} diff_ids",
                plan.layers.len(),
                diff_ids.len()
            )));
        }
        if diff_ids.iter().any(|d| digest::hex_part(d).is_none()) {
            return Err(Error::BadImage("diff_ids must be sha256 digests".into()));
        }
        let chain_ids = digest::chain_ids(&diff_ids);
        let total = plan.layers.len();
        let mut parent: Option<String> = None;
        for (i, ((path, blob_digest), chain)) in plan.layers.iter().zip(&chain_ids).enumerate() {
            let lid = digest::hex_part(chain).expect("computed").to_owned();
            if self.layers.exists(&lid) {
                progress.layer(i, total, &format!("{} (already present)", &lid[..12]));
            } else {
                progress.layer(i, total, &format!("{} applying", &lid[..12]));
                journal.add(&lid)?;
                let raw = src.open(path)?;
                let mut hr = HashingReader::new(raw);
                match self.layers.create_from_tar(
                    &lid,
                    parent.as_deref(),
                    &mut hr,
                    Some(&diff_ids[i]),
                ) {
                    Ok(_) => created.push(lid.clone()),
                    // Another import stored the same ChainID meanwhile: it is that one's.
                    Err(Error::Exists(_)) => {
                        parent = Some(lid);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                io::copy(&mut hr, &mut io::sink()).ctx(|| format!("read {path}"))?;
                if let Some(want) = blob_digest {
                    let got = hr.digest();
                    if *want != got {
                        return Err(Error::Digest {
                            what: format!("layer blob {path}"),
                            expected: want.clone(),
                            actual: got,
                        });
                    }
                }
            }
            parent = Some(lid);
        }
        progress.layer(total, total, "done");
        let mut names: Vec<String> = match name {
            Some(n) => vec![normalize_name(n)],
            None => plan.names.iter().map(|n| normalize_name(n)).collect(),
        };
        if let Ok(old) = self.find(&id) {
            for n in old.names {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        let rec = ImageRecord {
            id,
            names,
            diff_ids,
            chain_ids,
        };
        Ok((rec, config))
    }

    /// The record and the config, as one JSON value.
    pub fn inspect(&self, name: &str) -> Result<Value> {
        let rec = self.find(name)?;
        let cfg = fs::read(self.config_path(&rec.id)).ctx(|| "read config".into())?;
        Ok(serde_json::json!({
            "Id": rec.id,
            "RepoTags": rec.names,
            "RootFS": { "Type": "layers", "DiffIDs": rec.diff_ids, "ChainIDs": rec.chain_ids },
            "Layers": rec.layer_ids(),
            "Config": json(&cfg, "config")?,
        }))
    }

    /// Removes the image; its layers go unless another image (or a container) uses them.
    pub fn remove(&self, name: &str) -> Result<()> {
        let rec = self.find(name)?;
        let others: Vec<ImageRecord> = self
            .list()?
            .into_iter()
            .filter(|r| r.id != rec.id)
            .collect();
        fs::remove_file(self.record_path(&rec.id)).ctx(|| "remove image record".into())?;
        let _ = fs::remove_file(self.config_path(&rec.id));
        for lid in rec.layer_ids().iter().rev() {
            if others.iter().any(|o| o.layer_ids().contains(lid)) {
                break;
            }
            match self.layers.remove(lid) {
                Ok(()) | Err(Error::NotFound(_)) => {}
                // A container or a committed image still builds on it: it and all below stay.
                Err(Error::InUse { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes the image as an OCI layout tar with a Docker `manifest.json` (loadable by both
    /// `podman load` and `docker load`). Layers are re-exported from the store, so the config
    /// gets their DiffIDs (the same ones when the tar comes out byte-identical).
    pub fn export(&self, name: &str, file: &Path) -> Result<()> {
        let rec = self.find(name)?;
        let scratch = self.layers.root().join(".tmp");
        let mut blobs: Vec<(String, PathBuf, u64)> = Vec::new();
        let cleanup = |blobs: &[(String, PathBuf, u64)]| {
            for (_, p, _) in blobs {
                let _ = fs::remove_file(p);
            }
        };
        let res = (|| -> Result<()> {
            for (i, lid) in rec.layer_ids().iter().enumerate() {
                let p = scratch.join(format!("export-{}-{i}.tar", std::process::id()));
                let f = File::create(&p).ctx(|| format!("create {}", p.display()))?;
                let (w, stats) = self.layers.diff(lid, io::BufWriter::new(f))?;
                w.into_inner()
                    .map_err(|e| Error::io("flush layer", e.into_error()))?;
                blobs.push((stats.diff_id, p, stats.tar_size));
            }
            let config = fs::read(self.config_path(&rec.id)).ctx(|| "read config".into())?;
            let new_ids: Vec<String> = blobs.iter().map(|b| b.0.clone()).collect();
            let config = if new_ids == rec.diff_ids {
                config
            } else {
                let mut v = json(&config, "config")?;
                v["rootfs"]["diff_ids"] = serde_json::json!(new_ids);
                serde_json::to_vec(&v).expect("serializes")
            };
            let cfg_digest = digest::sha256_str(&config);
            let layer_descs: Vec<Value> = blobs
                .iter()
                .map(|(d, _, size)| {
                    serde_json::json!({
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": d, "size": size })
                })
                .collect();
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                            "digest": cfg_digest, "size": config.len() },
                "layers": layer_descs,
            }))
            .expect("serializes");
            let man_digest = digest::sha256_str(&manifest);
            let names: Vec<String> = rec.names.clone();
            let mut idx_manifest = serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_digest, "size": manifest.len() });
            if let Some(n) = names.first() {
                idx_manifest["annotations"] = serde_json::json!({
                    "io.containerd.image.name": n,
                    "org.opencontainers.image.ref.name": n.rsplit_once(':').map(|x| x.1).unwrap_or(n),
                });
            }
            let index = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "manifests": [idx_manifest] }))
            .expect("serializes");
            let docker = serde_json::to_vec(&serde_json::json!([{
                "Config": blob_path(&cfg_digest)?,
                "RepoTags": names,
                "Layers": blobs.iter().map(|b| blob_path(&b.0)).collect::<Result<Vec<_>>>()?,
            }]))
            .expect("serializes");

            let tmp = file.with_extension("partial");
            let out = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            let mut tar = tar::Builder::new(io::BufWriter::new(out));
            let add = |tar: &mut tar::Builder<_>, path: &str, data: &[u8]| {
                let mut h = tar::Header::new_ustar();
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, data)
                    .ctx(|| format!("write {path}"))
            };
            add(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            add(&mut tar, "index.json", &index)?;
            add(&mut tar, "manifest.json", &docker)?;
            add(&mut tar, &blob_path(&cfg_digest)?, &config)?;
            add(&mut tar, &blob_path(&man_digest)?, &manifest)?;
            let mut written = std::collections::HashSet::new();
            for (d, p, size) in &blobs {
                if !written.insert(d.clone()) {
                    continue;
                }
                let mut h = tar::Header::new_ustar();
                h.set_mode(0o644);
                h.set_size(*size);
                let f = File::open(p).ctx(|| format!("open {}", p.display()))?;
                tar.append_data(&mut h, blob_path(d)?, f)
                    .ctx(|| "write layer".into())?;
            }
            let w = tar.into_inner().ctx(|| "finish archive".into())?;
            w.into_inner()
                .map_err(|e| Error::io("flush archive", e.into_error()))?
                .sync_all()
                .ctx(|| "sync archive".into())?;
            fs::rename(&tmp, file).ctx(|| format!("rename to {}", file.display()))
        })();
        cleanup(&blobs);
        res
    }

    fn containers(&self) -> Result<Vec<Container>> {
        let mut out = Vec::new();
        let d = self.dir.join("containers");
        for e in fs::read_dir(&d).ctx(|| "read containers".into())? {
            let p = e.ctx(|| "read containers".into())?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let b = fs::read(&p).ctx(|| format!("read {}", p.display()))?;
                out.push(
                    serde_json::from_slice(&b)
                        .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?,
                );
            }
        }
        Ok(out)
    }

    fn container_at(&self, mnt: &Path) -> Result<Container> {
        let mnt = fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
        self.containers()?
            .into_iter()
            .find(|c| c.mountpoint == mnt)
            .ok_or(Error::NoContainer(mnt))
    }

    /// A fresh container layer on the image, mounted at `mnt`; returns its layer id.
    pub fn mount(&self, name: &str, mnt: &Path, readonly: bool) -> Result<String> {
        let rec = self.find(name)?;
        let top =
            rec.layer_ids().last().cloned().ok_or_else(|| {
                Error::Invalid("an image without layers cannot be mounted".into())
            })?;
        let mnt = fs::canonicalize(mnt).ctx(|| format!("mount point {}", mnt.display()))?;
        if self.container_at(&mnt).is_ok() {
            return Err(Error::Invalid(format!(
                "{} is already in use",
                mnt.display()
            )));
        }
        let cid = format!("ctr-{}", random_hex()?);
        self.layers.create(&cid, Some(&top), true)?;
        if let Err(e) = self.layers.mount_to(&cid, &mnt, readonly) {
            let _ = self.layers.remove(&cid);
            return Err(e);
        }
        let c = Container {
            layer: cid.clone(),
            image: rec.id,
            mountpoint: mnt,
        };
        self.write(
            &self.dir.join("containers").join(format!("{cid}.json")),
            &serde_json::to_vec_pretty(&c).expect("serializes"),
        )?;
        Ok(cid)
    }

    /// Unmounts `mnt` and removes its container layer.
    pub fn umount(&self, mnt: &Path) -> Result<()> {
        let c = self.container_at(mnt)?;
        self.layers.unmount_from(&c.layer)?;
        self.layers.remove(&c.layer)?;
        fs::remove_file(
            self.dir
                .join("containers")
                .join(format!("{}.json", c.layer)),
        )
        .ctx(|| "remove container record".into())
    }

    /// The changes made at `mnt`, as a new image `name` (its image's layers plus one).
    pub fn commit(&self, mnt: &Path, name: &str) -> Result<ImageRecord> {
        let c = self.container_at(mnt)?;
        let base = self.find(&c.image)?;
        let tmp = self
            .layers
            .root()
            .join(".tmp")
            .join(format!("commit-{}.tar", c.layer));
        let mut journal = Journal::begin(&self.dir)?;
        let res = (|| -> Result<ImageRecord> {
            let f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            let (w, stats) = self
                .layers
                .diff(&c.layer, HashingWriter::new(io::BufWriter::new(f)))?;
            let (w, _) = w.finish();
            w.into_inner()
                .map_err(|e| Error::io("flush layer", e.into_error()))?;
            let mut diff_ids = base.diff_ids.clone();
            diff_ids.push(stats.diff_id.clone());
            let chain_ids = digest::chain_ids(&diff_ids);
            let lid = digest::hex_part(chain_ids.last().expect("one layer"))
                .expect("computed")
                .to_owned();
            if !self.layers.exists(&lid) {
                let parent = base.layer_ids().last().cloned();
                let f = File::open(&tmp).ctx(|| format!("open {}", tmp.display()))?;
                journal.add(&lid)?;
                self.layers.create_from_tar(
                    &lid,
                    parent.as_deref(),
                    io::BufReader::new(f),
                    Some(&stats.diff_id),
                )?;
            }
            let old = fs::read(self.config_path(&base.id)).ctx(|| "read config".into())?;
            let mut cfg = json(&old, "config")?;
            cfg["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
            let hist = serde_json::json!({ "created_by": "stratafs image commit" });
            match cfg["history"].as_array_mut() {
                Some(h) => h.push(hist),
                None => cfg["history"] = serde_json::json!([hist]),
            }
            let config = serde_json::to_vec(&cfg).expect("serializes");
            let rec = ImageRecord {
                id: digest::sha256_str(&config),
                names: vec![normalize_name(name)],
                diff_ids,
                chain_ids,
            };
            self.save(&rec, &config)?;
            Ok(rec)
        })();
        let _ = fs::remove_file(&tmp);
        drop(journal);
        res
    }

    /// Completes what crashed imports and commits left: the layers a dead process's journal
    /// names that no image record or container uses are removed (children first), with the
    /// journal; record and config files half written are removed when no import is running;
    /// then the layer store's own [`cleanup`](LayerStore::cleanup).
    pub fn cleanup(&self) -> Result<ImageCleanup> {
        let mut rep = ImageCleanup::default();
        let mut live: HashSet<String> = HashSet::new();
        let mut any_live = false;
        let mut dead: Vec<(PathBuf, String)> = Vec::new();
        for e in fs::read_dir(&self.dir).ctx(|| "read image records".into())? {
            let e = e.ctx(|| "read image records".into())?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with(JOURNAL_PREFIX)
                || !(n.ends_with(JOURNAL_SUFFIX) || n.ends_with(JOURNAL_NEW_SUFFIX))
            {
                continue;
            }
            let p = e.path();
            let mut f = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // just finished
                Err(e) => return Err(Error::io(format!("open {}", p.display()), e)),
            };
            let locked = match f.try_lock() {
                Ok(()) => true,
                Err(fs::TryLockError::WouldBlock) => false,
                Err(fs::TryLockError::Error(e)) => {
                    return Err(Error::io(format!("lock {}", p.display()), e));
                }
            };
            let mut text = String::new();
            f.read_to_string(&mut text)
                .ctx(|| format!("read {}", p.display()))?;
            if locked {
                dead.push((p, text));
            } else {
                any_live = true;
                live.extend(text.lines().map(str::to_owned));
            }
        }
        let mut used: HashSet<String> = self.list()?.iter().flat_map(|r| r.layer_ids()).collect();
        used.extend(self.containers()?.into_iter().map(|c| c.layer));
        for (p, text) in dead {
            for lid in text.lines().rev() {
                if lid.is_empty() || used.contains(lid) || live.contains(lid) {
                    continue;
                }
                if !self.layers.exists(lid) {
                    continue;
                }
                match self.layers.remove(lid) {
                    Ok(()) => rep.orphan_layers.push(lid.to_owned()),
                    // Something else builds on it or has it mounted: no orphan then.
                    Err(Error::NotFound(_) | Error::InUse { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
            rep.scratch.push(p);
        }
        if !any_live {
            // `write` renames `<hex>.tmp-PID` to `<hex>.json`/`.config`; `save` writes the
            // config before the record.
            for e in fs::read_dir(&self.dir).ctx(|| "read image records".into())? {
                let p = e.ctx(|| "read image records".into())?.path();
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                let half = n.contains(".tmp-")
                    || (n.ends_with(".config") && !p.with_extension("json").exists());
                if half && p.is_file() {
                    fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
                    rep.scratch.push(p);
                }
            }
        }
        rep.layers = self.layers.cleanup()?;
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_latest() {
        assert_eq!(normalize_name("busybox"), "busybox:latest");
        assert_eq!(
            normalize_name("localhost:5000/a"),
            "localhost:5000/a:latest"
        );
        assert_eq!(normalize_name("a:1"), "a:1");
    }

    #[test]
    fn clean_refuses_escape() {
        assert!(clean("../x").is_err());
        assert_eq!(clean("a/./b/../c").unwrap(), "a/c");
    }
}
