#!/usr/bin/env bash
# GPU check for a lent, offline CUDA machine that has its own torch (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh                        # full check on cuda, <= 8 minutes
#   benchmarks/gpu_check.sh --tests                # then the device tests with VOXDIFF_TEST_DEVICE=cuda
#   benchmarks/gpu_check.sh --tests --demo         # then `voxdiff demo` in the time left (--demo=BUDGET: another
#                                                  # budget, e.g. --demo=tiny for a dry run); step seconds printed
#   benchmarks/gpu_check.sh --device cpu --quick   # dry run anywhere (tiny sizes)
#
# The repository goes on PYTHONPATH; Python packages this machine lacks are installed from the wheels
# in .whl/ (benchmarks/make_gpu_wheels.sh makes them) into .whl/site with --no-index --no-deps:
# nothing is fetched and nothing of the machine's own environment (torch, numpy, ...) is replaced.
# Environment: PYTHON (default python3), WHEEL_DIR (.whl), GPU_CHECK_TIMEOUT (seconds, 480).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHL=${WHEEL_DIR:-.whl}
SITE="$WHL/site"
LIMIT=${GPU_CHECK_TIMEOUT:-480}
export PYTHONPATH="$ROOT:$ROOT/$SITE${PYTHONPATH:+:$PYTHONPATH}"

RUN_TESTS=0
DEMO=""
ARGS=()
for a in "$@"; do
    case "$a" in
        --tests) RUN_TESTS=1 ;;
        --demo) DEMO=cpu-small ;;
        --demo=*) DEMO=${a#--demo=} ;;
        *) ARGS+=("$a") ;;
    esac
done
case " ${ARGS[*]-} " in
    *" --device "*) ;;
    *) ARGS=(--device cuda "${ARGS[@]+"${ARGS[@]}"}") ;;
esac

# import name -> distribution (wheel file prefix); required for the check, then for the tests / CLI
REQUIRED="numpy:numpy scipy:scipy safetensors:safetensors yaml:pyyaml monai:monai einops:einops
nibabel:nibabel pydicom:pydicom tqdm:tqdm packaging:packaging"
OPTIONAL="jsonargparse:jsonargparse docstring_parser:docstring_parser typeshed_client:typeshed_client
importlib_resources:importlib_resources pytest:pytest pluggy:pluggy iniconfig:iniconfig pytest_timeout:pytest_timeout"

"$PY" -c "import torch" 2>/dev/null || { echo "gpu_check.sh: $PY has no torch" >&2; exit 3; }

missing_of() {  # the "module:dist" pairs of $1 that $PY cannot import
    for pair in $1; do
        "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${pair%%:*}') is None)" \
            2>/dev/null || echo "$pair"
    done
}

install_wheels() {  # install the wheels of the given "module:dist" pairs; prints (stdout) the dists without one
    local wheels=() none=()
    for pair in "$@"; do
        local dist=${pair#*:} w=""
        for f in "$WHL"/*.whl; do
            [ -e "$f" ] || continue
            local base
            base=$(basename "$f" | tr '[:upper:]-' '[:lower:]_')
            case "$base" in "${dist}"_[0-9]*) w=$f ;; esac
        done
        if [ -n "$w" ]; then wheels+=("$w"); else none+=("$dist"); fi
    done
    if [ ${#wheels[@]} -gt 0 ]; then
        mkdir -p "$SITE"
        echo "installing into $SITE: $(for w in "${wheels[@]}"; do basename "$w"; done | tr '\n' ' ')" >&2
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install -q --upgrade --no-index --no-deps --disable-pip-version-check --target "$SITE" "${wheels[@]}" >&2
        else  # no pip: a wheel is a zip laid out for site-packages
            for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE" >&2; done
        fi
    fi
    echo "${none[*]-}"
}

mapfile -t need < <(missing_of "$REQUIRED")
if [ ${#need[@]} -gt 0 ]; then
    left=$(install_wheels "${need[@]}" | tail -n 1)
    if [ -n "$left" ]; then
        echo "gpu_check.sh: missing Python packages with no wheel in $WHL: $left" >&2
        echo "  (run benchmarks/make_gpu_wheels.sh [--binary PYVER] where an index is reachable)" >&2
        exit 3
    fi
fi
mapfile -t opt < <(missing_of "$OPTIONAL")
if [ ${#opt[@]} -gt 0 ]; then
    left=$(install_wheels "${opt[@]}" | tail -n 1)
    [ -z "$left" ] || echo "gpu_check.sh: note: no wheel for $left (needed by the tests / CLI only)"
fi

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$(date +%s)
rc=0
timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" benchmarks/gpu_check.py "${ARGS[@]}" || rc=$?
if [ "$RUN_TESTS" = 1 ] && [ $rc -eq 0 ]; then
    left=$((LIMIT - ($(date +%s) - start)))
    dev=cuda
    for ((i = 0; i < ${#ARGS[@]}; i++)); do [ "${ARGS[$i]}" = "--device" ] && dev=${ARGS[$((i + 1))]}; done
    echo "device tests (VOXDIFF_TEST_DEVICE=$dev, ${left}s left)"
    if [ "$left" -gt 30 ]; then
        VOXDIFF_TEST_DEVICE=$dev timeout "$left" "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m device tests || rc=$?
    else
        echo "gpu_check.sh: no time left for the tests" >&2
    fi
fi
if [ -n "$DEMO" ] && [ $rc -eq 0 ]; then
    left=$((LIMIT - ($(date +%s) - start)))
    out=${DEMO_OUT:-$(mktemp -d)/demo}
    echo "voxdiff demo --budget $DEMO --jobs 1 --out $out (${left}s left)"
    if [ "$left" -gt 30 ]; then
        # one process (what auto gives with a GPU; on a CPU dry run too, so the step seconds below are comparable)
        timeout "$left" "$PY" -m voxdiff.cli demo --budget "$DEMO" --jobs 1 --out "$out" || rc=$?
        # each step's own seconds, also when the demo stopped early
        "$PY" -c 'import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for p in sorted(out.rglob("result.json")):
    try:
        print("  %s: %.1f s" % (p.parent.relative_to(out), float(json.loads(p.read_text()).get("seconds") or 0)))
    except (ValueError, OSError):
        pass' "$out"
    else
        echo "gpu_check.sh: no time left for the demo" >&2
    fi
fi
exit $rc
