#!/usr/bin/env bash
# Re-fetches the chart library `ytrainer board` embeds (uPlot, MIT licence) from the npm registry at a pinned
# version, checks the package's checksum, and copies the two files the page uses and the licence into
# crates/ytrainer-board/assets/vendor/. The files are committed; the build and the board never download anything.
# Usage: scripts/fetch-uplot.sh   (needs npm, tar, sha256sum)
set -euo pipefail
VERSION=1.6.32
# sha256 of uplot-$VERSION.tgz as the registry serves it (npm's own integrity: sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==).
SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
cd "$(dirname "$0")/.."
dest=crates/ytrainer-board/assets/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null)
echo "$SHA256  $tmp/uplot-$VERSION.tgz" | sha256sum -c -
tar -xzf "$tmp/uplot-$VERSION.tgz" -C "$tmp"
mkdir -p "$dest"
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$dest/"
cp "$tmp/package/LICENSE" "$dest/uPlot-LICENSE"
echo "uPlot $VERSION -> $dest"
