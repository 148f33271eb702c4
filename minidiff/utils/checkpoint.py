"""Checkpoints: one .npz file, no pickle, written atomically; and the model a checkpoint holds.
What train.py leaves behind for sampling and evaluation.

Layout: ``params/<name>`` (weights), ``ema/<name>`` (EMA weights), ``opt/<key>`` (optimizer state),
``guide/<name>`` (optional: an early copy of the EMA weights, the guide of autoguidance) and ``meta`` (a JSON
string: format version, step, config, RNG state, anything else the trainer records).
Saving writes a temporary file in the same folder, flushes it to disk and renames it over the target,
so an interrupted save never destroys the last good checkpoint. Loading uses ``allow_pickle=False``.
"""
import dataclasses
import json
import os
import tempfile
import zipfile

import numpy as np

from ..conditioning.text import Tokenizer
from ..conditioning.unet import ConditionConfig, build_unet, model_config
from ..schedule import NoiseSchedule
from ..unet import UNetConfig
from .backend import array_module, get_xp, to_numpy

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


def save_checkpoint(path, params, ema_params=None, opt_state=None, meta=None, guide_params=None):
    """Write params / EMA params / optimizer state / guide params (dicts of arrays or ints) and JSON-able meta
    atomically."""
    arrays = {}
    for prefix, d in (("params", params), ("ema", ema_params or {}), ("opt", opt_state or {}),
                      ("guide", guide_params or {})):
        for k, v in d.items():
            arrays[f"{prefix}/{k}"] = to_numpy(v)
    meta = dict(meta or {}, format_version=FORMAT_VERSION)
    arrays["meta"] = np.array(json.dumps(meta))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Read a checkpoint into dict(params=..., ema=..., opt=..., guide=..., meta=...) of NumPy arrays (guide: {}
    when the checkpoint has none); clear errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    out = dict(params={}, ema={}, opt={}, guide={}, meta=None)
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                if key == "meta":
                    out["meta"] = json.loads(str(z[key]))
                    continue
                prefix, _, name = key.partition("/")
                if prefix not in ("params", "ema", "opt", "guide") or not name:
                    raise CheckpointError(f"checkpoint {path!r} has an unexpected entry {key!r}")
                out[prefix][name] = z[key]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, json.JSONDecodeError) as e:
        if "pickle" in str(e):                  # NumPy's message would suggest loading it unsafely
            raise CheckpointError(f"checkpoint {path!r} is not a minidiff checkpoint: it holds pickled Python "
                                  f"objects, which minidiff never writes and never loads (a pickle can run code)") from None
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a minidiff checkpoint "
                              f"({type(e).__name__}: {e})") from None
    if out["meta"] is None or not out["params"]:
        raise CheckpointError(f"checkpoint {path!r} is not a minidiff checkpoint (no meta or no params)")
    if out["meta"].get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {out['meta'].get('format_version')}, "
                              f"this minidiff reads {FORMAT_VERSION}")
    return out


def load_params_into(target, source, what, path):
    """Copy arrays from ``source`` into the dict ``target`` in place, insisting on identical names and shapes."""
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    wrong = [f"{k}: checkpoint {source[k].shape} vs model {tuple(target[k].shape)}"
             for k in target if k in source and tuple(source[k].shape) != tuple(target[k].shape)]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {extra[:3]})")
        if wrong:
            parts.append(f"shape mismatch: {'; '.join(wrong[:3])}")
        raise CheckpointError(f"{what} in {path!r} do not fit this model ({', '.join(parts)}): the checkpoint "
                              f"was made with another configuration")
    for k, v in target.items():
        v[...] = array_module(v).asarray(source[k], dtype=v.dtype)


def model_config_defaults():
    """The default of every model-configuration field (a checkpoint omits those it predates)."""
    return dict(UNetConfig().asdict(), **dataclasses.asdict(ConditionConfig()))


WEIGHTS = {"ema": "ema", "raw": "params", "guide": "guide"}


def load_model(path, weights="ema", device="cpu"):
    """(model, schedule, meta) of a checkpoint written by train.train: the network with its ``weights``, "ema"
    (default), "raw" or "guide" (the early EMA weights kept by TrainConfig.guide_step, for autoguidance), on
    ``device``; the noise schedule it was trained with; the checkpoint's meta (step, configurations)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    try:
        cfg, cond = model_config(meta["config"]["model"])
        tokenizer = Tokenizer.from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
        train = meta["config"]["train"]
        schedule = NoiseSchedule(train.get("num_train_timesteps", 1000), train.get("beta_schedule", "linear"),
                                 train.get("beta_start", 1e-4), train.get("beta_end", 0.02))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} has an unreadable configuration ({type(e).__name__}: {e})") from None
    if weights == "guide" and not ckpt["guide"]:
        raise CheckpointError(f"{path} has no guide weights for autoguidance (it was trained without "
                              f"TrainConfig.guide_step)")
    model = build_unet(cfg, cond, seed=0, tokenizer=tokenizer).to(get_xp(device))
    load_params_into(model.params, ckpt[WEIGHTS[weights]], f"{weights} weights", path)
    return model, schedule, meta
