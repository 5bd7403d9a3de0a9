#!/usr/bin/env python3
"""Small timed operations for scripts/bench, run as a child process so that a hung
FUSE mount can be killed from the driver. Each prints one JSON object on stdout:
{"seconds": float, ...extra}. Only the operation itself is timed (not interpreter
start-up)."""

import errno
import json
import mmap
import os
import sys
import time


def out(seconds, **extra):
    extra["seconds"] = seconds
    print(json.dumps(extra))


def op_lstat_names(mnt_dir, names_file):
    """lstat() every name listed in names_file (one per line) under mnt_dir.
    The names come from the layers, not from a readdir of the mount, so this
    measures lookup+getattr alone."""
    with open(names_file) as f:
        names = f.read().split("\n")
    names = [n for n in names if n]
    lstat = os.lstat
    t0 = time.perf_counter()
    for n in names:
        lstat(mnt_dir + "/" + n)
    out(time.perf_counter() - t0, count=len(names))


def op_scandir(path):
    """readdir of one directory without stat (os.scandir, entries counted)."""
    t0 = time.perf_counter()
    n = 0
    with os.scandir(path) as it:
        for _ in it:
            n += 1
    out(time.perf_counter() - t0, count=n)


def op_mmap_read(path, chunk=1 << 20):
    """mmap the file and touch every byte page by page (sum of one byte per 4 KiB
    would let readahead skew less, but copying 1 MiB slices is what readers do)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        try:
            total = 0
            for off in range(0, size, chunk):
                total += len(m[off:off + chunk])
        finally:
            m.close()
    finally:
        os.close(fd)
    out(time.perf_counter() - t0, bytes=total)


def op_append_byte(path):
    """Copy-up trigger: append one byte to a lower file."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    out(time.perf_counter() - t0)


def op_chmod(path):
    """Copy-up trigger: chmod of a lower file."""
    t0 = time.perf_counter()
    os.chmod(path, 0o600)
    out(time.perf_counter() - t0)


def op_open_rw(path):
    """Untimed preparation: open O_RDWR to force a copy-up."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    os.close(fd)
    out(time.perf_counter() - t0)


def op_rename(src, dst):
    """rename(2) a directory; on EXDEV fall back to `mv` (what mv does anyway,
    minus its own first rename attempt). Reports which path was taken."""
    t0 = time.perf_counter()
    try:
        os.rename(src, dst)
        outcome = "rename"
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        import subprocess
        subprocess.run(["mv", src, dst], check=True)
        outcome = "EXDEV, mv copied"
    out(time.perf_counter() - t0, outcome=outcome)


def main():
    op = sys.argv[1]
    fn = globals().get("op_" + op.replace("-", "_"))
    if fn is None:
        sys.exit(f"ops.py: unknown op {op}")
    fn(*sys.argv[2:])


if __name__ == "__main__":
    main()
