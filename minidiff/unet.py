"""The noise-prediction network eps_theta(x_t, t[, y]): the DDPM U-Net scaled to 28x28.
Stage 4 of the pipeline: the network eps_theta that train.py fits and sample.py calls at every step.

Architecture (Ho et al. 2020, appendix B and their code; the same as diffusers' UNet2DModel with
DDPM blocks), all of it described by ``UNetConfig``:
  time embedding  sinusoidal(t) of dim C -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)  (+ class embedding)
  text (optional) token ids -> TextEncoder (text.py) -> vector c, then either
                  "add":    temb += Linear(c)                       (the usual way: like the class embedding), or
                  "concat": x_t <- concat(x_t, broadcast(Linear(c)))  (the article's section 3.3, literally:
                            the text vector joins x_t as extra input channels at every pixel)
  conv_in         3x3, in_channels (+ text_channels with "concat") -> C
  down            per level (resolutions 28, 14, 7 with ch_mult (1, 2, 2)): num_res_blocks ResBlocks
                  (+ self-attention at attn_resolutions), then a 3x3 stride-2 conv except at the last level
  mid             ResBlock, self-attention, ResBlock
  up              levels in reverse, num_res_blocks + 1 ResBlocks each taking concat(h, skip), where
                  the skips are conv_in's output and every ResBlock/attention/downsample output of the
                  down path, popped last-in first-out; then nearest 2x upsampling + 3x3 conv
  out             GroupNorm, SiLU, 3x3 conv -> in_channels
ResBlock: GroupNorm(8) SiLU conv3x3, + Linear(SiLU(temb)) per channel, GroupNorm(8) SiLU dropout conv3x3,
plus a 1x1 conv on the skip path when the channel count changes.
Init as in the DDPM code: the last conv of each ResBlock, each attention output projection and the output
conv start at zero, so the network starts as (almost) the identity on each residual path; everything
else uses PyTorch's fan-in uniform init. C = 32 gives 1,623,169 parameters.

Public layout is NCHW; inside, activations are NHWC (see layers.py). ``backward`` mirrors ``forward``
in reverse, one call per line.
"""
import dataclasses
import json

import numpy as np

from .utils.backend import array_module
from .layers import (AttnBlock, Concat, Conv2d, Dropout, Embedding, GroupNormSiLU, Layer, Linear, Model, SiLU,
                     Upsample2x, timestep_embedding)
from .conditioning.text import TextEncoder, Tokenizer

TEXT_CONDITIONING = (None, "add", "concat")
PREDICTION_TYPES = ("epsilon", "v_prediction")

NUM_GROUPS = 8  # GroupNorm groups everywhere, as in the DDPM code (which uses 32 with C = 128)


@dataclasses.dataclass
class UNetConfig:
    in_channels: int = 1                 # image channels (MNIST: 1)
    resolution: int = 28                 # image height = width
    base_channels: int = 32              # C: channels at the first level; the time embedding has 4C
    ch_mult: tuple = (1, 2, 2)           # channels C * m at each level; resolution halves between levels
    num_res_blocks: int = 2              # ResBlocks per level on the way down (num_res_blocks + 1 up)
    attn_resolutions: tuple = (7,)       # self-attention after each ResBlock at these resolutions
    dropout: float = 0.0                 # dropout before the second conv of each ResBlock (training only)
    num_classes: int = None              # class-conditional when set: table of num_classes + 1 rows,
                                         # the last row being the "no condition" token for guidance
    text_cond: str = None                # prompt-conditional when set: "add" (to temb) or "concat" (article 3.3)
    vocab_size: int = None               # text models: tokenizer size (specials included)
    text_len: int = 16                   # text models: token positions (CLS + up to 15 tokens)
    text_dim: int = 64                   # text models: width of the transformer encoder and of its pooled vector
    text_layers: int = 2
    text_heads: int = 4
    text_channels: int = 8               # "concat": extra input channels the text vector is projected to
    prediction_type: str = "epsilon"     # what the network outputs: "epsilon" (eps_theta, DDPM) or "v_prediction"
                                         # (v = sqrt(ab) eps - sqrt(1 - ab) x_0; diffusion.eps_from_velocity)

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.base_channels % NUM_GROUPS or self.base_channels < NUM_GROUPS:
            raise ValueError(f"base_channels must be a positive multiple of {NUM_GROUPS} (GroupNorm groups), "
                             f"got {self.base_channels}")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by 2^(levels - 1) = "
                             f"{2 ** (len(self.ch_mult) - 1)} for ch_mult {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if self.text_cond not in TEXT_CONDITIONING:
            raise ValueError(f"unknown text_cond {self.text_cond!r}; choose one of {TEXT_CONDITIONING}")
        if self.text_cond and self.num_classes is not None:
            raise ValueError("a UNet is conditioned on class labels (num_classes) or on text (text_cond), not both")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if self.text_cond and not (self.vocab_size or 0) > 2:
            raise ValueError(f"text_cond needs vocab_size (the tokenizer's size), got {self.vocab_size}")

    def asdict(self):
        """Plain dict (tuples become lists when written as JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of asdict; accepts lists for tuples and rejects unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig option(s): {sorted(unknown)}")
        return cls(**d)

    def to_json(self):
        return json.dumps(self.asdict())

    @classmethod
    def from_json(cls, s):
        return cls.from_dict(json.loads(s))


class ResBlock(Layer):
    def __init__(self, cin, cout, temb_dim, dropout, rng, dtype):
        super().__init__()
        self.norm1 = self.add("norm1", GroupNormSiLU(NUM_GROUPS, cin, dtype=dtype))      # GroupNorm then SiLU
        self.conv1 = self.add("conv1", Conv2d(cin, cout, 3, rng, padding=1, dtype=dtype))
        self.temb_proj = self.add("temb_proj", Linear(temb_dim, cout, rng, dtype=dtype))
        self.norm2 = self.add("norm2", GroupNormSiLU(NUM_GROUPS, cout, dtype=dtype))
        self.dropout = self.add("dropout", Dropout(dropout))
        self.conv2 = self.add("conv2", Conv2d(cout, cout, 3, rng, padding=1, dtype=dtype))
        self.skip = self.add("skip", Conv2d(cin, cout, 1, rng, dtype=dtype)) if cin != cout else None

    def forward(self, x, emb, rng=None):        # x (B, H, W, cin), emb = SiLU(temb) (B, 4C)
        # conv1 adds the per-channel time shift W emb to its bias, conv2 adds the skip path to its output
        h = self.conv1.forward(self.norm1.forward(x), shift=self.temb_proj.forward(emb))
        skip = self.skip.forward(x) if self.skip else x
        return self.conv2.forward(self.dropout.forward(self.norm2.forward(h), rng), residual=skip)   # (B, H, W, cout)

    def backward(self, dout):                   # -> (dx, demb)
        dh = self.norm2.backward(self.dropout.backward(self.conv2.backward(dout)))
        B, H, W, C = dh.shape
        demb = self.temb_proj.backward(array_module(dh).einsum("bnc->bc", dh.reshape(B, H * W, C)))
        dx = self.norm1.backward(self.conv1.backward(dh))
        dx += self.skip.backward(dout) if self.skip else dout
        return dx, demb


class Downsample(Layer):
    def __init__(self, ch, rng, dtype):
        super().__init__()
        self.conv = self.add("conv", Conv2d(ch, ch, 3, rng, stride=2, padding=1, dtype=dtype))

    def forward(self, x):
        return self.conv.forward(x)

    def backward(self, dout):
        return self.conv.backward(dout)


class Upsample(Layer):
    def __init__(self, ch, rng, dtype):
        super().__init__()
        self.up = self.add("up", Upsample2x())
        self.conv = self.add("conv", Conv2d(ch, ch, 3, rng, padding=1, dtype=dtype))

    def forward(self, x):
        return self.conv.forward(self.up.forward(x))

    def backward(self, dout):
        return self.up.backward(self.conv.backward(dout))


class Level(Layer):
    """One resolution of the down or up path: lists of ResBlocks and attention blocks, plus the resampler."""

    def __init__(self):
        super().__init__()
        self.res, self.attn, self.cat = [], [], []
        self.resample = None


class UNet(Model):
    def __init__(self, cfg=None, seed=0, dtype=np.float32):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        rng = np.random.default_rng(seed)
        C, temb_dim = cfg.base_channels, 4 * cfg.base_channels

        # time (and class) embedding
        self.temb_fc1 = self.add("temb.fc1", Linear(C, temb_dim, rng, dtype))
        self.temb_act = self.add("temb.act", SiLU())
        self.temb_fc2 = self.add("temb.fc2", Linear(temb_dim, temb_dim, rng, dtype))
        self.class_emb = (self.add("class_emb", Embedding(cfg.num_classes + 1, temb_dim, rng, dtype))
                          if cfg.num_classes is not None else None)
        self.text_enc = self.text_proj = None
        if cfg.text_cond:
            self.text_enc = self.add("text_enc", TextEncoder(cfg.vocab_size, cfg.text_len, cfg.text_dim,
                                                             cfg.text_layers, cfg.text_heads, rng, dtype))
            self.text_proj = self.add("text_proj", Linear(cfg.text_dim, temb_dim if cfg.text_cond == "add"
                                                          else cfg.text_channels, rng, dtype))
            self.text_cat = self.add("text_cat", Concat()) if cfg.text_cond == "concat" else None
        self.emb_act = self.add("emb_act", SiLU())                   # SiLU(temb), shared by every ResBlock's temb_proj

        cin = cfg.in_channels + (cfg.text_channels if cfg.text_cond == "concat" else 0)
        self.conv_in = self.add("conv_in", Conv2d(cin, C, 3, rng, padding=1, dtype=dtype))

        # down path; skip_ch records the channels of every saved skip
        chans = [C * m for m in cfg.ch_mult]
        skip_ch, ch, res = [C], C, cfg.resolution
        self.down = []
        for i, cout in enumerate(chans):
            lv = self.add(f"down.{i}", Level())
            for j in range(cfg.num_res_blocks):
                lv.res.append(lv.add(f"res.{j}", ResBlock(ch, cout, temb_dim, cfg.dropout, rng, dtype)))
                ch = cout
                if res in cfg.attn_resolutions:
                    lv.attn.append(lv.add(f"attn.{j}", AttnBlock(ch, rng, NUM_GROUPS, dtype)))
                skip_ch.append(ch)
            if i < len(chans) - 1:
                lv.resample = lv.add("downsample", Downsample(ch, rng, dtype))
                skip_ch.append(ch)
                res //= 2
            self.down.append(lv)

        # middle
        self.mid_res1 = self.add("mid.res1", ResBlock(ch, ch, temb_dim, cfg.dropout, rng, dtype))
        self.mid_attn = self.add("mid.attn", AttnBlock(ch, rng, NUM_GROUPS, dtype))
        self.mid_res2 = self.add("mid.res2", ResBlock(ch, ch, temb_dim, cfg.dropout, rng, dtype))

        # up path, levels in reverse; registered as up.<level index of the same resolution>
        self.up = []
        for i in reversed(range(len(chans))):
            lv = self.add(f"up.{i}", Level())
            for j in range(cfg.num_res_blocks + 1):
                lv.cat.append(lv.add(f"cat.{j}", Concat()))
                lv.res.append(lv.add(f"res.{j}", ResBlock(ch + skip_ch.pop(), chans[i], temb_dim, cfg.dropout,
                                                          rng, dtype)))
                ch = chans[i]
                if res in cfg.attn_resolutions:
                    lv.attn.append(lv.add(f"attn.{j}", AttnBlock(ch, rng, NUM_GROUPS, dtype)))
            if i > 0:
                lv.resample = lv.add("upsample", Upsample(ch, rng, dtype))
                res *= 2
            self.up.append(lv)

        # output
        self.norm_out = self.add("norm_out", GroupNormSiLU(NUM_GROUPS, ch, dtype=dtype))
        self.conv_out = self.add("conv_out", Conv2d(ch, cfg.in_channels, 3, rng, padding=1, dtype=dtype))

        # DDPM init: zero the last conv of every ResBlock, every attention projection and conv_out
        for _, layer in self.named_layers():
            for zero in ([layer.conv2] if isinstance(layer, ResBlock) else
                         [layer.proj] if isinstance(layer, AttnBlock) else []):
                for p in zero.params.values():
                    p[...] = 0
        for p in self.conv_out.params.values():
            p[...] = 0
        self._collect()

    @property
    def config(self):
        return self.cfg

    def null_condition(self, n):
        """The "no condition" input of classifier-free guidance for n images: the last class-table row, or the
        empty prompt (CLS then padding); None for an unconditional model."""
        if self.cfg.num_classes is not None:
            return np.full((n,), self.cfg.num_classes, dtype=np.int64)
        if self.cfg.text_cond:
            ids = np.full((n, self.cfg.text_len), Tokenizer.PAD_ID, dtype=np.int64)
            ids[:, 0] = Tokenizer.CLS_ID
            return ids
        return None

    # ---- forward / backward -----------------------------------------------------------------------
    def _check_inputs(self, x, t, y):
        xp = array_module(x)
        cfg = self.cfg
        want = (cfg.in_channels, cfg.resolution, cfg.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"UNet expects x of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"UNet parameters are {self.dtype} but x is {x.dtype}; cast x or call model.to()")
        t = xp.asarray(t)
        if t.shape != (x.shape[0],) or t.dtype.kind not in "iu":
            raise ValueError(f"t must be an int array of shape ({x.shape[0]},), got {t.dtype} {t.shape}")
        if cfg.text_cond:
            y = xp.asarray(self.null_condition(x.shape[0]) if y is None else y)
            if y.ndim != 2 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
                raise ValueError(f"a text-conditional UNet takes token ids y of shape ({x.shape[0]}, L), "
                                 f"got {y.dtype} {tuple(y.shape)}")
            return t, y
        if y is not None:
            if cfg.num_classes is None:
                raise ValueError("class labels y given but the UNet was built with num_classes=None")
            on_host = array_module(y) is np
            y = np.asarray(y) if on_host else y
            if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
                raise ValueError(f"y must be an int array of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
            # the range is checked for labels on the host: reading labels already on a GPU would stall it
            # (TrainStep checks them before they go there)
            if on_host and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
                raise ValueError(f"class labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = no condition)")
            y = xp.asarray(y)
        elif cfg.num_classes is not None:
            y = xp.full((x.shape[0],), cfg.num_classes)           # unconditional: the "no condition" token
        return t, y

    def forward(self, x, t, y=None, rng=None):
        """eps_theta(x_t, t, y): x (B, C, H, W), t int (B,), y None, class labels (B,) or, for text models, token
        ids (B, L) -> (B, C, H, W). rng (np.random.Generator) drives dropout in training mode."""
        xp = array_module(x)
        t, y = self._check_inputs(x, t, y)
        if not self.training or self.cfg.dropout == 0.0:
            rng = None
        elif rng is None:
            raise ValueError("dropout > 0 in training mode needs rng (a np.random.Generator)")

        temb = self.temb_fc2.forward(self.temb_act.forward(self.temb_fc1.forward(
            timestep_embedding(t, self.cfg.base_channels, self.dtype))))                   # (B, 4C)
        if self.class_emb is not None:
            temb = temb + self.class_emb.forward(y)
        x = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))                                  # NCHW -> NHWC
        if self.cfg.text_cond == "add":
            temb = temb + self.text_proj.forward(self.text_enc.forward(y))
        elif self.cfg.text_cond == "concat":                                               # article 3.3
            c = self.text_proj.forward(self.text_enc.forward(y))                           # (B, text_channels)
            x = self.text_cat.forward(x, xp.broadcast_to(c[:, None, None, :], x.shape[:3] + c.shape[1:]))
        emb = self.emb_act.forward(temb)

        h = self.conv_in.forward(x)
        hs = [h]
        for lv in self.down:
            for j, block in enumerate(lv.res):
                h = block.forward(h, emb, rng)
                if lv.attn:
                    h = lv.attn[j].forward(h)
                hs.append(h)
            if lv.resample:
                h = lv.resample.forward(h)
                hs.append(h)

        h = self.mid_res1.forward(h, emb, rng)
        h = self.mid_attn.forward(h)
        h = self.mid_res2.forward(h, emb, rng)

        for lv in self.up:
            for j, block in enumerate(lv.res):
                h = block.forward(lv.cat[j].forward(h, hs.pop()), emb, rng)
                if lv.attn:
                    h = lv.attn[j].forward(h)
            if lv.resample:
                h = lv.resample.forward(h)

        h = self.conv_out.forward(self.norm_out.forward(h))
        return xp.ascontiguousarray(h.transpose(0, 3, 1, 2))                                # NHWC -> NCHW

    def backward(self, dout):
        """dL/d eps (B, C, H, W) -> dL/dx (B, C, H, W); adds every parameter gradient into self.grads."""
        if not self.training:
            raise RuntimeError("UNet.backward needs a forward pass in training mode (model.train(True))")
        xp = array_module(dout)
        dh = xp.ascontiguousarray(dout.transpose(0, 2, 3, 1))
        dh = self.norm_out.backward(self.conv_out.backward(dh))

        demb = 0.0
        dskips = []                             # filled in the order the skips were pushed
        for lv in reversed(self.up):
            if lv.resample:
                dh = lv.resample.backward(dh)
            for j in reversed(range(len(lv.res))):
                if lv.attn:
                    dh = lv.attn[j].backward(dh)
                dh, de = lv.res[j].backward(dh)
                demb = demb + de
                dh, dskip = lv.cat[j].backward(dh)
                dskips.append(dskip)

        dh, de = self.mid_res2.backward(dh)
        demb = demb + de
        dh = self.mid_attn.backward(dh)
        dh, de = self.mid_res1.backward(dh)
        demb = demb + de

        for lv in reversed(self.down):
            if lv.resample:
                dh = lv.resample.backward(dh + dskips.pop())
            for j in reversed(range(len(lv.res))):
                dh = dh + dskips.pop()
                if lv.attn:
                    dh = lv.attn[j].backward(dh)
                dh, de = lv.res[j].backward(dh)
                demb = demb + de
        dx = self.conv_in.backward(dh + dskips.pop())
        assert not dskips

        dtemb = self.emb_act.backward(demb)
        if self.class_emb is not None:
            self.class_emb.backward(dtemb)
        if self.cfg.text_cond == "add":
            self.text_enc.backward(self.text_proj.backward(dtemb))
        elif self.cfg.text_cond == "concat":                       # the broadcast's adjoint sums over the pixels
            dx, dc = self.text_cat.backward(dx)
            self.text_enc.backward(self.text_proj.backward(dc.sum(axis=(1, 2))))
        self.temb_fc1.backward(self.temb_act.backward(self.temb_fc2.backward(dtemb)))
        return xp.ascontiguousarray(dx.transpose(0, 3, 1, 2))                               # NHWC -> NCHW
