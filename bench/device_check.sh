#!/usr/bin/env bash
# GPU check: correctness (tests marked gpu) then speed (bench/bench_device.py), one JSON of figures under $OUT.
#
#   bash bench/device_check.sh --download   # here, once: wheels for the device's Python 3.12 into .whl/ (git-ignored)
#   bash bench/device_check.sh              # on the device machine (carry .whl): CUDA tests + speed, < 8 min
#   bash bench/device_check.sh --cpu        # anywhere: the same tests on the CPU, no speed part (CI)
#
# The device machine has Python 3.12 with its own CUDA torch, numpy, scipy, h5py, OpenCV, psutil, PyYAML and
# pytest; the rest of what the checks import travels as wheels (about 47 MB: pycolmap 38 MB, kornia and
# kornia_rs, trimesh, pydantic). Left out on purpose: embreex (15 MB; trimesh falls back to its own ray casting,
# needed only where depth is missing), MQTT and service packages (not used by the checks).
# Exit status: 0 when every correctness test passed (speed figures never fail the check), non-zero otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pycolmap==4.2.1 kornia==0.9.0 kornia_rs==0.2.0 trimesh==5.2.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5)

mode=${1:-}
if [[ "$mode" == "--download" ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/out/device-check}
mkdir -p "$OUT"
if ! "$PYTHON" -c "import pycolmap, kornia, trimesh, pydantic" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "missing packages and no .whl/: run 'bash bench/device_check.sh --download' first" >&2
    exit 3
  fi
  site=${TMPDIR:-/tmp}/markerless-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 3
  export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ "$mode" != "--cpu" ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "torch sees no CUDA device here: use --cpu to run the checks on the CPU" >&2
  exit 4
fi
pytest_args=(-q -p no:cacheprovider -m gpu tests/test_gpu.py --timeout 300 --junitxml "$OUT/gpu-tests.xml")
[[ "$mode" == "--cpu" ]] && pytest_args+=(--cpu)
"$PYTHON" -m pytest "${pytest_args[@]}" 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

if [[ "$mode" != "--cpu" ]]; then
  timeout 420 "$PYTHON" bench/bench_device.py --out "$OUT/device-speed.json" 2>&1 | tee "$OUT/device-speed.log" \
    || echo "speed part failed or timed out (see device-speed.log); correctness result unchanged" >&2
fi

"$PYTHON" - "$OUT" "$tests_rc" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, rc = Path(sys.argv[1]), int(sys.argv[2])
suite = ET.parse(out / "gpu-tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
speed = out / "device-speed.json"
report = {"correctness_ok": rc == 0, "pytest_exit": rc, "tests": tests,
          "failed": [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None],
          "speed": json.loads(speed.read_text()) if speed.exists() else None}
(out / "device-check.json").write_text(json.dumps(report, indent=1))
print(json.dumps({k: v for k, v in report.items() if k != "speed"}))
EOF
exit "$tests_rc"
