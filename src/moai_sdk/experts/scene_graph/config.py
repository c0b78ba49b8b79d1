"""Configuration of the PSGTR scene-graph model and of its MoAI pre/post-processing.

The defaults describe the released ``psgtr_r50_epoch_60.pth`` checkpoint (OpenPSG, ECCV 2022) and the way MoAI
runs it through mmdet 3.3.0. Every knob whose default is not the MoAI behaviour would break parity, so the
non-parity alternatives are opt-in and documented as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ...errors import ConfigError

#: Where the official weights live on the Hugging Face Hub (a file of the OpenPSG demo Space).
OFFICIAL_REPO_ID = "ECCV2022/PSG"
OFFICIAL_REPO_TYPE = "space"
OFFICIAL_FILENAME = "OpenPSG/checkpoints/epoch_60.pth"
#: SHA-256 of that file (the same hash as the OpenPSG model-zoo entry for PSGTR R-50, 60 epochs).
OFFICIAL_SHA256 = "1c4ddcbda74686568b7e6b8145f7f33030407e27e390c37c23206f95c51829ed"

#: COCO-panoptic classes 0..79 are things, 80..132 stuff.
NUM_THING_CLASSES = 80

#: mmdet's panoptic encoding: ``pan_results = segment_index * INSTANCE_OFFSET + class_id``.
INSTANCE_OFFSET = 1000

_MASK_DTYPES = ("bfloat16", "float32")
_RESIZE_BACKENDS = ("cv2", "torch")


@dataclass(frozen=True)
class PSGTRConfig:
    """Structure of the PSGTR network and the settings of its MoAI pre/post-processing.

    Architecture (must match the checkpoint):
        depth: ResNet depth of the backbone (torchvision layout, stride on the 3x3 conv); the official model is
            50, and 18/34 exist for tiny test models.
        num_classes: entity classes without background (133 COCO-panoptic classes; background is appended last).
        num_relations: predicates without the "no relation" column (56; that column is index 0 of the head).
        num_queries: learned triplet queries.
        embed_dim, num_heads, ffn_dim, num_encoder_layers, num_decoder_layers: the DETR transformer.
        pos_temperature, pos_eps: sine positional encoding (normalised, scale 2*pi, offset 0).
        norm_eps: LayerNorm / BatchNorm / GroupNorm epsilon.

    Pre-processing (mmdet ``Resize``/``Normalize``/``Pad`` as configured by MoAI):
        scale: (long side, short side) limits of the keep-ratio resize.
        size_divisor: padding multiple.
        mean, std: normalisation statistics (RGB order, 0-255 scale).
        swap_channels: reverse the channel order before normalising. mmdet assumes BGR input and swaps to RGB;
            MoAI hands it RGB arrays, so the network really sees BGR. ``True`` reproduces MoAI (and the
            numbers it gets); ``False`` feeds RGB as the model was trained, which changes the results.
        resize_backend: ``"cv2"`` reproduces mmcv's resize bit for bit (needs OpenCV); ``"torch"`` uses torch
            bilinear interpolation (no OpenCV, about one pixel in eight differs by one grey level).
        mask_padding: ``False`` (MoAI) attends to padded pixels like MoAI's patched mmcv does; ``True`` masks
            them as the original OpenPSG code did. Only matters when the resized image is not a multiple of
            ``size_divisor`` (MoAI's 490x490 frames are not padded).

    Post-processing (``PSGTrHead._get_bboxes_single`` as shipped with MoAI):
        max_per_img: (query, predicate) pairs kept by the top-k.
        mask_threshold: sigmoid threshold of the binary masks.
        entity_score_threshold, relation_score_threshold: the keep filter.
        dedup_iou_threshold: IoU above which duplicated triplets / thing instances are merged.
        mask_dtype: ``"bfloat16"`` reproduces MoAI's fp16 -> nearest resize -> bf16 chain (sigmoid, threshold and
            panoptic softmax in bf16); ``"float32"`` is the OpenPSG behaviour (changes borders and assignments).
        drop_class_index: 0-based class whose triplets the keep filter drops. The official filter compares
            1-based labels with ``num_classes - 1`` and so removes class 131 ('wall-other-merged') instead of
            background; 131 keeps that behaviour, ``None`` disables it.
    """

    depth: int = 50
    num_classes: int = 133
    num_relations: int = 56
    num_queries: int = 100
    embed_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    pos_temperature: float = 10000.0
    pos_eps: float = 1e-6
    norm_eps: float = 1e-5

    scale: tuple[int, int] = (1333, 800)
    size_divisor: int = 32
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    swap_channels: bool = True
    resize_backend: str = "cv2"
    mask_padding: bool = False

    max_per_img: int = 100
    mask_threshold: float = 0.85
    entity_score_threshold: float = 0.5
    relation_score_threshold: float = 0.3
    dedup_iou_threshold: float = 0.5
    mask_dtype: str = "bfloat16"
    drop_class_index: int | None = 131

    #: Queries pushed through a mask head at once (memory knob; ``None`` = all at once). Does not change results
    #: beyond float rounding.
    mask_head_chunk: int | None = 25

    def __post_init__(self) -> None:
        if self.depth not in (18, 34, 50, 101):
            raise ConfigError(
                f"PSGTR backbone depth must be 18, 34, 50 or 101 (the official model: 50); got {self.depth}"
            )
        if self.embed_dim < 128 or self.embed_dim % 128 or (self.embed_dim + self.num_heads) % 8:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) must be a multiple of 128 and embed_dim + num_heads "
                f"({self.embed_dim + self.num_heads}) a multiple of 8, so that every GroupNorm(8) of the mask head "
                "divides its channels"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.mask_dtype not in _MASK_DTYPES:
            raise ConfigError(f"mask_dtype must be one of {_MASK_DTYPES}; got {self.mask_dtype!r}")
        if self.resize_backend not in _RESIZE_BACKENDS:
            raise ConfigError(f"resize_backend must be one of {_RESIZE_BACKENDS}; got {self.resize_backend!r}")
        if self.max_per_img < 1 or self.max_per_img > self.num_queries * self.num_relations:
            raise ConfigError(
                f"max_per_img must be in 1..{self.num_queries * self.num_relations}; got {self.max_per_img}"
            )
        if self.mask_head_chunk is not None and self.mask_head_chunk < 1:
            raise ConfigError(f"mask_head_chunk must be a positive integer or None; got {self.mask_head_chunk}")
        if len(self.scale) != 2 or min(self.scale) < 1:
            raise ConfigError(f"scale must be (long side, short side) in pixels; got {self.scale}")
        if self.size_divisor < 1:
            raise ConfigError(f"size_divisor must be >= 1; got {self.size_divisor}")
        for name in ("mask_threshold", "entity_score_threshold", "relation_score_threshold", "dedup_iou_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1]; got {value}")

    @property
    def mask_head_dims(self) -> tuple[int, int, int, int, int]:
        """Channel widths of the mask head: input (embed + heads), then context/2, /4, /8, /16."""
        c = self.embed_dim
        return (c + self.num_heads, c // 2, c // 4, c // 8, c // 16)

    def replace(self, **changes: Any) -> PSGTRConfig:
        """A copy with ``changes`` applied (unknown names raise :class:`ConfigError`)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown PSGTR setting(s) {unknown}; known: {sorted(known)}")
        values = asdict(self)
        values.update(changes)
        for key in ("scale", "mean", "std"):
            values[key] = tuple(values[key])
        return PSGTRConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for cache keys and logs)."""
        return asdict(self)


__all__ = [
    "PSGTRConfig",
    "OFFICIAL_REPO_ID",
    "OFFICIAL_REPO_TYPE",
    "OFFICIAL_FILENAME",
    "OFFICIAL_SHA256",
    "INSTANCE_OFFSET",
    "NUM_THING_CLASSES",
]
