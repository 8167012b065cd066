"""Bring your own model, end to end: each source loaded from local weights, pretrained (fine-tuned) on
digits, unlearned with Sharp MinMax + SAM, and evaluated with the MIA and entanglement, whose
penultimate features come from the automatic hook on the classifier head."""
from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from sharp_unlearn import evaluate, pretrain, unlearn

USER_MODULE = textwrap.dedent("""
    from torch import nn

    def small_net(num_classes, hidden=16):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
""")


def _resnet18(folder):
    torchvision = pytest.importorskip("torchvision")
    module = torchvision.models.resnet18(num_classes=1000)  # an ImageNet-shaped file: head refitted to 10
    torch.save(module.state_dict(), folder / "resnet18.pth")
    # 40x40 keeps layer4 at 2x2 (40 -> 20 -> 10 -> 5 -> 3 -> 2): at 1x1 (8x8 digits as they are) BatchNorm
    # fails on a last batch of one; the smallest such size, as the pixels set the cost of this test
    return {"name": "torchvision:resnet18", "weights": str(folder / "resnet18.pth"), "input_size": 40}, \
        module.state_dict()


def _timm_vit(folder):
    timm = pytest.importorskip("timm")
    options = {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2}
    module = timm.create_model("vit_tiny_patch16_224", num_classes=10, **options)
    torch.save(module.state_dict(), folder / "vit.pth")
    return {"name": "timm:vit_tiny_patch16_224", "options": options, "weights": str(folder / "vit.pth")}, \
        module.state_dict()


def _hf_vit(folder):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    module = transformers.ViTForImageClassification(config)
    module.save_pretrained(folder / "hf-vit")
    return {"name": f"hf:{folder / 'hf-vit'}"}, module.state_dict()


def _python(folder):
    (folder / "own_models.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))  # as PYTHONPATH would; the test removes it
    torch.manual_seed(11)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    torch.save(module.state_dict(), folder / "own.pt")
    return {"name": "python:own_models:small_net", "weights": str(folder / "own.pt")}, module.state_dict()


SOURCES = {
    # ResNet-18 (11.7 M parameters) at 40x40 through pretrain, retrain and SAM unlearning: minutes on CPU
    "torchvision": pytest.param(_resnet18, marks=[pytest.mark.slow, pytest.mark.timeout(2400)]),
    "timm": pytest.param(_timm_vit, marks=pytest.mark.slow),
    "hf": pytest.param(_hf_vit, marks=pytest.mark.slow),
    "python": pytest.param(_python),
}


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
def test_pretrain_unlearn_evaluate(make, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "own_models", raising=False)
    torch.manual_seed(0)
    model_section, start = make(tmp_path)
    common = {"train.checkpoint_every": 0, "train.eval_every": 0, "data.augment": False}
    pre = pretrain(model=model_section, output_dir=str(tmp_path / "runs"), quiet=True,
                   optimizer={"name": "sgd", "lr": 0.02, "weight_decay": 0.0}, **{"train.epochs": 1}, **common)
    tuned = {k[len("module."):]: v for k, v in pre.model.state_dict().items()}
    body = [k for k, v in start.items() if v.is_floating_point() and k in tuned and tuned[k].shape == v.shape
            and v.numel() > 1 and "weight" in k]
    assert body, "no tensor of the weights file in the model"
    # fine-tuned from the file: the body as a whole stays near its starting values (a fresh initialisation
    # would be about sqrt(2) times their norm away)
    moved = sum(float((tuned[k] - start[k]).norm() ** 2) for k in body) ** 0.5
    size = sum(float(start[k].norm() ** 2) for k in body) ** 0.5
    assert moved < 0.5 * size, (moved, size)

    # one unlearning epoch: the test is about the model source end to end, not about forgetting well
    # (ResNet-18 at 40x40 with SAM costs a minute per epoch on CPU)
    out = unlearn(pre, method={"name": "sharp_minmax", "mask_fraction": 0.5, "epochs": 1},
                  optimizer={"name": "sam", "rho": 0.05, "lr": 0.01}, forget={"kind": "random", "size": 40},
                  quiet=True, **{"train.epochs": 1}, **common)
    moved = max(float((a - b).abs().max()) for a, b in zip(out.model.state_dict().values(),
                                                           pre.model.state_dict().values()) if a.is_floating_point())
    assert moved > 0.0
    result = evaluate(out, metrics="mia,entanglement", options={"wasserstein_max_per_set": 200})
    for name in ("mia_efficacy", "entanglement"):
        matching = [v for k, v in result.metrics.items() if k.startswith(name)]
        assert matching and all(math.isfinite(v) for v in matching), (name, result.metrics)
