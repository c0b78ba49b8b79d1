"""A small web service: POST an image and a question, get the MoAIResult JSON back.

    pip install 'moai-sdk[serve]' uvicorn
    python examples/serve_fastapi.py --port 8000
    curl -s localhost:8000/v1/answer -H 'content-type: application/json' \\
         -d "{\\"image\\": \\"$(base64 -w0 photo.jpg)\\", \\"prompt\\": \\"What is in the picture?\\"}"

Endpoints: ``GET /health``; ``POST /v1/answer`` (JSON: ``image`` as base64, ``prompt``, optional generation
options) -> ``MoAIResult``; ``POST /v1/perceive`` (JSON: ``image``) -> ``PerceptionResult``. Bad input answers
400 with ``{"detail": "..."}``. ``--tiny DIR`` serves a tiny random MoAI (offline, random answers).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import threading
from typing import Literal, Optional, Sequence

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, Field

from moai_sdk import ConfigError, GenerationError, InputError, MoAIPipeline


class AnswerRequest(BaseModel):
    image: str = Field(description="the image file, base64-encoded")
    prompt: str = Field(min_length=1)
    max_new_tokens: Optional[int] = Field(default=None, ge=1, le=2048)
    do_sample: Optional[bool] = None
    temperature: Optional[float] = Field(default=None, gt=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    num_beams: Optional[int] = Field(default=None, ge=1, le=8)
    seed: Optional[int] = None
    template: Optional[Literal["chat", "demo"]] = None


class PerceiveRequest(BaseModel):
    image: str = Field(description="the image file, base64-encoded")


def _decode_image(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(status_code=400, detail=f"'image' is not valid base64: {exc}") from exc


def create_app(pipe: MoAIPipeline) -> FastAPI:
    """A FastAPI app serving ``pipe`` (one request at a time on the model)."""
    app = FastAPI(title="MoAI", version="1")
    lock = threading.Lock()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": pipe.model_id, "experts": {t: e.name for t, e in pipe.experts.items()}}

    @app.post("/v1/answer")
    def answer(request: AnswerRequest) -> Response:
        image = _decode_image(request.image)
        options = request.model_dump(exclude={"image", "prompt"}, exclude_none=True)
        try:
            with lock:
                result = pipe(image, request.prompt, **options)
        except (InputError, GenerationError, ConfigError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return Response(content=result.to_json(), media_type="application/json")

    @app.post("/v1/perceive")
    def perceive(request: PerceiveRequest) -> Response:
        image = _decode_image(request.image)
        try:
            with lock:
                result = pipe.perceive(image)
        except (InputError, ConfigError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return Response(content=result.to_json(), media_type="application/json")

    return app


def main(argv: Optional[Sequence[str]] = None) -> FastAPI:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="BK-Lee/MoAI-7B")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tiny", metavar="DIR", help="serve a tiny random MoAI built in DIR (offline)")
    parser.add_argument("--no-serve", action="store_true", help="build the app and return it without serving")
    args = parser.parse_args(argv)

    if args.tiny:
        from moai_sdk.testing import tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
    else:
        pipe = MoAIPipeline.from_pretrained(args.model, load=True)
    app = create_app(pipe)
    if not args.no_serve:
        try:
            import uvicorn
        except ImportError:
            raise SystemExit("serving needs uvicorn: pip install uvicorn") from None
        uvicorn.run(app, host=args.host, port=args.port)
    return app


if __name__ == "__main__":
    main()
