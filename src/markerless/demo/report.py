"""Localization report: `report.html` with one PNG per query (inliers drawn) and a plot of all camera poses.

Why a report: a table of numbers says whether calibration worked; the pictures say why not (too few inliers on one
wall, a pose flipped behind the camera, a foreign image matched to something). Matplotlib is used through its
object API on the Agg canvas, so nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from markerless.pipeline.evaluation import QueryOutcome, Summary


def _match_figure(outcome: QueryOutcome) -> np.ndarray:
    """Query with its inliers (green) next to the best verified keyframe, with a caption; BGR uint8."""
    query = cv2.imread(str(outcome.image_path), cv2.IMREAD_COLOR)
    for x, y in outcome.inlier_points2d or []:
        cv2.circle(query, (round(x), round(y)), 3, (60, 220, 60), 1, cv2.LINE_AA)
    panels = [query]
    if outcome.reference_image is not None and outcome.reference_image.is_file():
        ref = cv2.imread(str(outcome.reference_image), cv2.IMREAD_COLOR)
        scale = query.shape[0] / ref.shape[0]
        panels.append(cv2.resize(ref, (round(ref.shape[1] * scale), query.shape[0]), interpolation=cv2.INTER_AREA))
    canvas = np.concatenate(panels, axis=1)
    caption = np.full((34, canvas.shape[1], 3), 255, np.uint8)
    cv2.putText(caption, _caption(outcome), (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([caption, canvas], axis=0)


def _caption(o: QueryOutcome) -> str:
    if not o.success:
        return f"{o.name}: no pose ({o.reason})" + (" - correct, foreign image" if o.foreign else "")
    text = f"{o.name}: {o.num_inliers} inliers / {o.num_matches} matches"
    err = o.errors
    if err is not None:
        text += f", error {err[0] * 100:.1f} cm {err[1]:.2f} deg"
    if o.foreign:
        text += " - WRONG: foreign image localized"
    return text + " | left: query + inliers, right: best keyframe"


def _centres_and_axes(poses: Sequence[np.ndarray], length: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera centres (N, 3) and the tips of their viewing directions (N, 3)."""
    if not poses:
        return np.zeros((0, 3)), np.zeros((0, 3))
    stack = np.stack(poses)
    centres = stack[:, :3, 3]
    return centres, centres + length * stack[:, :3, 2]


def _poses_figure(path: Path, outcomes: Sequence[QueryOutcome], keyframe_poses: Sequence[np.ndarray],
                  mesh_vertices: np.ndarray | None, up_axis: int) -> None:
    """Top-down and 3D views: keyframes (grey), ground truth (green), estimates (red), linked per query."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    top = fig.add_subplot(1, 2, 1)
    view3d = fig.add_subplot(1, 2, 2, projection="3d")
    h = [a for a in range(3) if a != up_axis]  # horizontal axes of the top-down view
    order = [h[0], h[1], up_axis]  # scene axes drawn as matplotlib's x, y, z: the scene's up is drawn up
    # Seen from above, (h0, h1, up) must be right-handed or the picture is mirrored: flip h1 when it is not.
    flip = 1.0 if tuple(order) in ((0, 1, 2), (1, 2, 0), (2, 0, 1)) else -1.0

    def to3d(points: np.ndarray) -> np.ndarray:
        return points[:, order] * np.array([1.0, flip, 1.0])
    rng = np.random.default_rng(0)
    if mesh_vertices is not None and len(mesh_vertices):
        sample = mesh_vertices[rng.choice(len(mesh_vertices), min(len(mesh_vertices), 20000), replace=False)]
        top.scatter(sample[:, h[0]], sample[:, h[1]], s=0.3, c="0.85", rasterized=True)
        view3d.scatter(*to3d(sample[::4]).T, s=0.2, c="0.8", alpha=0.3)
    groups = (
        ("keyframes", list(keyframe_poses), "0.45"),
        ("ground truth", [o.truth for o in outcomes if o.truth is not None], "tab:green"),
        ("estimates", [o.estimate for o in outcomes if o.estimate is not None and o.success], "tab:red"),
    )
    for label, poses, colour in groups:
        centres, tips = _centres_and_axes(poses, 0.25)
        if not len(centres):
            continue
        if label == "ground truth":  # hollow and larger: visible under an exact estimate
            top.scatter(centres[:, h[0]], centres[:, h[1]], s=60, facecolors="none", edgecolors=colour,
                        linewidths=1.5, label=label, zorder=4)
        else:
            top.scatter(centres[:, h[0]], centres[:, h[1]], s=12, c=colour, label=label, zorder=3)
        for c, t in zip(centres, tips, strict=True):
            top.plot([c[h[0]], t[h[0]]], [c[h[1]], t[h[1]]], c=colour, lw=0.8, zorder=3)
            view3d.plot(*to3d(np.stack([c, t])).T, c=colour, lw=0.8)
        view3d.scatter(*to3d(centres).T, s=10, c=colour, label=label)
    for o in outcomes:
        if o.truth is not None and o.estimate is not None and o.success:
            a, b = o.truth[:3, 3], o.estimate[:3, 3]
            top.plot([a[h[0]], b[h[0]]], [a[h[1]], b[h[1]]], c="tab:orange", lw=1.5, zorder=4)
    names = "xyz"
    top.set_xlabel(f"{names[h[0]]} (m)")
    top.set_ylabel(f"{names[h[1]]} (m)")
    top.set_aspect("equal", adjustable="datalim")
    if flip < 0:
        top.invert_yaxis()
    top.set_title("top-down (scene frame); orange: estimate - truth")
    top.legend(loc="upper right", fontsize=8)
    view3d.set_title("3D")
    view3d.set_xlabel(names[order[0]])
    view3d.set_ylabel(("" if flip > 0 else "-") + names[order[1]])
    view3d.set_zlabel(names[order[2]])
    view3d.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_report(
    out_dir: Path,
    outcomes: Sequence[QueryOutcome],
    keyframe_poses: Sequence[np.ndarray] = (),
    mesh_vertices: np.ndarray | None = None,
    title: str = "markerless localization report",
    notes: Sequence[str] = (),
    up_axis: int = 1,
) -> Path:
    """Write `report.html`, `poses.png` and `query-<i>.png` into `out_dir`; returns the HTML path.

    `up_axis` is the scene's vertical axis (1: y up, as Polycam's raw.glb), used for the top-down view.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _poses_figure(out_dir / "poses.png", outcomes, keyframe_poses, mesh_vertices, up_axis)
    rows = []
    for i, o in enumerate(outcomes):
        png = f"query-{i:02d}.png"
        cv2.imwrite(str(out_dir / png), _match_figure(o))
        err = o.errors
        if o.foreign:
            verdict = "ok (rejected)" if not o.success else "FALSE POSE"
        elif not o.success:
            verdict = f"failed: {o.reason}"
        else:
            verdict = "ok" if o.within() else ("pose" if err is None else "inaccurate")
        rows.append(
            "<tr>"
            f"<td>{html.escape(o.name)}</td><td>{html.escape(verdict)}</td>"
            f"<td>{_fmt(err[0] * 100 if err else None, '.2f')}</td><td>{_fmt(err[1] if err else None, '.3f')}</td>"
            f"<td>{o.num_matches}</td><td>{o.num_inliers}</td><td>{o.inlier_ratio:.2f}</td>"
            f"<td>{o.latency_ms:.0f}</td>"
            f"<td><a href='{png}'><img src='{png}' width='360'></a>"
            f"<br><small>{html.escape(o.message or '')}</small></td>"
            "</tr>"
        )
    stat_items = "".join(f"<li>{html.escape(line)}</li>" for line in Summary.of(outcomes).in_words())
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}}
td:first-child,td:nth-child(2),td:last-child{{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<ul>{note_items}</ul>
<h2>Summary</h2><ul>{stat_items}</ul>
<h2>Camera poses</h2><img src="poses.png" width="1100">
<h2>Queries</h2>
<table><tr><th>query</th><th>result</th><th>translation error (cm)</th><th>rotation error (deg)</th>
<th>matches</th><th>inliers</th><th>inlier ratio</th><th>latency (ms)</th><th>inliers drawn</th></tr>
{''.join(rows)}
</table></body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
