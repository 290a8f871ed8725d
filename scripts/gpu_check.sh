#!/usr/bin/env bash
# One command for a fresh GPU machine (no network; python3 with torch and triton there): builds llama-bench with
# CUDA for this GPU's architecture only, writes a GLM-5.2 slice GGUF, runs the GPU tests and `bench hybrid`
# (offload against llama.cpp -ngl 99 -ot exps=CPU -fa on, same file, same threads), and writes every result
# to one file, $OUT/gpu_check.md (logs beside it in $OUT/gpu_check.log). Steps that fail are recorded and the
# rest still run; each has a time limit, so the whole stays under ~8 minutes.
#
# Here (with network), once: pack what the machine lacks into a folder to carry (llama.cpp sources from the
# llama-cpp-python sdist, without models/docs/tests: ~10 MB; the gguf wheel):
#     scripts/gpu_check.sh --pack .gpu          # .gpu is ignored by git (.git/info/exclude)
# There, from the repository root (carry .gpu):
#     bash scripts/gpu_check.sh --carried .gpu --out "$OUT"
# A dry run on a CPU-only machine (no CUDA build; llama-cpp-python is the baseline):
#     scripts/gpu_check.sh --cpu --layers 2 --prefill 128 --tokens 4 --repeat 1 --out /tmp/gpu_check
set -u -o pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
CARRIED=""
SRC=""
PACK=""
LLAMA_BENCH=""
CPU=0
BUILD=1
TESTS=1
LAYERS=8
SMALL=()
EXPERTS=16
PREFILL="512,2048"
TOKENS=32
REPEAT=2
THREADS=""
BUDGET=470  # seconds for the whole run: the benchmark gets what the build and the tests left
PY="${PYTHON:-python3}"
TEST_ARGS="tests/engine/test_cuda.py tests/kernels/gpu tests/gguf/test_dequant_torch.py tests/engine/test_overlap.py::test_overlap_on_a_gpu_is_exact tests/engine/test_streaming.py tests/engine/test_graph_step.py tests/engine/test_graph_segments.py tests/engine/test_graph_decode.py tests/engine/test_mla_sdpa.py tests/engine/test_gpu_slice.py"

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF
options: --out DIR  --carried DIR  --src PATH (llama.cpp source dir or tarball)  --llama-bench BIN (skip the build)
         --cpu (dry run: no CUDA build, device cpu)  --skip-build  --skip-tests  --tests "PYTEST ARGS"
         --layers N (8)  --experts N (16)  --prefill LIST (512,2048)  --tokens N (32)  --repeat N (2)
         --threads N (physical cores)  --small (the slice's small shapes: a quick dry run)
         --budget SECONDS (470: the benchmark gets what is left, at least 90 s)  --pack DIR
EOF
}

die() { echo "gpu_check: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) need "$@"; OUT_DIR="$2"; shift 2 ;;
        --carried) need "$@"; CARRIED="$2"; shift 2 ;;
        --src) need "$@"; SRC="$2"; shift 2 ;;
        --pack) need "$@"; PACK="$2"; shift 2 ;;
        --llama-bench) need "$@"; LLAMA_BENCH="$2"; BUILD=0; shift 2 ;;
        --cpu) CPU=1; BUILD=0; shift ;;
        --skip-build) BUILD=0; shift ;;
        --skip-tests) TESTS=0; shift ;;
        --small) SMALL=(--small); shift ;;
        --budget) need "$@"; posint "$1" "$2"; BUDGET="$2"; shift 2 ;;
        --tests) need "$@"; TEST_ARGS="$2"; shift 2 ;;
        --layers) need "$@"; posint "$1" "$2"; LAYERS="$2"; shift 2 ;;
        --experts) need "$@"; posint "$1" "$2"; EXPERTS="$2"; shift 2 ;;
        --tokens) need "$@"; posint "$1" "$2"; TOKENS="$2"; shift 2 ;;
        --repeat) need "$@"; posint "$1" "$2"; REPEAT="$2"; shift 2 ;;
        --threads) need "$@"; posint "$1" "$2"; THREADS="$2"; shift 2 ;;
        --prefill) need "$@"; [[ "$2" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--prefill takes lengths like 512,2048"
                   PREFILL="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (--help lists them)" ;;
    esac
done

find_sdist() {  # the llama-cpp-python sdist the tests download (offload.tokenizer_fixture)
    ls -t "${XDG_CACHE_HOME:-$HOME/.cache}"/offload-tests/llama_cpp_python-*.tar.gz 2>/dev/null | head -1
}

if [ -n "$PACK" ]; then  # here, with network: what the GPU machine needs and lacks
    mkdir -p "$PACK/wheels" || die "cannot create $PACK"
    sdist="${SRC:-$(find_sdist)}"
    [ -n "$sdist" ] && [ -f "$sdist" ] || die "no llama-cpp-python sdist: run the GGUF tests once, or pass --src"
    tmp="$(mktemp -d)"
    tar xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/*' || die "cannot unpack $sdist"
    lc="$(ls -d "$tmp"/*/vendor/llama.cpp)"
    tar cJf "$PACK/llama-src.tar.xz" -C "$lc" --exclude=./models --exclude=./docs --exclude=./media \
        --exclude=./tests --exclude=./examples --exclude=./pocs --exclude=./benches --exclude=./gguf-py \
        --exclude=./conversion --exclude=./tools/server --exclude=./tools/ui --exclude=./app . || die "tar failed"
    rm -rf "$tmp"
    gv="$("$PY" -P -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))' 2>/dev/null || echo 0.19.0)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$PACK/wheels" "gguf==$gv" || die "pip download failed"
    grep -qx "/$(basename "$PACK")/" "$REPO/.git/info/exclude" 2>/dev/null \
        || echo "/$(basename "$PACK")/" >> "$REPO/.git/info/exclude"
    du -sh "$PACK"/* && echo "carry $PACK: bash scripts/gpu_check.sh --carried $PACK --out \"\$OUT\""
    exit 0
fi

mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
RES="$OUT_DIR/gpu_check.md"
LOG="$OUT_DIR/gpu_check.log"
WORK="${TMPDIR:-/tmp}/offload-gpu-check"
mkdir -p "$WORK"
: > "$LOG"
T0=$(date +%s)
say() { echo "$*" | tee -a "$RES"; }
step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG" >&2; }
{ echo "# gpu_check $(date -u +%FT%TZ)"; echo; echo "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"; } > "$RES"

# --- environment: offload and the carried wheels on PYTHONPATH (no pip install of our own package needed)
SITE="$WORK/site"
rm -rf "$SITE" && mkdir -p "$SITE/offload"
cp -r "$REPO/offload/." "$SITE/offload/"
for pkg in kernels placement gguf; do ln -s "$REPO/$pkg" "$SITE/offload/$pkg"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$CARRIED" ] && ls "$CARRIED"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/wheels" \
        "$CARRIED"/wheels/*.whl >> "$LOG" 2>&1 || say "wheels: install failed (see log)"
    export PYTHONPATH="$PYTHONPATH:$WORK/wheels"
fi
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
THREADS="${THREADS:-$("$PY" -P -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)' 2>/dev/null || nproc)}"
DEVICE=cuda
[ "$CPU" = 1 ] && DEVICE=cpu
{
    echo; echo "## environment"; echo
    "$PY" -P -c 'import sys, torch, offload, gguf; print("python", sys.version.split()[0], "| torch", torch.__version__,
          "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
          "| gguf", __import__("importlib.metadata").metadata.version("gguf"), "| offload from", offload.__file__)' 2>&1 | tail -3
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "threads $THREADS, $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
} >> "$RES" 2>&1
if [ "$DEVICE" = cuda ] && ! "$PY" -P -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    say "torch sees no CUDA GPU: use --cpu for a dry run"
    exit 1
fi

# --- llama-bench, built in the background while the slice is written and the tests run
BUILD_PID=""
if [ "$BUILD" = 1 ]; then
    src="$SRC"
    [ -z "$src" ] && [ -n "$CARRIED" ] && [ -f "$CARRIED/llama-src.tar.xz" ] && src="$CARRIED/llama-src.tar.xz"
    [ -z "$src" ] && src="$(find_sdist)"
    [ -n "$src" ] || die "no llama.cpp sources: --src, --carried (made by --pack) or the cached sdist"
    LSRC="$WORK/llama.cpp"
    if [ -d "$src" ]; then
        LSRC="$src"
    else
        rm -rf "$LSRC" && mkdir -p "$LSRC"
        case "$src" in
            *.tar.xz) tar xJf "$src" -C "$LSRC" ;;
            *) tar xzf "$src" -C "$LSRC" --strip-components=3 --wildcards '*/vendor/llama.cpp/*' ;;
        esac || die "cannot unpack $src"
    fi
    ARCH="$("$PY" -P -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')"
    GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
    # a CUDA made of pip wheels may lack cuBLAS, which ggml-cuda links: take torch's (nvidia/cu13/{lib,include})
    CUBLAS=()
    if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
        roots="$("$PY" -P -c 'import site; print(" ".join(site.getsitepackages()))') ${CUBLAS_ROOTS:-}"
        lib="$(find $roots -name 'libcublas.so*' 2>/dev/null | sort | head -1)"
        lt="$(find $roots -name 'libcublasLt.so*' 2>/dev/null | sort | head -1)"
        inc="$(find $roots -name cublas_v2.h 2>/dev/null | head -1)"
        if [ -n "$lib" ] && [ -n "$lt" ] && [ -n "$inc" ]; then
            inc="$(dirname "$inc")"
            CUBLAS=(-DCUDA_cublas_LIBRARY="$lib" -DCUDA_cublasLt_LIBRARY="$lt" -DCMAKE_CUDA_FLAGS="-I$inc"
                    -DCMAKE_CXX_FLAGS="-I$inc" -DCMAKE_C_FLAGS="-I$inc")
            export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            say ""; say "cuBLAS: not in /usr/local/cuda; using $lib"
        fi
    fi
    # ggml-cuda links the driver (libcuda) for its VMM pool; without an unversioned libcuda.so CMake finds none
    drv="$(ls /usr/local/cuda/lib64/stubs/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so 2>/dev/null | head -1)"
    [ -z "$drv" ] && drv="$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF}'; \
                               ls /usr/local/nvidia/lib64/libcuda.so* 2>/dev/null) | head -1)"
    if [ -n "$drv" ]; then
        CUBLAS+=(-DCUDA_cuda_driver_LIBRARY="$drv")
    else
        CUBLAS+=(-DGGML_CUDA_NO_VMM=ON); say "libcuda: not found; llama.cpp built with GGML_CUDA_NO_VMM"
    fi
    step "building llama-bench (CUDA arch $ARCH) from $src"
    (
        timeout 330 cmake -S "$LSRC" -B "$WORK/build" $GEN -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF \
            -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF "${CUBLAS[@]}" &&
        timeout 330 cmake --build "$WORK/build" --target llama-bench -j "$(nproc)"
    ) > "$WORK/build.log" 2>&1 &
    BUILD_PID=$!
fi

# --- the slice
SLICE="$WORK/glm52-slice-${LAYERS}x${EXPERTS}.gguf"
step "writing $SLICE"
t=$(date +%s)
if timeout 240 "$PY" -P "$REPO/scripts/make_slice_gguf.py" "$SLICE" --layers "$LAYERS" --experts "$EXPERTS" \
        "${SMALL[@]}" >> "$LOG" 2>&1; then
    say ""; say "slice: $(basename "$SLICE"), $(du -h "$SLICE" | cut -f1), written in $(( $(date +%s) - t )) s"
else
    say "slice: FAILED (see log)"; SLICE=""
fi

# --- the GPU tests (beside the build: they time nothing)
if [ "$TESTS" = 1 ]; then
    step "pytest $TEST_ARGS"
    # -v: each test's outcome as it ends, so a run cut by the time limit still names what failed before the cut
    (cd "$REPO" && timeout 270 "$PY" -P -m pytest -v --tb=short -rfEsx -p no:cacheprovider $TEST_ARGS) \
        > "$WORK/tests.log" 2>&1
    rc=$?
    # the summary lines (triton's nanobind prints leak notes after pytest's own last line)
    { echo; echo "## tests (exit $rc): pytest $TEST_ARGS"; echo; echo '```'
      if [ "$rc" = 124 ]; then
          echo "timed out after 270 s: the tests after the last one below did not run"
          grep -E " (PASSED|FAILED|ERROR|SKIPPED|XFAIL)" "$WORK/tests.log" | grep -vE " (PASSED|SKIPPED)" | tail -30
          grep -E " (PASSED|FAILED|ERROR|SKIPPED|XFAIL)" "$WORK/tests.log" | tail -1
      fi
      grep -E "^(FAILED|ERROR|XFAIL|SKIPPED)|[0-9]+ (passed|failed|skipped|error)" "$WORK/tests.log" | tail -40
      echo '```'; } >> "$RES"
    tail -n 3000 "$WORK/tests.log" >> "$LOG"
fi

# --- wait for llama-bench
if [ -n "$BUILD_PID" ]; then
    step "waiting for the llama-bench build"
    if wait "$BUILD_PID" && [ -x "$WORK/build/bin/llama-bench" ]; then
        LLAMA_BENCH="$WORK/build/bin/llama-bench"
        say ""; say "llama-bench: built in $(( $(date +%s) - T0 )) s since start"
    else
        say ""; say "llama-bench: build FAILED; the last lines:"; { echo '```'; tail -15 "$WORK/build.log"; echo '```'; } >> "$RES"
    fi
    tail -n 2000 "$WORK/build.log" >> "$LOG"  # $OUT takes files up to 16 MiB
fi

# --- the benchmark (alone on the machine: nothing else runs now)
if [ -n "$SLICE" ]; then
    args=("$SLICE" --device "$DEVICE" --threads "$THREADS" --prefill "$PREFILL" --tokens "$TOKENS" --repeat "$REPEAT"
          --calibrate --json "$OUT_DIR/bench_hybrid.json")
    [ -n "$LLAMA_BENCH" ] && args+=(--llama-bench "$LLAMA_BENCH")
    [ -z "$LLAMA_BENCH" ] && [ "$DEVICE" = cuda ] && args+=(--no-baseline)
    left=$(( BUDGET - ($(date +%s) - T0) )); [ "$left" -lt 90 ] && left=90
    step "bench hybrid ${args[*]} (limit $left s)"
    echo >> "$RES"
    if ! timeout "$left" "$PY" -P -c 'import sys; from offload.bench_hybrid import main; main(sys.argv[1:])' "${args[@]}" \
            > "$WORK/bench.log" 2> "$WORK/bench.err"; then
        say "bench hybrid: FAILED or timed out; its last words:"; tail -5 "$WORK/bench.err" >> "$RES"
    fi
    cat "$WORK/bench.log" >> "$RES"
    grep "^bench hybrid:" "$WORK/bench.err" >> "$RES"  # the parts that failed while the rest ran
    cat "$WORK/bench.err" >> "$LOG"
    echo >> "$RES"; echo "command: offload bench hybrid ${args[*]}" >> "$RES"
fi
say ""; say "total $(( $(date +%s) - T0 )) s"
step "done: $RES"
