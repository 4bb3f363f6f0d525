#!/usr/bin/env bash
# The demo: a sample image into the local registry, converted by the CLI, boot-checked, measured.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${NITROCONV_STATE_DIR:-$PWD/.state}
addr=${NITROCONV_REGISTRY_ADDR:-127.0.0.1:5000}
bin=$PWD/.venv/bin
mkdir -p "$state/demo"

deploy/registry.sh start
echo "== pushing the sample image (busybox, no Docker) to $addr"
"$bin/python" deploy/sample_image.py "$addr" demo/hello:latest

echo "== converting with nitroconv convert-local"
"$bin/nitroconv" convert-local --input "$addr/demo/hello:latest" --output "$addr/demo/hello-enclave:latest" \
  --insecure-registry "$addr" --mem-size 512 --cpu-count 2 --eif-out "$state/demo/hello.eif" \
  | tee "$state/demo/measurements.json"

echo "== boot-checking the EIF under QEMU"
"$bin/nitroconv" boot-check "$state/demo/hello.eif"

echo "== nitroconv describe-eif"
"$bin/nitroconv" describe-eif "$state/demo/hello.eif"
