"""The HTTP side: a Starlette app with /predict, /health, /metrics and the page at /.

Every answer is JSON, errors included (`{"error": message, "reason": slug}`, 4xx for anything
the client sent); an unexpected failure is logged on the server and answered with a bare 500,
never a traceback. Metrics are Prometheus' own client on a registry of this app's.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from compress.serve.bundle import MAX_PIXELS, ImageError
from compress.serve.workers import Workers

ENDPOINTS = ("/", "/predict", "/health", "/metrics")
FIELD = "image"   # the multipart field; repeat it for a batch
# A raw body is the image's bytes under any of these types (curl --data-binary sends the last by default).
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")
LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
# The page may use nothing but itself: no scripts, styles, fonts or images from anywhere else.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'")


class ClientError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


class Metrics:
    def __init__(self, workers: Workers):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("compress_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.errors = Counter("compress_serve_errors", "Requests answered with an error, by reason",
                              ["endpoint", "reason"], registry=r)
        self.latency = Histogram("compress_serve_request_duration_seconds", "Server-side time per request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("compress_serve_inference_seconds", "Runtime call per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("compress_serve_images", "Images classified", registry=r)
        self.in_flight = Gauge("compress_serve_requests_in_flight", "Requests being served now", registry=r)
        b = workers.bundle
        Info("compress_serve_model", "The model being served", registry=r).info(
            {"name": b.name, "precision": b.precision, "sha256": workers.model_sha256, "provider": workers.provider,
             "workers": str(workers.count)})


class MetricsMiddleware:
    """Counts and times every HTTP request, whatever answered it (a route, a 404, the error handler)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"   # bounded label values
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m, start = self.metrics, time.perf_counter()
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.in_flight.dec()
            m.requests.labels(endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes; the rest of a declared-too-large body is drained (up to a
    bound) so that the client reads a clean 413 instead of a reset connection."""
    declared = request.headers.get("content-length")
    too_large = ClientError(413, "too_large", f"the upload is larger than the {limit:,} bytes accepted "
                                              f"(--max-upload-mb)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= max(4 * limit, 64 << 20):
            async for _ in request.stream():
                pass
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _images(request: Request, limit: int, max_batch: int) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each uploaded image: multipart `image` fields, or the raw body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, limit)
    if ctype == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive=replay).form(max_files=4 * max_batch + 16, max_fields=64)
        except HTTPException as exc:
            raise ClientError(400, "bad_multipart", f"unreadable multipart body: {exc.detail}") from None
        try:
            values = form.getlist(FIELD)
            if not values:
                names = sorted(set(form.keys()))
                raise ClientError(400, "missing_field", f"no '{FIELD}' field in the form"
                                  + (f" (fields: {', '.join(names)[:200]})" if names else " (it is empty)"))
            if any(isinstance(v, str) for v in values):
                raise ClientError(400, "missing_field", f"'{FIELD}' must be a file upload, not a text field")
            if len(values) > max_batch:
                raise ClientError(413, "too_many_images", f"{len(values)} images in one request; at most "
                                                          f"{max_batch} (--max-batch)")
            return [(v.filename, await v.read()) for v in values]
        finally:
            await form.close()
    if ctype and not ctype.startswith(RAW_TYPES):
        raise ClientError(415, "unsupported_media_type",
                          f"Content-Type {ctype!r}: send the image's bytes (image/* or application/octet-stream) "
                          f"or multipart/form-data with an '{FIELD}' file field")
    if not body:
        raise ClientError(400, "missing_field", f"empty body: send an image, or multipart/form-data with an "
                                                f"'{FIELD}' file field")
    return [(None, body)]


def create_app(workers: Workers, *, max_upload: int = 10 << 20, max_batch: int = 64, strict: bool = False,
               max_pixels: int = MAX_PIXELS) -> Starlette:
    """The ASGI app around a loaded worker pool."""
    bundle = workers.bundle
    metrics = Metrics(workers)
    model = workers.describe()
    page = resources.files("compress.serve").joinpath("page.html").read_text(encoding="utf-8")
    started = time.time()

    def error(endpoint: str, status: int, reason: str, message: str) -> JSONResponse:
        metrics.errors.labels(endpoint, reason).inc()
        return JSONResponse({"error": message, "reason": reason}, status_code=status)

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            top_k = request.query_params.get("top_k", "5")
            if not top_k.isdigit() or not 1 <= int(top_k) <= 1000:
                raise ClientError(400, "bad_parameter", f"top_k={top_k[:20]!r}: expected an integer from 1 to 1000")
            images = await _images(request, max_upload, max_batch)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                workers.pool, lambda: workers.predict(images, top_k=int(top_k), strict=strict, max_pixels=max_pixels))
        except ClientError as exc:
            return error("/predict", exc.status, exc.reason, str(exc))
        except ImageError as exc:
            return error("/predict", exc.status, exc.reason, str(exc))
        metrics.images.inc(len(images))
        metrics.inference.observe(result["inference_ms"] / 1e3)
        latency = {"preprocess": result["preprocess_ms"], "inference": result["inference_ms"],
                   "total": (time.perf_counter() - t0) * 1e3}
        return JSONResponse({"model": model, "predictions": result["predictions"],
                             "latency_ms": {k: round(v, 3) for k, v in latency.items()}})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model, "labels": bundle.labels, "workers": workers.count,
                             "threads_per_worker": workers.threads, "provider": workers.provider,
                             "max_upload_bytes": max_upload, "max_batch": max_batch, "strict": strict,
                             "uptime_s": round(time.time() - started, 1)})

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        return error(endpoint, exc.status_code, reason, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback on the server (uvicorn's error log); the client learns only this.
        return JSONResponse({"error": "internal server error; the server log has the details",
                             "reason": "internal"}, status_code=500)

    app = Starlette(routes=[Route("/", index, methods=["GET"]), Route("/predict", predict, methods=["POST"]),
                            Route("/health", health, methods=["GET"]), Route("/metrics", metrics_text, methods=["GET"])],
                    middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.metrics = metrics
    return app
