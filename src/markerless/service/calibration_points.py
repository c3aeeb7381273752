"""SceneScape's calibration points: a small, well-spread sample of a pose's inlier correspondences.

SceneScape's 2D calibration page draws `calibration_points_2d` on the camera image and `calibration_points_3d` on
the scene (pairs, in the same order); a PnP pose has hundreds to thousands of inliers, clustered where texture
is. Greedy farthest-point sampling in the image keeps the pairs that best cover the region the pose was fitted on
(each next point is the one farthest from all chosen so far), so a user sees where the pose is supported and
where it is not, and the reply stays small. It is deterministic (it starts from the inlier nearest the inliers'
median), so the same result always shows the same points.
"""

from __future__ import annotations

import numpy as np

# Enough for the spread of a fit to be seen (on a 640 x 480 frame, about one point per 70 x 70 px cell when the
# inliers cover the image), few enough to keep the reply under ~3 KB and the page legible.
MAX_POINTS = 64


def spread_sample(points2d: list[list[float]], points3d: list[list[float]],
                  count: int = MAX_POINTS) -> tuple[list[list[float]], list[list[float]]]:
    """Up to `count` (pixel, scene point) pairs spread over the image by farthest-point sampling; pixels that
    repeat (one keypoint matched in several keyframes) count once."""
    if len(points2d) != len(points3d):
        raise ValueError(f"{len(points2d)} pixels but {len(points3d)} scene points")
    if not points2d or count <= 0:
        return [], []
    p2 = np.asarray(points2d, dtype=float).reshape(-1, 2)
    p3 = np.asarray(points3d, dtype=float).reshape(-1, 3)
    _, first = np.unique(p2, axis=0, return_index=True)
    keep = np.sort(first)
    p2, p3 = p2[keep], p3[keep]
    chosen = [int(np.argmin(np.linalg.norm(p2 - np.median(p2, axis=0), axis=1)))]
    nearest = np.linalg.norm(p2 - p2[chosen[0]], axis=1)
    while len(chosen) < min(count, len(p2)):
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(p2 - p2[nxt], axis=1))
    return p2[chosen].tolist(), p3[chosen].tolist()
