"""The PyTorch reference for minidiff's U-Net: the same architecture, built identically, with the same
parameter names, so ``load_minidiff_params`` copies weights one to one. Used by the tests (skipped without
torch) and by bench/bench_unet.py. PyTorch is never used by minidiff itself.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_GROUPS = 8


def timestep_embedding(t, dim, dtype=torch.float32):
    """sin/cos embedding as in minidiff.layers.timestep_embedding (computed in float64, cast once)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(NUM_GROUPS, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(NUM_GROUPS, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):                  # emb = SiLU(temb)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) if self.skip is not None else x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(NUM_GROUPS, ch)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)          # (B, N, C)
        k = self.k(h).reshape(B, C, H * W)                          # (B, C, N)
        v = self.v(h).reshape(B, C, H * W).transpose(1, 2)          # (B, N, C)
        a = torch.softmax(q @ k / math.sqrt(C), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(o)


class Resample(nn.Module):
    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=1)

    def forward(self, x):
        return self.conv(x if self.down else F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.res, self.attn = nn.ModuleList(), nn.ModuleList()


class TorchUNet(nn.Module):
    def __init__(self, in_channels=1, resolution=28, base_channels=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(7,), dropout=0.0, num_classes=None):
        super().__init__()
        C, temb_dim = base_channels, 4 * base_channels
        self.C, self.num_classes = C, num_classes
        self.temb = nn.Module()
        self.temb.fc1, self.temb.fc2 = nn.Linear(C, temb_dim), nn.Linear(temb_dim, temb_dim)
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, C, 3, padding=1)
        chans = [C * m for m in ch_mult]
        skip_ch, ch, res = [C], C, resolution
        self.down = nn.ModuleList()
        for i, cout in enumerate(chans):
            lv = Level()
            for _ in range(num_res_blocks):
                lv.res.append(ResBlock(ch, cout, temb_dim, dropout))
                ch = cout
                if res in attn_resolutions:
                    lv.attn.append(AttnBlock(ch))
                skip_ch.append(ch)
            if i < len(chans) - 1:
                lv.downsample = Resample(ch, down=True)
                skip_ch.append(ch)
                res //= 2
            self.down.append(lv)
        self.mid = nn.Module()
        self.mid.res1 = ResBlock(ch, ch, temb_dim, dropout)
        self.mid.attn = AttnBlock(ch)
        self.mid.res2 = ResBlock(ch, ch, temb_dim, dropout)
        self.up = nn.ModuleDict()
        for i in reversed(range(len(chans))):
            lv = Level()
            for _ in range(num_res_blocks + 1):
                lv.res.append(ResBlock(ch + skip_ch.pop(), chans[i], temb_dim, dropout))
                ch = chans[i]
                if res in attn_resolutions:
                    lv.attn.append(AttnBlock(ch))
            if i > 0:
                lv.upsample = Resample(ch, down=False)
                res *= 2
            self.up[str(i)] = lv
        self.norm_out = nn.GroupNorm(NUM_GROUPS, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        for m in self.modules():                # DDPM init: zero last conv of ResBlocks, attn proj, conv_out
            zero = (m.conv2 if isinstance(m, ResBlock) else m.proj if isinstance(m, AttnBlock) else None)
            if zero is not None:
                nn.init.zeros_(zero.weight)
                nn.init.zeros_(zero.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y=None):
        temb = self.temb.fc2(F.silu(self.temb.fc1(timestep_embedding(t, self.C, x.dtype))))
        if self.num_classes is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
            temb = temb + self.class_emb(y)
        emb = F.silu(temb)
        h = self.conv_in(x)
        hs = [h]
        for lv in self.down:
            for j, block in enumerate(lv.res):
                h = block(h, emb)
                if len(lv.attn):
                    h = lv.attn[j](h)
                hs.append(h)
            if hasattr(lv, "downsample"):
                h = lv.downsample(h)
                hs.append(h)
        h = self.mid.res2(self.mid.attn(self.mid.res1(h, emb)), emb)
        for lv in self.up.values():
            for j, block in enumerate(lv.res):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
                if len(lv.attn):
                    h = lv.attn[j](h)
            if hasattr(lv, "upsample"):
                h = lv.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def from_config(cfg, num_classes=None):
    """A TorchUNet for a minidiff UNetConfig, class-conditional with num_classes (the reference has no text
    conditioning)."""
    # (what the network predicts does not change the network)
    return TorchUNet(**{k: v for k, v in cfg.asdict().items() if k != "prediction_type"}, num_classes=num_classes)


def load_minidiff_params(tmodel, params):
    """Copy minidiff parameters (dict name -> NumPy array) into the torch model; names must match exactly."""
    sd = tmodel.state_dict()
    if set(sd) != set(params):
        raise ValueError(f"parameter names differ: only torch {sorted(set(sd) - set(params))[:5]}, "
                         f"only minidiff {sorted(set(params) - set(sd))[:5]}")
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(params[name])).to(p.dtype))
    return tmodel
