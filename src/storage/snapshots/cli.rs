//! `stratafs snapshots ...` and `stratafs serve ...`.

use std::ffi::OsString;

/// Entry point for `stratafs snapshots|serve ...` (`argv[1]` is the subcommand word).
pub fn run(argv: &[OsString]) -> anyhow::Result<()> {
    anyhow::bail!("'{}' is not available in this build", argv[1].to_string_lossy())
}
