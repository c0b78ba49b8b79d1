"""Full-size models with random weights, built without downloading anything.

* :func:`build_random_moai` -- MoAI-7B shapes (InternLM2-7B decoder, CLIP ViT-L/14 at 490, mixer, compressor)
  built on the meta device and filled with random values directly on the target device, optionally quantized
  the way :func:`moai_sdk.modeling.load_moai` quantizes (``"nf4"``, ``"int8"``, ``"official"``).
* :class:`RandomMask2FormerExpert` -- the ``mask2former`` expert with the Swin-B COCO-panoptic architecture.
* :class:`RandomOwlv2Expert` -- the ``owlv2`` expert with the OWLv2 B/16 (960 px) architecture and a CLIP-style
  BPE tokenizer trained on the official query list (so every query fits OWLv2's 16 text positions).
* :func:`synthetic_psgtr_file` -- PSGTR's synthetic weights as a safetensors file for the ``psgtr`` expert.

Network speed does not depend on the weights' values, only on shapes and dtypes. Post-processing and the
LLM's input length do depend on how many segments and boxes pass the thresholds, and random heads would
give none (Mask2Former: flat class distributions) or thousands (OWLv2: most of 3600 boxes above 0.1, a
verbalization of tens of thousands of tokens). So after building, each random expert calibrates its class
head on a fixed noise frame -- Mask2Former the scales of its class and mask logits, OWLv2 a constant logit
shift and scale -- to let about as many segments / boxes through as real weights do on a natural image
(:data:`SEGMENT_TARGET`, :data:`BOX_TARGET`, :data:`STRONG_BOX_TARGET`). The outputs remain meaningless;
the benchmark reports their counts and the resulting verbalization lengths.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moai_sdk.experts.detection import Owlv2Expert, official_queries
from moai_sdk.experts.segmentation import Mask2FormerExpert
from moai_sdk.modeling import MoAIConfig, MoAIForCausalLM
from moai_sdk.modeling.loading import resolve_device, resolve_dtype
from moai_sdk.modeling.quantization import (
    QUANTIZATION_MODES,
    quantize_linear_weight,
    quantized_module_names,
    replace_linears_for_quantization,
)
from moai_sdk.results import load_vocab

logger = logging.getLogger(__name__)

#: Standard deviation of the random weights (InternLM2's and CLIP's initializer range).
INIT_STD = 0.02
#: Queries of the random Mask2Former whose class probability passes 0.5 on the calibration frame.
SEGMENT_TARGET = 12
#: Boxes of the random OWLv2 scoring above 0.1 on the calibration frame ...
BOX_TARGET = 25
#: ... and how many of them reach 0.5 (the verbalization lists those).
STRONG_BOX_TARGET = 8


# ----------------------------------------------------------------------------------------------------------
# MoAI-7B
# ----------------------------------------------------------------------------------------------------------


def moai_7b_config(**overrides: Any) -> MoAIConfig:
    """The MoAI-7B structure: the :class:`MoAIConfig` / ``MoAIStructure`` defaults (``overrides`` for tests)."""
    config = MoAIConfig(**overrides)
    return config.validate()


def _fill(module: nn.Module, name: str, shape: torch.Size, value: str, dtype, device, generator) -> None:
    if value == "ones":
        t = torch.ones(shape, dtype=dtype, device=device)
    elif value == "zeros":
        t = torch.zeros(shape, dtype=dtype, device=device)
    else:
        std = 1.0 if value == "randn" else INIT_STD
        t = torch.randn(shape, dtype=dtype, device=device, generator=generator).mul_(std)
    module._parameters[name] = nn.Parameter(t, requires_grad=False)


def _init_kind(module: nn.Module, name: str) -> str:
    """How a parameter is filled: norms 1 / biases 0 / resampler latents N(0, 1) / everything else N(0, 0.02)."""
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
        return "ones" if name == "weight" else "zeros"
    if name == "bias":
        return "zeros"
    if name == "latents":
        return "randn"
    return "small"


def build_random_moai(
    config: MoAIConfig | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    seed: int = 0,
) -> MoAIForCausalLM:
    """A :class:`MoAIForCausalLM` of ``config``'s shapes (default MoAI-7B) with random weights on ``device``.

    The model is built on the meta device; every tensor is then created once, on the device, in ``dtype``
    (quantized linears: drawn in 16 bit and quantized one at a time), so building a 7B model needs no more
    memory than the finished model plus one weight. ``quantization`` picks the same linears as the loader.
    """
    config = config or moai_7b_config()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_MODES)}, got {quantization!r}")
    with torch.device("meta"):
        model = MoAIForCausalLM(config)
    quantized = replace_linears_for_quantization(model, quantization, compute_dtype=dt) if quantization else set()
    generator = torch.Generator(device=dev).manual_seed(seed)
    weight_dtype = dt if dt != torch.float32 else torch.float16
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if module_name in quantized and name == "weight":
                shape = (module.out_features, module.in_features)
                w = torch.randn(shape, dtype=weight_dtype, device=dev, generator=generator).mul_(INIT_STD)
                quantize_linear_weight(module, w, dt, dev)
                del w
                continue
            _fill(module, name, param.shape, _init_kind(module, name), dt, dev, generator)
    model.reset_buffers()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise RuntimeError(f"tensors left on the meta device: {leftovers[:5]}")
    model.eval()
    model.requires_grad_(False)
    model.load_info = {
        "source": "random",
        "seed": seed,
        "dtype": str(dt).replace("torch.", ""),
        "device": str(dev),
        "quantization": quantization,
        "quantized_modules": sorted(quantized_module_names(model)),
    }
    return model


# ----------------------------------------------------------------------------------------------------------
# experts
# ----------------------------------------------------------------------------------------------------------


def _image_processor_class(module: str, pil_name: str, fast_name: str, backend: str) -> type:
    """The PIL (reference) or torchvision image processor class of this transformers version."""
    import importlib
    import importlib.util

    import transformers

    if backend == "pil" and importlib.util.find_spec(module) is not None:
        return getattr(importlib.import_module(module), pil_name)
    return getattr(transformers, fast_name)


def mask2former_swin_b_config():
    """``facebook/mask2former-swin-base-coco-panoptic``'s architecture: Swin-B (embed 128, depths 2-2-18-2,
    heads 4-8-16-32, window 12, 384 px), 100 queries, 6 encoder / 10 decoder layers of width 256, 133 labels."""
    import transformers as tf

    names = list(load_vocab("COCO_PANOPTIC_CLASSES"))
    backbone = tf.SwinConfig(
        image_size=384,
        patch_size=4,
        embed_dim=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        window_size=12,
        drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return tf.Mask2FormerConfig(
        backbone_config=backbone,
        num_queries=100,
        hidden_dim=256,
        feature_size=256,
        mask_feature_size=256,
        encoder_layers=6,
        decoder_layers=10,
        num_attention_heads=8,
        dim_feedforward=2048,
        encoder_feedforward_dim=1024,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )


def _build_on(device: torch.device, dtype: torch.dtype, factory, seed: int) -> nn.Module:
    cuda_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)
        with torch.device(device):
            model = factory()
    # some modules create parameters with legacy constructors that ignore the device context
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def calibration_frame(size: int = 490, seed: int = 0) -> torch.Tensor:
    """A fixed uint8 [3, size, size] frame: smooth noise (blurred random blocks), not a natural image."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand((1, 3, size // 35, size // 35), generator=g)
    frame = torch.nn.functional.interpolate(blocks, size=(size, size), mode="bilinear", align_corners=False)
    return (frame[0] * 255).round().to(torch.uint8)


def _capture_input(module: nn.Module, run) -> tuple:
    """The positional inputs of the last call of ``module`` while ``run()`` executes."""
    seen: list[tuple] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a for a in args)))
    try:
        with torch.inference_mode():
            run()
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called during calibration")
    return seen[-1]


def _bisect(count, target: int, low: float, high: float, steps: int = 30) -> float:
    """A value v in [low, high] with count(v) close to ``target`` (count must increase with v)."""
    for _ in range(steps):
        mid = (low + high) / 2
        if count(mid) < target:
            low = mid
        else:
            high = mid
    return high


def calibrate_mask2former(
    model: nn.Module,
    processor: Any,
    threshold: float,
    mask_threshold: float,
    overlap: float,
    target: int = SEGMENT_TARGET,
) -> tuple[float, float]:
    """Scale a random Mask2Former's class logits and mask logits so that about ``target`` segments come out of
    the panoptic post-processing on :func:`calibration_frame`.

    The class scale s is chosen so that about ``target`` queries are confident enough to own pixels (the
    post-processing weighs mask probabilities by the class score before comparing them with
    ``mask_threshold``, so a segment needs a score above it); then the mask scale t (a power of two) whose
    post-processed segment count is closest to that. Both are exact rescalings of the
    logits: s multiplies the class predictor, t the last linear of the mask embedder (the decoder's masked
    attention only reads the sign of the mask logits, so it is unchanged). Returns (s, t).
    """
    from types import SimpleNamespace

    param = next(model.parameters())
    frame = calibration_frame()
    inputs = processor(images=[frame], return_tensors="pt")
    with torch.inference_mode():
        out = model(pixel_values=inputs["pixel_values"].to(param.device, param.dtype))
    class_logits = out.class_queries_logits.float()
    mask_logits = out.masks_queries_logits.float()
    no_object = class_logits.shape[-1] - 1

    confident = max(threshold, (1.0 + mask_threshold) / 2)

    def passing(scale: float) -> int:
        scores, labels = (class_logits * scale).softmax(-1).max(-1)
        return int(((scores > confident) & (labels != no_object)).sum())

    def segments(s: float, t: float) -> int:
        fake = SimpleNamespace(class_queries_logits=class_logits * s, masks_queries_logits=mask_logits * t)
        found = processor.post_process_panoptic_segmentation(
            fake,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap,
            label_ids_to_fuse=set(),
            target_sizes=[tuple(frame.shape[-2:])],
        )
        return len(found[0]["segments_info"])

    with torch.inference_mode():
        s = _bisect(passing, target, 1.0, 1000.0)
        wanted = passing(s)
        t = min((2.0**k for k in range(11)), key=lambda t: (abs(segments(s, t) - wanted), t))
        head = model.class_predictor
        head.weight.mul_(s)
        head.bias.mul_(s)
        last = [m for m in model.modules() if isinstance(m, nn.Linear) and m in set(_mask_embedder(model).modules())][
            -1
        ]
        last.weight.mul_(t)
        if last.bias is not None:
            last.bias.mul_(t)
    return s, t


def _mask_embedder(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("mask_embedder"):
            return module
    raise RuntimeError("no mask_embedder in this Mask2Former")


def calibrate_owlv2(
    model: nn.Module,
    processor: Any,
    queries,
    threshold: float,
    target: int = BOX_TARGET,
    strong: int = STRONG_BOX_TARGET,
) -> tuple[float, float]:
    """Calibrate a random OWLv2's class head so that on :func:`calibration_frame` about ``target`` boxes
    score above ``threshold`` and about ``strong`` of them reach 0.5 (what the verbalization lists).

    The head computes ``(cosine similarity + shift) * (elu(s) + 1)`` per box and query, with ``shift`` and
    ``s`` linear in the box's features. With random weights those two spread so widely that counts do not
    carry over from one image to another (where the scale is ~0 every logit is ~0: score 0.5, above any
    threshold). So both become constants (their linears' weights zeroed): with m_k the k-th best box's best
    query similarity, shift = -m_strong puts that box at 0.5 and the scale k = logit(threshold) /
    (m_target - m_strong) puts box ``target`` at the threshold. Scores then rank boxes by their best query
    similarity, whose distribution is much the same on any image. Returns (shift, scale).
    """
    param = next(model.parameters())
    inputs = processor(text=[list(queries)], images=[calibration_frame()], return_tensors="pt")
    inputs = {
        k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)) for k, v in inputs.items()
    }
    head = model.class_head
    image_feats, query_embeds, query_mask = _capture_input(head, lambda: model(**inputs))
    with torch.inference_mode():
        for linear in (head.logit_shift, head.logit_scale):
            linear.weight.zero_()
            linear.bias.zero_()  # shift 0, scale elu(0) + 1 = 1: the logits are the similarities
        best = head(image_feats, query_embeds, query_mask)[0].float().max(-1).values.flatten()
        ranked = best.sort(descending=True).values
        m_strong, m_target = ranked[strong - 1].item(), ranked[target - 1].item()
        scale = torch.logit(torch.tensor(threshold)).item() / min(m_target - m_strong, -1e-4)
        head.logit_shift.bias.fill_(-m_strong)
        head.logit_scale.bias.fill_(scale - 1.0)  # elu(x) + 1 = x + 1 for x > 0
    return -m_strong, scale


class RandomMask2FormerExpert(Mask2FormerExpert):
    """The ``mask2former`` expert (same settings, forward and post-processing) on a random Swin-B model whose
    class head is calibrated (:func:`calibrate_mask2former`)."""

    default_model_id = "random-weights:mask2former-swin-base-coco-panoptic"

    def _load(self) -> None:
        import transformers as tf

        config = mask2former_swin_b_config()
        cls = _image_processor_class(
            "transformers.models.mask2former.image_processing_pil_mask2former",
            "Mask2FormerImageProcessorPil",
            "Mask2FormerImageProcessor",
            self.settings["image_backend"],
        )
        self.processor = cls(
            size={"shortest_edge": 384, "longest_edge": 1333},
            size_divisor=32,
            ignore_index=255,
            do_reduce_labels=False,
            num_labels=len(config.id2label),
        )
        self.model = _build_on(
            self.device, self.dtype or torch.float32, lambda: tf.Mask2FormerForUniversalSegmentation(config), seed=1
        )
        st = self.settings
        self.calibration = calibrate_mask2former(
            self.model, self.processor, st["threshold"], st["mask_threshold"], st["overlap_mask_area_threshold"]
        )


def owlv2_query_tokenizer(max_length: int = 16):
    """A CLIP tokenizer (CLIP's normaliser and pre-tokenizer, BPE with ``</w>`` word ends) whose merges were
    learnt from the official OWLv2 queries, so each query is a few whole-word tokens and fits ``max_length``
    positions like with the real tokenizer. Special tokens come last (the highest ids), as in CLIP."""
    import transformers as tf
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    queries = list(official_queries())
    alphabet = sorted(ByteLevel.alphabet())
    base_vocab = {ch: i for i, ch in enumerate(alphabet)}
    base_vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    reference = tf.CLIPTokenizer(vocab=dict(base_vocab, **{"<|startoftext|>": 512, "<|endoftext|>": 513}), merges=[])
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=49406, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(queries, trainer)
    learnt = json.loads(bpe.to_str())["model"]
    vocab = dict(base_vocab)
    for token in learnt["vocab"]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    tokenizer = tf.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=max_length)
    longest = max(len(tokenizer(q)["input_ids"]) for q in queries)
    if longest > max_length:
        raise RuntimeError(f"a query needs {longest} tokens, more than OWLv2's {max_length}")
    return tokenizer


def owlv2_base16_config(tokenizer):
    """``google/owlv2-base-patch16-ensemble``'s architecture: ViT-B/16 at 960 px (3600 patches, width 768,
    12 layers), text transformer width 512 with 12 layers and 16 positions, projection 512."""
    import transformers as tf

    return tf.Owlv2Config(
        text_config=dict(
            vocab_size=49408,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=960,
            patch_size=16,
        ),
        projection_dim=512,
    )


class RandomOwlv2Expert(Owlv2Expert):
    """The ``owlv2`` expert (same settings, query caching, forward and post-processing) on a random B/16 whose
    logit shift is calibrated (:func:`calibrate_owlv2`)."""

    default_model_id = "random-weights:owlv2-base-patch16-ensemble"

    def _load(self) -> None:
        import transformers as tf

        tokenizer = owlv2_query_tokenizer()
        cls = _image_processor_class(
            "transformers.models.owlv2.image_processing_pil_owlv2",
            "Owlv2ImageProcessorPil",
            "Owlv2ImageProcessor",
            self.settings["image_backend"],
        )
        image_processor = cls(size={"height": 960, "width": 960})
        self.processor = tf.Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
        config = owlv2_base16_config(tokenizer)
        self.model = _build_on(
            self.device, self.dtype or torch.float32, lambda: tf.Owlv2ForObjectDetection(config), seed=2
        )
        self._query_embeds = self._query_mask = None
        self.calibration = calibrate_owlv2(self.model, self.processor, self.queries, self.settings["threshold"])


def synthetic_psgtr_file(directory: str | Path) -> Path:
    """PSGTR's synthetic (seeded, meaningless) weights saved as ``psgtr-synthetic.safetensors`` in ``directory``."""
    from safetensors.torch import save_file

    from moai_sdk.testing import synthetic_state_dict

    path = Path(directory) / "psgtr-synthetic.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in synthetic_state_dict().items()}, str(path))
    return path


__all__ = [
    "INIT_STD",
    "SEGMENT_TARGET",
    "BOX_TARGET",
    "STRONG_BOX_TARGET",
    "calibration_frame",
    "calibrate_mask2former",
    "calibrate_owlv2",
    "moai_7b_config",
    "build_random_moai",
    "mask2former_swin_b_config",
    "owlv2_base16_config",
    "owlv2_query_tokenizer",
    "RandomMask2FormerExpert",
    "RandomOwlv2Expert",
    "synthetic_psgtr_file",
]
