"""The network and the model file: construction from weights, save/load, refusing unsafe files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xraylib import storage
from xraylib.errors import ModelFileError
from xraylib.evaluate import predict_probabilities
from xraylib.model import TrainedModel, build_resnet50, load_model, model_metadata, save_model
from xraylib.predict import predict_images


def _metadata(threshold: float = 0.4) -> dict:
    return model_metadata(class_names=("NORMAL", "PNEUMONIA"), image_size=32, threshold=threshold)


def test_resnet50_has_a_two_class_head_and_can_freeze_the_backbone():
    net = build_resnet50("none", freeze_backbone=True)
    assert net.fc.out_features == 2
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


def test_save_to_s3_and_load_gives_identical_predictions(bucket):
    torch.manual_seed(0)
    net = build_resnet50("none").eval()
    pixels = torch.randint(0, 256, (6, 32, 32), dtype=torch.uint8)
    kwargs = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    before = predict_probabilities(net, pixels, **kwargs)
    save_model(f"s3://{bucket}/runs/a/model.pt", net, _metadata())
    for location in (f"s3://{bucket}/runs/a/model.pt", f"s3://{bucket}/runs/a"):
        loaded = load_model(location)
        assert loaded.threshold == 0.4 and loaded.class_names == ("NORMAL", "PNEUMONIA") and loaded.image_size == 32
        assert torch.equal(torch.from_numpy(predict_probabilities(loaded.network, pixels, **kwargs)), torch.from_numpy(before))
    assert set(loaded.metadata["versions"]) >= {"xraylib", "torch", "torchvision", "python"}


def test_resnet50_is_torchvisions_network():
    """Same parameter names and shapes, same seeded initialisation, same outputs."""
    from torchvision.models import resnet50

    from xraylib.resnet import ResNet50

    torch.manual_seed(3)
    theirs = resnet50(num_classes=2).eval()
    torch.manual_seed(3)
    ours = ResNet50(num_classes=2).eval()
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_predicting_does_not_import_torchvision(tmp_path):
    """torchvision and torch._dynamo cost seconds to import; a cold `xraylib predict` must not pay for them."""
    save_model(str(tmp_path / "model.pt"), build_resnet50("none"), _metadata())
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "x.jpeg")
    code = ("import sys; from xraylib.predict import predict_images; "
            f"print(predict_images({str(tmp_path / 'model.pt')!r}, [{str(tmp_path / 'x.jpeg')!r}])[0].label); "
            "print('torchvision' in sys.modules or 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("NORMAL", "PNEUMONIA") and out[1] == "False"


def test_predict_takes_one_location_or_several_and_a_folder_stands_for_its_images(tmp_path):
    model = TrainedModel(build_resnet50("none").eval(), _metadata())
    folder = tmp_path / "new scans"
    (folder / "ward 2").mkdir(parents=True)
    for i, name in enumerate(["b.jpeg", "a.png", "ward 2/c.JPG"]):
        Image.fromarray(np.full((40, 40), 60 * i, np.uint8)).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    notes: list[str] = []
    one = predict_images(model, str(folder), log=notes.append)  # a single string is one location
    assert [p.image for p in one] == [str(folder / n) for n in ("a.png", "b.jpeg", "ward 2/c.JPG")]
    assert notes == ["ignored 1 non-image file(s)"]
    several = predict_images(model, [folder / "b.jpeg", folder / "ward 2"], log=notes.append)
    assert [p.image for p in several] == [str(folder / "b.jpeg"), str(folder / "ward 2" / "c.JPG")]
    assert several[0].probability == pytest.approx(one[1].probability, abs=1e-5)  # alone or with others, one answer
    assert predict_images(model, []) == []


def test_weights_file_from_s3_or_disk_initialises_the_backbone(bucket, tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    imagenet_like = resnet50(weights=None).state_dict()  # a 1,000-class head, like torchvision's file
    buffer = io.BytesIO()
    torch.save(imagenet_like, buffer)
    storage.write_bytes(f"s3://{bucket}/weights/resnet50.pth", buffer.getvalue())
    (tmp_path / "resnet50.pth").write_bytes(buffer.getvalue())
    for location in (f"s3://{bucket}/weights/resnet50.pth", str(tmp_path / "resnet50.pth")):
        net = build_resnet50(location)
        assert torch.equal(net.conv1.weight, imagenet_like["conv1.weight"])
        assert net.fc.out_features == 2


def test_imagenet_weights_come_from_torchs_cache_when_offline(tmp_path, monkeypatch):
    from torchvision.models import ResNet50_Weights, resnet50

    torch.manual_seed(2)
    state = resnet50(weights=None).state_dict()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / os.path.basename(ResNet50_Weights.IMAGENET1K_V2.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net = build_resnet50("imagenet")
    assert torch.equal(net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_model_file_with_a_pickle_payload_is_refused_without_running_it(tmp_path, bucket):
    marker = tmp_path / "payload-ran"
    buffer = io.BytesIO()
    torch.save({"format": "xraylib-model", "state_dict": {}, "evil": _Payload(str(marker))}, buffer)
    storage.write_bytes(f"s3://{bucket}/evil/model.pt", buffer.getvalue())
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    for location in (f"s3://{bucket}/evil/model.pt", str(tmp_path / "evil.pt")):
        with pytest.raises(ModelFileError, match="could run code"):
            load_model(location)
        with pytest.raises(ModelFileError):
            build_resnet50(location)
    assert not marker.exists()


def test_files_that_are_not_models_get_a_clear_error(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ModelFileError, match=r"notes\.pt is not a PyTorch weights file"):
        load_model(str(tmp_path / "notes.pt"))
    torch.save({"some": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match=r"other\.pt is not an xraylib model file"):
        load_model(str(tmp_path / "other.pt"))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ModelFileError, match=r"wrong\.pth does not hold ResNet50 weights"):
        build_resnet50(str(tmp_path / "wrong.pth"))


def test_test_time_augmentation_averages_views_of_the_same_image():
    from xraylib import config as xconfig
    from xraylib.dataset import affine_batch

    torch.manual_seed(4)
    net = build_resnet50("none").eval()
    kwargs = {"mean": xconfig.IMAGENET_MEAN, "std": xconfig.IMAGENET_STD}
    flat = torch.full((2, 48, 48), 90, dtype=torch.uint8)  # every view of a flat image is the same image
    assert np.allclose(predict_probabilities(net, flat, tta=True, **kwargs), predict_probabilities(net, flat, **kwargs),
                       atol=1e-5)
    ramp = torch.arange(48, dtype=torch.uint8).mul(5).expand(48, 48).T.contiguous()
    structured = torch.stack([ramp, ramp.flip(0)])
    plain, averaged = (predict_probabilities(net, structured, tta=t, **kwargs) for t in (False, True))
    assert not np.allclose(plain, averaged, atol=1e-6) and ((averaged > 0) & (averaged < 1)).all()
    identity = affine_batch(structured, angle=0.0, scale=1.0, shift_x=0.0, shift_y=0.0)
    assert torch.allclose(identity[:, 0] * 255, structured.float(), atol=1e-3)
