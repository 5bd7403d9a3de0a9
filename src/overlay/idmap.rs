//! Ownership as the container sees it: fuse-overlayfs's `uidmapping=`/`gidmapping=`,
//! `squash_to_root`, `squash_to_uid=`, `squash_to_gid=` and `xattr_permissions=`.
//!
//! On disk, files carry host ids; through the mount they show container ids. With
//! `xattr_permissions` the owner and mode the container set live in an xattr
//! (`uid:gid:mode[:type]`, as containers/storage writes it) instead of the real inode, for
//! rootless storage where a real chown is not possible.

use std::ffi::OsStr;

use thiserror::Error;

/// The id the kernel shows for an id with no mapping.
pub const OVERFLOW_ID: u32 = 65534;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad id mapping '{0}': expected DISK:SHOWN:SIZE[:DISK:SHOWN:SIZE...]")]
pub struct MapError(pub String);

/// One direction-agnostic id mapping: ranges of (container id, host id, length).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<(u32, u32, u32)>,
}

impl IdMap {
    /// Parses `DISK:SHOWN:N[:DISK:SHOWN:N...]` (fuse-overlayfs's `uidmapping=` syntax); a leading
    /// `:` (as podman writes it) is allowed.
    pub fn parse(s: &str) -> Result<IdMap, MapError> {
        let bad = || MapError(s.to_string());
        let body = s.strip_prefix(':').unwrap_or(s);
        let nums = body
            .split(':')
            .map(|n| n.parse::<u32>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err(bad());
        }
        let mut ranges = Vec::new();
        for c in nums.chunks(3) {
            // fuse-overlayfs's direction, which podman relies on: an id stored on disk as
            // FIRST+i shows through the mount as SECOND+i.
            let (host, cont, len) = (c[0], c[1], c[2]);
            if len == 0
                || cont.checked_add(len - 1).is_none()
                || host.checked_add(len - 1).is_none()
            {
                return Err(bad());
            }
            ranges.push((cont, host, len));
        }
        Ok(IdMap { ranges })
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The host id for a container id; `None` if it has no mapping.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(id);
        }
        self.ranges
            .iter()
            .find(|(c, _, n)| id >= *c && id - c < *n)
            .map(|(c, h, _)| h + (id - c))
    }

    /// The id on disk of the lowest id shown through the mount (the container's root).
    pub fn lowest_disk(&self) -> u32 {
        self.ranges
            .iter()
            .min_by_key(|(c, _, _)| *c)
            .map_or(0, |(_, h, _)| *h)
    }

    /// The container id for a host id; unmapped ids show as [`OVERFLOW_ID`].
    pub fn to_container(&self, id: u32) -> u32 {
        if self.ranges.is_empty() {
            return id;
        }
        self.ranges
            .iter()
            .find(|(_, h, n)| id >= *h && id - h < *n)
            .map_or(OVERFLOW_ID, |(c, h, _)| c + (id - h))
    }
}

/// Which xattr holds overridden ownership and mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrPerms {
    /// `xattr_permissions=1`: `security.fuseoverlayfs.override_stat`.
    Privileged,
    /// `xattr_permissions=2`: `user.containers.override_stat`.
    User,
}

impl XattrPerms {
    pub fn parse(v: &str) -> Option<Option<XattrPerms>> {
        match v {
            "0" => Some(None),
            "1" => Some(Some(XattrPerms::Privileged)),
            "2" => Some(Some(XattrPerms::User)),
            _ => None,
        }
    }

    pub fn xattr(self) -> &'static OsStr {
        OsStr::new(match self {
            XattrPerms::Privileged => "security.fuseoverlayfs.override_stat",
            XattrPerms::User => "user.containers.override_stat",
        })
    }
}

/// An `override_stat` value: `uid:gid:mode[:type]` (mode in octal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (and set-id/sticky bits).
    pub mode: u32,
    /// The type the container gave the object, when it differs from the real one:
    /// `file`, `dir`, `symlink`, `pipe`, `socket`, `block-M-m`, `char-M-m`.
    pub kind: Option<String>,
}

impl Override {
    pub fn parse(v: &[u8]) -> Option<Override> {
        let s = std::str::from_utf8(v).ok()?;
        let mut it = s.trim_end_matches('\0').splitn(4, ':');
        let uid = it.next()?.parse().ok()?;
        let gid = it.next()?.parse().ok()?;
        let mode = u32::from_str_radix(it.next()?, 8).ok()?;
        let kind = it.next().map(str::to_string);
        Some(Override {
            uid,
            gid,
            mode: mode & 0o7777,
            kind,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!("{}:{}:{:o}", self.uid, self.gid, self.mode & 0o7777);
        if let Some(k) = &self.kind {
            s.push(':');
            s.push_str(k);
        }
        s.into_bytes()
    }
}

/// The whole ownership policy of a mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uids: IdMap,
    pub gids: IdMap,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    pub xattr_perms: Option<XattrPerms>,
}

impl Ownership {
    /// Nothing to translate: ids pass through as they are on disk.
    pub fn is_plain(&self) -> bool {
        self.uids.is_identity()
            && self.gids.is_identity()
            && self.squash_uid.is_none()
            && self.squash_gid.is_none()
            && self.xattr_perms.is_none()
    }

    /// Ids as the container sees them, from ids on disk.
    pub fn show(&self, uid: u32, gid: u32) -> (u32, u32) {
        (
            self.squash_uid
                .unwrap_or_else(|| self.uids.to_container(uid)),
            self.squash_gid
                .unwrap_or_else(|| self.gids.to_container(gid)),
        )
    }

    /// Ids on disk for a new object made by a caller with these ids. A caller outside the
    /// mapping (host root preparing a container's rootfs through its mount, as podman does for
    /// `/etc/mtab` and `/etc/hosts`) creates as the container's root: the lowest id on disk.
    pub fn store_new(&self, uid: u32, gid: u32) -> (u32, u32) {
        (
            self.uids
                .to_host(uid)
                .unwrap_or_else(|| self.uids.lowest_disk()),
            self.gids
                .to_host(gid)
                .unwrap_or_else(|| self.gids.lowest_disk()),
        )
    }

    /// Ids to write on disk for container ids; `EINVAL` for an unmapped id, as the kernel
    /// answers a chown to an id outside the user namespace.
    pub fn store(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> std::io::Result<(Option<u32>, Option<u32>)> {
        let einval = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let u = match uid {
            Some(u) => Some(self.uids.to_host(u).ok_or_else(einval)?),
            None => None,
        };
        let g = match gid {
            Some(g) => Some(self.gids.to_host(g).ok_or_else(einval)?),
            None => None,
        };
        Ok((u, g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_podman_mappings() {
        // Stored as 0..65536 on disk, shown as 300000.. through the mount.
        let m = IdMap::parse(":0:300000:65536").unwrap();
        assert_eq!(m.to_container(0), 300000);
        assert_eq!(m.to_container(65535), 365535);
        assert_eq!(m.to_container(65536), OVERFLOW_ID);
        assert_eq!(m.to_host(300005), Some(5));
        assert_eq!(m.to_host(5), None);
    }

    #[test]
    fn several_ranges() {
        let m = IdMap::parse("1000:0:1:100000:1:65536").unwrap();
        assert_eq!(m.to_host(0), Some(1000));
        assert_eq!(m.to_host(1), Some(100000));
        assert_eq!(m.to_container(1000), 0);
        assert_eq!(m.to_container(100001), 2);
    }

    #[test]
    fn rejects_bad_mappings() {
        for bad in ["", "1:2", "a:b:c", "0:0:0", "4294967295:0:2"] {
            assert!(IdMap::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn override_stat_roundtrip() {
        let o = Override::parse(b"0:0:755:dir").unwrap();
        assert_eq!((o.uid, o.gid, o.mode), (0, 0, 0o755));
        assert_eq!(o.kind.as_deref(), Some("dir"));
        assert_eq!(Override::parse(&o.encode()), Some(o));
        let dev = Override::parse(b"5:6:4644:char-1-3").unwrap();
        assert_eq!(dev.mode, 0o4644);
        assert!(Override::parse(b"x:0:644").is_none());
    }

    #[test]
    fn squash_wins_over_mapping() {
        let own = Ownership {
            uids: IdMap::parse("1000:0:10").unwrap(),
            squash_uid: Some(0),
            ..Default::default()
        };
        assert_eq!(own.show(1005, 7), (0, 7));
        assert_eq!(own.store(Some(3), None).unwrap(), (Some(1003), None));
        assert!(own.store(Some(10), None).is_err());
        assert_eq!(own.store_new(3, 5), (1003, 5));
        assert_eq!(own.store_new(10, 5), (1000, 5));
    }
}
