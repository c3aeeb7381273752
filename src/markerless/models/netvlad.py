"""NetVLAD global descriptors, numerically the model of hloc's `extractors/netvlad.py`, from the official checkpoint.

Users coming from hloc or SceneScape hold `VGG16-NetVLAD-Pitts30K.mat` (MatConvNet layers converted to structs by
netvlad_tf_open's `net_class2struct.m`) and `global-feats-netvlad.h5` files computed from it, so the network,
the weight conversion and the preprocessing follow hloc exactly: VGG16 up to conv5_3 (no ReLU), per-location L2,
NetVLAD (64 clusters x 512, soft assignment without bias, intra-normalisation), L2, WPCA to 4096 with bias, L2;
RGB pixels in 0..255 minus the checkpoint's mean pixel; images larger than `resize_max` shrunk with INTER_AREA.

What differs is speed: the checkpoint is converted once into a `.pt` cache beside it (`loadmat` of the 550 MB
file takes seconds), images of equal size run as one batch, the VLAD sum is one matrix product instead of hloc's
B x D x K x N broadcast, and on CUDA the VGG backbone runs under fp16 autocast (the NetVLAD head stays in fp32).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from markerless.errors import BadImageError, MarkerlessError, Reason

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "netvlad-pitts30k"  # manifest entry of the official Pitts30K checkpoint
VGG16_CONV5_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
DESC_DIM = 512  # conv5_3 channels
NUM_CLUSTERS = 64
VLAD_DIM = DESC_DIM * NUM_CLUSTERS  # 32768
WPCA_DIM = 4096
NUM_MAT_LAYERS = 35  # conv1_1..conv5_3 (0-28), preL2, vlad_core, postL2, finalL2, WPCA, finalL2
VLAD_LAYER = 30
WPCA_LAYER = 33
CACHE_FORMAT = 1  # bump when the cached state_dict layout changes


def vgg16_conv5_3() -> nn.Sequential:
    """torchvision's `vgg16().features` minus its last ReLU and pool: 13 convs, 12 ReLUs, 4 max-pools.

    Module indices match the MatConvNet layer indices of the checkpoint (hloc zips them positionally).
    """
    modules: list[nn.Module] = []
    channels = 3
    for spec in VGG16_CONV5_3:
        if spec == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules += [nn.Conv2d(channels, int(spec), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(spec)
    return nn.Sequential(*modules[:-1])


class NetVLAD(nn.Module):
    """VGG16 conv5_3 + NetVLAD (+ WPCA); parameter names are those of the `.pt` cache."""

    def __init__(self, whiten: bool = True) -> None:
        super().__init__()
        self.backbone = vgg16_conv5_3()
        self.score_proj = nn.Conv1d(DESC_DIM, NUM_CLUSTERS, kernel_size=1, bias=False)
        self.centers = nn.Parameter(torch.empty(DESC_DIM, NUM_CLUSTERS))
        self.whiten = nn.Linear(VLAD_DIM, WPCA_DIM) if whiten else None
        self.register_buffer("mean", torch.zeros(3))  # mean RGB pixel of the checkpoint

    @property
    def output_dim(self) -> int:
        return WPCA_DIM if self.whiten is not None else VLAD_DIM

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B x 3 x H x W RGB float, 0..255 -> B x output_dim float32, unit L2 norm."""
        x = image.clamp(0.0, 255.0) - self.mean.view(1, 3, 1, 1)
        features = self.backbone(x).flatten(2)  # B x D x N, N = (H/16) * (W/16)
        with torch.autocast(device_type=image.device.type, enabled=False):  # the head is cheap: keep it fp32
            return self.head(features.float())

    def head(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features, dim=1)  # per-location L2 over channels
        scores = F.softmax(self.score_proj(x), dim=1)  # B x K x N soft assignment
        # sum_n s_kn (x_dn - c_dk), as one product instead of hloc's B x D x K x N broadcast
        vlad = torch.einsum("bkn,bdn->bdk", scores, x) - self.centers * scores.sum(dim=2).unsqueeze(1)
        vlad = F.normalize(vlad, dim=1)  # intra-normalisation, per cluster
        desc = F.normalize(vlad.flatten(1), dim=1)  # flat index d * K + k, as MatConvNet / hloc
        if self.whiten is not None:
            desc = F.normalize(self.whiten(desc), dim=1)
        return desc


def _bad_weights(path: Path, what: str) -> MarkerlessError:
    message = f"{path} is not a NetVLAD checkpoint in the hloc struct format: {what}"
    return MarkerlessError(message, reason=Reason.BAD_WEIGHTS)


def _array(path: Path, layer: int, index: int, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`layers[layer].weights[index]` as float32 of `shape` (MATLAB singleton dimensions may be squeezed)."""
    array = np.asarray(value, dtype=np.float32)
    if array.size != int(np.prod(shape)) or array.squeeze().shape != tuple(d for d in shape if d != 1):
        raise _bad_weights(path, f"net.layers[{layer}].weights[{index}] has shape {array.shape}, expected {shape}")
    return array.reshape(shape, order="C") if array.shape != shape else array


def state_dict_from_mat(path: Path) -> dict[str, torch.Tensor]:
    """Convert the MatConvNet struct checkpoint exactly as hloc reads it (fields, permutations, negated centres)."""
    from scipy.io import loadmat

    try:
        net = loadmat(path, struct_as_record=False, squeeze_me=True)["net"]
        layers = net.layers
        average_image = np.asarray(net.meta.normalization.averageImage, dtype=np.float32)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise _bad_weights(path, repr(exc)) from exc
    if len(layers) != NUM_MAT_LAYERS:
        raise _bad_weights(path, f"{len(layers)} layers in net.layers, expected {NUM_MAT_LAYERS}")

    state: dict[str, torch.Tensor] = {}
    channels = 3
    for index, module in enumerate(vgg16_conv5_3()):
        if isinstance(module, nn.Conv2d):
            weight, bias = layers[index].weights  # S x S x IN x OUT, OUT
            out = module.out_channels
            weight = _array(path, index, 0, weight, (3, 3, channels, out))
            state[f"backbone.{index}.weight"] = torch.from_numpy(weight).permute(3, 2, 0, 1).contiguous()
            state[f"backbone.{index}.bias"] = torch.from_numpy(_array(path, index, 1, bias, (out,)))
            channels = out

    assign, centers = layers[VLAD_LAYER].weights  # both D x K
    assign = _array(path, VLAD_LAYER, 0, assign, (DESC_DIM, NUM_CLUSTERS))
    centers = _array(path, VLAD_LAYER, 1, centers, (DESC_DIM, NUM_CLUSTERS))
    state["score_proj.weight"] = torch.from_numpy(assign).T.unsqueeze(-1).contiguous()  # K x D x 1
    state["centers"] = torch.from_numpy(-centers)  # the official MATLAB code stores the opposite of the centres

    wpca, wpca_bias = layers[WPCA_LAYER].weights  # 1 x 1 x 32768 x 4096, 4096
    wpca = _array(path, WPCA_LAYER, 0, wpca, (1, 1, VLAD_DIM, WPCA_DIM)).reshape(VLAD_DIM, WPCA_DIM)
    state["whiten.weight"] = torch.from_numpy(wpca).T.contiguous()  # OUT x IN
    state["whiten.bias"] = torch.from_numpy(_array(path, WPCA_LAYER, 1, wpca_bias, (WPCA_DIM,)))

    # hloc takes pixel [0, 0] of the H x W x 3 average image; a plain RGB triple is accepted too
    mean = average_image[0, 0] if average_image.ndim == 3 else average_image
    if mean.shape != (3,):
        raise _bad_weights(path, f"net.meta.normalization.averageImage has shape {average_image.shape}")
    state["mean"] = torch.from_numpy(mean.copy())
    return state


def cache_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".pt")


def load_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The converted weights, from the `.pt` cache beside the checkpoint when it matches the checkpoint's size
    and modification time, else converted again (and the cache rewritten atomically, if the directory allows)."""
    try:
        stat = checkpoint.stat()
    except OSError as exc:
        raise _bad_weights(checkpoint, repr(exc)) from exc
    key = {"format": CACHE_FORMAT, "source": checkpoint.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = cache_path(checkpoint)
    if cache.is_file():
        try:
            # read, not mmap-ed: a cache truncated in place must not crash a running service
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                logger.debug("NetVLAD weights from cache %s", cache)
                return blob["state_dict"]
            logger.info("NetVLAD cache %s is stale (checkpoint changed): converting %s again", cache, checkpoint)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign cache fails in many ways; the .mat is the truth
            logger.warning("ignoring unreadable NetVLAD cache %s: %r", cache, exc)
    logger.info("converting %s (MatConvNet) to %s", checkpoint, cache)
    state = state_dict_from_mat(checkpoint)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        torch.save({"key": key, "state_dict": state}, tmp)
        os.replace(tmp, cache)
    except OSError as exc:  # read-only weights volume: run without the cache
        tmp.unlink(missing_ok=True)
        logger.warning("cannot write NetVLAD cache %s (%s): the next start converts the .mat again", cache, exc)
    return state


class NetVLADExtractor:
    """A NetVLAD model resident on one device; call it with RGB images, get unit-norm global descriptors."""

    default_conf: Mapping[str, Any] = {
        "whiten": True,  # WPCA to 4096-d as hloc's default; False gives the 32768-d VLAD vector
        "resize_max": 1024,  # longest image side, images are only shrunk (hloc's `netvlad` conf)
        "batch_size": 8,  # images per forward pass; only images of the same (resized) size share a batch
        "half": True,  # fp16 autocast of the VGG backbone on CUDA (ignored on CPU); False runs fp32 as hloc does
    }

    def __init__(self, checkpoint: Path, device: str, conf: Mapping[str, Any] | None = None) -> None:
        self.conf = {**self.default_conf, **(conf or {})}
        self.device = torch.device(device)
        state = load_state_dict(Path(checkpoint))
        if not self.conf["whiten"]:
            state = {k: v for k, v in state.items() if not k.startswith("whiten.")}
        with torch.device("meta"):  # no random initialisation of 134 M parameters that are overwritten anyway
            model = NetVLAD(whiten=self.conf["whiten"])
        model.load_state_dict(state, assign=True)  # strict: every parameter and buffer must come from the file
        self.model = model.eval().to(self.device)

    @property
    def output_dim(self) -> int:
        return self.model.output_dim

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> HxWx3 float32, shrunk as hloc's ImageDataset does (float INTER_AREA, sizes rounded)."""
        import cv2

        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise BadImageError(f"NetVLAD needs an HxWx3 uint8 RGB image, got shape {shape} dtype {dtype}")
        height, width = image.shape[:2]
        pixels = image.astype(np.float32)
        scale = self.conf["resize_max"] / max(height, width)
        if scale < 1.0:
            size = (int(round(width * scale)), int(round(height * scale)))
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        return pixels

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any sizes -> (N, output_dim) float32 descriptors, unit L2 norm, in input order."""
        prepared = [self.preprocess(image) for image in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, pixels in enumerate(prepared):
            groups[pixels.shape].append(index)
        out = np.empty((len(prepared), self.output_dim), dtype=np.float32)
        batch_size = int(self.conf["batch_size"])
        autocast = self.device.type == "cuda" and bool(self.conf["half"])
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            for indices in groups.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    batch = torch.from_numpy(np.stack([prepared[i] for i in chunk])).to(self.device)
                    desc = self.model(batch.permute(0, 3, 1, 2))
                    out[chunk] = desc.float().cpu().numpy()
        return out


def load_netvlad(weights_dir: Path | None, device: str, auto_fetch: bool = False) -> NetVLADExtractor:
    """The Pitts30K NetVLAD on `device`, from the weights directory (see `markerless.models.weights`).

    Raises `MissingWeightsError` (file, directories searched, fetch command) when the checkpoint is absent,
    unless `auto_fetch` (a deployment's explicit choice) allows downloading it now.
    """
    from markerless.errors import MissingWeightsError
    from markerless.models import weights

    try:
        checkpoint = weights.resolve(WEIGHTS_NAME, weights_dir)
    except MissingWeightsError:
        if not auto_fetch:
            raise
        checkpoint = weights.fetch(WEIGHTS_NAME, weights_dir, progress=False)
    return NetVLADExtractor(checkpoint, device)


def write_random_checkpoint(path: Path, seed: int = 0) -> None:
    """Write a `.mat` with the official struct layout and shapes and random He-scaled weights.

    A test and benchmark utility for machines that cannot download the real 550 MB checkpoint: it exercises the
    loader, the model and everything downstream exactly as the official file would, with meaningless descriptors.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)

    def cell(*arrays: np.ndarray) -> np.ndarray:
        out = np.empty((len(arrays),), dtype=object)
        for i, array in enumerate(arrays):
            out[i] = array
        return out

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    layers: list[dict[str, Any]] = []
    channels, block, index_in_block = 3, 1, 1
    for spec in VGG16_CONV5_3:
        if spec == "M":
            layers.append({"name": f"pool{block}", "type": "pool", "method": "max", "pool": np.array([2.0, 2.0]),
                           "stride": np.array([2.0, 2.0]), "pad": np.zeros(4), "weights": cell()})
            block, index_in_block = block + 1, 1
            continue
        out = int(spec)
        weight = normal((3, 3, channels, out), np.sqrt(2.0 / (9 * channels)))
        layers.append({"name": f"conv{block}_{index_in_block}", "type": "conv",
                       "weights": cell(weight, normal((out,), 0.01)),
                       "pad": np.ones(4), "stride": np.ones(2)})
        layers.append({"name": f"relu{block}_{index_in_block}", "type": "relu", "leak": 0.0, "weights": cell()})
        channels, index_in_block = out, index_in_block + 1
    layers.pop()  # conv5_3 is followed by preL2, not by a ReLU
    layers.append({"name": "preL2", "type": "normalize", "param": np.array([1024.0, 1e-12, 1.0, 0.5]),
                   "weights": cell()})
    # assignment logits of std 3 on unit features: soft but not uniform; small centres: residuals follow the image
    assign = normal((DESC_DIM, NUM_CLUSTERS), 3.0)
    centres = normal((DESC_DIM, NUM_CLUSTERS), 0.1 / np.sqrt(DESC_DIM))
    layers.append({"name": "vlad_core", "type": "custom", "K": float(NUM_CLUSTERS), "weights": cell(assign, centres)})
    layers.append({"name": "postL2", "type": "custom", "weights": cell()})
    layers.append({"name": "finalL2", "type": "custom", "weights": cell()})
    layers.append({"name": "WPCA", "type": "conv", "pad": 0.0, "stride": 1.0,
                   "weights": cell(normal((1, 1, VLAD_DIM, WPCA_DIM), 1.0 / np.sqrt(VLAD_DIM)),
                                   normal((WPCA_DIM,), 0.1 / np.sqrt(VLAD_DIM)))})
    layers.append({"name": "finalL2", "type": "custom", "weights": cell()})

    mean_rgb = np.array([123.68, 116.779, 103.939], dtype=np.float32) + normal((3,), 1.0)
    average_image = np.broadcast_to(mean_rgb, (224, 224, 3)).astype(np.float32)  # H x W x 3, as hloc indexes it
    net = {"layers": cell(*layers),
           "meta": {"normalization": {"averageImage": average_image, "imageSize": np.array([224.0, 224.0, 3.0])}}}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:  # a file object: savemat would append ".mat" to a ".tmp" name
        savemat(handle, {"net": net}, do_compression=False)
    os.replace(tmp, path)
