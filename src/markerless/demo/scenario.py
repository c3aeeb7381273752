"""`markerless demo`: the whole service exercised the way SceneScape uses it, on one machine, offline.

Steps: synthesize a scan with ground truth (or take a real one), start an MQTT broker in-process (or use
`--broker`), start the daemon, register the scan with a command-topic request, publish each query frame as a
camera pipeline (Percebro) would, collect the pose replies, compare them with the ground truth, write a report.
Everything the demo measures travels over MQTT; the only side channel is the report's inlier pixels, which pose
replies do not carry: the daemon's localizer is wrapped to keep each result's `inlier_points2d`, keyed by a digest
of the decoded image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markerless.demo.pass_rule import PASS_DEGREES, PASS_FRACTION, PASS_METRES, pass_verdict
from markerless.errors import MarkerlessError, Reason

if TYPE_CHECKING:
    import numpy as np

    from markerless.demo.frames import Query
    from markerless.demo.mqtt_client import RecordingClient
    from markerless.pipeline.evaluation import QueryOutcome

# Imported by the CLI, so this module imports nothing heavy at the top (geometry, report, paho: inside).
CAMERA_ID = "demo-camera"
SYNTH_NAME = "synthroom.zip"

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    out_dir: Path  # report, results.json and (by default) the synthetic scan and the store go here
    scan: Path | None = None  # Polycam zip; None synthesizes one
    queries: Path | None = None  # queries.json with ground truth (required with `scan`)
    broker: tuple[str, int] | None = None  # external broker; None starts one in-process
    store: Path | None = None  # scene store; default out_dir/store
    seed: int = 0  # synthetic scan seed
    registration_timeout_s: float = 1800.0
    query_timeout_s: float = 600.0


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()


class _RecordingLocalizer:
    """The daemon's Localizer, keeping each full result (inlier pixels included) for the report."""

    def __init__(self, localizer: Any, results: dict[str, Any]) -> None:
        self._localizer = localizer
        self._results = results
        self._lock = threading.Lock()

    def localize(self, scene: Any, image: np.ndarray, camera: Any, mode: str = "refine") -> Any:
        result = self._localizer.localize(scene, image, camera, mode)
        with self._lock:
            self._results[_digest(image)] = result
        return result


def _camera_client(host: str, port: int, topics: list[str]) -> RecordingClient:
    """The demo's side of MQTT (3.1.1, as the embedded broker speaks), subscribed to `topics`."""
    from markerless.demo.mqtt_client import MqttTimeout, RecordingClient

    client = RecordingClient(host, port, protocol="3.1.1", client_id=f"markerless-demo-cam-{os.getpid()}")
    try:
        client.connect()
        client.subscribe(*topics)
    except MqttTimeout as exc:
        client.close()
        raise MarkerlessError(f"MQTT broker {host}:{port} did not acknowledge the demo's subscriptions",
                              reason=Reason.BROKER_UNAVAILABLE) from exc
    return client


def _publish(client: RecordingClient, topic: str, payload: dict[str, Any]) -> None:
    client.publish(topic, json.dumps(payload))


def _reply(client: RecordingClient, topic: str, request_id: str, timeout: float) -> dict[str, Any]:
    """Next message on `topic` echoing `request_id` (requests echoed back on shared topics are skipped)."""
    from markerless.demo.mqtt_client import MqttTimeout

    try:
        return client.take_json(topic, lambda d: d.get("request_id") == request_id and "command" not in d,
                                f"a reply on {topic} for request {request_id}", timeout)
    except MqttTimeout as exc:
        raise MarkerlessError(f"no reply on {topic} for request {request_id} within {timeout:.0f} s",
                              reason=Reason.TIMEOUT) from exc


def _synthesize(out_dir: Path, seed: int) -> tuple[Path, Path]:
    from tqdm import tqdm

    from markerless.demo.synth import SynthConf, generate

    with tqdm(total=100, desc="synthesize scan", unit="%", bar_format="{l_bar}{bar}| {elapsed}") as bar:
        def progress(stage: str, fraction: float) -> None:
            bar.set_postfix_str(stage)
            bar.update(round(100 * fraction) - bar.n)

        result = generate(out_dir / "scan" / SYNTH_NAME, SynthConf(seed=seed), progress)
        bar.update(100 - bar.n)
    return result.zip_path, result.queries_json


def _register(client: RecordingClient, topic: str, dataset: Path, timeout: float, echo: Echo) -> str:
    """Send a JSON register request and follow its status messages; returns the scene version."""
    from tqdm import tqdm

    request_id = f"demo-register-{os.getpid()}"
    _publish(client, topic, {"command": "register", "dataset": str(dataset), "request_id": request_id})
    with tqdm(total=100, desc="register scan", unit="%", bar_format="{l_bar}{bar}| {elapsed}") as bar:
        deadline = time.monotonic() + timeout
        current = ""
        while True:
            status = _reply(client, topic, request_id, max(deadline - time.monotonic(), 0.0))
            state = status.get("status")
            if state == "registering":
                stage = f"register scan: {status.get('stage') or 'start'}"
                if stage != current:  # progress is per stage: one bar run per stage
                    current = stage
                    bar.reset()
                    bar.set_description(stage)
                bar.update(round(100 * float(status.get("progress") or 0.0)) - bar.n)
            elif state == "busy":
                bar.set_postfix_str("queued behind another registration")
            elif state == "success":
                bar.update(100 - bar.n)
                break
            else:
                wire = status.get("reason")
                raise MarkerlessError(f"registration failed ({wire}): {state}",
                                      reason=Reason(wire) if wire in {r.value for r in Reason} else Reason.BAD_DATASET)
    echo(f"scene registered: version {status.get('scene_version')} ({status.get('message') or 'new'})")
    return str(status.get("scene_version"))


def _line(i: int, n: int, o: QueryOutcome) -> str:
    head = f"[{i + 1:2d}/{n}] {o.name:<28}"
    if not o.success:
        verdict = "refused (correct)" if o.foreign else "FAILED"
        return f"{head} {verdict}: {o.reason}  ({o.latency_ms:.0f} ms)"
    text = head
    if o.estimate is not None:
        t = o.estimate[:3, 3]
        text += f" pose t=[{t[0]:+.3f} {t[1]:+.3f} {t[2]:+.3f}] m"
    err = o.errors
    if err is not None:
        text += f"  error {err[0] * 100:6.2f} cm {err[1]:6.3f} deg"
    if o.foreign:
        text += "  WRONG: a foreign image got a pose"
    return text + f"  inliers {o.num_inliers}/{o.num_matches}  {o.latency_ms:.0f} ms"


def run_demo(options: DemoOptions, echo: Echo = print) -> int:
    """Exit code: 0 when the poses pass (see PASS_*), 1 when they do not, 2 when the demo could not run."""
    from tqdm import tqdm

    from markerless.demo.broker import EmbeddedBroker
    from markerless.demo.frames import calibration_frame, load_demo_queries
    from markerless.pipeline.image_decoding import decode_image
    from markerless.service.daemon import Backend, Daemon
    from markerless.service.scenes_file import CameraEntry, SceneEntry, ScenesFile
    from markerless.service.settings import (
        MqttSettings,
        RegistrationSettings,
        Settings,
        StoreSettings,
        WorkerSettings,
    )
    from markerless.service.transport import TransportError

    out_dir = options.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.scan is None:
        scan, queries_json = _synthesize(out_dir, options.seed)
    elif options.queries is None:
        raise MarkerlessError("--scan needs --queries (a queries.json with ground-truth poses)",
                              reason=Reason.BAD_REQUEST)
    else:
        scan, queries_json = options.scan.resolve(), options.queries.resolve()
    queries = load_demo_queries(queries_json)
    if not any(q.truth is not None for q in queries):
        raise MarkerlessError(f"{queries_json}: no query with a ground-truth pose", reason=Reason.BAD_REQUEST)
    scene_id = "demo-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in scan.stem)
    store_root = (options.store or out_dir / "store").resolve()

    broker = None
    if options.broker is None:
        broker = EmbeddedBroker()
        broker.start()
        host, port = broker.host, broker.port
        echo(f"embedded MQTT broker on {host}:{port}")
    else:
        host, port = options.broker
    settings = Settings(
        mqtt=MqttSettings(host=host, port=port, client_id=f"markerless-demo-{os.getpid()}"),
        worker=WorkerSettings(deadline_s=options.query_timeout_s),
        registration=RegistrationSettings(on_start=False, progress_interval_s=0.2, dataset_dirs=[scan.parent]),
        store=StoreSettings(root=store_root),
    )
    scenes = ScenesFile(scenes={scene_id: SceneEntry(name=scan.stem, dataset=scan)},
                        cameras={CAMERA_ID: CameraEntry(scene=scene_id)})
    recorded: dict[str, Any] = {}
    real = Backend.real(settings)
    backend = dataclasses.replace(
        real, new_localizer=lambda models: _RecordingLocalizer(real.new_localizer(models), recorded)
    )
    daemon = Daemon(settings, backend=backend, scenes=scenes)
    client = None
    outcomes: list[QueryOutcome] = []
    try:
        try:
            daemon.start()
        except TransportError as exc:
            raise MarkerlessError(f"cannot use the MQTT broker {host}:{port}: {exc}",
                                  reason=Reason.BROKER_UNAVAILABLE) from exc
        echo(f"daemon started (store {store_root})")
        topics = daemon.topics
        client = _camera_client(host, port, [topics.register(scene_id), topics.pose(CAMERA_ID)])
        _register(client, topics.register(scene_id), scan, options.registration_timeout_s, echo)
        for i, query in enumerate(tqdm(queries, desc="localize queries", unit="frame", leave=False)):
            request_id = f"demo-{os.getpid()}-{i}"
            payload, jpeg = calibration_frame(query, CAMERA_ID, request_id)
            started = time.monotonic()
            _publish(client, topics.frame(CAMERA_ID), payload)
            reply = _reply(client, topics.pose(CAMERA_ID), request_id, options.query_timeout_s)
            latency = time.monotonic() - started
            outcome = _outcome(query, reply, latency, recorded.get(_digest(decode_image(jpeg))), store_root,
                               scene_id)
            outcomes.append(outcome)
            tqdm.write(_line(i, len(queries), outcome))
    finally:
        if client is not None:
            client.close()
        daemon.stop()
        if broker is not None:
            broker.stop()
    return _finish(out_dir, outcomes, store_root, scene_id, scan, echo)


def _outcome(query: Query, reply: dict[str, Any], latency_s: float, result: Any, store_root: Path,
             scene_id: str) -> QueryOutcome:
    from markerless.pipeline.evaluation import QueryOutcome
    from markerless.scene.geometry import quat_trans_to_pose

    success = bool(reply.get("success"))
    estimate = quat_trans_to_pose(reply["quaternion"], reply["translation"]) if success else None
    reference = None
    if result is not None and result.verified:
        from markerless.scene.store import SceneStore

        info = SceneStore(store_root).info(scene_id)
        reference = info.path / result.verified[0] if info is not None else None
    return QueryOutcome(
        name=query.name, image_path=query.image_path, truth=query.truth, foreign=query.foreign, success=success,
        reason=reply.get("reason"), message=reply.get("message"), estimate=estimate,
        num_matches=int(reply.get("num_matches", 0)), num_inliers=int(reply.get("num_inliers", 0)),
        inlier_ratio=float(reply.get("inlier_ratio", 0.0)), latency_s=latency_s,
        inlier_points2d=getattr(result, "inlier_points2d", None), reference_image=reference,
        timings_ms=dict(reply.get("timings_ms") or {}),
    )


def _finish(out_dir: Path, outcomes: list[QueryOutcome], store_root: Path, scene_id: str, scan: Path,
            echo: Echo) -> int:
    import numpy as np
    import trimesh

    from markerless.demo.report import write_report
    from markerless.pipeline.evaluation import Summary
    from markerless.scene.layout import read_keyframes
    from markerless.scene.store import SceneStore

    info = SceneStore(store_root).info(scene_id)
    keyframe_poses, vertices = [], None
    if info is not None:
        keyframe_poses = [k.pose_matrix for k in read_keyframes(info.path)]
        vertices = np.asarray(trimesh.load(info.path / "raw.glb", force="mesh", process=False).vertices)
    stats = Summary.of(outcomes).as_report_dict()
    passed, accurate = pass_verdict(outcomes)
    notes = [f"scan: {scan}", f"pass rule: >= {PASS_FRACTION:.0%} of queries within {PASS_METRES * 100:.0f} cm and "
             f"{PASS_DEGREES:.0f} deg, every foreign image refused: {'PASSED' if passed else 'FAILED'}"]
    html = write_report(out_dir, outcomes, keyframe_poses, vertices, title="markerless demo", notes=notes)
    results = {
        "passed": passed,
        "pass_rule": {"metres": PASS_METRES, "degrees": PASS_DEGREES, "fraction": PASS_FRACTION},
        "scan": str(scan),
        "summary": stats,
        "queries": [o.as_dict() for o in outcomes],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    echo(f"accuracy: {stats['localized']}/{stats['queries']} localized, {accurate:.0%} within "
         f"{PASS_METRES * 100:.0f} cm / {PASS_DEGREES:.0f} deg"
         + (f", median {stats['median_translation_m'] * 100:.2f} cm / {stats['median_rotation_deg']:.3f} deg"
            if "median_translation_m" in stats else "")
         + f"; foreign refused {stats['foreign_rejected']}/{stats['foreign']}")
    echo(f"report: {html}")
    echo("PASSED" if passed else "FAILED")
    return 0 if passed else 1
