//! overlay2-style layer store, OCI layer import/export and images.
//!
//! - [`store`]: Docker's overlay2 directory layout, layer lifecycle and mounts (stratafs FUSE
//!   or kernel overlayfs over the same directories);
//! - [`apply`]: OCI layer tar → overlay upper directory, refusing hostile archives;
//! - [`export`]: overlay upper directory → OCI layer tar, change lists, sizes;
//! - [`digest`]: DiffIDs and ChainIDs;
//! - [`image`]: OCI layouts and `docker save` archives in and out, image mounts and commits;
//! - [`cli`]: `stratafs layers ...` and `stratafs image ...`.

pub mod apply;
pub mod cli;
pub mod digest;
pub mod error;
pub mod export;
pub mod image;
pub mod store;

pub use error::{Error, Result};
pub use store::{Backend, LayerStore};
