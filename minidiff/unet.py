"""The noise-prediction network eps_theta(x_t, t): the DDPM U-Net.
Step 6 of the reading order (its parts are layers.py); train_step.py fits it, sample.py calls it at every step.

Architecture (Ho et al. 2020, appendix B and their code; the same as diffusers' UNet2DModel with DDPM blocks), all
of it described by ``UNetConfig``:
  time embedding  sinusoidal(t) of dim C -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)
  conv_in         3x3, in_channels -> C
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

Conditioning on class labels or text lives apart (minidiff/conditioning/: ConditionalUNet subclasses this one, as
GLIDE's Text2ImUNet does): a conditioner adds an offset to the time embedding (``forward(..., emb=...)``) or joins
extra channels to x_t (``extra_in_channels``).
Public layout is NCHW; inside, activations are NHWC (see layers.py). ``backward`` mirrors ``forward``
in reverse, one call per line.
"""
import dataclasses
import math

import numpy as np

from . import fast
from .layers import (Concat, Conv2d, Dropout, GroupNorm, GroupNormSiLU, Layer, Linear, SiLU, Upsample2x, pixel_sum,
                     softmax, timestep_embedding)
from .model import Model
from .utils.backend import array_module

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
    prediction_type: str = "epsilon"     # what the network outputs: "epsilon" (eps_theta, DDPM) or "v_prediction"
                                         # (v = sqrt(ab) eps - sqrt(1 - ab) x_0; diffusion.eps_from_velocity)

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.base_channels % NUM_GROUPS or self.base_channels < NUM_GROUPS:
            raise ValueError(f"base_channels must be a positive multiple of {NUM_GROUPS} (GroupNorm groups), "
                             f"got {self.base_channels}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be one or more positive channel multipliers, got {self.ch_mult}")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by 2^(levels - 1) = "
                             f"{2 ** (len(self.ch_mult) - 1)} for ch_mult {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}")

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
        demb = self.temb_proj.backward(pixel_sum(dh, per_image=True))     # the shift's gradient, per image
        dx = self.norm1.backward(self.conv1.backward(dh))
        dx += self.skip.backward(dout) if self.skip else dout
        return dx, demb


# Single-head spatial self-attention with residual (DDPM's AttnBlock):
#   h = GroupNorm(x);  q, k, v = 1x1 convs of h;  A = softmax(q k^T / sqrt(C)) over keys;
#   y = x + proj(A v).

@fast.reference
def attention(q, k, v, scale):
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) per image: q (B, N, C), k and v (B, M, C) ->
    (o = A v (B, N, C), A = softmax(q k^T scale) over the keys (B, N, M), which the backward pass needs)."""
    a = softmax((q @ k.transpose(0, 2, 1)) * scale)
    return a @ v, a


@fast.reference
def attention_backward(q, k, v, a, dout, scale):
    """(dq, dk, dv) for dout = dL/do: dA = dout v^T and dv = A^T dout; the softmax's dS = A (dA - rowsum(dA A)),
    times scale; dq = dS k, dk = dS^T q."""
    da = dout @ v.transpose(0, 2, 1)                                               # (B, N, M)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True)) * scale
    return ds @ k, ds.transpose(0, 2, 1) @ q, a.transpose(0, 2, 1) @ dout


class AttnBlock(Layer):
    def __init__(self, channels, rng, num_groups=8, dtype=np.float32):
        super().__init__()
        self.norm = self.add("norm", GroupNorm(num_groups, channels, dtype=dtype))
        self.q = self.add("q", Conv2d(channels, channels, 1, rng, dtype=dtype))
        self.k = self.add("k", Conv2d(channels, channels, 1, rng, dtype=dtype))
        self.v = self.add("v", Conv2d(channels, channels, 1, rng, dtype=dtype))
        self.proj = self.add("proj", Conv2d(channels, channels, 1, rng, dtype=dtype))

    def forward(self, x):                       # x (B, H, W, C)
        B, H, W, C = x.shape
        h = self.norm.forward(x)
        q = self.q.forward(h).reshape(B, H * W, C)                 # (B, N, C), N = H*W
        k = self.k.forward(h).reshape(B, H * W, C)
        v = self.v.forward(h).reshape(B, H * W, C)
        scale = 1.0 / math.sqrt(C)
        o, a = attention(q, k, v, scale)                           # a (B, N, N): query rows, key columns
        self.save((q, k, v, a, scale))
        return x + self.proj.forward(o.reshape(B, H, W, C))

    def backward(self, dout):                   # dout (B, H, W, C)
        q, k, v, a, scale = self.cache
        B, H, W, C = dout.shape
        do = self.proj.backward(dout).reshape(B, H * W, C)         # (B, N, C)
        dq, dk, dv = attention_backward(q, k, v, a, do, scale)
        dh = (self.q.backward(dq.reshape(B, H, W, C)) + self.k.backward(dk.reshape(B, H, W, C))
              + self.v.backward(dv.reshape(B, H, W, C)))
        return dout + self.norm.backward(dh)                       # residual + attention branch


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
    def __init__(self, cfg=None, seed=0, dtype=np.float32, extra_in_channels=0):
        """extra_in_channels: channels a conditioner joins to x_t (the article's concat mode), read by conv_in."""
        super().__init__()
        cfg = cfg or UNetConfig()
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        rng = np.random.default_rng(seed)
        C, temb_dim = cfg.base_channels, 4 * cfg.base_channels

        # time embedding
        self.temb_fc1 = self.add("temb.fc1", Linear(C, temb_dim, rng, dtype))
        self.temb_act = self.add("temb.act", SiLU())
        self.temb_fc2 = self.add("temb.fc2", Linear(temb_dim, temb_dim, rng, dtype))
        self.emb_act = self.add("emb_act", SiLU())                   # SiLU(temb), shared by every ResBlock's temb_proj
        self.conv_in = self.add("conv_in", Conv2d(cfg.in_channels + extra_in_channels, C, 3, rng, padding=1,
                                                  dtype=dtype))

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

    def config_dict(self):
        """The model configuration a checkpoint keeps."""
        return self.cfg.asdict()

    # ---- forward / backward -----------------------------------------------------------------------
    def _check_inputs(self, x, t):
        xp = array_module(x)
        cin = self.conv_in.params["weight"].shape[1]
        want = (cin, self.cfg.resolution, self.cfg.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"UNet expects x of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"UNet parameters are {self.dtype} but x is {x.dtype}; cast x or call model.to()")
        t = xp.asarray(t)
        if t.shape != (x.shape[0],) or t.dtype.kind not in "iu":
            raise ValueError(f"t must be an int array of shape ({x.shape[0]},), got {t.dtype} {t.shape}")
        return t

    def forward(self, x, t, y=None, rng=None, emb=None):
        """eps_theta(x_t, t): x (B, C, H, W), t int (B,) -> (B, C, H, W). rng (np.random.Generator) drives dropout
        in training mode. ``emb`` (B, 4C): an offset added to the time embedding (a conditioner's, ConditionalUNet).
        An unconditional network takes no condition y."""
        if y is not None:
            raise ValueError("a condition y was given to an unconditional UNet (ConditionalUNet takes class labels "
                             "or prompts: minidiff/conditioning/)")
        xp = array_module(x)
        t = self._check_inputs(x, t)
        if not self.training or self.cfg.dropout == 0.0:
            rng = None
        elif rng is None:
            raise ValueError("dropout > 0 in training mode needs rng (a np.random.Generator)")

        temb = self.temb_fc2.forward(self.temb_act.forward(self.temb_fc1.forward(
            timestep_embedding(t, self.cfg.base_channels, self.dtype))))                   # (B, 4C)
        if emb is not None:
            temb = temb + emb
        emb = self.emb_act.forward(temb)
        x = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))                                  # NCHW -> NHWC

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
        return self.backward_with_emb(dout)[0]

    def backward_with_emb(self, dout):
        """backward, returning (dL/dx, dL/d emb): the second is the gradient reaching the time embedding, which a
        conditioner's offset ``emb`` receives."""
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
        self.temb_fc1.backward(self.temb_act.backward(self.temb_fc2.backward(dtemb)))
        return xp.ascontiguousarray(dx.transpose(0, 3, 1, 2)), dtemb                       # NHWC -> NCHW
