"""Models this package does not define (torchvision, timm, Hugging Face, a user's callable).

:class:`ExternalModel` wraps the user's module *as it is* (``self.module``) and gives it the
:class:`~sharp_unlearn.models.base.FeatureModel` contract without any user code:

- ``features(x)`` / ``forward_with_features(x)``: the penultimate representation is the *input*
  of the classifier head, read by a forward pre-hook registered for that one call (no hook lives
  on the module between calls, so deep copies, pickling and DeepSpeed's own hooks never see it);
- ``head``: the classifier module (``fc``, ``classifier``, ``heads.head``, timm's
  ``get_classifier()``, ...), found automatically or named by ``model.feature_layer``;
- an input adapter in front, without parameters: the data set's flat or ``[C, H, W]`` tensors are
  reshaped to images, a one-channel image is repeated to the channels the model's first
  convolution takes (a grey image as RGB), and images are resized (bilinear) to ``model.input_size``
  or, if unset, to the fixed size a model declares (ViTs: 224); models with global pooling
  (ResNets) otherwise see the data at their own size.

Weights of the wrapped module live under the ``module.`` prefix of this wrapper's state dict;
:func:`import_state_dict` maps a state dict saved from the bare module (``torch.save(m.state_dict())``
outside this tool) onto it.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.base import FeatureModel, load_model_state
from sharp_unlearn.models.resnet import image_shape

#: attribute paths of classifier heads, in the order they are tried (torchvision, Hugging Face
#: and most hand-written models); timm models answer ``get_classifier()`` first
HEAD_PATHS = ("fc", "heads.head", "heads", "head", "classifier", "last_linear")


def find_head(module: nn.Module, feature_layer: str | None, label: str) -> str:
    """The module path of the classifier head (its input are the penultimate features)."""
    if feature_layer is not None:
        try:
            module.get_submodule(feature_layer)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n][-6:]
            raise ConfigError(f"model.feature_layer={feature_layer!r} is not a module of {label}; expected a "
                              f"module path such as {', '.join(names)}") from None
        return feature_layer
    candidates: list[str] = []
    get_classifier = getattr(module, "get_classifier", None)
    if callable(get_classifier):  # timm
        try:
            head = get_classifier()
        except Exception:  # noqa: BLE001 - a user's method of that name may want arguments
            head = None
        if isinstance(head, nn.Module):
            candidates += [n for n, m in module.named_modules() if m is head and n]
    candidates += [p for p in HEAD_PATHS if _has_submodule(module, p)]
    for path in candidates:
        resolved = _last_linear(module, path)
        if resolved is not None:
            return resolved
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if linears:  # a plain model: its last registered Linear layer is the classifier
        return linears[-1]
    raise ConfigError(f"cannot find the classifier head of {label}; expected a Linear layer named fc, classifier, "
                      "head or heads.head, or set model.feature_layer=<module path>")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(module.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def _last_linear(module: nn.Module, path: str) -> str | None:
    """``path`` itself when it is a Linear layer, else the last Linear inside it (a Sequential
    classifier such as VGG's or MobileNet's ends in one); None when it holds none."""
    sub = module.get_submodule(path)
    if isinstance(sub, nn.Linear):
        return path
    inner = [n for n, m in sub.named_modules() if isinstance(m, nn.Linear)]
    return f"{path}.{inner[-1]}" if inner else None


def head_outputs(module: nn.Module, head_path: str) -> int | None:
    head = module.get_submodule(head_path)
    return int(head.out_features) if isinstance(head, nn.Linear) else None


def replace_head(module: nn.Module, head_path: str, num_classes: int, label: str) -> None:
    """A fresh Linear head of ``num_classes`` outputs on the same inputs (fine-tuning to new classes)."""
    head = module.get_submodule(head_path)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"the head {head_path!r} of {label} is a {type(head).__name__}, which cannot be resized "
                          f"to {num_classes} classes; expected a Linear head, or a model built for {num_classes} "
                          "classes (set it in model.options)")
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    new.to(device=head.weight.device, dtype=head.weight.dtype)
    parent_path, _, name = head_path.rpartition(".")
    setattr(module.get_submodule(parent_path) if parent_path else module, name, new)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "num_labels"):  # Hugging Face: keep config and head in step
        config.num_labels = num_classes


def first_conv_channels(module: nn.Module) -> int | None:
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.Conv1d)):
            return int(sub.in_channels)
    return None


def declared_image_size(module: nn.Module) -> tuple[int, int] | None:
    """The input size a model insists on (ViT position embeddings), or None when any size works."""
    for owner, attr in ((module, "image_size"), (getattr(module, "config", None), "image_size"),
                        (getattr(module, "patch_embed", None), "img_size")):
        if owner is None:
            continue
        if attr == "img_size" and getattr(owner, "dynamic_img_size", False):
            continue
        size = getattr(owner, attr, None)
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return (int(size[0]), int(size[1]))
    return None


def load_weights_file(path: str | Path, label: str) -> dict[str, torch.Tensor]:
    """A state dict from a file: ``.safetensors`` or a torch file (loaded with ``weights_only=True``);
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DataParallel's ``module.`` prefix are undone."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights={str(path)!r} does not exist; expected a state-dict file "
                          f"for {label} (.pt, .pth, .bin or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.weights={str(path)!r} is not a readable state dict ({first[:200]})") from None
    return unwrap_state_dict(state, str(path))


def unwrap_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{source} holds no state dict (a mapping of parameter names to tensors)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class ExternalModel(FeatureModel):
    """A user's classifier with automatic penultimate features (see the module docstring)."""

    def __init__(self, module: nn.Module, *, label: str, input_shape: tuple[int, ...], num_classes: int,
                 feature_layer: str | None = None, input_size: int | None = None,
                 input_channels: int | None = None):
        super().__init__()
        self.module = module
        self.label = label
        self.head_path = find_head(module, feature_layer, label)
        self.image_shape = image_shape(input_shape)
        self.num_classes = num_classes
        channels = self.image_shape[0]
        wanted = input_channels if input_channels is not None else first_conv_channels(module)
        if wanted is not None and channels not in (1, wanted):
            raise ConfigError(f"the data have {channels}-channel images but {label} takes {wanted} channels; "
                              "expected 1 (repeated) or the same number (set model.input_channels)")
        #: channels a one-channel image is repeated to (None: passed as it is)
        self.repeat_channels = wanted if channels == 1 and wanted not in (None, 1) else None
        if input_size is not None:
            self.resize_to: tuple[int, int] | None = (int(input_size), int(input_size))
        else:
            declared = declared_image_size(module)
            self.resize_to = declared if declared is not None and declared != self.image_shape[1:] else None
        self.feature_dim = self._head_in_features()

    # -- contract ---------------------------------------------------------------
    @property
    def head(self) -> nn.Module:
        return self.module.get_submodule(self.head_path)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The data set's tensors as the images this model takes (reshape, channel repeat, resize)."""
        x = x.reshape(x.shape[0], *self.image_shape)
        if self.resize_to is not None and tuple(x.shape[-2:]) != self.resize_to:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
        if self.repeat_channels is not None:
            x = x.expand(-1, self.repeat_channels, -1, -1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.module(self.adapt(x)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate features from one forward pass."""
        captured: list[torch.Tensor] = []

        def keep_input(_module, args):
            captured.append(args[0])

        handle = self.head.register_forward_pre_hook(keep_input)
        try:
            logits = _logits(self.module(self.adapt(x)))
        finally:
            handle.remove()
        if not captured:
            raise ConfigError(f"the feature layer {self.head_path!r} of {self.label} was not called in its forward "
                              "pass; expected the classifier head (set model.feature_layer=<module path>)")
        return logits, captured[-1].flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]

    def describe(self) -> dict[str, Any]:
        """What was built, for run tags and logs."""
        return {"source": self.label, "feature_layer": self.head_path, "feature_dim": self.feature_dim,
                "input_resize": "x".join(map(str, self.resize_to)) if self.resize_to else "none",
                "input_channel_repeat": self.repeat_channels or "none"}

    # -- checks ---------------------------------------------------------------
    def _head_in_features(self) -> int:
        head = self.head
        if isinstance(head, nn.Linear):
            return int(head.in_features)
        return -1  # known after the first forward (check_outputs)

    def check_outputs(self) -> None:
        """One forward of two blank inputs: the logits must have ``num_classes`` columns and the feature
        hook must fire. Skipped for parameters partitioned by ZeRO-3 (they exist only inside the engine)."""
        if any(hasattr(p, "ds_id") or p.is_meta for p in self.parameters()):
            return
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device if any(True for _ in self.parameters()) else "cpu"
            with torch.no_grad():
                logits, feats = self.forward_with_features(torch.zeros(2, *self.image_shape, device=device))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's model rejecting our inputs is a setup error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{self.label} fails on the data's inputs {list(self.image_shape)} after the adapter "
                              f"({first[:200]}); expected a model for images (set model.input_size / "
                              "model.input_channels)") from None
        finally:
            self.train(was_training)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ConfigError(f"{self.label} outputs {tuple(logits.shape[1:])} logits per example but the data have "
                              f"{self.num_classes} classes; expected a head of {self.num_classes} outputs")
        self.feature_dim = int(feats.shape[1])


def _logits(out: Any) -> torch.Tensor:
    """Logits from what a model returns: a tensor, a Hugging Face output (``.logits``), or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"the model returned a {type(out).__name__}; expected logits (a tensor, or an output with "
                      ".logits)")


def fit_head(module: nn.Module, head_path: str, num_classes: int, label: str) -> bool:
    """Replace the head when it has another number of outputs; True when it was replaced."""
    outputs = head_outputs(module, head_path)
    if outputs is None or outputs == num_classes:
        return False
    replace_head(module, head_path, num_classes, label)
    return True


def load_into(module: nn.Module, state: dict[str, torch.Tensor], head_path: str, source: str) -> None:
    """Load a bare-module state dict; a head of another size is resized first so it loads (the caller
    then fits it to the data's classes), any other mismatch is a one-line error."""
    weight_key = f"{head_path}.weight"
    own = module.state_dict()
    if weight_key in state and weight_key in own and state[weight_key].shape != own[weight_key].shape:
        replace_head(module, head_path, int(state[weight_key].shape[0]), source)
    load_model_state(module, state, source)


def import_state_dict(model: nn.Module, state: Any, source: str) -> dict[str, torch.Tensor]:
    """A checkpoint made outside this tool as ``model``'s own state dict (keys as ``model.state_dict()``).

    Unlearning changes a trained classifier, so its head must already have the data's classes: a head
    of another size cannot be fixed here (a new head would discard what is to be unlearned).
    """
    bare = unwrap_state_dict(state, source)
    if not isinstance(model, ExternalModel):
        return bare
    if any(k.startswith("module.") for k in model.state_dict()) and not any(k.startswith("module.") for k in bare):
        prefixed = {f"module.{k}": v for k, v in bare.items()}
    else:
        prefixed = bare
    weight_key = f"module.{model.head_path}.weight"
    if weight_key in prefixed and prefixed[weight_key].shape[0] != model.num_classes:
        raise ConfigError(f"{source} has a head of {prefixed[weight_key].shape[0]} classes but the data have "
                          f"{model.num_classes}; expected a model trained on these classes (unlearning keeps its head)")
    return prefixed


def parameter_count(module: nn.Module) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
