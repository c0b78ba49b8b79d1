"""The decoding core (moai_sdk.modeling.decoding) on synthetic logits: penalties, temperature / top-k / top-p,
greedy and seeded draws, constraint masks, log-probabilities, stop criteria and answer cutting.

No model: each test builds its logits, so the whole file runs in about a second (it is the fast test selection of
``tools/mutation.sh decoding``). Floats are compared with tolerances unless the arithmetic is exact (powers of
two, equal logits); arg-maxes only with clear margins.
"""

from __future__ import annotations

import math

import pytest
import torch

from moai_sdk.errors import GenerationError
from moai_sdk.modeling import GenerationSettings
from moai_sdk.modeling.decoding import (
    ANSWER_CUT,
    MAX_LOGPROBS,
    SamplingParams,
    StopCriteria,
    TokenLogprobs,
    apply_repetition_penalty,
    cut_answer,
    eos_ids,
    finish_reason,
    hit_stop_string,
    next_tokens,
    row_logprobs,
    seen_from_prompt,
    warp_for_sampling,
)

# softmax / log_softmax / cumsum results: rerun under every ATEN_CPU_CAPABILITY by .ci/run
pytestmark = pytest.mark.numerics

# Mutation survivors (tools/mutation.sh decoding) judged equivalent, so left without a test:
# * ``dim=-1`` -> ``+1`` or dropped (sort, topk, gather, softmax, cumsum, scatter, argmax, log_softmax,
#   ``shape[-1]``; ``squeeze(-1)`` of [B, 1]) and ``descending=False`` dropped: the core takes [B, V] logits only;
# * ``float("-INF")`` is ``float("-inf")``;
# * ``logits >= 0`` in the repetition penalty: 0 / p == 0 * p;
# * top-k: ``clamp(None, vocab)`` (top_k >= 0 is validated) and ``(k >= 0).any()`` (a sort whose kth is then
#   replaced by -inf for k = 0 rows: nothing is masked);
# * top-p ``top_p <= 1.0`` / ``< 2.0`` (scalar or per row): a top_p of 1 cuts at cumulative probability <= 0,
#   i.e. only tokens whose probability is already 0;
# * per_row ``dtype=None`` for the float / long columns and the top_p cut: torch.tensor of Python floats is
#   float32 and of ints int64 by default (the same single rounding from double);
# * row_logprobs ``top_n >= 0`` / always topk / ``[:, :1]`` for top_n == 0: topk(0) is empty and ``[:n]`` trims;
# * seen_from_prompt ``vocab + 2`` / ``<= vocab``: ids equal to vocab land in the spare column, sliced away;
# * device arguments dropped in _constraint_mask and row_logprobs: only observable with logits on an accelerator
#   (meta tensors cannot stand in: ``bool(mask.any())`` / ``.tolist()`` need data).

INF = float("inf")


def _logits(rows: int = 3, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    """Random logits with distinct values (ties are broken by unspecified sort orders)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().squeeze(1).tolist()) for row in logits]


def _top(row: torch.Tensor, n: int) -> set[int]:
    return set(torch.topk(row, n).indices.tolist())


class _Fixed:
    """A TokenConstraint with a fixed mask (None = everything allowed)."""

    def __init__(self, allowed, terminated: bool = False) -> None:
        self.allowed = allowed
        self.terminated = terminated
        self.calls: list[tuple[int, object]] = []

    def allowed_tokens(self, vocab_size, device):
        self.calls.append((vocab_size, device))
        return self.allowed

    def accept(self, token_id):  # pragma: no cover - the core never calls it
        raise AssertionError

    def is_terminated(self):
        return self.terminated


# ------------------------------------------------------------------------------------------ answer cutting


def test_cut_answer_at_the_chat_marker_or_the_first_stop_string() -> None:
    assert ANSWER_CUT == "[U"
    assert cut_answer("a cat[UNUSED_TOKEN_145]") == "a cat"
    assert cut_answer("no marker here") == "no marker here"
    assert cut_answer("one. two. [U", stop=[". "]) == "one"  # the stop string comes first
    assert cut_answer("one[U two. ", stop=[". "]) == "one"  # the marker comes first
    assert cut_answer("a b c d", stop=["d", "b", "zz"]) == "a "  # the earliest of several stop strings
    assert cut_answer("abc", stop=[""]) == "abc"  # an empty stop string cuts nothing
    assert cut_answer("", stop=["x"]) == ""


def test_hit_stop_string_decodes_the_tokens_once() -> None:
    calls = []

    def decode(tokens):
        calls.append(list(tokens))
        return "".join(chr(96 + t) for t in tokens)  # 1 -> a, 2 -> b, ...

    assert hit_stop_string(decode, [1, 2, 3], []) is False
    assert calls == []  # no stop strings: nothing decoded
    assert hit_stop_string(decode, [1, 2, 3], ["zz", "bc"]) is True
    assert hit_stop_string(decode, [1, 2, 3], ["cb", "zz"]) is False
    assert calls == [[1, 2, 3], [1, 2, 3]]


# ------------------------------------------------------------------------------------------ logits processors


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[4.0, -4.0, 2.0, -1.0, 0.0, 0.5], [4.0, -4.0, 2.0, -1.0, 0.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True, True], [False, True, True, False, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)  # powers of two: exact
    assert out.tolist() == [[2.0, -8.0, 2.0, -1.0, 0.0, 0.25], [4.0, -8.0, 1.0, -1.0, 0.0, 0.5]]
    per_row = apply_repetition_penalty(logits, seen, torch.tensor([[2.0], [1.0]]))
    assert per_row.tolist() == [[2.0, -8.0, 2.0, -1.0, 0.0, 0.25], logits[1].tolist()]
    assert apply_repetition_penalty(logits, seen, 1.0).tolist() == logits.tolist()
    # a logit of exactly 0 stays 0 either way (0 / p == 0 * p), so `> 0` vs `>= 0` is not observable


def test_temperature_scales_the_logits() -> None:
    logits = _logits(2)
    params = SamplingParams(True, temperature=0.5)
    torch.testing.assert_close(warp_for_sampling(logits, params), logits * 2)
    torch.testing.assert_close(warp_for_sampling(logits, SamplingParams(True, temperature=2.0)), logits / 2)
    per_row = SamplingParams(True, temperature=torch.tensor([[0.5], [1.0]]))
    torch.testing.assert_close(warp_for_sampling(logits, per_row), torch.stack([logits[0] * 2, logits[1]]))
    assert warp_for_sampling(logits, SamplingParams(True)).tolist() == logits.tolist()  # all filters off


@pytest.mark.parametrize("k", [1, 3, 39, 40, 100])
def test_top_k_keeps_the_k_largest_logits(k: int) -> None:
    logits = _logits(3)
    out = warp_for_sampling(logits, SamplingParams(True, top_k=k))
    for row, kept in zip(logits, _kept(out), strict=True):
        assert kept == _top(row, min(k, 40))
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept values untouched


def test_per_row_top_k_with_off_rows_and_a_k_past_the_vocabulary() -> None:
    logits = _logits(4)
    ks = torch.tensor([[0], [1], [5], [99]])
    out = warp_for_sampling(logits, SamplingParams(True, top_k=ks))
    kept = _kept(out)
    assert kept[0] == set(range(40)) and kept[3] == set(range(40))  # 0 = off; 99 > vocab keeps every token
    assert kept[1] == _top(logits[1], 1) and kept[2] == _top(logits[2], 5)
    # only k <= 1: the k = 1 row keeps its arg-max, the off row everything
    assert _kept(warp_for_sampling(logits[:2], SamplingParams(True, top_k=ks[:2]))) == [set(range(40)), kept[1]]
    # every row off: nothing filtered
    assert warp_for_sampling(logits, SamplingParams(True, top_k=torch.zeros(4, 1, dtype=torch.long))).equal(logits)


def _nucleus(row: torch.Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p (computed in double)."""
    probs = row.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, total = set(), 0.0
    for i in order:
        keep.add(i)
        total += float(probs[i])
        if total >= p:
            break
    return keep


def _clear_nucleus(row: torch.Tensor, p: float) -> bool:
    """No prefix sum of the sorted probabilities lies within 1e-4 of p (a float32 cumsum cannot flip it)."""
    probs = row.double().softmax(-1).sort(descending=True).values
    return bool(((probs.cumsum(0) - p).abs() > 1e-4).all())


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_keeps_the_smallest_nucleus(p: float) -> None:
    logits = _logits(3, seed=1)
    assert all(_clear_nucleus(row, p) for row in logits)
    out = warp_for_sampling(logits, SamplingParams(True, top_p=p))
    assert _kept(out) == [_nucleus(row, p) for row in logits]
    rows = SamplingParams.per_row([_sampling(top_p=p), _sampling(top_p=1.0), _sampling(top_p=p)], "cpu")
    per_row = warp_for_sampling(logits, rows)
    assert _kept(per_row) == [_nucleus(logits[0], p), set(range(40)), _nucleus(logits[2], p)]  # 1 = off


def test_top_p_keeps_the_most_likely_token_and_drops_at_an_exact_cut() -> None:
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert _kept(warp_for_sampling(peaked, SamplingParams(True, top_p=1e-6))) == [{0}]
    # a top_p so small that 1 - top_p rounds to 1.0 in float32: every cumulative probability (exactly 1/4, 1/2,
    # 3/4, 1 here) is <= the cut, and only the rule "keep the most likely token" leaves one
    flat4 = torch.zeros(1, 4)
    assert [len(k) for k in _kept(warp_for_sampling(flat4, SamplingParams(True, top_p=1e-9)))] == [1]
    tiny = SamplingParams.per_row([_sampling(top_p=1e-9), _sampling(top_p=1.0)], "cpu")
    assert [len(k) for k in _kept(warp_for_sampling(torch.zeros(2, 4), tiny))] == [1, 4]
    # four equal logits: probabilities 1/4 each, cumulative 1/4, 1/2, 3/4, 1 (exact); top_p 0.75 removes the
    # tokens whose cumulative probability is <= 1 - 0.75 (transformers' TopPLogitsWarper): one of the four
    flat = torch.zeros(2, 4)
    assert [len(k) for k in _kept(warp_for_sampling(flat, SamplingParams(True, top_p=0.75)))] == [3, 3]
    rows = SamplingParams.per_row([_sampling(top_p=0.75), _sampling(top_p=0.5)], "cpu")
    assert [len(k) for k in _kept(warp_for_sampling(flat, rows))] == [3, 2]


def test_temperature_then_top_k_then_top_p() -> None:
    # temperature sharpens before top-p sees the distribution: at T=0.25 the top token alone reaches p=0.9
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert _kept(warp_for_sampling(logits, SamplingParams(True, top_p=0.9))) == [{0, 1, 2}]
    assert _kept(warp_for_sampling(logits, SamplingParams(True, temperature=0.25, top_p=0.9))) == [{0}]
    # top-k before top-p: after k=2 the renormalised top token (e^1 / (e^1 + 1) = 0.73) does not reach 0.9
    assert _kept(warp_for_sampling(logits, SamplingParams(True, top_k=2, top_p=0.9))) == [{0, 1}]


# ------------------------------------------------------------------------------------------ sampling params


def _sampling(**kw) -> GenerationSettings:
    return GenerationSettings(**{"do_sample": True, **kw})


def test_shared_params_copy_the_settings() -> None:
    s = GenerationSettings(do_sample=1, temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.3)
    p = SamplingParams.shared(s)
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (True, 0.7, 5, 0.8, 1.3)
    assert p.do_sample is True and p.top_p_cut is None
    assert SamplingParams.shared(GenerationSettings()).do_sample is False


def test_per_row_params_are_numbers_when_rows_agree_and_columns_when_they_differ() -> None:
    same = SamplingParams.per_row([_sampling(temperature=0.7, top_p=0.9)] * 3, "cpu")
    assert (same.do_sample, same.temperature, same.top_k, same.top_p, same.repetition_penalty) == (
        True,
        0.7,
        0,
        0.9,
        1.0,
    )
    assert same.top_p_cut is None
    rows = [
        GenerationSettings(),
        _sampling(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.5),
        _sampling(temperature=2.0, top_p=0.6),
    ]
    mixed = SamplingParams.per_row(rows, "cpu")
    assert mixed.do_sample.tolist() == [False, True, True] and mixed.do_sample.dtype == torch.bool
    assert mixed.temperature.tolist() == [[1.0], [0.5], [2.0]] and mixed.temperature.dtype == torch.float32
    assert mixed.top_k.tolist() == [[0], [3], [0]] and mixed.top_k.dtype == torch.long
    torch.testing.assert_close(mixed.top_p, torch.tensor([[1.0], [0.9], [0.6]]))
    torch.testing.assert_close(mixed.repetition_penalty, torch.tensor([[1.0], [1.5], [1.0]]))
    # 1 - top_p in double, rounded once to float32 (as the scalar path compares it)
    assert mixed.top_p_cut.dtype == torch.float32
    assert mixed.top_p_cut.tolist() == torch.tensor([[0.0], [1 - 0.9], [1 - 0.6]], dtype=torch.float32).tolist()
    with pytest.raises(GenerationError, match="^a decoding step needs at least one row$"):
        SamplingParams.per_row([], "cpu")
    single = SamplingParams.per_row([rows[1]], "cpu")  # one row: its own numbers
    assert (single.do_sample, single.temperature, single.top_k, single.top_p) == (True, 0.5, 3, 0.9)
    # the columns live on the logits' device (meta stands in for an accelerator)
    on_meta = SamplingParams.per_row(rows, "meta")
    columns = [on_meta.do_sample, on_meta.temperature, on_meta.top_k, on_meta.top_p, on_meta.repetition_penalty]
    assert {c.device.type for c in [*columns, on_meta.top_p_cut]} == {"meta"}


def test_rows_picks_per_row_values_and_keeps_shared_numbers() -> None:
    rows = [GenerationSettings(), _sampling(temperature=0.5, top_p=0.9), _sampling(temperature=2.0, top_p=0.6)]
    picked = SamplingParams.per_row(rows, "cpu").rows(torch.tensor([2, 0]))
    assert picked.do_sample.tolist() == [True, False]
    assert picked.temperature.tolist() == [[2.0], [1.0]]
    assert picked.top_k == 0 and picked.repetition_penalty == 1.0  # shared numbers stay numbers
    torch.testing.assert_close(picked.top_p, torch.tensor([[0.6], [1.0]]))
    torch.testing.assert_close(picked.top_p_cut, torch.tensor([[1 - 0.6], [0.0]]))


def test_penalizes() -> None:
    assert SamplingParams().penalizes is False
    assert SamplingParams(repetition_penalty=1.2).penalizes is True
    assert SamplingParams(repetition_penalty=torch.tensor([[1.0], [1.0]])).penalizes is False
    assert SamplingParams(repetition_penalty=torch.tensor([[1.0], [1.1]])).penalizes is True


# ------------------------------------------------------------------------------------------ next tokens


def test_greedy_takes_the_arg_max_after_the_penalty() -> None:
    logits = torch.tensor([[5.0, 4.0, -1.0], [1.0, 3.0, 2.0]])
    assert next_tokens(logits, SamplingParams()).tolist() == [0, 1]
    seen = torch.tensor([[True, False, False], [False, True, False]])
    # penalty 2: 5 -> 2.5 < 4 in row 0, 3 -> 1.5 < 2 in row 1
    assert next_tokens(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1, 2]
    assert next_tokens(logits, SamplingParams(repetition_penalty=2.0)).tolist() == [0, 1]  # no seen: no penalty


def test_constraint_masks_disallowed_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0], [5.0, 4.0, 3.0], [5.0, 4.0, 3.0]])
    only_2 = _Fixed(torch.tensor([False, False, True]))
    free = _Fixed(None)
    out = next_tokens(logits, SamplingParams(), constraints=[only_2, None, free])
    assert out.tolist() == [2, 0, 0]
    assert only_2.calls == [(3, logits.device)] and free.calls == [(3, logits.device)]
    # constraints that leave every row free change nothing
    assert next_tokens(logits, SamplingParams(), constraints=[free, None, free]).tolist() == [0, 0, 0]
    # sampling rows draw only allowed tokens
    g = torch.Generator().manual_seed(0)
    two = _Fixed(torch.tensor([False, True, True]))
    for _ in range(20):
        drawn = next_tokens(torch.zeros(1, 3), SamplingParams(True), generator=g, constraints=[two])
        assert drawn.item() in (1, 2)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([1, 0, 1]), "bool tensor of shape \\[3\\]"),
        (torch.tensor([True, False]), "bool tensor of shape \\[3\\]"),
        (torch.zeros(3, dtype=torch.bool), "^the row's TokenConstraint allows no token at all$"),
    ],
)
def test_bad_constraint_masks_are_generation_errors(mask, message) -> None:
    with pytest.raises(GenerationError, match=message):
        next_tokens(torch.zeros(2, 3), SamplingParams(), constraints=[None, _Fixed(mask)])


def test_a_constraint_may_return_a_list_mask() -> None:
    out = next_tokens(torch.tensor([[3.0, 2.0, 1.0]]), SamplingParams(), constraints=[_Fixed([False, True, True])])
    assert out.tolist() == [1]


def test_sampling_draws_from_the_warped_distribution() -> None:
    # top_k=1 leaves one token: every draw is the arg-max, whatever the generator
    logits = _logits(4, seed=2)
    drawn = next_tokens(logits, SamplingParams(True, top_k=1), generator=torch.Generator().manual_seed(5))
    assert drawn.tolist() == logits.argmax(-1).tolist()
    # a flat distribution over 4 tokens: 400 draws hit every token (the chance of missing one is ~4e-50)
    g = torch.Generator().manual_seed(1)
    draws = next_tokens(torch.zeros(400, 4), SamplingParams(True), generator=g)
    assert set(draws.tolist()) == {0, 1, 2, 3}
    # the draw uses the given generator: the same seed gives the same tokens
    again = next_tokens(torch.zeros(400, 4), SamplingParams(True), generator=torch.Generator().manual_seed(1))
    assert again.tolist() == draws.tolist()


def _single_run(logits_row: torch.Tensor, settings: GenerationSettings, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    return int(next_tokens(logits_row[None], SamplingParams.shared(settings), generator=g)[0])


def test_per_row_generators_draw_what_each_row_draws_alone() -> None:
    rows = [
        GenerationSettings(),
        _sampling(temperature=1.5, top_p=0.95),
        GenerationSettings(),
        _sampling(temperature=3.0, top_k=20),
        _sampling(temperature=2.0),
    ]
    seeds = [None, 11, None, 12, 13]
    for step in range(6):
        logits = _logits(5, vocab=60, seed=100 + step)
        gens = [None if s is None else torch.Generator().manual_seed(s + step) for s in seeds]
        out = next_tokens(logits, SamplingParams.per_row(rows, "cpu"), generator=gens).tolist()
        for i, (row, seed) in enumerate(zip(rows, seeds, strict=True)):
            if seed is None:
                assert out[i] == int(logits[i].argmax())
            else:
                assert out[i] == _single_run(logits[i], row, seed + step)


def test_mixed_greedy_and_sampling_rows_with_one_generator() -> None:
    logits = _logits(3, seed=4)
    params = SamplingParams.per_row([GenerationSettings(), _sampling(top_k=1), GenerationSettings()], "cpu")
    out = next_tokens(logits, params, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == logits.argmax(-1).tolist()  # top_k 1: the sampling row draws its arg-max too
    hot = SamplingParams.per_row([GenerationSettings(), _sampling(temperature=50.0)], "cpu")
    seen_tokens = {
        int(next_tokens(_logits(2, seed=4), hot, generator=torch.Generator().manual_seed(s))[1]) for s in range(30)
    }
    assert len(seen_tokens) > 5  # the sampling row samples (T=50 is nearly flat over 40 tokens)


def test_seen_from_prompt_leaves_out_padding_and_out_of_vocabulary_ids() -> None:
    ids = torch.tensor([[2, 2, 5, 7, 1000, 3], [4, 6, -100, 6, 10, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = seen_from_prompt(ids, mask, vocab=10)
    assert seen.dtype == torch.bool and seen.shape == (2, 10)
    assert seen[0].nonzero().squeeze(1).tolist() == [3, 5, 7]  # padding 2 and <image> id 1000 left out
    assert seen[1].nonzero().squeeze(1).tolist() == [4, 6, 9]  # -100 and id 10 (= vocab) left out
    # token 0 seen before a left-out position (here <image>) stays seen
    zero = seen_from_prompt(torch.tensor([[1, 0, 1000, 5]]), torch.ones(1, 4, dtype=torch.long), vocab=10)
    assert zero[0].nonzero().squeeze(1).tolist() == [0, 1, 5] and zero.is_contiguous()
    # built on the prompt's device (meta stands in for an accelerator)
    assert seen_from_prompt(ids.to("meta"), mask.to("meta"), vocab=10).device.type == "meta"


# ------------------------------------------------------------------------------------------ log-probabilities


def test_row_logprobs_of_the_raw_logits() -> None:
    logits = _logits(3, vocab=30, seed=3).to(torch.float16)
    tokens = torch.tensor([4, 7, 9])
    out = row_logprobs(logits, tokens, [2, None, 0])
    logp = torch.log_softmax(logits.float(), -1)
    assert out[1] is None
    first, last = out[0], out[2]
    assert isinstance(first, TokenLogprobs) and first.token_id == 4 and last.token_id == 9
    assert math.isclose(first.logprob, float(logp[0, 4]), abs_tol=1e-5)
    assert math.isclose(last.logprob, float(logp[2, 9]), abs_tol=1e-5)
    order = logp[0].argsort(descending=True)
    assert logp[0, order[1]] - logp[0, order[2]] > 1e-3  # a decided top 2
    assert first.top_ids == order[:2].tolist()
    torch.testing.assert_close(torch.tensor(first.top_logprobs), logp[0, order[:2]])
    assert last.top_ids == [] and last.top_logprobs == []
    assert all(type(t) is int for t in first.top_ids) and type(first.token_id) is int
    assert row_logprobs(logits, tokens, [None, None, None]) == [None, None, None]
    one = row_logprobs(logits, tokens, [None, 1, None])[1]
    assert one.top_ids == [int(logp[1].argmax())] and one.token_id == 7
    assert [r.top_ids for r in row_logprobs(logits, tokens, [0, 0, None])[:2]] == [[], []]
    assert MAX_LOGPROBS == 20


# ------------------------------------------------------------------------------------------ stopping


def test_eos_ids() -> None:
    assert eos_ids(GenerationSettings(), 2) == [2]
    assert eos_ids(GenerationSettings(eos_token_id=5), 2) == [5]
    assert eos_ids(GenerationSettings(eos_token_id=[5, 6]), 2) == [5, 6]
    assert eos_ids(GenerationSettings(eos_token_id=[]), 2) == []


def test_stop_criteria() -> None:
    crit = StopCriteria([2, 9], max_new_tokens=4)
    assert crit.check([]) is None
    assert crit.check([5]) is None
    assert crit.check([5, 9]) == "stop"
    assert crit.check([9, 5]) is None  # only the last token counts
    assert crit.check([5, 6, 7, 8]) == "length"
    assert crit.check([5, 6, 7, 2]) == "stop"  # EOS on the last allowed token is a stop
    assert crit.check([5, 6, 7]) is None
    assert crit.check([5], _Fixed(None, terminated=True)) == "stop"
    assert crit.check([5], _Fixed(None, terminated=False)) is None

    text = {1: "a", 2: "b", 3: ". ", 4: "c"}
    strings = StopCriteria([], max_new_tokens=10, stop=[". "], decode=lambda t: "".join(text[i] for i in t))
    assert strings.check([1, 2]) is None
    assert strings.check([1, 3]) == "stop"
    assert strings.check([2] * 10) == "length"
    assert StopCriteria([], 3, stop=(), decode=None).check([1, 1]) is None
    with pytest.raises(
        GenerationError, match=r"^stop strings need a decode function \(pass decode=tokenizer.decode\)$"
    ):
        StopCriteria([2], 4, stop=["x"])


def test_finish_reason() -> None:
    assert finish_reason("short", [1, 2], 4, [], [9]) == "stop"  # ended before the limit
    assert finish_reason("long text", [1, 2, 3, 4], 4, [], [9]) == "length"
    assert finish_reason("ends", [1, 2, 3, 9], 4, [], [9]) == "stop"  # EOS on the last token
    assert finish_reason("cut[UNUSED_TOKEN_145]", [1, 2, 3, 4], 4, [], [9]) == "stop"  # the chat marker
    assert finish_reason("a. b", [1, 2, 3, 4], 4, [". "], [9]) == "stop"  # a stop string
    assert finish_reason("a. b", [1, 2, 3, 4], 4, [";"], [9]) == "length"
    assert finish_reason("", [], 0, [], []) == "length"
