"""The vision core as the service calls it: a table of callables, so tests can swap a fake core in."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from markerless.scene.config import SceneConfig
from markerless.service.settings import Settings


@dataclass(frozen=True)
class Backend:
    """The vision core as the daemon calls it. `Backend.real` wires the real one; tests may swap parts of it."""

    store: Any  # SceneStore: info(scene_id), load(scene_id), scene_ids()
    new_models: Callable[[], Any]  # FeatureModels, built on the thread that will use them
    new_localizer: Callable[[Any], Any]  # Localizer(models)
    decode_image: Callable[[bytes], Any]  # bytes -> HxWx3 uint8 RGB, raises BadImageError
    make_camera: Callable[[Sequence[Sequence[float]], int, int, Sequence[float]], Any]  # raises BadIntrinsicsError
    register_scene: Callable[..., Any]  # (store, scene_id, dataset, config, models, progress) -> SceneInfo
    needs_registration: Callable[[Any, str, Path, SceneConfig], bool]

    @classmethod
    def real(cls, settings: Settings) -> Backend:
        """The real core (imports torch/pycolmap, hence not at module import)."""
        from markerless.pipeline.features import FeatureModels
        from markerless.pipeline.image_decoding import decode_image
        from markerless.pipeline.localization import Localizer
        from markerless.pipeline.registration import needs_registration, register_scene
        from markerless.pipeline.registration_options import RegistrationOptions
        from markerless.scene.camera import Camera
        from markerless.scene.store import SceneStore

        return cls(
            store=SceneStore(settings.store.root),
            new_models=lambda: FeatureModels(device=settings.worker.device, weights_dir=settings.worker.weights_dir),
            new_localizer=lambda models: Localizer(models, settings.localization),
            decode_image=decode_image,
            make_camera=Camera.from_matrix,
            register_scene=partial(register_scene, options=RegistrationOptions(
                limits=settings.registration.limits, workers=settings.registration.workers
            )),
            needs_registration=needs_registration,
        )
