"""model.activation_checkpointing: blocks really recompute in the backward pass (their layers are called
again), gradients and a SAM step equal the plain model's, and BatchNorm running statistics move once
per step, not again in the recomputation, for built-in, torchvision, timm and Hugging Face models."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import build_model
from sharp_unlearn.models.checkpointing import top_level_blocks
from sharp_unlearn.validation import load_config

IMAGES = (3, 16, 16)
TIMM_OPTIONS = "model.options={img_size: 16, patch_size: 4, depth: 2, embed_dim: 16, num_heads: 2}"


def build(name: str, *overrides: str, checkpointing: bool) -> nn.Module:
    cfg = load_config([], ["tracking.enabled=false", f"model.name={name}",
                           f"model.activation_checkpointing={str(checkpointing).lower()}", *overrides]).model
    torch.manual_seed(0)  # the same initial weights with and without
    return build_model(cfg, 10, IMAGES)


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, *IMAGES, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def layer_calls(model: nn.Module) -> list[str]:
    """Names of the parameterised leaf layers, appended each time one runs."""
    calls: list[str] = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
            module.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    return calls


def norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    loss = F.cross_entropy(model(x), y)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)  # the training loop's way of taking gradients


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=10)
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


MODELS = [
    pytest.param(("small_cnn",), id="builtin-bn"),
    pytest.param(("vit_s", "model.options={dim: 16, depth: 2, heads: 2}"), id="builtin-vit"),
    pytest.param(("torchvision:resnet18",), id="torchvision-bn"),
    pytest.param(("timm:vit_tiny_patch16_224", TIMM_OPTIONS), id="timm-native"),
    pytest.param(("timm:resnet18",), id="timm-native-bn"),
    pytest.param(("hf",), id="hf-native"),
]


def model_args(spec: tuple[str, ...], request) -> tuple[str, ...]:
    if spec[0] == "hf":  # a saved tiny ViT (a fixture: only this case needs transformers)
        return (f"hf:{request.getfixturevalue('hf_vit_dir')}",)
    if spec[0].startswith("timm:"):
        pytest.importorskip("timm")
    return spec


@pytest.mark.parametrize("spec", MODELS)
def test_same_gradients_recomputed_blocks_and_running_statistics_once(spec, request):
    args = model_args(spec, request)
    plain, checkpointed = build(*args, checkpointing=False), build(*args, checkpointing=True)
    x, y = data()
    plain_calls, checkpointed_calls = layer_calls(plain), layer_calls(checkpointed)
    loss, grads = loss_and_grads(plain, x, y)
    forward_only = len(plain_calls)
    ck_loss, ck_grads = loss_and_grads(checkpointed, x, y)
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=1e-6)
    assert len(grads) == len(ck_grads)
    for got, want in zip(ck_grads, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the backward pass ran block layers again: more layer calls than the plain model's one forward
    assert len(checkpointed_calls) > forward_only, (len(checkpointed_calls), forward_only)
    recomputed = {name for name in checkpointed_calls if checkpointed_calls.count(name) == 2}
    assert recomputed and all(checkpointed_calls.count(name) <= 2 for name in checkpointed_calls)
    # BatchNorm running statistics (where there are any) as after one forward, not two
    want_buffers = norm_buffers(plain)
    got_buffers = norm_buffers(checkpointed)
    assert got_buffers.keys() == want_buffers.keys()
    for key, value in want_buffers.items():
        torch.testing.assert_close(got_buffers[key], value, rtol=0, atol=1e-6, msg=key)
        if key.endswith("num_batches_tracked"):
            assert int(got_buffers[key]) == 1, key


def test_builtin_blocks_are_the_stacked_composite_modules():
    model = build("small_cnn", checkpointing=True)
    assert top_level_blocks(model) == ["body.0", "body.1", "body.3"]
    x, y = data()
    calls = layer_calls(model)
    loss_and_grads(model, x, y)
    # a conv inside a block runs twice (forward, recomputation); the head outside every block once
    assert calls.count("body.0.0") == 2 and calls.count("head") == 1
    with torch.no_grad():  # evaluation: nothing to recompute for
        calls.clear()
        model.eval()(x)
    assert calls.count("body.0.0") == 1


def test_sam_step_with_checkpointing_equals_without():
    """SAM's second pass (BatchNorm frozen, recomputed inside the frozen block) and the first pass's
    recomputation (frozen by the guard) leave the statistics of one forward at w."""
    x, y = data(12)
    objective = Objective("ce", "train", lambda m, b: F.cross_entropy(m(b.x), b.y), sam=SamSpec(rho=0.5))
    models = []
    for checkpointing in (False, True):
        model = build("small_cnn", checkpointing=checkpointing).train()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for _ in range(2):
            trainer.step([objective], {"train": [Batch(x, y, torch.arange(len(y)))]})
        models.append(model)
    plain, checkpointed = models
    for (name, want), got in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    assert int(checkpointed.state_dict()["body.0.1.num_batches_tracked"]) == 2  # two steps, one update each


def test_checkpointed_model_deep_copies_and_pickles():
    model = build("small_cnn", checkpointing=True)
    teacher = copy.deepcopy(model)  # SCRUB's teacher
    x, y = data()
    before = norm_buffers(model)
    calls = layer_calls(teacher)
    loss_and_grads(teacher, x, y)
    assert calls.count("body.0.0") == 2  # the copy's blocks are checkpointed (and run the copy's layers)
    assert int(teacher.state_dict()["body.0.1.num_batches_tracked"]) == 1
    for key, value in norm_buffers(model).items():
        assert torch.equal(value, before[key]), key  # the original is untouched
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loss, grads = loss_and_grads(loaded, x, y)
    want_loss, want_grads = loss_and_grads(build("small_cnn", checkpointing=False), x, y)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_model_without_blocks_and_bad_value_are_config_errors():
    with pytest.raises(ConfigError, match="no blocks to checkpoint"):
        build("mlp", checkpointing=True)
    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        load_config([], ["tracking.enabled=false", "model.activation_checkpointing=sometimes"])
