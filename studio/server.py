"""OpenAI-compatible HTTP server over one Engine: `studio serve --base tiny-moe --adapters law@prod,medicine@prod`.

    GET  /v1/models              the base and the served adapter references
    POST /v1/chat/completions    `model` = the base id or a registry reference (law, law@v3, law@prod); stream=true
    POST /v1/completions         the same for raw text or token-id prompts (a list of prompts is one batch);
                                 logprobs / echo / max_tokens 0 score prompts, as evaluation harnesses need
    POST /v1/load_lora_adapter   vLLM's dynamic LoRA: {"lora_name", "lora_path"}: a PEFT directory under
                                 --allowed-lora-roots (registered as domain `lora_name`) or a registry reference
    POST /v1/unload_lora_adapter {"lora_name"}: evict it and stop serving the name
    GET  /health                 liveness + what is loaded
    GET  /metrics                Prometheus text: requests, tokens, latency, adapter loads/switches, resident

Aliases are resolved on every request, so `studio registry promote law@v4 prod` takes effect on the next request.
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 404 for an unknown model, 400 for
malformed JSON, bad parameters, or a prompt / max_tokens over the limits, 401 for a missing or wrong API key.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (request bodies built at
# run time) and needs them evaluated.

import argparse
import json
import logging
import os
import threading
import time
import uuid
import warnings
from typing import Literal

from studio.errors import ModelError, RegistryError, RequestError, StudioError

logger = logging.getLogger(__name__)

API_KEY_ENV = "STUDIO_API_KEY"
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_COMPLETION_LOGPROBS = 5   # OpenAI's legacy completions limit for `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20    # OpenAI's chat limit for `top_logprobs`
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body; 4 MiB holds ~1M tokens of prompt text
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

# Request fields accepted and deliberately without effect on the output, as in OpenAI's API (`user` is an end-user id
# for abuse monitoring). Every other field a handler does not read is refused with a 400 naming it, never ignored.
PASSTHROUGH_FIELDS = {"user"}


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status)


# --------------------------------------------------------------------------- request bodies


def _request_models():
    """Pydantic request bodies (built lazily so importing this module does not import FastAPI)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant"]
        content: str

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, metadata, ...) are ignored
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        top_k: int = Field(default=0, ge=0)
        n: int = 1
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
        # OpenAI's ranges; logit_bias keys are token ids as strings (JSON object keys), values in [-100, 100]
        logit_bias: dict[str, float] | None = None
        presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    class CompletionRequest(Common):
        # one text, a batch of texts, one token-id list, or a batch of token-id lists (what harnesses send)
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False
        logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
        max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt only

    class LoadLora(BaseModel):
        model_config = ConfigDict(extra="allow")  # vLLM's load_inplace, lora_int_id, ... are accepted and ignored
        lora_name: str = Field(min_length=1)
        lora_path: str = Field(min_length=1)

    class UnloadLora(BaseModel):
        model_config = ConfigDict(extra="allow")
        lora_name: str = Field(min_length=1)

    return ChatRequest, CompletionRequest, LoadLora, UnloadLora


def check_fields(body) -> None:
    """Refuse what this server would otherwise silently ignore: unknown fields, and OpenAI parameters it cannot
    honour (structured output, tools, suffix, best_of > 1). Values it can honour trivially pass."""
    extra = dict(body.model_extra or {})
    fmt = extra.pop("response_format", None)
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in ("json_object", "json_schema"):
            raise APIError(400, f"response_format type {kind!r} is not supported: this server does not constrain "
                                "output to JSON; drop response_format or use {\"type\": \"text\"}",
                           param="response_format")
        if kind != "text" or set(fmt) != {"type"}:
            raise APIError(400, f"invalid response_format {str(fmt)[:80]!r}: expected {{\"type\": \"text\"}} "
                                "(json_object and json_schema are not supported)", param="response_format")
    tools = extra.pop("tools", None)
    if tools not in (None, []):
        raise APIError(400, "tools are not supported by this server (no function calling); drop `tools`",
                       param="tools")
    choice = extra.pop("tool_choice", None)
    if choice not in (None, "none"):
        raise APIError(400, f"tool_choice={str(choice)[:60]!r} is not supported (no function calling); drop it or "
                            "send \"none\"", param="tool_choice")
    suffix = extra.pop("suffix", None)
    if suffix not in (None, ""):
        raise APIError(400, "suffix (insertion after the completion) is not supported; drop `suffix`",
                       param="suffix")
    best_of = extra.pop("best_of", None)
    if best_of is not None and (isinstance(best_of, bool) or best_of != 1):
        raise APIError(400, f"best_of={str(best_of)[:40]} is not supported: this server returns one candidate "
                            "per prompt (best_of=1)", param="best_of")
    unknown = sorted(k for k in extra if k not in PASSTHROUGH_FIELDS)
    if unknown:
        raise APIError(400, f"unknown or unsupported parameter(s): {', '.join(map(repr, unknown))[:200]}; this "
                            "server does not ignore parameters silently: remove them", param=unknown[0][:64])


def _bad_text(value) -> str | None:
    """Why a string cannot be UTF-8 encoded (a lone surrogate such as "\\ud800" in JSON), else None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds an unpaired surrogate ({value[exc.start]!a}) at character {exc.start}, which is not text"
    return None


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before it is buffered: at once from its Content-Length, or,
    for a chunked upload, as soon as the bytes received pass the limit. (FastAPI's own `max_body_size` answers the
    Content-Length case in plain text, not in OpenAI's error shape.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return (f"the request body is over this server's limit of {self.max_bytes:,} bytes; send a shorter prompt, "
                "or start the server with a larger --max-body-bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            from fastapi.responses import JSONResponse

            err = APIError(413, self.message(), code="request_too_large")
            return await JSONResponse(err.body(), status_code=413, headers={"connection": "close"})(
                scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self.message())  # FastAPI re-raises it to the handler below
            return message

        await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics of one server (its own registry, so several servers in one process do not clash)."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("studio_requests", "HTTP requests by endpoint, model and status code",
                                ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("studio_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("studio_completion_tokens", "Tokens generated", ["model"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.latency = Histogram("studio_request_latency_seconds", "Request latency (to the last token)",
                                 ["endpoint"], buckets=buckets, registry=r)
        self.ttft = Histogram("studio_time_to_first_token_seconds", "Time to the first generated token",
                              ["endpoint"], buckets=buckets, registry=r)
        self.in_flight = Gauge("studio_requests_in_flight", "Requests being served", registry=r)
        self.adapter_loads = Counter("studio_adapter_loads", "Adapters loaded into the engine", registry=r)
        self.adapter_evictions = Counter("studio_adapter_evictions", "Adapters evicted (LRU)", registry=r)
        self.adapter_switches = Counter("studio_adapter_switches",
                                        "Forward passes whose set of adapters differs from the previous one",
                                        registry=r)
        self.adapter_load_seconds = Histogram("studio_adapter_load_seconds", "Time to load an adapter",
                                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                              registry=r)
        resident = Gauge("studio_resident_adapters", "Adapters resident in memory", registry=r)
        resident.set_function(lambda: len(engine.resident()))
        queue = Gauge("studio_engine_waiting_requests", "Requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: engine.stats()["waiting"])
        engine.listeners.append(self.on_engine_event)

    def on_engine_event(self, event: str, **info) -> None:
        if event == "adapter_load":
            self.adapter_loads.inc()
            self.adapter_load_seconds.observe(info.get("seconds", 0.0))
        elif event == "adapter_evict":
            self.adapter_evictions.inc()
        elif event == "adapter_switch":
            self.adapter_switches.inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --------------------------------------------------------------------------- the app


class Server:
    """The FastAPI app around an Engine. `adapters`: the references advertised in /v1/models and preloaded;
    requests may name any version or alias of a served domain (all domains when `adapters` is None)."""

    def __init__(self, engine, adapters: list[str] | None = None, api_key: str | None = None,
                 allowed_lora_roots: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        from pathlib import Path

        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise StudioError(f"max_body_bytes must be a positive number of bytes, got {max_body_bytes!r}")
        self.max_body_bytes = max_body_bytes
        self.engine = engine
        self.adapters = list(adapters or [])
        self.domains = {a.split("@", 1)[0] for a in self.adapters} if adapters else None
        self.api_key = api_key
        # directories /v1/load_lora_adapter may read adapters from (none: registry references only)
        self.allowed_lora_roots = [Path(r).expanduser().resolve() for r in allowed_lora_roots or []]
        self.lora_names: dict[str, str] = {}  # names loaded through /v1/load_lora_adapter -> canonical reference
        self._lora_lock = threading.Lock()
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.ChatRequest, self.CompletionRequest, self.LoadLora, self.UnloadLora = _request_models()
        self.app = self._build()

    # ---- model names ----

    def resolve_model(self, name: str):
        """Requested `model` -> (canonical adapter ref or None for the base)."""
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "`model` is required: the base id or an adapter reference", param="model")
        if name in ("base", self.engine.base_id):
            return None
        if name in self.lora_names:
            return self.lora_names[name]
        domain = name.split("@", 1)[0]
        if self.domains is not None and domain not in self.domains:
            raise APIError(404, f"The model `{name[:200]}` does not exist: this server serves {self._served_text()}",
                           param="model", code="model_not_found")
        try:
            version = self.engine.resolve(name)
        except ModelError as exc:
            raise APIError(400, str(exc), param="model", code="model_incompatible") from exc
        except RegistryError as exc:  # the registry's message already names the model and why it is not there
            raise APIError(404, f"model not found: {exc}", param="model", code="model_not_found") from exc
        return version.ref if version else None

    def model_label(self, requested: str | None, canonical: str | None) -> str:
        """A bounded metrics label: an advertised name as requested, else the canonical version, else "other"."""
        if requested in (self.engine.base_id, "base") or (requested and requested in self.adapters):
            return requested
        return canonical or ("other" if requested else "")

    def _served_text(self) -> str:
        names = [self.engine.base_id] + (self.adapters or ["any registry reference"])
        return ", ".join(names)

    def list_models(self) -> list[dict]:
        out = [{"id": self.engine.base_id, "object": "model", "created": self.created, "owned_by": "studio",
                "kind": "base", "fingerprint": self.engine.base.fingerprint}]
        refs = self.adapters
        if not refs:
            refs = []
            for domain in self.engine.registry.domains():
                refs.append(domain)
                refs.extend(f"{domain}@{alias}" for alias in self.engine.registry.aliases(domain))
        for name, ref in list(self.lora_names.items()):
            out.append({"id": name, "object": "model", "created": self.created, "owned_by": "studio",
                        "kind": "adapter", "resolves_to": ref, "parent": self.engine.base_id,
                        "resident": ref in self.engine.resident()})
        for ref in refs:
            try:
                version = self.engine.resolve(ref)
            except StudioError as exc:  # an alias deleted after start: list it with the reason
                out.append({"id": ref, "object": "model", "created": self.created, "owned_by": "studio",
                            "kind": "adapter", "error": str(exc)})
                continue
            out.append({"id": ref, "object": "model", "created": _epoch(version.created, self.created),
                        "owned_by": "studio", "kind": "adapter", "resolves_to": version.ref, "sha": version.sha,
                "resident": version.ref in self.engine.resident()})
        return out

    # ---- handlers ----

    def _params(self, req, max_tokens: int, logprobs: int | None = None, echo: bool = False):
        from studio.engine import SamplingParams

        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported: this server returns one choice per prompt (n=1)",
                           param="n")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if stop and any(_bad_text(x) for x in stop):
            raise APIError(400, "stop holds an unpaired surrogate, which is not text", param="stop")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, seed=req.seed, stop=stop, logprobs=logprobs, prompt_logprobs=echo,
                              logit_bias=_logit_bias(req.logit_bias), presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty)

    # ---- vLLM-style dynamic adapters ----

    def load_lora(self, name: str, source: str) -> str:
        """Serve `name` as a registry reference, or as a PEFT directory under the allowed roots (registered first
        as the next version of domain `name`); returns the canonical reference loaded."""
        from studio.registry.refs import check_domain

        if name in ("base", self.engine.base_id) or (self.domains is not None and name in self.adapters):
            raise APIError(400, f"`{name}` already names a served model; choose another lora_name", param="lora_name")
        with self._lora_lock:
            if name in self.lora_names:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded; unload it first",
                               param="lora_name", code="lora_already_loaded")
        is_path = "/" in source or "\\" in source or source.startswith((".", "~"))
        try:
            if is_path:
                directory = self._allowed_dir(source)
                try:
                    check_domain(name)
                except RegistryError as exc:
                    raise APIError(400, f"lora_name becomes the registry domain of the adapter: {exc}",
                                   param="lora_name") from None
                with warnings.catch_warnings():  # a bare PEFT directory has no studio metadata: that is fine
                    warnings.simplefilter("ignore")
                    version = self.engine.registry.register(directory, domain=name, notes=f"load_lora_adapter {name}")
                ref = version.ref
            else:
                ref = source
            loaded = self.engine.load(ref)
        except APIError:
            raise
        except (ModelError, RegistryError) as exc:
            raise APIError(400, f"cannot load lora_path {source!r}: {exc}", param="lora_path") from exc
        except StudioError as exc:
            raise APIError(500, str(exc), type_="server_error") from exc
        if loaded is None:
            raise APIError(400, f"lora_path {source!r} names the base, not an adapter", param="lora_path")
        with self._lora_lock:
            self.lora_names[name] = loaded
        logger.info("load_lora_adapter: %s -> %s", name, loaded)
        return loaded

    def _allowed_dir(self, source: str):
        from pathlib import Path

        if not self.allowed_lora_roots:
            raise APIError(403, "loading adapters from a path is disabled on this server: start it with "
                                "--allowed-lora-roots DIR, or pass a registry reference (law@v3) as lora_path",
                           type_="permission_error", param="lora_path")
        directory = Path(source).expanduser()
        if not directory.is_absolute():
            raise APIError(400, f"lora_path {source!r} must be an absolute path", param="lora_path")
        directory = directory.resolve()
        # every file must resolve inside an allowed root too: a symlink may not smuggle other files in
        for p in [directory, *(directory.rglob("*") if directory.is_dir() else [])]:
            real = p.resolve()
            if not any(real == root or real.is_relative_to(root) for root in self.allowed_lora_roots):
                raise APIError(403, f"lora_path {source!r} is outside the allowed roots "
                                    f"({', '.join(map(str, self.allowed_lora_roots))})",
                               type_="permission_error", param="lora_path")
        if not directory.is_dir():
            raise APIError(400, f"lora_path {source!r} is not a directory with adapter_config.json", param="lora_path")
        return directory

    def unload_lora(self, name: str) -> str:
        with self._lora_lock:
            ref = self.lora_names.get(name)
            if ref is None:
                raise APIError(404, f"The lora adapter '{name}' cannot be found: only adapters loaded with "
                                    "/v1/load_lora_adapter can be unloaded", param="lora_name", code="lora_not_found")
            try:
                self.engine.unload(ref)
            except StudioError as exc:  # in use by a request in flight
                raise APIError(409, str(exc), code="lora_in_use") from exc
            del self.lora_names[name]
        return ref

    def _check_auth(self, request) -> None:
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {self.api_key}":
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           type_="authentication_error", code="invalid_api_key")

    def _build(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import Response

        from starlette.exceptions import HTTPException

        app = FastAPI(title="MoE LoRA Studio", version="1")
        app.add_middleware(BodyLimit, max_bytes=self.max_body_bytes)  # inside _count below, so 413s are counted
        server = self
        ChatRequest, CompletionRequest = self.ChatRequest, self.CompletionRequest
        LoadLora, UnloadLora = self.LoadLora, self.UnloadLora

        @app.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError):
            return _error_response(exc)

        @app.exception_handler(HTTPException)
        async def _http_error(request: Request, exc: HTTPException):
            if exc.status_code == 413:
                err = APIError(413, str(exc.detail), code="request_too_large")
            elif exc.status_code == 404:
                err = APIError(404, f"no such endpoint: {request.method} {request.url.path[:200]}; the API is "
                                    "under /v1 (models, chat/completions, completions)", code="not_found")
            elif exc.status_code == 405:
                err = APIError(405, f"method {request.method} is not allowed on {request.url.path[:200]}",
                               code="method_not_allowed")
            else:
                err = APIError(exc.status_code, str(exc.detail),
                               type_="server_error" if exc.status_code >= 500 else "invalid_request_error")
            return _error_response(err)

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception):
            # a bug, not a bad request: logged with its traceback here, answered without one
            logger.exception("unhandled error serving %s %s", request.method, request.url.path)
            return _error_response(APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                                            type_="server_error"))

        @app.exception_handler(RequestValidationError)
        async def _validation(request: Request, exc: RequestValidationError):
            parts = []
            param = None
            for e in exc.errors():
                loc = [str(x) for x in e.get("loc", ()) if x != "body"]
                if e.get("type") == "json_invalid":  # loc is the character offset, not a parameter
                    ctx = e.get("ctx", {})
                    parts.append(f"the body is not valid JSON ({ctx.get('error', 'parse error')} at character "
                                 f"{loc[-1] if loc else '?'})")
                else:
                    param = param or (".".join(loc) or None)
                    parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
            return _error_response(APIError(400, "Invalid request: " + "; ".join(parts), param=param))

        @app.middleware("http")
        async def _count(request: Request, call_next):
            # labels stay bounded: the matched route's template (never the raw path) and a known model name
            try:
                response = await call_next(request)
                status = response.status_code
            except Exception:
                status = 500
                raise
            finally:
                endpoint = _route_template(app, request.scope)
                if endpoint != "/metrics":
                    server.metrics.requests.labels(endpoint, getattr(request.state, "model_label", ""),
                                                   str(status)).inc()
            return response

        @app.get("/health")
        def health():
            return {"status": "ok", "base": server.engine.base_id, "fingerprint": server.engine.base.fingerprint,
                    "resident_adapters": server.engine.resident(), "served": server.adapters or ["*"]}

        @app.get("/metrics")
        def metrics():
            return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/v1/models")
        def models(request: Request):
            server._check_auth(request)
            return {"object": "list", "data": server.list_models()}

        @app.get("/v1/models/{model_id:path}")
        def model(model_id: str, request: Request):
            server._check_auth(request)
            for m in server.list_models():
                if m["id"] == model_id:
                    return m
            server.resolve_model(model_id)  # 404 with the reason, or a valid reference not advertised
            return {"id": model_id, "object": "model", "created": server.created, "owned_by": "studio"}

        @app.post("/v1/load_lora_adapter")
        def load_lora_adapter(body: LoadLora, request: Request):
            # vLLM answers these two with plain text; tools written for it read the status code
            from fastapi.responses import PlainTextResponse

            server._check_auth(request)
            request.state.model_label = server.model_label(body.lora_name, None)
            ref = server.load_lora(body.lora_name, body.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully ({ref}).")

        @app.post("/v1/unload_lora_adapter")
        def unload_lora_adapter(body: UnloadLora, request: Request):
            from fastapi.responses import PlainTextResponse

            server._check_auth(request)
            request.state.model_label = server.model_label(body.lora_name, None)
            server.unload_lora(body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

        @app.post("/v1/chat/completions")
        def chat(body: ChatRequest, request: Request):
            server._check_auth(request)
            request.state.model_label = server.model_label(body.model, None)
            adapter = server.resolve_model(body.model)
            request.state.model_label = server.model_label(body.model, adapter or server.engine.base_id)
            check_fields(body)
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            params = server._params(body, body.max_completion_tokens or body.max_tokens or 64,
                                    logprobs=(body.top_logprobs or 0) if body.logprobs else None)
            for i, m in enumerate(body.messages):
                if (why := _bad_text(m.content)) is not None:
                    raise APIError(400, f"messages[{i}].content {why}", param=f"messages.{i}.content")
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            if body.stream:
                return server._stream("chat", body, messages, adapter, params)
            (c,) = server._run("chat", [messages], adapter, params)
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.model, "system_fingerprint": server._fingerprint(c.adapter),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason,
                                 "logprobs": server._chat_logprobs(c.logprobs) if body.logprobs else None}],
                    "usage": _usage([c])}

        @app.post("/v1/completions")
        def completions(body: CompletionRequest, request: Request):
            server._check_auth(request)
            request.state.model_label = server.model_label(body.model, None)
            adapter = server.resolve_model(body.model)
            request.state.model_label = server.model_label(body.model, adapter or server.engine.base_id)
            check_fields(body)
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            if max_tokens == 0 and not body.echo:
                raise APIError(400, "max_tokens=0 generates nothing; it is only useful with echo=true (to score the "
                                    "prompt): set echo=true or max_tokens >= 1", param="max_tokens")
            params = server._params(body, max_tokens, logprobs=body.logprobs, echo=body.echo and
                                    body.logprobs is not None)
            prompt = body.prompt
            # one prompt (text or token ids) or a batch of them
            prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
            for i, p in enumerate(prompts):
                if isinstance(p, str) and (why := _bad_text(p)) is not None:
                    raise APIError(400, f"prompt[{i}] {why}", param="prompt")
            if len(prompts) > MAX_PROMPTS:
                raise APIError(400, f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}: split them "
                                    "over several requests", param="prompt")
            if not prompts or not all(prompts):
                raise APIError(400, "prompt must be a non-empty string, a non-empty list of token ids, or a "
                                    "non-empty list of those", param="prompt")
            if body.stream:
                if len(prompts) != 1:
                    raise APIError(400, "stream=true takes a single prompt; send one request per prompt",
                                   param="prompt")
                if body.echo:
                    raise APIError(400, "echo=true is not supported with stream=true; send stream=false",
                                   param="echo")
                return server._stream("text", body, prompts[0], adapter, params)
            results = server._run("text", prompts, adapter, params)
            choices = []
            for i, (p, c) in enumerate(zip(prompts, results)):
                echoed = (p if isinstance(p, str) else server._decode(p)) if body.echo else ""
                choices.append({"index": i, "text": echoed + c.text, "finish_reason": c.finish_reason,
                                "logprobs": None if body.logprobs is None else
                                server._completion_logprobs(c, body.echo, 0)})
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": body.model, "system_fingerprint": server._fingerprint(results[0].adapter),
                    "choices": choices, "usage": _usage(results)}

        return app

    # ---- logprobs in OpenAI's two formats ----

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _completion_logprobs(self, c, echo: bool, offset: int) -> dict:
        """OpenAI's legacy format: tokens, token_logprobs, top_logprobs ({token: logprob}, the chosen token
        included, so up to logprobs + 1 entries) and text_offset; with echo the prompt's tokens come first, the
        first of them with None (nothing predicts it)."""
        entries = list(c.prompt_logprobs or []) if echo else []
        ids = list(c.prompt_token_ids) if echo else []
        entries += c.logprobs or []
        ids += [e.token for e in c.logprobs or []]
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, entry in zip(ids, entries):
            piece = self._decode([tid])
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(entry.logprob)
            top = {self._decode([t]): lp for t, lp in entry.top}
            top.setdefault(piece, entry.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, entries) -> dict:
        """OpenAI's chat format: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        def item(tid, lp):
            piece = self._decode([tid])
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(t, lp) for t, lp in e.top])
                            for e in entries or []], "refusal": None}

    def _fingerprint(self, adapter: str | None) -> str:
        return f"{self.engine.base_id}+{adapter}" if adapter else self.engine.base_id

    def _run(self, endpoint: str, prompts, adapter, params):
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            results = self.engine.generate(prompts, adapters=adapter, params=params)
        except RequestError as exc:
            raise APIError(400, str(exc)) from exc
        except StudioError as exc:
            raise APIError(500, str(exc), type_="server_error") from exc
        finally:
            self.metrics.in_flight.dec()
        self._observe(endpoint, results, t0)
        return results

    def _observe(self, endpoint: str, results, t0: float) -> None:
        name = results[0].adapter or self.engine.base_id
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        for c in results:
            self.metrics.ttft.labels(endpoint).observe(c.ttft_s)
            self.metrics.prompt_tokens.labels(name).inc(c.prompt_tokens)
            self.metrics.completion_tokens.labels(name).inc(c.completion_tokens)

    def _stream(self, kind: str, body, prompt, adapter, params):
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        from fastapi.responses import StreamingResponse

        # the engine validates (prompt length, max_tokens) and queues the request before the 200 status goes out
        try:
            parts = self.engine.stream(prompt, adapter, params)
        except RequestError as exc:
            raise APIError(400, str(exc)) from exc
        except StudioError as exc:
            raise APIError(500, str(exc), type_="server_error") from exc
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        fingerprint = self._fingerprint(adapter)

        offset = [0]  # text_offset of the next streamed token (legacy completions)

        def logprobs_of(entries):
            if params.logprobs is None or entries is None:
                return None
            if kind == "chat":
                return self._chat_logprobs(entries)
            out = self._completion_logprobs(_Tokens(entries), False, offset[0])
            offset[0] += sum(len(t) for t in out["tokens"])
            return out

        def chunk(delta_text=None, finish=None, role=False, usage=None, entries=None):
            if kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs_of(entries)}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish,
                          "logprobs": logprobs_of(entries)}
            data = {"id": cid, "object": obj, "created": created, "model": body.model,
                    "system_fingerprint": fingerprint, "choices": [choice] if usage is None else []}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def events():
            t0 = time.perf_counter()
            self.metrics.in_flight.inc()
            try:
                if kind == "chat":
                    yield chunk(role=True)
                for part in parts:
                    if part.completion is not None:
                        if part.text or part.logprobs:
                            yield chunk(part.text, entries=part.logprobs)
                        yield chunk(finish=part.finish_reason)
                        self._observe(kind, [part.completion], t0)
                        if include_usage:
                            yield chunk(usage=_usage([part.completion]))
                    elif part.text:
                        yield chunk(part.text, entries=part.logprobs)
            except StudioError as exc:
                yield f"data: {json.dumps(APIError(500, str(exc), type_='server_error').body())}\n\n"
            finally:
                self.metrics.in_flight.dec()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _route_template(app, scope) -> str:
    """The path template of the route a request matched ("/v1/models/{model_id:path}"), or "other"."""
    route = scope.get("route")
    if route is None:  # answered before routing (a 413 from BodyLimit): match it here
        from starlette.routing import Match

        route = next((r for r in app.router.routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", None) or "other"


def _epoch(stamp: str, default: int) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return default


class _Tokens:
    """A streamed chunk's logprob entries shaped like a Completion for _completion_logprobs."""

    def __init__(self, entries):
        self.logprobs, self.prompt_logprobs, self.prompt_token_ids = entries, None, []


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} (JSON keys are strings) -> {id: bias}; ranges are checked by the engine."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}: map token ids (as strings) to "
                                "a bias between -100 and 100", param="logit_bias") from None
        out[token] = value
    return out


def _usage(results) -> dict:
    p = sum(c.prompt_tokens for c in results)
    c = sum(c.completion_tokens for c in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(engine, adapters: list[str] | None = None, api_key: str | None = None,
               allowed_lora_roots: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    return Server(engine, adapters, api_key, allowed_lora_roots, max_body_bytes).app


class BackgroundServer:
    """Run uvicorn in a thread (tests, notebooks, the web UI): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise StudioError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server with per-request adapter hot-swap",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="tiny-moe", help="embedded name, local directory or hub id")
    p.add_argument("--adapters", default="",
                   help="comma-separated registry references to advertise and preload (law@prod,medicine@prod); "
                        "requests may name any version or alias of these domains. Empty: every domain")
    p.add_argument("--quant", default="4bit", choices=["none", "8bit", "4bit"])
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--registry", default=None, help="adapter registry root (default: STUDIO_ADAPTERS_ROOT)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (or set {API_KEY_ENV})")
    p.add_argument("--max-resident", type=int, default=8, help="adapters kept in memory (LRU)")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long an idle engine waits to fill a batch")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body; bigger ones get 413 before they are read")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt in characters, checked before tokenizing (default: the base's context "
                        "times its longest token, i.e. only prompts that cannot fit are refused early)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); on small CPU machines 1 is often fastest for "
                        "decoding (see BENCHMARKS.md)")
    p.add_argument("--allowed-lora-roots", default="",
                   help="comma-separated directories POST /v1/load_lora_adapter may load PEFT adapters from "
                        "(empty: registry references only)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="serve adapters whose recorded base fingerprint differs from the loaded base")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import uvicorn

    from studio.engine import Engine
    from studio.models.loading import QuantSpec
    from studio.registry import AdapterRegistry

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("binding to %s without an API key: anyone on the network can use this server", args.host)
    engine = Engine(args.base, QuantSpec(args.quant), args.device, registry=AdapterRegistry(args.registry),
                    max_resident=args.max_resident, max_batch_size=args.max_batch_size,
                    max_wait_ms=args.max_wait_ms, max_tokens_limit=args.max_tokens_limit,
                    allow_base_mismatch=args.allow_base_mismatch, max_prompt_chars=args.max_prompt_chars)
    for ref in adapters:  # fail fast on a typo, and warm the cache
        loaded = engine.load(ref)
        print(f"serving {ref} -> {loaded}", flush=True)
    roots = [r.strip() for r in args.allowed_lora_roots.split(",") if r.strip()]
    server = Server(engine, adapters, api_key, roots, max_body_bytes=args.max_body_bytes)
    print(f"studio serve: base {engine.base_id} on http://{args.host}:{args.port}/v1 "
          f"(models: {server._served_text()})", flush=True)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    import sys

    from studio.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
