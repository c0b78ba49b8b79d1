"""Finding, checking and loading MoAI checkpoints (local directories and Hub repos), and saving them.

* Files: a local directory or a Hub repo id through ``huggingface_hub`` (revision, cache_dir, token,
  ``local_files_only`` and ``HF_HUB_OFFLINE``), fetching only ``config.json`` and the weight files.
* Formats: a single or sharded safetensors checkpoint (with ``model.safetensors.index.json``); ``.bin`` only
  through ``torch.load(weights_only=True)``. Remote code is never run.
* Keys: the official names (``model.*``, ``output.weight``, ``vit.vision_tower.vision_model.*``,
  ``vision_proj.*``, ``moai_compressor.*``). Every key is checked *before* any weight is read, so a bad
  checkpoint raises :class:`~moai_sdk.MissingKeysError` listing the problem and leaves nothing half-loaded.
* Memory: the model is built on the meta device and each tensor is cast, moved (and quantized) one at a time,
  so loading 7B weights never holds two copies.
* A checkpoint without vision weights gets ``openai/clip-vit-large-patch14-336`` with its position table
  interpolated to 35 x 35; a checkpoint without the extra ``<image>`` embedding row gets one appended.

The loader fills a model it is given: :meth:`MoAIForCausalLM.from_pretrained
<moai_sdk.modeling.MoAIForCausalLM.from_pretrained>` finds the files (:func:`resolve_checkpoint`), builds the
model on the meta device and hands it to :func:`load_weights_into`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError, MissingKeysError, UnsafeCheckpointError
from ..hub import HubOptions, find_weights, is_repo_id, read_json_object, resolve_file
from .config import DEFAULT_VISION_TOWER_ID, MoAIConfig, check_attn_implementation
from .quantization import check_quantization, quantize_linear_weight, replace_linears_for_quantization
from .vision import interpolate_position_table

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

VISION_PREFIX = "vit.vision_tower.vision_model."
POSITION_TABLE_KEY = VISION_PREFIX + "embeddings.position_embedding.weight"
EMBED_KEY = "model.tok_embeddings.weight"
#: Keys older checkpoints may hold that carry no weights (buffers); they are ignored.
_BENIGN_UNEXPECTED_SUFFIXES = (".position_ids", ".inv_freq", ".cos_cached", ".sin_cached")


# ---------------------------------------------------------------------------------------------- locating files
@dataclass
class CheckpointFiles:
    """Where a checkpoint's files are: its ``config.json`` contents and the weight files, in one format."""

    source: str
    directory: Path
    config: dict[str, Any]
    weight_files: list[Path]
    format: str  # "safetensors" | "bin"
    revision: str | None = None


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    hub: HubOptions | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> CheckpointFiles:
    """Find ``config.json`` and the weight files of a checkpoint (downloading only what is needed).

    ``hub`` carries the Hub settings; the four separate keywords still work and override it. The weights are
    looked for as :func:`moai_sdk.hub.find_weights` does: safetensors (sharded or one file), else ``.bin``.
    """
    hub = HubOptions.from_any(
        hub, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None
    )
    source = os.fspath(path_or_repo_id)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise CheckpointError(f"{local} has no {CONFIG_NAME}; is it a MoAI checkpoint directory?")
    elif local.exists() or source.startswith((".", "/", "~")) or not is_repo_id(source):
        raise CheckpointError(
            f"{source!r} is not a directory; pass a checkpoint directory or a Hub repo id like 'BK-Lee/MoAI-7B'"
        )
    config_path = resolve_file(source, CONFIG_NAME, hub=hub)
    found = find_weights(source, hub=hub)
    if found is None:
        raise CheckpointError(
            f"no weights found for {source!r} (looked for {SAFE_INDEX}, {SAFE_WEIGHTS}, {BIN_INDEX}, {BIN_WEIGHTS}"
            + (" in the local cache" if hub.offline and not local.is_dir() else "")
            + ")"
        )
    revision = None if local.is_dir() else hub.revision
    return CheckpointFiles(source, config_path.parent, read_json_object(config_path), *found, revision=revision)


# ---------------------------------------------------------------------------------------------- reading tensors
class WeightReader:
    """Lazy access to the tensors of one checkpoint, by key, without loading all of them."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files.weight_files:
            if not path.is_file():
                raise CheckpointError(f"weight file missing: {path}")
            if files.format == "safetensors":
                for key, shape in self._safetensors_header(path).items():
                    self._where[key] = path
                    self._shapes[key] = shape
            else:
                for key, tensor in self._load_bin(path).items():
                    self._where[key] = path
                    self._shapes[key] = tuple(tensor.shape)

    @staticmethod
    def _safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"cannot read {path.name} as safetensors ({exc}); the file is truncated or corrupt - delete it and download again"
            ) from exc

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            self._bin_cache[path] = load_bin_state_dict(path)
        return self._bin_cache[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        path = self._where[key]
        if self.files.format == "bin":
            return self._load_bin(path)[key]
        try:
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"cannot read tensor {key!r} from {path.name} ({exc}); the file is truncated or corrupt"
            ) from exc

    def release(self) -> None:
        self._bin_cache.clear()


def load_bin_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a PyTorch ``.bin`` state dict safely (``weights_only=True``: no arbitrary code runs)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} contains objects other than tensors and was not loaded (weights_only=True refused it): {exc}. "
            "Convert it to safetensors with a trusted tool."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({exc}); the file is truncated or corrupt"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------- key planning
@dataclass
class LoadPlan:
    """Which checkpoint key fills which model key, decided before any tensor is read."""

    mapping: dict[str, str]  # model key -> checkpoint key
    load_vision_from_hub: bool
    add_image_row: bool
    interpolate_positions: bool


def plan_load(model: nn.Module, reader: WeightReader, config: MoAIConfig) -> LoadPlan:
    expected = list(model.state_dict().keys())
    ckpt_keys = set(reader.keys())
    vision_in_ckpt = any(k.startswith(VISION_PREFIX) for k in ckpt_keys)
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for key in expected:
        if key.endswith(_BENIGN_UNEXPECTED_SUFFIXES):
            continue
        if key in ckpt_keys:
            mapping[key] = key
        elif key.startswith(VISION_PREFIX) and not vision_in_ckpt:
            continue  # the whole tower comes from the CLIP checkpoint
        else:
            missing.append(key)
    unexpected = sorted(k for k in ckpt_keys - set(expected) if not k.endswith(_BENIGN_UNEXPECTED_SUFFIXES))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(
                f"{len(unexpected)} unexpected: "
                + ", ".join(unexpected[:20])
                + (" ..." if len(unexpected) > 20 else "")
            )
        raise MissingKeysError(
            f"checkpoint {reader.files.source!r} does not match the MoAI model ({'; '.join(lines)}). "
            "Is it a MoAI checkpoint with official key names, and does config.json describe it?",
            missing=missing,
            unexpected=unexpected,
        )
    rows = reader.shape(EMBED_KEY)[0]
    if rows not in (config.vocab_size, config.vocab_size + 1):
        raise CheckpointError(
            f"{EMBED_KEY} has {rows} rows; expected vocab_size ({config.vocab_size}) or vocab_size + 1 (with <image>)"
        )
    for key, ck in mapping.items():
        want = tuple(model.state_dict()[key].shape)
        got = reader.shape(ck)
        if key == EMBED_KEY or key == POSITION_TABLE_KEY:
            continue
        if want != got:
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint {got}, model {want}; config.json does not describe this checkpoint"
            )
    interp = False
    if vision_in_ckpt:
        want = tuple(model.state_dict()[POSITION_TABLE_KEY].shape)
        got = reader.shape(POSITION_TABLE_KEY)
        s = config.structure
        if got != want:
            if got[0] == 1 + s.vision_pos_interp_from_grid**2 and want[0] == 1 + s.vision_pos_interp_to_grid**2:
                interp = True
            else:
                raise CheckpointError(f"CLIP position table {got} cannot become {want}")
    return LoadPlan(mapping, not vision_in_ckpt, rows == config.vocab_size, interp)


# ---------------------------------------------------------------------------------------------- assigning tensors
def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _prepare(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)


def check_weight(key: str, tensor: torch.Tensor, *, floating: bool, finite: bool) -> None:
    """Refuse a weight of the wrong kind before the model can use it: an integer tensor where the model holds a
    floating-point one, and (``finite``) a NaN or infinite value. :class:`CheckpointError` names the tensor.

    The finiteness scan is one ``aminmax`` pass (NaN propagates through it): about 0.6 s per GB on two CPU
    cores, far less on a GPU; ``check_weights=False`` skips it.
    """
    if floating and not tensor.is_floating_point():
        raise CheckpointError(
            f"weight {key!r} has dtype {str(tensor.dtype).replace('torch.', '')}, but the model's {key!r} is "
            "floating point: the checkpoint is corrupt or not a MoAI checkpoint"
        )
    if finite and tensor.is_floating_point() and tensor.numel():
        low, high = torch.aminmax(tensor)
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            raise CheckpointError(
                f"weight {key!r} holds {nan} NaN and {inf} infinite value(s) (after the cast to "
                f"{str(tensor.dtype).replace('torch.', '')}): the checkpoint is corrupt, or its values overflow this "
                "dtype (try dtype='bfloat16' or 'float32'); pass check_weights=False to load it anyway"
            )


def _vision_tower_from_hub(config: MoAIConfig, vision_id: str, hub: HubOptions) -> dict[str, torch.Tensor]:
    """Weights of the CLIP vision tower from the Hub (its safetensors, else ``.bin``), position table interpolated."""
    found = find_weights(vision_id, hub=hub)
    if found is None:
        raise CheckpointError(f"the checkpoint has no vision weights and {vision_id!r} has none to load either")
    files, fmt = found
    reader = WeightReader(CheckpointFiles(vision_id, files[0].parent, {}, files, fmt))
    out = {
        VISION_PREFIX + k[len("vision_model.") :]: reader.get(k) for k in reader.keys() if k.startswith("vision_model.")
    }
    reader.release()
    if not out:
        raise CheckpointError(f"{vision_id!r} holds no 'vision_model.*' weights")
    s = config.structure
    out[POSITION_TABLE_KEY] = interpolate_position_table(
        out[POSITION_TABLE_KEY], s.vision_pos_interp_from_grid, s.vision_pos_interp_to_grid
    )
    return out


def load_weights_into(
    model: nn.Module,
    reader: WeightReader,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    vision_tower: str = DEFAULT_VISION_TOWER_ID,
    hub: HubOptions | None = None,
    progress: bool | None = None,
    check_weights: bool = True,
) -> dict[str, Any]:
    """Fill ``model`` (a MoAI model built on the meta device) with the checkpoint ``reader`` reads.

    Every key is checked before a tensor is read; then each tensor is cast to ``dtype``, moved to ``device``
    (and quantized, see :mod:`~moai_sdk.modeling.quantization`) one at a time. The vision tower comes from the
    Hub repo ``vision_tower`` when the checkpoint has none (with ``hub``'s cache folder, token and offline
    setting; its revision belongs to the checkpoint, not to the CLIP repo). Returns what was done:
    ``quantized_modules``, ``vision_from`` and ``added_image_row``. Every weight must have a floating-point
    dtype; with ``check_weights`` (default) each is also scanned for NaN and infinite values (see
    :func:`check_weight`).
    """
    check_quantization(quantization, device)
    config: MoAIConfig = model.config
    plan = plan_load(model, reader, config)
    quantized = replace_linears_for_quantization(model, quantization, compute_dtype=dtype) if quantization else set()
    vision_hub = HubOptions.from_any(hub).replace(revision=None)
    vision_state = _vision_tower_from_hub(config, vision_tower, vision_hub) if plan.load_vision_from_hub else {}

    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    show = progress if progress is not None else len(plan.mapping) > 1000
    items = list(plan.mapping.items()) + [(k, None) for k in vision_state]
    for key, ck in tqdm(items, desc="Loading MoAI weights", unit="tensor", disable=not show):
        tensor = vision_state[key] if ck is None else reader.get(ck)
        if key == EMBED_KEY and plan.add_image_row:
            # The official loader appends one row for "<image>"; its value is never used (the image replaces it).
            tensor = torch.cat((tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype)), dim=0)
        if key == POSITION_TABLE_KEY and plan.interpolate_positions:
            s = config.structure
            tensor = interpolate_position_table(tensor, s.vision_pos_interp_from_grid, s.vision_pos_interp_to_grid)
        module_name = key.rpartition(".")[0]
        if module_name in quantized and key.endswith(".weight"):
            check_weight(key, tensor, floating=key in floating, finite=check_weights)
            quantize_linear_weight(model.get_submodule(module_name), tensor, dtype, device)
        else:
            value = _prepare(tensor, dtype, device)
            check_weight(key, value, floating=key in floating, finite=check_weights)  # after the cast: overflow too
            _set_tensor(model, key, value)
    reader.release()

    model.reset_buffers()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"internal error: tensors left unloaded: {leftovers[:10]}")
    model.eval()
    model.requires_grad_(False)
    return {
        "quantized_modules": sorted(quantized),
        "vision_from": vision_tower if plan.load_vision_from_hub else "checkpoint",
        "added_image_row": plan.add_image_row,
    }


# ---------------------------------------------------------------------------------------------- saving
def _iter_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shard and max_bytes is not None and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = value
        size += nbytes
    if shard:
        yield shard


def save_moai(
    model, directory: str | os.PathLike, *, max_shard_size: int | None = None, safe_serialization: bool = True
) -> None:
    """Write ``config.json`` and the weights with official key names (optionally sharded, or as ``.bin``)."""
    if model.load_info.get("quantization"):
        raise ConfigError("a quantized model cannot be saved; load it without quantization to save it")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.endswith(_BENIGN_UNEXPECTED_SUFFIXES)
    }
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.dtype).replace("torch.", "")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    shards = list(_iter_shards(state, max_shard_size))
    ext = "safetensors" if safe_serialization else "bin"
    base = "model" if safe_serialization else "pytorch_model"
    if len(shards) == 1:
        names = [f"{base}.{ext}"]
    else:
        names = [f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        if safe_serialization:
            save_file(shard, str(out / name), metadata={"format": "pt"})
        else:
            torch.save(shard, out / name)
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": weight_map,
        }
        (out / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(
            json.dumps(index, indent=2), encoding="utf-8"
        )


__all__ = [
    "CheckpointFiles",
    "WeightReader",
    "resolve_checkpoint",
    "load_weights_into",
    "save_moai",
    "load_bin_state_dict",
    "check_attn_implementation",
    "resolve_device",
    "resolve_dtype",
]
