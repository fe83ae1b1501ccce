#!/usr/bin/env bash
# Build the ballast:dev container image (see Dockerfile).
#
#   scripts/build-image.sh [TAG]        # default tag: ballast:dev
#
# 1. Builds statically linked ballastd and ballast on the host (glibc, crt-static):
#      RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
#        cargo build --release --target x86_64-unknown-linux-gnu --bins
#    `--target` keeps RUSTFLAGS off build scripts and proc-macros, and puts the
#    binaries in target/x86_64-unknown-linux-gnu/release/. relocation-model=static
#    makes a plain static executable rather than a static-pie (both run anywhere;
#    this one is what `ldd` calls "not a dynamic executable").
# 2. Checks that both binaries are static and run.
# 3. `docker build` FROM scratch with only those two files in the context.
#
# Honours CARGO_TARGET_DIR; set BALLAST_SKIP_CARGO=1 to reuse binaries already built.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-ballast:dev}
triple=x86_64-unknown-linux-gnu
cd "$root"

target_dir=${CARGO_TARGET_DIR:-$root/target}
case "$target_dir" in /*) ;; *) target_dir=$root/$target_dir ;; esac
bin_dir=$target_dir/$triple/release

if [ "${BALLAST_SKIP_CARGO:-0}" != 1 ]; then
  echo "==> building static ballastd and ballast ($bin_dir)" >&2
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static" \
    cargo build --release --target "$triple" --bins \
    -p ballast-server -p ballast-client
fi

for b in ballastd ballast; do
  f=$bin_dir/$b
  [ -x "$f" ] || { echo "error: $f was not built" >&2; exit 1; }
  out=$(ldd "$f" 2>&1 || true)
  case "$out" in
    *"not a dynamic executable"*|*"statically linked"*) ;;
    *) echo "error: $f is not statically linked: $out" >&2; exit 1 ;;
  esac
  "$f" --version >/dev/null || { echo "error: $f --version failed" >&2; exit 1; }
done

command -v docker >/dev/null || { echo "error: docker is not installed (apt-get install docker.io)" >&2; exit 1; }

# The Dockerfile COPYs target/$triple/release/{ballastd,ballast} from the build
# context. Stage just those two files (debug info stripped: the release profile
# keeps it, the image does not need it) with the .dockerignore; `docker build .`
# from the repository root works too, the .dockerignore keeping everything else out.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/target/$triple/release"
for b in ballastd ballast; do
  if command -v strip >/dev/null; then
    strip --strip-debug -o "$ctx/target/$triple/release/$b" "$bin_dir/$b"
  else
    cp "$bin_dir/$b" "$ctx/target/$triple/release/$b"
  fi
done
cp "$root/.dockerignore" "$ctx/"

echo "==> docker build -t $tag" >&2
DOCKER_BUILDKIT=0 docker build -q -t "$tag" -f "$root/Dockerfile" "$ctx" >/dev/null
docker image inspect -f '{{.Id}} {{.Size}}' "$tag" | awk -v t="$tag" '{printf "built %s (%s, %.1f MiB)\n", t, $1, $2/1048576}'
