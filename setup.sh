#!/bin/sh
# cowbackup developer entry point: installs everything it needs, then runs what you ask.
#
#   ./setup.sh demo     set up, then run a live backup of a disk that is being written to, and verify it
#   ./setup.sh test     set up, then run the linters, the type checker and the whole test suite
#   ./setup.sh bench    set up, then run the benchmark against qemu-storage-daemon
#   ./setup.sh deps     set up only
#
# Works on a fresh Debian 12 as root (or with sudo).  Creates ./.venv.
set -eu
cd "$(dirname "$0")"

DEBS="python3 python3-venv qemu-utils qemu-system-common nbdkit libnbd-bin python3-libnbd openssl fio restic borgbackup ceph-mon ceph-osd radosgw ceph-common"

need_debs() {
    for bin in qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdkit nbdinfo nbdcopy nbdsh openssl fio restic borg ceph-mon ceph-osd radosgw radosgw-admin; do
        command -v "$bin" >/dev/null 2>&1 || return 0
    done
    /usr/bin/python3 -c 'import ensurepip, nbd' >/dev/null 2>&1 || return 0
    return 1
}

install_debs() {
    if need_debs; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        echo "setup: installing Debian packages: $DEBS"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
        # shellcheck disable=SC2086
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $DEBS
    fi
}

pick_python() {
    for py in python3.11 python3.12 python3.13 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return
        fi
    done
    echo "setup: Python >= 3.11 not found" >&2
    exit 1
}

make_venv() {
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import cowbackup, pytest, hypothesis' 2>/dev/null ||
        [ pyproject.toml -nt .venv/.installed ]; then
        py=$(pick_python)
        echo "setup: creating .venv with $py"
        "$py" -m venv .venv
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -e '.[test]'
        touch .venv/.installed
    fi
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
install_debs
make_venv
case "$cmd" in
    deps) ;;
    demo) exec .venv/bin/cowbackup demo "$@" ;;
    test)
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        .venv/bin/mypy
        exec .venv/bin/python -m pytest -q "$@"
        ;;
    bench) exec .venv/bin/python bench/backup_vs_qemu.py "$@" ;;
    *)
        echo "usage: ./setup.sh [demo|test|bench|deps]" >&2
        exit 2
        ;;
esac
