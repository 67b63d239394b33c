"""Tiny random CLIP and SigLIP towers saved to a folder and loaded offline; feature options."""
import pytest
import torch

from multimodal_rwkv.errors import CheckpointError, ConfigError
from multimodal_rwkv.vision.encoder import EncoderOptions, VisionEncoder
from multimodal_rwkv.vision.projector import build_projector
from multimodal_rwkv.vision.testing import save_tiny_tower, tiny_vision_config


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {k: save_tiny_tower(root / k, k, image_size=40, patch_size=8) for k in ("clip", "siglip")}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_offline_and_match_transformers(towers, kind):
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    folder = towers[kind]
    enc = VisionEncoder.from_pretrained(folder, EncoderOptions(-1, "start"))
    ref = (CLIPVisionModel if kind == "clip" else SiglipVisionModel).from_pretrained(folder, local_files_only=True)
    ip = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    pv = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = ref(pixel_values=pv, output_hidden_states=True)
        got = enc(pv)
    assert torch.equal(got, want.last_hidden_state)
    with torch.no_grad():
        got2 = VisionEncoder.from_pretrained(folder, EncoderOptions(-2, "start"))(pv)
    assert torch.equal(got2, want.hidden_states[-2])
    assert ip.__class__.__name__.lower().startswith(kind)


def test_cls_options_and_token_counts(towers):
    clip = VisionEncoder.from_pretrained(towers["clip"])
    sig = VisionEncoder.from_pretrained(towers["siglip"])
    pv = torch.randn(3, 3, 40, 40)
    counts = {}
    with torch.no_grad():
        base = clip(pv) if clip.options.cls == "start" else None  # default is "end"
        for cls in ("start", "end", "drop"):
            clip.options = EncoderOptions(-1, cls)
            counts[("clip", cls)] = clip.num_image_tokens
            out = clip(pv)
            assert out.shape == (3, clip.num_image_tokens, 32)
            if cls == "start":
                base = out
        clip.options = EncoderOptions(-1, "end")
        end = clip(pv)
        clip.options = EncoderOptions(-1, "drop")
        drop = clip(pv)
        for cls in ("start", "end", "drop"):
            sig.options = EncoderOptions(-1, cls)
            counts[("siglip", cls)] = sig.num_image_tokens
            assert sig(pv).shape == (3, 25, 32)
    assert counts[("clip", "start")] == counts[("clip", "end")] == 26  # (40/8)^2 patches + CLS
    assert counts[("clip", "drop")] == 25
    assert all(counts[("siglip", c)] == 25 for c in ("start", "end", "drop"))  # SigLIP has no CLS
    assert torch.equal(end[:, -1], base[:, 0]) and torch.equal(end[:, :-1], base[:, 1:])  # CLS moved last
    assert torch.equal(drop, base[:, 1:])


def test_bad_options_and_sources(tmp_path):
    with pytest.raises(ConfigError):
        EncoderOptions(-1, "middle")
    with pytest.raises(ConfigError):
        VisionEncoder.from_config({"model_type": "clip_vision_model", "num_hidden_layers": 2,
                                   "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
                                  EncoderOptions(-5, "end"))
    with pytest.raises(ConfigError):
        VisionEncoder.from_config({"model_type": "vit"})
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        VisionEncoder.from_pretrained(str(tmp_path / "nothing"))


def test_projectors():
    lin = build_projector("linear", 32, 48)
    assert lin.bias is None and lin.weight.shape == (48, 32)
    mlp = build_projector("mlp2x_gelu", 32, 48)
    x = torch.randn(2, 5, 32)
    want = mlp[2](torch.nn.functional.gelu(mlp[0](x)))
    assert torch.allclose(mlp(x), want)
    assert mlp[0].bias is not None
    with pytest.raises(ConfigError):
        build_projector("mlp3x_relu", 32, 48)


def test_patch_merge_concatenates_neighbouring_patches(towers):
    plain = VisionEncoder.from_pretrained(towers["siglip"], EncoderOptions(-1, "drop"))
    merged = VisionEncoder.from_pretrained(towers["siglip"], EncoderOptions(-1, "drop", merge=1))
    assert merged.num_image_tokens == 25  # merge 1 is the plain tower
    clip = VisionEncoder.from_config(tiny_vision_config("clip", image_size=48, patch_size=8), EncoderOptions(-1, "drop"))  # 6x6
    pv = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        p = clip(pv)  # [2, 36, 32], raster order
        for m in (2, 3):
            clip.options = EncoderOptions(-1, "drop", merge=m)
            assert clip.num_image_tokens == (6 // m) ** 2 and clip.out_dim == 32 * m * m
            got = clip(pv)
            assert got.shape == (2, (6 // m) ** 2, 32 * m * m)
            grid = p.reshape(2, 6, 6, 32)
            for i in range(6 // m):
                for j in range(6 // m):
                    want = torch.cat([grid[:, m * i + a, m * j + b] for a in range(m) for b in range(m)], dim=-1)
                    assert torch.equal(got[:, i * (6 // m) + j], want)
    assert plain(torch.randn(1, 3, 40, 40)).shape == (1, 25, 32)


def test_patch_merge_bad_settings():
    with pytest.raises(ConfigError, match="merge"):
        EncoderOptions(-1, "drop", merge=0)
    with pytest.raises(ConfigError, match="cls_token 'drop'"):  # CLS kept
        VisionEncoder.from_config(tiny_vision_config("clip", image_size=32, patch_size=8), EncoderOptions(-1, "end", merge=2))
    with pytest.raises(ConfigError, match="does not divide the 5x5"):
        VisionEncoder.from_config(tiny_vision_config("clip", image_size=40, patch_size=8), EncoderOptions(-1, "drop", merge=2))

