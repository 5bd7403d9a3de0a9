//! stratafs: an overlay filesystem in user space.
//!
//! See ARCHITECTURE.md for the map. Public modules: [`overlay`] (the filesystem),
//! [`options`] (mount option parsing and validation), [`daemon`] (running a mount),
//! [`sys`] (the only place with `unsafe`).

pub mod daemon;
pub mod options;
pub mod overlay;
pub mod storage;
pub mod sys;
