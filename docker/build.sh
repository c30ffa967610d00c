#!/bin/sh
# The one release build of the runner. docker/Dockerfile runs it inside the image build and
# tests/release_build.rs runs it in CI, so the binary CI checks is built exactly like the one
# that ships. The profile is the workspace's [profile.release] (Cargo.toml): fat LTO, one codegen
# unit, stripped, panic=abort; --locked builds what Cargo.lock says or fails.
#
#   sh docker/build.sh OUT_DIR      build, then copy the binary to OUT_DIR/runner
set -eu
if [ "$#" -ne 1 ]; then
  echo "usage: sh docker/build.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
cargo build --release --locked --bin runner
cp "${CARGO_TARGET_DIR:-target}/release/runner" "$out/runner"
"$out/runner" --version
