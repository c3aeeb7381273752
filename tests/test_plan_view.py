"""The plan view on a mesh built here: a floor, a ceiling and a table, and cameras whose frusta are known."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import trimesh

from markerless.pipeline.plan_view import PlanCamera, plan_view_svg
from markerless.scene.camera import Camera

SVG = "{http://www.w3.org/2000/svg}"


def _room() -> trimesh.Trimesh:
    """A 4 m x 3 m floor (green, facing up), a ceiling at 2.5 m (red, facing down) and a 1 m table top at
    0.8 m (blue, facing up) centred at x = 1, z = 0."""
    def quad(x0, x1, z0, z1, y, colour, up):
        v = np.array([[x0, y, z0], [x1, y, z0], [x1, y, z1], [x0, y, z1]], float)
        f = np.array([[0, 2, 1], [0, 3, 2]]) if up else np.array([[0, 1, 2], [0, 2, 3]])
        return trimesh.Trimesh(v, f, vertex_colors=np.tile(colour, (4, 1)), process=False)

    parts = [quad(-2, 2, -1.5, 1.5, 0.0, [0, 200, 0, 255], True),
             quad(-2, 2, -1.5, 1.5, 2.5, [200, 0, 0, 255], False),
             quad(0.5, 1.5, -0.5, 0.5, 0.8, [0, 0, 200, 255], True)]
    mesh = trimesh.util.concatenate(parts)
    assert np.all(mesh.face_normals[[0, 1, 4, 5], 1] > 0.99) and np.all(mesh.face_normals[[2, 3], 1] < -0.99)
    return mesh


def _looking(position, target) -> np.ndarray:
    """Camera-to-world, OpenCV axes (y down), looking from `position` at `target`."""
    z = np.asarray(target, float) - position
    z /= np.linalg.norm(z)
    x = np.cross([0, -1.0, 0], z)  # OpenCV: x right, y down, x = y cross z
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    pose[:3, 3] = position
    return pose


def test_plan_shows_the_room_from_above_and_each_camera() -> None:
    mesh = _room()
    camera = Camera(640, 480, 500, 500, 320, 240)
    cams = [PlanCamera("east", camera, _looking(np.array([1.8, 2.0, 0.0]), [0, 0, 0])),
            PlanCamera("<west>", camera, _looking(np.array([-1.8, 2.0, 1.2]), [0, 0, 0]), ok=False)]
    svg = plan_view_svg(mesh, cams)
    root = ET.fromstring(svg)  # well-formed, ids escaped
    assert [t.text for t in root.iter(f"{SVG}title")] == ["east", "<west>"]
    assert "<west>" not in svg and "&lt;west&gt;" in svg
    assert "http://" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched

    image_el = next(root.iter(f"{SVG}image"))
    png = base64.b64decode(image_el.get("href").removeprefix("data:image/png;base64,"))
    plan = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    _, _, w, h = (float(v) for v in root.get("viewBox").split())
    assert plan.shape[:2] == (round(h), round(w))
    circles = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(f"{SVG}circle")]
    # map scale from the two camera centres (x 1.8 and -1.8 m; z 0 and 1.2 m: z runs down the page)
    (ex, ey), (wx, wy) = circles
    scale = (ex - wx) / 3.6
    assert abs((wy - ey) / 1.2 - scale) < 0.02 * scale

    def pixel(x: float, z: float) -> np.ndarray:
        return plan[round(ey + z * scale), round(ex + (x - 1.8) * scale)]

    # the ceiling (facing down) never hides the room: the floor shows, and the table on it
    assert pixel(-1.0, -1.0)[1] > 80 and pixel(-1.0, -1.0)[0] == 0  # green floor
    table = pixel(1.0, 0.0)
    assert table[2] > table[0] and table[2] > table[1]  # blue table
    assert table[2] > pixel(-1.0, -1.0)[1] * 0.9  # higher surfaces are drawn brighter (0.8 m vs 0 m)
    assert pixel(1.0, 0.0)[3] == 255 and plan[1, 1, 3] == 0  # nothing drawn outside the scan

    # each frustum is the shadow of its view: it points from the camera towards the room's centre
    polygons = [np.array([[float(v) for v in p.split(",")] for p in poly.get("points").split()])
                for poly in root.iter(f"{SVG}polygon")]
    for (cx, cy), polygon in zip(circles, polygons, strict=True):
        centroid = polygon.mean(axis=0)
        towards = np.array([ex - 1.8 * scale, ey]) - [cx, cy]  # to the world origin, on the page
        assert np.dot(centroid - [cx, cy], towards) > 0
    fills = re.findall(r'<polygon[^>]*fill="(#[0-9a-f]+)"', svg)
    assert fills == ["#3ddc84", "#ffb020"]  # good calibration green, one to look at amber
