#!/usr/bin/env bash
# Builds the dev blobs' enclave kernel from Debian's kernel source (linux-source-6.12, which has the
# NSM driver): `make allnoconfig` plus enclave-kernel.config, bzImage and the one module nsm.ko.
# Installed into a cache outside any clone, keyed by the source version and a hash of the recipe
# (bzImage, bzImage.config, nsm.ko), so a second run, another clone or CI on the same machine
# rebuilds nothing. Prints the cache directory on stdout; progress goes to stderr.
#   build-kernel.sh CACHE_ROOT
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=$1
jobs=${JOBS:-$(nproc)}
pkg=linux-source-6.12
# Bump when a build step below changes what is built; the config fragment is hashed as well.
recipe_rev=1

"$here/apt-install.sh" "$pkg" gcc make bc bison flex libelf-dev libssl-dev xz-utils >&2
version=$(dpkg-query -W -f='${Version}' "$pkg")
recipe=$( (echo "rev $recipe_rev"; cat "$here/enclave-kernel.config") | sha256sum | cut -c1-12)
key="kernel-${version//[:~+]/_}-$recipe"
# A cache that is not ours to write (another user's /var/cache) is still used when the build is there.
if [[ ! -f "$cache_root/$key/bzImage" ]] && ! { mkdir -p "$cache_root" && [[ -w "$cache_root" ]]; } 2>/dev/null; then
  cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/nitroconv
fi
out="$cache_root/$key"

# One build per key at a time (two clones, or a test run, may ask at once); the second waits, then
# finds the first one's result.
mkdir -p "$cache_root"
exec 9>"$cache_root/.$key.lock"
flock 9
if [[ ! -f "$out/bzImage" ]]; then
  echo "enclave kernel: building Linux from $pkg $version into $out; about 10 minutes on 2 cores" >&2
  mkdir -p "$cache_root"
  work=$(mktemp -d "$cache_root/.kernel-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -C "$work" -xf "/usr/src/$pkg.tar.xz"
  src="$work/$pkg"
  # Fixed build metadata (no user, host or hour in the image). The bzImage is not yet byte-reproducible
  # between two builds (seen differing), so PCR1 is per cache entry, not per version.
  export ARCH=x86_64 KBUILD_BUILD_TIMESTAMP="Debian $version" KBUILD_BUILD_USER=nitroconv \
    KBUILD_BUILD_HOST=nitroconv KBUILD_BUILD_VERSION=1
  (cd "$src" && scripts/kconfig/merge_config.sh -n "$here/enclave-kernel.config") >"$work/config.log" 2>&1 \
    || { tail -n 30 "$work/config.log" >&2; exit 1; }
  # Every option the fragment asks for must have survived (a dependency not met drops it silently).
  missing=$(grep -E '^CONFIG_[A-Z0-9_]+=' "$here/enclave-kernel.config" | grep -vxF -f "$src/.config" || true)
  [[ -z "$missing" ]] || { echo "enclave kernel: options not in the final config: $missing" >&2; exit 1; }
  make -C "$src" -j "$jobs" bzImage modules >"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; exit 1; }
  rm -rf "$out.tmp" && mkdir "$out.tmp"
  install -m 0644 "$src/arch/x86/boot/bzImage" "$out.tmp/bzImage"
  install -m 0644 "$src/.config" "$out.tmp/bzImage.config"
  install -m 0644 "$src/drivers/misc/nsm.ko" "$out.tmp/nsm.ko"
  strip --strip-debug "$out.tmp/nsm.ko"
  # Appears whole or not at all.
  mv -T "$out.tmp" "$out"
fi
echo "$out"
