#!/bin/bash
# The fast-path benchmark and GPU tests on the lent H200 (see bench/FAST_NOTES.md, "H200").
# Installs the carried gsplat wheel; loads a carried prebuilt gsplat extension (.whl/gsplat_cuda.so.xz)
# when there is one, else JIT-builds it and leaves the build in $OUT for the next call.
# Usage: bash bench/fast_device.sh "<pytest args or empty>" "<fast_bench.py args>"
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
if [ -f .whl/gsplat_cuda.so.xz ]; then
    mkdir -p /tmp/prebuilt && python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" \
        .whl/gsplat_cuda.so.xz > /tmp/prebuilt/gsplat_cuda.so
    mkdir -p /tmp/shim && cat > /tmp/shim/sitecustomize.py <<'PY'
import importlib.util, sys
import torch  # noqa: F401  (the extension links against libtorch)
spec = importlib.util.spec_from_file_location("gsplat_cuda", "/tmp/prebuilt/gsplat_cuda.so")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["gsplat.csrc"] = module  # gsplat.cuda._backend tries `from gsplat import csrc` first
PY
    export PYTHONPATH=/tmp/shim:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
start=$(date +%s)
python3 -c "from gsplat.cuda._backend import _C; print('gsplat extension', _C.__file__)" 2>&1 | tail -2
echo "gsplat ready in $(( $(date +%s) - start )) s"
if [ ! -f .whl/gsplat_cuda.so.xz ]; then
    so=$(python3 -c "from torch.utils.cpp_extension import _get_build_directory as d; print(d('gsplat_cuda', False))")/gsplat_cuda.so
    python3 -c "import lzma, sys; lzma.open(sys.argv[2], 'wb', preset=6).write(open(sys.argv[1], 'rb').read())" \
        "$so" "$OUT/gsplat_cuda.so.xz"; ls -la "$so" "$OUT/gsplat_cuda.so.xz"
fi
if [ -n "$1" ]; then
    timeout 200 python3 -m pytest -q -s $1 2>&1 | tee "$OUT/tests.log" | grep -v "^$" | tail -25
fi
timeout 480 python3 bench/fast_bench.py $2 2>&1 | tee "$OUT/bench.log"
cp bench/results/fast.json "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - start )) s"
