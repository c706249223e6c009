"""The device agent: a small HTTP server on the device (a Jetson) that measures,
builds engines and runs inference there for a pruner on another machine.

TensorRT engines only run on the GPU that built them, so the workstation uploads
ONNX files and the agent does the device work with `profiling.target` (the very
functions a local run uses), one job at a time so timings never overlap.

Hardening, because it listens on a network: every request needs the bearer token;
uploads are size-limited (declared and counted), streamed to a temp dir that is
always removed, and read completely before a job takes the device, so a client
that stalls or vanishes mid-upload holds nothing; uploads are never unpickled.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import deeplsp
from deeplsp.errors import DeepLSPError, first_line
from devices.config import ENV_TOKEN as TOKEN_ENV
from devices.spec import DeviceSpec
from profiling import target
from profiling.remote import (
    API_VERSION,
    ENGINE_METADATA_HEADER,
    NPZ_CALIBRATION,
    NPZ_INPUT,
    NPZ_MODEL,
    NPZ_OUTPUT,
)

MIN_TOKEN_CHARS = 16
MAX_WARMUP = 10_000
MAX_ITERS = 100_000
MAX_REPEATS = 100
MAX_WORKSPACE_MB = 1 << 20

Kind = Literal["onnx", "engine"]
log = logging.getLogger("deeplsp.agent")


# -- tokens ---------------------------------------------------------------------------
def generate_token() -> str:
    """A new random agent token (for `deeplsp agent token`)."""
    return secrets.token_urlsafe(32)


def load_agent_token(token_file: Path | None = None) -> str:
    """The agent's token: $DEEPLSP_AGENT_TOKEN, else `token_file` (which only its
    owner may read). Never from the command line, where `ps` and shell history show it."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        token, source = env, f"${TOKEN_ENV}"
    elif token_file is not None:
        path = Path(token_file).expanduser()
        try:
            mode = path.stat().st_mode
            if os.name == "posix" and mode & 0o077:
                raise DeepLSPError(
                    f"agent token file {path} is accessible to other users "
                    f"(mode {mode & 0o777:o}); run `chmod 600 {path}`"
                )
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeepLSPError(
                f"cannot read the agent token file {path}: {first_line(exc)}"
            ) from exc
        source = str(path)
    else:
        raise DeepLSPError(
            f"the agent needs a token: set {TOKEN_ENV}, or put it in a file only you can "
            "read (chmod 600) and pass --token-file; make one with `deeplsp agent token`"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise DeepLSPError(
            f"the agent token from {source} is too short ({len(token)} characters, at least "
            f"{MIN_TOKEN_CHARS}); make one with `deeplsp agent token`"
        )
    return token


# -- errors ---------------------------------------------------------------------------
class _HTTPError(Exception):
    """An error answered as {"error": message} with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        got = f"={err['input']}" if isinstance(err.get("input"), str | int | float) else ""
        parts.append(f"{where}{got}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# -- the device queue -----------------------------------------------------------------
class _Jobs:
    """Admits at most `max_queue` jobs ahead of the running one, and runs one at a time.

    A job counts as waiting from admission (before its upload) until it takes the
    device; the upload happens before it competes for the device.
    """

    def __init__(self, max_queue: int, measure_timeout_s: float) -> None:
        self.max_queue = max_queue
        self.measure_timeout_s = measure_timeout_s
        self.waiting = 0
        self.running = 0
        self.lock = asyncio.Lock()
        self.last_duration_s = 1.0

    def state(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "max": self.max_queue}

    def admit(self) -> None:
        if self.waiting >= self.max_queue:
            retry = max(1, min(60, math.ceil(self.last_duration_s)))
            raise _HTTPError(
                503,
                f"device busy: {self.waiting} measurements queued, limit {self.max_queue}",
                {"Retry-After": str(retry)},
            )
        self.waiting += 1

    async def run(self, request: Request, upload: _Upload, work: Callable[[Path], Any]) -> Any:
        """Receive the upload, then run `work(path)` in a thread with the device to itself."""
        self.admit()
        workdir = Path(tempfile.mkdtemp(prefix="deeplsp-agent-"))
        handed_off = False  # once the job task owns workdir, it removes it
        try:
            try:
                path = workdir / upload.filename
                await upload.receive(request, path)
                await self.lock.acquire()
            finally:
                self.waiting -= 1
            try:
                gone = await request.is_disconnected()
            except BaseException:
                self.lock.release()
                raise
            if gone:  # nobody is left to answer: do not spend the device on it
                self.lock.release()
                raise _HTTPError(400, "the client disconnected before its job started")
            self.running += 1
            started = time.monotonic()
            timed_out = False

            def finished(task: asyncio.Task) -> None:
                self.running -= 1
                self.last_duration_s = time.monotonic() - started
                self.lock.release()
                shutil.rmtree(workdir, ignore_errors=True)
                if not task.cancelled() and task.exception() is not None and timed_out:
                    log.error(
                        "job that exceeded the time limit failed later: %s",
                        first_line(task.exception()),
                    )

            task = asyncio.ensure_future(anyio.to_thread.run_sync(work, path))
            task.add_done_callback(finished)
            handed_off = True
            try:
                return await asyncio.wait_for(asyncio.shield(task), self.measure_timeout_s)
            except asyncio.TimeoutError:  # noqa: UP041 - not TimeoutError on 3.10 (JetPack 6)
                timed_out = True
                raise _HTTPError(
                    504,
                    f"the job exceeded the agent's limit of {self.measure_timeout_s:g} s "
                    "(the device stays busy until it ends)",
                ) from None
            except DeepLSPError as exc:
                raise _HTTPError(400, _strip_workdir(first_line(exc), str(workdir))) from exc
            except Exception as exc:
                log.exception("job failed")
                message = _strip_workdir(first_line(exc), str(workdir))
                raise _HTTPError(500, f"agent error: {message}") from exc
        finally:
            if not handed_off:
                shutil.rmtree(workdir, ignore_errors=True)


class _Upload:
    """Streams a request body to a file, within a size limit and a per-chunk deadline."""

    def __init__(self, filename: str, max_bytes: int, read_timeout_s: float) -> None:
        self.filename, self.max_bytes, self.read_timeout_s = filename, max_bytes, read_timeout_s

    def too_large(self, size: str = "") -> _HTTPError:
        what = f"upload of {size}" if size else "upload"
        return _HTTPError(413, f"{what} exceeds the agent's limit of {self.max_bytes} bytes")

    async def receive(self, request: Request, path: Path) -> None:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _HTTPError(400, f"bad Content-Length {declared!r}")
            if int(declared) > self.max_bytes:
                raise self.too_large(f"{declared} bytes")
        total = 0
        chunks = request.stream().__aiter__()
        with path.open("wb") as f:
            while True:
                try:
                    with anyio.fail_after(self.read_timeout_s):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise _HTTPError(
                        408,
                        f"upload stalled: no data for {self.read_timeout_s:g} s",
                        {"Connection": "close"},
                    ) from None
                except ClientDisconnect:
                    log.info("client disconnected during its upload (%d bytes received)", total)
                    raise _HTTPError(400, "the client disconnected during the upload") from None
                total += len(chunk)
                if total > self.max_bytes:
                    raise self.too_large()
                f.write(chunk)
        if total == 0:
            raise _HTTPError(400, "empty upload: send the file as the request body")


# -- /v1/infer payloads -----------------------------------------------------------------
def _read_model_npz(
    path: Path, max_bytes: int, prefix: str = NPZ_INPUT
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model bytes and the arrays under `prefix` (inputs of an infer request,
    calibration batches of an engine build); never unpickles anything."""
    try:
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
        if unpacked > 2 * max_bytes:  # a compressed npz must not unpack without bound
            raise DeepLSPError(f"the request unpacks to {unpacked} bytes, over the limit")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DeepLSPError(f"the request is not a valid .npz: {first_line(exc)}") from exc
    model = arrays.pop(NPZ_MODEL, None)
    if model is None or model.dtype != np.uint8 or model.ndim != 1:
        raise DeepLSPError(f"the request has no {NPZ_MODEL!r} array of the model's bytes")
    stray = [k for k in arrays if not k.startswith(prefix)]
    if stray:
        raise DeepLSPError(f"the request has unexpected arrays {stray}")
    return model.tobytes(), {k[len(prefix) :]: v for k, v in arrays.items()}


def _outputs_npz(outputs: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{NPZ_OUTPUT + k: np.asarray(v) for k, v in outputs.items()})
    return buf.getvalue()


def _strip_workdir(value: Any, workdir: str) -> Any:
    """Metadata as the client should see it: the agent's temp paths reduced to file names."""
    if isinstance(value, str):
        return value.replace(workdir + os.sep, "")
    if isinstance(value, dict):
        return {k: _strip_workdir(v, workdir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strip_workdir(v, workdir) for v in value]
    return value


# -- the app --------------------------------------------------------------------------
def create_app(
    device: DeviceSpec,
    token: str,
    *,
    max_upload_bytes: int = 512 * 2**20,
    max_queue: int = 8,
    measure_timeout_s: float = 900,
    read_timeout_s: float = 60,
) -> FastAPI:
    """The agent's ASGI app serving `device`, which is local to the agent."""
    if len(token) < MIN_TOKEN_CHARS:
        raise DeepLSPError(f"the agent token must have at least {MIN_TOKEN_CHARS} characters")
    if max_upload_bytes < 1 or max_queue < 1 or measure_timeout_s <= 0 or read_timeout_s <= 0:
        raise DeepLSPError("agent limits must be positive")
    device = replace(device, url=None)  # the agent measures here, never through another agent
    fingerprint = target.fingerprint(device)
    jobs = _Jobs(max_queue, measure_timeout_s)
    token_bytes = token.encode()

    def upload(filename: str) -> _Upload:
        return _Upload(filename, max_upload_bytes, read_timeout_s)

    def check_token(request: Request) -> None:
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise _HTTPError(401, "missing token: send 'Authorization: Bearer <token>'", challenge)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token_bytes
        ):
            raise _HTTPError(401, "invalid token", challenge)

    app = FastAPI(
        title="DeepLSP agent",
        version=deeplsp.__version__,
        dependencies=[Depends(check_token)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(_HTTPError)
    async def _on_agent_error(request: Request, exc: _HTTPError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, first_line(Exception(exc.detail)), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, f"agent error: {first_line(exc)}")

    @app.get("/v1/info")
    async def info() -> dict:
        return {
            "agent": "deeplsp",
            "version": deeplsp.__version__,
            "api": API_VERSION,
            "device": device.to_dict(),
            "fingerprint": fingerprint,
            "queue": jobs.state(),
            "limits": {
                "max_upload_bytes": max_upload_bytes,
                "measure_timeout_s": measure_timeout_s,
                "read_timeout_s": read_timeout_s,
            },
        }

    @app.post("/v1/profile")
    async def profile(
        request: Request,
        kind: Kind = "onnx",
        warmup: Annotated[int, Query(ge=0, le=MAX_WARMUP)] = 10,
        iters: Annotated[int, Query(ge=1, le=MAX_ITERS)] = 50,
        repeats: Annotated[int, Query(ge=1, le=MAX_REPEATS)] = 3,
        kernels_except: Annotated[str | None, Query(max_length=1000)] = None,
    ) -> dict:
        """With `kernels_except` (op types, comma-separated), the ONNX file is one layer of
        the latency table, timed as `target.measure_layers` times it here."""

        def work(path: Path):
            if kind == "engine":
                return target.measure_engine(device, path, warmup, iters, repeats)
            if kernels_except is not None:
                harness = kernels_except.split(",")
                return next(target.measure_layers(device, [path], warmup, iters, harness))
            return target.measure(device, path, warmup, iters, repeats)

        stats = await jobs.run(request, upload(f"model.{kind}"), work)
        return {**stats.to_dict(), "fingerprint_id": fingerprint["id"]}

    @app.post("/v1/engine")
    async def engine(
        request: Request,
        precision: Literal["fp32", "fp16", "int8"] | None = None,
        workspace_mb: Annotated[int | None, Query(ge=1, le=MAX_WORKSPACE_MB)] = None,
        sparse: bool = False,
        calibrated: bool = False,
    ) -> Response:
        """Body: the ONNX file; with `calibrated` (int8), an npz of the ONNX bytes and
        the calibration batches (NPZ_MODEL, NPZ_CALIBRATION + index)."""

        def work(path: Path) -> tuple[dict, bytes]:
            config = target.engine_config(
                device, precision=precision, workspace_mb=workspace_mb, sparse=sparse
            )
            calibration = None
            if calibrated:
                model, arrays = _read_model_npz(path, max_upload_bytes, NPZ_CALIBRATION)
                calibration = [arrays[k] for k in sorted(arrays, key=int)]
                path = path.with_name("model.onnx")
                path.write_bytes(model)
            engine_path = path.with_suffix(".engine")
            meta = target.build_engine(device, path, engine_path, calibration, config)
            return _strip_workdir(meta, str(path.parent)), engine_path.read_bytes()

        name = "request.npz" if calibrated else "model.onnx"
        meta, data = await jobs.run(request, upload(name), work)
        header = json.dumps(meta, default=str)  # ASCII, one line: fits a header
        return Response(
            data, media_type="application/octet-stream", headers={ENGINE_METADATA_HEADER: header}
        )

    @app.post("/v1/infer")
    async def infer(request: Request, kind: Kind = "onnx") -> Response:
        def work(path: Path) -> bytes:
            model, inputs = _read_model_npz(path, max_upload_bytes)
            model_path = path.with_name(f"model.{kind}")
            model_path.write_bytes(model)
            return _outputs_npz(target.infer(device, model_path, inputs))

        data = await jobs.run(request, upload("request.npz"), work)
        return Response(data, media_type="application/octet-stream")

    return app


# -- serving --------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it resolves to a network interface
        return False


def serve(
    device: DeviceSpec,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    token: str,
    **limits: Any,
) -> None:
    """Run the agent until interrupted (`deeplsp agent serve`)."""
    import uvicorn

    app = create_app(device, token, **limits)
    if not logging.getLogger("deeplsp").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logging.getLogger("deeplsp").addHandler(handler)
        logging.getLogger("deeplsp").setLevel(logging.INFO)
    if not _is_loopback(host):
        print(
            f"warning: the agent listens on {host}, reachable from the network "
            "(the token is still required; prefer an SSH tunnel or a trusted network)",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"DeepLSP agent {deeplsp.__version__} serving device {device.name!r} "
        f"({device.backend}) at http://{shown}:{port}",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_keep_alive=30,
        limit_concurrency=max(64, 4 * limits.get("max_queue", 8)),
    )
    uvicorn.Server(config).run()
