"""`compress serve`: a deploy bundle behind HTTP, with a page to try it.

    POST /predict   an image (raw bytes, or multipart field `image`; repeat the field for a
                    batch) -> top-k labels and scores, the model's name and sha256, latency
    GET  /health    the model, its input, labels and the server's limits
    GET  /metrics   Prometheus text: requests by endpoint and code, errors by reason,
                    request and inference latency histograms
    GET  /          a self-contained page: drop or pick an image, see the top-5

The bundle is verified before the socket opens (every file's sha256 against its manifest), so
a server answers with the model the manifest names or does not start. Starlette on uvicorn; the
inference runs in `workers` threads, each with its own ONNX Runtime (or OpenVINO) session
(workers.py says why threads). Nothing here imports torch: the server starts in about a second.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from compress.serve.bundle import Bundle, BundleError, ImageError, load_bundle

__all__ = ["Bundle", "BundleError", "ImageError", "load_bundle", "serve"]


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise BundleError(f"--host {host!r}: cannot resolve it ({exc})") from None
    family, kind, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every keep-alive answer waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BundleError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(bundle_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int | None = None,
          max_upload_mb: float = 10.0, max_batch: int = 64, strict: bool = False, runtime: str = "auto",
          log: Callable[[str], None] = print) -> None:
    """Verify the bundle, load `workers` runtime sessions, listen, and serve until Ctrl-C or SIGTERM.

    Raises BundleError (one line) for anything that stops it from starting.
    """
    if not 0 <= port <= 65535:
        raise BundleError(f"--port {port}: expected 0 (any free port) to 65535")
    if workers is not None and not 1 <= workers <= 256:
        raise BundleError(f"--workers {workers}: expected 1 to 256")
    if not 0 < max_upload_mb <= 4096:
        raise BundleError(f"--max-upload-mb {max_upload_mb:g}: expected more than 0 and at most 4096")
    if not 1 <= max_batch <= 4096:
        raise BundleError(f"--max-batch {max_batch}: expected 1 to 4096")
    try:
        import uvicorn

        from compress.serve.app import create_app
        from compress.serve.workers import Workers, default_workers
    except ImportError as exc:
        from compress import install_hint

        raise BundleError(f"compress serve needs {exc.name or 'its web stack'}: {install_hint('serve')}") from None

    bundle = load_bundle(bundle_dir)
    pool = Workers(bundle, workers or default_workers(), runtime=runtime)
    try:
        sock = _listen(host, port)
        app = create_app(pool, max_upload=int(max_upload_mb * (1 << 20)), max_batch=max_batch, strict=strict)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                               lifespan="off", timeout_graceful_shutdown=5))
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log(f"serving {bundle.name} ({bundle.precision}, {pool.model_path.name} sha256 {pool.model_sha256[:12]}) "
            f"from {bundle.root} on http://{shown}:{bound_port} with {pool.count} worker"
            f"{'s' if pool.count > 1 else ''} ({pool.provider}); Ctrl-C stops")
        if not ipaddress.ip_address(bound_host).is_loopback:
            log(f"note: {host} is reachable from other machines, and the server has no authentication")
        _run_until_stopped(server, sock)
        log("stopped")
    finally:
        pool.close()


class _Stopped(Exception):
    pass


def _run_until_stopped(server, sock: socket.socket) -> None:
    """uvicorn drains open requests on SIGINT/SIGTERM, then raises the signal again for the default
    handler (which would kill the process by SIGTERM, or end it in a KeyboardInterrupt traceback);
    here that second signal ends `serve` normally instead."""
    def stopped(signum, frame):
        raise _Stopped

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
