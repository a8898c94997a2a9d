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
# smoke test; GPU_CHECK_ONLY=steps runs only the training-step part, under 5
# minutes); OUTDIR collects the logs:
#
#   env.txt       GPU, driver and package versions
#   pytest.txt    the smoke test: CI's test command with JAX on the GPU
#   fit.txt       `ctmodels fit latent-ode --data pbcseq` (the quick start) on the GPU,
#                 with its wall time; metrics.json of that run
#   step_gpu.jsonl  benchmarks/latent_ode_step.py --device gpu (ctmodels, plain
#                 Diffrax and torchdiffeq, all on the GPU; its stderr in step_gpu.err)
#   gpu_steps.jsonl the training-step part: ONE JSON line per case, ctmodels against
#                 its PyTorch peer on the same GPU at short settings (--quick), each
#                 case under its own `timeout` (130 + 110 + 55 s at most):
#                   latent_ode  benchmarks/latent_ode_step.py (torchdiffeq, plain Diffrax)
#                   ffjord      benchmarks/ffjord_speed.py --cases checkpoint (torchdiffeq)
#                   deq         benchmarks/deq_torchdeq.py (torchdeq: IFT and one-step)
#                 each line: case, rc (124: timed out), wall_s, device, the
#                 benchmark's summary line (its ratios: PEER_over_ctmodels > 1 means
#                 ctmodels is faster) and median_s per implementation
#                 (benchmarks/_gpu_steps.py); the scripts' own output in
#                 steps_CASE.jsonl and steps_CASE.err
#
# GPU_CHECK_DEVICE=cpu runs the benchmarks on the CPU instead (no nvidia-smi): a dry
# run of this script's logic on a machine without a GPU, e.g.
#   GPU_CHECK_ONLY=steps GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/dry
set -uo pipefail
out=${1:-/tmp/ctmodels-gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
device=${GPU_CHECK_DEVICE:-gpu}
case "$device" in
    gpu) unset JAX_PLATFORMS ;;
    cpu) export JAX_PLATFORMS=cpu ;;
    *) echo "GPU_CHECK_DEVICE must be gpu or cpu, got $device" >&2; exit 2 ;;
esac

{
    [ "$device" = gpu ] &&
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 - <<'EOF'
import diffrax, equinox, jax, optax, torch, torchdiffeq, xarray
print("jax", jax.__version__, jax.devices())
print("diffrax", diffrax.__version__, "equinox", equinox.__version__,
      "optax", optax.__version__, "xarray", xarray.__version__)
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print("torch", torch.__version__, gpu, "torchdiffeq", torchdiffeq.__version__)
try:
    import torchdeq
    print("torchdeq", getattr(torchdeq, "__version__", "installed"))
except ImportError:
    print("torchdeq not installed: the deq case of gpu_steps.jsonl fails")
EOF
} 2>&1 | tee "$out/env.txt"

# the training-step part: each case under its own time limit, one line each in
# gpu_steps.jsonl (benchmarks/_gpu_steps.py)
steps_case() {  # NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 start=$EPOCHREALTIME rc
    shift 2
    timeout "$limit" "$@" >"$out/steps_$name.jsonl" 2>"$out/steps_$name.err"
    rc=$?
    python3 benchmarks/_gpu_steps.py line "$name" "$rc" "$start" "$EPOCHREALTIME" \
        "$device" "$limit" "$out/steps_$name.jsonl" "$out/steps_$name.err" \
        | tee -a "$out/gpu_steps.jsonl"
}

steps_part() {
    echo "== training steps on the same device: latent ODE, FFJORD, DEQ against" \
        "torchdiffeq / torchdeq"
    : >"$out/gpu_steps.jsonl"
    steps_case latent_ode "${GPU_CHECK_LATENT_S:-130}" python3 \
        benchmarks/latent_ode_step.py --device "$device" --quick --reps 3 --steps 3
    steps_case ffjord "${GPU_CHECK_FFJORD_S:-110}" python3 \
        benchmarks/ffjord_speed.py --device "$device" --quick --cases checkpoint \
        --no-naive --no-jvp
    steps_case deq "${GPU_CHECK_DEQ_S:-55}" python3 benchmarks/deq_torchdeq.py \
        --device "$device" --quick
    python3 benchmarks/_gpu_steps.py check "$out/gpu_steps.jsonl" 3
}

if [ "${GPU_CHECK_ONLY:-}" = steps ]; then
    steps_part
    exit $?
fi

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
    --device "$device" --reps 7 2>"$out/step_gpu.err" | tee "$out/step_gpu.jsonl"

steps_part
exit "$pytest_rc"
