"""The continuous-batching engine on the tiny MoAI: every row equals its single run, whatever joins or leaves.

The oracle is the pipeline's single call ``pipe(image, prompt, ...)`` (batch of one): a greedy row must give
exactly its tokens, a seeded sampling row exactly its draws, and the float32 log-probabilities of the chosen
tokens must match the single run's logits within the parity tolerance (batched matrix products may sum in a
different order). Arrival schedules, settings and lengths are drawn by hypothesis (bounded to stay fast).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moai_sdk import GenerationError
from moai_sdk.engine import EngineError, MoAIEngine, RequestCancelled
from moai_sdk.engine.kv_pool import bytes_per_position
from moai_sdk.testing import demo_image, tiny_pipeline

TOL = 1e-4
PROMPTS = [
    "What is this?",
    "Describe the picture in detail please.",
    "Colors?",
    "Is there text in the image, and what does it say?",
]
#: per-row settings the schedules mix (the tiny model has 1000 tokens; eos_token_id=[] keeps lengths exact)
SETTINGS = [
    dict(eos_token_id=[]),
    dict(eos_token_id=[], do_sample=True, temperature=1.3, top_p=0.9, seed=5),
    dict(eos_token_id=[], do_sample=True, top_k=20, seed=9),
    dict(eos_token_id=[], repetition_penalty=1.3),
    dict(eos_token_id=[], do_sample=True, temperature=0.7, repetition_penalty=1.2, seed=3),
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("engine"), experts=None)


@pytest.fixture(scope="module")
def image():
    return demo_image()


@pytest.fixture(scope="module")
def single(pipe, image):
    """Single runs, memoised: (prompt index, settings index, max_new_tokens) -> MoAIResult."""
    memo: dict = {}

    def run(p: int, s: int, n: int):
        key = (p, s, n)
        if key not in memo:
            memo[key] = pipe(image, PROMPTS[p], max_new_tokens=n, **SETTINGS[s])
        return memo[key]

    return run


@pytest.fixture(scope="module")
def engine(pipe):
    with MoAIEngine(pipe, max_num_seqs=4, max_num_batched_tokens=4096) as eng:
        yield eng


def _wait_steps(engine: MoAIEngine, steps: int, timeout: float = 30.0) -> None:
    target = engine.stats().steps + steps
    end = time.monotonic() + timeout
    while engine.stats().steps < target and time.monotonic() < end:
        if engine.stats().running == 0 and engine.stats().waiting == 0:
            return  # idle: nothing would advance the step count
        time.sleep(0.002)


@pytest.mark.numerics
def test_greedy_rows_equal_single_runs_with_logprobs(pipe, image, engine):
    """Four greedy rows of different prompt and answer lengths decode together; tokens equal, and the chosen
    tokens' float32 log-probabilities equal the single run's (from ``generate``'s step logits)."""
    lengths = [6, 17, 9, 12]
    handles = [engine.submit(image, p, max_new_tokens=n, eos_token_id=[], logprobs=3) for p, n in zip(PROMPTS, lengths)]
    for prompt, n, h in zip(PROMPTS, lengths, handles):
        result = h.result(120)
        rows, _ = pipe.prepare(image, prompt)
        inputs = rows.inputs
        ref = pipe.model.generate(
            inputs.input_ids,
            pixel_values=inputs.pixel_values,
            attention_mask=inputs.attention_mask,
            aux_input_ids=inputs.aux_input_ids,
            aux_attention_mask=inputs.aux_attention_mask,
            panoptic_pixel_values=inputs.panoptic_pixel_values,
            max_new_tokens=n,
            eos_token_id=[],
            return_dict=True,
            output_logits=True,
        )
        assert result.new_token_ids == ref.new_tokens[0]
        assert result.text == pipe.answer_text(ref.new_tokens[0])
        records = h.output.logprobs
        assert len(records) == n
        got = torch.tensor([r.logprob for r in records])
        expected = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(ref.step_logits, ref.new_tokens[0])])
        assert (got - expected).abs().max() < TOL * expected.abs().max()
        for record, step in zip(records, ref.step_logits):
            assert record.top_ids == torch.log_softmax(step[0], -1).topk(3).indices.tolist()
        assert h.output.finish_reason == "length"


@settings(max_examples=6)
@given(
    schedule=st.lists(
        st.tuples(
            st.integers(0, len(PROMPTS) - 1),  # prompt
            st.integers(0, len(SETTINGS) - 1),  # settings
            st.sampled_from([1, 3, 8, 14]),  # max_new_tokens
            st.integers(0, 6),  # engine steps to wait before submitting
        ),
        min_size=1,
        max_size=6,
    )
)
def test_rows_arriving_at_random_steps_equal_their_single_runs(engine, image, single, schedule):
    handles = []
    for p, s, n, wait in schedule:
        _wait_steps(engine, wait)
        handles.append(((p, s, n), engine.submit(image, PROMPTS[p], max_new_tokens=n, **SETTINGS[s])))
    for key, h in handles:
        result = h.result(120)
        expected = single(*key)
        assert result.new_token_ids == expected.new_token_ids, key
        assert result.text == expected.text
        assert result.seed == expected.seed


def test_stop_strings_and_eos_end_rows_like_single_runs(pipe, image, engine, single):
    base = single(1, 0, 14)
    text = pipe.tokenizer.decode(base.new_token_ids[:8], skip_special_tokens=True, keep_chat_markers=True)
    stop = text.strip()[-3:]
    eos = base.new_token_ids[5]
    expected_stop = pipe(image, PROMPTS[1], max_new_tokens=14, eos_token_id=[], stop=[stop])
    expected_eos = pipe(image, PROMPTS[1], max_new_tokens=14, eos_token_id=eos)
    long_row = engine.submit(image, PROMPTS[0], max_new_tokens=16, eos_token_id=[])
    h_stop = engine.submit(image, PROMPTS[1], max_new_tokens=14, eos_token_id=[], stop=[stop])
    h_eos = engine.submit(image, PROMPTS[1], max_new_tokens=14, eos_token_id=eos)
    assert h_stop.result(120).new_token_ids == expected_stop.new_token_ids
    assert h_stop.result().text == expected_stop.text
    assert stop not in expected_stop.text
    assert len(expected_stop.new_token_ids) < 14
    assert h_stop.output.finish_reason == "stop"
    assert h_eos.result(120).new_token_ids == expected_eos.new_token_ids
    assert h_eos.result().new_token_ids[-1] == eos
    assert h_eos.output.finish_reason == "stop"
    assert long_row.result(120).new_token_ids == single(0, 0, 16).new_token_ids


def test_cancel_frees_the_row_and_neighbours_are_unaffected(engine, image, single):
    seen = threading.Event()
    counts = []

    def on_token(token_id: int, text: str) -> None:
        counts.append(token_id)
        if len(counts) == 3:
            seen.set()

    victim = engine.submit(image, PROMPTS[2], max_new_tokens=200, eos_token_id=[], on_token=on_token)
    neighbour = engine.submit(image, PROMPTS[3], max_new_tokens=14, eos_token_id=[])
    assert seen.wait(120)
    victim.cancel()
    with pytest.raises(RequestCancelled):
        victim.result(10)
    assert victim.cancelled
    assert neighbour.result(120).new_token_ids == single(3, 0, 14).new_token_ids
    end = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < end:
        time.sleep(0.01)
    assert engine.stats().running == 0
    assert len(counts) < 200  # the row left long before its maximum


def test_stream_pieces_concatenate_to_the_result(engine, image, single):
    h = engine.submit(image, PROMPTS[1], max_new_tokens=14, eos_token_id=[])
    items = list(h.stream(timeout=120))
    result = items[-1]
    assert all(isinstance(x, str) and x for x in items[:-1])
    assert "".join(items[:-1]) == result.text
    assert result.new_token_ids == single(1, 0, 14).new_token_ids


def test_n_choices_share_one_prefill_and_each_reproduces_its_seed(pipe, engine, image):
    h = engine.submit(image, PROMPTS[0], n=3, max_new_tokens=8, eos_token_id=[], do_sample=True, seed=40)
    results = h.result(120)
    assert len(results) == 3 and len(h.choices) == 3
    for j, result in enumerate(results):
        expected = pipe(image, PROMPTS[0], max_new_tokens=8, eos_token_id=[], do_sample=True, seed=40 + j)
        assert result.new_token_ids == expected.new_token_ids
        assert result.seed == 40 + j


class OnlyTokens:
    """A TokenConstraint: only ``allowed`` tokens, and the row ends after ``limit`` of them."""

    def __init__(self, allowed: list[int], limit: int) -> None:
        self.allowed, self.limit, self.accepted = allowed, limit, []

    def allowed_tokens(self, vocab_size, device):
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[self.allowed] = True
        return mask

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)

    def is_terminated(self) -> bool:
        return len(self.accepted) >= self.limit


def test_constraint_masks_tokens_and_ends_the_row(engine, image, single):
    allowed = [11, 57, 300, 301, 999]
    constraint = OnlyTokens(allowed, 5)
    h = engine.submit(image, PROMPTS[0], max_new_tokens=30, eos_token_id=[], constraint=constraint)
    free = engine.submit(image, PROMPTS[1], max_new_tokens=10, eos_token_id=[])
    result = h.result(120)
    assert set(result.new_token_ids) <= set(allowed)
    assert result.new_token_ids == constraint.accepted and len(result.new_token_ids) == 5
    assert h.output.finish_reason == "stop"
    assert free.result(120).new_token_ids == single(1, 0, 10).new_token_ids


def test_kv_budget_bounds_the_running_rows(pipe, image, single):
    """A budget for two rows: never more than two run, and every answer is still its single run's."""
    config = pipe.model.config
    per_row = (1300 + 64) * bytes_per_position(config, pipe.model.dtype)
    running = []
    with MoAIEngine(pipe, max_num_seqs=8, kv_budget=2 * per_row + 1) as eng:
        eng.listeners.append(lambda seconds, stats: running.append(stats.running))
        handles = [eng.submit(image, PROMPTS[i % 4], max_new_tokens=8, eos_token_id=[]) for i in range(5)]
        results = [h.result(120) for h in handles]
        assert eng.stats().kv_allocated_bytes <= 2 * per_row + 1
        with pytest.raises(EngineError, match="KV budget"):
            eng.submit(image, PROMPTS[0], n=3, max_new_tokens=8, eos_token_id=[]).result(60)
    assert max(running) == 2
    for i, result in enumerate(results):
        assert result.new_token_ids == single(i % 4, 0, 8).new_token_ids


def test_static_scheduling_admits_only_into_an_empty_batch(pipe, image, single):
    with MoAIEngine(pipe, max_num_seqs=4, scheduling="static") as eng:
        first = eng.submit(image, PROMPTS[0], max_new_tokens=14, eos_token_id=[])
        _wait_steps(eng, 2)
        late = eng.submit(image, PROMPTS[2], max_new_tokens=3, eos_token_id=[])
        a, b = first.result(120), late.result(120)
    assert a.new_token_ids == single(0, 0, 14).new_token_ids
    assert b.new_token_ids == single(2, 0, 3).new_token_ids
    # the late request started only after the first one's last token
    first_done = first.request.arrived + first.output.token_times[-1]
    late_start = late.request.arrived + late.output.token_times[0]
    assert late_start > first_done


def test_bad_requests_get_typed_errors(engine, image):
    with pytest.raises(GenerationError, match="beam"):
        engine.submit(image, PROMPTS[0], num_beams=2)
    with pytest.raises(GenerationError, match="temperature"):
        engine.submit(image, PROMPTS[0], do_sample=True, temperature=0)
    with pytest.raises(GenerationError, match="logprobs"):
        engine.submit(image, PROMPTS[0], logprobs=21)
    with pytest.raises(GenerationError, match="TokenConstraint"):
        engine.submit(image, PROMPTS[0], constraint=object())
    bad = engine.submit(b"not an image", PROMPTS[0], max_new_tokens=2)
    with pytest.raises(Exception) as info:
        bad.result(60)
    assert "image" in str(info.value).lower()
    ok = engine.submit(image, PROMPTS[0], max_new_tokens=2, eos_token_id=[])
    assert len(ok.result(60).new_token_ids) == 2  # the engine goes on after a failed request


def test_fixed_shape_steps_equal_single_runs(pipe, image, single):
    """The CUDA-graph step shape (rows padded to a bucket, the whole pool capacity read, masks built on the
    device) run without a graph on this CPU: same answers as the single runs."""
    with MoAIEngine(pipe, max_num_seqs=4, cuda_graphs=True) as eng:
        handles = [
            eng.submit(image, PROMPTS[i], max_new_tokens=n, **SETTINGS[s])
            for i, s, n in [(0, 0, 9), (1, 1, 5), (2, 3, 12)]
        ]
        results = [h.result(120) for h in handles]
        assert eng._runner.fixed_shape and not eng._runner.use_graphs
    for (i, s, n), result in zip([(0, 0, 9), (1, 1, 5), (2, 3, 12)], results):
        assert result.new_token_ids == single(i, s, n).new_token_ids


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_steps_equal_eager_steps(tmp_path):
    """On CUDA the decoding steps replay captured graphs (one per batch-size bucket) and give the eager answers."""
    pipe = tiny_pipeline(tmp_path, experts=None, device="cuda")
    img = demo_image()
    jobs = [(PROMPTS[i % 4], 4 + 3 * i) for i in range(6)]
    answers = {}
    for graphs in (False, True):
        with MoAIEngine(pipe, max_num_seqs=4, cuda_graphs=graphs) as eng:
            handles = [eng.submit(img, p, max_new_tokens=n, eos_token_id=[]) for p, n in jobs]
            answers[graphs] = [h.result(300).new_token_ids for h in handles]
            if graphs:
                assert eng._runner.use_graphs and eng._runner.captured >= 1
    assert answers[True] == answers[False]
