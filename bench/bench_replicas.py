"""Throughput of `markerless serve` replicas on one shared-subscription group: 1 replica, then 2, same run.

Real core, kitchen scan, a real mosquitto. Each round publishes --frames kitchen queries at once, from distinct
cameras (so none supersedes another), and times until every reply is in; requests per second are frames /
seconds, and the report gives the 2-replica rate as a ratio to the 1-replica rate measured in the same run.

    python bench/bench_replicas.py [--kitchen DIR] [--frames 60] [--device cpu|cuda] [--out replicas.json]

On one machine the replicas share its cores (or its GPU, with --device cuda): the ratio says what a second
process adds there; replicas on more machines add their own hardware.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
from pathlib import Path

from mqtt_rig import PREFIX, Broker, Collector, client, serve_config, start_serve

from markerless.demo.mqtt_client import RecordingClient
from markerless.scene.queries import load_queries


def run_round(collector: Collector, cam: RecordingClient, frames: list[bytes], tag: str, count: int) -> float:
    ids = [f"{tag}-{i}" for i in range(count)]
    start = time.monotonic()
    for i, request_id in enumerate(ids):
        image = base64.b64encode(frames[i % len(frames)]).decode()
        body = {"calibrate": True, "request_id": request_id, "image": image}
        cam.publish(f"{PREFIX}/image/calibration/camera/cam{i}", json.dumps(body), wait=False)
    if not collector.collected(lambda: all(r in collector.replies for r in ids), 1800):
        raise SystemExit(f"round {tag}: not every frame answered")
    elapsed = time.monotonic() - start
    failures = [d.get("reason") for r in ids for d in collector.replies[r] if not d.get("success")]
    if failures:
        raise SystemExit(f"round {tag}: failures {failures[:5]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR", "")))
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--device", default=None, help="worker.device of the replicas (default: auto)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    queries = load_queries(args.kitchen / "queries.json")
    frames = [(args.kitchen / q["image"]).read_bytes() for q in queries]
    scenes = {"scenes": {"kitchen": {"dataset": str(args.kitchen / "kitchen-poly.zip")}},
              "cameras": {f"cam{i}": {"scene": "kitchen", "intrinsics": queries[0]["intrinsics"]}
                          for i in range(args.frames)}}
    worker = {"queue_size": args.frames + 1, "deadline_s": 1800, **({"device": args.device} if args.device else {})}
    procs = []
    with tempfile.TemporaryDirectory(prefix="markerless-replicas-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp / "broker")
        broker.start()
        collector = Collector(broker.port)
        cam = client(broker.port)
        try:
            rates = {}
            for n in (1, 2):
                config = serve_config(tmp / f"replica-{n}.yaml", broker.port, tmp / "store", scenes,
                                      mqtt={"protocol": "5", "shared_group": "bench", "client_id": f"replica-{n}"},
                                      worker=worker)
                procs.append(start_serve(config, tmp / f"replica-{n}.log"))
                wanted = f"{PREFIX}/sys/autocalibration/availability/replica-{n}"
                if not collector.collected(lambda wanted=wanted: collector.availability.get(wanted) == b"online", 600):
                    raise SystemExit(f"replica-{n} did not come up")

                def registered(n: int = n) -> bool:
                    return sum(d.get("status") == "success" for d in collector.registrations) >= n

                if not collector.collected(registered, 1800):
                    raise SystemExit("kitchen registration did not finish")
                run_round(collector, cam, frames, f"warm{n}", 4 * n)  # models and scene loaded in every replica
                elapsed = run_round(collector, cam, frames, f"r{n}", args.frames)
                rates[n] = args.frames / elapsed
                print(f"{n} replica(s): {args.frames} frames in {elapsed:.1f} s = {rates[n]:.2f} requests/s")
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=120)
            broker.stop()
    report = {"frames": args.frames, "device": args.device or "auto", "cpu_count": os.cpu_count(),
              "requests_per_s": {str(k): round(v, 3) for k, v in rates.items()},
              "ratio_2_over_1": round(rates[2] / rates[1], 3)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
