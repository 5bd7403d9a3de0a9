# shellcheck shell=bash
# Helpers shared by scripts/demo, scripts/pjdfstest and scripts/test. Sourced, not run.
# The sourcing script sets `set -euo pipefail` itself.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
# rustup's cargo lives here; CI's environment may not have it on PATH.
if [ -d "$HOME/.cargo/bin" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
export PATH

heading() { printf '\n== %s ==\n' "$*"; }
die() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

require_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it mounts filesystems)"
    [ -c /dev/fuse ] || die "/dev/fuse is missing (load the fuse module or pass the device in)"
}

# ensure_commands CMD:PACKAGE... — apt-get installs the package of each missing command.
# `apt-get update` runs at most once per run, child scripts included.
ensure_commands() {
    local pair missing=()
    for pair in "$@"; do
        if ! command -v "${pair%%:*}" >/dev/null 2>&1; then
            case " ${missing[*]-} " in
                *" ${pair#*:} "*) ;;
                *) missing+=("${pair#*:}") ;;
            esac
        fi
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]}, and no apt-get to install them"
    echo "${0##*/}: installing ${missing[*]}" >&2
    if [ -z "${STRATAFS_APT_UPDATED:-}" ]; then
        apt-get update -qq </dev/null >&2
        export STRATAFS_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" </dev/null >&2
}

# build_stratafs — sets $stratafs to the release binary. STRATAFS_BIN skips the build.
build_stratafs() {
    if [ -n "${STRATAFS_BIN:-}" ]; then
        stratafs=$(realpath "$STRATAFS_BIN")
    else
        (cd "$repo" && cargo build --release --bin stratafs </dev/null)
        stratafs=$target_dir/release/stratafs
    fi
    [ -x "$stratafs" ] || die "no stratafs binary at $stratafs"
}

# fstype_of MOUNTPOINT — the filesystem type mounted exactly there, or nothing.
fstype_of() {
    awk -v mp="$1" '{ p = $5; gsub(/\\040/, " ", p)
        if (p == mp) { for (i = 7; $i != "-"; i++) ; t = $(i + 1) } }
        END { if (t != "") print t }' /proc/self/mountinfo
}

# unmount_under DIR — unmounts every mount at or below DIR, deepest first. Never fails.
unmount_under() {
    local dir=$1 mp
    [ -n "$dir" ] || return 0
    awk -v d="$dir" '{ p = $5; gsub(/\\040/, " ", p)
        if (p == d || index(p, d "/") == 1) print p }' /proc/self/mountinfo |
        sort -r | while IFS= read -r mp; do
            umount "$mp" 2>/dev/null ||
                fusermount3 -u "$mp" 2>/dev/null ||
                umount -l "$mp" 2>/dev/null ||
                echo "warning: could not unmount $mp" >&2
        done
    return 0
}

# remove_tree DIR — rm -rf, but only once nothing is mounted below DIR any more
# (removing through a live mount would reach into its layers).
remove_tree() {
    local dir=$1
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    if awk -v d="$dir" '{ p = $5; gsub(/\\040/, " ", p)
        if (p == d || index(p, d "/") == 1) found = 1 } END { exit !found }' /proc/self/mountinfo; then
        echo "warning: mounts remain under $dir; left it in place" >&2
        return 0
    fi
    rm -rf -- "$dir" 2>/dev/null || true
}
