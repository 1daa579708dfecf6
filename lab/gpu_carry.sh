#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what a lent GPU machine lacks for lab.check_gpu and lab.gpu_speed,
# and prints the command to run there. That machine has Python 3.12 with torch, timm, numpy,
# scipy and scikit-image, and nothing can be installed from a registry; a call carries 64 MiB.
# Carried: the wheels of rasterio, pyzmq and shapely (the versions requirements/worker.txt pins)
# with rasterio's small dependencies, and the Sentinel-2 demo raster (14 MB). Left behind:
# pyogrio (33 MB; builds skip tiles.gpkg without it) and the converted backbone (87 MB; both
# tools use random weights). Run: lab/gpu_carry.sh (after scripts/setup), then the device
# tool's run with carry [".gpu"], timeout_s 480 and the printed command (on the eighteenth stop
# check_gpu took about 40 s there, and gpu_speed's pool runs about a minute each; since the
# nineteenth it runs 6 builds drawn on the GPU, then the 2 pool builds, which its 400 s may cut:
# what it measured by then is in gpu_speed.json).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/scripts/lib.sh"
ensure_worker_venv >/dev/null
out="$REPO/.gpu"
mkdir -p "$out"
pin() { grep -E "^$1==" "$REPO/requirements/worker.txt"; }
"$REPO/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" "$(pin rasterio)" "$(pin pyzmq)" "$(pin shapely)" affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2
raster="$("$REPO/.venv/bin/python" -c 'from worker.assets import load_asset_paths; print(load_asset_paths()["s2_rgb"])')"
cp "$raster" "$out/"
du -sh "$out" >&2
cat <<CMD
set -o pipefail; export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site:. || exit 1; timeout 90 python3 -m lab.check_gpu --raster .gpu/$(basename "$raster") --random-weights 2>&1 | tee \$OUT/check_gpu.log; timeout 400 python3 -m lab.gpu_speed --raster .gpu/$(basename "$raster") --copies 60 --json \$OUT/gpu_speed.json 2>&1 | tee \$OUT/gpu_speed.log
CMD
