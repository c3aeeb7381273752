"""`markerless demo` and `markerless synth`: the offline end-to-end demo and its synthetic scan generator."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add `demo` and `synth`."""
    from markerless.demo.pass_rule import PASS_DEGREES, PASS_FRACTION, PASS_METRES

    demo = subparsers.add_parser(
        "demo",
        help="end-to-end demo: synthetic scan, embedded broker, daemon, calibration over MQTT, report",
        description=(
            "Runs the whole service offline: synthesizes a textured-room Polycam scan with ground-truth query "
            "views (or uses --scan/--queries), starts an MQTT broker in-process (unless --broker), starts the "
            "daemon, registers the scan through the command topic, publishes each query as a camera would, prints "
            "each pose with its error, and writes OUT/report.html, OUT/poses.png, OUT/query-*.png and "
            f"OUT/results.json. Exit code 0 when at least {PASS_FRACTION:.0%} of the queries are within "
            f"{PASS_METRES * 100:.0f} cm and {PASS_DEGREES:.0f} deg of the ground truth and every foreign image "
            "(foreign/*.jpg next to the queries JSON) is refused; 1 when not; 2 when the demo cannot run."
        ),
    )
    demo.add_argument("--scan", type=Path, help="Polycam raw-data zip to use instead of the synthetic one")
    demo.add_argument("--queries", type=Path,
                      help="queries.json with ground truth for --scan (format of the kitchen/synth queries.json)")
    demo.add_argument("--broker", type=_host_port, metavar="HOST:PORT",
                      help="use this MQTT broker (anonymous, plain TCP) instead of an embedded one")
    demo.add_argument("--out", type=Path, default=Path("markerless-demo"),
                      help="output folder (default: ./markerless-demo)")
    demo.add_argument("--store", type=Path, help="scene store folder (default: OUT/store)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic scan (default: 0)")
    demo.set_defaults(func=run_demo)

    synth = subparsers.add_parser(
        "synth",
        help="write a synthetic Polycam scan with ground-truth queries",
        description=(
            "Renders a richly textured room on the CPU and writes OUT.zip (Polycam raw-data layout), and next to "
            "it, in OUT's folder: queries.json (ground-truth camera-to-world poses in the raw.glb frame, OpenCV "
            "axes, quaternion xyzw), queries/*.jpg and foreign/room-*.jpg (another room, must not localize). "
            "Existing files of those names in that folder are overwritten."
        ),
    )
    synth.add_argument("out", type=Path, metavar="OUT.zip", help="zip to write")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--keyframes", type=int, default=48, help="keyframes on the capture loop (default: 48)")
    synth.add_argument("--queries", type=int, default=10, help="query views with ground truth (default: 10)")
    synth.set_defaults(func=run_synth)


def missing_demo_extra() -> list[str]:
    """Packages of the `demo` extra that are not installed (the service runs without them)."""
    return [name for name in ("amqtt", "matplotlib") if importlib.util.find_spec(name) is None]


def run_demo(args: argparse.Namespace) -> int:
    missing = missing_demo_extra()
    if missing:
        print(f"markerless demo: needs the demo extra ({', '.join(missing)} missing): pip install 'markerless[demo]'",
              file=sys.stderr)
        return 2
    from markerless.cli.scene import silence_glog
    from markerless.demo.scenario import DemoOptions
    from markerless.demo.scenario import run_demo as run
    from markerless.errors import MarkerlessError

    if not getattr(args, "verbose", False):
        # Progress bars and per-query lines are the demo's output; library chatter would interleave with them.
        for name in ("markerless", "amqtt", "transitions", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)
        silence_glog()
    if (args.scan is None) != (args.queries is None):
        print("markerless demo: --scan and --queries go together", file=sys.stderr)
        return 2
    options = DemoOptions(out_dir=args.out, scan=args.scan, queries=args.queries, broker=args.broker,
                          store=args.store, seed=args.seed)
    try:
        return run(options)
    except MarkerlessError as exc:
        print(f"markerless demo: {exc}", file=sys.stderr)
        return 1


def run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from markerless.demo.synth import SynthConf, generate

    if args.out.suffix != ".zip":
        print(f"markerless synth: OUT must end in .zip, got {args.out}", file=sys.stderr)
        return 2
    try:
        with tqdm(total=100, desc="synthesize scan", unit="%") as bar:
            conf = SynthConf(seed=args.seed, num_keyframes=args.keyframes, num_queries=args.queries)
            out = generate(args.out, conf,
                           lambda stage, fraction: bar.update(round(100 * fraction) - bar.n))
    except ValueError as exc:
        print(f"markerless synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out.zip_path} ({out.num_keyframes} keyframes), {out.queries_json} ({out.num_queries} queries), "
          f"{len(out.foreign)} foreign images in {out.zip_path.parent / 'foreign'}")
    return 0
