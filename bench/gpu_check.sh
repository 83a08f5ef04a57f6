#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA (CI has none; the tests skip these there):
# the CUDA tests (the kernels on the device, DALI's GPU pipeline and the user's DALI transform in it,
# images decoded by nvJPEG, a selection round on CUDA), then bench/gpu.py's figures (loader, JPEG
# decoding, kernels, a round; device / CPU).
#
#     bash bench/gpu_check.sh [OUT]    # logs, gpu.json and gpu.png go to OUT (default bench/results)
#
# A machine that reaches no package registry gets the missing packages as wheels in .whl/ (zarr,
# numcodecs, DALI and their needs, built for its Python); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, nvidia.dali, zarr; print('torch', torch.__version__, torch.cuda.get_device_name(), '| dali', nvidia.dali.__version__, '| zarr', zarr.__version__)" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/loaders/test_gpu.py -k "cuda or gpu" 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python3 bench/gpu.py --out "$out" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, bench exit $bench"
exit $((tests || bench))
