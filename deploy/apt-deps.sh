#!/usr/bin/env bash
# Installs the Debian packages the project needs, and only those that are missing,
# so a second run touches nothing (no apt-get update when all are present).
set -euo pipefail
packages=(
  make binutils                 # worker/runtime/Makefile (its compiler is the venv's pinned zig) and readelf
  gcc libc6-dev                 # a C compiler for Python packages that build from source
  clang libclang-rt-14-dev      # tests/fuzz: libFuzzer with ASan/UBSan over the runtime's parsers
  cpio busybox-static           # test rootfs and cross-checks of our cpio writer
  linux-image-cloud-amd64       # the guest kernel (virtio-vsock modules) of tests/e2e/test_vsock_guest.py
  qemu-system-x86               # boot checks
  docker.io                     # the test oracle (dockerd); never needed to convert
  docker-registry               # local registry for tests and the demo
  apache2-utils                 # htpasswd for the basic-auth registry in tests; ab for bench/api_load.py
  nghttp2-client                # h2load: bench/api_load.py's paced phase
  skopeo                        # independent OCI client used as a cross-check in tests
  debootstrap                   # bench image
  postgresql redis-server       # the system of record and the broker
  chromium                      # headless-browser tests of Flower and /v1/docs
  docker-compose                # validates deploy/compose.yaml (Debian has Compose v1 only)
)
missing=()
for p in "${packages[@]}"; do
  [[ "$p" == \#* ]] && continue
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "apt: installing ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
