#!/usr/bin/env bash
# Builds QEMU with the `nitro-enclave` machine from Debian's own source of bookworm-backports'
# `qemu` (Debian's binaries lack it: they are built without libcbor), x86_64 system emulator only,
# with the device set of nitro.mak. Installed into a cache outside any clone, keyed by the
# source version and a hash of the recipe, so a second run (or another clone, or CI on the same
# machine) rebuilds nothing; then links <state>/emulator/qemu-system-x86_64 to it. (QEMU finds its
# files relative to its binary, so the prefix is installed under a temporary name and renamed.)
#   build-qemu.sh CACHE_ROOT LINK_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=$1 link_dir=$2
jobs=${JOBS:-$(nproc)}

"$here/backports.sh"
# Build dependencies of the x86_64 nitro build only (meson >= 1.5 is in backports).
"$here/apt-install.sh" meson/bookworm-backports python3-pycotap/bookworm-backports ninja-build pkgconf python3-venv flex bison \
  libglib2.0-dev zlib1g-dev libfdt-dev libcbor-dev libgnutls28-dev libseccomp-dev dpkg-dev qemu-system-data

# The version apt's signed Sources index names; the tarball is checked against its sha256.
version=$(apt-cache showsrc qemu | awk '/^Version:/ {print $2}' | grep 'bpo12' | sort -V | tail -n 1)
[[ -n "$version" ]] || { echo "emulator: no qemu source in bookworm-backports (apt-get update?)" >&2; exit 1; }
# Bump when a build step below changes what is built; the device set is hashed as well.
# 2: seccomp built in (the boot check runs untrusted images and refuses an emulator without `-sandbox`).
recipe_rev=2
recipe=$( (echo "rev $recipe_rev"; cat "$here/nitro.mak") | sha256sum | cut -c1-12)
key="qemu-${version//[:~+]/_}-$recipe"
# A cache that is not ours to write (another user's /var/cache) is still used when the build is there.
if [[ ! -x "$cache_root/$key/bin/qemu-system-x86_64" ]] && ! { mkdir -p "$cache_root" && [[ -w "$cache_root" ]]; } 2>/dev/null; then
  cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/nitroconv
fi
prefix="$cache_root/$key"
binary="$prefix/bin/qemu-system-x86_64"

# One build per key at a time (two clones, or a test run, may ask at once); the second waits, then
# finds the first one's result.
mkdir -p "$cache_root"
exec 9>"$cache_root/.$key.lock"
flock 9
if [[ ! -x "$binary" ]]; then
  echo "emulator: building QEMU $version (nitro-enclave, x86_64 only) into $prefix; about 4 minutes on 2 cores"
  mkdir -p "$cache_root"
  work=$(mktemp -d "$cache_root/.qemu-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # The orig tarball is Debian's `+ds` upstream source (no firmware blobs). Debian's packaging
  # tarball is not needed for this build: its patches concern the Debian packages' own paths.
  # apt's signed Sources index names the tarball and its sha256.
  read -r url file _ sha < <(apt-get source --print-uris -q "qemu=$version" | awk '$2 ~ /\.orig\.tar\./')
  url=${url//\'/} sha=${sha#SHA256:}
  [[ -n "$url" && ${#sha} -eq 64 ]] || { echo "emulator: cannot find the qemu $version orig tarball in apt's index" >&2; exit 1; }
  curl -fsSL --retry 3 -o "$work/$file" "$url"
  echo "$sha  $work/$file" | sha256sum -c --quiet -
  tar -C "$work" -xf "$work/$file"
  src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n 1)
  install -m 0644 "$here/nitro.mak" "$src/configs/devices/x86_64-softmmu/nitro.mak"
  # The +ds source has no edk2 firmware, yet meson unpacks it whenever bzip2 is installed.
  sed -i "s/^    unpack_edk2_blobs = bzip2.found()$/    unpack_edk2_blobs = false/" "$src/meson.build"
  grep -q '^    unpack_edk2_blobs = false$' "$src/meson.build" || { echo "emulator: meson.build changed, cannot skip edk2" >&2; exit 1; }
  mkdir "$src/build"
  # qboot.rom (microvm's BIOS) is not in the +ds source: it comes from Debian's qemu-system-data.
  # Debian's python3 sees the meson and pycotap packages (a pyenv or venv python would not).
  (cd "$src/build" && ../configure --python=/usr/bin/python3 --prefix="$prefix.tmp" \
      --firmwarepath="$prefix.tmp/share/qemu:/usr/share/qemu:/usr/share/seabios" \
      --target-list=x86_64-softmmu --without-default-features --without-default-devices \
      --with-devices-x86_64=nitro --enable-tcg --enable-kvm --enable-fdt=system \
      --enable-libcbor --enable-gnutls --enable-seccomp --enable-vhost-user --enable-vhost-kernel \
      --disable-docs --disable-tools --disable-guest-agent --disable-werror \
      --disable-download --disable-install-blobs >configure.log 2>&1) \
    || { tail -n 30 "$src/build/configure.log" >&2; exit 1; }
  ninja -C "$src/build" -j "$jobs" qemu-system-x86_64 >"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; exit 1; }
  # Only the binary: `ninja install` would first build every unit test. Firmware (qboot.rom, the
  # linuxboot option ROMs) comes from Debian's qemu-system-data, on the firmware path above.
  rm -rf "$prefix.tmp"
  install -D -m 0755 "$src/build/qemu-system-x86_64" "$prefix.tmp/bin/qemu-system-x86_64"
  strip --strip-unneeded "$prefix.tmp/bin/qemu-system-x86_64"
  "$prefix.tmp/bin/qemu-system-x86_64" -machine help | grep -q '^nitro-enclave' \
    || { echo "emulator: the build has no nitro-enclave machine" >&2; exit 1; }
  # The boot check will not run it without its seccomp sandbox (worker/emulator/session.py).
  "$prefix.tmp/bin/qemu-system-x86_64" -sandbox on -version >/dev/null \
    || { echo "emulator: the build refuses -sandbox (no seccomp)" >&2; exit 1; }
  # Appears whole or not at all: a failed or interrupted build leaves no half prefix behind.
  mv -T "$prefix.tmp" "$prefix"
fi
mkdir -p "$link_dir"
ln -sfn "$binary" "$link_dir/qemu-system-x86_64.tmp" && mv -Tf "$link_dir/qemu-system-x86_64.tmp" "$link_dir/qemu-system-x86_64"
