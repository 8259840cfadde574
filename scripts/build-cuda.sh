#!/usr/bin/env bash
# Builds the `cuda` feature of ytrainer offline and packs the binary for the GPU machine. Idempotent.
#
# burn 0.22.1's `cuda` feature pulls cubecl-llvm, whose build script (tracel-llvm-bundler 23.1.0-4) downloads an
# LLVM bundle unless it finds one installed under ~/.local/share/tracel/. This script points it at Debian's LLVM 22
# instead: it installs llvm-22-dev, libpolly-22-dev and libzstd-dev, creates the bundle's directory with an
# `llvm-config` that forwards to Debian's (rewriting the absolute libz3 path to `-lz3`) and the marker file the
# bundler checks, then builds into target/cuda (so the CPU build in target/ is untouched).
#
# Output: dist/cuda/ytrainer.xz (stripped, xz-compressed; dist/ is git-ignored) and its sha256, small enough for
# the device tool (64 MiB in all). On the GPU machine: `python3 -c "import lzma,sys;..."` or `xz -d` (see
# scripts/gpu-check.sh, which unpacks it itself).
#
# Usage: bash scripts/build-cuda.sh        (needs root or sudo for apt; ~12 min from clean on 2 cores, ~2.5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE_VERSION=23.1.0-4
LLVM_MAJOR=22
PREFIX="$HOME/.local/share/tracel/tracel-llvm-$BUNDLE_VERSION"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

need_pkgs=()
for p in "llvm-$LLVM_MAJOR-dev" "libpolly-$LLVM_MAJOR-dev" libzstd-dev libz3-dev xz-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

mkdir -p "$PREFIX/bin"
cat > "$PREFIX/bin/llvm-config" <<SHIM
#!/usr/bin/env bash
# Forwards to Debian's LLVM $LLVM_MAJOR (written by scripts/build-cuda.sh); the bundle expects -lz3, Debian prints a path.
/usr/lib/llvm-$LLVM_MAJOR/bin/llvm-config "\$@" | sed 's#/usr/lib/x86_64-linux-gnu/libz3.so#-lz3#g'
SHIM
chmod +x "$PREFIX/bin/llvm-config"
touch "$PREFIX/.tracel-llvm-installed"

# `nccl` too (one process needs no MPI library: the GPU check runs a 1-rank NCCL group; clusters build with
# `--features nccl,mpi`).
cargo build --release -p ytrainer-cli --features cuda,nccl --target-dir target/cuda
mkdir -p dist/cuda
cp target/cuda/release/ytrainer dist/cuda/ytrainer
strip dist/cuda/ytrainer
xz -T0 -6 -f dist/cuda/ytrainer
sha256sum dist/cuda/ytrainer.xz > dist/cuda/ytrainer.xz.sha256
ls -l dist/cuda/
echo "dry run (no GPU here: expect a clean error, not a panic):"
xz -dc dist/cuda/ytrainer.xz > /tmp/ytrainer-cuda && chmod +x /tmp/ytrainer-cuda
/tmp/ytrainer-cuda bench --device cuda --steps 1 || true
echo "dry run of the NCCL transport (expect a clean error naming the missing CUDA driver):"
rm -rf /tmp/ytrainer-cuda-tiny
/tmp/ytrainer-cuda init --data examples/quickstart/train.jsonl --out /tmp/ytrainer-cuda-tiny >/dev/null
YTRAINER_TRANSPORT=nccl /tmp/ytrainer-cuda run --model /tmp/ytrainer-cuda-tiny --data examples/quickstart/train.jsonl \
    --device cuda --max-steps 1 --output-dir /tmp/ytrainer-cuda-nccl --overwrite || true
