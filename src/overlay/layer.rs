//! Layers and the on-disk markers of the overlay format: whiteouts, opaque directories and the
//! private xattrs that never show through the mount.
//!
//! Formats read (all of them, whatever wrote them):
//! - whiteout: a char device 0/0; a `.wh.NAME` entry beside NAME; in a directory marked
//!   `overlay.opaque=x`, an empty regular file carrying `overlay.whiteout` (kernel xwhiteouts);
//! - opaque directory: `trusted.overlay.opaque=y`, `user.overlay.opaque=y`,
//!   `user.fuseoverlayfs.opaque=y`, or a `.wh..wh..opq` entry inside it.
//!
//! Formats written: see [`MarkerStyle`].

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::sys;

pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
pub const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// One layer root, opened once at mount time. All access to the layer goes through `root` with
/// `*at` calls, so nothing outside it is reachable by a name inside it.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub root: OwnedFd,
    pub dev: u64,
    /// Index of this layer's filesystem among the distinct filesystems of the mount, used to keep
    /// st_ino unique when layers live on different filesystems (like the kernel's xino).
    pub fsid: u64,
}

impl Layer {
    pub fn open(path: PathBuf) -> io::Result<Layer> {
        let c = sys::cstr(path.as_os_str())?;
        let root = sys::open(&c, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(root.as_fd())?;
        Ok(Layer {
            path,
            root,
            dev: st.st_dev,
            fsid: 0,
        })
    }
}

/// How this mount writes whiteouts and opaque markers into the upper layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkerStyle {
    /// Whiteouts as char device 0/0 (the kernel's format); otherwise `.wh.NAME` files.
    pub char_whiteout: bool,
    /// Opaque/private xattrs in `trusted.` (kernel default); otherwise in `user.` (userxattr).
    pub trusted_xattrs: bool,
}

impl MarkerStyle {
    /// Probes what the upper filesystem lets this process write, once, at mount time.
    pub fn probe(work: BorrowedFd<'_>) -> MarkerStyle {
        let name = OsStr::new("#stratafs-probe");
        let _ = sys::unlinkat(work, name, 0);
        let char_whiteout = sys::mknodat(work, name, libc::S_IFCHR, 0).is_ok();
        let _ = sys::unlinkat(work, name, 0);
        // Test hook: `STRATAFS_FORCE_WH_FILES=1` makes the mount write `.wh.NAME` whiteouts as
        // on a kernel that refuses mknod of 0/0 (Linux before 5.8 in a user namespace).
        let char_whiteout =
            char_whiteout && std::env::var_os("STRATAFS_FORCE_WH_FILES").is_none_or(|v| v != "1");
        let trusted_xattrs = match sys::openat(
            work,
            name,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o600,
        ) {
            Ok(fd) => {
                let ok = sys::set_xattr(fd.as_fd(), OsStr::new("trusted.overlay.probe"), b"y", 0)
                    .is_ok();
                let _ = sys::unlinkat(work, name, 0);
                ok
            }
            Err(_) => false,
        };
        MarkerStyle {
            char_whiteout,
            trusted_xattrs,
        }
    }

    pub fn opaque_xattr(&self) -> &'static OsStr {
        OsStr::new(if self.trusted_xattrs {
            "trusted.overlay.opaque"
        } else {
            "user.overlay.opaque"
        })
    }

    pub fn redirect_xattr(&self) -> &'static OsStr {
        OsStr::new(if self.trusted_xattrs {
            "trusted.overlay.redirect"
        } else {
            "user.overlay.redirect"
        })
    }

    pub fn impure_xattr(&self) -> &'static OsStr {
        OsStr::new(if self.trusted_xattrs {
            "trusted.overlay.impure"
        } else {
            "user.overlay.impure"
        })
    }

    pub fn metacopy_xattr(&self) -> &'static OsStr {
        OsStr::new(if self.trusted_xattrs {
            "trusted.overlay.metacopy"
        } else {
            "user.overlay.metacopy"
        })
    }

    pub fn nlink_xattr(&self) -> &'static OsStr {
        OsStr::new(if self.trusted_xattrs {
            "trusted.stratafs.nlink"
        } else {
            "user.stratafs.nlink"
        })
    }

    pub fn origin_xattr(&self) -> &'static OsStr {
        OsStr::new(if self.trusted_xattrs {
            "trusted.stratafs.origin"
        } else {
            "user.stratafs.origin"
        })
    }
}

/// Marks a char device 0/0 that a user created through the mount (a real device, which
/// pjdfstest and ext4 allow), so it is not taken for a whiteout.
pub const DEVICE_MARK: &str = "trusted.stratafs.device";

/// A char device with device number 0/0: a whiteout unless it carries [`DEVICE_MARK`].
pub fn is_char_0_0(st: &sys::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// Is `dir/name`, whose stat is `st`, a char-device whiteout? Costs a syscall only for 0/0
/// devices.
pub fn is_char_whiteout(dir: BorrowedFd<'_>, name: &OsStr, st: &sys::Stat) -> io::Result<bool> {
    Ok(is_char_0_0(st) && !sys::has_xattr_at(dir, name, OsStr::new(DEVICE_MARK))?)
}

/// Marks a freshly made char 0/0 device as a real device.
pub fn mark_device(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::set_xattr(fd, OsStr::new(DEVICE_MARK), b"y", 0).map_err(|e| {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            io::Error::from_raw_os_error(libc::EPERM)
        } else {
            e
        }
    })
}

/// `.wh.NAME` for NAME.
pub fn whiteout_name(name: &OsStr) -> std::ffi::OsString {
    let mut v = WHITEOUT_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    std::ffi::OsStr::from_bytes(&v).to_os_string()
}

/// Names that belong to the on-disk format and are never visible or creatable in the merged
/// view: anything starting with `.wh.`.
pub fn is_marker_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WHITEOUT_PREFIX)
}

/// Xattrs that belong to the overlay format and never show through the mount.
pub fn is_private_xattr(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"trusted.overlay.")
        || b.starts_with(b"user.overlay.")
        || b.starts_with(b"trusted.stratafs.")
        || b.starts_with(b"user.stratafs.")
        || b.starts_with(b"user.fuseoverlayfs.")
}

/// What the overlay xattrs of an object say about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// A directory that hides every lower layer below it.
    pub opaque: bool,
    /// A directory holding xattr-whiteouts (`overlay.opaque=x`).
    pub xwhiteouts: bool,
    /// Where its lower part lives, if it was renamed (`overlay.redirect`).
    pub redirect: Option<std::ffi::OsString>,
    /// A directory holding copied-up entries whose st_ino comes from an origin
    /// (`overlay.impure`): readdir must read their origins.
    pub impure: bool,
    /// A regular file whose data still lives in a lower layer (`overlay.metacopy`).
    pub metacopy: bool,
    /// The st_ino the object had before it was copied up (`stratafs.origin`).
    pub origin: Option<u64>,
}

const REDIRECT_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "user.overlay.redirect"];
const IMPURE_XATTRS: [&str; 2] = ["trusted.overlay.impure", "user.overlay.impure"];
const METACOPY_XATTRS: [&str; 2] = ["trusted.overlay.metacopy", "user.overlay.metacopy"];
pub const ORIGIN_XATTRS: [&str; 2] = ["trusted.stratafs.origin", "user.stratafs.origin"];

const OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];

fn one_of(list: &[&str], name: &OsStr) -> bool {
    list.iter().any(|x| OsStr::new(x) == name)
}

/// Decodes an origin xattr value: the st_ino, 8 bytes little-endian.
pub fn decode_origin(v: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(v.try_into().ok()?))
}

/// Reads the overlay markers of an object: one listxattr, a getxattr only for a marker that is
/// present, and for directories one fstatat for `.wh..wh..opq`.
pub fn marks(fd: BorrowedFd<'_>, dir: bool) -> io::Result<Marks> {
    // Directories are held open (f*xattr works); other objects as O_PATH.
    let names = if dir {
        sys::list_xattr(fd)?
    } else {
        sys::list_xattr_path(fd)?
    };
    marks_of(fd, dir, names)
}

/// `marks` of a lower layer's regular file, open as `fd` from `parent/name`: lists its xattrs
/// by name (lower layers do not change under the mount, so the name still holds `fd`'s object),
/// which costs a third of listing them through `fd`'s `/proc` path. A lookup reads this for
/// every file it finds above the bottom layer.
pub fn lower_file_marks(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    fd: BorrowedFd<'_>,
) -> io::Result<Marks> {
    let names = match sys::list_xattr_at(parent, name)? {
        Some(names) => names,
        None => sys::list_xattr_path(fd)?,
    };
    marks_of(fd, false, names)
}

fn marks_of(fd: BorrowedFd<'_>, dir: bool, names: Vec<OsString>) -> io::Result<Marks> {
    let mut marks = Marks::default();
    let get = |name: &OsStr| {
        if dir {
            sys::get_xattr(fd, name)
        } else {
            sys::get_xattr_path(fd, name)
        }
    };
    for name in names {
        if dir && one_of(&OPAQUE_XATTRS, &name) {
            match get(&name)?.as_deref() {
                Some(b"y") => marks.opaque = true,
                Some(b"x") => marks.xwhiteouts = true,
                _ => {}
            }
        } else if marks.redirect.is_none() && one_of(&REDIRECT_XATTRS, &name) {
            marks.redirect = get(&name)?.map(|v| OsStr::from_bytes(&v).to_os_string());
        } else if dir && one_of(&IMPURE_XATTRS, &name) {
            marks.impure = true;
        } else if !dir && one_of(&METACOPY_XATTRS, &name) {
            marks.metacopy = true;
        } else if marks.origin.is_none() && one_of(&ORIGIN_XATTRS, &name) {
            marks.origin = get(&name)?.and_then(|v| decode_origin(&v));
        }
    }
    if dir && !marks.opaque {
        marks.opaque = exists(fd, OsStr::new(OPAQUE_WHITEOUT))?;
    }
    Ok(marks)
}

/// The origin of `dir/name` (an entry of an upper directory), if it has one.
pub fn origin_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<u64>> {
    for attr in ORIGIN_XATTRS {
        if let Some(v) = sys::get_xattr_at(dir, name, OsStr::new(attr))? {
            return Ok(decode_origin(&v));
        }
    }
    Ok(None)
}

/// Does `name` exist (as anything) in `dir`?
pub fn exists(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    if name.len() > 255 {
        // Cannot exist (a `.wh.` name of a 252+ byte name): no need to ask.
        return Ok(false);
    }
    match sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Is this regular file an xattr whiteout (only meaningful inside an `opaque=x` directory)?
pub fn is_xattr_whiteout(fd: BorrowedFd<'_>, st: &sys::Stat) -> io::Result<bool> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size != 0 {
        return Ok(false);
    }
    for name in ["trusted.overlay.whiteout", "user.overlay.whiteout"] {
        if sys::get_xattr_path(fd, OsStr::new(name))?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}
