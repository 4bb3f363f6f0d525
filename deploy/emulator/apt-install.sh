#!/usr/bin/env bash
# Installs the named Debian packages that are missing (a `pkg/suite` picks that suite), and
# nothing when all are present, so a second run neither updates nor touches apt.
set -euo pipefail
missing=()
for spec in "$@"; do
  p=${spec%%/*}
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$spec")
done
if ((${#missing[@]})); then
  echo "apt: installing ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
