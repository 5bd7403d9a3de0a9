#!/usr/bin/env python3
"""Benchmark driver behind scripts/bench: kernel overlayfs vs fuse-overlayfs 1.10 vs
fuse-overlayfs 2.0 (Rust) vs stratafs, over one generated layered image.

stratafs runs twice: as `stratafs`, over FUSE-over-io_uring (the bench turns the fuse
module's enable_uring on for the run and back after; no other peer uses it), and as
`stratafs-dev`, the same binary over /dev/fuse (STRATAFS_NO_URING=1), which is what a host
with enable_uring off gets.

Every (workload, peer) runs on a fresh mount with a fresh upper and work dir. Rounds
are interleaved: in round r every workload runs once per peer, the peer order rotated
by r. Cells show the median and, with more than one round, min..max.

Ratios are always "how many times slower than the kernel": for times
peer / kernel, for throughputs (MiB/s, IOPS) kernel / peer. >1 = slower.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import io
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = os.path.join(HERE, "ops.py")
MiB = 1 << 20

# ---------------------------------------------------------------------------------
# Sizes

FULL = dict(
    mode="full",
    tree_top=36, tree_sub=10, tree_files=100,  # 36k files
    bigdir=100_000,
    bigfile_mib=1024,
    rm_dirs=100, rm_files=100,  # 10k
    rename_files=1000,
    git_files=5000,
    untar_files=20_000,
    rand_runtime=10,
    rounds=3,
    timeout=900,
)
QUICK = dict(
    mode="quick",
    tree_top=10, tree_sub=10, tree_files=100,  # 10k files
    bigdir=20_000,
    bigfile_mib=256,
    rm_dirs=30, rm_files=100,  # 3k
    rename_files=300,
    git_files=1000,
    untar_files=5000,
    rand_runtime=2,
    rounds=1,
    timeout=150,
)
IMAGE_VERSION = 1

# ---------------------------------------------------------------------------------
# Helpers


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


class OpFailed(Exception):
    pass


def run(cmd, timeout, check=True, env=None, shell=False, capture=True):
    """Run a command in its own process group; on timeout kill the group."""
    p = subprocess.Popen(
        cmd, shell=shell, env=env, start_new_session=True,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        c = cmd if isinstance(cmd, str) else shlex.join(cmd)
        raise OpFailed(f"timed out after {timeout}s: {c}")
    if check and p.returncode != 0:
        c = cmd if isinstance(cmd, str) else shlex.join(cmd)
        msg = (err or "").strip().splitlines()
        if msg and msg[0].startswith("Traceback"):
            msg = msg[-1:]  # a Python op: its exception line says it
        msg = " / ".join(msg[-3:])[:300]
        raise OpFailed(f"exit {p.returncode}: {c}: {msg}")
    return out


def timed(cmd, timeout, **kw):
    t0 = time.perf_counter()
    run(cmd, timeout, **kw)
    return time.perf_counter() - t0


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounts_under(prefix):
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                res.append(mp)
    return res


def is_mounted(path):
    return path in mounts_under(path)


def unmount_under(prefix, say=False):
    """Unmounts everything at or below `prefix`, deepest first, lazily where a plain
    umount fails."""
    for mp in sorted(mounts_under(prefix), reverse=True):
        if say:
            log(f"cleanup: unmounting {mp}")
        subprocess.run(["umount", mp], stderr=subprocess.DEVNULL)
        if is_mounted(mp):
            subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------
# The volume the image and every mount's upper/work live on

VOLUME_GIB = 40


class Volume:
    """A journaled ext4 on a loop device (direct I/O to a sparse file in the cache).

    The host's root filesystem here is ext4 *without* a journal, and there ext4's inode
    allocator skips every inode freed in the last 30 s (`recently_deleted`, checked only when
    there is no journal), scanning them again for each new inode: an untar right after another
    peer's `rm -rf` of the same count of files took 3.2 s on the kernel's own overlayfs instead
    of 0.23 s. Which peer paid depended on the round order. Container hosts run journaled
    filesystems, so the bench does too. `--fs host` runs on the cache dir as it is."""

    def __init__(self, cache):
        self.file = os.path.join(cache, "volume-v1.ext4")
        self.root = os.path.join(cache, "vol")
        self.loop = None

    def __enter__(self):
        os.makedirs(self.root, exist_ok=True)
        if is_mounted(self.root):  # left by a run that died
            run(["umount", self.root], 120)
        # A file attached to a loop device already (a run that died, or a mount by hand):
        # detach what is not mounted; one mounted elsewhere must not be mounted twice.
        attached = run(["losetup", "-n", "-O", "NAME", "-j", self.file], 60).split() \
            if os.path.exists(self.file) else []
        for dev in attached:
            rdev = os.stat(dev).st_rdev
            with open("/proc/self/mountinfo") as f:
                mounted = any(line.split()[2] == f"{os.major(rdev)}:{os.minor(rdev)}" for line in f)
            if mounted:
                raise OpFailed(f"{self.file} is mounted through {dev} elsewhere; unmount it first")
            run(["losetup", "-d", dev], 60)
        if not os.path.exists(self.file):
            log(f"making the bench volume {self.file} (sparse, {VOLUME_GIB} GiB, ext4 with journal)")
            with open(self.file + ".tmp", "wb") as f:
                f.truncate(VOLUME_GIB << 30)
            run(["mkfs.ext4", "-q", "-F", "-L", "stratafs-bench", self.file + ".tmp"], 300)
            os.rename(self.file + ".tmp", self.file)
        try:
            self.loop = run(["losetup", "--find", "--show", "--direct-io=on", self.file], 60).strip()
        except OpFailed:
            self.loop = run(["losetup", "--find", "--show", self.file], 60).strip()
        try:
            run(["mount", "-t", "ext4", self.loop, self.root], 120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc):
        unmount_under(self.root)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], stderr=subprocess.DEVNULL)
            self.loop = None
        return False


class HostDir:
    """`--fs host`: the cache dir itself."""

    def __init__(self, cache):
        self.root = cache

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return False


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def content(i, size):
    pat = (f"line {i} of a generated file for the stratafs benchmark\n").encode()
    return (pat * (size // len(pat) + 1))[:size]


# ---------------------------------------------------------------------------------
# Image


def gen_image(cache, cfg):
    """The layered image: L1 (top) and L2 (bottom), plus a tarball and a names file."""
    key = "image-{mode}-v{v}".format(mode=cfg["mode"], v=IMAGE_VERSION)
    root = os.path.join(cache, key)
    done = os.path.join(root, ".done")
    if os.path.exists(done):
        return root
    if os.path.exists(root):
        shutil.rmtree(root)
    log(f"generating image in {root} (once; reused by later runs)")
    t0 = time.time()
    L1, L2 = os.path.join(root, "L1"), os.path.join(root, "L2")
    for d in (L1, L2):
        os.makedirs(d)

    # tree: L2 has all files; L1 overrides subdir d00 of every top dir and whites out
    # three files of d01.
    n = 0
    for a in range(cfg["tree_top"]):
        for b in range(cfg["tree_sub"]):
            d2 = os.path.join(L2, "tree", f"d{a:02}", f"d{b:02}")
            os.makedirs(d2)
            for c in range(cfg["tree_files"]):
                write_file(os.path.join(d2, f"f{c:03}"), content(n, (n * 37) % 4096))
                n += 1
            if b == 0:
                d1 = os.path.join(L1, "tree", f"d{a:02}", f"d{b:02}")
                os.makedirs(d1)
                for c in range(cfg["tree_files"]):
                    write_file(os.path.join(d1, f"f{c:03}"), content(n + c, 100 + c))
            if b == 1:
                d1 = os.path.join(L1, "tree", f"d{a:02}", f"d{b:02}")
                os.makedirs(d1)
                for c in range(3):
                    os.mknod(os.path.join(d1, f"f{c:03}"), stat.S_IFCHR | 0o000, os.makedev(0, 0))

    # bigdir: even names in L1, odd names in L2 (the merged listing needs both)
    os.makedirs(os.path.join(L1, "bigdir"))
    os.makedirs(os.path.join(L2, "bigdir"))
    names = []
    for i in range(cfg["bigdir"]):
        name = f"f{i:06}"
        names.append(name)
        open(os.path.join(L1 if i % 2 == 0 else L2, "bigdir", name), "wb").close()
    with open(os.path.join(root, "bigdir-names.txt"), "w") as f:
        f.write("\n".join(names) + "\n")

    # the big file, in the bottom layer
    os.makedirs(os.path.join(L2, "data"))
    chunk = os.urandom(64 * MiB)
    with open(os.path.join(L2, "data", "big.bin"), "wb") as f:
        left = cfg["bigfile_mib"] * MiB
        while left:
            k = min(left, len(chunk))
            f.write(chunk[:k])
            left -= k
    del chunk

    # tree to rm -rf, dir to rename
    for a in range(cfg["rm_dirs"]):
        d = os.path.join(L2, "rmtree", f"d{a:03}")
        os.makedirs(d)
        for c in range(cfg["rm_files"]):
            write_file(os.path.join(d, f"f{c:03}"), content(c, 64 + c))
    for i in range(cfg["rename_files"]):
        d = os.path.join(L2, "renamedir", f"d{i // 100:02}")
        os.makedirs(d, exist_ok=True)
        write_file(os.path.join(d, f"f{i:04}"), content(i, 1024))

    # sources for git add: even dirs in L1, odd dirs in L2
    for i in range(cfg["git_files"]):
        dn = i // 100
        d = os.path.join(L1 if dn % 2 == 0 else L2, "gitsrc", f"src{dn:03}")
        os.makedirs(d, exist_ok=True)
        write_file(os.path.join(d, f"mod{i:05}.rs"),
                   content(i, 1000 + (i * 131) % 3000) + f"// {i}\n".encode())

    # tarball of small files for untar
    with tarfile.open(os.path.join(root, "untar.tar"), "w") as tf:
        dirs = set()
        for i in range(cfg["untar_files"]):
            dn = f"pkg/d{i // 100:03}"
            if dn not in dirs:
                ti = tarfile.TarInfo(dn)
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
                dirs.add(dn)
            data = content(i, (i * 53) % 2048)
            ti = tarfile.TarInfo(f"{dn}/file{i:05}.txt")
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))

    os.sync()
    with open(done, "w") as f:
        json.dump(cfg, f)
    log(f"image ready in {time.time() - t0:.0f}s")
    return root


# ---------------------------------------------------------------------------------
# Peers and mounts


class Peer:
    def __init__(self, key, label, binary=None, env=None):
        self.key, self.label, self.binary = key, label, binary
        self.env = env

    @property
    def is_stratafs(self):
        return self.key.startswith("stratafs")

    @property
    def fuse(self):
        return self.key != "kernel"


def daemon_pid(binary, mnt):
    """The process whose argv[0] is binary (by basename) and has mnt as an argument."""
    base = os.path.basename(binary)
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        if os.path.basename(argv[0].decode(errors="replace")) != base:
            continue
        if mnt.encode() in argv:
            return int(d)
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid):
    """(VmRSS, VmHWM) in KiB."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None, None
    return rss, hwm


class Mount:
    def __init__(self, bench, peer, tag):
        self.bench, self.peer = bench, peer
        self.dir = os.path.join(bench.runroot, f"{peer.key}-{tag}")
        self.mnt = os.path.join(self.dir, "mnt")
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "work")
        self.pid = None
        self.cpu = 0.0  # daemon CPU seconds inside timed sections
        self.last_rss = None

    def __enter__(self):
        img = self.bench.image
        for d in (self.mnt, self.upper, self.work):
            os.makedirs(d)
        opts = "lowerdir={}:{},upperdir={},workdir={}".format(
            os.path.join(img, "L1"), os.path.join(img, "L2"), self.upper, self.work)
        p = self.peer
        if p.key == "kernel":
            cmd = ["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt]
        else:
            cmd = [p.binary, "-o", opts, self.mnt]
        try:
            run(cmd, 60, env=dict(os.environ, **p.env) if p.env else None)
            deadline = time.time() + 20
            while not is_mounted(self.mnt):
                if time.time() > deadline:
                    raise OpFailed(f"mount did not appear: {shlex.join(cmd)}")
                time.sleep(0.02)
            if p.fuse:
                deadline = time.time() + 5
                while self.pid is None and time.time() < deadline:
                    self.pid = daemon_pid(p.binary, self.mnt)
                    if self.pid is None:
                        time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def daemon_stats(self):
        if not self.pid:
            return None
        rss, hwm = proc_mem(self.pid)
        return dict(cpu=self.cpu, hwm_kib=hwm, rss_kib=rss)

    def close(self):
        if is_mounted(self.mnt):
            ok = False
            try:
                if self.peer.is_stratafs:
                    run([self.peer.binary, "umount", self.mnt], 60)
                else:
                    run(["umount", self.mnt], 60)
                ok = True
            except OpFailed as e:
                log(f"unmount of {self.mnt} failed ({e}); killing daemon, lazy unmount")
            if not ok:
                if self.pid:
                    try:
                        os.kill(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                subprocess.run(["umount", "-l", self.mnt], stderr=subprocess.DEVNULL)
        if self.pid:
            deadline = time.time() + 10
            while os.path.exists(f"/proc/{self.pid}") and time.time() < deadline:
                try:
                    with open(f"/proc/{self.pid}/stat") as f:
                        if f.read().split(")")[-1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.02)
        if os.path.isdir(self.dir) and not mounts_under(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------
# Workloads


class Ctx:
    """What a workload sees: the mount, the image, sizes, and record()."""

    def __init__(self, bench, mount):
        self.b, self.m = bench, mount
        self.cfg = bench.cfg
        self.mnt = mount.mnt
        self.img = bench.image
        self.timeout = bench.cfg["timeout"]
        self.values = {}
        self.extra = {}

    def section(self, fn):
        """Run fn() as the timed section, charging daemon CPU to it. Dirty data of earlier
        steps is written back first (untimed), so no section pays for another's writeback."""
        os.sync()
        c0 = proc_cpu(self.m.pid) if self.m.pid else None
        try:
            return fn()
        finally:
            if c0 is not None:
                c1 = proc_cpu(self.m.pid)
                if c1 is not None:
                    self.m.cpu += c1 - c0
                self.m.last_rss = proc_mem(self.m.pid)[0]

    def shell_time(self, cmd, **kw):
        return self.section(lambda: timed(cmd, self.timeout, **kw))

    def op(self, *args):
        out = self.section(lambda: run([sys.executable, OPS, *args], self.timeout))
        return json.loads(out.strip().splitlines()[-1])

    def fio(self, *args):
        out = self.section(lambda: run(
            ["fio", "--output-format=json", "--invalidate=0", "--name=bench", *args],
            self.timeout))
        j = json.loads(out[out.index("{"):])
        return j["jobs"][0]

    def untimed(self, cmd, **kw):
        run(cmd, self.timeout, **kw)

    def warm_lower(self, *rel):
        """Bring these paths of both layers into the host page cache (untimed)."""
        paths = [os.path.join(self.img, L, r) for L in ("L1", "L2") for r in rel]
        paths = [p for p in paths if os.path.exists(p)]
        run("tar cf - " + " ".join(shlex.quote(p) for p in paths) + " | cat > /dev/null",
            self.timeout, shell=True)

    def record(self, row, value, **extra):
        self.values[row] = value
        if extra:
            self.extra[row] = extra

    @property
    def bigfile(self):
        return os.path.join(self.mnt, "data", "big.bin")

    @property
    def bigsize(self):
        return self.cfg["bigfile_mib"] * MiB


# Row: (key, label, unit); unit "s" = lower is better, "MiB/s"/"IOPS" = higher.
WORKLOADS = []


def workload(name, rows):
    def deco(fn):
        WORKLOADS.append((name, rows, fn))
        return fn
    return deco


def kcount(cfg, key):
    n = cfg[key]
    return f"{n // 1000}k" if n >= 1000 else str(n)


def tree_count(cfg):
    return cfg["tree_top"] * cfg["tree_sub"] * cfg["tree_files"]


def row_defs(cfg):
    t = tree_count(cfg)
    tk = f"{t // 1000}k"
    big = f"{cfg['bigfile_mib']} MiB" if cfg["bigfile_mib"] < 1024 else f"{cfg['bigfile_mib'] // 1024} GiB"
    bd = kcount(cfg, "bigdir")
    return {
        "find-cold": f"find tree ({tk} files) -printf '', cold",
        "find-warm": f"find tree ({tk} files) -printf '', warm",
        "stat": f"lstat {bd} files (names known), cold",
        "readdir-cold": f"readdir {bd}-entry dir (scandir, no stat), cold",
        "readdir-warm": f"readdir {bd}-entry dir (scandir, no stat), warm",
        "seqread-cold": f"fio seq read 1M of {big} lower file, cold",
        "seqread-warm": f"fio seq read 1M of {big} lower file, warm",
        "randread-psync": "fio 4k rand read, psync, warm",
        "randread-libaio": "fio 4k rand read, libaio qd16, warm",
        "randread-iouring": "fio 4k rand read, io_uring qd16, warm",
        "mmap": f"mmap read of {big} lower file, cold",
        "seqwrite": f"fio seq write 1M of new {big} file + fsync",
        "randwrite": "fio 4k rand write to copied-up file + fsync",
        "copyup-append": f"copy-up {big} by 1-byte append",
        "copyup-chmod": f"copy-up {big} by chmod",
        "untar": f"untar {kcount(cfg, 'untar_files')} small files",
        "rm-untarred": f"rm -rf the {kcount(cfg, 'untar_files')} untarred files",
        "rm-lower": f"rm -rf lower tree ({cfg['rm_dirs'] * cfg['rm_files'] // 1000}k files)",
        "rename": f"mv lower dir ({cfg['rename_files']} files)",
        "git-add": f"git add of {kcount(cfg, 'git_files')} files",
        "tar-c": "tar c of whole mount | cat > /dev/null, cold",
    }


UNITS = {
    "seqread-cold": "MiB/s", "seqread-warm": "MiB/s", "seqwrite": "MiB/s",
    "randread-psync": "IOPS", "randread-libaio": "IOPS", "randread-iouring": "IOPS",
    "randwrite": "IOPS",
}


def unit(row):
    return UNITS.get(row, "s")


@workload("find", ["find-cold", "find-warm"])
def w_find(c):
    tree = os.path.join(c.mnt, "tree")
    drop_caches()
    c.record("find-cold", c.shell_time(["find", tree, "-printf", ""]))
    c.record("find-warm", c.shell_time(["find", tree, "-printf", ""]))


@workload("stat", ["stat"])
def w_stat(c):
    drop_caches()
    r = c.op("lstat-names", os.path.join(c.mnt, "bigdir"), os.path.join(c.img, "bigdir-names.txt"))
    c.record("stat", r["seconds"])
    if c.m.pid:
        c.b.rss_after_walk.setdefault(c.m.peer.key, []).append(proc_mem(c.m.pid)[0])
    if c.m.pid and c.m.peer.key == "stratafs":
        # Memory must not stay with removed entries: remove them all (untimed; stratafs only,
        # the fuse-overlayfs builds take minutes for this at the full size) and look again.
        c.untimed(["rm", "-rf", os.path.join(c.mnt, "bigdir")])
        c.b.rss_after_rm.setdefault(c.m.peer.key, []).append(proc_mem(c.m.pid)[0])


@workload("readdir", ["readdir-cold", "readdir-warm"])
def w_readdir(c):
    d = os.path.join(c.mnt, "bigdir")
    drop_caches()
    r = c.op("scandir", d)
    if r["count"] != c.cfg["bigdir"]:
        raise OpFailed(f"readdir saw {r['count']} entries, expected {c.cfg['bigdir']}")
    c.record("readdir-cold", r["seconds"])
    c.record("readdir-warm", c.op("scandir", d)["seconds"])


@workload("seqread", ["seqread-cold", "seqread-warm"])
def w_seqread(c):
    args = [f"--filename={c.bigfile}", "--readonly", "--rw=read", "--bs=1M",
            "--ioengine=psync", f"--size={c.bigsize}"]
    drop_caches()
    c.record("seqread-cold", c.fio(*args)["read"]["bw_bytes"] / MiB)
    c.record("seqread-warm", c.fio(*args)["read"]["bw_bytes"] / MiB)


def randread(engine, depth):
    def fn(c):
        c.untimed(f"cat {shlex.quote(c.bigfile)} > /dev/null", shell=True)
        j = c.fio(f"--filename={c.bigfile}", "--readonly", "--rw=randread", "--bs=4k",
                  f"--ioengine={engine}", f"--iodepth={depth}", f"--size={c.bigsize}",
                  "--time_based", f"--runtime={c.cfg['rand_runtime']}")
        c.record(f"randread-{engine.replace('_', '')}", j["read"]["iops"])
    return fn


workload("randread-psync", ["randread-psync"])(randread("psync", 1))
workload("randread-libaio", ["randread-libaio"])(randread("libaio", 16))
workload("randread-iouring", ["randread-iouring"])(randread("io_uring", 16))


@workload("mmap", ["mmap"])
def w_mmap(c):
    drop_caches()
    r = c.op("mmap-read", c.bigfile)
    if r["bytes"] != c.bigsize:
        raise OpFailed(f"mmap read {r['bytes']} bytes, expected {c.bigsize}")
    c.record("mmap", r["seconds"])


@workload("seqwrite", ["seqwrite"])
def w_seqwrite(c):
    j = c.fio(f"--filename={os.path.join(c.mnt, 'new.bin')}", "--rw=write", "--bs=1M",
              "--ioengine=psync", f"--size={c.bigsize}", "--end_fsync=1")
    c.record("seqwrite", j["write"]["bw_bytes"] / MiB)


@workload("randwrite", ["randwrite"])
def w_randwrite(c):
    c.warm_lower("data")
    c.op("open-rw", c.bigfile)  # copy-up, untimed
    j = c.fio(f"--filename={c.bigfile}", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
              f"--size={c.bigsize}", "--fallocate=none", "--time_based",
              f"--runtime={c.cfg['rand_runtime']}", "--end_fsync=1")
    c.record("randwrite", j["write"]["iops"])


@workload("copyup", ["copyup-append", "copyup-chmod"])
def w_copyup(c):
    c.warm_lower("data")
    r = c.op("append-byte", c.bigfile)
    c.record("copyup-append", r["seconds"])
    # chmod needs a file not yet copied up: use a new mount
    with Mount(c.b, c.m.peer, c.b.next_tag()) as m2:
        c2 = Ctx(c.b, m2)
        r = c2.op("chmod", c2.bigfile)
        c.record("copyup-chmod", r["seconds"])
        c.m.cpu += m2.cpu


@workload("untar", ["untar", "rm-untarred"])
def w_untar(c):
    dst = os.path.join(c.mnt, "untar")
    os.mkdir(dst)
    tarball = os.path.join(c.img, "untar.tar")
    run(f"cat {shlex.quote(tarball)} > /dev/null", c.timeout, shell=True)
    c.record("untar", c.shell_time(["tar", "xf", tarball, "-C", dst]))
    c.record("rm-untarred", c.shell_time(["rm", "-rf", dst]))


@workload("rm-lower", ["rm-lower"])
def w_rm_lower(c):
    c.warm_lower("rmtree")
    d = os.path.join(c.mnt, "rmtree")
    c.record("rm-lower", c.shell_time(["rm", "-rf", d]))
    if os.path.exists(d):
        raise OpFailed("rmtree still exists after rm -rf")


@workload("rename", ["rename"])
def w_rename(c):
    c.warm_lower("renamedir")
    src = os.path.join(c.mnt, "renamedir")
    dst = os.path.join(c.mnt, "renamed")
    r = c.op("rename", src, dst)
    n = sum(len(f) for _, _, f in os.walk(dst))
    if n != c.cfg["rename_files"] or os.path.exists(src):
        raise OpFailed(f"after mv: {n} files at destination, source exists={os.path.exists(src)}")
    c.record("rename", r["seconds"], outcome=r["outcome"])


@workload("git-add", ["git-add"])
def w_git(c):
    c.warm_lower("gitsrc")
    d = os.path.join(c.mnt, "gitsrc")
    env = dict(os.environ, HOME=c.b.runroot, GIT_CONFIG_NOSYSTEM="1",
               GIT_CONFIG_GLOBAL="/dev/null")
    c.untimed(["git", "init", "-q", d], env=env)
    c.record("git-add", c.shell_time(["git", "-C", d, "add", "-A"], env=env))
    out = run(["git", "-C", d, "ls-files"], c.timeout, env=env)
    n = len(out.splitlines())
    if n != c.cfg["git_files"]:
        raise OpFailed(f"git ls-files lists {n} files, expected {c.cfg['git_files']}")


@workload("tar-c", ["tar-c"])
def w_tar_c(c):
    drop_caches()
    c.record("tar-c", c.shell_time(
        ["bash", "-c", f"set -o pipefail; tar cf - -C {shlex.quote(c.mnt)} . | cat > /dev/null"]))


QUICK_SKIP = set()  # every workload runs in --quick, with the smaller sizes


# ---------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(QUICK if args.quick else FULL)
        if args.rounds:
            self.cfg["rounds"] = args.rounds
        self.cache = args.cache
        self.fs_desc = "?"
        self.runroot = None
        self.tag = 0
        self.values = {}   # row -> peer -> [values]
        self.fails = {}    # row -> peer -> reason
        self.extra = {}    # row -> peer -> [extra dicts]
        self.dstats = {}   # workload -> peer -> [dict(cpu, hwm_kib, rss_kib)]
        self.rss_after_walk = {}
        self.rss_after_rm = {}
        self.notes = []

    def next_tag(self):
        self.tag += 1
        return str(self.tag)

    def run_one(self, wname, rows, fn, peer):
        log(f"{wname} / {peer.label}")
        m = Mount(self, peer, self.next_tag())
        c = None
        try:
            with m:
                c = Ctx(self, m)
                fn(c)
                st = m.daemon_stats()
                if st:
                    self.dstats.setdefault(wname, {}).setdefault(peer.key, []).append(st)
        except Exception as e:  # noqa: BLE001  (a failure fills cells, never aborts)
            reason = str(e) if isinstance(e, OpFailed) else f"{type(e).__name__}: {e}"
            log(f"  FAIL {wname} / {peer.label}: {reason}")
            for r in rows:
                if c is None or r not in c.values:
                    self.fails.setdefault(r, {}).setdefault(peer.key, reason)
        if c:
            for r, v in c.values.items():
                self.values.setdefault(r, {}).setdefault(peer.key, []).append(v)
            for r, x in c.extra.items():
                self.extra.setdefault(r, {}).setdefault(peer.key, []).append(x)

    def main(self, peers, workloads, data):
        fstype = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", data],
                                capture_output=True, text=True).stdout.split()
        if self.args.fs == "ext4":
            self.fs_desc = (f"{fstype[0]} with journal, on {fstype[1]} (loop, direct I/O) "
                            "over a sparse file in the cache dir")
        else:
            self.fs_desc = f"{fstype[0]} ({fstype[1]}), the cache dir itself (`--fs host`)"
        self.runroot = os.path.join(data, f"run-{os.getpid()}")
        cleanup_stale(data)
        os.makedirs(self.runroot)
        self.image = gen_image(data, self.cfg)
        t0 = time.time()
        R = self.cfg["rounds"]
        for r in range(R):
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            log(f"round {r + 1}/{R}: " + ", ".join(p.label for p in order))
            for wname, rows, fn in workloads:
                for p in order:
                    self.run_one(wname, rows, fn, p)
        self.elapsed = time.time() - t0


# ---------------------------------------------------------------------------------
# Report


def fmt(v, u):
    if v is None:
        return "?"
    if u == "s":
        if v >= 100:
            return f"{v:.0f}"
        if v >= 10:
            return f"{v:.1f}"
        if v >= 0.1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return f"{v:.0f}"


def ratio(kernel, peer, u):
    if kernel is None or peer is None or kernel <= 0 or peer <= 0:
        return None
    return peer / kernel if u == "s" else kernel / peer


def sysinfo():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return cpu


def version_of(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        s = (out.stdout + out.stderr).strip().splitlines()
        s = ([l for l in s if "fuse-overlayfs" in l.lower() and "version" in l.lower()]
             or [l for l in s if "version" in l.lower()] or s)
        return s[0] if s else "?"
    except Exception:  # noqa: BLE001
        return "?"


def report(b, peers, workloads, repo):
    cfg = b.cfg
    labels = row_defs(cfg)
    kernel_on = any(p.key == "kernel" for p in peers)
    fuse = [p for p in peers if p.fuse]
    rows = [r for _, rs, _ in workloads for r in rs]
    foot = []

    def footnote(text):
        if text not in foot:
            foot.append(text)
        return f"[{foot.index(text) + 1}]"

    stratafs_rev = "?"
    try:
        stratafs_rev = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"],
                                      capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    L = []
    L.append(f"# stratafs benchmark ({cfg['mode']})")
    L.append("")
    L.append(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    L.append(f"- kernel: {platform.release()}; CPU: {sysinfo()}; cores: {os.cpu_count()}")
    L.append(f"- rounds: {cfg['rounds']} (interleaved, peer order rotated per round); "
             f"run time {b.elapsed / 60:.1f} min")
    for p in peers:
        if p.key == "fo1":
            L.append(f"- fo-1.10: {version_of([p.binary, '--version'])}")
        elif p.key == "fo2":
            L.append(f"- fo-2.0: {version_of([p.binary, '--version'])} ({p.binary})")
        elif p.key == "stratafs":
            L.append(f"- stratafs: {getattr(b, 'stratafs_desc', stratafs_rev)}; "
                     + ("over FUSE-over-io_uring (fuse enable_uring=Y, set by the bench for "
                        "the run)" if getattr(b, "uring", False) else "over /dev/fuse"))
        elif p.key == "stratafs-dev":
            L.append("- stratafs-dev: the same binary over /dev/fuse (STRATAFS_NO_URING=1), "
                     "as on a host with enable_uring off")
    import resource
    L.append(f"- RLIMIT_NOFILE (soft/hard) the daemons start with: "
             f"{'/'.join(str(x) for x in resource.getrlimit(resource.RLIMIT_NOFILE))}")
    L.append(f"- fio: {version_of(['fio', '--version'])}; layers and upper/work dirs on "
             f"{b.fs_desc}")
    L.append("- every cell: fresh mount, fresh upper/work; median (min..max). cold = "
             "`echo 3 > drop_caches` after mounting; warm = same op run once before on "
             "that mount; write/metadata workloads run with the layers in the host page cache.")
    L.append("- ratio = how many times slower than kernel overlayfs (time: peer/kernel; "
             "MiB/s or IOPS: kernel/peer). >1 = slower.")
    L.append("")
    hdr = ["workload", "unit"] + [p.label for p in peers]
    if kernel_on:
        hdr += [f"{p.label} ×kernel" for p in fuse]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(hdr) - 2)) + "|")
    ratios = {}
    for r in rows:
        u = unit(r)
        cells = [labels[r].replace("|", "\\|"), u]
        med = {}
        for p in peers:
            vs = b.values.get(r, {}).get(p.key)
            fail = b.fails.get(r, {}).get(p.key)
            if vs:
                med[p.key] = statistics.median(vs)
                cell = fmt(med[p.key], u)
                if len(vs) > 1:
                    cell += f" ({fmt(min(vs), u)}..{fmt(max(vs), u)})"
                if fail:
                    cell += " " + footnote(f"{p.label}, {r}: failed in some rounds: {fail}")
                x = b.extra.get(r, {}).get(p.key)
                if x and "outcome" in x[0]:
                    outs = sorted({e["outcome"] for e in x})
                    cell += " " + footnote(f"{p.label}, {r}: " + "; ".join(outs))
            elif fail:
                cell = "fail " + footnote(f"{p.label}, {r}: {fail}")
            else:
                cell = "–"
            cells.append(cell)
        if kernel_on:
            for p in fuse:
                x = ratio(med.get("kernel"), med.get(p.key), u)
                ratios.setdefault(r, {})[p.key] = x
                cells.append(f"{x:.2f}" if x is not None else "–")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if fuse and b.dstats:
        L.append("Daemon CPU seconds (utime+stime, timed sections only) / peak RSS (VmHWM, MiB) "
                 "per workload, medians:")
        L.append("")
        L.append("| workload | " + " | ".join(p.label for p in fuse) + " |")
        L.append("|---|" + "|".join(["---:"] * len(fuse)) + "|")
        for wname, _, _ in workloads:
            cells = [wname]
            for p in fuse:
                st = b.dstats.get(wname, {}).get(p.key)
                if not st:
                    cells.append("–")
                    continue
                cpu = statistics.median(s["cpu"] for s in st)
                hw = [s["hwm_kib"] for s in st if s["hwm_kib"]]
                hws = f"{statistics.median(hw) / 1024:.0f}" if hw else "?"
                cells.append(f"{cpu:.2f} s / {hws} MiB")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        if b.rss_after_walk:
            parts = []
            for p in fuse:
                v = b.rss_after_walk.get(p.key)
                if v:
                    parts.append(f"{p.label} {statistics.median(v) / 1024:.0f} MiB")
            L.append(f"Daemon RSS (VmRSS) right after lstat of {kcount(cfg, 'bigdir')} entries: "
                     + ", ".join(parts))
            v = b.rss_after_rm.get("stratafs")
            if v:
                L.append("")
                L.append(f"stratafs RSS right after `rm -rf` of those {kcount(cfg, 'bigdir')} "
                         f"entries: {statistics.median(v) / 1024:.0f} MiB")
            L.append("")
    for n in b.notes:
        L.append(f"Note: {n}")
    if b.notes:
        L.append("")
    for i, f in enumerate(foot):
        L.append(f"[{i + 1}] {f}  ")
    return "\n".join(L) + "\n", ratios


COLORS = {"fo1": "#d95f02", "fo2": "#7570b3", "stratafs": "#1b9e77",
          "stratafs-dev": "#66a61e"}


def svg_chart(ratios, peers, labels, title):
    """Horizontal grouped bars, log2 axis, one group per workload row."""
    import math
    fuse = [p for p in peers if p.fuse]
    rows = [r for r in ratios if any(v for v in ratios[r].values())]
    if not rows or not fuse:
        return None
    vals = [v for r in rows for v in ratios[r].values() if v]
    # clamp the axis to 1/16..256; bars beyond are cut and marked with "<" or ">"
    lo = max(1 / 16, min(0.5, 2 ** math.floor(math.log2(min(vals)))))
    hi = min(256.0, max(2.0, 2 ** math.ceil(math.log2(max(vals)))))
    left, right, top, bar, gap = 330, 50, 60, 11, 8
    width = 1000
    plot_w = width - left - right
    group_h = bar * len(fuse) + gap
    height = top + group_h * len(rows) + 50

    def x(v):
        return left + plot_w * (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))

    def esc(s):
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{left}" y="20" font-size="14" font-weight="bold">{esc(title)}</text>',
         f'<text x="{left}" y="36" fill="#555">times slower than kernel overlayfs '
         f'(log scale; 1 = kernel speed; &gt;1 = slower)</text>']
    lx = left
    for p in fuse:
        o.append(f'<rect x="{lx}" y="44" width="10" height="10" fill="{COLORS.get(p.key, "#999")}"/>')
        o.append(f'<text x="{lx + 14}" y="53">{esc(p.label)}</text>')
        lx += 110
    v = lo
    while v <= hi * 1.0001:
        xx = x(v)
        o.append(f'<line x1="{xx:.1f}" y1="{top - 4}" x2="{xx:.1f}" y2="{height - 40}" '
                 f'stroke="{"#000" if v == 1 else "#ddd"}" stroke-width="{1.5 if v == 1 else 1}"/>')
        tick = f"{v:g}" if v >= 1 else f"1/{1 / v:g}"
        o.append(f'<text x="{xx:.1f}" y="{height - 26}" text-anchor="middle">'
                 f'{tick}×</text>')
        v *= 2
    for i, r in enumerate(rows):
        y0 = top + i * group_h
        o.append(f'<text x="{left - 6}" y="{y0 + group_h / 2 + 1}" text-anchor="end">'
                 f'{esc(labels[r])}</text>')
        for j, p in enumerate(fuse):
            val = ratios[r].get(p.key)
            yy = y0 + j * bar
            if not val:
                o.append(f'<text x="{left + 4}" y="{yy + bar - 2}" fill="#a00" font-size="9">'
                         f'{esc(p.label)}: fail / n.a.</text>')
                continue
            x1 = x(1.0)
            xv = x(min(max(val, lo), hi))
            xa, xb = min(x1, xv), max(x1, xv)
            txt = f"{val:.2f}" if val >= 0.1 else f"{val:.2g}"
            if val < lo:
                txt = "< " + txt
            elif val > hi:
                txt = "> " + txt
            o.append(f'<rect x="{xa:.1f}" y="{yy}" width="{max(xb - xa, 1):.1f}" '
                     f'height="{bar - 1}" fill="{COLORS.get(p.key, "#999")}">'
                     f'<title>{esc(p.label)}: {val:.3g}×</title></rect>')
            if val < lo:
                o.append(f'<text x="{xa + 3:.1f}" y="{yy + bar - 2}" font-size="9" '
                         f'fill="white">{esc(txt)}</text>')
            elif val >= 1:
                o.append(f'<text x="{xb + 3:.1f}" y="{yy + bar - 2}" font-size="9">{esc(txt)}</text>')
            else:
                o.append(f'<text x="{xa - 3:.1f}" y="{yy + bar - 2}" font-size="9" '
                         f'text-anchor="end">{esc(txt)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


# ---------------------------------------------------------------------------------
# Main

ALIASES = {
    "kernel": "kernel", "ovl": "kernel",
    "fo1": "fo1", "fo-1.10": "fo1", "fo1.10": "fo1", "fuse-overlayfs": "fo1",
    "fo2": "fo2", "fo-2.0": "fo2", "fo2.0": "fo2",
    "stratafs": "stratafs",
    "stratafs-dev": "stratafs-dev", "stratafs-devfuse": "stratafs-dev",
}


def ensure_fo2(cache, notes):
    root = os.path.join(cache, "fo2")
    binp = os.path.join(root, "bin", "fuse-overlayfs")
    if os.access(binp, os.X_OK):
        return binp
    log("installing fuse-overlayfs 2.0.0 with cargo install (once) ...")
    r = subprocess.run(["cargo", "install", "--quiet", "fuse-overlayfs", "--version", "2.0.0",
                        "--root", root], capture_output=True, text=True)
    if r.returncode != 0 or not os.access(binp, os.X_OK):
        msg = (r.stderr.strip().splitlines() or ["?"])[-1]
        notes.append(f"fo-2.0 skipped: `cargo install fuse-overlayfs --version 2.0.0` failed: {msg}")
        log(notes[-1])
        return None
    return binp


def stratafs_binary(args, b):
    """--stratafs-bin as given; --stratafs-rev REV: `git archive REV` built in the cache
    (a committed revision, immune to edits in progress); else the work tree. Built once
    per run, whichever stratafs peers use it."""
    if not hasattr(b, "stratafs_bin"):
        b.stratafs_bin = build_stratafs(args, b)
    return b.stratafs_bin


def build_stratafs(args, b):
    if args.stratafs_bin:
        b.stratafs_desc = f"{args.stratafs_bin} (given)"
        return args.stratafs_bin
    if args.stratafs_rev:
        rev = subprocess.run(["git", "-C", args.repo, "rev-parse", "--verify",
                              args.stratafs_rev + "^{commit}"],
                             capture_output=True, text=True).stdout.strip()
        if not rev:
            b.notes.append(f"stratafs skipped: unknown revision {args.stratafs_rev}")
            return None
        src = os.path.join(args.cache, "stratafs-src", rev[:12])
        if not os.path.exists(os.path.join(src, "Cargo.toml")):
            os.makedirs(src, exist_ok=True)
            subprocess.run(f"git -C {shlex.quote(args.repo)} archive {rev} | tar x -C {shlex.quote(src)}",
                           shell=True, check=True)
        cwd, target = src, os.path.join(args.cache, "stratafs-target")
        b.stratafs_desc = f"{rev[:12]} (built from git archive, release)"
    else:
        cwd, target = args.repo, os.path.join(args.repo, "target")
        rev = subprocess.run(["git", "-C", args.repo, "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
        b.stratafs_desc = f"work tree at {rev or '?'} (release build)"
    log(f"building stratafs: {b.stratafs_desc}")
    r = subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "stratafs",
                        "--target-dir", target], cwd=cwd, capture_output=True, text=True)
    bp = os.path.join(target, "release", "stratafs")
    if r.returncode != 0 or not os.access(bp, os.X_OK):
        errs = [l for l in r.stderr.splitlines() if l.startswith("error")] or r.stderr.splitlines()[-2:]
        b.notes.append("stratafs skipped: cargo build --release failed: " + " / ".join(errs[:3]))
        log(b.notes[-1])
        return None
    return bp


def cleanup_stale(cache):
    """Unmount leftovers of earlier runs (their driver died) under cache/run-*."""
    if not os.path.isdir(cache):
        return
    for d in os.listdir(cache):
        if not d.startswith("run-"):
            continue
        pid = d[4:]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}") and int(pid) != os.getpid():
            continue  # a live run
        path = os.path.join(cache, d)
        for mp in sorted(mounts_under(path), reverse=True):
            subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
        shutil.rmtree(path, ignore_errors=True)


URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def set_uring(value):
    """Sets the fuse module's enable_uring; returns the value it had, None if it cannot."""
    try:
        with open(URING_PARAM) as f:
            before = f.read().strip()
        with open(URING_PARAM, "w") as f:
            f.write(value)
        return before
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller image (256 MiB file, 10k tree), 1 round, 2 s random I/O")
    ap.add_argument("--only", help="comma-separated workloads: " +
                    ",".join(w[0] for w in WORKLOADS))
    ap.add_argument("--peers", default="kernel,fo1,fo2,stratafs,stratafs-dev",
                    help="comma-separated: kernel, fo1 (fo-1.10), fo2 (fo-2.0), stratafs "
                    "(over io_uring), stratafs-dev (over /dev/fuse)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--cache", default=os.environ.get("STRATAFS_BENCH_CACHE", "/var/tmp/stratafs-bench"))
    ap.add_argument("--fs", choices=["ext4", "host"], default="ext4",
                    help="where the image and the mounts' upper/work dirs live: ext4 = a "
                    "journaled ext4 on a loop device in the cache dir (default), host = the "
                    "cache dir's own filesystem")
    ap.add_argument("--out", help="results dir (default REPO/bench-results)")
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(HERE)))
    ap.add_argument("--stratafs-bin", help="use this stratafs binary instead of building one")
    ap.add_argument("--stratafs-rev", help="build this committed revision (git archive) "
                    "instead of the work tree")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL[,bin=PATH][,VAR=VAL...]",
                    help="one more stratafs peer for A/B runs, interleaved with the others: "
                    "its own binary (default: the one built) and/or environment knobs, e.g. "
                    "--variant nordp,STRATAFS_NO_READDIRPLUS=1; repeatable")
    ap.add_argument("--list", action="store_true", help="list workloads and exit")
    args = ap.parse_args()

    if args.list:
        for name, rows, _ in WORKLOADS:
            print(name + ": " + ", ".join(rows))
        return 0
    if os.geteuid() != 0:
        sys.exit("scripts/bench: must run as root (mounts, drop_caches)")

    workloads = WORKLOADS
    if args.only:
        want = [w.strip() for w in args.only.split(",") if w.strip()]
        names = {w[0] for w in WORKLOADS}
        # allow prefixes: --only randread picks all three randread-*
        sel = [w for w in WORKLOADS if any(w[0] == x or w[0].startswith(x + "-") for x in want)]
        bad = [x for x in want if not any(n == x or n.startswith(x + "-") for n in names)]
        if bad:
            sys.exit(f"unknown workload(s): {', '.join(bad)}; see --list")
        workloads = sel

    os.makedirs(args.cache, exist_ok=True)
    cleanup_stale(args.cache)
    b = Bench(args)
    peers = []
    for name in args.peers.split(","):
        name = name.strip()
        if not name:
            continue
        key = ALIASES.get(name)
        if key is None:
            sys.exit(f"unknown peer {name}")
        if key == "kernel":
            peers.append(Peer("kernel", "kernel"))
        elif key == "fo1":
            bp = shutil.which("fuse-overlayfs")
            if bp:
                peers.append(Peer("fo1", "fo-1.10", bp))
            else:
                b.notes.append("fo-1.10 skipped: fuse-overlayfs not installed")
        elif key == "fo2":
            bp = ensure_fo2(args.cache, b.notes)
            if bp:
                peers.append(Peer("fo2", "fo-2.0", bp))
        elif key == "stratafs":
            bp = stratafs_binary(args, b)
            if bp:
                peers.append(Peer("stratafs", "stratafs", bp))
        elif key == "stratafs-dev":
            bp = stratafs_binary(args, b)
            if bp:
                peers.append(Peer("stratafs-dev", "stratafs-dev", bp,
                                  env={"STRATAFS_NO_URING": "1"}))
    for v in args.variant:
        label, *kvs = v.split(",")
        if not label or not all("=" in kv for kv in kvs):
            sys.exit(f"bad --variant {v!r}: want LABEL[,bin=PATH][,VAR=VAL...]")
        kv = dict(x.split("=", 1) for x in kvs)
        bp = kv.pop("bin", None) or stratafs_binary(args, b)
        if not bp or not os.access(bp, os.X_OK):
            sys.exit(f"--variant {label}: {bp} is not an executable")
        peers.append(Peer(f"stratafs-v-{label}", label, bp, env=kv or None))
        b.notes.append(f"{label}: stratafs variant, binary {bp}"
                       + (", env " + " ".join(f"{k}={x}" for k, x in kv.items()) if kv else ""))
    if not peers:
        sys.exit("no peers to run")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    uring_before = set_uring("Y")
    if uring_before is None:
        b.notes.append("FUSE over io_uring unavailable (no writable "
                       f"{URING_PARAM}): stratafs ran over /dev/fuse too")
    try:
        with (Volume(args.cache) if args.fs == "ext4" else HostDir(args.cache)) as vol:
            try:
                b.main(peers, workloads, vol.root)
            finally:
                if b.runroot:
                    unmount_under(b.runroot, say=True)
                    shutil.rmtree(b.runroot, ignore_errors=True)
    finally:
        if uring_before is not None:
            set_uring(uring_before)
    b.uring = uring_before is not None

    md, ratios = report(b, peers, workloads, args.repo)
    print(md)
    out = args.out or os.path.join(args.repo, "bench-results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(md)
    svg = svg_chart(ratios, peers, row_defs(b.cfg),
                    f"stratafs bench ({b.cfg['mode']}, {datetime.date.today()})")
    if svg:
        with open(os.path.join(out, "latest.svg"), "w") as f:
            f.write(svg)
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(dict(cfg=b.cfg, peers=[p.key for p in peers], values=b.values,
                       fails=b.fails, extra=b.extra, daemon=b.dstats,
                       rss_after_walk=b.rss_after_walk, rss_after_rm=b.rss_after_rm,
                       notes=b.notes,
                       ratios=ratios), f, indent=1)
    log(f"wrote {out}/latest.md, latest.svg, latest.json ({b.elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
