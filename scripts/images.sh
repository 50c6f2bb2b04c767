#!/usr/bin/env bash
# Builds Flotilla's container images (operator; agent with flotilla-worker; the test node's pause
# image) as OCI archives from the workspace's binaries, without Docker or a registry, and
# optionally imports them into a containerd. The image contents and configuration are described
# in scripts/oci_image.py; deploy/docker/*.Dockerfile are the same images for users with Docker.
#
#   scripts/images.sh                       # cargo build (debug), then the archives
#   scripts/images.sh --release             # from release binaries
#   scripts/images.sh --bin-dir DIR         # from binaries already built in DIR (no cargo)
#   scripts/images.sh --import SOCKET       # and import them into the containerd at SOCKET
#
# Archives go to --out (default ${FLOTILLA_CACHE_DIR:-~/.cache/flotilla}/images). The last lines of
# stdout are "REF ARCHIVE LAYER-BYTES", one per image.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cache_root="${FLOTILLA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
profile=debug
bin_dir=""
out="$cache_root/images"
socket=""
while (($#)); do
  case "$1" in
    --release) profile=release; shift ;;
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --import) socket="${2:?--import needs a containerd socket}"; shift 2 ;;
    *) echo "images.sh: unknown argument $1 (expected --release, --bin-dir DIR, --out DIR, --import SOCKET)" >&2; exit 2 ;;
  esac
done

start=$SECONDS
if [[ -z "$bin_dir" ]]; then
  flags=()
  [[ $profile == release ]] && flags+=(--release)
  cargo build --quiet "${flags[@]}" --bin flotilla-operator --bin flotilla-agent --bin flotilla-worker
  bin_dir="${CARGO_TARGET_DIR:-target}/$profile"
fi
pause="$(bash tests/controlplane/build.sh)/pause"

built="$(python3 scripts/oci_image.py --bin-dir "$bin_dir" --pause "$pause" --out "$out")"
echo "images.sh: built in $((SECONDS - start))s" >&2
if [[ -n "$socket" ]]; then
  while read -r ref archive _size; do
    ctr --address "$socket" --namespace k8s.io images import "$archive" >/dev/null
    echo "images.sh: imported $ref" >&2
  done <<<"$built"
fi
echo "$built"
