#!/usr/bin/env bash
# Makes a Debian 12 machine (as root) ready to build, test and demo: packages, npm modules, addon, TypeScript build and command bundles, libvirt daemons; idempotent, one line per step that did something.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEBIAN_PACKAGES=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev libnbd-dev libnbd-bin nbdkit virtnbdbackup
  pkg-config liblz4-dev libxxhash-dev zlib1g-dev librust-blake3-dev b3sum python3-lz4 unzip g++ make python3 time
  openssh-client openssh-server sasl2-bin libsasl2-modules
)
LIBVIRT_URI=qemu:///system
ADDON=build/Release/virtnbd_native.node

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

# Runs a command with its output kept aside; shows that output only if the command fails.
quietly() {
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 </dev/null || status=$?
  if [ "$status" -ne 0 ]; then
    cat "$log" >&2
    rm -f "$log"
    die "failed ($status): $*"
  fi
  rm -f "$log"
}

install_debian_packages() {
  local missing=() pkg
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = 'install ok installed' ] || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages (${missing[*]}); run this script as root"
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  quietly apt-get update -q
  quietly apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# libvirt's capability probe sees KVM, but its cache check asks whether the QEMU user (libvirt-qemu) may open
# /dev/kvm; when it may not, every lookup re-probes QEMU (~4 s each, ~40 s per `virsh define`). Debian's udev rule
# makes /dev/kvm root:kvm 0660, and libvirt-qemu is in group kvm; without udev the node may be root-only.
# Domains stay <domain type='qemu'> (TCG) regardless.
fix_kvm_device_permissions() {
  [ -c /dev/kvm ] && id libvirt-qemu >/dev/null 2>&1 || return 0
  runuser -u libvirt-qemu -- test -r /dev/kvm -a -w /dev/kvm && return 0
  say "giving group kvm access to /dev/kvm (Debian's udev default) so libvirt keeps its QEMU capability cache"
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || printf 'setup: warning: could not change /dev/kvm; domain definitions will be slow\n' >&2
}

install_npm_modules() {
  if [ -d node_modules ] && [ -f node_modules/.package-lock.json ] && ! [ package-lock.json -nt node_modules/.package-lock.json ]; then
    return 0
  fi
  say "installing npm modules (npm ci)"
  quietly npm ci --no-audit --no-fund
}

build_native_addon() {
  if [ ! -f binding.gyp ]; then
    printf 'setup: warning: no binding.gyp yet, native addon not built\n' >&2
    return 0
  fi
  if [ -f "$ADDON" ] && [ -z "$(find native binding.gyp -newer "$ADDON" -print -quit 2>/dev/null)" ]; then
    return 0
  fi
  say "building native addon (node-gyp)"
  # Build against the headers of the Node that runs us: node-gyp would otherwise try to download them.
  local prefix nodedir_args=()
  prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
  [ -f "$prefix/include/node/common.gypi" ] && nodedir_args=(--nodedir="$prefix")
  # On every core: 13 s in place of 28 here. npm ci leaves the build to this ("gypfile": false), where it ran on one.
  quietly npx --no-install node-gyp rebuild --jobs=max "${nodedir_args[@]}"
}

compile_typescript() {
  quietly npx --no-install tsc -p tsconfig.json
  quietly node dist/scripts/bundle.js
}

# True when the pid in one of the given pid files belongs to a live process called `name`.
daemon_alive() {
  local name=$1 file pid
  shift
  for file in "$@"; do
    [ -r "$file" ] || continue
    pid=$(cat "$file" 2>/dev/null || true)
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && return 0
  done
  return 1
}

libvirt_answers() {
  timeout "${1:-10}" virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1
}

# Starts `name -d` unless it runs; pid files of a dead daemon are removed first so they cannot block the start.
start_daemon() {
  local name=$1 pidfiles=("/run/$1.pid" "/run/libvirt/$1.pid")
  daemon_alive "$name" "${pidfiles[@]}" && return 0
  [ "$name" = libvirtd ] && libvirt_answers 5 && return 0
  rm -f "${pidfiles[@]}"
  say "starting $name"
  quietly "$name" -d
}

wait_for_libvirt() {
  local deadline=$((SECONDS + 20))
  until libvirt_answers "$((deadline - SECONDS > 1 ? deadline - SECONDS : 1))"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 /var/log/libvirt/libvirtd.log >&2 2>/dev/null || true
      die "libvirtd does not answer on $LIBVIRT_URI after 20 s"
    fi
    sleep 0.5
  done
}

install_debian_packages
fix_kvm_device_permissions
install_npm_modules
build_native_addon
compile_typescript
start_daemon virtlogd
start_daemon libvirtd
wait_for_libvirt
