"""Cross-check the PSGTR port against mmdet's own modules, bit for bit, on this machine.

The golden fixtures in ``tests/fixtures/psgtr-golden`` were produced by the mmdet reference on another machine.
This script answers a different question: run here, with the same inputs and weights, does mmdet's code compute
the same numbers as the port? It feeds the port's backbone output (C5) of a golden image through

* mmcv's ``Conv2d`` (the input projection),
* mmdet's ``SinePositionalEncoding`` (with the padding mask built the way MoAI's head builds it),
* mmdet's ``DetrTransformerEncoder`` / ``DetrTransformerDecoder`` (mmcv ``MultiheadAttention`` and ``FFN`` inside),

loaded with the synthetic weights, and prints the largest absolute difference to the port for each stage, then
the difference of both to the golden head logits.

It needs mmdet next to moai-sdk, in a separate environment (mmdet is not a dependency of the SDK)::

    python -m venv /tmp/mmenv && . /tmp/mmenv/bin/activate
    pip install -e . && pip install "mmengine==0.10.7" && pip install "setuptools<70" wheel
    pip install --no-build-isolation "mmcv-lite==2.0.0rc4" && pip install --no-deps "mmdet==3.3.0"
    python tools/psgtr_mmdet_crosscheck.py [sq490|rect375x500]

mmdet's model package imports compiled mmcv ops that mmcv-lite lacks, so the two mmdet files are loaded by path.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

from moai_sdk.experts.scene_graph.checkpoint import load_into
from moai_sdk.experts.scene_graph.modeling import PSGTR, sine_position_encoding
from moai_sdk.experts.scene_graph.processing import preprocess_image
from moai_sdk.testing import synthetic_state_dict

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "psgtr-golden"


def load_mmdet_file(relative: str):
    import mmdet

    path = Path(mmdet.__path__[0]) / relative
    spec = importlib.util.spec_from_file_location(f"mmdet_by_path_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sub_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", default="sq490", choices=["sq490", "rect375x500"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmcv.cnn import Conv2d

    detr = load_mmdet_file("models/layers/transformer/detr_layers.py")
    positional = load_mmdet_file("models/layers/positional_encoding.py")

    with np.load(GOLDEN / f"psgtr_golden_{args.case}.npz") as data:
        case = {k: data[k] for k in data.files}
    net = PSGTR()
    load_into(net, synthetic_state_dict())
    net.eval()
    head = net.bbox_head
    state = head.state_dict()
    prepared = preprocess_image(torch.from_numpy(case["image"]).permute(2, 0, 1), net.config)

    attn = dict(embed_dims=256, num_heads=8, dropout=0.1, batch_first=True)
    ffn = dict(embed_dims=256, feedforward_channels=2048, ffn_drop=0.1, act_cfg=dict(type="ReLU", inplace=True))
    encoder = detr.DetrTransformerEncoder(num_layers=6, layer_cfg=dict(self_attn_cfg=dict(attn), ffn_cfg=dict(ffn)))
    decoder = detr.DetrTransformerDecoder(
        num_layers=6, layer_cfg=dict(self_attn_cfg=dict(attn), cross_attn_cfg=dict(attn), ffn_cfg=dict(ffn))
    )
    encoder.load_state_dict(sub_dict(state, "transformer.encoder."), strict=True)
    decoder.load_state_dict(sub_dict(state, "transformer.decoder."), strict=True)
    projection = Conv2d(2048, 256, kernel_size=1)
    projection.load_state_dict(sub_dict(state, "input_proj."), strict=True)
    encoding = positional.SinePositionalEncoding(num_feats=128, normalize=True)
    for module in (encoder, decoder, projection):
        module.eval()

    with torch.no_grad():
        c5 = net.backbone(prepared.pixel_values[None])[3]
        # the port
        src = head.input_proj(c5)
        b, c, h, w = src.shape
        no_padding = torch.zeros(b, h, w, dtype=torch.bool)
        pos = sine_position_encoding(no_padding, 128)
        hidden, _ = head.transformer(src, no_padding, head.query_embed.weight, pos)
        # mmdet, arranged the way MoAI's PSGTR head and transformer wrapper call it
        ref_src = projection(c5)
        img_h, img_w = prepared.img_shape
        masks = c5.new_ones((b, img_h, img_w))
        masks[:, :img_h, :img_w] = 0
        masks = torch.nn.functional.interpolate(masks[:, None].to(torch.float16), size=(h, w)).to(torch.bool)[:, 0]
        ref_pos = encoding(masks)
        x = ref_src.view(b, c, -1).permute(0, 2, 1)
        pos_seq = ref_pos.view(b, c, -1).permute(0, 2, 1)
        query_pos = head.query_embed.weight.unsqueeze(1).repeat(1, b, 1).permute(1, 0, 2)
        key_padding = masks.view(b, -1)
        memory = encoder(query=x, query_pos=pos_seq, key_padding_mask=key_padding)
        ref_hidden = decoder(
            query=torch.zeros_like(query_pos),
            key=memory,
            value=memory,
            key_pos=pos_seq,
            query_pos=query_pos,
            key_padding_mask=key_padding,
        )
        ours_logits = head.sub_cls_embed(hidden)[:, 0].numpy()
        ref_logits = head.sub_cls_embed(ref_hidden)[:, 0].numpy()

    print(f"case {args.case}, {args.threads} thread(s); largest |port - mmdet| here:")
    print(f"  input projection      {(src - ref_src).abs().max().item():.3g}")
    print(f"  positional encoding   {(pos - ref_pos).abs().max().item():.3g}")
    print(f"  decoder outputs       {(hidden - ref_hidden).abs().max().item():.3g}")
    print("largest |x - golden| of the subject class logits, decoder layer 1 .. 6:")
    for label, logits in (("port ", ours_logits), ("mmdet", ref_logits)):
        diffs = [np.abs(logits[i] - case["sub_cls"][i]).max() for i in range(len(logits))]
        print(f"  {label}  " + "  ".join(f"{d:.2e}" for d in diffs))


if __name__ == "__main__":
    main()
