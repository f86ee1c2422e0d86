#!/usr/bin/env bash
# Issue 5's GPU run on one H200, end to end, in one device call:
#   1. the GPU-marked test: two trials sharing the GPU (fractional resources) complete;
#   2. the search on search_spaces/gpu.yaml (its trial budget, or TRIALS), Ctrl-C'd if it
#      outruns SEARCH_S (after a first, unmeasured one with WARM_FIRST=1);
#   3. the knee's exported config trained for a longer budget (LONG_STEPS, cut at TRAIN_S).
# Usage (device): source .devicepkgs/setup .devicepkgs && bash bench/search_gpu.sh OUTDIR
# The figures go to bench/search_gpu.md by hand, with this command.
set -uo pipefail
out=${1:?usage: search_gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton, ray, optuna; print('torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__, 'optuna', optuna.__version__)"

if [ -z "${SKIP_TEST:-}" ]; then
  python -m pytest -q -m gpu -p no:cacheprovider tests/test_search_shared_gpu.py 2>&1 | tail -3 |
    tee "$out/gpu_test.log"
fi

# WARM_FIRST=1: one search before the measured one, so that the measured search finds the
# compile caches (Triton's, Inductor's) as a machine that has searched before does; a device
# call always starts on a bare machine, where every first wave compiles everything.
if [ -n "${WARM_FIRST:-}" ]; then
  t0=$(date +%s)
  warm=warm-$(date +%H%M%S)
  timeout -s INT -k 30 "${SEARCH_S:-330}" python -m automla.cli search \
    --space search_spaces/gpu.yaml --out runs --name "$warm" 2>&1 | tail -n 2
  echo "warming search exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  mkdir -p "$out/warming" && cp runs/"$warm"/{trials.csv,pareto.json,gpu_usage.csv} "$out/warming/" 2>/dev/null
  python -c "import json,sys; s=json.load(open(sys.argv[1])); print('warming search', s['trials'], 'trials, gpu usage', s.get('gpu_usage'))" "$out/warming/pareto.json"
fi

RUN_NAME=${RUN_NAME:-gpu-$(date +%Y%m%d-%H%M%S)}  # a warm machine keeps runs/ of earlier calls
t0=$(date +%s)
timeout -s INT -k 30 "${SEARCH_S:-330}" python -m automla.cli search --space search_spaces/gpu.yaml \
  --out runs --name "$RUN_NAME" ${TRIALS:+--trials "$TRIALS"} 2>&1 | tail -n 30
echo "search exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
run=runs/$RUN_NAME
cp "$run"/trials.json "$run"/trials.csv "$run"/pareto.json "$run"/report.html "$run"/search.log "$out"/
cp "$run"/gpu_usage.csv "$out"/ 2>/dev/null

python -m automla.cli export "$run" --pick knee -o "$out/best.yaml"
t1=$(date +%s)
timeout -s INT -k 10 "${TRAIN_S:-75}" python -m automla.cli train --config "$out/best.yaml" \
  --steps "${LONG_STEPS:-1000}" --out "runs/$RUN_NAME-long" >/dev/null 2>&1
echo "long training exit $? after $(( $(date +%s) - t1 )) s"
cp "runs/$RUN_NAME-long/metrics.jsonl" "$out/best_long_metrics.jsonl" 2>/dev/null

python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/pareto.json"))
print("trials", s["trials"], {k: s[k] for k in ("completed", "pruned", "failed", "stopped")})
print("gpu usage", s.get("gpu_usage"))
for e in s["front"]:
    print("front", e["trial_id"], {k: round(v, 4) for k, v in e["metrics"].items()
          if k in ("val_loss", "tokens_per_s", "mqar_acc", "train_tokens_per_s")}, e.get("knee"))
# where the trials' time went (cumulative at each trial's last evaluation; bench/RESULTS.md)
keys = ("setup_s", "warmup_s", "steady_s", "val_s", "stats_s", "benchmark_s", "benchmark_wait_s")
for t in json.load(open(f"{out}/trials.json")):
    m = t.get("metrics", {})
    print("timeline", t["trial_id"], t["state"], m.get("step"),
          " ".join(f"{k}={m[k]:.1f}" for k in keys if k in m))
try:
    long_rows = open(f"{out}/best_long_metrics.jsonl").read().splitlines()
except OSError:
    long_rows = []
for line in long_rows:
    m = json.loads(line)
    print("long", m["step"], round(m["val_loss"], 4), round(m.get("mqar_acc", -1), 3), round(m["tokens_per_s"]))
PY
