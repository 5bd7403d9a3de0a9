//! Test modules; helpers are in `crate::util`.

mod cli;
mod differential;
mod random;
mod regression;
mod semantics;
