"""The ``moai serve`` command: its arguments and how it runs the server under uvicorn.

``moai_sdk.cli`` registers it (:data:`moai_sdk.cli.COMMANDS`: :func:`add_arguments`, handler :func:`run`), so this
module is imported to build the ``moai`` parser and imports only light modules at module level. The pipeline options
(``--model``, ``--quantization``, ``--device``, ``--experts``, ``--tiny`` ...) come from
:mod:`moai_sdk.cli_options`, spelled as in every other command. Neither FastAPI nor uvicorn is imported until the
server starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..cli_options import add_experts_option, add_hub_options, add_model_options, add_tiny_option, pipeline_from_args
from ..errors import ConfigError, DependencyError
from ..prompts import DEFAULT_TEMPLATE, TEMPLATES

logger = logging.getLogger(__name__)

#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "MOAI_API_KEY"
#: The model name a ``--tiny`` server answers to (unless ``--served-model-name``).
TINY_MODEL_NAME = "moai-tiny"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

DESCRIPTION = """\
Serve MoAI over HTTP with an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) plus
POST /v1/perceive, GET /health and GET /metrics. Requests run on the continuous-batching engine: rows join and
leave the running batch at every decoding step (--scheduling static: request-level batches).
Binds 127.0.0.1 unless told otherwise; remote image URLs are refused unless --allow-remote-images."""
HELP = "an OpenAI-compatible HTTP server with dynamic batching"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``moai serve`` to its sub-parser ``p``."""
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="Hub id or checkpoint folder")
    add_model_options(p)
    add_hub_options(p)
    add_experts_option(p)
    add_tiny_option(p)
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=list(TEMPLATES))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default: the model id; {TINY_MODEL_NAME!r} with --tiny)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="rows decoding together (the same as --max-num-seqs); 1 turns batching off (default: 8)",
    )
    p.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=50.0,
        help="--scheduling static: how long an empty batch waits for companions, after its first prepared request "
        "or the previous batch (default: 50)",
    )
    p.add_argument(
        "--scheduling",
        default="continuous",
        choices=["continuous", "static"],
        help="continuous: rows join and leave the running batch at every decoding step (default); static: a new "
        "batch starts only when the previous one has ended (request-level batching, the benchmarks' baseline)",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="rows decoding together (default: --max-batch-size, 8)"
    )
    p.add_argument(
        "--kv-budget",
        type=_kv_budget,
        default=None,
        help="KV cache pool: bytes (e.g. 2000000000) or a fraction of free CUDA memory (e.g. 0.5); "
        "default: 0.5 on CUDA, 4 GiB elsewhere. A request is admitted only when its prompt + max_tokens fit",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=4096,
        help="per-step token budget: running rows + newcomers' prefill positions (default: 4096)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429 (default: 64)")
    p.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is answered 504 (default: 600)"
    )
    p.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set)"
    )
    p.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: data: URLs only)"
    )
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="largest encoded image (default: 20 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _kv_budget(text: str) -> int | float:
    """``--kv-budget``: an integer number of bytes, or a fraction in (0, 1]."""
    try:
        value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes (an integer) or a fraction like 0.5; got {text!r}") from None
    if (isinstance(value, float) and not 0 < value <= 1) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected bytes > 0 or a fraction in (0, 1]; got {text!r}")
    return value


def config_from_args(args: argparse.Namespace, default_name: str) -> Any:
    """The :class:`~moai_sdk.serve.app.ServeConfig` of the parsed flags (the API key may come from the env)."""
    from .app import ServeConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return ServeConfig(
        served_model_name=args.served_model_name or default_name,
        max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        api_key=api_key,
        allow_remote_images=args.allow_remote_images,
        max_image_bytes=args.max_image_bytes,
        scheduling=args.scheduling,
        max_num_seqs=args.max_num_seqs,
        kv_budget=args.kv_budget,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def run(args: argparse.Namespace) -> int:
    """Build the pipeline the options describe and serve it until interrupted (Ctrl-C / SIGTERM)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise DependencyError('moai serve needs the serve extra: pip install "moai-sdk[serve]"') from exc
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535; got {args.port}")
    if args.model_arg is not None:
        if args.model is not None and args.model != args.model_arg:
            raise ConfigError(f"two models given: {args.model_arg!r} and --model {args.model!r}; give one")
        args.model = args.model_arg
    pipe = pipeline_from_args(args, with_model=True)
    config = config_from_args(args, TINY_MODEL_NAME if args.tiny else pipe.model_id)
    if args.host not in _LOOPBACK and config.api_key is None:
        logger.warning("serving on %s without an API key: anyone who reaches this address can use it", args.host)
    from .app import create_app

    app = create_app(pipe, config)
    print(f"moai serve: {config.served_model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
