"""Generation helpers on top of transformers' GenerationMixin: RWKV-style penalties, stop strings,
and a text-level convenience wrapper."""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, StoppingCriteria

from multimodal_rwkv.argtypes import integer_number, real_number


# the sampling temperatures used: fp32 makes logits / 1e-38 overflow to inf (inf - inf is NaN) and 1e39
# itself inf (-inf / inf is NaN); a temperature outside is taken as the nearer bound (as good as greedy,
# or as uniform over what top-p/top-k kept)
MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = 1e30


def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """The sampling settings this package's own samplers take (vision, music): ``temperature``
    finite and >= 0 (0: greedy), ``top_k`` an integer >= 0 (0: off), ``top_p`` in (0, 1]."""
    import math

    t, p = real_number(temperature), real_number(top_p)  # numpy and one-element tensor numbers too
    if t is None or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    k = integer_number(top_k)
    if k is None or k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if p is None or not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def rwkv_top_p_mask(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Where ``x`` ``[B, V]`` (logits) lies outside the official sampler's nucleus: the smallest set
    of the most likely ids whose probability reaches ``top_p``, every id as likely as its last one
    kept (``rwkv.utils.PIPELINE.sample_logits``: ``probs < cutoff`` are dropped)."""
    probs = torch.softmax(x.float(), dim=-1)
    desc = probs.sort(dim=-1, descending=True).values
    first = (desc.cumsum(-1) < top_p).sum(-1, keepdim=True).clamp(max=x.shape[-1] - 1)
    return probs < desc.gather(-1, first)


class RWKVTopP(LogitsProcessor):
    """transformers' top-p warper with the official sampler's edge: ties at the nucleus' edge are
    kept (``TopPLogitsWarper`` cuts through them); at least ``min_tokens_to_keep`` ids stay."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p, self.min_tokens_to_keep = float(top_p), int(min_tokens_to_keep)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        drop = rwkv_top_p_mask(scores, self.top_p)
        if self.min_tokens_to_keep > 1:
            keep = scores.topk(min(self.min_tokens_to_keep, scores.shape[-1]), dim=-1).indices
            drop = drop.scatter(-1, keep, False)
        return scores.masked_fill(drop, float("-inf"))


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator=None) -> torch.Tensor:
    """One id per row of ``logits`` ``[B, V]``, as ``rwkv.utils.PIPELINE.sample_logits`` draws it:
    the nucleus (``top_p``) and the ``top_k`` are taken from the untempered probabilities (ties at
    the nucleus' edge kept), then the temperature applies to what is left. ``temperature`` <= 0 is
    greedy; a -inf logit is never drawn. ``generator``: a ``torch.Generator``, or a list of one per
    row. (``generate`` orders transformers' warpers the same way.)"""
    check_sampling(temperature, top_k, top_p)
    x = logits.float()
    if temperature <= 0:
        return x.argmax(-1)
    if isinstance(generator, (list, tuple)) and len(generator) != x.shape[0]:
        raise ValueError(f"generator: {len(generator)} generators for {x.shape[0]} rows (one per row)")
    V = x.shape[-1]
    if 0 < top_p < 1:
        x = x.masked_fill(rwkv_top_p_mask(x, top_p), float("-inf"))
    if top_k and top_k < V:
        x = x.masked_fill(x < x.topk(int(top_k), dim=-1).values[:, -1:], float("-inf"))
    # from the top: a tiny temperature gives -inf, never inf - inf (NaN probabilities)
    t = min(max(float(temperature), MIN_TEMPERATURE), MAX_TEMPERATURE)
    probs = torch.softmax((x - x.amax(-1, keepdim=True)) / t, dim=-1)
    if isinstance(generator, (list, tuple)):  # one generator per row
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_penalties(presence, frequency, decay) -> tuple[float, float, float]:
    """RWKV-style penalties as floats: finite numbers; ``decay`` in [0, 1] (the share of a count
    kept per step)."""
    import math

    out = []
    for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency), ("penalty_decay", decay)):
        f = real_number(v)
        if f is None or not math.isfinite(f):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        out.append(f)
    if not 0 <= out[2] <= 1:
        raise ValueError(f"penalty_decay must be in [0, 1] (the share of a count kept each step), got {decay!r}")
    return out[0], out[1], out[2]


_UNCOUNTED_TEXT = " \t0123456789"


def uncounted_ids(tokenizer, vocab_size: int) -> tuple[int, ...]:
    """The ids ChatRWKV's sampler (``rwkv.utils.PIPELINE.generate``) does not count for the
    frequency penalty: those whose text is part of ``" \\t0123456789"`` (a space, a tab, a digit,
    "01", ...). They still get the presence penalty. Cached per tokenizer."""
    key = (id(tokenizer), vocab_size)
    hit = _UNCOUNTED_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    n = min(vocab_size, int(getattr(tokenizer, "vocab_size", vocab_size)))
    ids = []
    for i in range(n):
        try:
            text = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode counts (the official '\ufffd')
            continue
        if text and text in _UNCOUNTED_TEXT:
            ids.append(i)
    if len(_UNCOUNTED_CACHE) > 8:
        _UNCOUNTED_CACHE.clear()
    _UNCOUNTED_CACHE[key] = (tokenizer, tuple(ids))
    return tuple(ids)


_UNCOUNTED_CACHE: dict = {}


MAX_REWARDED_LOGIT = 1e8  # below it, logits / temperature (>= 1e-30) stay within float range


class RWKVPenaltyProcessor(LogitsProcessor):
    """ChatRWKV's repetition penalty (``rwkv.utils.PIPELINE.generate``): ``logit[t] -= presence +
    count[t] * frequency`` for every token t generated so far, with counts multiplied by ``decay``
    each step (old tokens fade). ``uncounted``: ids that add nothing to their count (the official
    sampler's spaces, tabs and digits, see :func:`uncounted_ids`); they get the presence penalty only."""

    def __init__(self, presence: float, frequency: float, decay: float = 0.996, prompt_len: int = 0,
                 uncounted=()):
        self.presence, self.frequency, self.decay, self.prompt_len = presence, frequency, decay, prompt_len
        self.uncounted = torch.as_tensor(list(uncounted), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = input_ids[:, self.prompt_len:]
        if gen.shape[1] == 0:
            return scores
        n = gen.shape[1]
        weights = self.decay ** torch.arange(n - 1, -1, -1, device=scores.device, dtype=torch.float32)
        counts = torch.zeros_like(scores, dtype=torch.float32)
        counts.scatter_add_(1, gen, weights.expand(gen.shape[0], -1).contiguous())
        if self.uncounted.numel():
            counts[:, self.uncounted[self.uncounted < counts.shape[1]].to(counts.device)] = 0.0
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, gen, True)
        # only the tokens seen (and counted) are touched, as the official sampler does: a huge
        # penalty then bans them (-inf) instead of turning the others' 0 x inf into NaN
        # the sum in float64, as the official sampler's Python floats: presence 1e39 and frequency
        # -1e39 cancel there, where fp32 made inf - inf = NaN; the total then rounds to the scores' dtype
        pen = (seen.double() * float(self.presence) + counts.double() * float(self.frequency)).to(scores.dtype)
        out = scores - pen
        # a token another processor banned (-inf) stays banned under a reward beyond float range
        out = torch.where(torch.isneginf(scores), scores, out)
        if bool((pen < 0).any()):
            # a reward (negative penalty) beyond float range is +inf, and one a small temperature
            # scales past it too: the sampler's probabilities would be NaN. The largest float stands
            # for +inf, and a row above MAX_REWARDED_LOGIT is shifted down by its maximum (the same
            # probabilities and choice, as the official sampler's, without the overflow)
            out = torch.where(out == float("inf"), torch.finfo(out.dtype).max, out)
            top = out.max(dim=-1, keepdim=True).values
            out = torch.where(top > MAX_REWARDED_LOGIT, out - top, out)
        return out


def check_finite_logits(logits: torch.Tensor, dtype: torch.dtype, where: str = "") -> None:
    """Raise :class:`~multimodal_rwkv.errors.NumericsError` when ``logits`` (``[..., V]``) hold NaN
    or +inf, or a row is -inf throughout (the activations of a model of ``dtype`` overflowed, as
    fp16 does on some models): sampling would fail deep in torch, greedy decoding would pick id 0
    and end the text silently. A -inf among finite logits is fine (bans and length limits set it)."""
    top = logits.amax(-1)  # per row: NaN if any is NaN (amax propagates it), +inf if any is +inf
    if bool((torch.isnan(top) | top.isinf()).any()):
        from multimodal_rwkv.errors import NumericsError

        hint = " (its activations overflowed fp16: load it as bf16 or fp32)" if dtype == torch.float16 else ""
        raise NumericsError(f"the model's logits are NaN or infinite{where}{hint}")


class FiniteLogitsGuard(LogitsProcessor):
    """:func:`check_finite_logits` on each step's scores, before the other processors."""

    def __init__(self, dtype):
        self.dtype, self.step = dtype, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.step += 1
        check_finite_logits(scores, self.dtype, f" at new token {self.step}")
        return scores


class VocabLimitProcessor(LogitsProcessor):
    """Never pick an id at or above ``n``: the ids a tokenizer of ``n`` entries cannot decode (a
    model whose vocabulary was padded beyond its tokenizer's)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.n:] = -float("inf")
        return scores


class StopStringsCriteria(StoppingCriteria):
    """Stop a row once its generated text contains one of ``stops`` (e.g. ``"\\n\\n"``).

    In a batch, a row that met its stop string is finished: the later steps give it
    ``pad_token_id``, as a row that met EOS. transformers pads finished rows only where a stopping
    criterion has an ``eos_token_id`` attribute (its EOS criterion's), whatever criterion finished
    them; with ``pad_finished`` (there is a pad id) this one has one (None), so rows are padded
    also when no EOS id is set. Without a pad id, rows go on to the end as transformers' own.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_len: int, pad_finished: bool = True):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        if pad_finished:
            self.eos_token_id = None  # transformers' marker for "pad the finished rows" (see above)
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=1) + 8  # tokens, then bytes
        self.replacement = "\ufffd" in "".join(self.stops)  # a stop holding U+FFFD

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(input_ids[:, self.prompt_len:].tolist()):
            # the last tokens whose bytes before the last one hold the longest stop and 8 more (tokens
            # that decode to nothing, the reserved ids, would push a stop's start out of a window of a
            # fixed token count)
            k = self.window
            while k < len(row) and len(self.tokenizer.decode(row[-k:-1]).encode("utf-8", "replace")) < self.window:
                k *= 2
            # a character cut by the window's start, or not finished yet at its end, decodes as U+FFFD:
            # no stop string is matched there (a stop holding U+FFFD fired on half a character)
            text = self.tokenizer.decode(row[-k:])
            text = text.rstrip("\ufffd") if self.replacement else text
            if len(row) > k:
                text = text.lstrip("\ufffd")
            done[i] = any(s in text for s in self.stops)
        return done


def stop_list(x) -> list:
    """A stop string or a list of them (None: none) as a list; anything else is a ValueError."""
    if x is None:
        return []
    items = [x] if isinstance(x, str) else list(x) if isinstance(x, (list, tuple)) else None
    if items is None or not all(isinstance(i, str) for i in items):
        raise ValueError(f"stop strings must be a string or a list of strings, got {x!r}")
    return items


def joined_stops(model, stop=None, stop_strings=None, generation_config=None) -> list[str]:
    """Every stop string a ``model.generate`` call stops at: ``stop``, transformers' ``stop_strings``
    and those of the generation config in use (``generation_config``'s, or where it sets none the
    model's, as transformers fills a given config's unset values from the model's)."""
    given = getattr(generation_config, "stop_strings", None)  # a config's unset ones: the model's (transformers)
    base = given if given is not None else getattr(getattr(model, "generation_config", None), "stop_strings", None)
    return [x for x in stop_list(stop) + stop_list(stop_strings) + stop_list(base) if x]


def decodable_ids(tokenizer, default: int) -> int:
    """How many ids ``tokenizer`` decodes: ``len()`` where it has one (a transformers tokenizer's
    ``vocab_size`` leaves out its added tokens, an end-of-text token among them), else ``vocab_size``."""
    n = getattr(tokenizer, "vocab_size", default)
    try:
        return max(n, len(tokenizer))
    except TypeError:
        return n


def trim_at_stop(text: str, stops) -> str:
    """Cut ``text`` at the first stop string (the stop itself removed)."""
    if not stops:
        return text
    cut = min((i for s in ([stops] if isinstance(stops, str) else stops) if s and (i := text.find(s)) >= 0),
              default=len(text))
    return text[:cut]


@torch.no_grad()
def eos_ids(model, eos_token_id=None, generation_config=None) -> set[int]:
    """The end-of-text ids that end a generation: ``eos_token_id`` as passed to ``generate`` (an
    int, a list, a tensor), else that of the ``generation_config`` passed to it, else the model's
    ``generation_config``'s, else its config's."""
    for src in (eos_token_id, getattr(generation_config, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None), model.config.eos_token_id):
        if src is None:
            continue
        if isinstance(src, torch.Tensor):
            src = src.reshape(-1).tolist()
        return {int(i) for i in (src if isinstance(src, (list, tuple, set)) else [src])}
    return set()


def cut_at_eos(new: list[int], eos: set[int]) -> list[int]:
    """``new`` up to (without) its first end-of-text id."""
    for j, i in enumerate(new):
        if i in eos:
            return new[:j]
    return new


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int | None = None, stop=None, streamer=None,
                  **gen_kwargs) -> str:
    """Prompt in, completion text out: cut at the end-of-text id that ended it (any of
    ``eos_token_id``'s, or the model's) and before the stop string (``stop``, ``stop_strings``, or
    the generation config's). ``gen_kwargs`` go to
    ``model.generate``. ``max_new_tokens``: 100 unless a length is given (``max_new_tokens``,
    ``max_length``, a ``generation_config`` passed in, or the model's own ``generation_config``)."""
    from transformers import GenerationConfig

    gc = gen_kwargs.get("generation_config")
    default_length = GenerationConfig().max_length
    limited = ("max_length" in gen_kwargs or getattr(model.generation_config, "max_new_tokens", None) is not None
               or (gc is not None and (gc.max_new_tokens is not None or gc.max_length != default_length)))
    if max_new_tokens is None and not limited:
        max_new_tokens = 100
    if max_new_tokens is not None:
        gen_kwargs["max_new_tokens"] = max_new_tokens
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [0]
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model.generate(x, stop=stop, tokenizer=tokenizer, streamer=streamer, **gen_kwargs)
    new = cut_at_eos(out[0, len(ids):].tolist(),
                     eos_ids(model, gen_kwargs.get("eos_token_id"), gen_kwargs.get("generation_config")))
    return trim_at_stop(tokenizer.decode(new), joined_stops(model, stop, gen_kwargs.get("stop_strings"),
                                                            gen_kwargs.get("generation_config")))


class StopAwareStreamer:
    """A transformers-compatible streamer (``put``/``end``) that prints decoded text as it comes,
    holding back incomplete UTF-8 and anything that could be the start of a stop string."""

    def __init__(self, tokenizer, stops=None, prompt_len: int = 0, file=None, eos=(0,)):
        import sys

        self.tokenizer, self.stops = tokenizer, [s for s in (stops or []) if s]
        self.eos = set(eos)  # end-of-text ids: the text ends before them
        self.file = file or sys.stdout
        self.skip_prompt = True
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def put(self, value) -> None:
        if value.dim() > 1 and value.shape[0] > 1:  # as transformers' TextStreamer: one row only
            raise ValueError("StopAwareStreamer streams one row; generate a batch without a streamer")
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        if self.stopped:
            return
        ids = value.reshape(-1).tolist()
        kept = cut_at_eos(ids, self.eos)
        if len(kept) < len(ids):
            ids = kept
            self.stopped = True
        self.ids.extend(ids)
        self._flush(final=self.stopped)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far (before the
            text = text.rstrip("\ufffd")  # stop check: a stop holding U+FFFD fired on half a character)
        cut = trim_at_stop(text, self.stops)
        if len(cut) < len(text):
            self.stopped, final, text = True, True, cut
        if not final:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: max(self.printed, len(text) - hold)]
        if len(text) > self.printed:
            self.file.write(text[self.printed:])
            self.file.flush()
            self.printed = len(text)

    def end(self) -> None:
        if not self.stopped:
            self._flush(final=True)
