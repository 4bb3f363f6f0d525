#!/usr/bin/env bash
# The demo, through the service: the stack up, a sample image in the local registry, an app, a
# conversion submitted and followed by the CLI client (the worker boots the EIF under QEMU before it
# pushes: NITROCONV_BOOT_CHECK=1), the boot check's result read from the Build, its task approved, the
# WHITELISTED Build printed; then the converted image's EIF fetched from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
export NITROCONV_STATE_DIR=${NITROCONV_STATE_DIR:-$PWD/.state}
state=$NITROCONV_STATE_DIR
addr=${NITROCONV_REGISTRY_ADDR:-127.0.0.1:5000}
export NITROCONV_CLIENT_CONFIG=$state/demo/session.json
bin=$PWD/.venv/bin
mkdir -p "$state/demo"
json() { "$bin/python" -c 'import json,sys; d=json.load(sys.stdin)
for k in sys.argv[1].split("."): d=d[k]
print(d)' "$1"; }

# The demo's workers boot-check every conversion; a stack already running keeps its own setting.
export NITROCONV_BOOT_CHECK=${NITROCONV_BOOT_CHECK:-1}
deploy/up.sh
if [[ -z "${NITROCONV_ADMIN_PASSWORD:-}" ]]; then
  export NITROCONV_ADMIN_PASSWORD=$(cat "$state/admin_password")
fi

echo "== pushing the sample image (busybox, made without Docker) to $addr"
"$bin/python" deploy/sample_image.py "$addr" demo/hello:latest

echo "== signing in and creating an app"
"$bin/nitroconv" login --email "${NITROCONV_ADMIN_EMAIL:-admin@nitroconv.local}" --password-env NITROCONV_ADMIN_PASSWORD
app_id=$("$bin/nitroconv" apps create "demo-$(date +%s)")

echo "== converting $addr/demo/hello:latest through the service (memory sized by the service)"
"$bin/nitroconv" convert --app-id "$app_id" --input "$addr/demo/hello:latest" \
  --output "$addr/demo/hello-enclave:latest" --cpu-count 2 --wait --json >"$state/demo/build.json" || true
build_id=$(json build_id <"$state/demo/build.json")
"$bin/python" -c 'import json,sys; b=json.load(open(sys.argv[1])); c=b["conversion"]; r=c["boot_check"]
print("conversion:", c["state"], "" if c["error"] is None else "(%(code)s: %(message)s)" % c["error"])
print("enclave memory: %s MiB (EIF %s bytes), %s vCPUs" % (b["mem_size"], c["eif_size"], b["threads"]))
if r is None:
    print("boot check: not run (the running workers have NITROCONV_BOOT_CHECK off)")
else:
    print("boot check:", "ok" if r["ok"] else "FAILED", "in %.1fs;" % r["seconds"], r["reason"])
    print("\n".join("  | " + l for l in (r["program_output"] if r["ok"] else r["console_tail"][-15:])))
sys.exit(0 if c["state"] == "SUCCEEDED" else 1)' "$state/demo/build.json"
task_id=$(json pending_task_id <"$state/demo/build.json")

echo "== approving task $task_id"
"$bin/nitroconv" tasks approve "$task_id" >/dev/null

echo "== fetching the converted image's EIF (boot-checked by the worker above) and verifying its PCRs"
"$bin/nitroconv" fetch-eif "$addr/demo/hello-enclave:latest" --out "$state/demo/hello.eif" --insecure-registry "$addr"
"$bin/nitroconv" verify "$state/demo/hello.eif" --expect-pcr "0=$(json attributes.eif.nitro_enclave.pcr0 <"$state/demo/build.json")" >/dev/null

echo "== the Build"
"$bin/nitroconv" builds get "$build_id"
echo "(the stack keeps running: make down stops it)"
