//! The setuid/setgid rules of write, truncate and chown, applied by the daemon.
//!
//! stratafs asks the kernel for FUSE_HANDLE_KILLPRIV_V2. In return the kernel remembers per
//! inode that a file has nothing to kill (S_NOSEC) and stops asking for `security.capability`
//! before every write, which is a round trip per write through passthrough (randwrite was 10x
//! the kernel's time without it). In exchange the kernel no longer sends the mode change that
//! clears S_ISUID/S_ISGID with a write, truncate or chown: the file system does it, as the VFS
//! would for the caller (`setattr_should_drop_suidgid`, `chown_common`). File capabilities
//! are not ours to clear: the kernel still removes `security.capability` itself, and the
//! layer's own file system does when the daemon writes or chowns the upper file.
//!
//! The caller's credentials come from `/proc/PID/status` and `/proc/PID/ns/user`, read only
//! when the file has a bit to lose; when they cannot be read the caller counts as
//! unprivileged (the bit goes). A write or truncate keeps the bits only for CAP_FSETID in the
//! initial user namespace (`capable()` in the VFS), as kernel overlayfs and ext4 do, measured
//! by `suid_sgid_and_caps_are_killed_as_kernel_overlayfs_does` and
//! `userns_suid_sgid_are_killed_as_kernel_overlayfs_does`.

use std::fs;
use std::sync::OnceLock;

use libc::{S_ISGID, S_ISUID, S_IXGRP};
const CAP_FSETID: u32 = 4;

/// Who sent a request, as the FUSE header tells it: the ids new objects get, and the task
/// whose credentials the suid/sgid rules read.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Why bits may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// A write the kernel flagged (FUSE_WRITE_KILL_SUIDGID): the caller lacks CAP_FSETID.
    Flagged,
    /// A write (the kernel's bare SETATTR before a passthrough write): nothing goes only for
    /// CAP_FSETID in the initial user namespace.
    Write,
    /// A truncate or an open with O_TRUNC: nothing goes only for CAP_FSETID in the initial
    /// user namespace (root of any child namespace loses the bits, as on kernel overlayfs).
    Truncate,
    /// A change of owner or group: S_ISUID always goes, S_ISGID as the kernel's chown decides.
    Chown,
    /// A new access ACL (posix_acl_update_mode), of a directory as well: S_ISGID goes when the
    /// caller is neither in the group nor holds CAP_FSETID; S_ISUID stays.
    Acl,
}

/// What of the caller's credentials the rules need.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Creds {
    /// CAP_FSETID in the user namespace of the mount (the daemon's).
    pub fsetid: bool,
    /// CAP_FSETID in the initial user namespace.
    pub fsetid_init: bool,
    /// The filesystem gid and the supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    /// Reads the caller's credentials; a caller whose task is gone or unreadable has no
    /// capabilities and only its filesystem gid.
    pub fn creds(&self) -> Creds {
        let fallback = Creds {
            fsetid: false,
            fsetid_init: false,
            groups: vec![self.gid],
        };
        if self.pid == 0 {
            return fallback;
        }
        let Ok(status) = fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return fallback;
        };
        let mut c = parse_status(&status);
        if !c.groups.contains(&self.gid) {
            c.groups.push(self.gid);
        }
        // For a chown and a new ACL the capability counts in the namespace the mount belongs
        // to, ours; a write or truncate needs it in the initial one (`fsetid_init`).
        if c.fsetid {
            let theirs = fs::read_link(format!("/proc/{}/ns/user", self.pid)).ok();
            c.fsetid = theirs.is_some() && theirs == *own_userns();
            c.fsetid_init = c.fsetid && in_init_userns();
        }
        c
    }
}

/// Is the daemon in the initial user namespace (its uid map the identity over all ids)?
fn in_init_userns() -> bool {
    static INIT: OnceLock<bool> = OnceLock::new();
    *INIT.get_or_init(|| {
        fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
    })
}

fn own_userns() -> &'static Option<std::path::PathBuf> {
    static NS: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    NS.get_or_init(|| fs::read_link("/proc/self/ns/user").ok())
}

/// The groups and CAP_FSETID of a `/proc/PID/status` text.
pub fn parse_status(status: &str) -> Creds {
    let mut c = Creds::default();
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Groups:") {
            c.groups
                .extend(v.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        } else if let Some(v) = line.strip_prefix("CapEff:") {
            let caps = u64::from_str_radix(v.trim(), 16).unwrap_or(0);
            c.fsetid = caps & (1 << CAP_FSETID) != 0;
        } else if let Some(v) = line.strip_prefix("Gid:") {
            // real, effective, saved, filesystem
            if let Some(fsgid) = v.split_whitespace().nth(3).and_then(|g| g.parse().ok()) {
                c.groups.push(fsgid);
            }
        }
    }
    c
}

/// The bits of `mode` (a file that is not a directory, but for `Kill::Acl`; group `gid`) that
/// `why` clears for the caller whose credentials `creds` reads; `creds` runs only when there
/// is a bit to lose.
pub fn to_clear(mode: u32, gid: u32, why: Kill, creds: impl FnOnce() -> Creds) -> u32 {
    let suid = mode & S_ISUID != 0;
    let sgid = mode & S_ISGID != 0;
    if !suid && !sgid {
        return 0;
    }
    let c = creds();
    let in_group = c.groups.contains(&gid);
    let exec = mode & S_IXGRP != 0;
    let bit = |on: bool, b: u32| if on { b } else { 0 };
    match why {
        // chown_common: S_ISUID always; S_ISGID with group exec, or when the caller is
        // neither in the group nor capable (setattr_should_drop_sgid).
        Kill::Chown => bit(suid, S_ISUID) | bit(sgid && (exec || !(in_group || c.fsetid)), S_ISGID),
        Kill::Acl => bit(sgid && !(in_group || c.fsetid), S_ISGID),
        Kill::Write | Kill::Truncate if c.fsetid_init => 0,
        // setattr_should_drop_suidgid for a caller without CAP_FSETID.
        Kill::Write | Kill::Truncate | Kill::Flagged => {
            bit(suid, S_ISUID) | bit(sgid && (exec || !in_group), S_ISGID)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(fsetid: bool, groups: &[u32]) -> impl FnOnce() -> Creds {
        let groups = groups.to_vec();
        move || Creds {
            fsetid,
            fsetid_init: fsetid,
            groups,
        }
    }

    #[test]
    fn data_changes_follow_the_vfs() {
        // root with CAP_FSETID keeps everything
        assert_eq!(to_clear(0o6755, 0, Kill::Write, who(true, &[0])), 0);
        // a user loses suid, and sgid with group exec
        assert_eq!(to_clear(0o6755, 9, Kill::Write, who(false, &[9])), 0o6000);
        // sgid without group exec stays for a member, goes for others
        assert_eq!(to_clear(0o2644, 9, Kill::Write, who(false, &[9])), 0);
        assert_eq!(to_clear(0o2644, 9, Kill::Write, who(false, &[8])), 0o2000);
        assert_eq!(to_clear(0o6644, 9, Kill::Write, who(false, &[9])), 0o4000);
        // root of a child namespace loses them on a write and on a truncate
        let ns_root = || Creds {
            fsetid: true,
            fsetid_init: false,
            groups: vec![0],
        };
        assert_eq!(to_clear(0o6755, 0, Kill::Write, ns_root), 0o6000);
        assert_eq!(to_clear(0o6755, 0, Kill::Truncate, ns_root), 0o6000);
        // the kernel's flag means "not capable", whatever /proc says
        assert_eq!(to_clear(0o4755, 0, Kill::Flagged, who(true, &[0])), 0o4000);
    }

    #[test]
    fn chown_kills_suid_even_for_root() {
        assert_eq!(to_clear(0o6755, 0, Kill::Chown, who(true, &[0])), 0o6000);
        assert_eq!(to_clear(0o2644, 0, Kill::Chown, who(true, &[5])), 0);
        assert_eq!(to_clear(0o2644, 0, Kill::Chown, who(false, &[5])), 0o2000);
        assert_eq!(to_clear(0o2644, 5, Kill::Chown, who(false, &[5])), 0);
    }

    #[test]
    fn an_acl_set_by_a_non_member_drops_sgid_only() {
        assert_eq!(to_clear(0o6775, 5, Kill::Acl, who(false, &[7])), 0o2000);
        assert_eq!(to_clear(0o6775, 5, Kill::Acl, who(false, &[5])), 0);
        assert_eq!(to_clear(0o2775, 5, Kill::Acl, who(true, &[7])), 0);
        assert_eq!(to_clear(0o4755, 5, Kill::Acl, who(false, &[7])), 0);
    }

    #[test]
    fn no_bits_no_proc_read() {
        let c = || -> Creds { panic!("credentials read for a file with nothing to lose") };
        assert_eq!(to_clear(0o755, 0, Kill::Write, c), 0);
    }

    #[test]
    fn status_parsing() {
        let s = "Name:\tsh\nUid:\t1\t1\t1\t1\nGid:\t7\t7\t7\t8\nGroups:\t3 4 \nCapEff:\t0000000000000010\n";
        let c = parse_status(s);
        assert!(c.fsetid);
        assert_eq!(c.groups, vec![8, 3, 4]);
        let c = parse_status("Groups:\t\nCapEff:\t000001ffffffffef\n");
        assert!(!c.fsetid);
        assert!(c.groups.is_empty());
    }
}
