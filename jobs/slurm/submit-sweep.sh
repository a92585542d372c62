#!/usr/bin/env bash
# Submit a grid file as a Slurm job array of jobs/slurm/sweep.sbatch, one array task per run
# line (blank lines and # comments do not count).
#
#   jobs/slurm/submit-sweep.sh GRID_FILE [extra train flags ...]
#   HPCSGD_MAX_PARALLEL=4 ...       at most 4 array tasks at once (sbatch --array=0-N%4)
#   HPCSGD_SBATCH_ARGS="--time=02:00:00 --partition=gpu"   more sbatch options
#   HPCSGD_DRY_RUN=1 ...            print the sbatch line, submit nothing
# The HPCSGD_* variables sweep.sbatch reads (HPCSGD_DATA, HPCSGD_SWEEP_DIR, HPCSGD_CONFIG,
# HPCSGD_PYTHON) pass through: sbatch exports the submitting environment by default.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 GRID_FILE [extra train flags ...]" >&2
    exit 2
fi
grid="$1"; shift
[[ -f "$grid" ]] || { echo "submit-sweep.sh: grid file $grid not found" >&2; exit 2; }
n="$(grep -c -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$grid" || true)"
(( n > 0 )) || { echo "submit-sweep.sh: $grid has no run lines" >&2; exit 2; }
array="0-$(( n - 1 ))${HPCSGD_MAX_PARALLEL:+%$HPCSGD_MAX_PARALLEL}"
read -r -a extra <<< "${HPCSGD_SBATCH_ARGS:-}"
cmd=(sbatch "--array=$array" "${extra[@]}" "$here/sweep.sbatch" "$grid" "$@")
if [[ "${HPCSGD_DRY_RUN:-0}" != 0 ]]; then
    printf -v line '%q ' "${cmd[@]}"
    printf '%s\n' "${line% }"
    exit 0
fi
exec "${cmd[@]}"
