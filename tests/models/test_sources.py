"""Model sources (torchvision:, timm:, hf:, python:): weights, head fitting, the automatic feature hook,
the input adapter, and the one-line errors for bad values."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import build_model
from sharp_unlearn.models.external import ExternalModel, import_state_dict
from sharp_unlearn.validation import load_config  # names are checked where the registries are

DIGITS = (1, 8, 8)


def model_cfg(*overrides: str):
    return load_config([], ["tracking.enabled=false", *overrides]).model


def _resnet_penultimate(resnet: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's forward up to (not including) ``fc``, written out."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
    x = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
    return torch.flatten(resnet.avgpool(x), 1)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A torchvision ResNet-18 state dict with a 7-class head, as a user's fine-tuned file."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    module = torchvision.models.resnet18(num_classes=7)
    path = tmp_path_factory.mktemp("weights") / "resnet18-7.pt"
    torch.save(module.state_dict(), path)
    return path, module.state_dict()


def test_torchvision_weights_file_loads_and_the_head_is_refitted(resnet18_weights):
    path, saved = resnet18_weights
    torch.manual_seed(0)
    model = build_model(model_cfg("model.name=torchvision:resnet18", f"model.weights={path}"), 10, DIGITS)
    assert isinstance(model, ExternalModel) and model.head_path == "fc"
    body = {k: v for k, v in model.module.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, saved[k]) for k, v in body.items())  # every body tensor from the file
    assert model.head.out_features == 10 and model.head.in_features == 512  # 7-class head replaced for 10

    x = torch.rand(4, 64)  # digits arrive flat: reshaped to 1x8x8, repeated to the 3 channels conv1 takes
    model.eval()
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        images = x.reshape(4, 1, 8, 8).expand(-1, 3, -1, -1)
        expected = _resnet_penultimate(model.module, images)
    assert feats.shape == (4, 512) and model.feature_dim == 512
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(logits, model.head(feats))
    torch.testing.assert_close(logits, model(x))


def test_torchvision_weights_name_from_the_local_cache_only(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = model_cfg("model.name=torchvision:mobilenet_v3_small", "model.weights=IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="not in the local cache") as err:
        build_model(cfg, 10, DIGITS)  # nothing cached and no consent: no download is tried
    assert str(tmp_path) in str(err.value)

    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch.manual_seed(5)
    cached = torchvision.models.mobilenet_v3_small().state_dict()
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(cached, folder / weights.url.rsplit("/", 1)[1])
    for name in ("IMAGENET1K_V1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        model = build_model(model_cfg("model.name=torchvision:mobilenet_v3_small", f"model.weights={name}"),
                            10, DIGITS)
        assert model.head_path == "classifier.3"  # the last Linear of the Sequential classifier
        assert torch.equal(model.module.features[0][0].weight, cached["features.0.0.weight"])
        assert model.head.out_features == 10

    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_model(model_cfg("model.name=torchvision:mobilenet_v3_small", "model.weights=IMAGENET9K"), 10, DIGITS)


def test_feature_layer_override_and_bad_path():
    pytest.importorskip("torchvision")
    cfg = model_cfg("model.name=torchvision:resnet18", "model.feature_layer=layer4")
    model = build_model(cfg, 10, DIGITS).eval()
    with torch.no_grad():
        logits, feats = model.forward_with_features(torch.rand(2, 64))
    # layer4's input: 256 channels; digits' 8x8 is 1x1 by then (stem stride 2, max-pool, layer2, layer3)
    assert feats.shape == (2, 256) and model.feature_dim == 256
    assert logits.shape == (2, 10)
    with pytest.raises(ConfigError, match="model.feature_layer='layer9'"):
        build_model(model_cfg("model.name=torchvision:resnet18", "model.feature_layer=layer9"), 10, DIGITS)


def test_input_size_resizes_for_models_that_need_it():
    pytest.importorskip("torchvision")
    with pytest.raises(ConfigError, match="fails on the data's inputs"):  # VGG's 5 poolings: 8x8 is too small
        build_model(model_cfg("model.name=torchvision:vgg11", "model.options={num_classes: 10}"), 10, DIGITS)
    model = build_model(model_cfg("model.name=torchvision:vgg11", "model.input_size=32"), 10, DIGITS)
    assert model.resize_to == (32, 32) and model.head_path == "classifier.6" and model.feature_dim == 4096
    assert model.adapt(torch.rand(3, 64)).shape == (3, 3, 32, 32)


def test_timm_tiny_vit_head_from_get_classifier(tmp_path):
    timm = pytest.importorskip("timm")
    options = "model.options={img_size: 8, patch_size: 2, depth: 1, embed_dim: 16, num_heads: 2, in_chans: 1}"
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, depth=1, embed_dim=16,
                               num_heads=2, in_chans=1, num_classes=4)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = build_model(model_cfg("model.name=timm:vit_tiny_patch16_224", options, f"model.weights={tmp_path}/vit.pth"),
                        10, DIGITS).eval()
    assert model.head_path == "head" and model.head.out_features == 10 and model.repeat_channels is None
    assert torch.equal(model.module.patch_embed.proj.weight, source.patch_embed.proj.weight)
    x = torch.rand(3, 64)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        tokens = model.module.forward_features(x.reshape(3, 1, 8, 8))
    torch.testing.assert_close(feats, model.module.forward_head(tokens, pre_logits=True))
    torch.testing.assert_close(logits, model.head(feats))


def test_timm_unknown_name():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="timm:no_such_net"):
        model_cfg("model.name=timm:no_such_net")


def _tiny_hf_vit(folder, num_labels: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=num_labels)
    torch.manual_seed(2)
    model = transformers.ViTForImageClassification(config)
    model.save_pretrained(folder)
    return model


def test_hf_classifier_from_a_local_directory(tmp_path):
    saved = _tiny_hf_vit(tmp_path / "vit")
    model = build_model(model_cfg(f"model.name=hf:{tmp_path / 'vit'}"), 10, DIGITS).eval()
    assert model.head_path == "classifier" and model.head.out_features == 10
    assert model.module.config.num_labels == 10
    assert model.repeat_channels == 3 and model.resize_to is None  # declared 8x8 = the data's size
    assert torch.equal(model.module.vit.embeddings.patch_embeddings.projection.weight,
                       saved.vit.embeddings.patch_embeddings.projection.weight)
    x = torch.rand(2, 64)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        hidden = model.module.vit(model.adapt(x)).last_hidden_state[:, 0]  # the class token ViT classifies
    torch.testing.assert_close(feats, hidden)
    torch.testing.assert_close(logits, model(x))


def test_hf_offline_only(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    cfg = model_cfg("model.name=hf:some-org/not-cached-model")
    with pytest.raises(ConfigError, match="cannot be loaded offline"):
        build_model(cfg, 10, DIGITS)
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        model_cfg(f"model.name=hf:{tmp_path / 'nocfg'}")


USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes, hidden=8):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
            self.out = nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.out(self.body(x))

    def not_a_model(**kwargs):
        return {"weights": 1}

    def conv_head(num_classes):
        # a head that is not a Linear layer and has 5 outputs whatever the data
        return nn.Sequential(nn.Conv2d(1, 5, 8), nn.Flatten())
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_python_callable_with_options(user_module):
    model = build_model(model_cfg(f"model.name=python:{user_module}:Net", "model.options={hidden: 6}"), 10, DIGITS)
    assert model.head_path == "out" and model.feature_dim == 6  # the last Linear: no known head name needed
    x = torch.rand(5, 64)
    logits, feats = model.forward_with_features(x)
    torch.testing.assert_close(feats, model.module.body(x.reshape(5, 1, 8, 8)))
    assert logits.shape == (5, 10)


@pytest.mark.parametrize("name, needle", [
    ("python:{m}:missing", "has no attribute 'missing'"),
    ("python:no_such_module_xyz:Net", "not importable"),
    ("python:{m}", "expected python:<module>:<callable>"),
])
def test_python_source_config_errors(user_module, name, needle):
    with pytest.raises(ConfigError, match=needle):
        model_cfg(f"model.name={name.format(m=user_module)}")


def test_python_callable_must_return_a_module(user_module):
    with pytest.raises(ConfigError, match="returned a dict; expected a torch.nn.Module"):
        build_model(model_cfg(f"model.name=python:{user_module}:not_a_model"), 10, DIGITS)


def test_head_that_cannot_be_fitted(user_module):
    with pytest.raises(ConfigError, match="outputs \\(5,\\) logits per example but the data have 10 classes"):
        build_model(model_cfg(f"model.name=python:{user_module}:conv_head", "model.feature_layer=1"), 10, DIGITS)


def test_weights_file_errors(tmp_path, user_module):
    cfg = model_cfg(f"model.name=python:{user_module}:Net", f"model.weights={tmp_path}/absent.pt")
    with pytest.raises(ConfigError, match="absent.pt.*does not exist"):
        build_model(cfg, 10, DIGITS)
    torch.save({"body.1.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    cfg = model_cfg(f"model.name=python:{user_module}:Net", f"model.weights={tmp_path}/other.pt")
    with pytest.raises(ConfigError, match="does not match the model architecture"):
        build_model(cfg, 10, DIGITS)


def test_external_checkpoint_keeps_its_head(user_module):
    torch.manual_seed(0)
    cfg = model_cfg(f"model.name=python:{user_module}:Net")
    model = build_model(cfg, 10, DIGITS)
    bare = {k[len("module."):]: v.clone() + 1 for k, v in model.state_dict().items()}
    state = import_state_dict(model, {"state_dict": bare}, "model.pt")
    model.load_state_dict(state)
    assert torch.equal(model.module.out.bias, bare["out.bias"])
    wrong = {**bare, "out.weight": torch.zeros(4, 8), "out.bias": torch.zeros(4)}
    with pytest.raises(ConfigError, match="head of 4 classes but the data have 10"):
        import_state_dict(model, wrong, "model.pt")


@pytest.mark.parametrize("overrides, needle", [
    (["model.name=torchvision:resnet_nope"], "not a torchvision classification model"),
    (["model.name=keras:resnet"], "unknown model source 'keras'"),
    (["model.feature_layer=fc"], "applies to external models only"),
    (["model.name=torchvision:resnet18", "model.input_size=0"], "model.input_size=0"),
])
def test_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        model_cfg(*overrides)


def test_model_tags_say_fine_tuning():
    from sharp_unlearn.models.sources import model_tags

    assert model_tags(model_cfg()) == {"model_source": "builtin", "init": "scratch"}
    tuned = model_cfg("model.name=torchvision:resnet18", "model.weights=IMAGENET1K_V1")
    assert model_tags(tuned) == {"model_source": "torchvision", "init": "pretrained", "init_weights": "IMAGENET1K_V1"}
    assert model_tags(tuned, "retrain")["reference_recipe"] == "fine-tuned from init_weights on the retain set"
    assert model_tags(model_cfg(), "retrain")["reference_recipe"] == "trained from scratch on the retain set"
