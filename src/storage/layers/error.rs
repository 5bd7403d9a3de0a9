//! The layer store's typed errors.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the layer store, the OCI applier/exporter and the image store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid layer id {0:?}: use 1-128 of [A-Za-z0-9_.-], not starting with '.'")]
    InvalidId(String),
    #[error("layer {0} does not exist")]
    NotFound(String),
    #[error("layer {0} already exists")]
    Exists(String),
    #[error("layer {id} is in use: {why}")]
    InUse { id: String, why: String },
    #[error("layer {0} is not mounted")]
    NotMounted(String),
    #[error("layer chain too deep: {depth} layers, the limit is {max}")]
    TooDeep { depth: usize, max: usize },
    #[error(
        "layer {id}: kernel overlayfs cannot mount {layers} layers: the mount options would be \
         {len} bytes and mount(2) takes at most {max} (one page); use the stratafs backend \
         (--backend stratafs) for chains this deep"
    )]
    KernelOptionsTooLong {
        id: String,
        layers: usize,
        len: usize,
        max: usize,
    },
    #[error("layer {0} is not empty: apply-diff needs a freshly created layer")]
    NotEmpty(String),
    #[error("refusing archive entry {path:?}: {why}")]
    Hostile { path: String, why: String },
    #[error("corrupt or truncated archive: {0}")]
    Corrupt(String),
    #[error("{what}: digest mismatch, expected {expected}, got {actual}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("invalid image archive: {0}")]
    BadImage(String),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("nothing of ours is mounted at {0}")]
    NoContainer(PathBuf),
    #[error("mount failed: {0}")]
    Mount(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn hostile(path: &[u8], why: impl Into<String>) -> Error {
        Error::Hostile {
            path: String::from_utf8_lossy(path).into_owned(),
            why: why.into(),
        }
    }
}

/// `.ctx("what")` on `io::Result`: attaches what was being done.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
