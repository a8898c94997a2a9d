#!/usr/bin/env bash
# GPU smoke test and GPU benchmark, for a machine with one NVIDIA GPU (never run by CI,
# which has no GPU). Run from the repository root:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# It expects JAX with CUDA, torch with CUDA and torchdiffeq installed (the lent GPU
# machines' image has them). Packages that image lacks (netCDF4, cftime) can sit as
# wheels in .whl/ and are installed into /tmp/site first. Each part has its own time
# limit, so one hang does not eat the others (GPU_CHECK_ONLY=pytest stops after the
# smoke test); OUTDIR collects the logs:
#
#   env.txt       GPU, driver and package versions
#   pytest.txt    the smoke test: CI's test command with JAX on the GPU
#   fit.txt       `ctmodels fit latent-ode --data pbcseq` (the quick start) on the GPU,
#                 with its wall time; metrics.json of that run
#   step_gpu.jsonl  benchmarks/latent_ode_step.py --device gpu (ctmodels, plain
#                 Diffrax and torchdiffeq, all on the GPU; its stderr in step_gpu.err)
set -uo pipefail
out=${1:-/tmp/ctmodels-gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
unset JAX_PLATFORMS

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 - <<'EOF'
import diffrax, equinox, jax, optax, torch, torchdiffeq, xarray
print("jax", jax.__version__, jax.devices())
print("diffrax", diffrax.__version__, "equinox", equinox.__version__,
      "optax", optax.__version__, "xarray", xarray.__version__)
print("torch", torch.__version__, torch.cuda.get_device_name(),
      "torchdiffeq", torchdiffeq.__version__)
EOF
} 2>&1 | tee "$out/env.txt"

echo "== smoke test: the test suite (CI's command) with JAX on the GPU"
# pytest-xdist, where installed, spreads the tests over processes sharing the GPU
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n $(($(nproc) - 1))")
timeout "${GPU_CHECK_PYTEST_S:-240}" python3 -m pytest -q -m "not slow" \
    -p no:cacheprovider -p no:benchmark -rfEs --tb=short --durations=15 $xdist \
    2>&1 | tee "$out/pytest.txt"
pytest_rc=${PIPESTATUS[0]}  # the script's exit status: a failed test is not a pass

[ "${GPU_CHECK_ONLY:-}" = pytest ] && exit "$pytest_rc"

echo "== quick-start job on the GPU"
rm -rf /tmp/ctmodels-gpu-run
start=$EPOCHREALTIME
timeout "${GPU_CHECK_FIT_S:-110}" python3 -m ctmodels fit latent-ode --data pbcseq \
    --out /tmp/ctmodels-gpu-run --quiet 2>&1 | tee "$out/fit.txt"
python3 -c "print('fit wall_s', round($EPOCHREALTIME - $start, 1))" | tee -a "$out/fit.txt"
cp /tmp/ctmodels-gpu-run/metrics.json "$out/" 2>/dev/null

echo "== training step: ctmodels, plain Diffrax and torchdiffeq, all on the GPU"
timeout "${GPU_CHECK_STEP_S:-110}" python3 benchmarks/latent_ode_step.py \
    --device gpu --reps 7 2>"$out/step_gpu.err" | tee "$out/step_gpu.jsonl"
exit "$pytest_rc"
