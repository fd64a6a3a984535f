"""The FastAPI app: ``create_app(config)``.

The model is loaded (and run once) in the app's lifespan, before the first request is
accepted; the routes get it through the ``get_service`` dependency and the API key
through ``require_api_key``. Bodies above ``max_body_mb`` are refused (413) before they
are read, by ``_RequestGuard``; each upload's header is checked
(``serve.images.probe``) before it may take a worker; every error is a one-line JSON
object ``{"detail": "..."}``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitqc import __version__
from vitqc.errors import VitqcError
from vitqc.runtime import ExportedModel
from vitqc.serve.config import API_KEY_ENV, ServeConfig
from vitqc.serve.images import ImageRejected, probe
from vitqc.serve.schemas import BatchPrediction, ErrorBody, Health, Limits, ModelInfo, Prediction
from vitqc.serve.service import InferenceService, Overloaded, Upload

__all__ = ["create_app"]

RETRY_AFTER_S = 1
READ_TIMEOUT_S = 30  # the longest wait for the next piece of a body
START_KEY = "vitqc.start"

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "missing or wrong API key",
        413: "body or image too large",
        415: "not an image in a supported format",
        422: "truncated or undecodable image, or a bad parameter",
        503: "all workers and the queue are busy: retry after Retry-After seconds",
    }.items()
}


class _BodyTooLarge(HTTPException):
    def __init__(self, limit_mb: float) -> None:
        super().__init__(413, f"request body above the limit of {limit_mb:g} MB (--max-body-mb)")


class _RequestGuard:
    """Pure ASGI middleware: stamps each request's arrival (``latency_ms`` covers reading
    the upload too) and enforces the body limit: a declared ``Content-Length`` above it
    gets 413 before a byte of the body is read (uvicorn discards the rest), a chunked
    body is cut off at the limit (413 through the app's error handler), and an upload that
    stalls for ``READ_TIMEOUT_S`` gets 408, so a slow client cannot hold a connection."""

    def __init__(self, app: ASGIApp, max_bytes: int, limit_mb: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limit_mb = limit_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[START_KEY] = time.perf_counter()
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await _error(413, str(_BodyTooLarge(self.limit_mb).detail))(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), READ_TIMEOUT_S)
            except TimeoutError:
                raise HTTPException(408, f"upload stalled for {READ_TIMEOUT_S} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.limit_mb)
            return message

        await self.app(scope, limited, send)


def get_service(request: Request) -> InferenceService:
    """The loaded model and its workers (set up by the lifespan)."""
    service = getattr(request.app.state, "service", None)
    if service is None:  # pragma: no cover - uvicorn serves only after the lifespan
        raise HTTPException(503, "the model is not loaded yet", {"Retry-After": "1"})
    return service


_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the --api-key")
_bearer = HTTPBearer(auto_error=False, description="the --api-key as a bearer token")


def require_api_key(
    request: Request,
    key: Annotated[str | None, Depends(_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries the configured key (``X-API-Key`` header or
    ``Authorization: Bearer``); nothing to check when the service has no key."""
    expected: str | None = request.app.state.config.api_key
    if expected is None:
        return
    given = key if key is not None else (bearer.credentials if bearer is not None else None)
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key: send it as the X-API-Key header",
            {"WWW-Authenticate": "ApiKey"},
        )


ServiceDep = Annotated[InferenceService, Depends(get_service)]
Authorized = Depends(require_api_key)
ThresholdQuery = Annotated[
    float | None,
    Query(
        allow_inf_nan=False,
        description="raw-score threshold for this request (default: the stored one)",
    ),
]
MapQuery = Annotated[
    bool, Query(alias="map", description="add the heat-map overlay as a base64 PNG (map_png)")
]

router = APIRouter()


async def _score(
    request: Request,
    service: InferenceService,
    uploads: list[Upload],
    threshold: float | None,
    with_map: bool,
) -> list[dict[str, Any]]:
    """Header checks here (cheap, no worker taken), then decode + score on a worker."""
    low = service.model.map_low
    if threshold is not None and not threshold > low:
        raise HTTPException(
            422,
            f"threshold {threshold:g} must be above the typical normal pixel score "
            f"{low:g} (map_low), where the normalized score is 0",
        )
    for upload in uploads:
        if not upload.data:
            raise ImageRejected(422, f"{upload.name}: empty upload")
        probe(upload.data, upload.name, service.config.max_pixels)
    rows = await service.submit(service.score, uploads, threshold, with_map)
    latency = _elapsed_ms(request)
    for row in rows:
        row["latency_ms"] = latency
    return rows


def _elapsed_ms(request: Request) -> float:
    start = request.scope.get(START_KEY, time.perf_counter())
    return round((time.perf_counter() - start) * 1000.0, 3)


async def _read(file: UploadFile) -> Upload:
    try:
        return Upload(await file.read(), file.filename or "file")
    finally:
        await file.close()


@router.post(
    "/predict",
    response_model=Prediction,
    response_model_exclude_none=True,
    responses=ERRORS,
    dependencies=[Authorized],
    summary="Score one image",
)
async def predict(
    request: Request,
    service: ServiceDep,
    threshold: ThresholdQuery = None,
    with_map: MapQuery = False,
    file: Annotated[
        UploadFile | None,
        File(description="the image (or send it as the raw body with an image/* type)"),
    ] = None,
) -> dict[str, Any]:
    """One image, as the multipart field ``file`` or as the raw body with an ``image/*``
    (or ``application/octet-stream``) content type: score, decision, threshold, model."""
    if file is not None:
        upload = await _read(file)
    else:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind.startswith("image/") or kind == "application/octet-stream":
            upload = Upload(await request.body(), "body")
        elif kind == "multipart/form-data":
            raise HTTPException(422, "the multipart upload has no 'file' field")
        else:
            raise HTTPException(
                415,
                f"content type {kind or 'none'!r}: send the image as the multipart field "
                "'file' or as the body with an image/* content type",
            )
    return (await _score(request, service, [upload], threshold, with_map))[0]


@router.post(
    "/predict/batch",
    response_model=BatchPrediction,
    response_model_exclude_none=True,
    responses=ERRORS,
    dependencies=[Authorized],
    summary="Score several images",
)
async def predict_batch(
    request: Request,
    service: ServiceDep,
    files: Annotated[list[UploadFile], File(description="the images, as fields 'files'")],
    threshold: ThresholdQuery = None,
    with_map: MapQuery = False,
) -> dict[str, Any]:
    """Several images in one multipart request (repeated field ``files``): one result
    each, in the order sent. One bad file refuses the whole request."""
    if len(files) > service.config.max_batch:
        raise HTTPException(413, f"{len(files)} files: at most {service.config.max_batch}")
    uploads = [await _read(f) for f in files]
    rows = await _score(request, service, uploads, threshold, with_map)
    return {"results": rows, "model": service.model_id, "latency_ms": _elapsed_ms(request)}


@router.get("/health", response_model=Health, summary="200 once the model is loaded")
async def health(service: ServiceDep) -> dict[str, Any]:
    """No key needed: for load balancers and start-up scripts."""
    return {"status": "ok", "model": service.model_id}


@router.get("/model", response_model=ModelInfo, responses=ERRORS, dependencies=[Authorized])
async def model_info(service: ServiceDep) -> dict[str, Any]:
    """What is being served: backbone, head, input size, threshold and its calibration
    (false-reject rate with its interval, minimum area), the fit's validation figures."""
    info = service.model.info
    config = service.config
    return {
        "model": service.model_id,
        "vitqc_version": info.get("vitqc_version"),
        "server_version": __version__,
        "backbone": info.get("backbone"),
        "head": info.get("head"),
        "input_size": list(service.model.input_size),
        "threshold": service.model.threshold,
        "map_low": service.model.map_low,
        "min_area": service.model.min_area,
        "image_score": info.get("image_score"),
        "smoothing_sigma": info.get("smoothing_sigma"),
        "calibration": info.get("calibration"),
        "validation": info.get("validation"),
        "limits": Limits(
            workers=config.workers,
            max_queue=config.max_queue,
            threads_per_worker=config.onnx_threads,
            max_body_mb=config.max_body_mb,
            max_pixels=config.max_pixels,
            max_batch=config.max_batch,
            api_key_required=config.api_key is not None,
        ),
    }


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    line = " ".join(str(detail).split())  # one line, whatever the message
    return JSONResponse({"detail": line}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, config: ServeConfig) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, exc: ImageRejected) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(VitqcError)
    async def vitqc_error(request: Request, exc: VitqcError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(
            503,
            f"busy: {config.workers} worker(s) and a queue of {config.max_queue} are taken; "
            f"retry after {RETRY_AFTER_S} s",
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}")


def create_app(config: ServeConfig, model: ExportedModel | None = None) -> FastAPI:
    """The service for ``config.model`` (an exported ``.onnx``; ``model``: that file
    already opened, e.g. by ``vitqc serve`` to report a bad file before listening)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await asyncio.to_thread(InferenceService, config, model)
        await asyncio.to_thread(service.warm_up)
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await asyncio.to_thread(service.close)

    app = FastAPI(
        title="vitqc inspection service",
        version=__version__,
        description="Score product images against a vitqc model: OK/NG with the score, "
        f"threshold and model id. With an API key (--api-key or {API_KEY_ENV}), send it "
        "as the X-API-Key header.",
        lifespan=lifespan,
        form_limits={"max_files": config.max_batch, "max_fields": 16},
    )
    app.state.config = config
    app.state.service = None
    app.add_middleware(_RequestGuard, max_bytes=config.max_body_bytes, limit_mb=config.max_body_mb)
    _install_error_handlers(app, config)
    app.include_router(router)
    return app
