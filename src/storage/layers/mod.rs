//! overlay2-style layer store, OCI layer import/export and images (being written).

pub mod cli;
