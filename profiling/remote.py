"""The client of the device agent (`profiling.agent`): measure, build engines and run
inference on a device that is not this machine, e.g. a Jetson on the network.

Connection faults and a busy agent are retried with exponential backoff (an agent on
Wi-Fi drops connections; a shared one queues); a refused token or a bad model is not,
since asking again gives the same answer.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

import deeplsp
from deeplsp.atomic import atomic_path, write_json
from deeplsp.errors import DeepLSPError, first_line
from devices.config import ENV_TOKEN, check_url
from profiling.onnx_inputs import onnx_input_specs
from profiling.runner import LatencyStats, Runner

if TYPE_CHECKING:
    from export.tensorrt_export import EngineConfig

# The agent protocol, shared with profiling.agent (defined here so that the client does
# not import the server's framework).
API_VERSION = 2  # 2: /v1/profile takes kernels_except
ENGINE_METADATA_HEADER = "X-DeepLSP-Engine-Metadata"
# /v1/infer: npz keys of the model's bytes and of each input (prefixed, so an input may
# be called "model"), and of each output in the answer.
NPZ_MODEL = "model"
NPZ_INPUT = "inputs/"
NPZ_OUTPUT = "outputs/"
NPZ_CALIBRATION = "calibration/"  # /v1/engine?calibrated=true: int8 batches, by index
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
KINDS = ("onnx", "engine")
# Faults of the connection, not answers of the agent: worth another try.
_CONNECTION_FAULTS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


class AgentUnreachable(DeepLSPError):
    """No connection to the agent, after retries."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the DeepLSP agent at {url}: {reason}; "
            "is `deeplsp agent serve` running there?"
        )


class AgentAuthError(DeepLSPError):
    """The agent refused the token, or there is none to send."""


class AgentError(DeepLSPError):
    """The agent answered with an error (4xx/5xx); `status` is its HTTP status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AgentBusy(AgentError):
    """The agent's queue stayed full through every retry."""


def _agent_message(resp: httpx.Response) -> str:
    """The one-line error of an agent's answer (or what a proxy in between said)."""
    try:
        message = resp.json().get("error")
    except (ValueError, AttributeError):
        message = None
    if not message:
        text = resp.text.strip()
        message = text.splitlines()[0] if text else f"HTTP {resp.status_code} {resp.reason_phrase}"
    return first_line(Exception(message))


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["retry-after"]))
    except (KeyError, ValueError):  # absent, or an HTTP date: use the backoff instead
        return None


class AgentClient:
    """One agent at `url`, reached with `token` (sent as `Authorization: Bearer`)."""

    max_retry_after_s = 30.0  # the longest a Retry-After of a busy agent is honoured

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float = 900,
        connect_timeout_s: float = 10,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.url = check_url(url)
        if not token:
            raise AgentAuthError(
                f"no token for the DeepLSP agent at {self.url}: set {ENV_TOKEN} or the "
                "device's token_file to the agent's token"
            )
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise AgentAuthError(f"the token for {self.url} has spaces or non-ASCII characters")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0 or connect_timeout_s <= 0:
            raise DeepLSPError("retries and backoff must be >= 0 and timeouts > 0")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(
            base_url=self.url,
            headers={
                "Authorization": f"Bearer {token}",
                "User-Agent": f"deeplsp/{deeplsp.__version__}",
            },
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the token
        return f"AgentClient({self.url!r})"

    # -- requests ------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: Path | bytes | None = None,
    ) -> httpx.Response:
        """Send one request, retrying connection faults and a busy agent; 2xx or a clear error."""
        headers = {"Content-Type": "application/octet-stream"} if body is not None else None
        attempt = 0
        while True:
            try:
                if isinstance(body, Path):  # reopened per attempt, streamed with its length
                    with body.open("rb") as f:
                        resp = self._http.request(
                            method, path, params=params, content=f, headers=headers
                        )
                else:
                    resp = self._http.request(
                        method, path, params=params, content=body, headers=headers
                    )
            except _CONNECTION_FAULTS as exc:
                if attempt >= self.retries:
                    raise AgentUnreachable(self.url, first_line(exc)) from exc
                delay = self.backoff_s * 2**attempt
            except httpx.TimeoutException as exc:  # connected, but no answer in time
                raise AgentError(
                    f"{self.url}: no answer within {self.timeout_s:g} s "
                    f"({type(exc).__name__}); the agent may still be working, raise timeout_s"
                ) from exc
            except httpx.HTTPError as exc:
                raise AgentError(f"{self.url}: {first_line(exc)}") from exc
            else:
                if resp.status_code != 503 or attempt >= self.retries:
                    return self._check(resp)
                wait = _retry_after(resp)
                delay = self.backoff_s * 2**attempt if wait is None else wait
                delay = min(delay, self.max_retry_after_s)
            attempt += 1
            time.sleep(delay)

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.is_success:
            return resp
        message = _agent_message(resp)
        if resp.status_code == 401:
            raise AgentAuthError(
                f"the agent at {self.url} refused the token ({message}): set {ENV_TOKEN} or "
                "token_file to the agent's token"
            )
        if resp.status_code == 503:
            raise AgentBusy(f"{self.url}: {message}", resp.status_code)
        raise AgentError(f"{self.url}: {message}", resp.status_code)

    @staticmethod
    def _model_file(path: str | Path) -> Path:
        path = Path(path)
        if not path.is_file():
            raise DeepLSPError(f"model file {path} does not exist")
        return path

    # -- API -----------------------------------------------------------------------
    def info(self) -> dict:
        """The agent's version, device, fingerprint and queue."""
        info = self._request("GET", "/v1/info").json()
        if info.get("api") != API_VERSION:
            raise AgentError(
                f"{self.url}: the agent speaks API {info.get('api')}, this client {API_VERSION}; "
                "install the same deeplsp version on both machines"
            )
        return info

    def profile(
        self,
        path: str | Path,
        warmup: int,
        iters: int,
        repeats: int = 3,
        kind: str = "onnx",
        kernels_except: Sequence[str] | None = None,
    ) -> LatencyStats:
        """Latency of a model file measured on the agent's device (warm-up and repeats there);
        with `kernels_except`, a one-layer file's kernel time (`target.measure_layers`)."""
        if kind not in KINDS:
            raise DeepLSPError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
        if warmup < 0 or iters < 1 or repeats < 1:
            raise DeepLSPError(
                f"warmup must be >= 0, iters and repeats >= 1 (got {warmup}, {iters}, {repeats})"
            )
        params = {"kind": kind, "warmup": warmup, "iters": iters, "repeats": repeats}
        if kernels_except is not None:
            params["kernels_except"] = ",".join(kernels_except)
        data = self._request(
            "POST", "/v1/profile", params=params, body=self._model_file(path)
        ).json()
        known = {f.name for f in fields(LatencyStats)}
        stats = {k: v for k, v in data.items() if k in known}
        stats["settings"] = {
            **(data.get("settings") or {}),
            "agent_url": self.url,
            "fingerprint_id": data.get("fingerprint_id"),
        }
        return LatencyStats(**stats)

    def build_engine(
        self,
        onnx_path: str | Path,
        engine_path: str | Path,
        config: EngineConfig | None = None,
        calibration: Sequence[np.ndarray] | None = None,
    ) -> dict:
        """Build the device's TensorRT engine on the device (`config`'s precision,
        workspace and sparsity, else the device's defaults; int8 calibrated with
        `calibration`, uploaded with the model); writes `engine_path` and
        `engine_path`.json beside it (each atomically), returns the metadata."""
        onnx_path = self._model_file(onnx_path)
        params: dict = {}
        if config is not None:
            params = {"precision": config.precision, "workspace_mb": config.workspace_mb}
            params["sparse"] = config.sparse
        body: Path | bytes = onnx_path
        if calibration:
            arrays = {NPZ_MODEL: np.frombuffer(onnx_path.read_bytes(), dtype=np.uint8)}
            arrays.update(
                {f"{NPZ_CALIBRATION}{i}": np.asarray(b) for i, b in enumerate(calibration)}
            )
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            body, params["calibrated"] = buf.getvalue(), True
        resp = self._request("POST", "/v1/engine", params=params, body=body)
        try:
            meta = json.loads(resp.headers[ENGINE_METADATA_HEADER])
        except (KeyError, ValueError) as exc:
            raise AgentError(f"{self.url}: the engine came without valid metadata") from exc
        engine_path = Path(engine_path)
        write_json(f"{engine_path}.json", meta)  # first: an engine is never without it
        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(resp.content)
        return meta

    def infer(self, path: str | Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a model file once on the device; its outputs by name."""
        path = self._model_file(path)
        arrays = {NPZ_MODEL: np.frombuffer(path.read_bytes(), dtype=np.uint8)}
        for name, value in inputs.items():
            value = np.ascontiguousarray(value)
            if value.dtype.hasobject:
                raise DeepLSPError(f"input {name!r} is an object array; send numeric arrays")
            arrays[NPZ_INPUT + name] = value
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        kind = "engine" if path.suffix in ENGINE_SUFFIXES else "onnx"
        resp = self._request("POST", "/v1/infer", params={"kind": kind}, body=buf.getvalue())
        try:
            with np.load(io.BytesIO(resp.content), allow_pickle=False) as npz:
                return {k[len(NPZ_OUTPUT) :]: npz[k] for k in npz.files if k.startswith(NPZ_OUTPUT)}
        except (ValueError, OSError, EOFError) as exc:
            raise AgentError(
                f"{self.url}: the outputs are not a valid .npz: {first_line(exc)}"
            ) from exc


class RemoteRunner(Runner):
    """A model file on the agent's device behind the one Runner interface.

    `measure` is one request: the agent warms up and times on its device. Inputs of
    an engine are read from `onnx_path` (the ONNX it was built from).
    """

    name = "remote"

    def __init__(
        self,
        client: AgentClient,
        model: str | Path,
        onnx_path: str | Path | None = None,
        repeats: int = 1,
    ) -> None:
        super().__init__()
        self.client = client
        self.model = Path(model)
        self.kind = "engine" if self.model.suffix in ENGINE_SUFFIXES else "onnx"
        self.onnx_path = (
            Path(onnx_path) if onnx_path else self.model if self.kind == "onnx" else None
        )
        self.repeats = repeats
        self._info: dict | None = None

    def _activate_impl(self) -> None:
        AgentClient._model_file(self.model)
        self._info = self.client.info()

    def _deactivate_impl(self) -> None:
        self._info = None

    def _input_specs_impl(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        if self.onnx_path is None:
            raise DeepLSPError(
                f"{self.model} is an engine: pass onnx_path= (the ONNX it was built from) "
                "to know its inputs"
            )
        return onnx_input_specs(self.onnx_path)

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.client.infer(self.model, feed)

    def measure(
        self, inputs: dict[str, np.ndarray] | None = None, warmup: int = 10, iters: int = 50
    ) -> LatencyStats:
        """Latency measured by the agent, on random inputs of the model's fixed shapes:
        given `inputs` are checked against those shapes but not sent (their values do
        not change a CNN's latency, and uploading them per call would)."""
        self._require_active()
        if inputs is not None and self.onnx_path is not None:
            specs = self.input_specs()
            got = {k: tuple(np.shape(v)) for k, v in inputs.items()}
            want = {k: shape for k, (shape, _) in specs.items()}
            if got != want:
                raise DeepLSPError(f"input shapes {got} do not match the model's {want}")
        return self.client.profile(self.model, warmup, iters, self.repeats, kind=self.kind)

    def settings(self) -> dict:
        fp = (self._info or {}).get("fingerprint", {})
        return {"runtime": "remote", "agent_url": self.client.url, "fingerprint_id": fp.get("id")}
