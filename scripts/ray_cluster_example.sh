#!/bin/bash
# A Ray cluster for cscvision research batches, by hand (any machines) or inside a SLURM
# allocation. Every node needs the same cscvision installed (pip install "cscvision[ray]")
# and must see the slides and the output folder at the same paths (a shared filesystem).
#
#   on the head node:     scripts/ray_cluster_example.sh head
#   on each worker node:  scripts/ray_cluster_example.sh worker HEAD_HOST
#   then, on the head:    scripts/ray_cluster_example.sh infer SLIDES MODEL_DIR OUT_DIR [flags]
#   at the end:           scripts/ray_cluster_example.sh stop        (on every node)
#
#   inside SLURM:         sbatch --nodes=4 --gres=gpu:4 --exclusive \
#                             scripts/ray_cluster_example.sh slurm SLIDES MODEL_DIR OUT_DIR
#
# cscvision infer --ray auto joins the cluster of the machine it runs on; from a laptop
# use --ray ray://HEAD_HOST:10001 (Ray Client: slides and outputs must still be paths the
# cluster's nodes see). One worker per GPU, or per --ray-cpus CPUs on CPU-only clusters.

set -euo pipefail

PORT=${RAY_PORT:-6379}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# Ray >= 2.5x clusters authenticate with a token (the head writes ~/.ray/auth_token): a
# driver joining by HEAD:PORT needs RAY_AUTH_MODE=token and that token (a shared home
# directory, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN). Older Ray ignores these variables.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

usage() {
    sed -n '2,17p' "$0" >&2
    exit 2
}

case ${1:-} in
head)
    ray start --head --port="${PORT}" --include-dashboard=false
    ;;
worker)
    ray start --address="${2:?worker HEAD_HOST}:${PORT}"
    ;;
infer)
    [[ $# -ge 4 ]] || usage
    shift
    slides=$1 model=$2 out=$3
    shift 3
    cscvision infer "${slides}" --model "${model}" --out "${out}" --ray auto "$@"
    ;;
stop)
    ray stop
    ;;
slurm)
    # One Ray node per SLURM node: the head on the first, workers on the others, then the
    # batch from the head. Runs as the batch script of an allocation.
    [[ $# -ge 4 ]] || usage
    shift
    mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
    head=${nodes[0]}
    srun --nodes=1 --ntasks=1 -w "${head}" ray start --head --port="${PORT}" \
        --include-dashboard=false --block &
    sleep 20
    for node in "${nodes[@]:1}"; do
        srun --nodes=1 --ntasks=1 -w "${node}" ray start --address="${head}:${PORT}" --block &
    done
    sleep 20
    slides=$1 model=$2 out=$3
    shift 3
    status=0
    cscvision infer "${slides}" --model "${model}" --out "${out}" --ray "${head}:${PORT}" \
        "$@" || status=$?
    ray stop || true
    kill $(jobs -p) 2>/dev/null || true
    exit "${status}"
    ;;
*)
    usage
    ;;
esac
