"""PSGTR weights: key spellings, synthetic-weight checksums, safe unpickling, the Hub path and the safetensors cache."""

from __future__ import annotations

import collections
import hashlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from moai_sdk.errors import CheckpointError, MissingKeysError, UnsafeCheckpointError
from moai_sdk.experts.scene_graph import checkpoint as ckpt
from moai_sdk.experts.scene_graph.checkpoint import (
    DroppedObject,
    load_into,
    read_weights,
    resolve_weights,
    safe_torch_load,
    to_checkpoint_keys,
    to_model_keys,
)
from moai_sdk.experts.scene_graph.config import OFFICIAL_FILENAME, OFFICIAL_REPO_ID
from moai_sdk.experts.scene_graph.modeling import PSGTR
from moai_sdk.testing import synthetic_state_dict

GOLDEN = Path(__file__).parent / "fixtures" / "psgtr-golden"


@pytest.fixture(scope="module")
def tsv_rows() -> list[tuple[str, str, float, float]]:
    lines = (GOLDEN / "psgtr_ckpt_keys.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["key", "shape", "synthetic_sum", "synthetic_abs_sum"]
    return [(k, s, float(a), float(b)) for k, s, a, b in (line.split("\t") for line in lines[1:])]


@pytest.fixture(scope="module")
def synthetic() -> dict[str, torch.Tensor]:
    return synthetic_state_dict()


@pytest.fixture(scope="module")
def model() -> PSGTR:
    return PSGTR()


def shape_text(t: torch.Tensor) -> str:
    return "scalar" if t.ndim == 0 else "x".join(str(d) for d in t.shape)


# --------------------------------------------------------------------------------------------------------------
# key spellings and the synthetic recipe
# --------------------------------------------------------------------------------------------------------------
def test_model_keys_in_checkpoint_spelling_match_the_reference_list(tsv_rows, model):
    keys = to_checkpoint_keys(model.state_dict())
    assert list(keys) == [row[0] for row in tsv_rows]  # same names, same order
    assert [shape_text(t) for t in keys.values()] == [row[1] for row in tsv_rows]
    assert len(tsv_rows) == 585


#: Checksum bound, in units of 2**-24 * sum(|w|): torch's CPU ``randn`` turns the same uniform draws into normals with
#: its vectorized Box-Muller (AVX2 / AVX-512, bit-identical) or the plain one (``ATEN_CPU_CAPABILITY=default``, and
#: other CPUs), whose log / sin / cos differ by a few float32 ulps. Each weight then moves by a few ulps of its
#: Box-Muller radius, so a sum moves by at most a few ulps of the absolute sum: measured sum(|dw|) <= 3.2 units
#: (default vs AVX-512, all 585 keys). A change of the recipe (seed, order of draws, scale, distribution) moves a
#: key's sum by about sqrt(n) standard deviations, i.e. by >= 1e-3 of its absolute sum for the largest key (2.4M
#: weights) -- thousands of times this bound -- so the checksums still pin the recipe the golden fixtures were made
#: with. (Drawing the weights with numpy would make them bit-identical everywhere, but the mmdet goldens were made
#: from these torch draws.)
CHECKSUM_ULPS = 8


@pytest.mark.numerics
def test_synthetic_weights_reproduce_the_reference_checksums(tsv_rows, synthetic):
    assert list(synthetic) == [row[0] for row in tsv_rows]
    for key, _, total, abs_total in tsv_rows:
        t = synthetic[key].double()
        bound = CHECKSUM_ULPS * 2.0**-24 * abs_total + 1e-9  # + the TSV's 11 significant digits
        assert abs(t.sum().item() - total) <= bound, key
        assert abs(t.abs().sum().item() - abs_total) <= bound, key
    assert synthetic["bbox_head.rel_cls_embed.bias"][0] == -20
    assert synthetic["backbone.bn1.num_batches_tracked"].dtype == torch.int64


def test_strict_load_in_both_spellings(synthetic, model):
    load_into(model, synthetic)  # mmcv-1 (checkpoint) spelling
    ref = model.state_dict()
    mmdet3 = to_model_keys(synthetic)
    assert "bbox_head.transformer.decoder.layers.0.cross_attn.attn.in_proj_weight" in mmdet3
    fresh = PSGTR()
    load_into(fresh, mmdet3)  # mmdet-3 (MoAI in-memory) spelling
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ref[key]), key
    # DataParallel prefix
    load_into(fresh, {f"module.{k}": v for k, v in synthetic.items()})


def test_key_problems_are_reported(synthetic, model):
    missing = dict(synthetic)
    del missing["bbox_head.query_embed.weight"]
    with pytest.raises(MissingKeysError) as info:
        load_into(model, missing)
    assert info.value.missing == ["bbox_head.query_embed.weight"] and info.value.unexpected == []
    extra = {**synthetic, "bbox_head.extra.weight": torch.zeros(1)}
    with pytest.raises(MissingKeysError) as info:
        load_into(model, extra)
    assert info.value.unexpected == ["bbox_head.extra.weight"]
    wrong = {**synthetic, "bbox_head.query_embed.weight": torch.zeros(50, 256)}
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_into(model, wrong)
    both = {**synthetic, "bbox_head.transformer.decoder.post_norm.weight": torch.zeros(256)}
    both["bbox_head.transformer.encoder.layers.0.self_attn.attn.in_proj_bias"] = torch.zeros(768)
    with pytest.raises(CheckpointError, match="twice"):
        to_model_keys(both)


# --------------------------------------------------------------------------------------------------------------
# restricted unpickling
# --------------------------------------------------------------------------------------------------------------
class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["shell", "eval"])
def test_non_allow_listed_global_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsShell(marker) if payload == "shell" else _Evaluates()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": {"x": evil}}, path)
    with pytest.raises(UnsafeCheckpointError, match="system|eval") as info:
        safe_torch_load(path)
    assert "allow list" in str(info.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        read_weights(path, convert=False)


def _fake_mmcv_config_dict():
    """A class that pickles as mmcv.utils.config.ConfigDict (registered in sys.modules only while saving)."""
    module = types.ModuleType("mmcv.utils.config")

    class ConfigDict(dict):
        pass

    ConfigDict.__module__ = "mmcv.utils.config"
    ConfigDict.__qualname__ = "ConfigDict"
    module.ConfigDict = ConfigDict
    return module, ConfigDict


def save_mmcv_style(state_dict: dict, path: Path, *, legacy: bool = False) -> None:
    """torch.save an mmcv-1 style training checkpoint: meta with library objects, optimizer state."""
    module, config_dict = _fake_mmcv_config_dict()
    names = ["mmcv", "mmcv.utils", "mmcv.utils.config"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = module if n == "mmcv.utils.config" else types.ModuleType(n)
    try:
        meta = {
            "mmcv_version": "1.4.3",
            "config": config_dict(model="PSGTr", lr=1e-4),
            "hook_msgs": {"best_score": np.float64(0.25), "seen": {1, 2}},
            "CLASSES": ("person", "bicycle"),
            "epoch": 60,
        }
        optimizer = {"state": {0: {"exp_avg": torch.ones(3), "step": 10}}, "param_groups": [{"lr": 1e-4}]}
        weights = collections.OrderedDict(state_dict)
        weights._metadata = collections.OrderedDict({"": {"version": 1}, "backbone": {"version": 1}})  # as nn.Module
        obj = {"meta": meta, "state_dict": weights, "optimizer": optimizer}
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mmcv_metadata_is_dropped_and_tensors_kept(tmp_path, legacy):
    sd = {"backbone.conv1.weight": torch.randn(4, 3), "bbox_head.query_embed.weight": torch.randn(2, 5)}
    path = tmp_path / "small.pth"
    save_mmcv_style(sd, path, legacy=legacy)
    obj = safe_torch_load(path)
    assert isinstance(obj["meta"]["config"], DroppedObject)
    assert "mmcv.utils.config.ConfigDict" in repr(obj["meta"]["config"])
    assert isinstance(obj["meta"]["hook_msgs"]["best_score"], DroppedObject)
    assert obj["meta"]["hook_msgs"]["seen"] == {1, 2}
    assert obj["meta"]["CLASSES"] == ("person", "bicycle")
    for key, value in sd.items():
        assert torch.equal(obj["state_dict"][key], value)


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        safe_torch_load(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------------------------
# full-size pickle, the Hub cache layout and the safetensors conversion cache
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_pickle(tmp_path_factory, synthetic) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("psgtr-pickle") / "epoch_60.pth"
    save_mmcv_style(synthetic, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def make_hub_cache(root: Path, source: Path, sha256: str) -> Path:
    """Lay out ``source`` as the Hub cache does for the Space's checkpoint (blob named by its SHA-256)."""
    repo = root / "spaces--ECCV2022--PSG"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    os.link(source, repo / "blobs" / sha256)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / OFFICIAL_FILENAME
    target.parent.mkdir(parents=True)
    target.symlink_to(os.path.relpath(repo / "blobs" / sha256, target.parent))
    return root


@pytest.fixture()
def offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def test_hub_download_path_offline_and_conversion_cache(tmp_path, full_pickle, synthetic, model, offline, monkeypatch):
    source, digest = full_pickle
    cache = make_hub_cache(tmp_path / "hub", source, digest)

    first = resolve_weights(None, cache_dir=cache, sha256=digest)
    assert first.origin == "pickle"
    assert first.source.name == "epoch_60.pth" and "spaces--ECCV2022--PSG" in str(first.source)
    assert first.converted_path is not None and first.converted_path.name == f"{digest}.safetensors"
    assert first.converted_path.is_relative_to(cache)
    load_into(model, first.state_dict)
    for key, value in to_model_keys(synthetic).items():
        assert torch.equal(first.state_dict[key], value), key

    # the second load reads the safetensors file and never touches the pickle
    def no_pickle(path):
        raise AssertionError("the pickle was read again")

    monkeypatch.setattr(ckpt, "safe_torch_load", no_pickle)
    second = resolve_weights(OFFICIAL_REPO_ID, cache_dir=cache, sha256=digest)
    assert second.origin == "converted"
    assert second.converted_path == first.converted_path
    assert set(second.state_dict) == set(first.state_dict)
    for key, value in first.state_dict.items():
        assert torch.equal(second.state_dict[key], value), key
    from safetensors import safe_open

    with safe_open(str(second.converted_path), "pt") as fh:
        meta = fh.metadata()
    assert meta["source_sha256"] == digest and meta["producer"] == "moai_sdk.psgtr"
    # the cached conversion does not bypass the hash check
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        resolve_weights(None, cache_dir=cache)


def test_official_hash_is_enforced(tmp_path, full_pickle, offline):
    source, digest = full_pickle
    cache = make_hub_cache(tmp_path / "hub", source, digest)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        resolve_weights(None, cache_dir=cache)  # the synthetic file is not the official one
    assert not list(cache.rglob("*.safetensors"))
    weights = resolve_weights(None, cache_dir=cache, verify=False, convert=False)
    assert weights.origin == "pickle" and weights.converted_path is None


def test_missing_from_offline_cache_names_the_fix(tmp_path, offline):
    with pytest.raises(
        CheckpointError, match="hf download ECCV2022/PSG OpenPSG/checkpoints/epoch_60.pth --repo-type space"
    ):
        resolve_weights(None, cache_dir=tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_weights(None, cache_dir=tmp_path / "empty", local_files_only=True)


def test_local_paths(tmp_path, full_pickle, synthetic):
    source, digest = full_pickle
    convert_dir = tmp_path / "converted"
    first = resolve_weights(str(source), sha256=digest, convert_dir=convert_dir)
    assert first.origin == "pickle" and first.converted_path.parent == convert_dir
    again = resolve_weights(source, convert_dir=convert_dir)
    assert again.origin == "converted"
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        resolve_weights(source, sha256="0" * 64, convert=False)
    # a safetensors file is used directly, in either spelling
    from safetensors.torch import save_file

    st = tmp_path / "psgtr.safetensors"
    save_file({k: v.contiguous() for k, v in synthetic.items()}, str(st))
    direct = resolve_weights(st)
    assert direct.origin == "safetensors"
    assert set(direct.state_dict) == set(to_model_keys(synthetic))
