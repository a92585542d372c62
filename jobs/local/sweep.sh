#!/usr/bin/env bash
# Run every line of a grid file (jobs/sweeps/*.txt) one after another with jobs/local/run.sh.
#
#   jobs/local/sweep.sh -n N GRID_FILE [--out SWEEP_DIR] [CONFIG.toml] --data SHARD_DIR [flags ...]
#   HPCSGD_DRY_RUN=1 jobs/local/sweep.sh ...      print one mpiexec line per run, run nothing
#
# The config is CONFIG.toml if given, else HPCSGD_CONFIG, else the grid file's `# config: PATH`
# line (relative to the grid file). Each run writes SWEEP_DIR/NAME (default SWEEP_DIR:
# HPCSGD_SWEEP_DIR or runs/<grid file name>), NAME made of its flags exactly as in
# jobs/slurm/sweep.sbatch. Runs with a summary.json are skipped and the rest are started with
# --resume, so running the sweep again after an interruption picks up where it stopped.
# A failed run does not stop the sweep (the exit status is 1 at the end); exit 3 (stopped by
# a signal after a checkpoint) or an interrupt does.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { echo "usage: $0 -n N GRID_FILE [--out SWEEP_DIR] [CONFIG.toml] --data SHARD_DIR [train flags ...]" >&2; exit 2; }
[[ "${1:-}" == -n && $# -ge 3 ]] || usage
ranks="$2"; grid="$3"; shift 3
[[ -f "$grid" ]] || { echo "sweep.sh: grid file $grid not found" >&2; exit 2; }

sweep_dir="${HPCSGD_SWEEP_DIR:-runs/$(basename "$grid" .txt)}"
config="${HPCSGD_CONFIG:-}"
rest=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || usage; sweep_dir="$2"; shift 2 ;;
        --out=*) sweep_dir="${1#--out=}"; shift ;;
        *.toml) if [[ ${#rest[@]} -eq 0 || "${rest[${#rest[@]}-1]}" != --* ]]; then config="$1"; else rest+=("$1"); fi; shift ;;
        *) rest+=("$1"); shift ;;
    esac
done

# The run lines of a grid file, one per line.
grid_lines() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1" || true; }

# The `# config: PATH` line of a grid file, resolved against the grid file's directory.
grid_config() {
    local cfg
    cfg="$(sed -n 's/^#[[:space:]]*config:[[:space:]]*//p' "$1" | head -n 1)"
    cfg="${cfg%"${cfg##*[![:space:]]}"}"
    if [[ -n "$cfg" && "$cfg" != /* ]]; then cfg="$(dirname "$1")/$cfg"; fi
    printf '%s\n' "$cfg"
}

# A directory name made of flags: `--q 2 --fail 3@230` -> q=2_fail=3@230 (same in sweep.sbatch).
run_name() {
    local name="" tok state=start
    for tok in "$@"; do
        if [[ "$tok" == --* ]]; then
            if [[ "$state" == start ]]; then name+="${tok#--}"; else name+="_${tok#--}"; fi
            state=flag
        elif [[ "$state" == flag ]]; then
            name+="=$tok"; state=value
        elif [[ "$state" == start ]]; then
            name+="$tok"; state=value
        else
            name+=",$tok"
        fi
    done
    name="${name//[^A-Za-z0-9._=@,+-]/-}"
    printf '%s\n' "${name:-defaults}"
}

config="${config:-$(grid_config "$grid")}"
# Read all lines first: a launcher reading stdin must not eat the rest of the grid.
lines=()
while IFS= read -r l; do lines+=("$l"); done < <(grid_lines "$grid")
[[ ${#lines[@]} -gt 0 ]] || { echo "sweep.sh: $grid has no run lines" >&2; exit 2; }

failed=()
for i in "${!lines[@]}"; do
    read -r -a flags <<< "${lines[$i]}"
    run_dir="$sweep_dir/$(run_name ${flags[@]+"${flags[@]}"})"
    if [[ -f "$run_dir/summary.json" ]]; then
        echo "sweep.sh: [$i] $run_dir is done, skipping" >&2
        continue
    fi
    args=()
    if [[ -n "$config" ]]; then args+=("$config"); fi
    args+=(--run-dir "$run_dir" --resume ${flags[@]+"${flags[@]}"} ${rest[@]+"${rest[@]}"})
    [[ "${HPCSGD_DRY_RUN:-0}" != 0 ]] || echo "sweep.sh: [$i/${#lines[@]}] $run_dir" >&2
    rc=0
    "$here/run.sh" -n "$ranks" "${args[@]}" < /dev/null || rc=$?
    if (( rc == 3 || rc >= 128 )); then
        echo "sweep.sh: stopped at run $i ($run_dir, exit $rc); run the sweep again to resume" >&2
        exit "$rc"
    elif (( rc != 0 )); then
        echo "sweep.sh: run $i ($run_dir) failed with exit $rc; going on" >&2
        failed+=("$run_dir")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "sweep.sh: ${#failed[@]} run(s) failed: ${failed[*]}" >&2
    exit 1
fi
