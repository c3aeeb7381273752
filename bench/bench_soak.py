"""Soak: 10 cameras at 1 Hz through a real mosquitto into `markerless serve` (real core, kitchen scan), with a
broker restart in the middle. Reports whether every request was answered exactly once, the reply outcomes, and
the service's RSS after warm-up (flat within 10% is the target).

    python bench/bench_soak.py [--kitchen DIR] [--duration 600] [--cameras 10] [--rate 1] [--out soak.json]

On 2 CPU cores a localization takes ~0.4-1 s, so 10 frames/s exceed the worker: a camera's newer frame replaces
its queued older one, which is answered `superseded`. That is the designed behaviour under overload and still
one answer per request. Registration of the kitchen (at start, via scenes.yaml) is not part of the soak time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from mqtt_rig import PREFIX, Broker, Collector, client, rss_mb, serve_config, start_serve

from markerless.scene.queries import load_queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR", "")))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of camera traffic")
    parser.add_argument("--cameras", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1.0, help="frames per second per camera")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the duration counted as warm-up")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    queries = load_queries(args.kitchen / "queries.json")
    frames = [(args.kitchen / q["image"]).read_bytes() for q in queries]

    with tempfile.TemporaryDirectory(prefix="markerless-soak-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp / "broker")
        broker.start()
        scenes = {"scenes": {"kitchen": {"dataset": str(args.kitchen / "kitchen-poly.zip")}},
                  "cameras": {f"cam{i}": {"scene": "kitchen", "intrinsics": queries[0]["intrinsics"]}
                              for i in range(args.cameras)}}
        config = serve_config(tmp / "serve.yaml", broker.port, tmp / "store", scenes, mqtt={"protocol": "5"},
                              worker={"deadline_s": 60})
        collector = Collector(broker.port)
        serve = start_serve(config, tmp / "serve.log")
        t0 = time.monotonic()
        if not collector.collected(lambda: any(d.get("status") == "success" for d in collector.registrations), 1800):
            raise SystemExit(f"kitchen registration did not finish: {(tmp / 'serve.log').read_text()[-3000:]}")
        print(f"kitchen registered in {time.monotonic() - t0:.0f} s; soak for {args.duration:.0f} s")

        cams = [client(broker.port) for _ in range(args.cameras)]
        sent: list[str] = []
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def drive() -> None:
            import base64

            n = 0
            start = time.monotonic()
            while not stop.is_set():
                for i, cam in enumerate(cams):
                    request_id = f"cam{i}-{n}"
                    body = {"calibrate": True, "request_id": request_id,
                            "image": base64.b64encode(frames[(n + i) % len(frames)]).decode()}
                    cam.publish(f"{PREFIX}/image/calibration/camera/cam{i}", json.dumps(body), wait=False)
                    sent.append(request_id)
                n += 1
                stop.wait(max(0.0, start + n / args.rate - time.monotonic()))

        driver = threading.Thread(target=drive, daemon=True)
        start = time.monotonic()
        driver.start()
        restarted_at = None
        while (elapsed := time.monotonic() - start) < args.duration:
            samples.append((elapsed, rss_mb(serve.pid)))
            if restarted_at is None and elapsed >= args.duration / 2:
                broker.stop()
                time.sleep(2.0)  # the broker is away for a moment, as in a container restart
                broker.start()
                restarted_at = elapsed
                print(f"broker restarted at {elapsed:.0f} s")
            time.sleep(5.0)
        stop.set()
        driver.join()
        expected = set(sent)
        collector.collected(lambda: expected <= set(collector.replies), 300)
        samples.append((time.monotonic() - start, rss_mb(serve.pid)))
        serve.terminate()
        exit_code = serve.wait(timeout=120)
        broker.stop()

    counts = Counter(len(collector.replies.get(r, [])) for r in expected)
    outcomes = Counter(d.get("reason") or "success" for r in expected for d in collector.replies.get(r, []))
    extra = set(collector.replies) - expected
    warm = [rss for t, rss in samples if t >= args.warmup * args.duration]
    base = warm[0]
    report = {
        "duration_s": args.duration, "cameras": args.cameras, "rate_hz": args.rate,
        "broker_restart_at_s": restarted_at, "requests": len(expected),
        "answered_once": counts.get(1, 0), "unanswered": counts.get(0, 0),
        "answered_more_than_once": sum(v for k, v in counts.items() if k > 1), "unexpected_replies": len(extra),
        "outcomes": dict(outcomes), "serve_exit_code": exit_code,
        "rss_mb": {"after_warmup": round(base, 1), "max": round(max(warm), 1), "last": round(warm[-1], 1),
                   "median": round(statistics.median(warm), 1), "max_over_after_warmup": round(max(warm) / base, 3)},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps({**report, "rss_samples": samples}, indent=1))
    return 0 if counts.get(1, 0) == len(expected) else 1


if __name__ == "__main__":
    raise SystemExit(main())
