//! Merged directory listings, and removal of scratch trees in the work directory.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt};
use std::path::PathBuf;
use std::sync::Arc;

use fuser::FileType;

use super::{LowerObj, OverlayFs, WhNames, layer};
use crate::sys;

/// One entry of a merged listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub kind: FileType,
    /// The st_ino a lookup of this name reports.
    pub ino: u64,
}

/// One layer directory that contributes to a merged directory.
pub(super) struct DirLayer {
    pub layer: usize,
    pub fd: Arc<OwnedFd>,
    pub xwhiteouts: bool,
    /// Upper directory whose entries may carry an origin st_ino.
    pub impure: bool,
    /// A lower directory's `.wh.` names, filled by a full listing (see `LowerObj::wh_names`).
    pub wh_names: Option<WhNames>,
}

impl DirLayer {
    pub fn of(
        upper: Option<&Arc<OwnedFd>>,
        upper_xwh: bool,
        impure: bool,
        lowers: &[LowerObj],
    ) -> Vec<Self> {
        let mut v = Vec::with_capacity(lowers.len() + 1);
        if let Some(fd) = upper {
            v.push(DirLayer {
                layer: 0,
                fd: fd.clone(),
                xwhiteouts: upper_xwh,
                impure,
                wh_names: None,
            });
        }
        v.extend(lowers.iter().map(|l| DirLayer {
            layer: l.layer,
            fd: l.fd.clone(),
            xwhiteouts: l.xwhiteouts,
            impure: false,
            wh_names: Some(l.wh_names.clone()),
        }));
        v
    }
}

fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(sys::proc_fd_path(fd).as_bytes()))
}

fn kind_of(ft: std::fs::FileType) -> FileType {
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else {
        FileType::RegularFile
    }
}

impl OverlayFs {
    /// The merged listing of a directory made of `layers` (topmost first): de-duplicated by name,
    /// whiteouts and markers removed. `stop_at_first` returns as soon as one entry is known
    /// (an emptiness check).
    pub(super) fn read_merged(
        &self,
        layers: &[DirLayer],
        stop_at_first: bool,
    ) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut hidden: HashSet<OsString> = HashSet::new();
        for dl in layers {
            let mut layer_hidden: Vec<OsString> = Vec::new();
            // What this layer's `.wh.NAME` entries hide, for later lookups in it.
            let mut wh_hidden: HashSet<OsString> = HashSet::new();
            let mut found: Vec<DirEntry> = Vec::new();
            for ent in std::fs::read_dir(fd_path(dl.fd.as_fd()))? {
                let ent = ent?;
                let name = ent.file_name();
                let bytes = name.as_bytes();
                if bytes.starts_with(layer::WHITEOUT_PREFIX) {
                    if name != layer::OPAQUE_WHITEOUT {
                        let hid = OsStr::from_bytes(&bytes[layer::WHITEOUT_PREFIX.len()..]);
                        layer_hidden.push(hid.to_os_string());
                        wh_hidden.insert(hid.to_os_string());
                    }
                    continue;
                }
                if seen.contains(&name) || hidden.contains(&name) {
                    continue;
                }
                let ft = ent.file_type()?;
                if ft.is_char_device() {
                    let st = sys::fstatat(dl.fd.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)?;
                    if layer::is_char_whiteout(dl.fd.as_fd(), &name, &st)? {
                        layer_hidden.push(name);
                        continue;
                    }
                } else if dl.xwhiteouts && ft.is_file() {
                    let fd = sys::openat(dl.fd.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                    let st = sys::fstat(fd.as_fd())?;
                    if layer::is_xattr_whiteout(fd.as_fd(), &st)? {
                        layer_hidden.push(name);
                        continue;
                    }
                }
                let ino = if dl.layer == 0 && self.has_upper {
                    let origin = if dl.impure {
                        layer::origin_at(dl.fd.as_fd(), &name)?
                    } else {
                        None
                    };
                    origin.unwrap_or_else(|| self.upper_stino(ent.ino()))
                } else {
                    self.encode(dl.layer, ent.ino())
                };
                found.push(DirEntry {
                    name,
                    kind: kind_of(ft),
                    ino,
                });
                if stop_at_first {
                    return Ok(found);
                }
            }
            // The whole layer directory was read: keep its `.wh.` names.
            if let Some(w) = &dl.wh_names {
                let _ = w.set(wh_hidden);
            }
            for e in found {
                seen.insert(e.name.clone());
                out.push(e);
            }
            hidden.extend(layer_hidden);
        }
        Ok(out)
    }
}

/// Removes everything inside `dir`, never following a symlink.
pub(super) fn remove_contents(dir: BorrowedFd<'_>) -> io::Result<()> {
    for ent in std::fs::read_dir(fd_path(dir))? {
        let ent = ent?;
        remove_entry(dir, &ent.file_name())?;
    }
    Ok(())
}

/// Removes `name` from `dir`, recursively if it is a directory.
pub(super) fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match sys::unlinkat(dir, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    }
    let sub = sys::openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    remove_contents(sub.as_fd())?;
    drop(sub);
    sys::unlinkat(dir, name, libc::AT_REMOVEDIR)
}
