#!/usr/bin/env bash
# Issue 21: SeerAttention gates with key-block overlap (k_overlap) trained and checked in ONE device call.
# From the repository root:  bash docs/results/seer_overlap_gpu_2026-12-05/run_gpu.sh
# Writes $OUT/seer.tgz (gates, provenance, check outputs, logs, summary) and $OUT/seer.log.
# CPU smoke test of the whole pipeline: SMOKE=1 DEV=cpu OUT=/tmp/x bash docs/results/seer_overlap_gpu_2026-12-05/run_gpu.sh
# Second call: IDS=$HERE/train_ids.json.gz OVERLAPS="0 24 32 48" (train on the CPU environment's sequences).
# Phase 1 (<= P1 s): `sparsattn calibrate seer_attention --k-overlap O --init <shipped gate>` for O in OVERLAPS, in
#   parallel, each with the eighth session's (shipped gate's) data recipe, its own cache, on $DEV.
# Phase 2 (the rest, less 25 s): issue 21's retrieval check (passkey + needle coverage, 10 prompts, seed 2112,
#   target density 0.12, row and threshold modes) of the shipped gate and every new gate, one process per
#   (haystack, length), on the prompts saved in prompts.json.gz (the CPU environment's; check.py).
# Phase 3: summary.md/json (strong readers per setting), seer.tgz.
set -u
HERE=docs/results/seer_overlap_gpu_2026-12-05
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
OUTD=${OUT:-/tmp/seer_gpu_local}
mkdir -p "$OUTD"
W=${WORK:-$(mktemp -d /tmp/seerw.XXXXXX)}
mkdir -p "$W/logs"
LOG=$OUTD/seer.log
: > "$LOG"
SMOKE=${SMOKE:-0}
DEV=${DEV:-cuda}
T0=$(date +%s)
BUDGET=${BUDGET:-365}          # seconds for everything, tar included
P1=${P1:-170}                  # seconds for the gate trainings (they run in parallel)
SHIPPED=sparsattn/models/bundled/calibration/seer_gate
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# wait_logging PHASE SECONDS STATUS_FN PID...: until every PID has ended, log every SECONDS how many run
# and what STATUS_FN prints
wait_logging() { local phase=$1 every=$2 status=$3 n p; shift 3
  while :; do n=0; for p in "$@"; do kill -0 "$p" 2>/dev/null && n=$((n+1)); done
    [ "$n" = 0 ] && break; sleep "$every"; log "$phase: $n running; $($status)"; done; }
left1() { echo $(( P1 - ($(date +%s) - T0) > 5 ? P1 - ($(date +%s) - T0) : 5 )); }  # what is left of phase 1
IDS=${IDS:-}   # train_ids.json.gz: train on the CPU environment's sequences (cache_from_ids.py) instead of this machine's

if [ "$SMOKE" = 1 ]; then
  OVERLAPS=${OVERLAPS:-"0 16"}
  CAL="--steps 6 --minutes 2 --cache-lengths 2048 --n-retrieval 3 --n-source 1 --n-prose 2 --n-split 0"
  SETS=${SETS:-"prose:2048 code:2048"}; N=2
  BUDGET=${SMOKE_BUDGET:-3000}; P1=${SMOKE_P1:-1200}
else
  OVERLAPS=${OVERLAPS:-"0 16 32"}
  CAL="--steps 600 --minutes ${TRAIN_MIN:-1.2} --cache-lengths 2048,4096,8192 --n-retrieval 78,24,8 --n-source 4,0,0 --n-prose 40,12,8 --n-split 0,0,0"
  SETS=${SETS:-"prose:8192 prose:4096 code:8192 code:4096"}; N=10
fi
export TOKENIZERS_PARALLELISM=false
log "start: SMOKE=$SMOKE DEV=$DEV IDS='$IDS' OVERLAPS='$OVERLAPS' SETS='$SETS' N=$N BUDGET=${BUDGET}s P1=${P1}s work=$W"
{ git log -1 --format='commit %H %s' 2>/dev/null; git status --short 2>/dev/null | head -20
  $PY -c "import torch, transformers, platform; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', platform.python_version()); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3; nproc; } > "$W/env.txt" 2>&1
cat "$W/env.txt" | tee -a "$LOG"

# ---- phase 1: one calibrate per overlap, in parallel (each builds its own cache: the pooled keys depend on it)
NT=$(( $(nproc) / $(echo $OVERLAPS | wc -w) )); [ "$NT" -lt 1 ] && NT=1
pids=()
for O in $OVERLAPS; do
  mkdir -p "$W/cal_o$O"
  ( if [ -n "$IDS" ]; then OMP_NUM_THREADS=$NT timeout -k 5 "$P1" $PY "$HERE/cache_from_ids.py" "$IDS" "$W/cache_o$O" "$O" \
        "$DEV" > "$W/logs/ids_o$O.log" 2>&1; echo "rc=$?" >> "$W/logs/ids_o$O.log"; fi
    OMP_NUM_THREADS=$NT MKL_NUM_THREADS=$NT timeout -k 5 "$(left1)" $PY -m sparsattn.cli calibrate seer_attention \
      --out "$W/cal_o$O/seer_gate" --provenance "$W/cal_o$O/provenance.json" --device "$DEV" --k-overlap "$O" \
      $CAL --seed 0 --lr 0.001 --rope-input pre --data retrieval --answer-weight 100 --target-power 8 \
      --batch-size 8 --cache "$W/cache_o$O" --init "$SHIPPED" > "$W/logs/cal_o$O.log" 2>&1
    echo "rc=$?" >> "$W/logs/cal_o$O.log" ) &
  pids+=($!)
  log "phase 1: started calibrate --k-overlap $O (threads $NT)"
done
p1_status() { local O msg=""; for O in $OVERLAPS; do
  msg="$msg o$O:$(ls "$W/cache_o$O" 2>/dev/null | wc -l)c/$(grep -c '^step\|step ' "$W/logs/cal_o$O.log" 2>/dev/null)"; done
  echo "cache files / log step lines:$msg"; }
wait_logging "phase 1" 10 p1_status "${pids[@]}"
LABELS=""; CALDIRS=""
for O in $OVERLAPS; do
  tail -3 "$W/logs/cal_o$O.log" | sed "s/^/  [o$O] /" | tee -a "$LOG"
  if [ -f "$W/cal_o$O/seer_gate/gate.safetensors" ] && grep -q "^rc=0" "$W/logs/cal_o$O.log"; then
    LABELS="$LABELS o$O"; CALDIRS="$CALDIRS,o$O=$W/cal_o$O"
  else
    log "phase 1: gate o$O FAILED or timed out (see logs/cal_o$O.log); not checked"
  fi
done
CALDIRS=${CALDIRS#,}
log "phase 1 done: gates:$LABELS"

# ---- phase 2: issue 21's check on the saved CPU-environment prompts, one process per set, in parallel
METHODS="seer_attention:row,seer_attention:threshold"
for L in $LABELS; do case $L in o0) ;; *) METHODS="$METHODS,seer_attention:row@$L,seer_attention:threshold@$L";; esac; done
case " $LABELS " in *" o0 "*) METHODS="$METHODS,seer_attention:row@o0,seer_attention:threshold@o0";; esac
P2=$(( $(left) - 25 ))
log "phase 2: methods $METHODS; time limit ${P2}s per set"
cpids=()
NS=$(echo $SETS | wc -w); NT2=$(( $(nproc) / NS )); [ "$NT2" -lt 1 ] && NT2=1
for S in $SETS; do
  H=${S%%:*}; L=${S##*:}
  ( OMP_NUM_THREADS=$NT2 MKL_NUM_THREADS=$NT2 timeout -k 5 "$P2" $PY "$HERE/check.py" --out "$W/chk" --length "$L" \
      --n "$N" --target 0.12 --haystack "$H" --tag "_$H" --device "$DEV" --methods "$METHODS" \
      ${CALDIRS:+--cal-dirs "$CALDIRS"} > "$W/logs/check_${H}_$L.log" 2>&1
    echo "rc=$?" >> "$W/logs/check_${H}_$L.log" ) &
  cpids+=($!)
  log "phase 2: started check $H $L"
done
p2_status() { local S H L msg=""; for S in $SETS; do H=${S%%:*}; L=${S##*:}
  msg="$msg ${H}$L:$(grep -c 'passkey\|coverage' "$W/logs/check_${H}_$L.log" 2>/dev/null)"; done
  echo "log lines:$msg"; }
wait_logging "phase 2" 15 p2_status "${cpids[@]}"
for S in $SETS; do H=${S%%:*}; L=${S##*:}; tail -2 "$W/logs/check_${H}_$L.log" | sed "s/^/  [$H$L] /" | tee -a "$LOG"; done

# ---- phase 3: summary and the archive
$PY "$HERE/summarize.py" "$W/chk" "$W/summary" >> "$LOG" 2>&1 || log "summary FAILED"
rm -rf "$W"/cache_o*                      # the caches stay behind (hundreds of MB)
cp "$LOG" "$W/seer.log"
tar -czf "$OUTD/seer.tgz" --exclude="*.png" -C "$W" . 2>>"$LOG" || log "tar FAILED"
log "done: $(du -h "$OUTD/seer.tgz" | cut -f1) in $OUTD/seer.tgz"
