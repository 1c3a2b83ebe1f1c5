"""The network and the model file.

`build_resnet50` makes a ResNet50 (torchvision's, written out in `resnet.py`) with a two-class
head, starting from ImageNet weights (for users who are online), from a weights file (local or
S3), or from nothing.

A model file holds the weights and all that is needed to use them: class names, preprocessing
(size, contrast normalization), calibration (temperature and bias), decision threshold and the policy that
chose it, the thresholds of the operating points (target sensitivities), training parameters,
validation metrics, library versions. It is a `torch.save` archive of tensors plus one JSON
string, read back with `weights_only=True`, so loading a file from a shared bucket can never run
code. `load_model` takes a model file or the folder a training run wrote.
"""

from __future__ import annotations

import io
import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from xraylib import config, storage
from xraylib.errors import ConfigError, LocationError, ModelFileError

FORMAT_NAME = "xraylib-model"
FORMAT_VERSION = 1


def _load_tensors(location: str) -> dict[str, Any]:
    """A torch archive read safely: tensors, dicts, lists, strings and numbers only."""
    import pickle

    import torch

    path = storage.fetch_location(location)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{location} holds Python objects that could run code, so it was not loaded ({str(exc).splitlines()[0]}); "
            "use a model file written by xraylib or a plain state_dict"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        raise ModelFileError(
            f"{location} is not a PyTorch weights file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check the location"
        ) from None


def _initial_state(weights: str) -> dict[str, Any] | None:
    """The state_dict a new network starts from: None for 'none', torchvision's for 'imagenet'."""
    if weights == "none":
        return None
    if weights == "imagenet":
        from torchvision.models import ResNet50_Weights

        try:
            return ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        except Exception as exc:  # urllib, SSL, hub errors: all mean "not downloadable here"
            url = ResNet50_Weights.IMAGENET1K_V2.url
            raise LocationError(
                f"could not download the ImageNet ResNet50 weights from {url} ({type(exc).__name__}); "
                "offline, download that file elsewhere and pass --weights PATH (local or s3://), or use --weights none"
            ) from None
    state = _load_tensors(weights)
    # An xraylib model file (or a training checkpoint of another tool) nests its weights.
    return state["state_dict"] if isinstance(state.get("state_dict"), dict) else state


def _resnet50_two_class(*, initialise: bool = True) -> Any:
    from xraylib.resnet import ResNet50

    return ResNet50(num_classes=2, initialise=initialise)


def build_resnet50(weights: str = "none", *, freeze_backbone: bool = False) -> Any:
    """A ResNet50 with a two-class head. `weights`: 'imagenet', 'none', or a weights file
    (a torchvision state_dict, or an xraylib model file), local or on S3."""
    network = _resnet50_two_class()
    state = _initial_state(weights)
    if state is not None:
        head = {k: v for k, v in state.items() if k.startswith("fc.")}
        # An ImageNet head has 1,000 classes: keep our new two-class head instead.
        if head and head.get("fc.weight") is not None and tuple(head["fc.weight"].shape) != (2, network.fc.in_features):
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = network.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensors of the wrong shape
            raise ModelFileError(f"{weights} does not hold ResNet50 weights ({str(exc).splitlines()[-1].strip()})") from None
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ModelFileError(
                f"{weights} does not hold ResNet50 weights (missing {len(missing)} tensors, e.g. "
                f"{(missing or unexpected)[0]}); pass a ResNet50 state_dict"
            )
    if freeze_backbone:
        for name, param in network.named_parameters():
            param.requires_grad = name.startswith("fc.")
    return network


def inference_network(network: Any) -> Any:
    """A copy of `network` for prediction only: batch norms folded into the convolutions and
    channels-last memory, about twice as fast on a CPU and equal up to rounding."""
    import copy

    import torch
    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(network).eval())
    return fused.to(memory_format=torch.channels_last)


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(device)


def autocast_dtype(device: Any, precision: str) -> Any:
    """The reduced precision to compute in, or None for fp32. 'auto' takes bf16 only where the
    hardware runs it natively (CUDA, or CPUs with AVX-512 BF16 / AMX); emulated bf16 is slower."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        # Ampere and later; older GPUs (T4, V100) only emulate bf16, slowly, but have fp16 tensor cores.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    return torch.bfloat16 if native else None


def precision_name(dtype: Any) -> str:
    """'bf16', 'fp16' or 'fp32' for an autocast dtype (None is fp32)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def inference_dtype(model: TrainedModel, device: Any, precision: str = "auto") -> Any:
    """The autocast dtype to score `model` in. 'auto' is the precision its validation ran in, so
    that the threshold chosen there meets probabilities computed the same way (a model validated in
    fp32 and scored in bf16 can flip images near the threshold); for older model files, the
    device's own 'auto'. Anything else is taken as asked."""
    if precision == "auto" and model.validation_precision is not None:
        precision = model.validation_precision
    return autocast_dtype(device, precision)


@contextmanager
def autocast(device: Any, dtype: Any) -> Iterator[None]:
    import torch

    with torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext():
        yield


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from xraylib import __version__

    try:
        torchvision = version("torchvision")  # not imported: only ImageNet weights need it
    except PackageNotFoundError:
        torchvision = "not installed"
    return {"xraylib": __version__, "torch": torch.__version__, "torchvision": torchvision,
            "python": platform.python_version()}


@dataclass
class TrainedModel:
    """A network ready to predict, with what it needs to read images the way it was trained."""

    network: Any
    metadata: dict[str, Any]
    location: str | None = None  # the model file it was read from, when it was read from one

    @property
    def class_names(self) -> tuple[str, str]:
        return tuple(self.metadata["class_names"])  # type: ignore[return-value]

    @property
    def image_size(self) -> int:
        return int(self.metadata["preprocessing"]["image_size"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.metadata["preprocessing"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.metadata["preprocessing"]["std"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def equalize(self) -> str:
        """The contrast normalization the model was trained with ('none' for older model files)."""
        return str(self.metadata["preprocessing"].get("equalize", "none"))

    @property
    def validation_precision(self) -> str | None:
        """The precision training validated in, where the threshold was chosen (None: not recorded)."""
        return self.metadata.get("validation_precision")

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted on validation (1.0, none, for older model files)."""
        return float(self.metadata.get("temperature", 1.0))

    @property
    def operating_points(self) -> list[dict[str, float]] | None:
        """[{target_sensitivity, threshold}] chosen on validation (`operating_points.choose_operating_points`);
        None for model files from before they were stored."""
        return self.metadata.get("operating_points")

    @property
    def calibration_bias(self) -> float:
        """The calibration's shift of the log-odds, fitted with the temperature (0.0 for older files)."""
        return float(self.metadata.get("calibration_bias", 0.0))


def model_metadata(
    *, class_names: tuple[str, str], image_size: int, threshold: float, equalize: str = "none", **extra: Any
) -> dict[str, Any]:
    """The metadata every model file carries, plus whatever else the caller records."""
    from xraylib.dataset import DECODER_VERSION

    return {
        "class_names": list(class_names),
        "preprocessing": {
            "image_size": image_size,
            "grayscale": True,
            "resize": "squash-bilinear",
            "mean": list(config.IMAGENET_MEAN),
            "std": list(config.IMAGENET_STD),
            "equalize": equalize,
            "decoder_version": DECODER_VERSION,
        },
        "threshold": threshold,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
        **extra,
    }


def model_to_bytes(network: Any, metadata: dict[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "metadata_json": json.dumps(metadata), "state_dict": state}, buffer)
    return buffer.getvalue()


def save_model(location: str, network: Any, metadata: dict[str, Any]) -> None:
    """Write a model file to `location` (local or S3), whole or not at all."""
    storage.write_bytes(location, model_to_bytes(network, metadata))


def model_file_location(location: str) -> str:
    """A model file, or the model file inside a training run's output folder."""
    if location.endswith((".pt", ".pth")):
        return location
    return storage.join(location, config.MODEL_FILENAME)


def load_model(location: str, device: str = "cpu") -> TrainedModel:
    """Read a model file (or a `train --out` location) written by `save_model`."""
    file = model_file_location(location)
    try:
        archive = _load_tensors(file)
    except LocationError:
        if file != location:
            raise LocationError(
                f"no {config.MODEL_FILENAME} in {location}: pass a model file or a train --out location"
            ) from None
        raise
    if not isinstance(archive, dict) or archive.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{file} is not an xraylib model file (no '{FORMAT_NAME}' header); train one with `xraylib train`")
    metadata = json.loads(archive["metadata_json"])
    import torch

    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        network = _resnet50_two_class(initialise=False)
    try:
        network.load_state_dict(archive["state_dict"], assign=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{file} holds weights that do not fit ResNet50 ({str(exc).splitlines()[-1].strip()})") from None
    network.eval().to(resolve_device(device))
    return TrainedModel(network, metadata, file)
