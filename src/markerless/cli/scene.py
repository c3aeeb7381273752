"""Commands on scenes, with no broker: `register`, `localize`, `eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from markerless.pipeline.intrinsics_mode import IntrinsicsMode

DEFAULT_STORE = Path(os.environ.get("MARKERLESS_STORE", "store"))


def _add_scene_config(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scene configuration (SceneScape's six fields)")
    group.add_argument("--scene-config", type=Path, help="YAML/JSON file with the six fields")
    group.add_argument("--global-feature", help="vlad (default, no weights) or netvlad")
    group.add_argument("--local-feature", help="JSON dict or name, e.g. sift or '-' (dense)")
    group.add_argument("--matcher", help="JSON dict or name, e.g. NN-ratio or qta_indoor")
    group.add_argument("--number-of-localizations", type=int, help="top-K retrieved keyframes (default 50)")
    group.add_argument("--minimum-number-of-matches", type=int, help="quality gate (default 20)")
    group.add_argument("--inlier-threshold", type=float, help="quality gate (default 0.5)")
    parser.add_argument("--no-depth", action="store_true", help="3D points by mesh ray casting only")
    parser.add_argument("--weights-dir", type=Path, help="pretrained weights (default $MARKERLESS_WEIGHTS_DIR)")


def _conf_dict(value: str) -> dict[str, Any]:
    value = value.strip()
    return json.loads(value) if value.startswith("{") else {value: {}}


def scene_config(args: argparse.Namespace):  # -> SceneConfig
    """The six fields from --scene-config, overridden by individual options."""
    from pydantic import ValidationError

    from markerless.scene.config import SceneConfig

    base: dict[str, Any] = {}
    try:
        if args.scene_config:
            base = SceneConfig.from_file(args.scene_config).model_dump()
        for key in ("global_feature", "number_of_localizations", "minimum_number_of_matches", "inlier_threshold"):
            if getattr(args, key) is not None:
                base[key] = getattr(args, key)
        for key in ("local_feature", "matcher"):
            if getattr(args, key) is not None:
                base[key] = _conf_dict(getattr(args, key))
        return SceneConfig.model_validate(base)
    except (ValidationError, ValueError) as exc:
        args.usage_error(f"invalid scene configuration: {exc}")


def silence_glog() -> None:
    """pycolmap logs through glog straight to stderr, which tears progress bars apart and buries a command's own
    messages: keep only its errors. Commands call this unless `--verbose` asks for everything."""
    import pycolmap

    pycolmap.logging.minloglevel = pycolmap.logging.ERROR


_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"  # percent, bar, times; no meaningless %/s


class _ProgressBars:
    """One tqdm bar per registration stage on stderr, each advancing as its stage reports: stages report in turn
    (keyframe by keyframe, `features` then `points3d`), so a stage's bar is resumed, never restarted. On a
    terminal the bars stand on their own lines, redrawn in place and erased at the end; on a file or pipe (not a
    TTY) tqdm's plain ASCII form is used on one line, every whole-percent step written (at most 100 per stage), a
    finished stage left at 100 %. Closed before any result or error is printed."""

    def __init__(self, verbose: bool) -> None:
        self.bars: dict[str, Any] = {}
        self.tty = sys.stderr.isatty()
        if not verbose:
            silence_glog()

    def __call__(self, stage: str, fraction: float) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            # without a terminal, every bar on line 0: tqdm would move the cursor with escape codes otherwise
            where = {"position": len(self.bars), "leave": False} if self.tty else {
                "position": 0, "leave": True, "ascii": True, "ncols": 80, "mininterval": 0}
            bar = self.bars[stage] = tqdm(total=100, desc=stage, file=sys.stderr, bar_format=_BAR, **where)
        if bar.disable:  # closed: the stage had finished
            return
        bar.update(round(fraction * 100) - bar.n)
        if not self.tty and bar.n >= 100:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cmd_register(args: argparse.Namespace) -> int:
    from markerless.errors import MarkerlessError
    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.registration import RegistrationOptions, register_scene
    from markerless.scene.store import SceneStore

    config = scene_config(args)
    try:
        with _ProgressBars(args.verbose) as bars:
            info = register_scene(
                SceneStore(args.store), args.scene, args.scan, config, FeatureModels(weights_dir=args.weights_dir),
                progress=bars, options=RegistrationOptions(use_depth=not args.no_depth),
            )
    except MarkerlessError as exc:
        print(f"markerless: registration failed ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    print(f"registered scene {info.scene_id} version {info.version}: {info.num_keyframes} keyframes in {info.path}")
    return 0


def _numbers(count: tuple[int, ...], what: str) -> Callable[[str], list[float]]:
    """argparse type: `count` comma-separated numbers (a bad value is a usage error, exit 2)."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if len(values) not in count:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def cmd_localize(args: argparse.Namespace) -> int:
    from markerless.errors import MarkerlessError, Reason
    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.image_decoding import decode_image
    from markerless.pipeline.localization import LocalizationResult, Localizer
    from markerless.scene.camera import Camera
    from markerless.scene.store import SceneStore

    intr = args.intrinsics
    mode = args.intrinsics_mode or ("refine" if intr else "estimate")
    if intr is None and mode != "estimate":
        args.usage_error(f"--intrinsics-mode {mode} needs --intrinsics (or use --intrinsics-mode estimate)")
    if args.distortion is not None and intr is None:
        args.usage_error("--distortion needs --intrinsics: a lens is given with its camera (without intrinsics, "
                         "--intrinsics-mode estimate estimates both)")
    if not args.verbose:
        silence_glog()  # pycolmap's INFO lines ("Creating SIFT CPU feature extractor") are not the user's business
    try:
        image = decode_image(args.image.read_bytes())  # a bad frame is refused before the scene is loaded
        scene = SceneStore(args.store).load(args.scene)
        camera = None
        if intr is not None:
            fx, fy, cx, cy = intr
            camera = Camera.from_matrix(
                [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], image.shape[1], image.shape[0], args.distortion or (),
            )
        result = Localizer(FeatureModels(weights_dir=args.weights_dir)).localize(scene, image, camera, mode)
    except OSError as exc:
        result = LocalizationResult(False, Reason.BAD_IMAGE, f"{args.image}: {exc.strerror or exc}")
    except MarkerlessError as exc:
        result = LocalizationResult(False, exc.reason, str(exc), scene_id=args.scene)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    elif result.success:
        q, t = result.quaternion, result.translation
        print(f"pose (camera-to-world, scene frame, OpenCV axes): quaternion xyzw {[round(v, 6) for v in q]} "
              f"translation m {[round(v, 4) for v in t]}")
        print(f"{result.num_inliers}/{result.num_matches} inliers ({result.inlier_ratio:.2f}), "
              f"reprojection {result.reprojection_error_px:.2f} px, {result.timings_ms['total']:.0f} ms")
        k = result.intrinsics
        print(f"camera ({result.intrinsics_source}): fx {k[0][0]:.1f} fy {k[1][1]:.1f} cx {k[0][2]:.1f} "
              f"cy {k[1][2]:.1f} distortion {[round(v, 4) for v in result.distortion]}; 1 sigma: position "
              f"{_fmt(result.position_sigma_m, 3)} m, rotation {_fmt(result.rotation_sigma_deg, 2)} deg")
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    else:
        print(f"localization failed ({result.reason}): {result.message}", file=sys.stderr)
    if args.overlay is not None:
        if not result.success:
            print(f"markerless: no overlay written to {args.overlay}: the localization failed", file=sys.stderr)
        else:
            from markerless.pipeline.overlay import overlay_for_result, scene_mesh

            overlay = overlay_for_result(image, result, scene_mesh(scene.path))
            args.overlay.write_bytes(overlay.png)
            print(f"overlay {overlay.width}x{overlay.height} written to {args.overlay} (scan/image edge agreement "
                  f"{overlay.edge_score:.2f})", file=sys.stderr)
    return 0 if result.success else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from markerless.errors import MarkerlessError
    from markerless.pipeline.evaluation import evaluate
    from markerless.pipeline.registration import RegistrationOptions

    config = scene_config(args)
    try:
        summary, outcomes, foreign = evaluate(
            args.scan, args.queries, config, args.foreign, RegistrationOptions(use_depth=not args.no_depth),
            weights_dir=args.weights_dir, mode=args.intrinsics_mode,
        )
    except MarkerlessError as exc:
        print(f"markerless: evaluation failed ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    print(f"{'image':<36} {'ok':>3} {'t_err cm':>9} {'r_err deg':>9} {'matches':>8} {'inliers':>8} {'ratio':>6} "
          f"{'s':>6}")
    for o in outcomes + foreign:
        print(f"{o.name[-36:]:<36} {'y' if o.success else 'n':>3} {o.translation_error_m * 100:>9.2f} "
              f"{o.rotation_error_deg:>9.2f} {o.num_matches:>8} {o.num_inliers:>8} {o.inlier_ratio:>6.2f} "
              f"{o.latency_s:>6.2f}  {o.reason or ''}")
    for key, value in summary.items():
        if key != "config":
            print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps({
            **summary,
            "queries": [o.as_dict() for o in outcomes],
            "foreign": [o.as_dict() for o in foreign],
        }, indent=1, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add `register`, `localize` and `eval`."""
    p = subparsers.add_parser("register", help="register a Polycam raw-data zip as a scene")
    p.add_argument("scan", type=Path, help="Polycam raw-data export (.zip)")
    p.add_argument("--scene", required=True, help="scene id")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE,
                   help="scene store (default $MARKERLESS_STORE or ./store)")
    _add_scene_config(p)
    p.set_defaults(func=cmd_register, usage_error=p.error)

    p = subparsers.add_parser(
        "localize", help="localize one image against a registered scene",
        description="Pose of one camera image in a registered scene, and the camera used. Exit status: 0 pose, "
        "1 no pose (the reason on stderr, or in the JSON), 2 usage.")
    p.add_argument("image", type=Path, help="JPEG or PNG from the camera")
    p.add_argument("--scene", required=True, help="scene id")
    p.add_argument("--intrinsics", type=_numbers((4,), "fx,fy,cx,cy"),
                   help="fx,fy,cx,cy in pixels (COLMAP convention); omit with --intrinsics-mode estimate")
    p.add_argument("--distortion", type=_numbers((4, 5), "k1,k2,p1,p2[,k3]"),
                   help="OpenCV k1,k2,p1,p2[,k3], with --intrinsics; negative values as they are: "
                   "--distortion -0.28,0.09,0,0")
    _add_intrinsics_mode(p, "default: refine with --intrinsics, estimate without")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="scene store")
    p.add_argument("--weights-dir", type=Path, help="pretrained weights (default $MARKERLESS_WEIGHTS_DIR)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON (also a usage error)")
    p.add_argument("--overlay", type=Path, metavar="OUT.png",
                   help="write the frame with the scan drawn through the returned camera, inliers and outliers")
    p.set_defaults(func=cmd_localize, usage_error=p.error)

    p = subparsers.add_parser("eval", help="accuracy of a scan against queries with ground truth")
    p.add_argument("scan", type=Path, help="Polycam raw-data export (.zip)")
    p.add_argument("queries", type=Path, help="queries JSON (format of the kitchen test set)")
    p.add_argument("--foreign", type=Path, help="folder of images of other places (must be rejected)")
    p.add_argument("--json", type=Path, help="write the summary and per-query results here")
    _add_intrinsics_mode(p, "overrides each query's; default: its own, else refine, or estimate without intrinsics")
    _add_scene_config(p)
    p.set_defaults(func=cmd_eval, usage_error=p.error)


def _add_intrinsics_mode(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--intrinsics-mode", choices=get_args(IntrinsicsMode),
                        help=f"fixed: intrinsics exact; refine: a starting point; estimate: unknown ({default})")


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
