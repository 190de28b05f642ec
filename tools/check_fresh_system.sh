#!/usr/bin/env bash
# tools/check_fresh_system.sh DIST: try the project as a new user would, on a fresh minimal Debian.
#
# Builds a minimal chroot of DIST (bookworm, trixie, ...) with debootstrap --variant=minbase, installs
# only the prerequisites README names (its `sudo apt-get install ...` line, read from README), clones
# this repository's committed HEAD into it, and runs README's two commands there, timed:
#   make setup (the Caffe build; timed apart), make test, make demo.
# Prints one row for README's platform table. Optional; not part of CI. Needs root and debootstrap
# (installed if missing), and the network of the machine's own Debian archive.
#
# Environment: DEBIAN_MIRROR (default: the Debian archive of this machine's apt sources),
# CHROOT_DIR (default /var/tmp/redseg-chroot-DIST; reused if already bootstrapped), SKIP_DEMO=1.
set -euo pipefail

DIST=${1:?usage: tools/check_fresh_system.sh DIST   (e.g. bookworm or trixie)}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${CHROOT_DIR:-/var/tmp/redseg-chroot-$DIST}
LOG=$ROOT.log

die() {
  echo "check_fresh_system: ERROR: $*" >&2
  exit 1
}
say() { echo "check_fresh_system: $*" | tee -a "$LOG"; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap and chroot)"
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
  grep -oE '[a-z]+://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)}
[ -n "$mirror" ] || die "no Debian archive in this machine's apt sources; set DEBIAN_MIRROR"
prereq=$(grep -m1 -oE 'sudo apt-get install -y [a-z0-9 .+-]+' "$REPO/README.md" | sed 's/^sudo //') ||
  die "README.md no longer gives a 'sudo apt-get install -y ...' prerequisite line"
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }

: >"$LOG"
if [ ! -f "$ROOT/.bootstrapped" ]; then
  rm -rf "$ROOT"
  say "debootstrap --variant=minbase $DIST into $ROOT"
  debootstrap --variant=minbase "$DIST" "$ROOT" "$mirror" >>"$LOG" 2>&1 || die "debootstrap failed (log: $LOG)"
  touch "$ROOT/.bootstrapped"
fi

# What a real machine has that a bare chroot lacks: name resolution, the kernel's file systems, and
# the machine's own package-index configuration (never written into the project).
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
for f in /etc/pip.conf; do
  [ -f "$f" ] && mkdir -p "$ROOT$(dirname "$f")" && cp "$f" "$ROOT$f"
done
# Certificate authorities this machine added locally (e.g. a proxy's), for HTTPS inside the chroot.
local_cas=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
mounts=()
for m in proc sys dev dev/pts; do
  mountpoint -q "$ROOT/$m" || { mount --bind "/$m" "$ROOT/$m" && mounts=("$ROOT/$m" "${mounts[@]}"); }
done
cleanup() { for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done; }
trap cleanup EXIT

in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  TERM=dumb LANG=C.UTF-8 bash -c "$1"; }
minutes() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 60 }'; }

say "README's prerequisites: $prereq"
in_root "apt-get update -qq && DEBIAN_FRONTEND=noninteractive $prereq" >>"$LOG" 2>&1 || die "prerequisites failed (log: $LOG)"
if [ -n "$local_cas" ]; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  # shellcheck disable=SC2086
  cp $local_cas "$ROOT/usr/local/share/ca-certificates/"
  in_root "update-ca-certificates" >>"$LOG" 2>&1 || die "update-ca-certificates failed (log: $LOG)"
fi
rm -rf "$ROOT/root/redseg"
git clone -q "$REPO" "$ROOT/root/redseg"
say "cloned $(git -C "$REPO" rev-parse --short HEAD) into $ROOT/root/redseg"

t0=$(date +%s)
in_root "cd /root/redseg && make setup" >>"$LOG" 2>&1 || die "make setup failed in $DIST (log: $LOG)"
t1=$(date +%s)
say "make setup: $(minutes $((t1 - t0))) min (apt build dependencies, pip, Caffe build)"
in_root "cd /root/redseg && make test" >"$ROOT.test.log" 2>&1 || die "make test failed in $DIST (log: $ROOT.test.log)"
t2=$(date +%s)
tests=$(grep -E '^[0-9]+ passed|^=+ .*passed' "$ROOT.test.log" | tail -n1 | sed 's/=//g; s/^ *//; s/ *$//')
say "make test: $tests, $(minutes $((t2 - t1))) min"
demo="skipped"
if [ "${SKIP_DEMO:-0}" != 1 ]; then
  in_root "cd /root/redseg && make demo" >"$ROOT.demo.log" 2>&1 || die "make demo failed in $DIST (log: $ROOT.demo.log)"
  t3=$(date +%s)
  demo="$(minutes $((t3 - t2))) min"
  say "make demo: $demo; report: $ROOT/root/redseg/runs/demo/test/eval/report.md"
fi
sys=$(. "$ROOT/etc/os-release" && echo "$PRETTY_NAME")
say "| $sys | $(minutes $((t1 - t0))) | $tests | $demo |"
