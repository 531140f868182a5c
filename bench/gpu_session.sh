#!/usr/bin/env bash
# The GPU checks of docs/performance.md §6 as one script, sized for a short lease of one GPU
# (a 600 s run): the CUDA tests first, then every method's step on NYUv2, the gradient paths, peak
# GPU memory and seconds per epoch on NYUv2, then the other GPU benchmarks' steps.
# Each check has its own time limit, so one that runs long costs only itself; every table lands
# in OUTDIR as soon as its check ends, and OUTDIR/session.log says what ran, for how long, and why
# anything stopped; the script exits 1 naming every check that did not succeed. Needs torch (and
# torch-geometric for QM9); not Ray, Optuna or cvxpy.
#
#   bash bench/gpu_session.sh OUTDIR            # from the repository root
#   SCALE=3 bash bench/gpu_session.sh OUTDIR    # three times the repetitions and limits
set -u
out=${1:?usage: bash bench/gpu_session.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
scale=${SCALE:-1}
device=${DEVICE:-cuda}   # DEVICE=cpu: a dry run of the script itself
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=$out/session.log

check() {  # check NAME LIMIT_SECONDS COMMAND...: run it under its limit; its output goes to the log
  local name=$1 limit=$(($2 * scale)) start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit} s) $(date -u +%FT%TZ): $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - start)) s$([ $rc = 124 ] && echo ' (stopped at its limit)')" >>"$log"
  [ $rc = 0 ] || failed="$failed $name"
}
failed=""

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
} >>"$log" 2>&1

reps=$((8 * scale))
# In order of what the next lease most needs (docs/performance.md §6.1). The device returns at most
# 8 files: the six tables below plus session.log; the later checks print their tables into the log.
# The limits add up to 600 s by the second epoch check; the checks have finished well inside them.
check cuda_tests 90 "$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_balancer_module.py \
  tests/test_bench_multi_mnist.py tests/test_bench_celeba.py tests/test_bench_qm9.py
check step_nyuv2 120 "$py" bench/step_time.py --benchmark nyuv2 --synthetic --device "$device" --reps "$reps" --warmup 2 \
  --out "$out/step_nyuv2.md"
# the Gram path forced, against auto's choice in step_nyuv2 (the Jacobian path on a large GPU)
gram=(--set mgda.gradient_path=gram --set nashmtl.gradient_path=gram --set cagrad.gradient_path=gram
      --set imtl.gradient_path=gram)
check paths_nyuv2 50 "$py" bench/step_time.py --benchmark nyuv2 --synthetic --device "$device" --reps 8 --warmup 2 \
  --methods mgda,nashmtl,cagrad,imtl "${gram[@]}" --out "$out/paths_nyuv2.md"
check memory_nyuv2 100 "$py" bench/peak_memory.py --benchmark nyuv2 --synthetic --device "$device" --timeout 40 \
  --methods ls,mgda,nashmtl,pcgrad,graddrop --out "$out/memory_nyuv2.md"
# §6 item 3: seconds per NYUv2 epoch (all 795 training images, then the test evaluation) against the
# A100 table: ls and one Gram-matrix method
for m in ls mgda; do
  check "epoch_nyuv2_$m" $([ $m = ls ] && echo 90 || echo 150) "$py" bench/packing.py --benchmark nyuv2 --synthetic \
    --device "$device" --method "$m" --epochs 1 --trials 1 --config val_fraction=0 --config deterministic=true \
    --out "$out/epoch_nyuv2_$m.md"
done
check step_cityscapes 110 "$py" bench/step_time.py --benchmark cityscapes --synthetic --device "$device" \
  --reps $((4 * scale)) --warmup 1
check step_qm9 80 "$py" bench/step_time.py --benchmark qm9 --synthetic --device "$device" --reps "$reps" --warmup 3
check step_celeba 100 "$py" bench/step_time.py --benchmark celeba --synthetic --device "$device" --reps $((3 * scale)) \
  --warmup 1
# UPGrad took 1.56 x floor:jac on CelebA (K = 40: forty active-set projections, ~750 small lstsq
# calls a step; 48 ms on a 2-core CPU): is it the host BLAS's threads on this machine's many cores?
check upgrad_one_blas_thread 60 env OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  "$py" bench/step_time.py --benchmark celeba --synthetic --device "$device" --reps 3 --warmup 1 --methods mgda,upgrad
echo "=== done $(date -u +%FT%TZ)${failed:+; failed:$failed}" >>"$log"
if [ -n "$failed" ]; then echo "gpu_session: checks that failed or ran out of time:$failed (see $log)" >&2; exit 1; fi
