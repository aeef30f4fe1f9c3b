"""Read feature shards back as numpy arrays, one image at a time (what pandas cannot: it gives object arrays).

    from beam_job.retrieval.reader import read_images
    for image in read_images("out/"):          # job output, features/ folder, glob or file; local or gs://
        image.image_id, image.path
        image.features.global_descriptor       # (2048,) float32
        image.features.locations               # (N, 2) float32, (y, x) original-image pixels
        image.features.descriptors             # (N, 128) float32 (float16 shards are widened)

Shards are read one row group at a time (memory: one row group), in shard order, then row order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from beam_job.features import DelgFeatures

from . import shards as shards_mod


@dataclass(frozen=True)
class StoredImage:
    """One feature row: ids, the model it came from, and its features as the extractor returns them."""

    image_id: str
    path: str
    model: str
    preset: str
    features: DelgFeatures


COLUMNS = ["image_id", "path", "original_height", "original_width", "processed_height", "processed_width",
           "global_descriptor", "locations", "scales", "attention", "descriptors", "model", "preset"]


SCALAR_COLUMNS = ["image_id", "path", "model", "preset", "original_height", "original_width", "processed_height",
                  "processed_width"]


def _flat(column):
    """list<float> column -> (offsets (n+1,), values float32)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.asarray(array.flatten().to_numpy(zero_copy_only=False), np.float32)
    return offsets - offsets[0], values


def read_images(uri: str, image_ids: Sequence[str] | None = None) -> Iterator[StoredImage]:
    """Yield every image of the shards under `uri` (see shards.list_shards), or only those in image_ids."""
    wanted = set(image_ids) if image_ids is not None else None
    for shard in shards_mod.list_shards(uri):
        pf = shards_mod.open_parquet(shard)
        info = shards_mod.shard_info(shard, pf)
        local_dim = shards_mod.LocalFeatureReader.local_dim_of(pf)
        for rg in range(pf.metadata.num_row_groups):
            table, pf = shards_mod.read_row_group(shard, pf, rg, COLUMNS)
            if wanted is not None:
                keep = np.isin(np.asarray(table.column("image_id").to_pylist(), object), list(wanted))
                if not keep.any():
                    continue
                table = table.filter(keep)
            n = table.num_rows
            global_column = table.column("global_descriptor").combine_chunks()
            globals_ = shards_mod.fixed_list_to_numpy(global_column, info.global_dim)
            loc_off, locs = shards_mod._nested_to_numpy(table.column("locations"), 2)
            desc_off, descs = shards_mod._nested_to_numpy(table.column("descriptors"), local_dim)
            s_off, scales = _flat(table.column("scales"))
            a_off, attention = _flat(table.column("attention"))
            cols = {c: table.column(c).to_pylist() for c in SCALAR_COLUMNS}
            for j in range(n):
                oh, ow = cols["original_height"][j], cols["original_width"][j]
                ph, pw = cols["processed_height"][j], cols["processed_width"][j]
                features = DelgFeatures(
                    global_descriptor=globals_[j].copy(),
                    locations=locs[loc_off[j] : loc_off[j + 1]],
                    descriptors=descs[desc_off[j] : desc_off[j + 1]],
                    scales=scales[s_off[j] : s_off[j + 1]],
                    attention=attention[a_off[j] : a_off[j + 1]],
                    original_hw=(int(oh), int(ow)),
                    processed_hw=(int(ph), int(pw)),
                    scale_factors=(ph / oh if oh else 0.0, pw / ow if ow else 0.0),
                )
                yield StoredImage(cols["image_id"][j], cols["path"][j], cols["model"][j], cols["preset"][j], features)


__all__ = ["COLUMNS", "StoredImage", "read_images"]
