#!/usr/bin/env bash
# The GPU check in one call, for a lent H100/H200 (at most 8 minutes, no Rust, no network;
# PyTorch and the NVIDIA driver present; the tree copied plus the carried .gpu/distill.xz).
#
#   scripts/gpu-check.sh                  # --device cuda: the real check
#   scripts/gpu-check.sh --device cpu     # dry run: tiny sizes, the release CPU binary, same phases
#   scripts/gpu-check.sh --check-carry    # only: do the carried files fit in 64 MiB?
#
# Phases (each time-boxed; a failure is recorded and the next phase still runs):
#   carry         the carried files (GPU_CHECK_CARRY, default .gpu/distill.xz) fit in 64 MiB;
#                 checked before anything else, fatal if not
#   unpack        .gpu/distill.xz -> a runnable binary (xz, else Python's lzma); the dry run packs
#                 the CPU binary with xz -0 first so the same path runs
#   environment   GPU name, driver, torch version, the CUDA libraries found in PyTorch's env
#   device_check  `distill bench --what device-check`: forward + one training step, fp32/bf16/fp16,
#                 --device against the CPU (the dry run: CPU against CPU)
#   bench_gpu     `distill bench --what gpu`: teacher step, DMD2 and TDM iterations (images/s,
#                 GPU memory) beside PyTorch AMP (bench/torch_gpu.py) on the same device
#   train_fp16    a short teacher, then a short fp16 DMD2 run; its loss scale from metrics.jsonl
# Writes $OUT/gpu-check.md and $OUT/gpu-check.json ($OUT defaults to ./gpu-report); exits 0 when
# every phase is ok, 1 when any failed (the report is written either way), 2 on a carry or usage error.
#
# On the lent machine: run(command="bash scripts/gpu-check.sh", carry=[".gpu/distill.xz"]); the
# device tool sets $OUT, so gpu-check.md/.json come back (scratch goes to GPU_CHECK_WORK or a
# mktemp folder, never under $OUT).
# Environment: GPU_CHECK_PYTHON (Python with torch; default python3), DISTILL_BIN (dry run binary;
# default target/release/distill), GPU_CHECK_PACKED (default .gpu/distill.xz), GPU_CHECK_CARRY
# (space-separated carried paths; default the packed binary).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DEVICE=cuda
CHECK_CARRY_ONLY=0
PY="${GPU_CHECK_PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        --check-carry) CHECK_CARRY_ONLY=1; shift ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "error: --device must be cuda, cuda:N or cpu, not $DEVICE" >&2; exit 2 ;; esac

LIMIT=$((64 * 1024 * 1024))
PACKED="${GPU_CHECK_PACKED:-.gpu/distill.xz}"
CARRY="${GPU_CHECK_CARRY:-$PACKED}"

# --- carry: before anything else ---------------------------------------------------------------
carry_json() {
    local total=0 entries="" ok=1 missing=""
    for f in $CARRY; do
        if [ -e "$f" ]; then
            local b
            b=$(du -sb --apparent-size "$f" | cut -f1)
            total=$((total + b))
            entries="$entries{\"path\":\"$f\",\"bytes\":$b},"
        else
            missing="$missing $f"
            entries="$entries{\"path\":\"$f\",\"bytes\":null},"
        fi
    done
    [ "$total" -le "$LIMIT" ] || ok=0
    CARRY_TOTAL=$total
    CARRY_MISSING="${missing# }"
    CARRY_OK=$ok
    CARRY_JSON="{\"files\":[${entries%,}],\"total_bytes\":$total,\"limit_bytes\":$LIMIT,\"fits\":$([ $ok = 1 ] && echo true || echo false),\"missing\":\"$CARRY_MISSING\"}"
}
carry_json
if [ "$CARRY_OK" != 1 ]; then
    echo "error: the carried files ($CARRY) are $CARRY_TOTAL bytes, over the 64 MiB ($LIMIT bytes) the GPU machine takes: pack smaller (scripts/build-cuda.sh writes .gpu/distill.xz)" >&2
    exit 2
fi
if [ "$CHECK_CARRY_ONLY" = 1 ]; then
    if [ -n "$CARRY_MISSING" ]; then
        echo "error: carried file(s) missing: $CARRY_MISSING (build with scripts/build-cuda.sh)" >&2
        exit 2
    fi
    echo "carry ok: $CARRY = $CARRY_TOTAL bytes <= $LIMIT (64 MiB)"
    exit 0
fi

OUT="${OUT:-$ROOT/gpu-report}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Scratch (the unpacked binary, checkpoints) stays outside $OUT: only the report comes back.
if [ -n "${GPU_CHECK_WORK:-}" ]; then
    WORK="$GPU_CHECK_WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
rm -rf "$OUT/phases"
mkdir -p "$WORK" "$OUT/phases"
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)

if [ "$DEVICE" = cpu ]; then
    DRY=1
    CONFIG=tiny; BATCH=4; WARMUP=1; ITERS=2
    T_UNPACK=60; T_ENV=30; T_CHECK=60; T_BENCH=120; T_TRAIN=120
    TEACHER_FLAGS=(--preset tiny --resolution 16 --limit 64 --batch-size 8 --steps 2)
    DMD2_FLAGS=(--limit 64 --batch-size 4 --steps 3)
else
    DRY=0
    CONFIG=bench; BATCH=64; WARMUP=3; ITERS=10
    T_UNPACK=60; T_ENV=30; T_CHECK=60; T_BENCH=210; T_TRAIN=120
    TEACHER_FLAGS=(--preset small --batch-size 64 --steps 200)
    DMD2_FLAGS=(--batch-size 32 --steps 60)
fi

# Records one phase: NAME TIMEOUT_S COMMAND...; stdout+stderr to phases/NAME.log, rc, seconds.
phase() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc
    t0=$(date +%s.%N)
    echo "== $name (at most ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$OUT/phases/$name.log" 2>&1
    rc=$?
    echo "$rc" > "$OUT/phases/$name.rc"
    echo "$limit" > "$OUT/phases/$name.limit"
    python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)" > "$OUT/phases/$name.secs" 2>/dev/null || echo 0 > "$OUT/phases/$name.secs"
    echo "   rc=$rc" >&2
    return $rc
}
skip() { echo "$2" > "$OUT/phases/$1.skipped"; echo "== $1 skipped: $2" >&2; }

# --- unpack ------------------------------------------------------------------------------------
BIN="$WORK/distill"
unpack() {
    local src="$1"
    if command -v xz > /dev/null; then
        xz -dc "$src" > "$BIN"
    else
        python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$src" "$BIN"
    fi || return 1
    chmod +x "$BIN"
    echo "unpacked $src ($(du -b --apparent-size "$src" | cut -f1) bytes) -> $BIN ($(du -b --apparent-size "$BIN" | cut -f1) bytes)"
}
if [ "$DRY" = 1 ]; then
    SRC_BIN="${DISTILL_BIN:-target/release/distill}"
    pack_and_unpack() {
        [ -x "$SRC_BIN" ] || { echo "no CPU binary at $SRC_BIN (cargo build --release)"; return 1; }
        xz -0 -T2 -c "$SRC_BIN" > "$WORK/distill.xz" || return 1
        unpack "$WORK/distill.xz"
    }
    phase unpack "$T_UNPACK" bash -c "$(declare -f unpack pack_and_unpack); BIN='$BIN' SRC_BIN='$SRC_BIN' WORK='$WORK' pack_and_unpack"
else
    if [ -e "$PACKED" ]; then
        phase unpack "$T_UNPACK" bash -c "$(declare -f unpack); BIN='$BIN' unpack '$PACKED'"
    else
        skip unpack "no $PACKED: build it with scripts/build-cuda.sh and carry it"
    fi
fi

# PyTorch's CUDA libraries for the binary (as scripts/run-gpu.sh).
NV=$("$PY" -c "import nvidia, os; print(os.path.dirname(nvidia.__file__))" 2>/dev/null || true)
if [ -n "$NV" ] && [ "$DRY" = 0 ]; then
    LIBS=$(find "$NV" -maxdepth 3 -type d -name lib | tr '\n' ':')
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
fi

# --- environment -------------------------------------------------------------------------------
environment() {
    echo "host: $(uname -srm), $(nproc) cores"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1 | tail -n1
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    [ -x "$BIN" ] && "$BIN" --version
}
phase environment "$T_ENV" bash -c "$(declare -f environment); PY='$PY' BIN='$BIN' environment"

have_bin() { [ -x "$BIN" ]; }

# --- device_check ------------------------------------------------------------------------------
if have_bin; then
    phase device_check "$T_CHECK" "$BIN" --device "$DEVICE" bench --what device-check \
        --config tiny --batch 4 --json "$OUT/phases/device_check.json"
else
    skip device_check "no binary (unpack failed)"
fi

# --- bench_gpu ---------------------------------------------------------------------------------
if have_bin; then
    phase bench_gpu "$T_BENCH" "$BIN" --device "$DEVICE" bench --what gpu --config "$CONFIG" \
        --batch "$BATCH" --warmup "$WARMUP" --iters "$ITERS" --torch-python "$PY" \
        --json "$OUT/phases/bench_gpu.json"
else
    skip bench_gpu "no binary (unpack failed)"
fi

# --- train_fp16 --------------------------------------------------------------------------------
train_fp16() {
    "$BIN" --quiet --device "$DEVICE" train teacher "${TEACHER_FLAGS[@]}" --sample-every 0 \
        --checkpoint-every 1000000 --out "$WORK/teacher" || return 1
    "$BIN" --quiet --device "$DEVICE" train dmd2 --teacher "$WORK/teacher/checkpoint" \
        --precision fp16 "${DMD2_FLAGS[@]}" --log-every 1 --sample-every 0 --eval-every 0 \
        --out "$WORK/dmd2_fp16" || return 1
    # The loss scale must be in the metrics of an fp16 run.
    python3 - "$WORK/dmd2_fp16/metrics.jsonl" "$OUT/phases/train_fp16.json" <<'PY' || return 1
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# The last value of each scaler key (the student's is only logged on its update iterations).
scale = {k: v for r in rows for k, v in r.items() if k.startswith("loss_scale_")}
skipped = {k: v for r in rows for k, v in r.items() if k.startswith("skipped_")}
losses = {k: v for r in rows for k, v in r.items() if k.startswith("loss") and not k.startswith("loss_scale")}
out = {"iterations": rows[-1].get("step"), "lines": len(rows), "loss_scale": scale,
       "skipped": skipped, "last": rows[-1]}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(json.dumps(out))
if not scale:
    sys.exit("no loss_scale_* key in the fp16 run's metrics.jsonl")
if not all(math.isfinite(v) for v in losses.values() if isinstance(v, (int, float))):
    sys.exit("non-finite loss in the fp16 run")
PY
}
if have_bin; then
    phase train_fp16 "$T_TRAIN" bash -c "$(declare -f train_fp16); BIN='$BIN' DEVICE='$DEVICE' WORK='$WORK' OUT='$OUT' TEACHER_FLAGS=(${TEACHER_FLAGS[*]}) DMD2_FLAGS=(${DMD2_FLAGS[*]}); train_fp16"
else
    skip train_fp16 "no binary (unpack failed)"
fi

# --- report ------------------------------------------------------------------------------------
python3 - "$OUT" "$DEVICE" "$DRY" "$START" "$CARRY_JSON" <<'PY'
import json, os, sys
out, device, dry, start, carry = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], json.loads(sys.argv[5])
ph = os.path.join(out, "phases")
names = ["unpack", "environment", "device_check", "bench_gpu", "train_fp16"]
def read(name, ext):
    p = os.path.join(ph, f"{name}.{ext}")
    return open(p).read() if os.path.exists(p) else None
phases = [{"name": "carry", "status": "ok", "rc": 0, "seconds": 0.0, "timeout_s": None,
           "result": carry, "log": ""}]
for n in names:
    skipped = read(n, "skipped")
    log = read(n, "log") or ""
    rc = read(n, "rc")
    res = read(n, "json")
    p = {"name": n, "rc": None if rc is None else int(rc), "seconds": float(read(n, "secs") or 0),
         "timeout_s": None if read(n, "limit") is None else int(read(n, "limit")),
         "result": json.loads(res) if res else None, "log": log[-6000:]}
    if skipped is not None:
        p["status"] = "skipped: " + skipped.strip()
    elif p["rc"] == 0:
        p["status"] = "ok"
    elif p["rc"] in (124, 137):
        p["status"] = f"timed out after {p['timeout_s']} s"
    else:
        p["status"] = f"failed (exit {p['rc']})"
    phases.append(p)
env = next(p for p in phases if p["name"] == "environment")["log"].strip().splitlines()
report = {"device": device, "dry_run": dry, "started": start, "environment": env,
          "phases": phases,
          "passed": all(p["status"] == "ok" for p in phases)}
json.dump(report, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
md = [f"# GPU check ({'dry run on the CPU' if dry else device})", "",
      f"Started {start}. Overall: {'all phases ok' if report['passed'] else 'NOT all phases ok'}.", "",
      "| phase | status | seconds (limit) |", "|---|---|---|"]
for p in phases:
    lim = "" if p["timeout_s"] is None else f" ({p['timeout_s']})"
    md.append(f"| {p['name']} | {p['status']} | {p['seconds']}{lim} |")
md += ["", f"Carried: {carry['total_bytes']} bytes of {carry['limit_bytes']} ({', '.join(f['path'] for f in carry['files'])})."]
for p in phases[1:]:
    md += ["", f"## {p['name']}: {p['status']}", "", "```", p["log"].strip()[-4000:] or "(no output)", "```"]
open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md[:len(phases) + 6]))
sys.exit(0 if report["passed"] else 1)
PY
RC=$?
echo "report: $OUT/gpu-check.md, $OUT/gpu-check.json" >&2
exit $RC
