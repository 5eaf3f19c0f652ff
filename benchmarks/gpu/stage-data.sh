#!/usr/bin/env bash
# Stage the AID-RSICD test split (1,027 images, ~15 MB, plus the 6 MB dataset JSON) inside the checkout, in the
# git-ignored folder .bench-data/, so a GPU call can carry it: ../shared does not travel to the GPU machine.
# Usage, from the repository root:  bash benchmarks/gpu/stage-data.sh [SRC]   (default SRC: ../shared/data/aid-rsicd)
# Then run bench.sh in a call with carry [".bench-data"] (and ".whl" if wheels are needed). The images stay out of
# the repository's history (their licence grants nothing: ../shared/data/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-../shared/data/aid-rsicd}
DST=.bench-data/aid-rsicd
[ -f "$SRC/dataset_rsicd_aid.json" ] || { echo "stage-data.sh: $SRC/dataset_rsicd_aid.json not found" >&2; exit 1; }
grep -qx '/.bench-data/' .git/info/exclude 2>/dev/null || echo '/.bench-data/' >> .git/info/exclude
rm -rf "$DST" && mkdir -p "$DST/images"
cp "$SRC/dataset_rsicd_aid.json" "$DST/"
python3 - "$SRC" "$DST" <<'PY'
import json, shutil, sys
src, dst = sys.argv[1:]
doc = json.load(open(f"{src}/dataset_rsicd_aid.json"))
names = [e["filename"] for e in doc["images"] if e["split"] == "test"]
for n in names:
    shutil.copy(f"{src}/images/{n}", f"{dst}/images/{n}")
print(f"staged {len(names)} test images in {dst}")
PY
du -sh .bench-data
