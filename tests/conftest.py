"""Shared test fixtures: the moai-tiny oracle checkpoint and its reference cases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "moai-tiny"

# Keep the numerics of the oracle (2 threads, fp32 on CPU) and keep tests off the network. tools/mutation.sh sets
# MOAI_TEST_THREADS=1: mutmut forks a child per mutant from a process whose OpenMP team already has 2 threads, and
# the child's first parallel region then waits forever at the team barrier for threads the fork did not copy.
torch.set_num_threads(int(os.environ.get("MOAI_TEST_THREADS", "2")))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Property-based tests (tests/test_hardening_*.py): a fixed, bounded profile -- the same examples on every run
# (derandomize, no example database), few enough that the suite stays fast, no per-example deadline (CPU timing
# varies). HYPOTHESIS_PROFILE=deep runs many more examples locally.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("deep", parent=settings.get_profile("ci"), max_examples=300)
settings.register_profile("quick", parent=settings.get_profile("ci"), max_examples=5)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error ||actual - expected|| / ||expected|| (Frobenius norm, in float64)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm())


def decided_argmax(expected: torch.Tensor, tol: float) -> torch.Tensor:
    """The rows (last dimension: the classes) whose arg-max a comparison at relative tolerance ``tol`` decides.

    A row whose own error is within the tolerance, ``||actual_r - expected_r|| <= tol * ||expected_r||``, keeps the
    oracle's arg-max wherever the oracle's top-1 margin exceeds ``sqrt(2) * tol * ||expected_r||``: to overtake the
    top class ``i``, another class ``j`` needs ``err_j - err_i >= margin``, and ``|err_j - err_i| <= sqrt(2) *
    ||err_r||``. Rows with a thinner margin are float32 noise apart (e.g. a_demo_full has a text position whose top
    two logits differ by 6.7e-5, 7e-7 of the row's norm) and another CPU's kernels may order them either way.
    """
    e = expected.detach().double()
    top2 = e.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > math.sqrt(2.0) * tol * e.norm(dim=-1)


def assert_argmax_agrees(actual: torch.Tensor, expected: torch.Tensor, tol: float, min_decided: float = 0.5) -> None:
    """The arg-max agrees with the oracle's in every row the tolerance ``tol`` decides (:func:`decided_argmax`), and
    at least ``min_decided`` of the rows are decided (so the check cannot pass by deciding nothing)."""
    decided = decided_argmax(expected, tol)
    assert decided.float().mean().item() >= min_decided, f"only {int(decided.sum())} of {decided.numel()} rows decided"
    same = actual.argmax(-1) == expected.argmax(-1)
    assert bool(same[decided].all()), f"arg-max differs at decided rows {(~same & decided).nonzero().tolist()}"


def assert_greedy_rows_agree(
    tokens: list[list[int]],
    expected_tokens: list[list[int]],
    expected_steps: list[torch.Tensor],
    steps: list[torch.Tensor],
    rtol: float,
    atol: float,
) -> None:
    """Greedy rows of two computations of the same model (e.g. two decoding paths) agree, step by step, as far as
    float32 arithmetic decides them.

    Each compared step's logits must be within ``atol + rtol * |expected|`` elementwise; then the arg-max can only
    change where the expected step's top-1 margin is at most twice that. A row is compared up to its first step
    with a thinner margin (from there the two may take different, equally right paths) and must be compared for at
    least half its steps, so the check cannot pass by comparing nothing.
    """
    for r, (got, want) in enumerate(zip(tokens, expected_tokens)):
        compared = 0
        for k, (g, w) in enumerate(zip(got, want)):
            e, a = expected_steps[k][r].double(), steps[k][r].double()
            assert bool(((a - e).abs() <= atol + rtol * e.abs()).all()), f"row {r} step {k}: logits differ"
            top2 = e.topk(2).values
            if float(top2[0] - top2[1]) <= 2 * (atol + rtol * float(top2.abs().max())):
                break  # a float32 tie: either token is right, and what follows depends on it
            assert g == w, f"row {r} step {k}: token {g} != {w}"
            compared += 1
        assert compared >= len(want) / 2, f"row {r}: only {compared} of {len(want)} steps decided"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture(scope="session")
def cases_meta() -> dict:
    return {c["name"]: c for c in json.loads((TINY / "cases.json").read_text())["cases"]}


@pytest.fixture(scope="session")
def cases() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(TINY / "cases.safetensors"))


@pytest.fixture(scope="session")
def tiny_model():
    from moai_sdk.modeling import MoAIForCausalLM

    return MoAIForCausalLM.from_pretrained(TINY, device="cpu", dtype="float32")


def official_pixel_values(case: dict, key: str = "image_files") -> torch.Tensor:
    """The official normalisation of the stored 490x490 images (float32, 0-255 mean/std)."""
    from PIL import Image

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255
    imgs = [torch.from_numpy(np.array(Image.open(TINY / f)))[..., :3].permute(2, 0, 1).float() for f in case[key]]
    return (torch.stack(imgs) - mean) / std


def official_inputs(name: str, cases: dict, meta: dict) -> dict[str, torch.Tensor]:
    """The official keyword inputs of a fixture case."""
    return {
        "input_ids": cases[f"{name}.input_ids"],
        "pixel_values": official_pixel_values(meta[name]),
        "aux_embeds": cases[f"{name}.aux_embeds"],
        "attention_mask": cases[f"{name}.attention_mask"],
        "im_mask": cases[f"{name}.im_mask"].bool(),
        "lang_mask": cases[f"{name}.lang_mask"].bool(),
    }


CASE_NAMES = ["a_demo_full", "b_eval_template", "c_raw640x480_empty"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing downloads in tests: any attempt to open a network connection fails loudly."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test")

    import socket

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


LOOPBACK = ("127.0.0.1", "localhost", b"127.0.0.1", b"localhost")


def allow_loopback_only(monkeypatch) -> None:
    """Replace the suite's no-network guard by a loopback-only one, for modules whose servers listen on 127.0.0.1
    (use it in an autouse fixture named ``no_network`` in that module): any other address still fails loudly."""
    import socket

    real_connect, real_create, real_getaddrinfo = socket.socket.connect, socket.create_connection, socket.getaddrinfo

    def check(host) -> None:
        if host not in LOOPBACK:
            raise OSError(f"network access to {host!r} attempted during a test (only 127.0.0.1 is allowed)")

    def connect(self, address):
        check(address[0] if isinstance(address, tuple) else address)
        return real_connect(self, address)

    def create_connection(address, *args, **kwargs):
        check(address[0])
        return real_create(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        check(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def random_frames(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random uint8 RGB frames of the experts' 490 x 490 size."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 490, 490), dtype=torch.uint8, generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# The slow set. `python -m pytest -q` (the README's command) runs every test but those marked `slow` -- the local Ray
# cluster, lmms-eval's own CLI, the eleven benchmarks end to end, the kill-and-resume runs, the playground over a
# second server process -- each of whose capabilities a faster test also exercises; `.ci/run` runs the slow set
# right after it (`python -m pytest -q -m slow`). Slow tests run whenever they are asked for: `--slow` (everything),
# any `-m` expression, or test files / node ids named on the command line.
# ----------------------------------------------------------------------------------------------------------------


_SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (the README command skips them)"
    )


def _slow_tests_asked_for(config) -> bool:
    named = config.args_source == pytest.Config.ArgsSource.ARGS  # files or node ids given explicitly
    return bool(config.getoption("--slow") or config.getoption("markexpr") or named)


def pytest_collection_modifyitems(config, items):
    if _slow_tests_asked_for(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=slow)
        config.stash[_SLOW_LEFT_OUT] = len(slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left_out = config.stash.get(_SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(
            f"{left_out} slow tests not run: `python -m pytest -q -m slow` runs them (CI runs both), "
            "`--slow` runs everything"
        )
