//! Container storage drivers on top of the overlay filesystem.
//!
//! Architecture invariant: nothing here imports FUSE types; the drivers talk to the
//! filesystem only through mounts (the `stratafs` binary or kernel overlayfs).

pub mod layers;
pub mod snapshots;
