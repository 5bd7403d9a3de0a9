//! POSIX ACLs: what a new object's mode becomes in a directory with a default ACL.
//!
//! With FUSE_POSIX_ACL the kernel checks ACLs itself (it fetches `system.posix_acl_access`
//! through GETXATTR and caches it per inode) and leaves the umask to the daemon
//! (FUSE_DONT_MASK). The upper filesystem applies a default ACL when the daemon creates an
//! object there, but the daemon creates with 0600 and sets the final mode after the owner (so
//! nothing is ever reachable with the caller's mode under the daemon's owner). That final mode
//! must then be the one `posix_acl_create` would give: the requested mode, not the umask,
//! narrowed by the default ACL's owner, mask (or group) and other entries. A chmod to it sets
//! exactly those entries of the inherited ACL, and leaves the named ones as inherited.

use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;

use crate::sys;

/// The default ACL of a directory, where new objects inherit from.
pub const DEFAULT_XATTR: &str = "system.posix_acl_default";
/// The access ACL, which the permission checks read.
pub const ACCESS_XATTR: &str = "system.posix_acl_access";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// The entries of an ACL that decide a new object's mode bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inherit {
    owner: u32,
    group: u32,
    mask: Option<u32>,
    other: u32,
}

impl Inherit {
    /// Reads the kernel's xattr form: a little-endian version 2 header, then 8-byte entries
    /// (tag u16, perm u16, id u32). `None` when it is not a well-formed ACL with the three
    /// required entries.
    pub fn parse(value: &[u8]) -> Option<Inherit> {
        let (head, body) = value.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*head) != VERSION || body.is_empty() || body.len() % 8 != 0 {
            return None;
        }
        let (mut owner, mut group, mut mask, mut other) = (None, None, None, None);
        for e in body.chunks_exact(8) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u32::from(u16::from_le_bytes([e[2], e[3]]) & 7);
            match tag {
                USER_OBJ => owner = Some(perm),
                GROUP_OBJ => group = Some(perm),
                MASK => mask = Some(perm),
                OTHER => other = Some(perm),
                _ => {}
            }
        }
        Some(Inherit {
            owner: owner?,
            group: group?,
            mask,
            other: other?,
        })
    }

    /// The mode an object asked for with `mode` gets (the kernel's posix_acl_create: the
    /// umask does not apply): each class narrowed by its entry, the group class by the mask
    /// where there is one; S_ISUID, S_ISGID and the sticky bit kept.
    pub fn create_mode(&self, mode: u32) -> u32 {
        // Each entry's perm is at most 7 (`parse`), so each class stays in its three bits.
        let owner = (mode >> 6) & self.owner;
        let group = (mode >> 3) & self.mask.unwrap_or(self.group);
        let other = mode & self.other;
        (mode & !0o777) | (owner << 6) | (group << 3) | other
    }
}

/// The default ACL of the directory `dir` (an fd open on it), if it has a valid one.
/// An upper filesystem without ACLs answers EOPNOTSUPP, which `get_xattr` reads as absent.
pub fn default_of(dir: BorrowedFd<'_>) -> io::Result<Option<Inherit>> {
    Ok(sys::get_xattr(dir, OsStr::new(DEFAULT_XATTR))?
        .as_deref()
        .and_then(Inherit::parse))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const NO_ID: u32 = u32::MAX;

    #[test]
    fn a_mask_narrows_the_group_class_and_the_umask_does_not_apply() {
        // d:u::rwx, d:u:1000:rwx, d:g::r-x, d:m::rwx, d:o::---
        let a = Inherit::parse(&acl(&[
            (USER_OBJ, 7, NO_ID),
            (0x02, 7, 1000),
            (GROUP_OBJ, 5, NO_ID),
            (MASK, 7, NO_ID),
            (OTHER, 0, NO_ID),
        ]))
        .expect("valid ACL");
        assert_eq!(a.create_mode(0o666), 0o660);
        assert_eq!(a.create_mode(0o777), 0o770);
        assert_eq!(a.create_mode(0o2755), 0o2750);
    }

    #[test]
    fn without_a_mask_the_group_entry_narrows_the_group_class() {
        let a = Inherit::parse(&acl(&[
            (USER_OBJ, 6, NO_ID),
            (GROUP_OBJ, 4, NO_ID),
            (OTHER, 4, NO_ID),
        ]))
        .expect("valid ACL");
        assert_eq!(a.create_mode(0o777), 0o644);
        assert_eq!(a.create_mode(0), 0);
    }

    #[test]
    fn malformed_acls_are_not_inherited_from() {
        assert_eq!(Inherit::parse(b""), None);
        assert_eq!(Inherit::parse(&1u32.to_le_bytes()), None, "wrong version");
        assert_eq!(Inherit::parse(&acl(&[])), None, "no entries");
        let mut short = acl(&[
            (USER_OBJ, 7, NO_ID),
            (GROUP_OBJ, 5, NO_ID),
            (OTHER, 5, NO_ID),
        ]);
        short.pop();
        assert_eq!(Inherit::parse(&short), None, "a cut entry");
        assert_eq!(
            Inherit::parse(&acl(&[(USER_OBJ, 7, NO_ID), (OTHER, 5, NO_ID)])),
            None,
            "no group entry"
        );
    }
}
