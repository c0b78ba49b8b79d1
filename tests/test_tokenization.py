"""MoAITokenizer against the moai-tiny oracle fixture and ids produced by the official tokenizer class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moai_sdk.errors import CheckpointError, ConfigError, InputError
from moai_sdk.prompts import SYSTEM_PROMPT, TEMPLATES, build_prompt, user_turn
from moai_sdk.tokenization import MoAITokenizer, resolve_model_file

FIXTURE = Path(__file__).parent / "fixtures" / "moai-tiny"
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]
CASE_NAMES = [c["name"] for c in CASES]
TEMPLATE_OF = {"demo": "demo", "eval": "chat"}

# Ids the official MoAI tokenizer class (transformers 4.39.3, `<image>` added as a special token, left
# padding) gives for these strings with this fixture's tokenizer.model: special strings written in the text
# are split out, every stretch between them gets its own dummy-prefix space, BOS first, no EOS.
ENCODE_ORACLE = [
    ("", [1]),
    ("   ", [1, 930, 930, 930, 930]),
    ("a<image>b", [1, 326, 1000, 268]),
    (" <image> ", [1, 930, 930, 1000, 930, 930]),
    ("<image><image>", [1, 1000, 1000]),
    ("x</s>y<s> z<unk>", [1, 930, 960, 2, 430, 1, 930, 676, 0]),
    ("[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n", [1, 930, 8, 555, 19, 987, 933, 7, 19]),
    (
        "[UNUSED_TOKEN_1] [UNUSED_TOKEN_146][UNUSED_TOKEN_146]",
        [1, 363, 984, 981, 984, 958, 985, 978, 104, 956, 988, 996, 985, 981, 104, 967, 966, 930, 8, 8],
    ),
    (
        "Caf\u00e9 \u6f22\u5b57 \U0001f600\t\ttab",
        [1, 439, 934, 950, 204, 178, 930, 239, 197, 171, 238, 182, 160, 930, 249, 168, 161, 137, 18, 18, 932, 934, 943],
    ),
    ("<im age> <image", [1, 930, 69, 933, 949, 326, 288, 71, 930, 69, 933, 299]),
    ("0.50, -0.00 (#12)", [1, 930, 952, 947, 975, 952, 953, 930, 994, 952, 947, 952, 952, 930, 49, 44, 967, 969, 50]),
    ("\u2581 lone \u2581", [1, 930, 930, 354, 600, 930, 930]),
    ("line1\n\nline2  ", [1, 354, 473, 967, 19, 19, 940, 473, 969, 930, 930]),
]

# decode(ids, skip_special_tokens=True) of the official class: it drops BOS/EOS/pad/unk/<image> but prints
# the [UNUSED_TOKEN_*] chat markers (our default drops them; keep_chat_markers=True reproduces this).
DECODE_ORACLE = [
    (
        [1, 531, 422, 1000, 930, 8, 555, 19, 7, 2, 0, 300],
        "AI assistant [UNUSED_TOKEN_146]user\n[UNUSED_TOKEN_145] image",
    ),
    ([259, 330, 270, 100, 2, 2], "\ufffd th s["),
    ([930, 930, 551, 3, 4, 959], "  USER[UNUSED_TOKEN_141][UNUSED_TOKEN_142]:"),
    ([9, 10, 300, 1000, 1000, 947], "\x00\x01 image."),
]


@pytest.fixture(scope="module")
def tok() -> MoAITokenizer:
    return MoAITokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "cases.safetensors"))


def _case(name: str) -> dict:
    return next(c for c in CASES if c["name"] == name)


# ------------------------------------------------------------------------------------------------ ids


def test_special_ids_and_sizes(tok: MoAITokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.image_token_id == 1000
    assert tok.vocab_size == 1000
    assert len(tok) == 1001
    assert tok.chat_marker_ids == frozenset(range(3, 9))
    assert tok.convert_ids_to_tokens([1, 2, 8, 1000]) == ["<s>", "</s>", "[UNUSED_TOKEN_146]", "<image>"]
    assert tok.convert_tokens_to_ids(["<image>", "[UNUSED_TOKEN_145]", "\u2581USER"]) == [1000, 7, 551]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_full_prompt_ids_match_fixture(tok: MoAITokenizer, ref: dict, name: str) -> None:
    case = _case(name)
    full = build_prompt(case["prompt"][0], TEMPLATE_OF[case["template"]])
    assert full == case["full_prompt_string"][0]
    assert tok.encode(full) == case["tokens"]["full_prompt_ids"][0]
    assert ["<s>"] + tok.tokenize(full) == case["tokens"]["full_prompt_pieces"][0]
    batch = tok(case["full_prompt_string"])
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert torch.equal(batch["input_ids"], ref[f"{name}.input_ids"])
    assert torch.equal(batch["attention_mask"], ref[f"{name}.attention_mask"])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_system_user_and_verbalization_ids_match_fixture(tok: MoAITokenizer, name: str) -> None:
    case = _case(name)
    tokens = case["tokens"]
    system_ids = tok.encode(SYSTEM_PROMPT)
    assert system_ids == tokens["system_prompt_ids"]
    assert len(system_ids) == 19 and system_ids[-2] == 930  # the lone dummy-prefix piece before <image>
    user = user_turn(case["prompt"][0], TEMPLATE_OF[case["template"]])
    assert tok.encode(user, add_bos=False) == tokens["user_part_ids_no_special"][0]
    # full = system + user: the added <image> token splits the text, so the parts tokenize independently.
    assert tokens["full_prompt_ids"][0] == system_ids + tok.encode(user, add_bos=False)
    aux = [v["aux"] for v in case["verbalization"]]
    assert tok(aux)["input_ids"].tolist() == tokens["verbalization_ids"]
    assert [["<s>"] + tok.tokenize(a) for a in aux] == tokens["verbalization_pieces"]


@pytest.mark.parametrize("text,expected", ENCODE_ORACLE)
def test_ids_equal_official_tokenizer(tok: MoAITokenizer, text: str, expected: list[int]) -> None:
    assert tok.encode(text) == expected
    assert tok.encode(text, add_bos=False) == expected[1:]


def test_special_tokens_are_atomic(tok: MoAITokenizer) -> None:
    for marker, tid in (("[UNUSED_TOKEN_146]", 8), ("[UNUSED_TOKEN_145]", 7)):
        ids = tok.encode(f"ab{marker}cd", add_bos=False)
        assert ids.count(tid) == 1
        assert tok.tokenize(f"ab{marker}cd").count(marker) == 1
    ids = tok.encode("left<image>right", add_bos=False)
    assert ids.count(1000) == 1
    pos = ids.index(1000)
    # each side is encoded on its own, with its own dummy prefix
    assert ids[:pos] == tok.encode("left", add_bos=False)
    assert ids[pos + 1 :] == tok.encode("right", add_bos=False)
    assert tok.tokenize("right")[0].startswith("\u2581")
    # a partial or differently-spelled placeholder is plain text
    assert 1000 not in tok.encode("<Image> <image <image >")


def test_batch_left_padding(tok: MoAITokenizer) -> None:
    texts = ["short", build_prompt("Describe this image in detail.", "demo"), ""]
    out = tok(texts)
    singles = [tok.encode(t) for t in texts]
    width = max(map(len, singles))
    assert out["input_ids"].shape == (3, width)
    for row, ids in enumerate(singles):
        pad = width - len(ids)
        assert out["input_ids"][row, pad:].tolist() == ids
        assert out["input_ids"][row, :pad].tolist() == [2] * pad
        assert out["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
    no_bos = tok(["a", "b"], add_bos=False)
    assert no_bos["input_ids"].tolist() == [[326], [268]]


def test_padding_false_requires_equal_lengths(tok: MoAITokenizer) -> None:
    out = tok(["a", "b"], padding=False)
    assert out["input_ids"].tolist() == [[1, 326], [1, 268]]
    with pytest.raises(InputError, match="padding=True"):
        tok(["a", "a much longer text"], padding=False)


def test_bad_inputs(tok: MoAITokenizer) -> None:
    with pytest.raises(InputError):
        tok([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(InputError):
        tok.encode(3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        tok([])
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([1, 5000])
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([-7])
    with pytest.raises(InputError, match="1-D"):
        tok.decode(torch.ones(2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name", CASE_NAMES)
def test_decode_generated_tokens_matches_fixture(tok: MoAITokenizer, ref: dict, name: str) -> None:
    new_tokens = ref[f"{name}.new_tokens"]
    expected = _case(name)["tokens"]["decoded_new_tokens_skip_special"]
    assert tok.batch_decode(new_tokens) == expected
    # -100 (the official pad value of finished rows) is dropped
    padded = torch.cat([new_tokens, torch.full((new_tokens.shape[0], 3), -100)], dim=1)
    assert tok.batch_decode(padded) == expected
    assert tok.decode(new_tokens[0].numpy()) == expected[0]


@pytest.mark.parametrize("ids,expected", DECODE_ORACLE)
def test_decode_equals_official_except_chat_markers(tok: MoAITokenizer, ids: list[int], expected: str) -> None:
    assert tok.decode(ids, keep_chat_markers=True) == expected
    assert tok.decode(ids) == expected.replace("[UNUSED_TOKEN_145]", "").replace("[UNUSED_TOKEN_146]", "").replace(
        "[UNUSED_TOKEN_141]", ""
    ).replace("[UNUSED_TOKEN_142]", "")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_decode_round_trip(tok: MoAITokenizer, name: str) -> None:
    full = _case(name)["full_prompt_string"][0]
    ids = tok.encode(full)
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + full
    skipped = tok.decode(ids)
    assert "<image>" not in skipped and "<s>" not in skipped and "[UNUSED" not in skipped
    assert skipped.startswith("AI assistant should give helpful")
    for text, _ in ENCODE_ORACLE:
        if "<unk>" not in text and "\u2581" not in text:  # sentencepiece maps a literal ▁ to a space
            assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text


# ------------------------------------------------------------------------------------------------ loading


def test_loading_without_tokenizer_config_gives_same_ids(tmp_path: Path, tok: MoAITokenizer) -> None:
    shutil.copy(FIXTURE / "tokenizer.model", tmp_path / "tokenizer.model")
    bare = MoAITokenizer.from_pretrained(tmp_path)
    full = CASES[1]["full_prompt_string"][0]
    assert bare.encode(full) == tok.encode(full)
    assert bare.image_token_id == 1000


def test_tokenizer_config_is_honoured(tmp_path: Path) -> None:
    shutil.copy(FIXTURE / "tokenizer.model", tmp_path / "tokenizer.model")
    cfg = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    cfg.update(add_eos_token=True, add_bos_token=False, padding_side="right", bos_token={"content": "<s>"})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = MoAITokenizer.from_pretrained(tmp_path)
    assert t.encode("a") == [326, 2]
    # padding stays on the left whatever the config says (the official loader forces it)
    assert t(["a", "a a"])["attention_mask"][0].tolist()[0] == 0

    cfg.update(add_eos_token=False, added_tokens_decoder={"1000": {"content": "<image>", "special": True}})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert MoAITokenizer.from_pretrained(tmp_path).image_token_id == 1000
    cfg["added_tokens_decoder"] = {"1234": {"content": "<image>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="1234"):
        MoAITokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        MoAITokenizer.from_pretrained(tmp_path)


def test_bad_pad_token_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pad_token"):
        MoAITokenizer(FIXTURE / "tokenizer.model", pad_token="<pad>")


def test_missing_files_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        MoAITokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        MoAITokenizer.from_pretrained(tmp_path / "no" / "such" / "dir")
    with pytest.raises(CheckpointError, match="is a file"):
        MoAITokenizer.from_pretrained(FIXTURE / "config.json")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="sentencepiece"):
        MoAITokenizer.from_pretrained(tmp_path)


def test_hub_download_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a local cache in the Hugging Face Hub layout (see tests/test_hub.py): the real hf_hub_download reads it
    from test_hub import add_file

    cache = tmp_path / "hub"
    main, v1 = "1" * 40, "2" * 40
    spm = (FIXTURE / "tokenizer.model").read_bytes()
    add_file(cache, "BK-Lee/MoAI-7B", main, "tokenizer.model", spm, refs=("main",))  # no tokenizer_config.json
    add_file(cache, "BK-Lee/MoAI-7B", v1, "tokenizer.model", spm, refs=("v1",))
    add_file(cache, "BK-Lee/MoAI-7B", v1, "tokenizer_config.json", b'{"add_bos_token": false}')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    t = MoAITokenizer.from_pretrained("BK-Lee/MoAI-7B", revision="main", cache_dir=cache, token="hf_x")
    assert t.encode("a<image>") == [1, 326, 1000]  # the class defaults where the snapshot has no config
    t = MoAITokenizer.from_pretrained("BK-Lee/MoAI-7B", revision="v1", cache_dir=cache, local_files_only=True)
    assert t.encode("a<image>") == [326, 1000]  # the revision picks the snapshot and its tokenizer_config.json
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        MoAITokenizer.from_pretrained("BK-Lee/MoAI-7B", cache_dir=tmp_path / "empty")
    assert resolve_model_file("BK-Lee/MoAI-7B", "tokenizer_config.json", required=False, cache_dir=cache) is None
    found = resolve_model_file("BK-Lee/MoAI-7B", "tokenizer_config.json", cache_dir=cache, revision="v1")
    assert found is not None and found.read_bytes() == b'{"add_bos_token": false}'


def test_decode_accepts_numpy_and_tensors(tok: MoAITokenizer) -> None:
    ids = tok.encode("ASSISTANT: yes")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == tok.decode(ids) == "ASSISTANT: yes"
    assert TEMPLATES["demo"].endswith("ASSISTANT:")
