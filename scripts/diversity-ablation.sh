#!/usr/bin/env bash
# The diversity ablation of issue #18: students of one teacher trained with one setting changed
# each, every one scored by `distill eval` (FD, class accuracy, precision, recall, density,
# coverage; 1000 class-balanced images), written as one markdown table with the command of each row.
#
# Usage: scripts/diversity-ablation.sh [TEACHER_CKPT] [OUT]   (defaults: the pipeline's teacher,
#        runs/ablation). Env: DISTILL (the binary, default target/release/distill), JOBS (runs at
#        once, each with 2/JOBS threads; default 1), ROWS (space-separated row names, default all),
#        N (images per evaluation, default 1000).
# Resumable: a row whose eval JSON exists is skipped; an interrupted training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER="${1:-runs/pipeline/teacher/checkpoint}"
OUT="${2:-runs/ablation}"
BIN="${DISTILL:-target/release/distill}"
JOBS="${JOBS:-1}"
N="${N:-1000}"
THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -ge 1 ] || THREADS=1
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "error: $BIN not found: cargo build --release first" >&2; exit 1; }
[ -f "$TEACHER/config.json" ] || { echo "error: no teacher checkpoint at $TEACHER (run distill pipeline or distill train teacher first)" >&2; exit 1; }

# Autoguidance's weaker teacher: the teacher's command at a fifth of its steps (trained if missing).
WEAK="${WEAK:-runs/weak_teacher/checkpoint}"
# The pipeline's distillation settings (src/jobs/pipeline.rs): these are what each row changes.
ONE="--timesteps 999 --dfake-gen-update-ratio 5 --train-steps 1500"
FOUR="--timesteps 999,749,499,249 --dfake-gen-update-ratio 5 --train-steps 1500"
RUN="--cfg-scale 2 --eval-every 187 --eval-n 500 --sample-every 375"
TDM="--timesteps 999,749,499,249 --train-steps 600 --cfg-scale 2 --eval-every 75 --eval-n 500 --sample-every 150"
# name | trainer | flags | steps to evaluate at
ROWS_ALL=(
  "dmd2_1step|dmd2|$ONE $RUN|1"
  "dmd2_1step_interval|dmd2|$ONE $RUN --cfg-interval 0.3,5|1"
  "dmd2_1step_interval10|dmd2|$ONE $RUN --cfg-interval 0.3,10|1"
  "dmd2_1step_interval15|dmd2|$ONE $RUN --cfg-interval 0.3,15|1"
  "dmd2_1step_cfg1.5|dmd2|$ONE $RUN --cfg-scale 1.5|1"
  "dmd2_1step_nogan|dmd2|$ONE $RUN --no-gan|1"
  "dmd2_4step_unphased|dmd2|$FOUR $RUN --phased false|4 3 2 1"
  "dmd2_4step|dmd2|$FOUR $RUN|4 3 2 1"
  "dmd2_4step_interval|dmd2|$FOUR $RUN --cfg-interval 0.3,5|4 3 2 1"
  "dmd2_4step_unphased_interval|dmd2|$FOUR $RUN --phased false --cfg-interval 0.3,5|4 3 2 1"
  "dmd2_4step_last374_interval|dmd2|${FOUR/249/374} $RUN --cfg-interval 0.3,5|4 3 2 1"
  "dmd2_1step_gan10|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|1"
  "dmd2_1step_gan30|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 9e-2 --gan-critic-weight 1e-1|1"
  "dmd2_1step_cfg3_interval|dmd2|$ONE ${RUN/--cfg-scale 2/--cfg-scale 3} --cfg-interval 0.3,5|1"
  "dmd2_1step_long|dmd2|${ONE/1500/3000} $RUN --cfg-interval 0.3,5|1"
  "dmd2_4step_gan10|dmd2|$FOUR $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|4 3 2 1"
  "dmd2_4step_gan30|dmd2|$FOUR $RUN --cfg-interval 0.3,5 --gan-generator-weight 9e-2 --gan-critic-weight 1e-1|4 3 2 1"
  "dmd2_1step_gan10_proj|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-projection true|1"
  "dmd2_1step_gan10_proj_t250|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-projection true --gan-max-timestep 250|1"
  "dmd2_4step_gan10_t250|dmd2|$FOUR $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-max-timestep 250|4 3 2 1"
  "dmd2_4step_gan10_proj|dmd2|$FOUR $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-projection true|4 3 2 1"
  "dmd2_4step_gan10_proj_t250|dmd2|$FOUR $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-projection true --gan-max-timestep 250|4 3 2 1"
  "dmd2_1step_gan10_t250|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-max-timestep 250|1"
  "dmd2_1step_gan10_interval10|dmd2|$ONE $RUN --cfg-interval 0.3,10 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|1"
  "dmd2_1step_gan10_interval15|dmd2|$ONE $RUN --cfg-interval 0.3,15 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|1"
  "dmd2_1step_gan10_cls3e-2|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-classifier-weight 3e-2 --gan-classifier-max-timestep 1000 --gan-classifier-misclassified-only false|1"
  "dmd2_1step_gan10_cls1e-1|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-classifier-weight 1e-1 --gan-classifier-max-timestep 1000 --gan-classifier-misclassified-only false|1"
  "dmd2_1step_gan10_mcls1e-1|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-classifier-weight 1e-1|1"
  "dmd2_1step_gan10_mcls3e-1|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-classifier-weight 3e-1|1"
  "dmd2_1step_gan10_auto2|dmd2|$ONE $RUN --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --autoguidance $WEAK|1"
  "dmd2_1step_gan10_auto3|dmd2|${ONE} ${RUN/--cfg-scale 2/--cfg-scale 3} --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --autoguidance $WEAK|1"
  "dmd2_1step_gan10_long|dmd2|${ONE/1500/3000} $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|1"
  "dmd2_1step_gan10_auto3_long|dmd2|${ONE/1500/3000} ${RUN/--cfg-scale 2/--cfg-scale 3} --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --autoguidance $WEAK|1"
  "dmd2_1step_gan10_fkl|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --f-divergence forward-kl|1"
  "dmd2_1step_gan10_js|dmd2|$ONE $RUN --cfg-interval 0.3,5 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --f-divergence jensen-shannon|1"
  "dmd2_1step_gan10_fkl_full|dmd2|$ONE $RUN --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --f-divergence forward-kl|1"
  "dmd2_1step_gan10_js_full|dmd2|$ONE $RUN --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --f-divergence jensen-shannon|1"
  "dmd2_1step_gan10_fkl_interval15|dmd2|$ONE $RUN --cfg-interval 0.3,15 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --f-divergence forward-kl|1"
  "dmd2_1step_gan10_full|dmd2|$ONE $RUN --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|1"
  "dmd2_4step_gan10_interval15|dmd2|$FOUR $RUN --cfg-interval 0.3,15 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1|4 3 2 1"
  "dmd2_4step_gan10_t250_interval15|dmd2|$FOUR $RUN --cfg-interval 0.3,15 --gan-generator-weight 3e-2 --gan-critic-weight 1e-1 --gan-max-timestep 250|4 3 2 1"
  "dmd2_4step_snr|dmd2|${FOUR/999,749,499,249/999,476,383,306} $RUN|4 3 2 1"
  "tdm_4step|tdm|$TDM|4 3 2 1"
  "tdm_4step_interval|tdm|$TDM --cfg-interval 0.3,5|4 3 2 1"
  "tdm_4step_interval10|tdm|$TDM --cfg-interval 0.3,10|4 3 2 1"
  "tdm_4step_interval15|tdm|$TDM --cfg-interval 0.3,15|4 3 2 1"
  "tdm_4step_interval10_cfg3|tdm|${TDM/--cfg-scale 2/--cfg-scale 3} --cfg-interval 0.3,10|4 3 2 1"
  "tdm_4step_interval10_long|tdm|${TDM/600/1200} --cfg-interval 0.3,10|4 3 2 1"
  "tdm_4step_snr|tdm|${TDM/999,749,499,249/999,476,383,306}|4 3 2 1"
)

want() { [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $1 "* ]]; }

run_row() {
    local name="$1" trainer="$2" flags="$3" evals="$4" dir="$OUT/$1"
    local resume=""
    [ -f "$dir/checkpoint/train_state.safetensors" ] && resume="--resume"
    if [ ! -f "$dir/eval_${evals%% *}.json" ]; then
        # shellcheck disable=SC2086
        "$BIN" train "$trainer" --teacher "$TEACHER" $flags --threads "$THREADS" --quiet $resume -o "$dir" \
            > "$dir.train.log" 2>&1 || { echo "$name: training failed, see $dir.train.log" >&2; return 1; }
    fi
    for k in $evals; do
        [ -f "$dir/eval_$k.json" ] && continue
        "$BIN" eval "$dir/checkpoint" --sample-steps "$k" --n "$N" --threads "$THREADS" --quiet \
            --json "$dir/eval_$k.json" > "$dir/eval_$k.txt" 2>&1 \
            || { echo "$name: eval failed, see $dir/eval_$k.txt" >&2; return 1; }
    done
    echo "$name: done"
}

# The teacher's reference rows first (this also trains and caches the eval classifier once).
for spec in "heun 18" "euler 4"; do
    set -- $spec
    f="$OUT/teacher_$1_$2.json"
    [ -f "$f" ] || "$BIN" eval "$TEACHER" --sampler "$1" --sample-steps "$2" --cfg-scale 2 --n "$N" \
        --quiet --json "$f" > "${f%.json}.txt" 2>&1
done

if [ ! -f "$WEAK/config.json" ] && { [ -z "${ROWS:-}" ] || [[ "$ROWS" == *auto* ]]; }; then
    "$BIN" train teacher --train-steps 1000 --quiet -o "${WEAK%/checkpoint}" > "$OUT/weak_teacher.log" 2>&1
fi

pids=()
for row in "${ROWS_ALL[@]}"; do
    IFS='|' read -r name trainer flags evals <<< "$row"
    want "$name" || continue
    mkdir -p "$OUT/$name"
    run_row "$name" "$trainer" "$flags" "$evals" &
    pids+=($!)
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done

python3 - "$OUT" "$TEACHER" "${ROWS_ALL[@]}" <<'EOF'
import json, os, sys
out, teacher, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
def fmt(name, nfe, cmd, path):
    if not os.path.exists(path):
        return None
    r = json.load(open(path))
    d = r.get("diversity", {}).get("samples", {})
    acc = r.get("class_accuracy")
    pc = [v for v in (r["diversity"].get("per_class_recall") or []) if v is not None]
    low = f"{min(pc):.3f}" if pc else "n/a"
    refs.append(r["diversity"]["real_vs_real"])
    return (f"| {name} | {nfe} | {r['fd']:.2f} | {acc*100:.1f}% | {d['precision']:.3f} | "
            f"{d['recall']:.3f} | {d['density']:.3f} | {d['coverage']:.3f} | {low} | `{cmd}` |")
refs = []
lines = ["| model | NFE | FD | class accuracy | precision | recall | density | coverage | lowest class recall | command |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for s, k, nfe in [("heun", 18, 35), ("euler", 4, 4)]:
    l = fmt(f"teacher ({s}, CFG 2)", nfe,
            f"distill eval {teacher} --sampler {s} --sample-steps {k} --cfg-scale 2 --n 1000",
            f"{out}/teacher_{s}_{k}.json")
    if l: lines.append(l)
for row in rows:
    name, trainer, flags, evals = row.split("|")
    for k in evals.split():
        cmd = (f"distill train {trainer} --teacher {teacher} {' '.join(flags.split())} -o {out}/{name}"
               f" && distill eval {out}/{name}/checkpoint --sample-steps {k} --n 1000")
        l = fmt(name if k == evals.split()[0] else f"{name} at {k} steps", k, cmd, f"{out}/{name}/eval_{k}.json")
        if l: lines.append(l)
if refs:
    r = refs[0]
    lines.append(f"\nReal vs real (disjoint real sets of the rows' size): precision {r['precision']:.3f}, "
                 f"recall {r['recall']:.3f}, density {r['density']:.3f}, coverage {r['coverage']:.3f}.")
open(f"{out}/ablation.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $fail
