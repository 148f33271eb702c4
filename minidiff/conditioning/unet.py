"""Conditional U-Nets: eps_theta(x_t, t, y) for class labels or prompts (article sections 2.3 and 3.3).

The plain DDPM U-Net (minidiff/unet.py) is extended as GLIDE's Text2ImUNet extends its UNet: a conditioner turns y
into what the U-Net already takes,
  * an offset added to the time embedding (the usual way: it reaches every ResBlock), from a class-embedding table
    (ClassConditionalUNet) or from the text encoder's vector (TextConditionalUNet, text_cond="add"); or
  * extra input channels joined to x_t (text_cond="concat", the article's section 3.3 literally: the projected text
    vector at every pixel).
Classifier-free guidance (Ho & Salimans 2022) needs the same network without the condition: the "no condition" input
is an extra class-table row, or the empty prompt; training replaces the condition by it with probability p_uncond
(``draw_condition``), and sampling asks for both in one doubled batch (sample.predict_eps).
"""
import dataclasses
from typing import Optional

import numpy as np

from ..layers import Linear
from ..unet import UNet, UNetConfig
from ..utils.backend import array_module
from .prompts import build_tokenizer, draw_prompts, prompt_table
from .text import Embedding, TextEncoder, Tokenizer

TEXT_CONDITIONING = (None, "add", "concat")


@dataclasses.dataclass
class ConditionConfig:
    num_classes: Optional[int] = None    # class-conditional: a table of num_classes + 1 rows, the last row being
                                         # the "no condition" token for guidance
    text_cond: Optional[str] = None      # prompt-conditional: "add" (to temb) or "concat" (article 3.3)
    prompt_set: Optional[str] = None     # text models: the data set whose prompt templates they learn (prompts.py)
    vocab_size: Optional[int] = None     # text models: tokenizer size (specials included)
    text_len: int = 16                   # text models: token positions (CLS + up to 15 tokens)
    text_dim: int = 64                   # text models: width of the transformer encoder and of its pooled vector
    text_layers: int = 2
    text_heads: int = 4
    text_channels: int = 8               # "concat": extra input channels the text vector is projected to

    def __post_init__(self):
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if self.text_cond not in TEXT_CONDITIONING:
            raise ValueError(f"unknown text_cond {self.text_cond!r}; choose one of {TEXT_CONDITIONING}")
        if self.text_cond and self.num_classes is not None:
            raise ValueError("a UNet is conditioned on class labels (num_classes) or on text (text_cond), not both")
        if self.text_cond and not (self.vocab_size or 0) > 2:
            raise ValueError(f"text_cond needs vocab_size (the tokenizer's size), got {self.vocab_size}")

    @property
    def conditional(self):
        return self.num_classes is not None or self.text_cond is not None


def model_config(d):
    """(UNetConfig, ConditionConfig) from a checkpoint's flat model-configuration dict (the fields of both);
    unknown keys are an error."""
    unet_keys = {f.name for f in dataclasses.fields(UNetConfig)}
    cond_keys = {f.name for f in dataclasses.fields(ConditionConfig)}
    unknown = set(d) - unet_keys - cond_keys
    if unknown:
        raise ValueError(f"unknown model configuration option(s): {sorted(unknown)}")
    return (UNetConfig.from_dict({k: v for k, v in d.items() if k in unet_keys}),
            ConditionConfig(**{k: v for k, v in d.items() if k in cond_keys}))


def build_unet(cfg, cond=None, seed=0, dtype=np.float32, tokenizer=None):
    """The network for a configuration: a UNet, or with a condition a ClassConditionalUNet / TextConditionalUNet."""
    if cond is None or not cond.conditional:
        return UNet(cfg, seed, dtype)
    if cond.num_classes is not None:
        return ClassConditionalUNet(cfg, cond, seed, dtype)
    return TextConditionalUNet(cfg, cond, seed, dtype, tokenizer)


class ConditionalUNet(UNet):
    """A UNet with a conditioner: subclasses define condition / condition_backward / null_condition / draw."""

    def __init__(self, cfg, cond, seed=0, dtype=np.float32, extra_in_channels=0):
        super().__init__(cfg, seed, dtype, extra_in_channels)
        self.cond = cond
        self.rng_cond = np.random.default_rng([seed, 1])             # the conditioner's init, after the U-Net's

    def config_dict(self):
        """The flat model configuration a checkpoint keeps (the U-Net's and the condition's fields)."""
        return dict(self.cfg.asdict(), **dataclasses.asdict(self.cond))

    def forward(self, x, t, y=None, rng=None):
        """eps_theta(x_t, t, y): y (B,) class labels or (B, L) token ids; None: the "no condition" input."""
        xp = array_module(x)
        y = self.null_condition(x.shape[0]) if y is None else y
        y = self.check_condition(y, x.shape[0])
        emb, channels = self.condition(xp.asarray(y))
        if channels is not None:                                     # article 3.3: joined to x_t at every pixel
            B, _, H, W = x.shape
            x = xp.concatenate([x, xp.broadcast_to(channels[:, :, None, None], (B, channels.shape[1], H, W))], axis=1)
        return super().forward(x, t, rng=rng, emb=emb)

    def backward(self, dout):
        dx, demb = self.backward_with_emb(dout)
        C = self.cfg.in_channels
        dchannels = dx[:, C:].sum(axis=(2, 3)) if dx.shape[1] > C else None   # the broadcast's adjoint: pixel sums
        self.condition_backward(demb, dchannels)
        return dx[:, :C]


class ClassConditionalUNet(ConditionalUNet):
    """y: class labels 0..num_classes-1, or num_classes = "no condition"; temb += E[y] (a learned table)."""

    def __init__(self, cfg, cond, seed=0, dtype=np.float32):
        super().__init__(cfg, cond, seed, dtype)
        self.class_emb = self.add("class_emb", Embedding(cond.num_classes + 1, 4 * cfg.base_channels, self.rng_cond,
                                                         dtype))
        self._collect()

    def null_condition(self, n):
        return np.full((n,), self.cond.num_classes, dtype=np.int64)

    def check_condition(self, y, n):
        # the range is checked for labels on the host: reading labels already on a GPU would stall it
        # (TrainStep checks them before they go there)
        on_host = array_module(y) is np
        y = np.asarray(y) if on_host else y
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"y must be an int array of shape ({n},), got {y.dtype} {y.shape}")
        if on_host and (int(y.min()) < 0 or int(y.max()) > self.cond.num_classes):
            raise ValueError(f"class labels must be in [0, {self.cond.num_classes}] ({self.cond.num_classes} = no "
                             f"condition)")
        return y

    def draw_condition(self, labels, p_uncond, rng):
        """Training: the data's labels, each replaced by "no condition" with probability p_uncond."""
        return np.where(rng.random(len(labels)) < p_uncond, self.cond.num_classes, labels).astype(np.int64)

    def condition(self, y):
        return self.class_emb.forward(y), None

    def condition_backward(self, demb, dchannels):
        self.class_emb.backward(demb)


class TextConditionalUNet(ConditionalUNet):
    """y: token ids (B, text_len) of prompts (text.encode_prompts); the empty prompt is "no condition". The text
    encoder's vector c (text.TextEncoder, trained with the U-Net) enters as temb += W c ("add") or as
    concat(x_t, broadcast(W c)) ("concat")."""

    def __init__(self, cfg, cond, seed=0, dtype=np.float32, tokenizer=None):
        super().__init__(cfg, cond, seed, dtype, cond.text_channels if cond.text_cond == "concat" else 0)
        if tokenizer is None and cond.prompt_set:
            tokenizer = build_tokenizer(cond.prompt_set)
        if tokenizer is not None and len(tokenizer) != cond.vocab_size:
            raise ValueError(f"ConditionConfig.vocab_size is {cond.vocab_size} but the tokenizer has {len(tokenizer)} "
                             f"tokens (set vocab_size=len(build_tokenizer(prompt_set)))")
        self.tokenizer, self._prompts = tokenizer, None
        rng = self.rng_cond
        self.text_enc = self.add("text_enc", TextEncoder(cond.vocab_size, cond.text_len, cond.text_dim,
                                                         cond.text_layers, cond.text_heads, rng, dtype))
        self.text_proj = self.add("text_proj", Linear(cond.text_dim, 4 * cfg.base_channels if cond.text_cond == "add"
                                                      else cond.text_channels, rng, dtype))
        self._collect()

    def null_condition(self, n):
        ids = np.full((n, self.cond.text_len), Tokenizer.PAD_ID, dtype=np.int64)
        ids[:, 0] = Tokenizer.CLS_ID
        return ids

    def check_condition(self, y, n):
        if y.ndim != 2 or y.shape[0] != n or y.dtype.kind not in "iu":
            raise ValueError(f"a text-conditional UNet takes token ids y of shape ({n}, L), got {y.dtype} "
                             f"{tuple(y.shape)}")
        if array_module(y) is np and y.size and not 0 <= int(y.min()) <= int(y.max()) < self.cond.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cond.vocab_size})")
        return y

    def draw_condition(self, labels, p_uncond, rng):
        """Training: a random prompt template for each label (prompts.py), or "" with probability p_uncond."""
        if self._prompts is None:
            if not self.cond.prompt_set or self.tokenizer is None:
                raise ValueError("training a text model needs ConditionConfig.prompt_set (the data set whose prompt "
                                 "templates it learns)")
            self._prompts = prompt_table(self.tokenizer, self.cond.prompt_set, "train", self.cond.text_len)
        return draw_prompts(self._prompts, labels, p_uncond, rng)

    def condition(self, ids):
        c = self.text_proj.forward(self.text_enc.forward(ids))      # (B, 4C) or (B, text_channels)
        return (c, None) if self.cond.text_cond == "add" else (None, c)

    def condition_backward(self, demb, dchannels):
        self.text_enc.backward(self.text_proj.backward(demb if self.cond.text_cond == "add" else dchannels))
