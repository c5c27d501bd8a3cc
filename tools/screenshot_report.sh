#!/usr/bin/env bash
# Screenshot of an HTML report (normref check --html) in headless Chromium, for a look at the
# page without a desktop: tools/screenshot_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
# The window is fixed (default 1400x2400) so that screenshots of two reports compare.
# Needs chromium (Debian: apt-get install -y chromium); the page loads nothing from the network.
set -euo pipefail
if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
report=$1
out=$2
size=${3:-1400x2400}
if [[ ! -f $report ]]; then
    echo "$0: $report: no such file" >&2
    exit 2
fi
if [[ ! $size =~ ^[0-9]+x[0-9]+$ ]]; then
    echo "$0: size must be WIDTHxHEIGHT, got $size" >&2
    exit 2
fi
browser=""
for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" > /dev/null; then
        browser=$candidate
        break
    fi
done
if [[ -z $browser ]]; then
    echo "$0: no chromium found (Debian: apt-get install -y chromium)" >&2
    exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: Chromium refuses to run as root with its sandbox; the page is a local file.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
    --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" \
    "file://$(realpath "$report")" > /dev/null 2>&1
if [[ ! -s $out ]]; then
    echo "$0: chromium wrote no screenshot to $out" >&2
    exit 1
fi
echo "$out"
