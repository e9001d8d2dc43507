#!/usr/bin/env bash
# Fetch, here, the wheels that tools/gpu_check.sh installs on a lent GPU machine (Python 3.12, x86-64, no internet
# there), into .whl/ (ignored by git). Two wheels are trimmed to fit the 64 MiB that may travel with the tree:
# comfy-kitchen without its AMD (HIP) library, bitsandbytes with only its CUDA 13 and CPU libraries.
#   bash tools/gpu_wheels.sh        then carry ".whl" with tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    --platform any -d .whl \
    diffusers==0.42.1 gguf==0.19.0 comfy-kitchen==0.2.40 bitsandbytes==0.50.2 huggingface_hub==2.4.0 httpx2 httpcore2 \
    importlib_metadata platformdirs
python3 - <<'EOF'
import re
import zipfile
from pathlib import Path

KEEP = {
    "comfy_kitchen": lambda name: "backends/hip/_C" not in name,
    "bitsandbytes": lambda name: not re.search(r"libbitsandbytes_(cuda1[0-2]|rocm|xpu)", name),
}
for wheel in Path(".whl").glob("*.whl"):
    keep = next((f for k, f in KEEP.items() if wheel.name.startswith(k)), None)
    if keep is None:
        continue
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not keep(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):  # the files left out are left out of RECORD too
                data = b"".join(line for line in data.splitlines(True) if keep(line.decode().split(",")[0]))
            dst.writestr(item, data)
    trimmed.replace(wheel)
EOF
du -ch .whl/*.whl | tail -1
