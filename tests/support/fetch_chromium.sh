#!/usr/bin/env bash
# Headless Chromium for the report's browser test (tests/tasks/test_report.py), unpacked from Debian's
# own packages into DEST without installing anything system-wide: apt works out what this machine lacks
# (a simulated install, no root needed), `apt-get download` fetches those packages, `dpkg -x` unpacks
# them, and DEST/chromium runs the browser with the unpacked libraries. Where there is no apt, or
# Chromium is already on PATH, it says so and does nothing: the test uses PATH's or skips.
#
#     tests/support/fetch_chromium.sh .cache/chromium      # `make browser`, which `make test` runs
set -euo pipefail
dest=${1:?usage: fetch_chromium.sh DEST}
[ -x "$dest/chromium" ] && exit 0
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    echo "fetch_chromium: chromium is on PATH; nothing to fetch"
    exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    echo "fetch_chromium: no apt-get/dpkg here; the browser test will skip (install chromium to run it)"
    exit 0
fi
packages=$(apt-get -s install --no-install-recommends chromium 2>/dev/null | awk '/^Inst /{print $2}')
if [ -z "$packages" ]; then
    echo "fetch_chromium: apt knows no chromium package (run apt-get update?); the browser test will skip"
    exit 0
fi
mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$dest.partial.XXXXXX")  # beside DEST, so a killed run leaves no half-made DEST
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086  # one argument a package
if ! (cd "$work" && apt-get download $packages >/dev/null 2>&1); then
    echo "fetch_chromium: apt-get download failed (no Debian mirror?); the browser test will skip"
    exit 0
fi
for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$work/root"
    rm "$deb"
done
libs=$(cd "$work/root" && find usr/lib -maxdepth 2 -type d \( -name '*-linux-gnu' -o -name pulseaudio \) | sort)
{
    echo '#!/bin/sh'
    echo 'here=$(dirname "$(readlink -f "$0")")'
    printf 'export LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' \
        "$(printf '$here/root/%s:' $libs | sed 's/:$//')"
    echo 'exec "$here/root/usr/lib/chromium/chromium" "$@"'
} > "$work/chromium"
chmod +x "$work/chromium"
"$work/chromium" --version
mv "$work" "$dest"
trap - EXIT
