"""Small random checkpoints in the exact BlinkDL ``.pth`` layout (for tests and demos).

Built from the official key list and shapes directly (not from this package's modules), so a
test that loads one checks our reading of the official layout. Every tensor gets distinct
random values: a swapped LoRA slot or a transposed state cannot go unnoticed.
"""
from __future__ import annotations

import torch


def blink_state_dict(version: str = "x060", n_layer: int = 2, n_embd: int = 128, head_size: int = 64,
                     vocab_size: int = 256, dim_ffn: int | None = None, d_mix_lora: int = 32,
                     d_decay_lora: int = 64, time_state: bool = False, seed: int = 0,
                     dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random state dict with the official key names and shapes (``nn.Linear`` as [out, in])."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    F = dim_ffn or int(C * 3.5) // 32 * 32

    def rnd(*shape, scale=0.2, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    def mix(*shape):  # lerp weights in (0, 1)
        return torch.rand(*shape, generator=g).to(dtype)

    sd = {"emb.weight": rnd(V, C, scale=1.0)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = rnd(C, shift=1.0), rnd(C)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = rnd(C, shift=1.0), rnd(C)
        a = p + "att."
        if version == "x060":
            for n in ("x", "w", "k", "v", "r", "g"):
                sd[a + f"time_maa_{n}"] = mix(1, 1, C)
            sd[a + "time_maa_w1"] = rnd(C, 5 * d_mix_lora, scale=0.1)
            sd[a + "time_maa_w2"] = rnd(5, d_mix_lora, C, scale=0.1)
            sd[a + "time_decay"] = rnd(1, 1, C, scale=1.0, shift=-2.0)
            sd[a + "time_decay_w1"] = rnd(C, d_decay_lora, scale=0.1)
            sd[a + "time_decay_w2"] = rnd(d_decay_lora, C, scale=0.1)
        elif version == "x052":
            for n in ("k", "v", "r", "g"):
                sd[a + f"time_mix_{n}"] = mix(1, 1, C)
            sd[a + "time_decay"] = rnd(H, N, scale=1.0, shift=-2.0)
        else:
            raise ValueError(f"version {version!r}")
        sd[a + "time_faaaa"] = rnd(H, N, scale=0.5)
        if time_state:
            sd[a + "time_state"] = rnd(H, N, N, scale=0.5)
        for n in ("receptance", "key", "value", "gate", "output"):
            sd[a + n + ".weight"] = rnd(C, C, scale=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = rnd(C, shift=1.0), rnd(C)
        f = p + "ffn."
        tm = "time_maa" if version == "x060" else "time_mix"
        sd[f + f"{tm}_k"], sd[f + f"{tm}_r"] = mix(1, 1, C), mix(1, 1, C)
        sd[f + "key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[f + "receptance.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[f + "value.weight"] = rnd(C, F, scale=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = rnd(C, shift=1.0), rnd(C)
    sd["head.weight"] = rnd(V, C, scale=C ** -0.5)
    return sd


def make_blink_checkpoint(path, **kwargs) -> str:
    """Write :func:`blink_state_dict` to ``path`` (a ``.pth``) with ``torch.save``; returns the path."""
    torch.save(blink_state_dict(**kwargs), str(path))
    return str(path)
