"""The HTTP server: AUTOMATIC1111's /sdapi/v1 routes and the web page at `/`, over one worker.

Every failure of a request is answered, never raised into the server: bad input 422 with a one-line
`detail`, a full queue 503, a body over the limit 413, a wrong password 401, anything else 500 with its
one-line reason. Requests wait for their task without blocking the event loop, so /progress and
/interrupt answer while a job runs; a request whose client has gone cancels its task.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from ldm.cli import out_of_memory
from ldm.errors import InputError
from ldm.files import sha256_file
from ldm.infotext import A1111_SAMPLERS, SCHEDULERS, parse_infotext
from ldm.samplers import REGISTRY
from ldm.server.a1111 import Limits, decode_image, parse_job
from ldm.server.engine import Catalog, Engine
from ldm.server.worker import Cancelled, QueueFull, Task, Worker

PAGE = Path(__file__).with_name("page.html")


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs. `auth`: (user, password) for HTTP basic auth on every route, or None."""

    checkpoint: Path
    models_dir: Path | None = None
    lora_dir: Path | None = None  # where <lora:NAME:WEIGHT> in prompts finds NAME, and what /loras lists
    embeddings_dir: Path | None = None  # textual-inversion files, loaded with each model
    auth: tuple[str, str] | None = None
    max_queue: int = 16
    max_body_bytes: int = 32 * 2**20
    limits: Limits = field(default_factory=Limits)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | str = torch.float32  # or a precision name, resolved per model (ldm.precision)
    compile: str = "auto"  # Pipeline.compile_unet's mode: compiled programs from the persistent cache
    quantize: str = "off"  # Pipeline.quantize_unet's mode for every model loaded


class RequestFailed(Exception):
    """A request answered with `status` and a one-line `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, " ".join(detail.splitlines())


def _reject(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {401: "Unauthorized", 413: "PayloadTooLarge", 422: "InputError",
                                   503: "QueueFull"}.get(status, "ServerError"), "detail": detail},
                        status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: HTTP basic auth (compared in constant time) and the body
    limit, checked on Content-Length and again on the bytes that arrive."""

    def __init__(self, app: ASGIApp, auth: tuple[str, str] | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = None if auth is None else (auth[0].encode(), auth[1].encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and not self._authorized(headers.get(b"authorization", b"")):
            return await _reject(401, "wrong or missing user name and password (HTTP basic auth)",
                                 {"WWW-Authenticate": 'Basic realm="ldm"'})(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await _reject(413, self._too_large())(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise RequestFailed(413, self._too_large())
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> str:
        return f"the body is larger than this server's limit of {self.max_body_bytes / 2**20:g} MB"

    def _authorized(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Both compared, always: the time taken does not tell which one was wrong.
        return (secrets.compare_digest(user, self.expected[0]) & secrets.compare_digest(password, self.expected[1])
                and scheme.lower() == b"basic")


def create_app(config: ServerConfig) -> FastAPI:
    """The server's ASGI app, with its model loaded (a bad checkpoint fails here, before serving); the
    worker starts and stops with the app (uvicorn's lifespan)."""
    engine = Engine(Catalog(config.checkpoint, config.models_dir), config.device, config.dtype, config.lora_dir,
                    config.embeddings_dir, config.compile, config.quantize)
    engine.load(engine.checkpoint)
    state: dict[str, Worker] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = state["worker"] = Worker(config.max_queue)
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="ldm", summary="AUTOMATIC1111's web API over ldm", lifespan=lifespan)
    app.add_middleware(Guard, auth=config.auth, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(RequestFailed)
    async def failed(request: Request, e: RequestFailed) -> JSONResponse:
        return _reject(e.status, e.detail)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        return _reject(500, " ".join(f"{type(e).__name__}: {e}".splitlines()))

    async def body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestFailed(422, f"the body is not JSON ({e})") from None

    async def run(request: Request, work: Callable[[Task], Any], name: str) -> Any:
        """Queue `work` and wait for it; the task is cancelled if the client goes away first."""
        try:
            task = state["worker"].submit(work, name)
        except QueueFull:
            raise RequestFailed(503, f"the queue is full ({config.max_queue} jobs wait); try again later") from None
        waiting: Awaitable = asyncio.wrap_future(task.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.5)
                if done:
                    return waiting.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise RequestFailed(499, "the client went away")
        except Cancelled:
            raise RequestFailed(503, "the job was cancelled (the server is stopping)") from None
        except InputError as e:
            raise RequestFailed(422, str(e)) from None
        except (MemoryError, RuntimeError) as e:
            if out_of_memory(e):
                raise RequestFailed(507, "out of memory; ask for fewer or smaller images") from None
            raise
        finally:
            task.cancel()  # a no-op once it finished; stops it when this request is cancelled (shutdown)

    async def generate(request: Request, kind: str) -> dict[str, Any]:
        try:
            job = await run_in_threadpool(parse_job, await body(request), kind, config.limits)
        except InputError as e:
            raise RequestFailed(422, str(e)) from None
        return await run(request, lambda task: engine.generate(job, task), kind)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> dict[str, Any]:
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> dict[str, Any]:
        return await generate(request, "img2img")

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return engine.catalog.items()

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": name, "aliases": list(aliases),
                 "options": {"scheduler": "karras"} if REGISTRY[ours].karras_by_default else {}}
                for ours, (name, aliases) in A1111_SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if karras else -1.0,
                 "need_inner_model": False} for name, (label, karras) in SCHEDULERS.items()]

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": Catalog.title(engine.checkpoint),
                "sd_checkpoint_hash": sha256_file(engine.checkpoint),
                "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> None:
        """Options other than sd_model_checkpoint are A1111 UI settings without meaning here: ignored."""
        options = await body(request)
        if not isinstance(options, dict):
            raise RequestFailed(422, "the body must be a JSON object of option names and values")
        if (name := options.get("sd_model_checkpoint")) is not None:
            if not isinstance(name, str):
                raise RequestFailed(422, f"sd_model_checkpoint must be a checkpoint title, got {name!r}")
            await run(request, lambda task: engine.select(name), "load")

    @app.get("/sdapi/v1/progress")
    def progress() -> dict[str, Any]:
        task = state["worker"].current
        job = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
               "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
               "queued": state["worker"].queued()}
        if task is None or not task.job_count:
            return {"progress": 0.0, "eta_relative": 0.0, "state": job, "current_image": None, "textinfo": None}
        done = (task.job_no + (task.step / task.steps if task.steps else 0)) / task.job_count
        elapsed = time.monotonic() - task.started
        job.update(interrupted=task.cancelled.is_set(), job=task.name, job_count=task.job_count,
                   job_no=task.job_no, sampling_step=task.step, sampling_steps=task.steps)
        return {"progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed if done else 0.0,
                "state": job, "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        state["worker"].interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        data = await body(request)
        try:
            image = await run_in_threadpool(decode_image, data.get("image") if isinstance(data, dict) else None,
                                            "image", config.limits.max_side)
        except InputError as e:
            raise RequestFailed(422, str(e)) from None
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return engine.loras()

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        """The folder is read again on every /loras call: nothing to refresh."""

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        return engine.embeddings()

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    return app
