"""Frozen patch encoders: a registry from a config name to a builder, as timm's `register_model`.

`create_encoder(name, **cfg)` returns an `Encoder`: the module, the input size it wants, its
normalisation, its output width and the sha256 of the weights it was built from. Each builder has
one config file, `configs/encoder/<name>.yaml`. Weights always come from a local file named in the
config (`encoder.weights=/path`); nothing is downloaded.

| name               | what                                                         | embed_dim |
|--------------------|--------------------------------------------------------------|-----------|
| `uni`              | UNI (ViT-L/16, Mahmood lab), gated weights from a local file  | 1024      |
| `resnet50_trunc`   | CLAM's baseline: ImageNet ResNet-50 up to layer3, avg-pooled | 1024      |
| `timm`             | any timm architecture with a local checkpoint                 | model's   |
| `random_proj_demo` | fixed random convolutions: NOT a pathology model (demo/tests) | 128       |
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# UNI's architecture, as its model card builds it with timm.
UNI_ARCHITECTURE = dict(model_name="vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                        num_classes=0, dynamic_img_size=True)
UNI_WEIGHTS_HELP = (
    "UNI's weights are gated: request access at https://huggingface.co/MahmoodLab/UNI, download "
    "pytorch_model.bin yourself, and point the config at it: encoder.weights=/path/to/pytorch_model.bin "
    "(or `make features WEIGHTS=/path/to/pytorch_model.bin`)"
)
RESNET50_WEIGHTS_HELP = (
    "resnet50_trunc needs torchvision's ImageNet ResNet-50 weights as a local file: download "
    "https://download.pytorch.org/models/resnet50-11ad3fa6.pth (or resnet50-0676ba61.pth) yourself and pass "
    "encoder.weights=/path/to/resnet50-11ad3fa6.pth"
)


class WeightsError(RuntimeError):
    """An encoder's weights are missing or do not fit its architecture; the message says what to do."""


@dataclass
class Encoder:
    """A frozen encoder: `model(preprocess(uint8 images))` gives (B, embed_dim) features."""

    name: str
    model: nn.Module
    embed_dim: int
    input_size: int  # square images of this many pixels go in
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str  # of the weights file (or of the generated weights, for random_proj_demo)
    meta: dict = field(default_factory=dict)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S), S = input_size, channels-last in memory.

        Images of another size are resized here, batched on the device, with the antialiased bilinear
        filter of PIL's `resize` (as `Slide.read_patch`), so readers never pay for it per image.
        """
        x = images.permute(0, 3, 1, 2).float().div_(255.0)  # the permuted NHWC view is channels-last
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          antialias=True, align_corners=False)
            x = x.contiguous(memory_format=torch.channels_last)  # one layout whatever the reader's size
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


ENCODERS: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    def add(builder: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is registered twice")
        ENCODERS[name] = builder
        return builder
    return add


def create_encoder(name: str, **cfg) -> Encoder:
    """Build the registered encoder `name` with its config (the keys of configs/encoder/<name>.yaml)."""
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; registered: {sorted(ENCODERS)}")
    encoder = ENCODERS[name](**cfg)
    encoder.model.eval().requires_grad_(False)
    return encoder


# -- weights files --------------------------------------------------------------------------------
def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require_weights(weights: str | Path | None, help_text: str) -> Path:
    if weights in (None, ""):
        raise WeightsError(f"no weights file given (encoder.weights is empty). {help_text}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"encoder.weights={weights}: no such file. {help_text}")
    return path


def load_state_dict(path: Path, help_text: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch checkpoint (unwrapping a `state_dict`/`model` entry).

    Zip-format torch checkpoints (torch.save's default since 1.6) are memory-mapped; legacy ones
    (`_use_new_zipfile_serialization=False`) cannot be, and are read into memory.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise WeightsError(f"{path}: cannot read it as a PyTorch or safetensors checkpoint ({err}). {help_text}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}. "
                           f"{help_text}")
    return state


def load_into(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], path: Path, help_text: str) -> nn.Module:
    """Build `factory()` and load `state` (read from `path`) strictly; `help_text` says which file fits.

    The model is built on the meta device and takes the checkpoint's tensors as its own, so a
    300M-parameter ViT is not randomly initialised first; if the architecture keeps non-persistent
    buffers (which a checkpoint cannot fill), it is built normally instead.
    """
    with torch.device("meta"):
        model = factory()
    on_meta = set(dict(model.named_buffers())) - set(model.state_dict())
    if on_meta:
        model = factory()
    try:
        model.load_state_dict(state, strict=True, assign=not on_meta)
    except RuntimeError as err:
        raise WeightsError(f"{path}: these weights do not fit the architecture ({str(err)[:600]}). {help_text}") from err
    return model.float()


# -- encoders -------------------------------------------------------------------------------------
@register_encoder("uni")
def uni(weights: str | None = None, input_size: int = 224) -> Encoder:
    """UNI (Chen et al., Nature Medicine 2024): ViT-L/16 trained on 100M pathology patches; 1024-d."""
    path = require_weights(weights, UNI_WEIGHTS_HELP)
    model = load_into(lambda: timm.create_model(**UNI_ARCHITECTURE), load_state_dict(path, UNI_WEIGHTS_HELP), path,
                      UNI_WEIGHTS_HELP)
    return Encoder("uni", model, 1024, input_size, IMAGENET_MEAN, IMAGENET_STD, sha256_of(path),
                   {"architecture": UNI_ARCHITECTURE["model_name"], "weights": str(path)})


class ResNet50Trunc(nn.Module):
    """ResNet-50 up to layer3 (1024 channels), global average pooled: CLAM's `resnet50_trunc`.

    Module names follow torchvision's, so torchvision's checkpoint loads once layer4 and fc are dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_encoder("resnet50_trunc")
def resnet50_trunc(weights: str | None = None, input_size: int = 224) -> Encoder:
    path = require_weights(weights, RESNET50_WEIGHTS_HELP)
    state = {k: v for k, v in load_state_dict(path, RESNET50_WEIGHTS_HELP).items() if not k.startswith(("layer4.", "fc."))}
    model = load_into(ResNet50Trunc, state, path, RESNET50_WEIGHTS_HELP).to(memory_format=torch.channels_last)
    return Encoder("resnet50_trunc", model, 1024, input_size, IMAGENET_MEAN, IMAGENET_STD, sha256_of(path),
                   {"architecture": "torchvision resnet50, layers 1-3 + average pool", "weights": str(path)})


def check_timm_name(model_name: str) -> None:
    """`model_name` must be an architecture of timm's registry: a Hub (`hf-hub:`) or folder name would download or
    read weights timm's way, which this pipeline never does (weights come from `encoder.weights` only)."""
    source, colon, rest = str(model_name).partition(":")
    if colon:
        raise WeightsError(
            f"encoder.model_name={model_name}: a {source}: name makes timm fetch the model itself, and nothing is "
            "downloaded here. Give timm's architecture name instead (e.g. encoder.model_name=vit_large_patch16_224, "
            "with encoder.model_kwargs for its settings) and the checkpoint you downloaded yourself "
            f"(for {rest}: its pytorch_model.bin or model.safetensors) as encoder.weights=/path")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(str(model_name), timm.list_models(), n=3)
        raise WeightsError(f"encoder.model_name={model_name}: not an architecture timm {timm.__version__} knows"
                           + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"))


@register_encoder("timm")
def timm_encoder(model_name: str, weights: str | None = None, input_size: int | None = None,
                 model_kwargs: dict | None = None) -> Encoder:
    """Any timm architecture (`encoder.model_name=...`) with a local checkpoint; its classifier is dropped."""
    check_timm_name(model_name)
    help_text = (f"the timm encoder needs a local checkpoint for {model_name} "
                 "(encoder.weights=/path/to/model.safetensors or .pth, downloaded yourself)")
    path = require_weights(weights, help_text)
    kwargs = dict(model_kwargs or {})  # e.g. {img_size: 256} for a ViT fed other than its default size
    factory = lambda: timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)  # noqa: E731
    with torch.device("meta"):
        probe = factory()
    expected = set(probe.state_dict())
    state = {k: v for k, v in load_state_dict(path, help_text).items() if k in expected}  # drops the classifier head
    model = load_into(factory, state, path, help_text)
    config = timm.data.resolve_model_data_config(model)
    size = input_size or int(config["input_size"][-1])
    return Encoder(f"timm_{model_name}", model, int(model.num_features), size, tuple(config["mean"]),
                   tuple(config["std"]), sha256_of(path), {"architecture": model_name, "weights": str(path)})


class RandomConvProjection(nn.Module):
    """Two fixed random strided convolutions with ReLU and average pooling: colour and texture statistics."""

    def __init__(self, embed_dim: int, seed: int, width: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, width, 4, stride=4)
        self.conv2 = nn.Conv2d(width, embed_dim, 4, stride=4)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.weight[0].numel()
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / fan_in ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return x.mean(dim=(2, 3))


@register_encoder("random_proj_demo")
def random_proj_demo(embed_dim: int = 128, input_size: int = 112, seed: int = 0) -> Encoder:
    """NOT a pathology model: random (seeded, reproducible) convolutions, for the demo and the tests only.

    Its features carry colour and texture statistics, enough to run the pipeline end to end without
    downloading anything; never report results obtained with it as those of a pretrained encoder.
    """
    model = RandomConvProjection(embed_dim, seed)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.numpy().tobytes())
    return Encoder("random_proj_demo", model, embed_dim, input_size, IMAGENET_MEAN, IMAGENET_STD,
                   digest.hexdigest(), {"architecture": "random convolutions (NOT pretrained)", "seed": seed})
