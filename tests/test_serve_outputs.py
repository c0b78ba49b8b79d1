"""``moai serve --tiny`` outputs with the real ``openai`` client: structured answers (OpenAI's response_format and
vLLM's structured_outputs) that parse and validate even from random weights, log-probabilities (agreeing with an
in-process forward pass, streamed equal to non-streamed), n choices, GET /v1/models/{id}, unknown fields ignored
with one warning, int64 seeds, and the 400s that stay."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import jsonschema
import pytest
import torch
import torch.nn.functional as F

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moai_sdk.testing import demo_image, tiny_pipeline  # noqa: E402
from test_serve import MODEL, Server, no_network  # noqa: E402,F401  (the loopback-only guard)

TOL = 1e-4  # the same float32 logits' log-softmax in the server process and here (same kernels, same machine)


def _image_url() -> str:
    buf = io.BytesIO()
    demo_image("MOAI", (320, 240)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_URL = _image_url()


def _messages(prompt: str, image: object = None) -> list[dict]:
    part = {"type": "image_url", "image_url": {"url": IMAGE_URL}} if image is None else image
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, part]}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-outputs") / "tiny"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return tiny_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def server(pipe, tiny_dir, tmp_path_factory):
    srv = Server(tiny_dir, tmp_path_factory.mktemp("logs") / "outputs.log", "--max-batch-size", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _ask(client, prompt: str, **options):
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=_messages(prompt), **options)


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "scene": {
                "type": "object",
                "properties": {"place": {"enum": ["street", "room", "beach"]}, "night": {"type": "boolean"}},
                "required": ["place", "night"],
                "additionalProperties": False,
            },
            "people": {"type": "integer", "minimum": 0, "maximum": 20},
        },
        "required": ["scene", "people"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "objects": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["objects"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "currency": {"enum": ["EUR", "USD"]},
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["qty"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["price", "currency", "items"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_parse_and_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    reply = _ask(client, "Describe the picture as JSON.", response_format=fmt, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_structured_outputs_extension(client):
    reply = _ask(
        client, "JSON please.", response_format={"type": "json_object"}, max_tokens=200, temperature=0.9, seed=1
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = SCHEMAS["nested"]
    reply = _ask(client, "JSON.", extra_body={"structured_outputs": {"json": schema}}, max_tokens=200)
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    choices = ["a red square", "a blue disc", "text"]
    for seed in range(3):
        reply = _ask(
            client, "What?", extra_body={"structured_outputs": {"choice": choices}}, temperature=1.0, seed=seed
        )
        assert reply.choices[0].message.content in choices
    pattern = r"[A-Z]{2}-[0-9]{3}"
    reply = _ask(client, "Plate?", extra_body={"structured_outputs": {"regex": pattern}}, max_tokens=20)
    assert re.fullmatch(pattern, reply.choices[0].message.content)
    reply = _ask(client, "Yes?", extra_body={"structured_outputs": {"grammar": 'start: "yes" | "no"'}})
    assert reply.choices[0].message.content in ("yes", "no")


def test_invalid_structured_requests_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="strnig"):
        _ask(
            client,
            "x",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}},
        )
    with pytest.raises(openai.BadRequestError, match="exactly one of"):
        _ask(client, "x", extra_body={"structured_outputs": {"choice": ["a"], "regex": "b"}})
    with pytest.raises(openai.BadRequestError, match="not both"):
        _ask(client, "x", response_format={"type": "json_object"}, extra_body={"structured_outputs": {"regex": "a"}})


@torch.inference_mode()
def _forward_logprobs(pipe, prompt: str, steps: int):
    """The raw float32 log-softmax of every greedy step, in this process (generate's output_logits)."""
    from moai_sdk.pipeline import _Timer

    image = base64.b64decode(IMAGE_URL.split(",", 1)[1])
    rows = pipe._prepare(image, prompt, None, None, None, _Timer(pipe.device))
    inputs = rows.inputs
    out = pipe.model.generate(
        inputs.input_ids,
        pixel_values=inputs.pixel_values,
        attention_mask=inputs.attention_mask,
        aux_input_ids=inputs.aux_input_ids,
        aux_attention_mask=inputs.aux_attention_mask,
        panoptic_pixel_values=inputs.panoptic_pixel_values,
        max_new_tokens=steps,
        eos_token_id=[],
        return_dict=True,
        output_logits=True,
    )
    return [F.log_softmax(s[0], -1) for s in out.step_logits], out.new_tokens[0]


def test_top_logprobs_agree_with_a_forward_pass_and_stream_equals_plain(client, pipe):
    prompt = "What is written here?"
    options = dict(logprobs=True, top_logprobs=5, max_tokens=6)
    reply = _ask(client, prompt, **options)
    content = reply.choices[0].logprobs.content
    steps, tokens = _forward_logprobs(pipe, prompt, 6)
    vocab = pipe.structured.vocab
    assert 1 <= len(content) <= len(tokens)  # the server's answer may end with EOS (its entry is left out)
    for entry, logp, token in zip(content, steps, tokens):
        assert bytes(entry.bytes) == vocab.tokens[token]
        assert abs(entry.logprob - float(logp[token])) < TOL
        top = torch.topk(logp, 5)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [vocab.tokens[i] for i in top.indices.tolist()]
        assert max(abs(t.logprob - v) for t, v in zip(entry.top_logprobs, top.values.tolist())) < TOL
    stream = _ask(client, prompt, stream=True, **options)
    text, streamed = "", []
    for event in stream:
        for c in event.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                streamed.extend(c.logprobs.content)
    assert text == reply.choices[0].message.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_n_choices_reproduce_single_seeded_requests(client):
    options = dict(temperature=1.0, seed=42, max_tokens=6)
    reply = _ask(client, "Tell me.", n=3, **options)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for i, choice in enumerate(reply.choices):
        single = _ask(client, "Tell me.", **{**options, "seed": 42 + i})
        assert single.choices[0].message.content == choice.message.content
    stream = _ask(client, "Tell me.", n=3, stream=True, **options)
    texts = {0: "", 1: "", 2: ""}
    for event in stream:
        for c in event.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in reply.choices]
    assert len(_ask(client, "Tell me.", n=3, max_tokens=3).choices) == 3  # greedy: three equal choices
    with pytest.raises(openai.BadRequestError, match="n must be"):  # more choices than rows (--max-batch-size 8)
        _ask(client, "Tell me.", n=12, max_tokens=3)


def test_model_by_id_unknown_fields_seeds_and_the_400s_that_stay(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    for _ in range(2):
        reply = _ask(client, "Hi.", max_tokens=2, extra_body={"some_future_field": {"x": 1}})
        assert reply.choices[0].message.content is not None
    log = server.log.read_text()
    assert log.count("ignoring the unknown request field 'some_future_field'") == 1
    assert _ask(client, "Hi.", max_tokens=2, temperature=0.7, seed=-1).choices
    assert _ask(client, "Hi.", max_tokens=2, temperature=0.7, seed=2**63 - 1).choices
    with pytest.raises(openai.BadRequestError):
        _ask(client, "Hi.", max_tokens=2, seed=2**63)
    with pytest.raises(openai.BadRequestError, match="tools"):
        _ask(client, "Hi.", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    bare = {"type": "image_url", "image_url": IMAGE_URL}
    response = httpx.post(
        server.base + "/v1/chat/completions",
        json={"model": MODEL, "messages": _messages("Hi.", bare), "max_tokens": 2},
        timeout=60,
    )
    assert response.status_code == 400 and "bare string" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        _ask(client, "Hi.", top_logprobs=3)


def test_readme_structured_snippet_works_as_written(server, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Structured answers, log-probabilities and scoring") :]
    section = section[section.index("test_readme_structured_snippet_works_as_written") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert "http://127.0.0.1:8000/v1" in code
    demo_image("MOAI").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(
        compile(code.replace("http://127.0.0.1:8000/v1", server.base + "/v1"), "README.md", "exec", dont_inherit=True),
        namespace,
    )
    scene = namespace["completion"].choices[0].message.parsed
    assert isinstance(scene, namespace["Scene"]) and 0 <= scene.people <= 100
    assert namespace["yes_no"].choices[0].message.content in ("yes", "no")
    assert len(namespace["yes_no"].choices[0].logprobs.content[0].top_logprobs) == 2
    assert capsys.readouterr().out.count("\n") == 2
