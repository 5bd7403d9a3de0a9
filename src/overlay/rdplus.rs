//! Which READDIRPLUS entries carry attributes.
//!
//! An entry with attributes is a lookup done ahead: the daemon resolves the name in every
//! layer, opens it, reads its markers and stats it (on a cold cache, that stat reads the inode
//! from disk). That pays when the caller goes on to stat the names (`ls -l`, `rm -rf`, which
//! looks each name up before it unlinks it) and is wasted when it does not (`find` without
//! tests on files, `du` of directories, a plain `ls`, scandir): there the kernel's overlayfs
//! reads only the directory, and a cold `find` over a FUSE mount that answers with every
//! entry's attributes is 4x slower than one that sends none.
//!
//! The kernel decides only whether to ask READDIRPLUS (FUSE_READDIRPLUS_AUTO: always for the
//! first chunk of a listing), not what it will do with the names. An entry may go without
//! attributes (node id 0: the kernel then makes no dentry and looks the name up when it needs
//! it), and that is the daemon's choice, made here by watching what follows:
//! - directories always carry attributes (a walk goes into them, so their lookup is paid
//!   anyway);
//! - other entries go without, unless the mount has seen names sent that way looked up soon
//!   after: each bare entry counts against attributes, each LOOKUP of a non-directory in a
//!   directory listed bare counts twice for them (so they win once more than half of the bare
//!   names get looked up);
//! - while attributes win, every sent one counts a little against them (1/32 of a bare one),
//!   so a mount that stopped stat'ing what it lists goes back to bare entries, and one that
//!   still does tries bare again for about 3% of its entries.
//!
//! Only the io_uring transport can send bare entries (fuser 0.18 writes the attributes' ino
//! as the node id); over /dev/fuse every entry carries attributes, as before.
//! `STRATAFS_READDIRPLUS_ATTRS=always|never|auto` (default auto) fixes the choice, for tests
//! and measurements.

use std::sync::atomic::{AtomicI64, Ordering};

/// Weight of one bare entry sent, one LOOKUP of a name sent bare, one entry sent with
/// attributes while they win; and the bounds of the score.
const BARE: i64 = 32;
const HIT: i64 = 64;
const FULL: i64 = 1;
const LIMIT: i64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Always,
    Never,
    #[default]
    Auto,
}

impl Mode {
    /// The mode `STRATAFS_READDIRPLUS_ATTRS` asks for (auto when unset); an unknown value
    /// is an error, not a silent default.
    pub fn from_env() -> Result<Mode, String> {
        match std::env::var("STRATAFS_READDIRPLUS_ATTRS") {
            Err(_) => Ok(Mode::Auto),
            Ok(v) => Mode::parse(&v).ok_or_else(|| {
                format!("STRATAFS_READDIRPLUS_ATTRS={v}: want always, never or auto")
            }),
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "always" => Some(Mode::Always),
            "never" => Some(Mode::Never),
            "auto" => Some(Mode::Auto),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Policy {
    mode: Mode,
    /// > 0: names listed bare were mostly looked up; send attributes.
    score: AtomicI64,
}

impl Policy {
    pub fn new(mode: Mode) -> Policy {
        Policy {
            mode,
            score: AtomicI64::new(0),
        }
    }

    /// Does the choice follow what the mount sees (auto)? Else `sent` and `hit` need not be
    /// called.
    pub fn learning(&self) -> bool {
        self.mode == Mode::Auto
    }

    /// Do the non-directory entries of the next READDIRPLUS reply carry attributes?
    pub fn attrs(&self) -> bool {
        match self.mode {
            Mode::Always => true,
            Mode::Never => false,
            Mode::Auto => self.score.load(Ordering::Relaxed) > 0,
        }
    }

    /// A reply went out with `bare` entries without attributes and `full` non-directory
    /// entries with them.
    pub fn sent(&self, bare: u64, full: u64) {
        if self.learning() && bare + full > 0 {
            self.add(-(BARE * bare as i64 + FULL * full as i64));
        }
    }

    /// The kernel looked up a non-directory in a directory whose listing went out bare.
    pub fn hit(&self) {
        if self.learning() {
            self.add(HIT);
        }
    }

    fn add(&self, d: i64) {
        let _ = self
            .score
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((s.saturating_add(d)).clamp(-LIMIT, LIMIT))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_bare_and_learns_from_lookups() {
        let p = Policy::new(Mode::Auto);
        assert!(!p.attrs());
        // A listing of 100 names, none looked up (find): stays bare.
        p.sent(100, 0);
        assert!(!p.attrs());
        // A listing of 100 names, all looked up after (rm -rf): attributes win.
        let p = Policy::new(Mode::Auto);
        p.sent(100, 0);
        for _ in 0..100 {
            p.hit();
        }
        assert!(p.attrs());
        // Sending with attributes wears that off: bare again after enough entries.
        let mut n = 0;
        while p.attrs() {
            p.sent(0, 1);
            n += 1;
        }
        assert_eq!(n, 3200);
    }

    #[test]
    fn fewer_than_half_looked_up_stays_bare() {
        let p = Policy::new(Mode::Auto);
        for _ in 0..50 {
            p.sent(10, 0);
            for _ in 0..4 {
                p.hit();
            }
        }
        assert!(!p.attrs());
    }

    #[test]
    fn the_score_is_bounded_both_ways() {
        let p = Policy::new(Mode::Auto);
        p.sent(1_000_000, 0);
        // A long find does not make a later rm -rf wait long to switch.
        for _ in 0..(LIMIT / HIT + 1) {
            p.hit();
        }
        assert!(p.attrs());
    }

    #[test]
    fn fixed_modes_ignore_what_they_see() {
        let a = Policy::new(Mode::Always);
        a.sent(1000, 0);
        assert!(a.attrs());
        let n = Policy::new(Mode::Never);
        for _ in 0..1000 {
            n.hit();
        }
        assert!(!n.attrs());
        assert_eq!(Mode::parse("sometimes"), None);
    }
}
