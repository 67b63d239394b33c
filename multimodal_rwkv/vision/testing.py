"""Tiny random VisualRWKV pieces for tests, demos and benchmarks (no downloads).

- :func:`save_tiny_tower`: a random CLIP or SigLIP vision tower + its image processor saved as a
  normal `transformers` folder (what a hub download looks like on disk).
- :func:`random_lm`: an RWKV LM whose every tensor is random (RWKV's own init zeroes the output
  projections, which would make equivalence tests vacuous).
- :func:`make_v060_checkpoint`: a random single-file checkpoint in the released VisualRWKV-v060
  layout (``rwkv.*`` BlinkDL keys, ``vit.*`` = a transformers-4.x ``CLIPVisionModel`` state dict with
  the ``vision_model.`` prefix, ``proj.weight``).
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                       layers: int = 2) -> dict:
    """A CLIP/SigLIP vision config dict (``model_type`` included) of a tiny tower."""
    mt = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[kind]
    d = {"model_type": mt, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
         "num_hidden_layers": layers, "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}
    if kind == "siglip":
        d["vision_use_head"] = False
    return d


def save_tiny_tower(folder, kind: str = "clip", seed: int = 0, **kw) -> str:
    """Save a random tiny CLIP/SigLIP vision tower and its image processor to ``folder``."""
    from multimodal_rwkv.vision.encoder import vision_config_from_dict, vision_model_class
    from multimodal_rwkv.vision.processor import image_processor_for

    torch.manual_seed(seed)
    cfg = vision_config_from_dict(tiny_vision_config(kind, **kw))
    model = vision_model_class(cfg.model_type)(cfg)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    image_processor_for(cfg).save_pretrained(str(folder))
    return str(folder)


def random_lm(n_layer: int = 3, n_embd: int = 64, head_size: int = 32, vocab_size: int = 65536, seed: int = 0,
              version: str = "x060"):
    """An RWKVForCausalLM with every tensor random (via the core's official-layout random checkpoint)."""
    from multimodal_rwkv import RWKVForCausalLM
    from multimodal_rwkv.model.checkpoint import blink_to_ours, infer_config, load_state_into
    from multimodal_rwkv.model.random_checkpoint import blink_state_dict

    sd = blink_state_dict(version=version, n_layer=n_layer, n_embd=n_embd, head_size=head_size,
                          vocab_size=vocab_size, d_mix_lora=8, d_decay_lora=16, seed=seed)
    cfg = infer_config(sd, "random")
    with torch.device("meta"):
        lm = RWKVForCausalLM(cfg)
    lm = lm.to_empty(device="cpu")
    load_state_into(lm, blink_to_ours(sd), "random")
    return lm


def v060_state_dict(n_layer: int = 2, n_embd: int = 64, vocab_size: int = 65536, vision: dict | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the released VisualRWKV-v060 single-file layout."""
    from multimodal_rwkv.model.random_checkpoint import blink_state_dict
    from multimodal_rwkv.vision.encoder import vision_config_from_dict, vision_model_class

    sd = {"rwkv." + k: v for k, v in blink_state_dict(n_layer=n_layer, n_embd=n_embd, head_size=32,
                                                     vocab_size=vocab_size, d_mix_lora=8, d_decay_lora=16,
                                                     seed=seed).items()}
    vcfg = vision_config_from_dict(vision or {**tiny_vision_config("clip"), "num_attention_heads": 1,
                                              "hidden_size": 64, "intermediate_size": 96})
    vcfg.hidden_act = "quick_gelu"
    torch.manual_seed(seed + 1)
    tower = vision_model_class(vcfg.model_type)(vcfg)
    g = torch.Generator().manual_seed(seed + 2)
    for k, v in tower.state_dict().items():
        if v.is_floating_point():
            sd["vit.vision_model." + k] = torch.randn(v.shape, generator=g) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
    sd["vit.vision_model.embeddings.position_ids"] = torch.arange(
        (vcfg.image_size // vcfg.patch_size) ** 2 + 1).unsqueeze(0)  # transformers 4.x kept this buffer
    sd["proj.weight"] = torch.randn(n_embd, vcfg.hidden_size, generator=g) * vcfg.hidden_size ** -0.5
    return sd


def make_v060_checkpoint(path, dtype=torch.bfloat16, **kw) -> str:
    """Write :func:`v060_state_dict` as a ``.pth`` (bf16 floats, like the released files)."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in v060_state_dict(**kw).items()}
    torch.save(sd, str(path))
    return str(path)
