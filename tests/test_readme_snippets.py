"""The README's lower-level snippet, run on the tiny oracle checkpoint (keeps the documentation true)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import TINY


def test_lower_level_snippet_runs(tiny_model):
    from moai_sdk import MoAIProcessor, PerceptionResult, verbalize

    model = tiny_model
    processor = MoAIProcessor.from_pretrained(TINY)
    image = Image.open(TINY / "a_demo_full.image0.png")
    ids = np.zeros((490, 490), dtype=np.int32)
    perception = PerceptionResult(image_width=490, image_height=490, panoptic_ids=ids)
    inputs = processor(
        image, "Describe the image.", aux_texts=verbalize(perception), panoptic_maps=perception, template="chat"
    )
    out = model.generate(**inputs.to(model.device), max_new_tokens=4, num_beams=3)
    text = processor.decode(out[0, inputs.input_ids.shape[1] :])
    assert verbalize(perception) == "   "  # nothing found: the official three spaces
    assert out.shape[1] <= inputs.input_ids.shape[1] + 4 and isinstance(text, str)
