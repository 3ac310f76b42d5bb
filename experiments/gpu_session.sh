#!/usr/bin/env bash
# One batched GPU session (device machine): GPU tests, then every benchmark, each step under
# its own time limit so one hang cannot eat the others. Logs and JSON are kept in $OUT/session.tgz
# (refreshed after every step, so a run cut short still returns what it did).
#   bash experiments/gpu_session.sh [steps...]     steps: env tests models rollout callback train fused
#       (also: rollout_small rollout_large rollout_large_mamba fused_tests profile ddp2 (needs 2 GPUs),
#        all_tests (every cuda test in one run), fused_shapes, rollout_fused, splits, probes)
set -uo pipefail
DEST=${OUT:-gpu_out}; OUT=$(mktemp -d); mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
steps=${*:-env tests models rollout train callback fused}
run() {  # run NAME SECONDS CMD...: time-limited, logged to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"; tail -n "${TAIL:-25}" "$OUT/$name.log"
  tar czf "$DEST/session.tgz" -C "$OUT" .
}
for step in $steps; do case $step in
  env) run env 60 bash -c 'nvidia-smi -L; date -u; python3 -c "import torch, lightning, hydra, wandb, triton; \
print(torch.__version__, lightning.__version__, triton.__version__, torch.cuda.get_device_name())"' ;;
  tests) TAIL=40 run tests 300 python3 -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE \
      --ignore=tests/test_fused_cuda.py ;;
  models) run models 45 python3 experiments/benchmark_models.py --out "$OUT/models.json" ;;
  rollout) TAIL=45 run rollout 130 python3 experiments/benchmark_rollout.py --steps 64 --repeats 3 \
      --out "$OUT/rollout.json" ;;
  rollout_small) TAIL=30 run rollout_small 200 python3 experiments/benchmark_rollout.py \
      --configs "32,32,16,1;32,128,64,4" --steps 64 --repeats 3 --out "$OUT/rollout_small.json" ;;
  rollout_large) TAIL=30 run rollout_large 170 python3 experiments/benchmark_rollout.py \
      --configs "256,256,64,6;1024,512,128,8" --variants eager,seed,graph,tf32,cublas --steps 32 --repeats 3 \
      --out "$OUT/rollout_large.json" ;;
  rollout_large_mamba) TAIL=20 run rollout_large_mamba 80 python3 experiments/benchmark_rollout.py \
      --configs 1024,512,128,8 --models mamba --steps 32 --repeats 3 --out "$OUT/rollout_large_mamba.json" ;;
  callback) run callback 60 python3 experiments/benchmark_callback.py --repeats 3 --out "$OUT/callback.json" ;;
  train) run train 55 bash -c 'python3 train.py model=lru generation.cuda_graph=true trainer=gpu \
      trainer.max_epochs=3 paths.output_dir=/tmp/gpu_train && python3 -c "
import glob; from lrnn_lightning.utils.wandb_offline import read_offline_run
run = read_offline_run(sorted(glob.glob(\"/tmp/gpu_train/wandb/offline-run-*\"))[-1])
keys = sorted({k for row in run.history for k in row})
print(\"W&B offline run:\", run.run_dir, len(run.history), \"rows\")
print(\"uses_graph:\", run.values(\"rollout/uses_graph\"), \"steps/s:\", run.values(\"rollout/steps_per_second\"))
print(\"media keys:\", [k for k in keys if k.endswith(\"_type\")])"' ;;
  profile) TAIL=120 run profile 150 python3 experiments/profile_step.py --out "$OUT/profile.json" ;;
  ddp2) TAIL=30 run ddp2_test 150 python3 -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE tests/test_ddp.py
      TAIL=40 run ddp2_train 150 bash -c 'nvidia-smi -L; OMP_NUM_THREADS=4 python3 train.py trainer=ddp \
      trainer.devices=2 generation.cuda_graph=true trainer.max_epochs=3 logger=csv hydra.run.dir=/tmp/ddp_2gpu \
      2>&1 | grep -E "RolloutCallback|rank|Error|error|rollout/nrmse" | tail -n 40' ;;
  fused_tests) TAIL=30 run fused_tests 180 python3 -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE \
      tests/test_fused_cuda.py ;;
  fused) TAIL=30 run fused_tests 90 python3 -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE \
      tests/test_fused_cuda.py
      TAIL=60 run fused 170 python3 experiments/benchmark_fused.py --steps 64 --repeats 3 --budget-s 140 \
      --no-tune --block-bs 1,2,4,8,16 --out "$OUT/fused.json" ;;
  all_tests) TAIL=30 run all_tests 480 python3 -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE ;;
  fused_shapes) TAIL=80 run fused_shapes 170 python3 experiments/benchmark_fused.py --steps 64 --repeats 3 \
      --budget-s 120 --no-tune --block-bs 1,16 --activations auto,scratch --warps 1,2,8 \
      --variants seed,graph,fused,fused-bf16 --out "$OUT/fused_shapes.json" ;;
  rollout_fused) TAIL=20 run rollout_fused 110 python3 experiments/benchmark_rollout.py \
      --configs "32,32,16,1;32,128,64,4" --variants eager,seed,graph,fused --steps 64 --repeats 3 \
      --out "$OUT/rollout_fused.json" ;;
  splits) TAIL=60 run splits 200 python3 experiments/benchmark_fused.py --configs "32,64,32,2;32,128,64,4;8,128,64,4" \
      --models lru,mamba --variants graph,fused --no-tune --splits 1,2,4,8 --steps 64 --repeats 3 --budget-s 180 \
      --out "$OUT/splits.json" ;;
  fused_bench) TAIL=60 run fused 200 python3 experiments/benchmark_fused.py --steps 64 --repeats 3 --budget-s 170 \
      --no-tune --block-bs 1,2,4,8,16 --out "$OUT/fused.json" ;;
  probes) TAIL=45 run probe_exchange 150 python3 experiments/probe_exchange.py --out "$OUT/probe_exchange.json"
      TAIL=20 run probe_resident 120 python3 experiments/probe_resident.py --configs "32,32,16,1" --models lru,s5 \
      --warps 4,8 --out "$OUT/probe_resident.json" ;;
esac; done
