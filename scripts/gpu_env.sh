# Sourced by the device scripts (gpu_check.sh, gpu_ab.sh): `gpu_env FILE` writes the date, the
# GPU (nvidia-smi, where there is one) and the Python, jax, flax and optax versions and jax's
# devices to FILE and stdout, with "$python" as the interpreter.
gpu_env() {
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
      --format=csv 2>&1 || true
    "$python" -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax',
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  } 2>&1 | tee "$1"
}
