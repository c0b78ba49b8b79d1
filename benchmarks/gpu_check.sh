#!/usr/bin/env bash
# GPU check for moai-sdk on one CUDA machine without network access (about 6-7 minutes on one H100).
#
#   benchmarks/gpu_check.sh OUT_DIR [--wheels DIR] [--python PY] [--quick]
#
#   OUT_DIR        where everything is written (created): env.txt, imports.txt, cuda-tests.log / .xml,
#                  bench-7b.log, 7b-cuda.json, summary.txt
#   --wheels DIR   first install the project's dependencies from local wheel files (pip --no-index); put the
#                  torchao wheel there too (pip download --no-deps torchao==0.18.0) for the int4 mode
#   --python PY    interpreter to use (default: python3)
#   --quick        smaller benchmark (batch sizes 1 and 4, 2 repeats, nf4, int4 and nf4-lora, experts in each)
#   --no-tests     skip the CUDA tests (benchmark only)
#   --budget S     total seconds for the whole script (default 460); the benchmark gets what is left
#
# Steps: report the environment; check the imports (and say what is missing and how to install it);
# optionally install wheels; make the package importable (editable install without dependencies, else
# PYTHONPATH=src); run the tests marked `cuda`; run the MoAI-7B-shape benchmark (random weights, experts
# with their real architectures) in nf4, int4 (torchao, when installed), nf4-lora, float16 and "official"
# quantization, the default mode decoding through CUDA graphs (generate(cuda_graphs=True)); int4's decode speed
# is reported against nf4's from the same run. Each step has its own time
# limit, a failing step does not stop the others, and the exit status is non-zero if any step failed.
set -u

usage() { sed -n '2,13p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS=""; PY=python3; QUICK=0; TOTAL=460; NO_TESTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --budget) TOTAL=$2; shift 2 ;;
    --no-tests) NO_TESTS=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1"; usage ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS=0
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# ---------------------------------------------------------------------------------------------- environment
{
  echo "date: $(date -u)"; echo "repo: $REPO"; echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "python: $($PY --version 2>&1) at $(command -v "$PY")"
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "--- pip list"; $PY -m pip list 2>/dev/null || echo "pip not available"
} > "$OUT/env.txt" 2>&1
log "environment written to env.txt"

# ---------------------------------------------------------------------------------------------- wheels
if [ -n "$WHEELS" ]; then
  log "installing dependencies from $WHEELS (no index)"
  if timeout 240 $PY -m pip install --no-index --find-links "$WHEELS" \
      "transformers>=4.45" safetensors huggingface-hub "pydantic>=2.5,<3" pillow numpy sentencepiece tqdm \
      tokenizers scipy bitsandbytes accelerate pytest >> "$OUT/install.log" 2>&1; then
    log "core wheels installed"
  else
    log "WARNING: some wheels did not install (see install.log); continuing with what is there"
  fi
  # optional extras: OCR expert and OpenCV (PSGTR's reference resize)
  timeout 120 $PY -m pip install --no-index --find-links "$WHEELS" rapidocr-onnxruntime opencv-python-headless \
    >> "$OUT/install.log" 2>&1 || log "note: OCR / OpenCV wheels not installed (optional)"
  # int4 quantization: torchao (no dependencies; it never replaces the installed torch)
  timeout 120 $PY -m pip install --no-index --find-links "$WHEELS" "torchao>=0.18" \
    >> "$OUT/install.log" 2>&1 || log "note: torchao wheel not installed (optional; the int4 mode is skipped)"
fi

# ---------------------------------------------------------------------------------------------- package
if timeout 120 $PY -m pip install --no-deps --no-build-isolation -e "$REPO" >> "$OUT/install.log" 2>&1; then
  log "moai-sdk installed in editable mode (no dependencies)"
else
  export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  log "editable install failed (see install.log); using PYTHONPATH=$REPO/src"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # for `benchmarks`

# ---------------------------------------------------------------------------------------------- imports
$PY - > "$OUT/imports.txt" 2>&1 <<'EOF'
import importlib
required = {
    "torch": "pip install torch (a CUDA build)",
    "transformers": "pip install 'transformers>=4.45'",
    "safetensors": "pip install safetensors",
    "huggingface_hub": "pip install huggingface-hub",
    "pydantic": "pip install 'pydantic>=2.5,<3'",
    "PIL": "pip install pillow",
    "numpy": "pip install numpy",
    "sentencepiece": "pip install sentencepiece",
    "tqdm": "pip install tqdm",
    "tokenizers": "pip install tokenizers",
    "pytest": "pip install pytest",
    "moai_sdk": "pip install --no-deps -e . (or PYTHONPATH=src)",
}
optional = {
    "bitsandbytes": "nf4 / int8 / official quantization: pip install 'moai-sdk[quant]'",
    "accelerate": "quantization helpers: pip install accelerate",
    "torchao": "int4 quantization (tinygemm kernel): pip install 'moai-sdk[int4]'",
    "scipy": "OWLv2's reference (PIL) image processor; without it the benchmark uses the torchvision one",
    "torchvision": "torchvision image processors and the official resize",
    "rapidocr_onnxruntime": "OCR expert: pip install 'moai-sdk[ocr]'",
    "cv2": "PSGTR's reference resize: pip install opencv-python-headless",
}
missing = []
for table, kind in ((required, "REQUIRED"), (optional, "optional")):
    for name, how in table.items():
        try:
            mod = importlib.import_module(name)
            print(f"ok       {name} {getattr(mod, '__version__', '')}")
        except Exception as exc:  # report every failure mode (missing, broken build, missing shared library)
            print(f"MISSING  {name} ({kind}): {type(exc).__name__}: {exc} -> {how}")
            if kind == "REQUIRED":
                missing.append(name)
import torch
print("cuda available:", torch.cuda.is_available(), "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      "| torch cuda:", torch.version.cuda)
raise SystemExit(1 if missing or not torch.cuda.is_available() else 0)
EOF
IMPORTS_OK=$?
cat "$OUT/imports.txt" | tee -a "$OUT/summary.txt"
if [ $IMPORTS_OK -ne 0 ]; then
  log "FAILED: required imports missing or no CUDA (see above); install them, e.g. with --wheels DIR"
  exit 1
fi
HAVE_BNB=1; grep -q "^MISSING  bitsandbytes" "$OUT/imports.txt" && HAVE_BNB=0
HAVE_TORCHAO=1; grep -q "^MISSING  torchao" "$OUT/imports.txt" && HAVE_TORCHAO=0

# ---------------------------------------------------------------------------------------------- CUDA tests
CUDA_TESTS=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')
if [ $NO_TESTS -eq 1 ]; then
  log "CUDA tests skipped (--no-tests)"
else
log "running the tests marked cuda in: $CUDA_TESTS"
CUDA_LIMIT=$(( TOTAL / 3 )); [ $CUDA_LIMIT -gt 150 ] && CUDA_LIMIT=150
timeout $CUDA_LIMIT $PY -m pytest -m cuda $CUDA_TESTS -q -p no:cacheprovider -rs \
  --junitxml "$OUT/cuda-tests.xml" > "$OUT/cuda-tests.log" 2>&1
RC=$?
tail -n 15 "$OUT/cuda-tests.log" | tee -a "$OUT/summary.txt"
if [ $RC -eq 124 ]; then log "FAILED: CUDA tests timed out after ${CUDA_LIMIT} s"; STATUS=1;
elif [ $RC -ne 0 ]; then log "FAILED: CUDA tests (exit $RC), see cuda-tests.log"; STATUS=1;
else log "CUDA tests passed"; fi
fi

# ---------------------------------------------------------------------------------------------- benchmark
# int4 right after nf4: the two 4-bit kernels are compared in the same run, before the budget can run out
INT4=""; [ $HAVE_TORCHAO -eq 1 ] && INT4="int4" || log "torchao missing: int4 not benchmarked"
QUANT="nf4 $INT4 nf4-lora float16 official"; BATCH="1 4 8"; REPEATS=3; EXPERTS_EVERY=""
[ $HAVE_BNB -eq 1 ] || { QUANT="$INT4 float16"; log "bitsandbytes missing: benchmarking ${INT4:+int4 and }float16 only"; }
# quick: the 4-bit modes with the experts resident (the memory target is about the whole pipeline)
[ $QUICK -eq 1 ] && { BATCH="1 4"; REPEATS=2; [ $HAVE_BNB -eq 1 ] && { QUANT="nf4 $INT4 nf4-lora"; EXPERTS_EVERY="--no-experts-once"; }; }
ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( TOTAL - 60 - ELAPSED )); [ $BUDGET -lt 60 ] && BUDGET=60
log "running the MoAI-7B-shape benchmark (quantization: $QUANT; batch sizes: $BATCH; budget ${BUDGET}s)"
timeout $(( BUDGET + 60 )) $PY -m benchmarks.run --config 7b-cuda --quantization $QUANT --batch-sizes $BATCH \
  --repeats $REPEATS --warmup 1 --time-budget $BUDGET $EXPERTS_EVERY --cuda-graphs --out "$OUT/7b-cuda.json" -v > "$OUT/bench-7b.log" 2>&1
RC=$?
grep -v -E "INFO|Warning|warn\(" "$OUT/bench-7b.log" | tail -n 80 >> "$OUT/summary.txt"
if [ $RC -eq 124 ]; then log "FAILED: benchmark timed out"; STATUS=1;
elif [ $RC -ne 0 ]; then log "FAILED: benchmark exit $RC (a mode disagreement or an error), see bench-7b.log"; STATUS=1;
else log "benchmark done"; fi

log "finished in $(( $(date +%s) - START ))s with status $STATUS; results in $OUT"
exit $STATUS
