#!/usr/bin/env bash
# The first thing to run on a machine with an NVIDIA GPU: the agent's NVML backend against the
# real driver. Prints the driver's view (nvidia-smi), the agent's inventory, the event loop's
# registrations, a minute of 1 Hz samples and a validation of every GPU, then the agent binary's
# footprint on the NVML path (8 GPUs or however many the node has, 1 Hz). Every step has a timeout.
#
#   scripts/gpu-smoke.sh [seconds]          # real driver (default 60 s of samples)
#   scripts/gpu-smoke.sh --mock [seconds]   # the same against the stand-in library: checks the
#                                           # script itself on a machine without a GPU
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mock=0
if [[ "${1:-}" == "--mock" ]]; then
  mock=1
  shift
fi
seconds="${1:-60}"
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "gpu-smoke: seconds: expected a number, got $seconds" >&2; exit 2; }

target="$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
echo "=== building (target dir $target)"
timeout 1800 cargo build -q -p flotilla-agent -p flotilla-nvml-mock --bins --examples --lib

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
if ((mock)); then
  mkdir -p "$scratch/lib" "$scratch/control"
  ln -s "$target/debug/libflotilla_nvml_mock.so" "$scratch/lib/libnvidia-ml.so.1"
  printf 'gpus 8\nmodel H100\n' >"$scratch/control/config"
  : >"$scratch/control/commands"
  export LD_LIBRARY_PATH="$scratch/lib" FLOTILLA_NVML_MOCK_DIR="$scratch/control"
  # Half-way through, an XID 79 on GPU 2: the run must show it as an event.
  (sleep $((seconds / 2 + 3)); echo "xid 2 79" >>"$scratch/control/commands") &
  echo "=== stand-in NVML library (flotilla-nvml-mock), 8 H100s"
else
  echo "=== driver"
  if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,driver_version,temperature.gpu,power.draw,ecc.errors.uncorrected.volatile.total --format=csv || true
    timeout 30 nvidia-smi topo -m || true
  else
    echo "nvidia-smi not found; NVML may still load"
  fi
  ldconfig -p | grep -F libnvidia-ml.so.1 || echo "libnvidia-ml.so.1 is not in the loader cache"
fi

echo "=== NVML backend: inventory, event registration, ${seconds} s of samples, validation"
timeout $((seconds + 120)) "$target/debug/examples/nvml_smoke" "$seconds"

echo "=== agent footprint on the NVML path (30 s)"
if ((mock)); then
  unset LD_LIBRARY_PATH FLOTILLA_NVML_MOCK_DIR
  timeout 180 "$target/debug/examples/footprint" 30 nvml
else
  timeout 180 "$target/debug/examples/footprint" 30 nvml-driver
fi
echo "=== gpu-smoke: done"
