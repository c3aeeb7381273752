"""`markerless demo` end to end (synthetic scan, embedded broker, daemon, MQTT, report), its pass rule, the report.

The end-to-end test runs the real command in a subprocess with nothing mocked: SIFT features, VLAD retrieval,
registration and localization of the real core, over a real (in-process) MQTT broker.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from markerless.demo.pass_rule import PASS_DEGREES, PASS_FRACTION, PASS_METRES, pass_verdict
from markerless.demo.report import write_report
from markerless.pipeline.evaluation import QueryOutcome, Summary
from markerless.scene.geometry import quat_trans_to_pose


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "markerless.cli", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED" in proc.stdout
    assert not re.search(r"^[IW]\d{8} ", proc.stderr.replace("\r", "\n"), re.MULTILINE)  # no glog in the bars

    results = json.loads((out / "results.json").read_text())
    queries = [q for q in results["queries"] if not q["foreign"]]
    foreign = [q for q in results["queries"] if q["foreign"]]
    assert results["passed"] is True
    assert len(queries) == 10 and len(foreign) == 2
    # Every ground-truth query got a pose over MQTT, and the poses are right (synthetic truth is exact).
    assert all(q["success"] for q in queries)
    assert results["summary"]["within_5cm_5deg"] == 1.0
    assert max(q["translation_error_m"] for q in queries) < 0.02
    assert max(q["rotation_error_deg"] for q in queries) < 0.5
    for q in queries:  # the reported error is the one between the returned pose and the truth
        t_err = np.linalg.norm(np.asarray(q["estimate"])[:3, 3] - np.asarray(q["truth"])[:3, 3])
        assert abs(t_err - q["translation_error_m"]) < 1e-9
        assert q["num_inliers"] >= 20 and q["latency_ms"] > 0
    assert all(not q["success"] and q["reason"] for q in foreign)

    # One printed line per query, with its error for the ground-truth ones.
    printed = [line for line in proc.stdout.splitlines() if re.search(r"\[\s*\d+/12\]", line)]
    assert len(printed) == 12
    assert sum(" error " in line for line in printed) == 10
    assert sum("refused (correct)" in line for line in printed) == 2

    # The scan was registered through the command topic into the store, and the report was written.
    assert any((out / "store").iterdir())
    html = (out / "report.html").read_text()
    for i in range(12):
        png = out / f"query-{i:02d}.png"
        assert f"query-{i:02d}.png" in html
        assert cv2.imread(str(png)) is not None
    poses = cv2.imread(str(out / "poses.png"))
    assert poses is not None and poses.shape[1] >= 1000


def _outcome(name: str, truth: np.ndarray | None, estimate: np.ndarray | None, foreign: bool = False,
             points: list[list[float]] | None = None, image: Path | None = None) -> QueryOutcome:
    return QueryOutcome(
        name=name, image_path=image or Path("missing.jpg"), truth=truth, foreign=foreign,
        success=estimate is not None, reason=None if estimate is not None else "no_verified_matches",
        message="m", estimate=estimate, num_matches=100, num_inliers=80, inlier_ratio=0.8, latency_s=0.012,
        inlier_points2d=points,
    )


def _shifted(pose: np.ndarray, metres: float) -> np.ndarray:
    moved = pose.copy()
    moved[0, 3] += metres
    return moved


def test_pass_rule() -> None:
    truth = quat_trans_to_pose([0, 0, 0, 1], [1.0, 1.5, 0.0])
    close = _shifted(truth, PASS_METRES / 2)
    far = _shifted(truth, PASS_METRES * 2)
    n_ok = round(10 * PASS_FRACTION)
    good = [_outcome(f"q{i}", truth, close) for i in range(n_ok)]
    bad = [_outcome(f"b{i}", truth, far) for i in range(10 - n_ok)]
    assert pass_verdict(good + bad) == (True, PASS_FRACTION)
    # one more inaccurate query, or a failed one, drops below the threshold
    assert pass_verdict(good[1:] + bad + [_outcome("x", truth, far)])[0] is False
    assert pass_verdict(good[1:] + bad + [_outcome("x", truth, None)])[0] is False
    # a foreign image that gets a pose fails the demo however good the rest is
    assert pass_verdict(good + [_outcome("f", None, truth, foreign=True)])[0] is False
    assert pass_verdict(good + [_outcome("f", None, None, foreign=True)])[0] is True
    # rotation counts too
    turned = truth.copy()
    turned[:3, :3] = quat_trans_to_pose([0, np.sin(np.radians(PASS_DEGREES)), 0,
                                         np.cos(np.radians(PASS_DEGREES))], [0, 0, 0])[:3, :3]
    assert pass_verdict([_outcome("r", truth, turned)])[0] is False
    assert pass_verdict([])[0] is False


def test_report_files_and_content(tmp_path: Path) -> None:
    image = np.full((120, 160, 3), 128, np.uint8)
    image_path = tmp_path / "q.jpg"
    cv2.imwrite(str(image_path), image)
    truth = quat_trans_to_pose([0, 0, 0, 1], [1.0, 1.5, 0.0])
    outcomes = [
        _outcome("good.jpg", truth, _shifted(truth, 0.01), points=[[10.0, 20.0], [50.0, 60.0]], image=image_path),
        _outcome("failed.jpg", truth, None, image=image_path),
        _outcome("room-1.jpg", None, truth, foreign=True, image=image_path),
    ]
    keyframes = [quat_trans_to_pose([0, 0, 0, 1], [x, 1.4, 0.0]) for x in np.linspace(-1, 1, 5)]
    vertices = np.random.default_rng(0).uniform(-2, 2, (500, 3))
    html_path = write_report(tmp_path / "r", outcomes, keyframes, vertices, notes=["note <b>"])
    html = html_path.read_text()
    assert "FALSE POSE" in html and "failed: no_verified_matches" in html and "note &lt;b&gt;" in html
    assert "1.00" in html  # 1 cm translation error of the first query
    drawn = cv2.imread(str(tmp_path / "r" / "query-00.png"))
    assert drawn is not None and drawn.shape[1] == 160
    # the inliers are drawn (green) on the query, below the caption strip
    body = drawn[drawn.shape[0] - 120:]
    green = (body[:, :, 1] > 180) & (body[:, :, 0] < 120) & (body[:, :, 2] < 120)
    assert green[15:26, 5:16].any() and green[55:66, 45:56].any() and not green[90:, 100:].any()
    assert cv2.imread(str(tmp_path / "r" / "poses.png")) is not None
    stats = Summary.of(outcomes).as_report_dict()
    assert stats["queries"] == 2 and stats["localized"] == 1 and stats["foreign_rejected"] == 0
    assert stats["within_5cm_5deg"] == 0.5
    # the page speaks in words and percentages, not in the summary's keys
    assert "within_" not in html and "foreign_rejected" not in html
    assert "within 5 cm and 5 degrees of the truth: 50% (1 of 2)" in html
    assert "localized: 50% (1 of 2) of the queries with ground truth" in html
    assert "images of other places refused: 0 of 1" in html
