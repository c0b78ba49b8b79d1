"""The CLIP tower written in moai_sdk equals transformers' CLIPVisionModel bit for bit, under the same names.

Both run the same torch operations in the same order on the same machine, so the comparison is exact
(``torch.equal``), in float32 and in bfloat16, for the last layer and for an earlier ``vision_select_layer``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moai_sdk.modeling.vision import CLIPVisionModel

CONFIG = {
    "hidden_size": 40,
    "intermediate_size": 72,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 70,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _transformers_model(dtype: torch.dtype):
    from transformers import CLIPVisionConfig
    from transformers import CLIPVisionModel as HFCLIPVisionModel

    cfg = CLIPVisionConfig(**CONFIG)
    cfg._attn_implementation = "sdpa"
    model = HFCLIPVisionModel(cfg).eval().to(dtype)
    return getattr(model, "vision_model", model)  # transformers < 5 wraps the parts in `.vision_model`


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select_layer", [-1, -2, 1])
def test_same_names_same_outputs_as_transformers(dtype, select_layer):
    reference = _transformers_model(dtype)
    ours = CLIPVisionModel(CONFIG).eval().to(dtype)
    ref_names = [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == ref_names  # same order: tiny weights fill params in order
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and [k for k in unexpected if not k.endswith("position_ids")] == []
    pixels = torch.randn(2, 3, 70, 70, generator=g)
    with torch.no_grad():
        h = reference.pre_layrnorm(reference.embeddings(pixels.to(dtype)))
        states = [h]
        for layer in reference.encoder.layers:  # the hidden states transformers returns: input, then each layer
            out = layer(states[-1], None)
            states.append(out[0] if isinstance(out, tuple) else out)
        expected = states[select_layer]
        got = ours.encoder(ours.pre_layrnorm(ours.embeddings(pixels.to(dtype))), select_layer)
    assert got.dtype == dtype and torch.equal(got, expected)
    if select_layer == -1:  # and transformers' own forward (embeddings, pre-LN, encoder) gives the same
        with torch.no_grad():
            assert torch.equal(reference(pixel_values=pixels.to(dtype)).last_hidden_state, got)


def test_building_and_loading_the_tiny_model_imports_no_transformers(tmp_path):
    """Nor torchao, torchvision, torch._dynamo or sympy (meta-device construction stays off their paths)."""
    from moai_sdk.testing import build_tiny_moai

    folder = build_tiny_moai(tmp_path / "moai")
    code = (
        "import sys\n"
        "from moai_sdk import MoAIForCausalLM\n"
        f"MoAIForCausalLM.from_pretrained({str(folder)!r})\n"
        "print(sorted(set(sys.modules) & {'transformers', 'torchao', 'torchvision', 'torch._dynamo', 'sympy'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
