//! Every operation that changes the merged view, plus open files and directories.
//!
//! A change to a lower object copies it up first; a removal of a name that a lower layer shows
//! leaves a whiteout; a new directory over a whited-out name is opaque. Whiteouts and objects
//! that replace a whiteout are built in the work directory and renamed into place, so each step
//! is atomic in the upper layer.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{FileAttr, INodeNo};
use parking_lot::Mutex;

use super::copy_up::CopyUp;
use super::dir::{DirEntry, DirLayer, remove_contents, remove_entry};
use super::inode::Node;
use super::privs::{self, Caller, Kill};
use super::{Found, OverlayFs, acl, errno, idmap, is_dir, is_enoent, layer};
use crate::sys::{self, SetTime};

/// An open file or directory.
#[derive(Debug)]
pub enum Handle {
    File(FileHandle),
    Dir(DirHandle),
}

#[derive(Debug)]
pub struct FileHandle {
    /// The real file (upper after copy-up, or the lower file for read-only opens).
    pub fd: OwnedFd,
    pub writable: bool,
    /// The passthrough backing this open uses, kept alive until release.
    pub backing: std::sync::OnceLock<Arc<Backing>>,
    /// The node, when this open counts in its `cached_opens`.
    pub cached_of: Option<Arc<Node>>,
    /// The node this file belongs to (counted in its `opens`).
    pub node: Option<Arc<Node>>,
    /// `fd` is the upper file opened read-write with no O_APPEND, O_DIRECT or O_SYNC: fit to be
    /// the inode's passthrough backing as it is.
    pub backing_ready: bool,
    /// Set when `fd` is data below the upper file (a lower file, the data of a metacopy, an
    /// index entry): the open then follows a later copy-up.
    pub follow: Option<Follow>,
}

/// A read-only open made on data below the upper layer. Once the node's data moves (a copy-up),
/// the open reads the data where it is now, as kernel overlayfs's file does (its real file
/// follows the copy-up): a reader that opened a lower file sees what a writer wrote after.
#[derive(Debug)]
pub struct Follow {
    node: Arc<Node>,
    /// The data object the open was made on (held, so the pointer stays unique).
    opened_on: Arc<OwnedFd>,
    /// The flags `fd` was opened with, for the reopen.
    flags: i32,
    /// The data object seen last, and the open of it.
    now: Mutex<Option<(Arc<OwnedFd>, Arc<OwnedFd>)>>,
}

impl Follow {
    /// The open of the node's data as it is now, if that moved since the open.
    fn moved(&self) -> io::Result<Option<Arc<OwnedFd>>> {
        let Some(data) = self.node.state.read().data().cloned() else {
            return Ok(None);
        };
        if Arc::ptr_eq(&data, &self.opened_on) {
            return Ok(None);
        }
        let mut now = self.now.lock();
        if let Some((seen, fd)) = &*now
            && Arc::ptr_eq(seen, &data)
        {
            return Ok(Some(fd.clone()));
        }
        let fd = Arc::new(sys::reopen(data.as_fd(), self.flags)?);
        *now = Some((data, fd.clone()));
        Ok(Some(fd))
    }
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            node.opens.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(node) = &self.cached_of {
            let mut io = node.io.lock();
            io.cached_opens = io.cached_opens.saturating_sub(1);
        }
    }
}

/// A passthrough backing id the kernel holds for us; dropping it closes the id.
#[derive(Debug)]
pub enum Backing {
    /// Opened through fuser (the /dev/fuse transport).
    Fuser(fuser::BackingId),
    /// Opened by the io_uring transport.
    Raw(sys::BackingFile),
}

/// How an open file does its I/O, decided at open.
///
/// Lower files are read through the daemon into the kernel's page cache, never passed through:
/// the kernel lets an inode have one backing file only, so a lower backing would leave a later
/// write open (after copy-up) nothing correct to do. Upper files are passed through to the
/// kernel when the daemon may (root, a kernel with passthrough). A node that still has
/// page-cached opens from before its copy-up gets direct I/O through the daemon for its new
/// opens, which the kernel allows beside them.
#[derive(Debug)]
pub enum OpenPlan {
    /// Through the daemon, page cache kept across opens.
    Cached,
    /// Through the daemon, no page cache.
    DirectIo,
    /// Kernel passthrough to the node's upper file.
    Passthrough(Arc<Node>),
}

#[derive(Debug)]
pub struct DirHandle {
    node: Arc<Node>,
    /// The listing, built at the first read from offset 0 and served by offset after that, so
    /// offsets stay stable while other requests change the directory.
    entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

/// What occupies a name in the upper layer before a new object is put there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Nothing, and no lower layer shows the name.
    Free,
    /// A char 0/0 whiteout: replace it atomically through the work directory.
    CharWhiteout,
    /// A `.wh.NAME` file: create NAME, then drop the marker.
    WhFile,
}

/// What the new object is.
/// The modes are as the caller asked, before its umask (which FUSE_DONT_MASK leaves to us).
enum Make<'a> {
    File {
        flags: i32,
        mode: u32,
        umask: u32,
    },
    Dir {
        mode: u32,
        umask: u32,
    },
    Node {
        mode: u32,
        rdev: u64,
        umask: u32,
    },
    Symlink {
        target: &'a Path,
    },
    /// A new name for the node `ino`, whose upper inode `src` is.
    Link {
        src: Arc<OwnedFd>,
        ino: u64,
    },
}

/// Counts one open file on `node` and returns it for the handle to keep.
fn counted_open(node: &Arc<Node>) -> Arc<Node> {
    node.opens.fetch_add(1, Ordering::AcqRel);
    node.clone()
}

fn check_name(name: &OsStr) -> io::Result<()> {
    if name.len() > 255 {
        return Err(errno(libc::ENAMETOOLONG));
    }
    if layer::is_marker_name(name) {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

impl OverlayFs {
    fn require_upper(&self) -> io::Result<()> {
        if self.has_upper {
            Ok(())
        } else {
            Err(errno(libc::EROFS))
        }
    }

    fn dir_node(&self, ino: INodeNo) -> io::Result<Arc<Node>> {
        let node = self.node(ino)?;
        if !node.is_dir {
            return Err(errno(libc::ENOTDIR));
        }
        Ok(node)
    }

    /// Copies the parent up and finds out what `name` is in it.
    fn prepare_slot(&self, parent: &Arc<Node>, name: &OsStr) -> io::Result<(Arc<OwnedFd>, Slot)> {
        check_name(name)?;
        self.require_upper()?;
        let pupper = self.copy_up(parent, CopyUp::Meta)?;
        let slot = match sys::fstatat(pupper.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if layer::is_char_whiteout(pupper.as_fd(), name, &st)? => Slot::CharWhiteout,
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(e) if is_enoent(&e) => {
                if layer::exists(pupper.as_fd(), &layer::whiteout_name(name))? {
                    Slot::WhFile
                } else if self.lower_has(&parent.state.read(), name)? {
                    return Err(errno(libc::EEXIST));
                } else {
                    Slot::Free
                }
            }
            Err(e) => return Err(e),
        };
        Ok((pupper, slot))
    }

    /// Creates `name` in `parent` as `make` says, owned by `caller`, and returns a node for it
    /// (counted as one kernel lookup) plus the open fd for `Make::File`.
    fn create_obj(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        make: Make<'_>,
        caller: Caller,
    ) -> io::Result<(FileAttr, u64, Option<OwnedFd>)> {
        let (pupper, slot) = self.prepare_slot(parent, name)?;
        let pst = sys::fstat(pupper.as_fd())?;
        let setgid_parent = pst.st_mode & libc::S_ISGID != 0;
        let gid = if setgid_parent {
            pst.st_gid
        } else {
            caller.gid
        };
        let is_link = matches!(make, Make::Link { .. });
        // The new name of a link is the node it links to, whatever st_ino its upper inode
        // alone would give (a file copied up keeps its number from below).
        let link_of = match &make {
            Make::Link { ino, .. } => Some(*ino),
            _ => None,
        };
        let mk_dir = matches!(make, Make::Dir { .. });
        // A default ACL in the parent replaces the umask (see `acl`).
        let inherit = match &make {
            Make::File { .. } | Make::Dir { .. } | Make::Node { .. }
                if self.posix_acl.load(Ordering::Relaxed) =>
            {
                acl::default_of(pupper.as_fd())?
            }
            _ => None,
        };
        let masked = |mode: u32, umask: u32| match &inherit {
            Some(a) => a.create_mode(mode & 0o7777),
            None => mode & 0o7777 & !umask,
        };
        let mut final_mode = match &make {
            Make::File { mode, umask, .. } | Make::Node { mode, umask, .. } => {
                Some(masked(*mode, *umask))
            }
            Make::Dir { mode, umask } => {
                Some(masked(*mode, *umask) | if setgid_parent { libc::S_ISGID } else { 0 })
            }
            Make::Symlink { .. } | Make::Link { .. } => None,
        };
        if let Some(m) = final_mode.as_mut() {
            // A non-member creating a set-group-id file in a set-group-id directory loses the
            // bit, as on a plain filesystem.
            if !mk_dir && *m & libc::S_ISGID != 0 && caller.uid != 0 && gid != caller.gid {
                *m &= !libc::S_ISGID;
            }
        }
        // Where the object is built: straight in the upper dir, or in the work dir when it has
        // to replace a whiteout atomically.
        let work;
        let (bdir, bname): (BorrowedFd<'_>, OsString) = if slot == Slot::CharWhiteout {
            work = self.work()?;
            (work, self.tmp_name())
        } else {
            (pupper.as_fd(), name.to_os_string())
        };
        let open_fd = match &make {
            Make::File { flags, .. } => {
                let flags = (flags
                    & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY))
                    | libc::O_CREAT
                    | libc::O_EXCL;
                Some(sys::openat(bdir, &bname, flags, 0o600)?)
            }
            Make::Dir { .. } => {
                sys::mkdirat(bdir, &bname, 0o700)?;
                None
            }
            Make::Node { mode, rdev, .. } => {
                sys::mknodat(bdir, &bname, (mode & libc::S_IFMT) | 0o600, *rdev)?;
                if mode & libc::S_IFMT == libc::S_IFCHR && *rdev == 0 {
                    let fd = sys::openat(bdir, &bname, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                    if let Err(e) = layer::mark_device(fd.as_fd()) {
                        let _ = sys::unlinkat(bdir, &bname, 0);
                        return Err(e);
                    }
                }
                None
            }
            Make::Symlink { target } => {
                sys::symlinkat(target.as_os_str(), bdir, &bname)?;
                None
            }
            Make::Link { src, .. } => {
                sys::link_fd(src.as_fd(), bdir, &bname)?;
                None
            }
        };
        let flags = if mk_dir {
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
        } else {
            libc::O_PATH | libc::O_NOFOLLOW
        };
        let finish = || -> io::Result<OwnedFd> {
            let fd = sys::openat(bdir, &bname, flags, 0)?;
            if !is_link {
                if let Some(xp) = self.own.xattr_perms {
                    // Owner and mode live in the xattr; the inode stays the daemon's.
                    let o = idmap::Override {
                        uid: caller.uid,
                        gid,
                        mode: final_mode.unwrap_or(0o777),
                        kind: None,
                    };
                    if let Some(m) = final_mode {
                        sys::chmod_fd(fd.as_fd(), m | 0o600)?;
                    }
                    sys::set_xattr(fd.as_fd(), xp.xattr(), &o.encode(), 0)?;
                } else {
                    let (u, g) = self.own.store_new(caller.uid, gid);
                    sys::fchown(fd.as_fd(), Some(u), Some(g))?;
                    // Made with 0600 (0700 a directory) under the daemon's zero umask; a
                    // chown by root keeps those bits.
                    let made = if mk_dir { 0o700 } else { 0o600 };
                    if let Some(m) = final_mode.filter(|m| *m != made) {
                        sys::chmod_fd(fd.as_fd(), m)?;
                    }
                }
            }
            if mk_dir
                && (slot != Slot::Free
                    || (self.redirect_dir
                        && self.style.trusted_xattrs
                        && (!parent.state.read().lowers.is_empty()
                            || self.lower_whiteout(parent, name)?)))
            {
                // Something below had this name: the new directory must hide it. With
                // redirects (trusted xattrs), the kernel also marks opaque every new directory
                // in a merged directory, since a redirect may later show lower entries there.
                self.set_opaque(fd.as_fd())?;
            }
            match slot {
                Slot::Free => {}
                Slot::CharWhiteout if mk_dir => {
                    // A directory cannot be renamed over a char device: swap them, then drop
                    // the whiteout that landed in the work dir.
                    sys::renameat2(bdir, &bname, pupper.as_fd(), name, sys::RENAME_EXCHANGE)?;
                    sys::unlinkat(bdir, &bname, 0)?;
                }
                Slot::CharWhiteout => {
                    sys::renameat2(bdir, &bname, pupper.as_fd(), name, 0)?;
                }
                Slot::WhFile => {
                    sys::unlinkat(pupper.as_fd(), &layer::whiteout_name(name), 0)?;
                }
            }
            Ok(fd)
        };
        let built = match finish() {
            Ok(fd) => fd,
            Err(e) => {
                let _ = remove_entry(bdir, &bname);
                return Err(e);
            }
        };
        let mut found = Found::default();
        // Built in place, the fd is the object's; one built in the work dir was renamed over a
        // whiteout (or swapped with it): open it at its name.
        let fd = if slot == Slot::CharWhiteout {
            sys::openat(pupper.as_fd(), name, flags, 0)?
        } else {
            built
        };
        let st = sys::fstat(fd.as_fd())?;
        found.upper = Some((Arc::new(fd), st));
        found.origin = link_of;
        found.opaque = mk_dir && slot != Slot::Free;
        let (node, st) = self.intern(parent, name, found);
        Ok((self.attr(&node, &st), node.st_ino, open_fd))
    }

    /// Is `name` hidden by a whiteout in one of the parent's lower layers?
    fn lower_whiteout(&self, parent: &Arc<Node>, name: &OsStr) -> io::Result<bool> {
        let lowers = parent.state.read().lowers.clone();
        for l in &lowers {
            match self.probe(
                l.fd.as_fd(),
                name,
                l.xwhiteouts,
                Some(l.layer),
                super::Wh::Listed(&l.wh_names),
            )? {
                super::Probe::Whiteout => return Ok(true),
                super::Probe::Found(..) | super::Probe::Plain(..) => return Ok(false),
                super::Probe::Missing => {}
            }
        }
        Ok(false)
    }

    fn set_opaque(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        sys::set_xattr(dir, self.style.opaque_xattr(), b"y", 0)
    }

    pub fn do_mkdir(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> io::Result<(FileAttr, u64)> {
        let parent = self.dir_node(parent)?;
        let make = Make::Dir { mode, umask };
        let (attr, id, _) = self.create_obj(&parent, name, make, caller)?;
        Ok((attr, id))
    }

    pub fn do_mknod(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> io::Result<(FileAttr, u64)> {
        let parent = self.dir_node(parent)?;
        let make = Make::Node {
            mode,
            rdev: u64::from(rdev),
            umask,
        };
        let (attr, id, _) = self.create_obj(&parent, name, make, caller)?;
        Ok((attr, id))
    }

    pub fn do_symlink(
        &self,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> io::Result<(FileAttr, u64)> {
        let parent = self.dir_node(parent)?;
        let (attr, id, _) = self.create_obj(&parent, name, Make::Symlink { target }, caller)?;
        Ok((attr, id))
    }

    pub fn do_link(
        &self,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> io::Result<(FileAttr, u64)> {
        let node = self.node(ino)?;
        if node.is_dir {
            return Err(errno(libc::EPERM));
        }
        let parent = self.dir_node(newparent)?;
        self.require_upper()?;
        // A metacopy file gets its data first: the new name could not find it below.
        let src = self.copy_up(&node, CopyUp::Data)?;
        let caller = Caller {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        let (_, id, _) = self.create_obj(
            &parent,
            newname,
            Make::Link {
                src: src.clone(),
                ino: node.st_ino,
            },
            caller,
        )?;
        let st = sys::fstat(src.as_fd())?;
        if !self.made_in_upper(node.st_ino, &st) {
            self.adjust_nlink(src.as_fd(), 1, node.st_ino)?;
        }
        Ok((self.attr(&node, &st), id))
    }

    pub fn do_create(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> io::Result<(FileAttr, u64, u64, OpenPlan)> {
        let parent = self.dir_node(parent)?;
        // A passthrough create that asks nothing of the fd itself opens the new file read-write,
        // so that fd becomes the backing without a second open through /proc.
        let special = libc::O_APPEND | libc::O_DIRECT | libc::O_DSYNC | libc::O_SYNC;
        let backing_ready = self.passthrough.load(Ordering::Relaxed) && flags & special == 0;
        let real = if backing_ready {
            (flags & !libc::O_ACCMODE) | libc::O_RDWR
        } else {
            self.real_open_flags(flags)
        };
        let make = Make::File {
            flags: real,
            mode,
            umask,
        };
        let (attr, id, fd) = self.create_obj(&parent, name, make, caller)?;
        let fd = fd.ok_or_else(|| errno(libc::EIO))?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let fh = self.add_handle(Handle::File(FileHandle {
            fd,
            writable,
            backing: std::sync::OnceLock::new(),
            cached_of: None,
            node: self.table.get(id).map(|n| counted_open(&n)),
            backing_ready,
            follow: None,
        }));
        let plan = match self.table.get(id) {
            Some(node) if self.passthrough.load(Ordering::Relaxed) => OpenPlan::Passthrough(node),
            _ => OpenPlan::Cached,
        };
        Ok((attr, id, fh, plan))
    }

    /// Removes `name` (a directory if `dir`), leaving a whiteout where a lower layer shows it.
    pub fn do_remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> io::Result<()> {
        let parent = self.dir_node(parent)?;
        self.require_upper()?;
        if layer::is_marker_name(name) {
            return Err(errno(libc::ENOENT));
        }
        let found = self
            .resolve(&parent.state.read(), name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let found_dir = is_dir(found.top_stat());
        if dir && !found_dir {
            return Err(errno(libc::ENOTDIR));
        }
        if !dir && found_dir {
            return Err(errno(libc::EISDIR));
        }
        if found_dir && !self.merged_empty(&found)? {
            return Err(errno(libc::ENOTEMPTY));
        }
        // Name-based, as the kernel decides. Found by this name in a lower layer is proof
        // enough; an upper object, or one reached through a redirect, needs a look below.
        let needs_whiteout = match (&found.upper, found.lowers.is_empty(), &found.redirect) {
            (None, _, _) | (Some(_), false, None) => true,
            _ => self.lower_has(&parent.state.read(), name)?,
        };
        let pupper = self.copy_up(&parent, CopyUp::Meta)?;
        // An upper inode with one link has no index entry (that would be a second link), so
        // this name is its last: no merged count is left to keep, and reading its nlink
        // xattr would be a syscall per removed file for nothing.
        let last_upper_link = found.upper.as_ref().is_some_and(|(_, st)| st.st_nlink <= 1);
        let counted = if found_dir || last_upper_link {
            None
        } else {
            self.counted_inode(&parent, &found)?
        };
        match (&found.upper, needs_whiteout) {
            (Some((fd, _)), false) => {
                if found_dir {
                    // Merged-empty, but it may still hold whiteouts of its own.
                    remove_contents(fd.as_fd())?;
                    sys::unlinkat(pupper.as_fd(), name, libc::AT_REMOVEDIR)?;
                } else {
                    sys::unlinkat(pupper.as_fd(), name, 0)?;
                }
            }
            (Some(_), true) => self.replace_with_whiteout(pupper.as_fd(), name, found_dir)?,
            (None, _) => self.make_whiteout(pupper.as_fd(), name)?,
        }
        let st_ino = self.stino_of(&found);
        if !found_dir && let Some(fd) = &counted {
            self.adjust_nlink(fd.as_fd(), -1, st_ino)?;
        }
        if let Some((_, st)) = &found.upper
            && (found_dir || last_upper_link)
        {
            // The upper inode is gone once its node is: its number may come back as a
            // different object.
            self.copied.remove(&st.st_ino);
        }
        if let Some(node) = self.table.get(st_ino) {
            // The node keeps its fd of the removed inode until the kernel forgets it: that
            // fd keeps the inode number from being reused while the kernel may still use it
            // as this node's id (two objects on one FUSE inode confuse the kernel).
            let mut s = node.state.write();
            s.drop_name(parent.st_ino, name);
            index_only_now(&mut s, counted.as_ref());
        }
        self.table.past_moved(st_ino, None);
        Ok(())
    }

    /// The inode whose merged link count must change when a name of `found` goes: its upper
    /// or indexed inode, after indexing it first if it is a lower hard link (as the kernel
    /// does with `index=on`), so the other names show the count that remains. None when there
    /// is no merged count: a non-indexed lower file, or an inode made in the upper layer.
    fn counted_inode(&self, parent: &Arc<Node>, found: &Found) -> io::Result<Option<Arc<OwnedFd>>> {
        // git links every object it writes: no xattr to read for inodes made up here.
        if let Some((_, st)) = &found.upper
            && self.made_in_upper(self.stino_of(found), st)
        {
            return Ok(None);
        }
        if let Some(fd) = found.upper_inode() {
            return Ok(Some(fd.clone()));
        }
        let Some((lower, st)) = found.lowers.first() else {
            return Ok(None);
        };
        if self.index.is_none()
            || st.st_nlink <= 1
            || st.st_mode & libc::S_IFMT != libc::S_IFREG
            || found.lowers.iter().any(|(l, _)| l.metacopy)
        {
            return Ok(None);
        }
        let st_ino = self.stino_of(found);
        let fd = self.index_only(parent, lower.fd.as_fd(), st_ino)?;
        if let Some(node) = self.table.get(st_ino) {
            let mut s = node.state.write();
            if s.upper.is_none() && s.index.is_none() {
                s.index = Some(fd.clone());
            }
        }
        Ok(Some(fd))
    }

    /// Is this directory empty in the merged view?
    fn merged_empty(&self, found: &Found) -> io::Result<bool> {
        let upper = found.upper.as_ref().map(|(fd, _)| fd);
        let lowers: Vec<_> = found.lowers.iter().map(|(l, _)| l.clone()).collect();
        let layers = DirLayer::of(upper, found.xwhiteouts, found.impure, &lowers);
        Ok(self.read_merged(&layers, true)?.is_empty())
    }

    /// Puts a whiteout at `name`, where the upper layer has nothing.
    fn make_whiteout(&self, pupper: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        if self.style.char_whiteout {
            self.link_whiteout(pupper, name)
        } else {
            let wh = layer::whiteout_name(name);
            sys::openat(pupper, &wh, libc::O_CREAT | libc::O_WRONLY, 0).map(drop)
        }
    }

    /// Makes `dir/name` a char 0/0 whiteout by hard-linking one shared whiteout inode kept in
    /// the work dir, as the kernel does: a link is far cheaper than a new inode. Falls back to
    /// mknod when the shared one is full (EMLINK) or cannot be linked.
    fn link_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        const SHARED: &str = "#whiteout";
        let work = self.work()?;
        let shared = OsStr::new(SHARED);
        for _ in 0..2 {
            match sys::linkat(work, shared, dir, name) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EMLINK)) => {
                    let tmp = self.tmp_name();
                    sys::mknodat(work, &tmp, libc::S_IFCHR, 0)?;
                    // Replacing the full one atomically: concurrent linkers see one or the other.
                    if let Err(e) = sys::renameat2(work, &tmp, work, shared, 0) {
                        let _ = sys::unlinkat(work, &tmp, 0);
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        sys::mknodat(dir, name, libc::S_IFCHR, 0)
    }

    /// Replaces the upper object at `name` with a whiteout in one atomic step.
    fn replace_with_whiteout(
        &self,
        pupper: BorrowedFd<'_>,
        name: &OsStr,
        dir: bool,
    ) -> io::Result<()> {
        if !self.style.char_whiteout {
            self.make_whiteout(pupper, name)?;
            return remove_entry(pupper, name);
        }
        let work = self.work()?;
        let tmp = self.tmp_name();
        self.link_whiteout(work, &tmp)?;
        let swapped = if dir {
            sys::renameat2(work, &tmp, pupper, name, sys::RENAME_EXCHANGE)
        } else {
            sys::renameat2(work, &tmp, pupper, name, 0)
        };
        if let Err(e) = swapped {
            let _ = sys::unlinkat(work, &tmp, 0);
            return Err(e);
        }
        if dir {
            // The old directory now sits in the work dir; it was merged-empty.
            remove_entry(work, &tmp)?;
        }
        Ok(())
    }

    pub fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
        caller: Caller,
    ) -> io::Result<()> {
        let known = sys::RENAME_NOREPLACE | sys::RENAME_EXCHANGE | sys::RENAME_WHITEOUT;
        if flags & !known != 0
            || (flags & sys::RENAME_EXCHANGE != 0 && flags != sys::RENAME_EXCHANGE)
        {
            return Err(errno(libc::EINVAL));
        }
        let whiteout = flags & sys::RENAME_WHITEOUT != 0;
        let flags = flags & !sys::RENAME_WHITEOUT;
        self.rename_inner(parent, name, newparent, newname, flags)?;
        if whiteout {
            // As on ext4: a char 0/0 device, visible, where the source was. (In the merged
            // view it is a real device, not one of our whiteouts.)
            let p = self.dir_node(parent)?;
            let make = Make::Node {
                mode: libc::S_IFCHR,
                rdev: 0,
                umask: 0,
            };
            let (_, st_ino, _) = self.create_obj(&p, name, make, caller)?;
            // Nobody looked it up: don't keep a kernel reference for it.
            self.table.forget(st_ino, 1);
        }
        Ok(())
    }

    fn rename_inner(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        let exchange = flags & sys::RENAME_EXCHANGE != 0;
        let p = self.dir_node(parent)?;
        let np = self.dir_node(newparent)?;
        self.require_upper()?;
        check_name(newname)?;
        if layer::is_marker_name(name) {
            return Err(errno(libc::ENOENT));
        }
        let src = self
            .resolve(&p.state.read(), name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let dst = self.resolve(&np.state.read(), newname)?;
        let src_ino = self.stino_of(&src);
        let dst_ino = dst.as_ref().map(|d| self.stino_of(d));
        if dst_ino == Some(src_ino) {
            // Two names of one object: POSIX says do nothing.
            return Ok(());
        }
        if exchange && dst.is_none() {
            return Err(errno(libc::ENOENT));
        }
        if flags & sys::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(errno(libc::EEXIST));
        }
        let src_dir = is_dir(src.top_stat());
        if let Some(d) = &dst {
            let d_dir = is_dir(d.top_stat());
            if !exchange {
                if src_dir && !d_dir {
                    return Err(errno(libc::ENOTDIR));
                }
                if !src_dir && d_dir {
                    return Err(errno(libc::EISDIR));
                }
            }
        }
        if !self.redirect_dir
            && ((src_dir && !src.lowers.is_empty())
                || (exchange
                    && dst
                        .as_ref()
                        .is_some_and(|d| is_dir(d.top_stat()) && !d.lowers.is_empty())))
        {
            // Refused before anything is copied up, and (as the kernel orders it) after the
            // type checks but before the emptiness check.
            return Err(errno(libc::EXDEV));
        }
        if !exchange
            && let Some(d) = &dst
            && is_dir(d.top_stat())
            && !self.merged_empty(d)?
        {
            return Err(errno(libc::ENOTEMPTY));
        }
        let pu = self.copy_up(&p, CopyUp::Meta)?;
        let npu = self.copy_up(&np, CopyUp::Meta)?;
        let samedir = p.st_ino == np.st_ino;
        let src_up = self.copy_up_found(&p, name, &src)?;
        // Name-based, as the kernel decides: does a lower layer show this name?
        let src_needs_wh = self.lower_has(&p.state.read(), name)?;
        let dst_lower = self.lower_has(&np.state.read(), newname)?;
        // A moved directory keeps its lower part through a redirect (O(1), the kernel's
        // redirect_dir format); one without lower part must instead hide what the lower
        // layers show at its new name.
        // Like the kernel, a directory without lower part that moves into a merged directory
        // becomes opaque even when nothing below shows its new name yet.
        let np_merged = !np.state.read().lowers.is_empty();
        let p_merged = !p.state.read().lowers.is_empty();
        // An entry whose st_ino comes from an origin makes its new parent impure.
        if sys::fstat(src_up.as_fd())?.st_ino != src_ino {
            self.mark_impure(&np)?;
        }
        if src_dir && !src.lowers.is_empty() {
            self.set_redirect(src_ino, &src, src_up.as_fd(), name, samedir)?;
        } else if src_dir && !src.opaque && (dst_lower || np_merged) {
            self.set_opaque(src_up.as_fd())?;
        }
        // The replaced destination's inode, when it is an indexed hard link.
        let mut dst_counted = None;
        if exchange {
            let d = dst.as_ref().ok_or_else(|| errno(libc::ENOENT))?;
            let dst_up = self.copy_up_found(&np, newname, d)?;
            if Some(sys::fstat(dst_up.as_fd())?.st_ino) != dst_ino {
                self.mark_impure(&p)?;
            }
            if is_dir(d.top_stat()) {
                if !d.lowers.is_empty() {
                    let dino = dst_ino.unwrap_or_default();
                    self.set_redirect(dino, d, dst_up.as_fd(), newname, samedir)?;
                } else if !d.opaque && (src_needs_wh || p_merged) {
                    self.set_opaque(dst_up.as_fd())?;
                }
            }
            sys::renameat2(pu.as_fd(), name, npu.as_fd(), newname, sys::RENAME_EXCHANGE)?;
        } else {
            // Clear what the upper layer holds at the destination and the rename could not
            // replace: whiteouts of an emptied directory, a whiteout under a directory.
            // Whether the upper layer still holds an entry at the destination: a whiteout
            // when nothing shows there (RENAME_NOREPLACE was checked on the merged view).
            let mut upper_occupied = false;
            match sys::fstatat(npu.as_fd(), newname, libc::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if src_dir && layer::is_char_whiteout(npu.as_fd(), newname, &st)? => {
                    sys::unlinkat(npu.as_fd(), newname, 0)?;
                }
                Ok(st) if is_dir(&st) && dst.is_some() => {
                    let dfd = sys::openat(
                        npu.as_fd(),
                        newname,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )?;
                    remove_contents(dfd.as_fd())?;
                    upper_occupied = true;
                }
                Ok(_) => upper_occupied = true,
                Err(_) => {}
            }
            dst_counted = match &dst {
                Some(d) if !is_dir(d.top_stat()) => self.counted_inode(&np, d)?,
                _ => None,
            };
            let mut rflags = if upper_occupied {
                0
            } else {
                flags & sys::RENAME_NOREPLACE
            };
            if src_needs_wh && self.style.char_whiteout {
                rflags |= sys::RENAME_WHITEOUT;
            }
            sys::renameat2(pu.as_fd(), name, npu.as_fd(), newname, rflags)?;
            if let Some(fd) = &dst_counted {
                self.adjust_nlink(fd.as_fd(), -1, dst_ino.unwrap_or_default())?;
            }
            // The replaced upper inode may be gone: its number must not keep an old st_ino.
            if let Some(d) = &dst
                && let Some((_, st)) = &d.upper
                && st.st_nlink <= 1
            {
                self.copied.remove(&st.st_ino);
            }
            if src_needs_wh && !self.style.char_whiteout {
                self.make_whiteout(pu.as_fd(), name)?;
            }
            let _ = sys::unlinkat(npu.as_fd(), &layer::whiteout_name(newname), 0);
        }
        if let Some(node) = self.table.get(src_ino) {
            node.state
                .write()
                .move_name((p.st_ino, name), (&np, newname));
        }
        // File handles of forgotten objects find them by their last name.
        self.table.past_moved(src_ino, Some((np.st_ino, newname)));
        if let Some(d) = dst_ino {
            let to = exchange.then_some((p.st_ino, name));
            self.table.past_moved(d, to);
        }
        if let Some(node) = dst_ino.and_then(|d| self.table.get(d)) {
            let mut s = node.state.write();
            if exchange {
                s.move_name((np.st_ino, newname), (&p, name));
            } else {
                s.drop_name(np.st_ino, newname);
                index_only_now(&mut s, dst_counted.as_ref());
            }
        }
        Ok(())
    }

    /// Gives a directory that is about to move a redirect to its lower part, as the kernel
    /// does: an existing absolute redirect, or a relative one within the same parent, stays;
    /// otherwise a rename within the parent records the old name, a move elsewhere the
    /// absolute path of the lower part.
    fn set_redirect(
        &self,
        st_ino: u64,
        found: &Found,
        upper: BorrowedFd<'_>,
        name: &OsStr,
        samedir: bool,
    ) -> io::Result<()> {
        let node = self.table.get(st_ino);
        let existing = match &node {
            Some(n) => n.state.read().redirect.clone(),
            None => found.redirect.clone(),
        };
        if let Some(r) = &existing
            && (samedir || r.as_bytes().starts_with(b"/"))
        {
            return Ok(());
        }
        let value = if samedir {
            existing.unwrap_or_else(|| name.to_os_string())
        } else {
            match &node {
                Some(n) => self.lower_path(n),
                None => return Err(errno(libc::EXDEV)),
            }
        };
        sys::set_xattr(upper, self.style.redirect_xattr(), value.as_bytes(), 0)?;
        if let Some(n) = node {
            n.state.write().redirect = Some(value);
        }
        Ok(())
    }

    /// The path of a directory's lower part from the layer roots: its ancestors' names (or
    /// redirects) up to the root or to an absolute redirect.
    fn lower_path(&self, node: &Arc<Node>) -> OsString {
        let mut parts: Vec<OsString> = Vec::new();
        let mut cur = Some(node.clone());
        while let Some(n) = cur {
            let s = n.state.read();
            if s.parent.is_none() {
                break;
            }
            match &s.redirect {
                Some(r) if r.as_bytes().starts_with(b"/") => {
                    parts.push(OsStr::from_bytes(&r.as_bytes()[1..]).to_os_string());
                    break;
                }
                Some(r) => parts.push(r.clone()),
                None => parts.push(s.name.clone()),
            }
            cur = s.parent.clone();
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(p.as_bytes());
        }
        OsString::from_vec(out)
    }

    /// Copies up an object found by lookup (with its data: it is about to move, and a metacopy
    /// file could not find its data from a new name), through its live node when there is one.
    fn copy_up_found(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: &Found,
    ) -> io::Result<Arc<OwnedFd>> {
        let st_ino = self.stino_of(found);
        let node = self.table.get(st_ino);
        if let Some((fd, _)) = &found.upper {
            if !found.metacopy {
                return Ok(fd.clone());
            }
            // This name's upper file is a metacopy one: fill it through its node.
            return match &node {
                Some(n) => self.copy_up(n, CopyUp::Data),
                None => Err(errno(libc::EXDEV)),
            };
        }
        // The node may stand for other names of a hard link: copy up this very name.
        if let Some(n) = &node {
            let s = n.state.read();
            let here = s
                .parent
                .as_ref()
                .is_some_and(|pp| pp.st_ino == parent.st_ino && s.name == name);
            if here && s.upper.is_none() {
                drop(s);
                return self.copy_up(n, CopyUp::Data);
            }
        }
        if let Some((ix, _)) = &found.index {
            return self.link_indexed(parent, name, ix.as_fd());
        }
        let (lower, _) = &found.lowers[0];
        let data = found.lowers.iter().find(|(l, _)| !l.metacopy);
        let data = data.map(|(l, _)| l.fd.as_fd());
        Ok(self
            .copy_up_obj(parent, name, lower.fd.as_fd(), data, CopyUp::Data, st_ino)?
            .0)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
        fh: Option<u64>,
        caller: &Caller,
        bare: bool,
    ) -> io::Result<FileAttr> {
        let node = self.node(ino)?;
        // The bits the kernel leaves to us to clear (privs.rs): a bare SETATTR is its
        // file_remove_privs before a passthrough write; a truncate and a chown clear them too.
        let why = if size.is_some() {
            Some(Kill::Truncate)
        } else if bare {
            Some(Kill::Write)
        } else if uid.is_some() || gid.is_some() {
            Some(Kill::Chown)
        } else {
            None
        };
        let mode = match (mode, why) {
            (None, Some(why)) => self.killed_mode(ino, fh, caller, why)?,
            (mode, _) => mode,
        };
        let changes = mode.is_some()
            || uid.is_some()
            || gid.is_some()
            || size.is_some()
            || atime.is_some()
            || mtime.is_some();
        if !changes {
            return self.do_getattr(ino, fh);
        }
        self.require_upper()?;
        let how = match size {
            Some(0) => CopyUp::Truncate,
            Some(_) => CopyUp::Data,
            None => CopyUp::Meta,
        };
        let up = self.copy_up(&node, how)?;
        if let Some(xp) = self.own.xattr_perms {
            if uid.is_some() || gid.is_some() || mode.is_some() {
                let shown = self.attr(&node, &sys::fstat(up.as_fd())?);
                let mut o = sys::get_xattr(up.as_fd(), xp.xattr())?
                    .and_then(|v| idmap::Override::parse(&v))
                    .unwrap_or(idmap::Override {
                        uid: shown.uid,
                        gid: shown.gid,
                        mode: u32::from(shown.perm),
                        kind: None,
                    });
                o.uid = uid.unwrap_or(o.uid);
                o.gid = gid.unwrap_or(o.gid);
                o.mode = mode.map_or(o.mode, |m| m & 0o7777);
                sys::set_xattr(up.as_fd(), xp.xattr(), &o.encode(), 0)?;
            }
        } else {
            if uid.is_some() || gid.is_some() {
                let (u, g) = self.own.store(uid, gid)?;
                sys::fchown(up.as_fd(), u, g)?;
            }
            if let Some(m) = mode {
                sys::chmod_fd(up.as_fd(), m & 0o7777)?;
            }
        }
        if let Some(size) = size {
            let handle = fh.and_then(|fh| self.handles.get(&fh).map(|h| h.clone()));
            match handle.as_deref() {
                Some(Handle::File(f)) if f.writable => sys::ftruncate(f.fd.as_fd(), size)?,
                _ => sys::truncate_fd(up.as_fd(), size)?,
            }
        }
        if atime.is_some() || mtime.is_some() {
            sys::utimens_fd(
                up.as_fd(),
                atime.unwrap_or(SetTime::Omit),
                mtime.unwrap_or(SetTime::Omit),
            )?;
        }
        let st = sys::fstat(up.as_fd())?;
        Ok(self.attr(&node, &st))
    }

    pub fn do_readlink(&self, ino: INodeNo) -> io::Result<Vec<u8>> {
        let node = self.node(ino)?;
        let fd = node
            .state
            .read()
            .top()
            .cloned()
            .ok_or_else(|| errno(libc::ESTALE))?;
        Ok(sys::readlink_fd(fd.as_fd())?.as_bytes().to_vec())
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, Arc::new(h));
        fh
    }

    fn file(&self, fh: u64) -> io::Result<Arc<Handle>> {
        let h = self
            .handles
            .get(&fh)
            .map(|h| h.clone())
            .ok_or_else(|| errno(libc::EBADF))?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(errno(libc::EISDIR)),
        }
    }

    /// Runs `f` on the real fd behind an open file.
    pub fn with_file<T>(
        &self,
        fh: u64,
        f: impl FnOnce(BorrowedFd<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        let h = self.file(fh)?;
        match &*h {
            Handle::File(file) => match file.follow.as_ref().map(Follow::moved).transpose()? {
                Some(Some(moved)) => f(moved.as_fd()),
                _ => f(file.fd.as_fd()),
            },
            Handle::Dir(_) => Err(errno(libc::EISDIR)),
        }
    }

    pub fn do_open(
        &self,
        ino: INodeNo,
        flags: i32,
        caller: &Caller,
    ) -> io::Result<(u64, OpenPlan)> {
        let node = self.node(ino)?;
        let acc = flags & libc::O_ACCMODE;
        let writing = acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if acc == libc::O_RDONLY && flags & libc::O_TRUNC != 0 && self.executing(node.st_ino) {
            return Err(errno(libc::ETXTBSY));
        }
        if writing {
            self.require_upper()?;
            let how = if flags & libc::O_TRUNC != 0 {
                CopyUp::Truncate
            } else {
                CopyUp::Data
            };
            self.copy_up(&node, how)?;
            // With atomic O_TRUNC the truncation is ours, and so are the bits it clears.
            if flags & libc::O_TRUNC != 0 {
                self.kill_privs(ino, None, caller, Kill::Truncate)?;
            }
        }
        // Decide under the node's io lock, so a copy-up racing with this open cannot pair a
        // page-cached open with a passthrough one.
        let mut io = node.io.lock();
        let (fd, upper) = {
            let s = node.state.read();
            let data = s.data().cloned().ok_or_else(|| errno(libc::EIO))?;
            (data, s.upper.is_some() && !s.metacopy)
        };
        let real_flags = self.real_open_flags(flags);
        let real = sys::reopen(fd.as_fd(), real_flags)?;
        let is_reg = sys::fstat(real.as_fd())?.st_mode & libc::S_IFMT == libc::S_IFREG;
        let mut counted = false;
        let plan = if !self.passthrough.load(Ordering::Relaxed) || !is_reg {
            OpenPlan::Cached
        } else if !upper {
            io.cached_opens += 1;
            counted = true;
            OpenPlan::Cached
        } else if io.cached_opens > 0 {
            OpenPlan::DirectIo
        } else {
            OpenPlan::Passthrough(node.clone())
        };
        drop(io);
        let fh = self.add_handle(Handle::File(FileHandle {
            fd: real,
            writable: acc != libc::O_RDONLY,
            backing: std::sync::OnceLock::new(),
            cached_of: counted.then(|| node.clone()),
            node: Some(counted_open(&node)),
            backing_ready: false,
            follow: (!upper && is_reg).then(|| Follow {
                node: node.clone(),
                opened_on: fd,
                flags: real_flags,
                now: Mutex::new(None),
            }),
        }));
        Ok((fh, plan))
    }

    /// The flags the real file is opened with. With the writeback cache the kernel reads pages
    /// of write-only files and computes append offsets itself.
    fn real_open_flags(&self, flags: i32) -> i32 {
        let mut f = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
        if self.writeback.load(Ordering::Relaxed) {
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            f &= !libc::O_APPEND;
        }
        f
    }

    /// Finds or registers the upper file's passthrough backing for an open planned as
    /// passthrough. `register` asks the kernel for a backing id for an fd. `None`: use direct
    /// I/O through the daemon instead.
    pub fn attach_backing(
        &self,
        fh: u64,
        node: &Node,
        register: impl FnOnce(BorrowedFd<'_>) -> io::Result<Backing>,
    ) -> Option<Arc<Backing>> {
        let h = self.handles.get(&fh).map(|h| h.clone())?;
        let Handle::File(file) = &*h else { return None };
        let mut io = node.io.lock();
        if io.cached_opens > 0 {
            return None;
        }
        if let Some(id) = io.backing.as_ref().and_then(|w| w.upgrade()) {
            let _ = file.backing.set(id.clone());
            return Some(id);
        }
        // The kernel does every passthrough read and write of this inode through this one
        // file: open it read-write whatever this open asked for.
        let reg = if file.backing_ready {
            register(file.fd.as_fd())
        } else {
            let top = node.state.read().upper.clone()?;
            match sys::reopen(top.as_fd(), libc::O_RDWR) {
                Ok(fd) => register(fd.as_fd()),
                Err(_) => register(file.fd.as_fd()),
            }
        };
        match reg {
            Ok(id) => {
                let id = Arc::new(id);
                io.backing = Some(Arc::downgrade(&id));
                let _ = file.backing.set(id.clone());
                Some(id)
            }
            Err(e) => {
                tracing::warn!("passthrough backing refused ({e}); using daemon I/O");
                None
            }
        }
    }

    pub fn do_fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        self.with_file(fh, |fd| sys::fsync(fd, datasync))
    }

    pub fn do_fallocate(&self, fh: u64, mode: i32, offset: i64, len: i64) -> io::Result<()> {
        self.with_file(fh, |fd| sys::fallocate(fd, mode, offset, len))
    }

    pub fn do_lseek(&self, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        self.with_file(fh, |fd| sys::lseek(fd, offset, whence))
    }

    /// Copies up to `len` bytes (at most 4 GiB - 1, what a FUSE reply can count) between two
    /// open files.
    pub fn do_copy_file_range(
        &self,
        fh_in: u64,
        off_in: i64,
        fh_out: u64,
        off_out: i64,
        len: u64,
    ) -> io::Result<u32> {
        self.with_file(fh_in, |fin| {
            self.with_file(fh_out, |fout| {
                let (mut oi, mut oo) = (off_in, off_out);
                let len = len.min(u64::from(u32::MAX)) as usize;
                sys::copy_file_range(fin, &mut oi, fout, &mut oo, len).map(|n| n as u32)
            })
        })
    }

    pub fn do_release(&self, fh: u64) {
        self.handles.remove(&fh);
    }

    pub fn do_read(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = self.do_read_into(fh, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf` (short only at end of file).
    pub fn do_read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with_file(fh, |fd| {
            let mut done = 0;
            while done < buf.len() {
                let n = sys::pread(fd, &mut buf[done..], offset as i64 + done as i64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            Ok(done)
        })
    }

    /// A write through the daemon; `kill`: the kernel flagged that the writer lacks
    /// CAP_FSETID (FUSE_WRITE_KILL_SUIDGID), so S_ISUID/S_ISGID go first.
    pub fn do_write(
        &self,
        ino: INodeNo,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill: Option<&Caller>,
    ) -> io::Result<u32> {
        if let Some(caller) = kill {
            self.kill_privs(ino, Some(fh), caller, Kill::Flagged)?;
        }
        self.with_file(fh, |fd| {
            let mut done = 0;
            while done < data.len() {
                done += sys::pwrite(fd, &data[done..], offset as i64 + done as i64)?;
            }
            Ok(done as u32)
        })
    }

    /// The mode without the S_ISUID/S_ISGID that `why` takes from `caller`, if any goes.
    fn killed_mode(
        &self,
        ino: INodeNo,
        fh: Option<u64>,
        caller: &Caller,
        why: Kill,
    ) -> io::Result<Option<u32>> {
        let shown = self.do_getattr(ino, fh)?;
        let kind = shown.kind;
        if kind != fuser::FileType::RegularFile
            && (why != Kill::Chown || kind == fuser::FileType::Directory)
        {
            return Ok(None);
        }
        let perm = u32::from(shown.perm);
        let clear = privs::to_clear(perm, shown.gid, why, || caller.creds());
        Ok((clear != 0).then_some(perm & !clear))
    }

    /// Clears what `why` takes outside a SETATTR (an open with O_TRUNC, a flagged write): the
    /// kernel's cached mode goes too, as no reply carries the new one.
    fn kill_privs(
        &self,
        ino: INodeNo,
        fh: Option<u64>,
        caller: &Caller,
        why: Kill,
    ) -> io::Result<()> {
        if let Some(mode) = self.killed_mode(ino, fh, caller, why)? {
            let m = Some(mode);
            self.do_setattr(ino, m, None, None, None, None, None, None, caller, false)?;
            self.invalidate_attr(ino.0);
        }
        Ok(())
    }

    pub fn do_opendir(&self, ino: INodeNo) -> io::Result<u64> {
        let node = self.dir_node(ino)?;
        Ok(self.add_handle(Handle::Dir(DirHandle {
            node,
            entries: Mutex::new(None),
        })))
    }

    /// The listing of an open directory, with "." and ".." first; rebuilt when read from
    /// offset 0 (opendir or rewinddir).
    pub fn do_readdir(&self, fh: u64, offset: u64) -> io::Result<Arc<Vec<DirEntry>>> {
        let h = self
            .handles
            .get(&fh)
            .map(|h| h.clone())
            .ok_or_else(|| errno(libc::EBADF))?;
        let Handle::Dir(d) = &*h else {
            return Err(errno(libc::ENOTDIR));
        };
        let mut cache = d.entries.lock();
        if offset == 0 || cache.is_none() {
            let (layers, parent_ino) = {
                let s = d.node.state.read();
                let parent_ino = s.parent.as_ref().map_or(d.node.st_ino, |p| p.st_ino);
                (
                    DirLayer::of(s.upper.as_ref(), s.xwhiteouts, s.impure, &s.lowers),
                    parent_ino,
                )
            };
            let mut entries = vec![
                DirEntry {
                    name: OsString::from("."),
                    kind: fuser::FileType::Directory,
                    ino: d.node.st_ino,
                },
                DirEntry {
                    name: OsString::from(".."),
                    kind: fuser::FileType::Directory,
                    ino: parent_ino,
                },
            ];
            entries.extend(self.read_merged(&layers, false)?);
            *cache = Some(Arc::new(entries));
        }
        Ok(cache.clone().unwrap_or_default())
    }

    pub fn do_statfs(&self) -> io::Result<libc::statvfs> {
        let fd = self.layers[0].root.as_fd();
        sys::fstatvfs(fd)
    }

    pub fn do_getxattr(&self, ino: INodeNo, name: &OsStr) -> io::Result<Vec<u8>> {
        if layer::is_private_xattr(name) {
            return Err(errno(libc::ENODATA));
        }
        let node = self.node(ino)?;
        let fd = node
            .state
            .read()
            .top()
            .cloned()
            .ok_or_else(|| errno(libc::ESTALE))?;
        // Non-directories are held as O_PATH: their xattrs are reached through /proc.
        let value = if node.is_dir {
            sys::get_xattr(fd.as_fd(), name)?
        } else {
            sys::get_xattr_path(fd.as_fd(), name)?
        };
        value.ok_or_else(|| errno(libc::ENODATA))
    }

    pub fn do_listxattr(&self, ino: INodeNo) -> io::Result<Vec<u8>> {
        let node = self.node(ino)?;
        let fd = node
            .state
            .read()
            .top()
            .cloned()
            .ok_or_else(|| errno(libc::ESTALE))?;
        let names = if node.is_dir {
            sys::list_xattr(fd.as_fd())?
        } else {
            sys::list_xattr_path(fd.as_fd())?
        };
        let mut out = Vec::new();
        for name in names {
            if !layer::is_private_xattr(&name) {
                out.extend_from_slice(name.as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn do_setxattr(
        &self,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: Caller,
    ) -> io::Result<()> {
        if layer::is_private_xattr(name) {
            return Err(errno(libc::EPERM));
        }
        self.require_upper()?;
        let node = self.node(ino)?;
        let up = self.copy_up(&node, CopyUp::Meta)?;
        sys::set_xattr(up.as_fd(), name, value, flags)?;
        if self.posix_acl.load(Ordering::Relaxed) && name == acl::ACCESS_XATTR {
            // The upper filesystem updated the mode from the ACL as the daemon, which may keep
            // S_ISGID; the kernel would tell us to drop it only with FUSE_SETXATTR_EXT, which
            // fuser 0.18 cannot parse. Decide as posix_acl_update_mode would for the caller.
            let st = sys::fstat(up.as_fd())?;
            let kill = privs::to_clear(st.st_mode, st.st_gid, Kill::Acl, || caller.creds());
            if kill != 0 {
                sys::chmod_fd(up.as_fd(), st.st_mode & 0o7777 & !kill)?;
            }
        }
        Ok(())
    }

    pub fn do_removexattr(&self, ino: INodeNo, name: &OsStr) -> io::Result<()> {
        if layer::is_private_xattr(name) {
            return Err(errno(libc::ENODATA));
        }
        self.require_upper()?;
        // Nothing to remove: fail before copying anything up.
        self.do_getxattr(ino, name)?;
        let node = self.node(ino)?;
        let up = self.copy_up(&node, CopyUp::Meta)?;
        sys::remove_xattr(up.as_fd(), name)
    }

    /// access(2) against the merged attributes (the kernel checks permissions itself with
    /// `default_permissions`; this serves callers that still ask).
    pub fn do_access(&self, ino: INodeNo, mask: i32, caller: Caller) -> io::Result<()> {
        let node = self.node(ino)?;
        let st = self.stat_node(&node)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        if mask & libc::W_OK != 0 && !self.has_upper {
            return Err(errno(libc::EROFS));
        }
        let mode = st.st_mode;
        if caller.uid == 0 {
            let any_x = mode & 0o111 != 0 || is_dir(&st);
            return if mask & libc::X_OK != 0 && !any_x {
                Err(errno(libc::EACCES))
            } else {
                Ok(())
            };
        }
        let bits = if caller.uid == st.st_uid {
            (mode >> 6) & 7
        } else if caller.gid == st.st_gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if (mask as u32) & !bits & 7 != 0 {
            return Err(errno(libc::EACCES));
        }
        Ok(())
    }
}

/// After a name of an indexed hard link (`counted`, its inode) left the upper layer: when the
/// index entry is the inode's only link left and the merged view still has names of it (all
/// below), the node reaches the inode through the index, as a fresh lookup of those names
/// does. Its merged link count is then read from there; with the removed upper name kept
/// as `upper`, the node looked like an unlinked plain copy (st_nlink 1).
fn index_only_now(s: &mut super::inode::NodeState, counted: Option<&Arc<OwnedFd>>) {
    let Some(fd) = counted else { return };
    if s.unlinked || s.index.is_some() {
        return;
    }
    let Some(up) = &s.upper else { return };
    let (Ok(a), Ok(b)) = (sys::fstat(up.as_fd()), sys::fstat(fd.as_fd())) else {
        return;
    };
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) && b.st_nlink == 1 {
        s.index = s.upper.take();
    }
}
