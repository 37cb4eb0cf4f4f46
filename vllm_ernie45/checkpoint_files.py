"""What a checkpoint holds, read without loading a tensor: its own ``config.json``, the shard
files its safetensors index names, and every tensor's shape (from the safetensors headers).

A local directory is read directly. A hub repository is read through ``huggingface_hub``:
``config.json`` from the cache vLLM filled when it loaded the config, tensor shapes from the
locally cached snapshot where there is one, else from the safetensors headers on the hub
(``get_safetensors_metadata``, no tensor data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_ernie45.checkpoint import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointLocation:
    """A checkpoint directory, or a hub repository id (and revision)."""

    model: str
    revision: str | None = None

    @property
    def local_dir(self) -> Path | None:
        path = Path(self.model)
        return path if path.is_dir() else None


def read_raw_config(location: CheckpointLocation) -> tuple[dict[str, Any], str] | None:
    """The checkpoint's own ``config.json`` (before transformers fills defaults) and its
    path, or None where it cannot be had."""
    path: Path | None = None
    if location.local_dir is not None:
        path = location.local_dir / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(location.model, "config.json", revision=location.revision))
        except Exception:  # noqa: BLE001 - not a hub repository, or not reachable: no raw config
            return None
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")), str(path)


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a local checkpoint: those its index names (every one must be
    there: a missing shard is a CheckpointError naming it), or, without an index, every
    ``*.safetensors`` file."""
    index = model_dir / SAFETENSORS_INDEX
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors"))
    weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (model_dir / f).is_file()]
    if absent:
        tensors = sum(1 for f in weight_map.values() if f in absent)
        example = next(name for name, f in weight_map.items() if f in absent)
        raise CheckpointError(
            f"{index} names {len(absent)} shard file(s) that {model_dir} lacks: "
            f"{', '.join(map(repr, absent))} ({tensors} tensor(s), e.g. {example!r}); the "
            "download or copy is incomplete: fetch the missing file(s) again"
        )
    return [model_dir / f for f in files]


def _local_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in shard_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            raise CheckpointError(
                f"unreadable checkpoint file: {file} ({err}): truncated or corrupt; download "
                "or copy it again"
            ) from err
    return shapes


def _hub_shapes(location: CheckpointLocation) -> dict[str, tuple[int, ...]]:
    from huggingface_hub import HfApi, snapshot_download

    try:  # a snapshot vLLM (or the user) downloaded before
        cached = Path(snapshot_download(location.model, revision=location.revision, local_files_only=True))
        if shard_files(cached):
            return _local_shapes(cached)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - nothing cached: read the headers on the hub
        pass
    meta = HfApi().get_safetensors_metadata(location.model, revision=location.revision)
    return {
        name: tuple(info.shape)
        for file_meta in meta.files_metadata.values()
        for name, info in file_meta.tensors.items()
    }


def tensor_shapes(location: CheckpointLocation) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors headers ({} where there are no
    safetensors files, e.g. a config-only directory for a dummy load)."""
    if location.local_dir is not None:
        return _local_shapes(location.local_dir)
    return _hub_shapes(location)
