#!/usr/bin/env bash
# The GPU checks of docs/performance.md §6 as one script, sized for a short lease of one GPU
# (a 600 s run): the CUDA tests first, then every method's step on the GPU benchmarks' real model
# shapes, the gradient paths, and peak GPU memory on NYUv2 for a representative set.
# Each check has its own time limit, so one that runs long costs only itself; every table lands
# in OUTDIR as soon as its check ends, and OUTDIR/session.log says what ran, for how long, and why
# anything stopped. Needs torch (and torch-geometric for QM9); not Ray, Optuna or cvxpy.
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
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
} >>"$log" 2>&1

reps=$((10 * scale))
# in order of what the next lease most needs (docs/performance.md §6.1): the first five checks'
# limits add up to 500 s; QM9 and CelebA (measured on 2026-12-04) follow while time is left
check cuda_tests 90 "$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_balancer_module.py \
  tests/test_bench_multi_mnist.py tests/test_bench_celeba.py tests/test_bench_qm9.py
check step_nyuv2 140 "$py" bench/step_time.py --benchmark nyuv2 --synthetic --device "$device" --reps "$reps" --warmup 3 \
  --out "$out/step_nyuv2.md"
# the Gram path forced, against auto's choice in step_nyuv2 (the Jacobian path on a large GPU)
gram=(--set mgda.gradient_path=gram --set nashmtl.gradient_path=gram --set cagrad.gradient_path=gram
      --set imtl.gradient_path=gram)
check paths_nyuv2 60 "$py" bench/step_time.py --benchmark nyuv2 --synthetic --device "$device" --reps 8 --warmup 2 \
  --methods mgda,nashmtl,cagrad,imtl "${gram[@]}" --out "$out/paths_nyuv2.md"
check memory_nyuv2 100 "$py" bench/peak_memory.py --benchmark nyuv2 --synthetic --device "$device" --timeout 40 \
  --methods ls,mgda,nashmtl,pcgrad,graddrop --out "$out/memory_nyuv2.md"
check step_cityscapes 110 "$py" bench/step_time.py --benchmark cityscapes --synthetic --device "$device" \
  --reps $((4 * scale)) --warmup 1 --out "$out/step_cityscapes.md"
check step_qm9 80 "$py" bench/step_time.py --benchmark qm9 --synthetic --device "$device" --reps "$reps" --warmup 3 \
  --out "$out/step_qm9.md"
check step_celeba 100 "$py" bench/step_time.py --benchmark celeba --synthetic --device "$device" --reps $((3 * scale)) \
  --warmup 1 --out "$out/step_celeba.md"
# UPGrad took 1.56 x floor:jac on CelebA (K = 40: forty active-set projections, ~750 small lstsq
# calls a step; 48 ms on a 2-core CPU): is it the host BLAS's threads on this machine's many cores?
check upgrad_one_blas_thread 60 env OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  "$py" bench/step_time.py --benchmark celeba --synthetic --device "$device" --reps 3 --warmup 1 --methods mgda,upgrad \
  --out "$out/upgrad_one_blas_thread.md"
echo "=== done $(date -u +%FT%TZ)" >>"$log"
