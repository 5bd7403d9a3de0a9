//! The metadata store: one redb file, the source of truth for which snapshots exist.
//!
//! Tables:
//! - `snapshots`: `(namespace, key-or-name)` → a JSON [`Record`];
//! - `counters`: `"next_id"` → the next directory id (ids are never reused).
//!
//! Every check that decides an outcome (exists? parent committed? children?) runs inside the
//! write transaction that acts on it, so concurrent callers (threads or processes: the database
//! is opened in redb's multi-writer mode) cannot interleave between check and change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Error, Info, Kind, Result, Usage};

const SNAPSHOTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// A point in time as stored: seconds and nanoseconds since the epoch (exact round trip).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub secs: u64,
    pub nanos: u32,
}

impl From<SystemTime> for Stamp {
    fn from(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Stamp {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        }
    }
}

impl Stamp {
    /// The time, if a `SystemTime` can hold it (nanoseconds below a second, seconds in range).
    pub fn checked(self) -> Option<SystemTime> {
        if nanos_ok(self.nanos) {
            UNIX_EPOCH.checked_add(Duration::new(self.secs, self.nanos))
        } else {
            None
        }
    }
}

fn nanos_ok(nanos: u32) -> bool {
    nanos < 1_000_000_000
}

impl From<Stamp> for SystemTime {
    /// Never panics: [`decode`] refuses stamps out of range, and any other is clamped to the
    /// latest time a `SystemTime` holds.
    fn from(s: Stamp) -> Self {
        s.checked()
            .or_else(|| UNIX_EPOCH.checked_add(Duration::new(i64::MAX as u64, 999_999_999)))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// One snapshot as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Names `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub created: Stamp,
    pub updated: Stamp,
    /// Recorded at commit.
    pub usage: Option<Usage>,
}

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created.into(),
            updated: self.updated.into(),
        }
    }
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Database(e.to_string())
}

/// Decodes a stored record. Any byte string is accepted as input: what is not a record is
/// [`Error::Database`] ("corrupt record"), never a panic.
pub fn decode(bytes: &[u8]) -> Result<Record> {
    let r: Record = serde_json::from_slice(bytes)
        .map_err(|e| Error::Database(format!("corrupt record: {e}")))?;
    for (what, stamp) in [("created", r.created), ("updated", r.updated)] {
        if stamp.checked().is_none() {
            return Err(Error::Database(format!(
                "corrupt record: {what} time {}.{} out of range",
                stamp.secs, stamp.nanos
            )));
        }
    }
    Ok(r)
}

/// Encodes a record as stored; [`decode`] gives it back unchanged.
pub fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(r).expect("a record always serializes")
}

type Table<'t> = redb::Table<'t, (&'static str, &'static str), &'static [u8]>;

fn get_in<T: ReadableTable<(&'static str, &'static str), &'static [u8]>>(
    table: &T,
    ns: &str,
    key: &str,
) -> Result<Option<Record>> {
    match table.get((ns, key)).map_err(db_err)? {
        Some(v) => decode(v.value()).map(Some),
        None => Ok(None),
    }
}

fn has_children(table: &Table<'_>, ns: &str, key: &str) -> Result<bool> {
    for item in table.range((ns, "")..).map_err(db_err)? {
        let (k, v) = item.map_err(db_err)?;
        if k.value().0 != ns {
            break;
        }
        if decode(v.value())?.parent.as_deref() == Some(key) {
            return Ok(true);
        }
    }
    Ok(false)
}

pub struct Store {
    db: redb::Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let db = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| Error::Database(format!("open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(SNAPSHOTS).map_err(db_err)?;
        txn.open_table(COUNTERS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<(&str, &str), &[u8]>) -> Result<T>,
    ) -> Result<T> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        f(&table)
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let out = f(&txn)?;
        txn.commit().map_err(db_err)?;
        Ok(out)
    }

    pub fn get(&self, ns: &str, key: &str) -> Result<Record> {
        self.read(|t| get_in(t, ns, key)?.ok_or_else(|| Error::NotFound(key.to_owned())))
    }

    /// `key` is free and `parent` (if any) is committed: returns the parent's id.
    pub fn check_create(&self, ns: &str, key: &str, parent: Option<&str>) -> Result<Option<u64>> {
        self.read(|t| {
            if get_in(t, ns, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_owned()));
            }
            parent_id(get_parent(t, ns, parent)?)
        })
    }

    /// Takes a fresh directory id, in a transaction of its own: once this returns, no later
    /// call (of any process, also after a crash) hands the same id out again, so a directory
    /// left under it by a crash can never be mistaken for a later snapshot's.
    pub fn reserve_id(&self) -> Result<u64> {
        self.write(|txn| {
            let mut counters = txn.open_table(COUNTERS).map_err(db_err)?;
            let id = counters
                .get(NEXT_ID)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(1);
            counters.insert(NEXT_ID, id + 1).map_err(db_err)?;
            Ok(id)
        })
    }

    /// Inserts a new snapshot under the id [`Store::reserve_id`] gave (`record.id`); re-checks
    /// what `check_create` did.
    pub fn insert(&self, ns: &str, key: &str, record: &Record) -> Result<()> {
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            if get_in(&table, ns, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_owned()));
            }
            parent_id(get_parent(&table, ns, record.parent.as_deref())?)?;
            table
                .insert((ns, key), encode(record).as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    /// The record of `key` and the ids of its parent chain, nearest first.
    pub fn chain(&self, ns: &str, key: &str) -> Result<(Record, Vec<u64>)> {
        self.read(|t| {
            let record = get_in(t, ns, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            let mut ids = Vec::new();
            let mut next = record.parent.clone();
            while let Some(p) = next {
                let parent = get_in(t, ns, &p)?.ok_or_else(|| {
                    Error::Database(format!("snapshot {key}: parent {p} is missing"))
                })?;
                ids.push(parent.id);
                if ids.len() > 100_000 {
                    return Err(Error::Database(format!("snapshot {key}: parent loop")));
                }
                next = parent.parent;
            }
            Ok((record, ids))
        })
    }

    pub fn commit(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        id: u64,
        usage: Usage,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let active = get_in(&table, ns, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            if active.kind != Kind::Active || active.id != id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            if get_in(&table, ns, name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_owned()));
            }
            let now: Stamp = SystemTime::now().into();
            let committed = Record {
                id,
                kind: Kind::Committed,
                parent: active.parent,
                labels,
                created: now,
                updated: now,
                usage: Some(usage),
            };
            table.remove((ns, key)).map_err(db_err)?;
            table
                .insert((ns, name), encode(&committed).as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    /// Deletes `key` if it has no children; returns its directory id.
    pub fn remove(&self, ns: &str, key: &str) -> Result<u64> {
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let record = get_in(&table, ns, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            if record.kind == Kind::Committed && has_children(&table, ns, key)? {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            table.remove((ns, key)).map_err(db_err)?;
            Ok(record.id)
        })
    }

    /// Applies `change` to the labels of `key` and stamps the update time.
    pub fn update(
        &self,
        ns: &str,
        key: &str,
        change: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<Record> {
        self.write(|txn| {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let mut record =
                get_in(&table, ns, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            change(&mut record.labels);
            record.updated = SystemTime::now().into();
            table
                .insert((ns, key), encode(&record).as_slice())
                .map_err(db_err)?;
            Ok(record)
        })
    }

    /// All snapshots of `ns`, ordered by key.
    pub fn list(&self, ns: &str) -> Result<Vec<(String, Record)>> {
        self.read(|t| {
            let mut out = Vec::new();
            for item in t.range((ns, "")..).map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let (kns, key) = k.value();
                if kns != ns {
                    break;
                }
                out.push((key.to_owned(), decode(v.value())?));
            }
            Ok(out)
        })
    }

    /// Directory ids of every snapshot in every namespace.
    pub fn all_ids(&self) -> Result<BTreeSet<u64>> {
        self.read(|t| {
            let mut ids = BTreeSet::new();
            for item in t.iter().map_err(db_err)? {
                let (_, v) = item.map_err(db_err)?;
                ids.insert(decode(v.value())?.id);
            }
            Ok(ids)
        })
    }
}

fn get_parent<T: ReadableTable<(&'static str, &'static str), &'static [u8]>>(
    table: &T,
    ns: &str,
    parent: Option<&str>,
) -> Result<Option<Record>> {
    let Some(p) = parent else { return Ok(None) };
    match get_in(table, ns, p)? {
        Some(r) => Ok(Some(r)),
        None => Err(Error::NotFound(format!("parent {p}"))),
    }
}

fn parent_id(parent: Option<Record>) -> Result<Option<u64>> {
    match parent {
        None => Ok(None),
        Some(r) if r.kind == Kind::Committed => Ok(Some(r.id)),
        Some(r) => Err(Error::InvalidArgument(format!(
            "parent must be a committed snapshot, not {}",
            r.kind
        ))),
    }
}
