"""Tiny random expert checkpoints and synthetic PSGTR weights, built locally (nothing is downloaded).

The builders save a randomly initialised model *and* its processor with ``save_pretrained``, so an expert
pointed at the folder (``model_id=str(folder)``) goes through exactly the same ``from_pretrained`` path as
with a real Hub id. They exist for tests (ours and downstream applications') and for trying the pipeline
without weights; the outputs are meaningless.

* :func:`build_tiny_mask2former` -- Mask2Former (Swin backbone) with the 133 COCO-panoptic labels.
* :func:`build_tiny_owlv2` -- OWLv2 with a character-level CLIP tokenizer long enough for every one of the
  1847 official queries.
* :func:`synthetic_state_dict` -- deterministic synthetic PSGTR weights (the recipe the golden fixtures were
  generated with): meaningless but reproducible bit for bit from a seed, scaled so that the outputs stay in a sane
  range (confident classes, a silent "no relation" column, positive mask logits); :func:`build_tiny_psgtr` saves
  them for a ResNet-18 PSGTR.
* :func:`build_tiny_experts` -- all of them as an ``experts=`` specification.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file

from ..errors import DependencyError
from ..experts.scene_graph.checkpoint import to_checkpoint_keys
from ..experts.scene_graph.config import PSGTRConfig
from ..experts.scene_graph.modeling import PSGTR
from ..results import load_vocab

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Side of the tiny models' input images (the real ones use 384 for Mask2Former and 960 for OWLv2).
TINY_IMAGE_SIZE = 64

#: Token budget of the tiny OWLv2 tokenizer: the longest official query has 37 characters, and the tiny
#: tokenizer spells queries character by character (plus start and end tokens).
TINY_OWLV2_MAX_TOKENS = 48


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise DependencyError("the tiny expert builders need transformers: pip install transformers") from exc
    return transformers


def _pil_class(module: str, name: str, fallback: type) -> type:
    """The PIL (reference) implementation of an image processor when this transformers keeps it apart
    (transformers >= 5: ``<model>.image_processing_pil_<model>.<Name>Pil``), else ``fallback`` (which is
    the reference implementation on older versions)."""
    if importlib.util.find_spec(module) is None:
        return fallback
    return getattr(importlib.import_module(module), name)


def build_tiny_mask2former(directory: PathLike, *, seed: int = 0, num_queries: int = 10) -> Path:
    """Save a random tiny ``Mask2FormerForUniversalSegmentation`` and its image processor in ``directory``.

    The model has the 133 COCO-panoptic labels (ids and names as ``COCO_PANOPTIC_CLASSES``), a 4-stage Swin
    backbone of width 32 and ``num_queries`` queries; the processor resizes the shortest edge to 64 (a
    multiple of 32, like the real checkpoint's 384). About 1.3 M parameters, 5 MB on disk.
    """
    tf = _transformers()
    names = list(load_vocab("COCO_PANOPTIC_CLASSES"))
    backbone = tf.SwinConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=4,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = tf.Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=num_queries,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.Mask2FormerForUniversalSegmentation(config).eval()

    processor_cls = _pil_class(
        "transformers.models.mask2former.image_processing_pil_mask2former",
        "Mask2FormerImageProcessorPil",
        tf.Mask2FormerImageProcessor,
    )
    processor = processor_cls(
        size={"shortest_edge": TINY_IMAGE_SIZE, "longest_edge": 1333},
        size_divisor=32,
        ignore_index=255,
        do_reduce_labels=False,
        num_labels=len(names),
    )
    return _save_pretrained(directory, model, processor, "Mask2Former")


def _save_pretrained(directory: PathLike, model: Any, processor: Any, what: str) -> Path:
    """Save ``model`` and ``processor`` with ``save_pretrained`` into ``directory`` (created) and return it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tf_logging = _transformers().utils.logging
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # a one-shard tiny file: transformers' "Writing model shards" bar is noise
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    processor.save_pretrained(out)
    logger.info("saved a tiny %s to %s", what, out)
    return out


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255, in a fixed order."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def build_tiny_owlv2(directory: PathLike, *, seed: int = 0) -> Path:
    """Save a random tiny ``Owlv2ForObjectDetection`` and its ``Owlv2Processor`` in ``directory``.

    The tokenizer is a CLIP tokenizer without merges (one token per character, ``!`` as padding like the
    real OWLv2 tokenizer, so ``input_ids[:, 0] > 0`` still marks real queries) with room for
    :data:`TINY_OWLV2_MAX_TOKENS` tokens; the vision tower sees 64 x 64 images in 16 px patches (16 boxes
    per image); widths are 32. About 0.1 M parameters.
    """
    tf = _transformers()
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos] = len(vocab)
    vocab[eos] = len(vocab)
    tokenizer = tf.CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=TINY_OWLV2_MAX_TOKENS)

    config = tf.Owlv2Config(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=TINY_OWLV2_MAX_TOKENS,
            bos_token_id=vocab[bos],
            eos_token_id=vocab[eos],
            pad_token_id=vocab["!"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=16,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.Owlv2ForObjectDetection(config).eval()

    image_processor_cls = _pil_class(
        "transformers.models.owlv2.image_processing_pil_owlv2", "Owlv2ImageProcessorPil", tf.Owlv2ImageProcessor
    )
    image_processor = image_processor_cls(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    processor = tf.Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return _save_pretrained(directory, model, processor, "OWLv2")


#: Seed of the golden fixtures.
GOLDEN_SEED = 20240307


def synthetic_state_dict(config: PSGTRConfig | None = None, seed: int = GOLDEN_SEED) -> dict[str, torch.Tensor]:
    """A state dict in the checkpoint (mmcv-1) spelling, drawn key by key in state-dict order.

    Per key, with one ``torch.Generator`` seeded with ``seed``: ``num_batches_tracked`` -> 0 (no draw);
    ``running_mean`` -> 0.1 * randn; ``running_var`` -> 0.75 + 0.5 * rand; other 1-D ``weight`` -> 1 + 0.1 * randn;
    other 1-D tensors -> 0.02 * randn; ``bbox_head.query_embed.weight`` -> randn; everything else ->
    randn / sqrt(fan_in) with fan_in = prod(shape[1:]). Then the three classifier weights are multiplied by 8,
    the "no relation" bias is set to -20 and both mask heads' output bias to 1.
    """
    shapes = {name: tensor.shape for name, tensor in PSGTR(config or PSGTRConfig()).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in to_checkpoint_keys(shapes).items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith("running_mean"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("running_var"):
            out[name] = 0.5 * torch.rand(shape, generator=g) + 0.75
        elif len(shape) == 1 and name.endswith(".weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[name] = 0.02 * torch.randn(shape, generator=g)
        elif name == "bbox_head.query_embed.weight":
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    for head in ("sub_cls_embed", "obj_cls_embed", "rel_cls_embed"):
        out[f"bbox_head.{head}.weight"] *= 8
    out["bbox_head.rel_cls_embed.bias"][0] = -20.0
    for head in ("sub_mask_head", "obj_mask_head"):
        out[f"bbox_head.{head}.out_lay.bias"].fill_(1.0)
    return out


#: Structure of the tiny PSGTR (ResNet-18, one encoder and one decoder layer, 10 queries) and the input size
#: its expert should use: pass both to the ``psgtr`` expert (see :func:`tiny_psgtr_settings`).
TINY_PSGTR_ARCHITECTURE: dict = {
    "depth": 18,
    "num_queries": 10,
    "embed_dim": 128,
    "num_heads": 8,
    "ffn_dim": 128,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
}


def tiny_psgtr_settings() -> dict:
    """Settings of the ``psgtr`` expert for :func:`build_tiny_psgtr` weights (input resized to 256 px, not 800)."""
    return {"architecture": dict(TINY_PSGTR_ARCHITECTURE), "scale": (256, 256)}


def build_tiny_psgtr(path: PathLike, *, seed: int = 0) -> Path:
    """Save random weights of a tiny PSGTR (:data:`TINY_PSGTR_ARCHITECTURE`) as one safetensors file.

    Same code path as the official model (backbone, DETR transformer, heads, mask heads, MoAI post-processing),
    at a size that runs in well under a second per image on a CPU. Load it with
    ``create_expert("psgtr", model_id=path, **tiny_psgtr_settings())``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = synthetic_state_dict(PSGTRConfig().replace(**TINY_PSGTR_ARCHITECTURE), seed=seed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def build_tiny_experts(directory: PathLike, *, seed: int = 0, ocr: bool = True) -> dict[str, Any]:
    """Build tiny random expert checkpoints under ``directory`` and return an ``experts=`` specification.

    Returns ``{"segmentation": {"name": "mask2former", "model_id": ...}, "detection": {"name": "owlv2",
    "model_id": ...}, "ocr": "rapidocr"}`` (OCR only with ``ocr=True``; RapidOCR ships its real models, which
    run offline), and a tiny PSGTR (ResNet-18) for the scene graph. Folders already built are reused.
    """
    root = Path(directory)
    spec: dict[str, Any] = {}
    m2f = root / "mask2former"
    if not (m2f / "config.json").is_file():
        build_tiny_mask2former(m2f, seed=seed)
    spec["segmentation"] = {"name": "mask2former", "model_id": str(m2f)}
    owl = root / "owlv2"
    if not (owl / "config.json").is_file():
        build_tiny_owlv2(owl, seed=seed)
    spec["detection"] = {"name": "owlv2", "model_id": str(owl)}
    sgg = root / "psgtr.safetensors"
    if not sgg.is_file():
        build_tiny_psgtr(sgg, seed=seed)
    spec["scene_graph"] = {"name": "psgtr", "model_id": str(sgg), **tiny_psgtr_settings()}
    if ocr:
        spec["ocr"] = "rapidocr"
    return spec


__all__ = [
    "GOLDEN_SEED",
    "synthetic_state_dict",
    "build_tiny_experts",
    "TINY_IMAGE_SIZE",
    "TINY_OWLV2_MAX_TOKENS",
    "TINY_PSGTR_ARCHITECTURE",
    "build_tiny_mask2former",
    "build_tiny_owlv2",
    "build_tiny_psgtr",
    "tiny_psgtr_settings",
]
