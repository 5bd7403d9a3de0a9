//! Test modules; helpers are in `crate::util`.

mod cli;
mod differential;
mod features;
mod random;
mod regression;
mod semantics;
