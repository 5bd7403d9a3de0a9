//! Mount options: the `-o` list that fuse-overlayfs, podman and mount.fuse3 pass, parsed into
//! a [`MountOptions`] and then validated against the filesystem into a [`MountPlan`].
//!
//! Two stages, as in ripgrep: `parse` only reads text (unit-testable, never touches disk);
//! `validate` resolves paths and checks the layers, and fails with one clear line.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// A mount request that does not make sense. The message is the one line the user sees.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("unknown mount option '{0}'")]
    Unknown(String),
    #[error("bad lowerdir '{0}': {1}")]
    BadLowerdir(String, &'static str),
    #[error("bad value in mount option '{0}'")]
    BadValue(String),
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    #[error("no lowerdir given")]
    NoLower,
    #[error("upperdir given without workdir")]
    UpperWithoutWork,
    #[error("workdir given without upperdir")]
    WorkWithoutUpper,
    #[error("{0}: {1}")]
    Path(String, String),
    #[error("{0}")]
    Layout(String),
}

/// Options as given, before any path is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub nodev: bool,
    pub nosuid: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub sync: bool,
    pub dirsync: bool,
    pub fsname: Option<String>,
    pub subtype: Option<String>,
    pub volatile: bool,
    /// `noacl`: the kernel checks the mode bits only, POSIX ACLs stay plain xattrs.
    pub noacl: bool,
    /// `metacopy=on|off` (default on).
    pub metacopy: Option<bool>,
    /// `redirect_dir=on|off|follow|nofollow` (default on; follow/nofollow write none).
    pub redirect_dir: Option<bool>,
    /// Ownership as the container sees it (uidmapping, gidmapping, squash_*, xattr_permissions).
    pub ownership: crate::overlay::idmap::Ownership,
    /// `index=on|off` (default on): hard links stay one inode through copy-up.
    pub index: Option<bool>,
    /// Options accepted for compatibility that change nothing yet; one warning line each.
    pub ignored: Vec<String>,
}

/// fuse-overlayfs options stratafs accepts but does not apply (yet).
const ACCEPTED_NOT_APPLIED: &[&str] = &[
    "static_nlink",
    "timeout",
    "threaded",
    "fsync",
    "fast_ino",
    "writeback",
    "noxattrs",
    "plugins",
    "xino",
    "userxattr",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "max_idle_threads",
    "max_threads",
    "debug",
    "large_read",
    "max_read",
    "blksize",
    "kernel_cache",
    "auto_cache",
    "nfs_export",
];

/// Options that only matter to mount(8)/fstab and are dropped silently, as mount.fuse3 does.
const MOUNT_HELPER_ONLY: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "nofail",
    "_netdev",
    "rw",
    "dev",
    "suid",
    "exec",
    "atime",
    "relatime",
    "strictatime",
    "async",
];

/// Splits an option string on unescaped commas; `\,` keeps a comma, empty items are skipped.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits a lowerdir value on unescaped colons; `\:` keeps a colon and `\\` a backslash.
pub fn split_lowerdir(s: &str) -> Result<Vec<PathBuf>, OptionError> {
    let bad = |why| OptionError::BadLowerdir(s.to_string(), why);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => return Err(bad("ends with a lone backslash")),
            },
            ':' => {
                if cur.is_empty() {
                    return Err(bad("empty layer path"));
                }
                out.push(PathBuf::from(std::mem::take(&mut cur)));
            }
            _ => cur.push(c),
        }
    }
    if cur.is_empty() {
        return Err(bad("empty layer path"));
    }
    out.push(PathBuf::from(cur));
    Ok(out)
}

impl MountOptions {
    /// Adds the items of one `-o` argument.
    pub fn parse_into(&mut self, s: &str) -> Result<(), OptionError> {
        for item in split_options(s) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item.as_str(), None),
            };
            let need = |v: Option<&str>| {
                v.filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| OptionError::MissingValue(key.to_string()))
            };
            match key {
                "lowerdir" => {
                    self.lowers = split_lowerdir(&need(value)?)?;
                }
                "upperdir" => self.upper = Some(PathBuf::from(need(value)?)),
                "workdir" => self.work = Some(PathBuf::from(need(value)?)),
                "ro" => self.read_only = true,
                "allow_other" => self.allow_other = true,
                "allow_root" => self.allow_root = true,
                "default_permissions" => {}
                "nodev" => self.nodev = true,
                "nosuid" => self.nosuid = true,
                "noexec" => self.noexec = true,
                "noatime" | "nodiratime" => self.noatime = true,
                "sync" => self.sync = true,
                "dirsync" => self.dirsync = true,
                "volatile" => self.volatile = true,
                "noacl" => self.noacl = true,
                "fsname" => self.fsname = Some(need(value)?),
                "metacopy" => {
                    self.metacopy = Some(match need(value)?.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Err(OptionError::BadValue(item.clone())),
                    })
                }
                "uidmapping" => {
                    self.ownership.uids = crate::overlay::idmap::IdMap::parse(&need(value)?)
                        .map_err(|e| OptionError::Layout(e.to_string()))?
                }
                "gidmapping" => {
                    self.ownership.gids = crate::overlay::idmap::IdMap::parse(&need(value)?)
                        .map_err(|e| OptionError::Layout(e.to_string()))?
                }
                "squash_to_root" => {
                    self.ownership.squash_uid = Some(0);
                    self.ownership.squash_gid = Some(0);
                }
                "squash_to_uid" => {
                    let v = need(value)?;
                    self.ownership.squash_uid =
                        Some(v.parse().map_err(|_| OptionError::BadValue(item.clone()))?);
                }
                "squash_to_gid" => {
                    let v = need(value)?;
                    self.ownership.squash_gid =
                        Some(v.parse().map_err(|_| OptionError::BadValue(item.clone()))?);
                }
                "xattr_permissions" => {
                    self.ownership.xattr_perms =
                        crate::overlay::idmap::XattrPerms::parse(&need(value)?)
                            .ok_or_else(|| OptionError::BadValue(item.clone()))?;
                }
                "index" => {
                    self.index = Some(match need(value)?.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Err(OptionError::BadValue(item.clone())),
                    })
                }
                "redirect_dir" => {
                    self.redirect_dir = Some(match need(value)?.as_str() {
                        "on" => true,
                        "off" | "follow" | "nofollow" => false,
                        _ => return Err(OptionError::BadValue(item.clone())),
                    })
                }
                "subtype" => self.subtype = Some(need(value)?),
                k if MOUNT_HELPER_ONLY.contains(&k) => {}
                k if k.starts_with("x-") => {}
                k if ACCEPTED_NOT_APPLIED.contains(&k) => self.ignored.push(item.clone()),
                _ => return Err(OptionError::Unknown(item.clone())),
            }
        }
        Ok(())
    }

    pub fn parse(s: &str) -> Result<MountOptions, OptionError> {
        let mut o = MountOptions::default();
        o.parse_into(s)?;
        Ok(o)
    }
}

/// A validated mount: absolute, existing, non-overlapping directories.
#[derive(Clone, Debug)]
pub struct MountPlan {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub options: MountOptions,
}

fn canonical_dir(what: &str, p: &Path) -> Result<PathBuf, OptionError> {
    let abs = std::path::absolute(p).map_err(|e| OptionError::Path(what.into(), e.to_string()))?;
    let fail = |e: std::io::Error| {
        // ENOTCONN once a dead daemon's connection is torn down; ECONNABORTED and (over
        // io_uring) ECANCELED for a moment before that.
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
        ) {
            OptionError::Layout(format!(
                "{what} '{}' is a mount whose daemon died: run 'stratafs umount {}'",
                p.display(),
                p.display()
            ))
        } else {
            OptionError::Path(format!("{what} '{}'", p.display()), e.to_string())
        }
    };
    let c = fs::canonicalize(&abs).map_err(fail)?;
    let md = fs::metadata(&c).map_err(fail)?;
    if !md.is_dir() {
        return Err(OptionError::Path(
            format!("{what} '{}'", p.display()),
            "not a directory".into(),
        ));
    }
    Ok(c)
}

/// `a` is `b` or lies inside it (both canonical).
fn inside(a: &Path, b: &Path) -> bool {
    a.starts_with(b) && a.components().all(|c| c != Component::ParentDir)
}

/// Is `p` a mount point right now (listed in /proc/self/mountinfo)?
pub fn is_mount_point(p: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(unescape_mountinfo)
            .is_some_and(|m| m == want)
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MountPlan {
    /// Resolves (relative to the current directory) and checks every path.
    pub fn validate(options: MountOptions, mountpoint: &Path) -> Result<MountPlan, OptionError> {
        if options.lowers.is_empty() {
            return Err(OptionError::NoLower);
        }
        match (&options.upper, &options.work) {
            (Some(_), None) => return Err(OptionError::UpperWithoutWork),
            (None, Some(_)) => return Err(OptionError::WorkWithoutUpper),
            _ => {}
        }
        let lowers = options
            .lowers
            .iter()
            .map(|l| canonical_dir("lowerdir", l))
            .collect::<Result<Vec<_>, _>>()?;
        let upper = options
            .upper
            .as_deref()
            .map(|u| canonical_dir("upperdir", u))
            .transpose()?;
        let work = options
            .work
            .as_deref()
            .map(|w| canonical_dir("workdir", w))
            .transpose()?;
        let mnt = canonical_dir("mountpoint", mountpoint)?;
        if let (Some(u), Some(w)) = (&upper, &work) {
            if inside(u, w) || inside(w, u) {
                return Err(OptionError::Layout(
                    "upperdir and workdir must be separate directories, neither inside the other"
                        .into(),
                ));
            }
            let (du, dw) = (dev_of(u)?, dev_of(w)?);
            if du != dw {
                return Err(OptionError::Layout(format!(
                    "workdir '{}' must be on the same filesystem as upperdir '{}'",
                    w.display(),
                    u.display()
                )));
            }
            for l in &lowers {
                for (what, p) in [("upperdir", u), ("workdir", w)] {
                    if inside(p, l) || inside(l, p) {
                        return Err(OptionError::Layout(format!(
                            "{what} '{}' overlaps lowerdir '{}'",
                            p.display(),
                            l.display()
                        )));
                    }
                }
            }
            for (what, p) in [("upperdir", u), ("workdir", w)] {
                if inside(p, &mnt) || inside(&mnt, p) {
                    return Err(OptionError::Layout(format!(
                        "{what} '{}' overlaps the mountpoint '{}'",
                        p.display(),
                        mnt.display()
                    )));
                }
            }
        }
        if is_mount_point(&mnt) {
            return Err(OptionError::Layout(format!(
                "mountpoint '{}' is busy: something is mounted there already",
                mnt.display()
            )));
        }
        Ok(MountPlan {
            lowers,
            upper,
            work,
            mountpoint: mnt,
            options,
        })
    }
}

fn dev_of(p: &Path) -> Result<u64, OptionError> {
    fs::metadata(p)
        .map(|m| m.dev())
        .map_err(|e| OptionError::Path(p.display().to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_options_with_empty_items_and_escapes() {
        assert_eq!(
            split_options("lowerdir=a,,upperdir=b\\,c,volatile,"),
            vec!["lowerdir=a", "upperdir=b,c", "volatile"]
        );
    }

    #[test]
    fn lowerdir_colons_and_escapes() {
        assert_eq!(
            split_lowerdir("l/A:l/B\\:x:/abs").unwrap(),
            vec![
                PathBuf::from("l/A"),
                PathBuf::from("l/B:x"),
                PathBuf::from("/abs")
            ]
        );
        assert!(split_lowerdir("a::b").is_err());
        assert!(split_lowerdir(":a").is_err());
        assert!(split_lowerdir("a:").is_err());
        assert!(split_lowerdir("a\\").is_err());
    }

    #[test]
    fn podman_style_options_parse() {
        let o = MountOptions::parse(
            "lowerdir=l/A:l/B,upperdir=d/diff,workdir=d/work,,volatile,uidmapping=:0:300000:65536",
        )
        .unwrap();
        assert_eq!(o.lowers.len(), 2);
        assert!(o.volatile);
        assert!(o.ignored.is_empty());
        assert_eq!(o.ownership.uids.to_container(0), 300000);
    }

    #[test]
    fn mount_helper_options_accepted() {
        let o = MountOptions::parse("dev,suid,rw,nodev,allow_other,fsname=x,subtype=y").unwrap();
        assert!(o.nodev && o.allow_other);
        assert_eq!(o.fsname.as_deref(), Some("x"));
    }

    #[test]
    fn kernel_feature_options() {
        let o = MountOptions::parse("metacopy=off,redirect_dir=on").unwrap();
        assert_eq!((o.metacopy, o.redirect_dir), (Some(false), Some(true)));
        assert!(MountOptions::parse("metacopy=maybe").is_err());
    }

    #[test]
    fn unknown_option_rejected() {
        assert_eq!(
            MountOptions::parse("lowerdir=a,bogus"),
            Err(OptionError::Unknown("bogus".into()))
        );
        assert!(MountOptions::parse("upperdir=").is_err());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
