"""A camera's calibration as an image: its current calibration's frame with the scan drawn through the camera it
returned (`pipeline.overlay.overlay_for_result`), from the stored mesh of the scene version it was solved in.

Drawn on the caller's thread (the HTTP server's thread pool, never the worker's) once per calibration and kept
(`OverlayCache`, keyed by the attempt's id). A camera whose newest frame failed keeps showing its current
calibration's overlay (the console says the newer frame failed and why): a failure does not undo a calibration.
Nothing to draw is an `OverlayUnavailable` naming why (the HTTP front door answers 404 with it), never a broken
image. The pipeline is imported when the first overlay is drawn (torch loads with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from markerless.errors import Reason
from markerless.service.last_frames import Attempt, LastFrames

if TYPE_CHECKING:
    from markerless.pipeline.overlay import Overlay, OverlayCache


class OverlayUnavailable(Exception):
    """No overlay to show: `reason` (None: nothing went wrong, there is just no calibration yet) and why."""

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason


def version_dir(store: Any, scene_id: str, version: str) -> Path | None:
    """The folder of `version` of `scene_id` in the store (the current one's sibling), None when not stored."""
    info = store.info(scene_id)
    path = getattr(info, "path", None)
    if path is None:
        return None
    folder = Path(path) if info.version == version else Path(path).parent / version
    return folder if (folder / "raw.glb").is_file() else None


class Overlays:
    """The overlays of the cameras in `frames`, drawn from `store`'s meshes; `decode_image` as the worker's."""

    def __init__(self, frames: LastFrames, store: Any, decode_image: Any, size: int = 64) -> None:
        self._frames = frames
        self._store = store
        self._decode_image = decode_image
        self._size = size
        self._cache: OverlayCache | None = None

    def calibration(self, camera_id: str) -> Attempt:
        """The attempt of the camera's current calibration; raises OverlayUnavailable."""
        frames = self._frames.get(camera_id)
        if frames is None or frames.calibrated is None:
            latest = frames.latest if frames else None
            why = (f"its frames failed (last: {latest.reason}: {latest.message})" if latest
                   else "no frame of it was localized since the service started")
            raise OverlayUnavailable(f"camera {camera_id!r} is not calibrated: {why}")
        return frames.calibrated

    def overlay(self, attempt: Attempt) -> Overlay:
        """The PNG of a calibration (from `calibration`); raises OverlayUnavailable."""
        return self._overlays().get((attempt.camera_id, attempt.seq), lambda: self._draw(attempt))

    def edge_score(self, camera_id: str) -> float | None:
        """The edge agreement of the camera's overlay when it was drawn already (None: not drawn yet)."""
        frames = self._frames.get(camera_id)
        if self._cache is None or frames is None or frames.calibrated is None:
            return None
        drawn = self._cache.peek((camera_id, frames.calibrated.seq))
        return None if drawn is None else drawn.edge_score

    def _overlays(self) -> OverlayCache:
        if self._cache is None:
            from markerless.pipeline.overlay import OverlayCache

            self._cache = OverlayCache(self._size)
        return self._cache

    def _draw(self, attempt: Attempt) -> Overlay:
        from markerless.pipeline.overlay import overlay_for_result, scene_mesh

        result = attempt.result
        assert result is not None and result.success
        folder = version_dir(self._store, attempt.scene_id, result.scene_version)
        if folder is None:
            raise OverlayUnavailable(
                f"camera {attempt.camera_id!r} was calibrated in version {result.scene_version!r} of scene "
                f"{attempt.scene_id!r}, whose scan is no longer stored: recalibrate it", Reason.SCENE_OUTDATED)
        return overlay_for_result(self._decode_image(attempt.image), result, scene_mesh(folder))
