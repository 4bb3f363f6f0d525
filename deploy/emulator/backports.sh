#!/usr/bin/env bash
# Makes bookworm-backports available to apt for the emulator and enclave kernel builds only:
# binaries and sources, pinned at priority 100 so nothing already installed is ever upgraded
# from it (only an explicit `-t bookworm-backports` or `pkg/bookworm-backports` picks it).
# A second run changes nothing and runs no `apt-get update`.
set -euo pipefail
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
list=/etc/apt/sources.list.d/nitroconv-bookworm-backports.sources
pin=/etc/apt/preferences.d/nitroconv-bookworm-backports
want_list='Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'
want_pin='Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100'
changed=0
if [[ "$(cat "$list" 2>/dev/null)" != "$want_list" ]]; then
  printf '%s\n' "$want_list" | $SUDO tee "$list.tmp" >/dev/null && $SUDO mv -f "$list.tmp" "$list"
  changed=1
fi
if [[ "$(cat "$pin" 2>/dev/null)" != "$want_pin" ]]; then
  printf '%s\n' "$want_pin" | $SUDO tee "$pin.tmp" >/dev/null && $SUDO mv -f "$pin.tmp" "$pin"
  changed=1
fi
# The lists may be missing even when the files are in place (a cleaned apt cache).
if ((changed)) || ! ls /var/lib/apt/lists/*bookworm-backports*Sources* >/dev/null 2>&1; then
  echo "apt: enabling bookworm-backports (pinned at 100) for the emulator build"
  $SUDO apt-get update -q
fi
