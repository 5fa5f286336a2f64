#!/usr/bin/env bash
# Runs prdp-jax on every worker of a Cloud TPU pod slice (one process per host; JAX finds the
# other workers by itself on Cloud TPU, so nothing else is configured).
#
#   launch/tpu_pod.sh -t TPU_NAME -z ZONE [-p PROJECT] [-s] [-d REMOTE_DIR] -- MAIN_ARGS...
#
#   -t  TPU VM name (gcloud compute tpus tpu-vm create ...)
#   -z  its zone, e.g. us-central2-b
#   -p  GCP project (default: gcloud's configured one)
#   -s  setup first: copy this checkout to every worker and pip-install it with jax[tpu]
#   -d  the checkout's folder on the workers, default ~/prdp-jax
#   MAIN_ARGS go to `python -m prdp_jax.main` on every worker. Paths (model.path, reward
#   checkpoints, --workdir) must exist on every worker: a shared filesystem (Filestore, gcsfuse)
#   for the workdir, so that all workers write one Orbax checkpoint. E.g.
#     launch/tpu_pod.sh -t prdp-v4-32 -z us-central2-b -s -- --config configs/sd.py:large_hpsv2 \
#       --config.model.path=/mnt/models/stable-diffusion-v1-4 --workdir /mnt/runs/large-hpsv2
#
# Process 0 (worker 0) prints the log. Preemption or maintenance sends SIGTERM: the run saves
# its last finished epoch and exits 143; rerunning this command (without -s) resumes it.
set -euo pipefail

tpu="" zone="" project="" setup=0 remote="~/prdp-jax"
while getopts "t:z:p:sd:h" opt; do
  case "$opt" in
    t) tpu="$OPTARG" ;;
    z) zone="$OPTARG" ;;
    p) project="$OPTARG" ;;
    s) setup=1 ;;
    d) remote="$OPTARG" ;;
    h) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: unknown option; see $0 -h" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if [ -z "$tpu" ] || [ -z "$zone" ]; then
  echo "error: -t TPU_NAME and -z ZONE are required; see $0 -h" >&2
  exit 2
fi
command -v gcloud >/dev/null || { echo "error: gcloud is not installed or not on PATH" >&2; exit 2; }
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" ${project:+--project "$project"})
here="$(cd "$(dirname "$0")/.." && pwd)"
jax_version=$(sed -nE 's/.*"jax==([0-9.]+)".*/\1/p' "$here/setup.py")

if [ "$setup" = 1 ]; then
  archive=$(mktemp /tmp/prdp-jax-XXXXXX.tar.gz)
  git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  "${gc[@]}" scp "$archive" "$tpu:/tmp/prdp-jax.tar.gz" --worker=all "${where[@]}"
  rm -f "$archive"
  "${gc[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "
    set -e; mkdir -p $remote && tar -xzf /tmp/prdp-jax.tar.gz -C $remote && cd $remote &&
    python3 -m pip install --quiet -e . 'jax[tpu]==$jax_version'"
fi

args=$(printf ' %q' "$@")
# One process per worker; each exits with its own status, and ssh reports the first failure.
"${gc[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "cd $remote && python3 -m prdp_jax.main$args"
