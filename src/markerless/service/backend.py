"""The vision core as the service calls it: a table of callables, so tests can swap a fake core in.

The Protocols say what the service needs of each part and no more, so that the real core and a test double both
fit. The models are opaque to it (`ModelsT`): built on the thread that uses them and handed on to the localizer
and to registration. A localizer takes the scenes its own store loads (`SceneT`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from markerless.scene.config import SceneConfig
from markerless.service.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.localization import LocalizationResult
    from markerless.scene.camera import Camera
    from markerless.scene.store import Scene


class StoredVersion(Protocol):
    """A scene version in the store (`SceneInfo`): the service tracks only which version serves."""

    @property
    def scene_id(self) -> str: ...

    @property
    def version(self) -> str: ...


class LoadedScene(Protocol):
    """A scene version held in memory for queries (`Scene`)."""

    @property
    def info(self) -> StoredVersion: ...


SceneT = TypeVar("SceneT", bound=LoadedScene)
SceneT_co = TypeVar("SceneT_co", bound=LoadedScene, covariant=True)
SceneT_contra = TypeVar("SceneT_contra", bound=LoadedScene, contravariant=True)
ModelsT = TypeVar("ModelsT")
ModelsT_contra = TypeVar("ModelsT_contra", contravariant=True)


class SceneSource(Protocol[SceneT_co]):
    """The scene store (`SceneStore`) as the service reads it: which scenes, their current versions, loading."""

    def scene_ids(self) -> list[str]: ...

    def info(self, scene_id: str) -> StoredVersion | None: ...

    def load(self, scene_id: str) -> SceneT_co: ...


class FrameLocalizer(Protocol[SceneT_contra]):
    """Localizes one frame in a loaded scene (`Localizer`); a failed gate is a result, not an exception."""

    def localize(self, scene: SceneT_contra, image: np.ndarray, camera: Camera | None,
                 mode: str) -> LocalizationResult: ...


class RegisterScene(Protocol[ModelsT_contra]):
    """`pipeline.registration.register_scene` with its options bound; `store` is the backend's store."""

    def __call__(self, store: Any, scene_id: str, dataset: Path, config: SceneConfig, models: ModelsT_contra,
                 progress: Callable[[str, float], None] | None = None) -> StoredVersion: ...


@dataclass(frozen=True)
class Backend(Generic[SceneT, ModelsT]):
    """The vision core as the daemon calls it. `Backend.real` wires the real one; tests may swap parts of it.

    The store arguments of `register_scene` and `needs_registration` are `Any` because the real functions take
    the concrete `SceneStore`: the service only ever passes `store` back to them."""

    store: SceneSource[SceneT]
    new_models: Callable[[], ModelsT]  # built on the thread that will use them
    new_localizer: Callable[[ModelsT], FrameLocalizer[SceneT]]
    decode_image: Callable[[bytes], np.ndarray]  # HxWx3 uint8 RGB; raises BadImageError
    make_camera: Callable[[Sequence[Sequence[float]], int, int, Sequence[float]], Camera]  # BadIntrinsicsError
    register_scene: RegisterScene[ModelsT]
    needs_registration: Callable[[Any, str, Path, SceneConfig], bool]

    @classmethod
    def real(cls, settings: Settings) -> Backend[Scene, FeatureModels]:
        """The real core (imports torch/pycolmap, hence not at module import)."""
        from markerless.pipeline.features import FeatureModels
        from markerless.pipeline.image_decoding import decode_image
        from markerless.pipeline.localization import Localizer
        from markerless.pipeline.registration import needs_registration, register_scene
        from markerless.pipeline.registration_options import RegistrationOptions
        from markerless.scene.camera import Camera
        from markerless.scene.store import SceneStore

        return Backend(
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
