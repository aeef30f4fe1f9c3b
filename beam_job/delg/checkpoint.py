"""Load an official DELG training checkpoint (TensorFlow object-based format) into our Keras DELG by name.

The official training code (tensorflow/models research/delf, TF2) saves object-based checkpoints, either
through `tf.train.Checkpoint(model=..., optimizer=...)` (keys under `model/`) or `model.save_weights`
(keys at the root). A variable key looks like

    [<prefix>]backbone/l2a/conv2a/kernel/.ATTRIBUTES/VARIABLE_VALUE

and our model exposes exactly those paths (`DelgKerasModel.named_variables()`), so the mapping is by name:
kernel / bias of Conv2D and Dense, gamma / beta / moving_mean / moving_variance of BatchNormalization.
Training-only objects (the ArcFace/cosine classifiers, optimizer slots, save_counter, step counters) are
ignored. Nothing is assigned unless every variable of our model is present with the right shape.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_ANCHOR = "backbone/conv1/kernel" + _SUFFIX


def _detect_prefix(keys: list[str], ckpt_path: str) -> str:
    candidates = sorted(
        {k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR) and ".OPTIMIZER_SLOT" not in k}, key=len
    )
    if not candidates:
        raise ValueError(
            f"{ckpt_path} is not a DELG training checkpoint: no variable key ends with '{_ANCHOR}'"
        )
    if len(candidates) > 1:
        raise ValueError(f"{ckpt_path} holds several DELG models (prefixes {candidates}); cannot choose one")
    return candidates[0]


def load_official_checkpoint(model, ckpt_path: str) -> dict[str, Any]:
    """Assign every variable of `model` (a DelgKerasModel) from the checkpoint at `ckpt_path`.

    ckpt_path: a checkpoint prefix (e.g. `.../delf_weights` or `.../ckpt-42`) or a directory holding a
    `checkpoint` index file. Returns a report dict:
      prefix          detected key prefix ('' or e.g. 'model/'),
      loaded          number of variables assigned,
      parameters      number of scalars assigned,
      ignored         sorted checkpoint variables (under the prefix, not optimizer slots) that our model
                      does not use, e.g. classifier weights,
      ignored_count   len(ignored) plus optimizer slots and objects outside the prefix.
    Raises ValueError (one line) naming the first missing variable or shape mismatch; the model is then
    left unchanged.
    """
    path = os.fspath(ckpt_path)
    try:
        reader = tf.train.load_checkpoint(path)
    except (ValueError, tf.errors.OpError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read a TensorFlow checkpoint at {path}: {first}") from None
    shapes = reader.get_variable_to_shape_map()
    keys = sorted(shapes)
    prefix = _detect_prefix(keys, path)

    values: dict[str, np.ndarray] = {}
    for name, var in model.named_variables().items():
        key = f"{prefix}{name}{_SUFFIX}"
        if key not in shapes:
            raise ValueError(f"checkpoint {path} lacks variable '{prefix}{name}' needed by our model")
        want = tuple(int(d) for d in var.shape)
        have = tuple(int(d) for d in shapes[key])
        if have != want:
            raise ValueError(f"shape mismatch for '{prefix}{name}': checkpoint {have}, our model {want}")
        values[name] = reader.get_tensor(key)

    named = model.named_variables()
    for name, value in values.items():
        named[name].assign(np.asarray(value, dtype=np.float32))

    used = {f"{prefix}{name}{_SUFFIX}" for name in values}
    ignored = sorted(
        k[len(prefix):-len(_SUFFIX)]
        for k in keys
        if k.startswith(prefix) and k.endswith(_SUFFIX) and ".OPTIMIZER_SLOT" not in k and k not in used
    )
    report = {
        "prefix": prefix,
        "loaded": len(values),
        "parameters": int(sum(int(np.prod(v.shape)) for v in values.values())),
        "ignored": ignored,
        "ignored_count": len(keys) - len(used),
    }
    logger.info(
        "loaded %d variables (%d parameters) from %s (prefix %r); ignored %d training-only entries",
        report["loaded"], report["parameters"], path, prefix, report["ignored_count"],
    )
    return report
