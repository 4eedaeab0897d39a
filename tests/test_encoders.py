"""The encoder registry: every entry builds from local weights only, gives its documented width, fails clearly."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from wsi_pipeline.encoders import (ENCODERS, IMAGENET_MEAN, IMAGENET_STD, UNI_ARCHITECTURE, WeightsError,
                                   create_encoder)
from wsi_pipeline.config import CONFIG_DIR


def test_every_registered_encoder_has_one_config_and_back():
    configs = {p.stem for p in (CONFIG_DIR / "encoder").glob("*.yaml")}
    assert configs == set(ENCODERS)
    for name in configs:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("extract", overrides=[f"encoder={name}", "slides=s", "patches=p", "out=o"])
        assert cfg.encoder.name == name


def test_preprocess_normalises_uint8_images_channels_last():
    encoder = create_encoder("random_proj_demo", input_size=16)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    x = encoder.preprocess(images)
    assert x.shape == (2, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).double()) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).double()
    torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-6)


def test_preprocess_resizes_to_the_input_size_like_pil():
    """Readers hand over larger images (e.g. 256 px for UNI's 224); the resize matches PIL's bilinear filter."""
    from PIL import Image
    encoder = create_encoder("random_proj_demo", input_size=224)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = encoder.preprocess(torch.from_numpy(image)[None])
    assert x.shape == (1, 3, 224, 224)
    pil = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR)).astype(np.float64) / 255
    std, mean = np.array(IMAGENET_STD), np.array(IMAGENET_MEAN)
    back = x[0].permute(1, 2, 0).double().numpy() * std + mean
    assert np.abs(back - pil).mean() < 1.5 / 255  # PIL rounds to uint8; the filter is the same


def test_demo_encoder_is_deterministic_from_its_seed():
    images = torch.randint(0, 256, (3, 112, 112, 3), dtype=torch.uint8)
    a, b, c = (create_encoder("random_proj_demo", seed=s) for s in (0, 0, 1))
    fa, fb, fc = (e.model(e.preprocess(images)) for e in (a, b, c))
    assert fa.shape == (3, 128)
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert not torch.allclose(fa, fc)
    assert "NOT" in a.meta["architecture"]


@pytest.fixture(scope="module")
def uni_weights(tmp_path_factory):
    """A state dict with UNI's keys and shapes, random float16 values (600 MB), saved to a local file."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(**UNI_ARCHITECTURE).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator, dtype=torch.float32).mul_(0.02).half() for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


@pytest.mark.slow
def test_uni_builds_1024d_from_a_local_state_dict(uni_weights):
    path, state = uni_weights
    encoder = create_encoder("uni", weights=str(path))
    assert (encoder.embed_dim, encoder.input_size, encoder.mean, encoder.std) == (1024, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert encoder.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = encoder.model.state_dict()
    assert loaded.keys() == state.keys()
    assert loaded["pos_embed"].shape == (1, 197, 1024) and "blocks.23.ls2.gamma" in loaded  # ViT-L, LayerScale
    torch.testing.assert_close(loaded["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"].float())
    assert all(p.dtype == torch.float32 and not p.is_meta for p in encoder.model.parameters())
    with torch.inference_mode():
        features = encoder.model(encoder.preprocess(torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)))
    assert features.shape == (1, 1024) and torch.isfinite(features).all()


@pytest.mark.parametrize("weights, expected", [(None, "encoder.weights is empty"), ("/nowhere/pytorch_model.bin", "no such file")])
def test_uni_without_weights_says_it_is_gated_and_where_to_point(weights, expected):
    with pytest.raises(WeightsError) as err:
        create_encoder("uni", weights=weights)
    message = str(err.value)
    assert expected in message and "gated" in message and "huggingface.co/MahmoodLab/UNI" in message
    assert "encoder.weights=" in message


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet18.pth: these weights do not fit") as err:
        create_encoder("resnet50_trunc", weights=str(path))
    assert "download https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in str(err.value)  # what fits
    garbage = tmp_path / "notes.bin"
    garbage.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes.bin: cannot read it"):
        create_encoder("uni", weights=str(garbage))


def test_resnet50_trunc_is_torchvision_resnet50_to_layer3_pooled(tmp_path):
    net = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save(net.state_dict(), path)
    encoder = create_encoder("resnet50_trunc", weights=str(path))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        expected = trunk(x).mean(dim=(2, 3))
        got = encoder.model(x)
    assert got.shape == (2, 1024) and encoder.embed_dim == 1024
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".legacy.pth"])
def test_timm_encoder_loads_a_local_checkpoint_and_drops_its_head(tmp_path, suffix):
    model = timm.create_model("resnet18", pretrained=False).eval()  # with its 1000-class head
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(path))
    else:  # .legacy.pth: torch's pre-1.6 format, which cannot be memory-mapped
        torch.save({"state_dict": model.state_dict()}, path, _use_new_zipfile_serialization=suffix == ".pth")
    encoder = create_encoder("timm", model_name="resnet18", weights=str(path))
    assert encoder.name == "timm_resnet18" and encoder.embed_dim == 512 and encoder.input_size == 224
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_allclose(encoder.model(x).numpy(), model.forward_head(model.forward_features(x), pre_logits=True).numpy(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name, said", [
    ("hf-hub:MahmoodLab/UNI", "a hf-hub: name makes timm fetch the model itself, and nothing is downloaded here"),
    ("hf_hub:timm/resnet18.a1_in1k", "a hf_hub: name makes timm fetch the model itself"),
    ("resnet_18", "not an architecture timm"),
])
def test_timm_names_that_would_download_or_do_not_exist_are_a_clear_error(tmp_path, model_name, said):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    with pytest.raises(WeightsError) as err:
        create_encoder("timm", model_name=model_name, weights=str(path))
    assert str(err.value).startswith(f"encoder.model_name={model_name}: {said}")
    if model_name == "resnet_18":
        assert "did you mean resnet18" in str(err.value)
    else:
        assert "encoder.weights=" in str(err.value)


def test_encoder_configs_hold_no_hidden_weights_paths():
    for path in (CONFIG_DIR / "encoder").glob("*.yaml"):
        cfg = OmegaConf.load(path)
        assert cfg.get("weights") is None, f"{path.name} must not point at a file on someone's machine"
