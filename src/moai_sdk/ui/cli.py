"""``moai ui``: turn the parsed command line into a backend and serve the playground.

``moai_sdk.cli`` defines the arguments and calls :func:`run` (imported inside its handler, so ``moai --help``
loads neither Gradio nor this package).
"""

from __future__ import annotations

import argparse
import logging
import os

from ..cli_options import pipeline_from_args
from ..errors import ConfigError, DependencyError
from .backends import LocalBackend, ServerBackend

logger = logging.getLogger(__name__)

#: Environment variable holding the server's API key when ``--api-key`` is not given (as ``moai serve``).
API_KEY_ENV = "MOAI_API_KEY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def backend_from_args(args: argparse.Namespace) -> LocalBackend | ServerBackend:
    """The backend the options choose: ``--server URL``, ``--tiny DIR`` or a model (``MODEL`` / ``--model``)."""
    model = args.model_arg if args.model_arg is not None else args.model
    if args.model_arg is not None and args.model is not None and args.model != args.model_arg:
        raise ConfigError(f"two models given: {args.model_arg!r} and --model {args.model!r}; give one")
    chosen = [name for name, value in (("MODEL", model), ("--tiny", args.tiny), ("--server", args.server)) if value]
    if len(chosen) > 1:
        raise ConfigError(f"choose one of MODEL, --tiny DIR and --server URL; got {' and '.join(chosen)}")
    if args.server:
        api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
        return ServerBackend(args.server, api_key=api_key)
    args.model = model
    pipe = pipeline_from_args(args, with_model=True)
    return LocalBackend(pipe)


def run(args: argparse.Namespace) -> int:
    """Serve the playground until interrupted."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535; got {args.port}")
    if args.max_image_bytes < 1 or not 1 <= args.max_new_tokens <= 1024:
        raise ConfigError("--max-image-bytes must be >= 1 and --max-new-tokens within 1..1024")
    try:
        from .app import launch
    except ImportError as exc:
        raise DependencyError('moai ui needs the ui extra: pip install "moai-sdk[ui]"') from exc
    backend = backend_from_args(args)
    if args.host not in _LOOPBACK:
        logger.warning("the playground listens on %s: anyone who reaches this address can use the model", args.host)
    if args.share:
        logger.warning("--share: Gradio opens a public link to this playground through its share servers")
    launch(
        backend,
        host=args.host,
        port=args.port,
        share=args.share,
        max_image_bytes=args.max_image_bytes,
        max_new_tokens=args.max_new_tokens,
    )
    return 0
