"""Cost of refusing hostile inputs: a Polycam zip whose raw.glb is 2 GiB of zeros, and a 110 KB PNG declaring
30000 x 30000 pixels. Each runs in a fresh process; wall time and that process's peak RSS (wait4) are compared
with a control run of the same command on a harmless input (same imports, refused or failing just as early).

    python bench/bench_input_bombs.py [--kitchen DIR] [--out REPORT.json]

Rows: `register` on the GLB bomb (refused from the size the zip declares), the same zip ingested with the mesh
size limit raised to 4 GiB (refused from the GLB header: the path for a bomb under the size limit), and
`localize` on the PNG bomb (refused from the PNG header).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

INGEST_RAISED_LIMIT = """
import sys
from pathlib import Path
from markerless.errors import DatasetError
from markerless.scene.polycam import ingest
from markerless.scene.limits import IngestLimits
try:
    ingest(Path(sys.argv[1]), Path(sys.argv[2]), IngestLimits(max_mesh_bytes=4 * 2**30))
except DatasetError as exc:
    print(exc, file=sys.stderr)
"""


def run(args: list[str]) -> dict[str, float | str]:
    """A fresh Python process: wall seconds, its own peak RSS (MB) and the last line it printed on stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode().replace("\r", "\n")
    _, _, usage = os.wait4(proc.pid, 0)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "message": lines[-1][-160:] if lines else ""}


def mesh_bomb_zip(source: Path, dest: Path, size: int) -> Path:
    """`source` (a Polycam zip) with raw.glb replaced by `size` zero bytes, deflated while streaming."""
    chunk = bytes(64 * 2**20)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        mesh = next(n for n in src.namelist() if n.endswith("raw.glb"))
        for name in src.namelist():
            if name != mesh:
                out.writestr(name, src.read(name))
        info = zipfile.ZipInfo(mesh)
        info.compress_type = zipfile.ZIP_DEFLATED
        with out.open(info, "w", force_zip64=True) as member:
            for start in range(0, size, len(chunk)):
                member.write(chunk[: min(len(chunk), size - start)])
    return dest


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height black pixels (~110 KB; 2.7 GB once decoded to BGR)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row * min(1000, height - y)) for y in range(0, height, 1000))
    idat += compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                           "../shared/data/kitchen")))
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args()
    cli = ["-m", "markerless.cli"]
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bomb = mesh_bomb_zip(args.kitchen / "kitchen-poly.zip", tmp / "bomb.zip", 2 * 2**30)
        control = mesh_bomb_zip(args.kitchen / "kitchen-poly.zip", tmp / "control.zip", 64)
        report["glb_bomb_register"] = {
            "zip_mb": round(bomb.stat().st_size / 2**20, 1),
            "bomb": run([*cli, "register", str(bomb), "--scene", "b", "--store", str(tmp / "store")]),
            "control": run([*cli, "register", str(control), "--scene", "c", "--store", str(tmp / "store")]),
        }
        report["glb_bomb_ingest_raised_limit"] = {
            "bomb": run(["-c", INGEST_RAISED_LIMIT, str(bomb), str(tmp / "out-bomb")]),
            "control": run(["-c", INGEST_RAISED_LIMIT, str(control), str(tmp / "out-control")]),
        }
        (tmp / "bomb.png").write_bytes(png_bomb())
        (tmp / "small.png").write_bytes(png_bomb(64, 48))
        localize = [*cli, "localize", "--scene", "none", "--store", str(tmp / "store"), "--intrinsics"]
        report["png_bomb_localize"] = {
            "png_kb": round((tmp / "bomb.png").stat().st_size / 1024, 1),
            "bomb": run([*localize, "500,500,320,240", str(tmp / "bomb.png")]),
            "control": run([*localize, "50,50,32,24", str(tmp / "small.png")]),
        }
    for row in report.values():
        row["rss_growth_mb"] = row["bomb"]["peak_rss_mb"] - row["control"]["peak_rss_mb"]
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
