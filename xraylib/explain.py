"""What the network looks at: Grad-CAM heat maps of the last convolutional stage, and overlays.

`grad_cam` computes, with Captum's `LayerGradCam` on the ResNet50's `layer4` (its last conv stage),
how much each place of an image pushed the model towards the class it gave: the gradients of the
calibrated log-odds of that class, averaged per channel, weigh the stage's activations. What the
places do not account for (the head's bias and the calibration's, which the decision includes) is
spread evenly over them, so that the map sums to the calibrated log-odds the decision was made
on: without that, a model whose raw log-odds sit off centre (calibration brings them back) gets an
empty map. Places that speak against the class are cut off (ReLU), and the map is upsampled
(bilinear) to the image and scaled to 0..1. The maps are computed in fp32 on the model's device
(CPU or GPU).

`explain_images` is `xraylib explain`: it reads images (local or s3://) the way `predict` does,
and writes one overlay PNG per image (the image, the heat map, the probability and the class).
`explain_rows` draws the maps of images an evaluation already decoded, for the test notebook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraylib import dataset, storage
from xraylib.errors import DatasetError
from xraylib.model import TrainedModel, load_model, resolve_device


@dataclass(frozen=True)
class Explanation:
    """One image's Grad-CAM: `heat` is float [H, W] in 0..1, aligned with `pixels` (uint8 [H, W])."""

    name: str
    pixels: np.ndarray
    heat: np.ndarray
    probability: float  # of the positive class, calibrated
    predicted: str
    true: str | None = None  # the class folder's, when known


class _CalibratedLogOdds:
    """The calibrated log-odds of each class, -z and z with z = (logit 1 - logit 0) / temperature + bias:
    what the threshold decides on."""

    def __init__(self, network: Any, temperature: float, bias: float) -> None:
        self.network, self.temperature, self.bias = network, temperature, bias

    def __call__(self, x: Any) -> Any:
        import torch

        logits = self.network(x).float()
        z = (logits[:, 1] - logits[:, 0]) / self.temperature + self.bias
        return torch.stack([-z, z], dim=1)


def grad_cam(model: TrainedModel, pixels: Any, *, device: str = "auto", batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(heat maps float [N, H, W] in 0..1, P(positive) [N]) for decoded uint8 images [N, H, W]. Each
    map explains the class the model gives the image at its threshold."""
    import torch
    from captum.attr import LayerGradCam

    torch_device = resolve_device(device)
    network = model.network.to(torch_device).eval()
    forward = _CalibratedLogOdds(network, model.temperature, model.calibration_bias)
    cam = LayerGradCam(forward, network.layer4)
    pixels = torch.as_tensor(pixels)
    heats, scores = [], []
    # Gradients flow to the activations only: the weights' own gradients would be computed and kept for nothing.
    trainable = [p for p in network.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        for start in range(0, len(pixels), batch_size):
            heat, probability = _grad_cam_batch(cam, forward, model, pixels[start:start + batch_size].to(torch_device))
            heats.append(heat)
            scores.append(probability)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    if not heats:
        return np.zeros((0, *pixels.shape[-2:]), dtype=np.float32), np.zeros(0)
    return np.concatenate(heats), np.concatenate(scores)


def _grad_cam_batch(cam: Any, forward: _CalibratedLogOdds, model: TrainedModel, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from captum.attr import LayerAttribution

    from xraylib.evaluate import probabilities_from_logits

    x = dataset.to_model_input(pixels, model.mean, model.std)
    with torch.no_grad():
        z = forward(x)[:, 1].double()
    probability = probabilities_from_logits(z.cpu().numpy())
    target = torch.as_tensor((probability >= model.threshold).astype(np.int64), device=x.device)
    attribution = cam.attribute(x.requires_grad_(), target=target, relu_attributions=False).detach().double()
    explained = torch.where(target == 1, z, -z)
    places = attribution[0, 0].numel()
    attribution += ((explained - attribution.sum(dim=(1, 2, 3))) / places).view(-1, 1, 1, 1)
    heat = LayerAttribution.interpolate(attribution.clamp(min=0), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    heat = heat[:, 0].float().clamp_(min=0).cpu().numpy()
    peak = heat.reshape(len(heat), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0), probability


def _explanations(model: TrainedModel, names: Sequence[str], pixels: Any, true: Sequence[str | None], *,
                  device: str) -> list[Explanation]:
    heats, probabilities = grad_cam(model, pixels, device=device)
    return [Explanation(name, np.asarray(pixels[i]), heats[i], float(probabilities[i]),
                        model.class_names[int(probabilities[i] >= model.threshold)], true[i])
            for i, name in enumerate(names)]


def explain_rows(model: TrainedModel, evaluation: Any, rows: Sequence[int], *, device: str = "auto") -> list[Explanation]:
    """Grad-CAM of the images at `rows` of an `evaluate.Evaluation` (pixels it decoded already)."""
    rows = list(rows)
    return _explanations(model, [evaluation.names[i] for i in rows], evaluation.images[rows],
                         [evaluation.class_names[int(evaluation.labels[i])] for i in rows], device=device)


def rows_to_explain(evaluation: Any, mistakes: int = 4, correct_per_class: int = 2) -> list[int]:
    """The most confident mistakes, then the most confidently right images of each class."""
    rows = evaluation.most_confident_mistakes(mistakes)
    predicted = (evaluation.probabilities >= evaluation.metrics["threshold"]).astype(int)
    for label in (0, 1):
        right = np.flatnonzero((predicted == label) & (evaluation.labels == label))
        confidence = np.abs(evaluation.probabilities[right] - evaluation.metrics["threshold"])
        rows += right[np.argsort(-confidence)][:correct_per_class].tolist()
    return rows


def overlay_name(location: str) -> str:
    """`person1_virus_6.jpeg` -> `person1_virus_6.gradcam.png`."""
    return location.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".gradcam.png"


def explain_images(model: str | TrainedModel, images: str | Path | Sequence[str | Path], out: str, *,
                   device: str = "auto", skip_bad: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """Grad-CAM overlays of images (files, folders or s3:// prefixes, local or S3) written to `out`
    as `<image name>.gradcam.png`, one per image; returns where each went. A bad image raises
    ImageDecodeError naming it, unless `skip_bad`, which leaves it out and reports it via `log`."""
    import torch

    from xraylib import plots

    locations = [images] if isinstance(images, str | Path) else images
    names, _ignored = dataset.find_images([str(i) for i in locations])
    if not names:
        raise DatasetError(f"no images to explain in {', '.join(map(str, locations))}: pass image files, folders or prefixes")
    trained = load_model(model) if isinstance(model, str) else model
    kept, skipped = dataset.decode_each(
        lambda location: dataset.equalize(dataset.decode_image(storage.read_bytes(location), trained.image_size, location),
                                          trained.equalize),
        names, skip_bad=skip_bad)
    dataset.report_skipped(skipped, log)
    if not kept:
        raise DatasetError(f"none of the {len(names)} images could be decoded: the reasons are listed above")
    pixels = torch.from_numpy(np.stack([px for _, px in kept]))
    written = []
    stems = [overlay_name(name) for name, _ in kept]
    duplicated = {s for s in stems if stems.count(s) > 1}
    for i, explanation in enumerate(_explanations(trained, [n for n, _ in kept], pixels, [None] * len(kept), device=device)):
        # Two images of one name in different folders must not overwrite each other's overlay.
        file = stems[i] if stems[i] not in duplicated else f"{i:04d}-{stems[i]}"
        location = storage.join(out, file)
        storage.write_bytes(location, plots.figure_png(plots.grad_cam_figure([explanation], columns=1, with_image=True)))
        written.append(location)
    log(f"wrote {len(written)} Grad-CAM overlay(s) to {out}")
    return written
