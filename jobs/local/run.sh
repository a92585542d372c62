#!/usr/bin/env bash
# Run `hpcsgd train` on this workstation with plain mpiexec/mpirun, one rank per process.
#
#   jobs/local/run.sh -n N [CONFIG.toml] --data SHARD_DIR --run-dir RUN_DIR [train flags ...]
#   HPCSGD_DRY_RUN=1 jobs/local/run.sh -n 4 ...     print the mpiexec line, run nothing
#
# Everything after `-n N` goes to `hpcsgd train` unchanged. Environment:
#   HPCSGD_PYTHON       python with hpcsgd's dependencies (default: the checkout's .venv, else python)
#   HPCSGD_MPIEXEC      launcher (default: the mpiexec beside that python, which matches its
#                       mpi4py, e.g. the mpich wheel's; else mpiexec on PATH)
#   HPCSGD_MPI_FLAVOR   openmpi | mpich | other: skip the `mpiexec --version` detection
#   HPCSGD_BIND         core | none: pin ranks to cores (default: Open MPI pins when every rank
#                       gets one core of its own; MPICH does not pin)
#   HPCSGD_MPIEXEC_ARGS more launcher flags, e.g. "--hostfile hosts" (split on spaces)
#   OMP_NUM_THREADS     threads per rank (default: cores / ranks, at least 1)
# The checkout is put first on PYTHONPATH, so it runs without `pip install`.
# SIGUSR1 or SIGTERM to this script (it execs the launcher, which passes them on) makes hpcsgd
# checkpoint and exit 3; run it again with --resume to continue.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

usage() { echo "usage: $0 -n N [CONFIG.toml] --data SHARD_DIR --run-dir RUN_DIR [train flags ...]" >&2; exit 2; }
ranks=""
case "${1:-}" in
    -n|--n|-np) ranks="${2:-}"; shift 2 || usage ;;
    -n[0-9]*) ranks="${1#-n}"; shift ;;
    *) usage ;;
esac
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || usage

python="${HPCSGD_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python; fi
fi
mpiexec="${HPCSGD_MPIEXEC:-}"
if [[ -z "$mpiexec" ]]; then
    pybin="$(command -v "$python" || true)"
    if [[ -n "$pybin" && -x "$(dirname "$pybin")/mpiexec" ]]; then
        mpiexec="$(dirname "$pybin")/mpiexec"
    else
        mpiexec=mpiexec
    fi
fi

cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( cores / ranks > 0 ? cores / ranks : 1 ))
fi
export OMP_NUM_THREADS
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

flavor="${HPCSGD_MPI_FLAVOR:-}"
version=""
if [[ -z "$flavor" ]]; then
    version="$("$mpiexec" --version 2>&1 || true)"
    case "$version" in
        *"Open MPI"*|*OpenRTE*|*"Open RTE"*) flavor=openmpi ;;
        *HYDRA*|*MPICH*|*"Intel(R) MPI"*) flavor=mpich ;;
        *) flavor=other ;;
    esac
fi

# Each rank gets a core of its own only if ranks * threads fit on the machine.
fits=0
if (( ranks * OMP_NUM_THREADS <= cores )); then fits=1; fi
flags=()
case "$flavor" in
    openmpi)
        if (( ranks > cores )); then
            # Open MPI refuses more ranks than cores unless told; 5.x spells it as a map-by modifier.
            if [[ "$version" =~ \ ([0-9]+)\.[0-9]+ ]] && (( BASH_REMATCH[1] >= 5 )); then
                flags+=(--map-by :OVERSUBSCRIBE)
            else
                flags+=(--oversubscribe)
            fi
        fi
        bind="${HPCSGD_BIND:-}"
        if [[ -z "$bind" ]]; then
            if (( fits && OMP_NUM_THREADS == 1 )); then bind=core; else bind=none; fi
        fi
        flags+=(--bind-to "$bind")
        # Open MPI does not forward the environment to remote ranks by itself.
        flags+=(-x OMP_NUM_THREADS -x PYTHONPATH)
        if [[ "$(id -u)" == 0 ]]; then flags+=(--allow-run-as-root); fi  # containers
        ;;
    mpich)
        # Hydra oversubscribes freely and passes the whole environment; -genv makes the two
        # variables that matter explicit (and reach ssh-launched ranks). Pinning is optional.
        if [[ "${HPCSGD_BIND:-none}" == core ]]; then flags+=(-bind-to core); fi
        flags+=(-genv OMP_NUM_THREADS "$OMP_NUM_THREADS" -genv PYTHONPATH "$PYTHONPATH")
        ;;
esac
if [[ -n "${HPCSGD_MPIEXEC_ARGS:-}" ]]; then
    read -r -a more <<< "$HPCSGD_MPIEXEC_ARGS"
    flags+=("${more[@]}")
fi

cmd=("$mpiexec" ${flags[@]+"${flags[@]}"} -n "$ranks" "$python" -m mpi4py -m hpcsgd train "$@")
if [[ "${HPCSGD_DRY_RUN:-0}" != 0 ]]; then
    printf -v line '%q ' "${cmd[@]}"
    printf '%s\n' "${line% }"
    exit 0
fi
exec "${cmd[@]}"
