#!/usr/bin/env bash
# Fill .whl/ with the wheels that benchmarks/gpu_check.sh installs on an offline CUDA machine that has
# its own torch. Run it here, where pip can reach a package index; the folder then travels with the
# working tree (it is git-ignored; total kept under 60 MiB).
#
#   benchmarks/make_gpu_wheels.sh                 # pure-Python dependencies only (about 6 MiB)
#   benchmarks/make_gpu_wheels.sh --binary 3.11   # also numpy/scipy/safetensors/pyyaml for CPython 3.11
#                                                 # on x86_64 Linux (for a machine that lacks them)
#
# Pure-Python packages are pinned to the versions installed beside $PYTHON (default python3) when it
# has them, so the GPU machine runs what the tests ran here. Every pure-Python wheel is checked to be
# "none-any" (no compiled code), so it installs on any Python >= 3.11 and any platform.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=60

BINARY_PY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BINARY_PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "make_gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

# distributions whose wheels are pure Python (checked below): the package's runtime imports on the
# check's path, and what the test suite / CLI add (jsonargparse and its helpers, pytest)
PURE=(monai einops nibabel pydicom tqdm packaging importlib_resources
      jsonargparse docstring_parser typeshed_client
      pytest pluggy iniconfig pytest-timeout)
# compiled: usually preinstalled beside torch; downloaded only with --binary
BINARY=(numpy scipy safetensors pyyaml)

mkdir -p "$DEST"
pinned() {  # "name==version" when $PY has it installed, else "name"
    "$PY" - "$1" <<'EOF'
import importlib.metadata as md, sys
name = sys.argv[1]
try:
    print(f"{name}=={md.version(name)}")
except md.PackageNotFoundError:
    print(name)
EOF
}

specs=()
for d in "${PURE[@]}"; do specs+=("$(pinned "$d")"); done
echo "downloading pure-Python wheels: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DEST" "${specs[@]}"

if [ -n "$BINARY_PY" ]; then
    echo "downloading binary wheels for CPython $BINARY_PY, x86_64 Linux: ${BINARY[*]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DEST" \
        --python-version "$BINARY_PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        "${BINARY[@]}"
fi

# every wheel of a PURE distribution must be none-any
status=0
for d in "${PURE[@]}"; do
    norm=$(echo "$d" | tr '[:upper:]-' '[:lower:]_')
    found=0
    for w in "$DEST"/*.whl; do
        base=$(basename "$w" | tr '[:upper:]-' '[:lower:]_')
        case "$base" in
            "${norm}"_[0-9]*)
                found=1
                case "$(basename "$w")" in
                    *-none-any.whl) ;;
                    *) echo "not pure Python: $(basename "$w")" >&2; status=1 ;;
                esac ;;
        esac
    done
    [ "$found" = 1 ] || { echo "no wheel for $d" >&2; status=1; }
done

size_kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "make_gpu_wheels.sh: $DEST is over $LIMIT_MIB MiB" >&2
    status=1
fi
exit $status
