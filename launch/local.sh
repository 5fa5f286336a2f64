#!/usr/bin/env bash
# Simulates an N-host job on this machine: N processes joined over 127.0.0.1 by JAX's
# multi-controller runtime, each with D forced CPU devices (gloo collectives). It runs the same
# code paths as a pod or a cluster: a global mesh over N x D devices, per-process rewards,
# multi-process Orbax checkpoints.
#
#   launch/local.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- MAIN_ARGS...
#
#   -n  processes (simulated hosts), default 2
#   -d  CPU devices per process, default 4
#   -p  coordinator port on 127.0.0.1, default: a free one
#   MAIN_ARGS go to `python -m prdp_jax.main` in every process, e.g.
#     launch/local.sh -n 2 -d 4 -- --config configs/jpeg_tiny.py --workdir runs/local-2x4
#
# Only process 0 logs and writes metrics and images. SIGTERM and SIGINT are forwarded to every
# process (they checkpoint and exit 143); when one process fails the others are stopped. The exit
# status is the first nonzero one (0 when all succeed).
set -euo pipefail

procs=2
devices=4
port=""
while getopts "n:d:p:h" opt; do
  case "$opt" in
    n) procs="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    h) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown option; see $0 -h" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if ! [[ "$procs" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: -n and -d take positive integers, got -n $procs -d $devices" >&2
  exit 2
fi
python=${PYTHON:-python}
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# Each process gets exactly $devices CPU devices, whatever device count the caller's flags had.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
pids=()
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < procs; i++)); do
  JAX_PLATFORMS=cpu \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$procs" JAX_PROCESS_ID="$i" \
  XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices" \
    "$python" -m prdp_jax.main "$@" &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  finished=""
  if wait -n -p finished "${running[@]}"; then code=0; else code=$?; fi
  [ -n "$finished" ] || continue  # a forwarded signal interrupted the wait; keep waiting
  still=()
  for pid in "${running[@]}"; do [ "$pid" = "$finished" ] || still+=("$pid"); done
  running=("${still[@]}")
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    forward TERM
  fi
done
exit "$status"
