"""Each expert says how its weights are fetched (``download_plan``) and fetches them (``prefetch``) through
moai_sdk.hub -- here against a local Hugging Face-style cache in tmp_path with HF_HUB_OFFLINE=1 (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from moai_sdk import hub as hubio
from moai_sdk.errors import CheckpointError
from moai_sdk.experts import create_expert
from moai_sdk.experts.base import Expert
from moai_sdk.results import PerceptionResult
from moai_sdk.testing import build_tiny_mask2former, build_tiny_psgtr, tiny_psgtr_settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files: dict[str, Path], kind: str = "models") -> Path:
    """Lay files out like huggingface_hub's cache: <kind>--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = root / f"{kind}--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture()
def offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_m2f(tmp_path_factory) -> Path:
    return build_tiny_mask2former(tmp_path_factory.mktemp("m2f") / "mask2former")


def frame() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)


def test_transformers_expert_prefetches_a_snapshot_and_loads_from_it(tmp_path, tiny_m2f, offline):
    cache = tmp_path / "hub"
    snap = hub_cache(cache, "acme/tiny-m2f", {p.name: p for p in tiny_m2f.iterdir()})
    exp = create_expert("mask2former", model_id="acme/tiny-m2f", cache_dir=str(cache), device="cpu")
    plan = exp.download_plan()
    assert plan["method"] == "snapshot" and plan["repo_id"] == "acme/tiny-m2f"
    assert "*.safetensors" in plan["allow_patterns"] and plan["fallback_patterns"] == ["pytorch_model*.bin"]
    status = exp.prefetch()
    assert Path(status["path"]) == snap and status["component"] == "expert.mask2former"
    assert not exp.is_loaded
    # what was prefetched is what the expert loads (offline, from the same cache)
    (result,) = exp.predict([frame()])
    assert isinstance(result, PerceptionResult) and result.panoptic_ids.shape == (64, 64)


def test_snapshot_of_an_uncached_repo_offline_says_how_to_fix(tmp_path, offline):
    exp = create_expert("owlv2", model_id="acme/not-cached", cache_dir=str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*downloading is off"):
        exp.prefetch()


def test_psgtr_prefetches_its_one_weight_file(tmp_path, offline):
    weights = build_tiny_psgtr(tmp_path / "tiny.safetensors")
    cache = tmp_path / "hub"
    snap = hub_cache(cache, "acme/psgtr-tiny", {"weights/tiny.safetensors": weights})
    exp = create_expert(
        "psgtr",
        model_id="acme/psgtr-tiny",
        filename="weights/tiny.safetensors",
        repo_type=None,
        hub={"cache_dir": str(cache)},
        **tiny_psgtr_settings(),
    )
    plan = exp.download_plan()
    assert plan["method"] == "file" and plan["filenames"] == ["weights/tiny.safetensors"]
    assert Path(exp.prefetch()["path"]) == snap / "weights" / "tiny.safetensors"
    missing = create_expert("psgtr", model_id="acme/psgtr-tiny", filename="other.pth", repo_type=None, cache_dir=cache)
    with pytest.raises(CheckpointError, match=r"none of \['other.pth'\]"):
        missing.prefetch()


def test_download_first_takes_the_first_file_the_repo_has(tmp_path, offline):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    snap = hub_cache(tmp_path / "hub", "acme/clip", {"pytorch_model.bin": src})
    got = hubio.download_first(
        "acme/clip", ["model.safetensors", "pytorch_model.bin"], hub=hubio.HubOptions(cache_dir=str(tmp_path / "hub"))
    )
    assert got == snap / "pytorch_model.bin" and got.read_bytes() == b"weights"


def test_snapshot_falls_back_when_a_repo_has_no_safetensors(tmp_path, offline):
    src = tmp_path / "w.bin"
    src.write_bytes(b"w")
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    snap = hub_cache(tmp_path / "hub", "acme/old", {"pytorch_model.bin": src, "config.json": cfg})
    folder = hubio.snapshot(
        "acme/old",
        ["*.json", "*.safetensors"],
        ["pytorch_model*.bin"],
        hub=hubio.HubOptions(cache_dir=tmp_path / "hub"),
    )
    assert folder == snap and (folder / "pytorch_model.bin").is_file()


def test_plans_of_local_bundled_single_file_and_self_fetching_experts(tmp_path, tiny_m2f):
    local = create_expert("mask2former", model_id=str(tiny_m2f))
    assert local.download_plan()["method"] == "local"
    assert local.prefetch() == {
        "component": "expert.mask2former",
        "method": "local",
        "repo_id": str(tiny_m2f),
        "path": str(tiny_m2f),
    }
    ocr = create_expert("rapidocr")
    assert ocr.download_plan()["method"] == "bundled" and "bundled" in ocr.prefetch()["reason"]
    yolo = create_expert("yolo-seg", model_id="hf://acme/yolo/weights/best.pt", revision="v1")
    assert yolo.download_plan() == {
        "component": "expert.yolo-seg",
        "task": "segmentation",
        "repo_id": "acme/yolo",
        "revision": "v1",
        "method": "file",
        "filenames": ["weights/best.pt"],
        "repo_type": None,
    }
    assert create_expert("yolo-world").download_plan()["method"] == "load"  # ultralytics fetches its own names


class SelfFetching(Expert):
    """An expert whose backend fetches its own files when it loads (the default plan)."""

    name = "test-self-fetching"
    task = "ocr"
    loads = 0

    def _load(self) -> None:
        type(self).loads += 1
        self.model = object()

    def _predict(self, images):
        return [self.make_result(img) for img in images]


def test_default_plan_loads_once_and_unloads():
    exp = SelfFetching()
    plan = exp.download_plan()
    assert plan["method"] == "load" and plan["component"] == "expert.test-self-fetching"
    status = exp.prefetch()
    assert SelfFetching.loads == 1 and not exp.is_loaded and "loaded once" in status["reason"]
