"""OpenAI-compatible HTTP server over one Engine: `studio serve --base tiny-moe --adapters law@prod,medicine@prod`.

    GET  /v1/models              the base and the served adapter references
    POST /v1/chat/completions    `model` = the base id or a registry reference (law, law@v3, law@prod); stream=true
    POST /v1/completions         the same for raw text prompts (a list of prompts is one batch)
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
from typing import Literal

from studio.errors import ModelError, RegistryError, RequestError, StudioError

logger = logging.getLogger(__name__)

API_KEY_ENV = "STUDIO_API_KEY"
MAX_PROMPTS = 64  # prompts in one /v1/completions request
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body; 4 MiB holds ~1M tokens of prompt text
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

# Request fields accepted and deliberately without effect on the output, as in OpenAI's API (`user` is an end-user id
# for abuse monitoring). Every other field a handler does not read is refused with a 400 naming it, never ignored.
PASSTHROUGH_FIELDS = {"user"}
# OpenAI parameters the interoperability work (issue 14) owns: neither honoured nor refused by the validation here.
DEFERRED_FIELDS = {"logprobs", "top_logprobs", "echo", "logit_bias", "presence_penalty", "frequency_penalty"}


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

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str]
        echo: bool = False

    return ChatRequest, CompletionRequest


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
    unknown = sorted(k for k in extra if k not in PASSTHROUGH_FIELDS and k not in DEFERRED_FIELDS)
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
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise StudioError(f"max_body_bytes must be a positive number of bytes, got {max_body_bytes!r}")
        self.max_body_bytes = max_body_bytes
        self.engine = engine
        self.adapters = list(adapters or [])
        self.domains = {a.split("@", 1)[0] for a in self.adapters} if adapters else None
        self.api_key = api_key
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.ChatRequest, self.CompletionRequest = _request_models()
        self.app = self._build()

    # ---- model names ----

    def resolve_model(self, name: str):
        """Requested `model` -> (canonical adapter ref or None for the base)."""
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "`model` is required: the base id or an adapter reference", param="model")
        if name in ("base", self.engine.base_id):
            return None
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

    def _params(self, req, max_tokens: int | None):
        from studio.engine import SamplingParams

        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported: this server returns one choice per prompt (n=1)",
                           param="n")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if stop and any(_bad_text(x) for x in stop):
            raise APIError(400, "stop holds an unpaired surrogate, which is not text", param="stop")
        return SamplingParams(max_tokens=max_tokens or 64, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, seed=req.seed, stop=stop)

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

        @app.post("/v1/chat/completions")
        def chat(body: ChatRequest, request: Request):
            server._check_auth(request)
            request.state.model_label = server.model_label(body.model, None)
            adapter = server.resolve_model(body.model)
            request.state.model_label = server.model_label(body.model, adapter or server.engine.base_id)
            check_fields(body)
            params = server._params(body, body.max_completion_tokens or body.max_tokens)
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
                                 "finish_reason": c.finish_reason, "logprobs": None}],
                    "usage": _usage([c])}

        @app.post("/v1/completions")
        def completions(body: CompletionRequest, request: Request):
            server._check_auth(request)
            request.state.model_label = server.model_label(body.model, None)
            adapter = server.resolve_model(body.model)
            request.state.model_label = server.model_label(body.model, adapter or server.engine.base_id)
            check_fields(body)
            params = server._params(body, body.max_tokens or 16)
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            for i, p in enumerate(prompts):
                if isinstance(p, str) and (why := _bad_text(p)) is not None:
                    raise APIError(400, f"prompt[{i}] {why}", param="prompt")
            if len(prompts) > MAX_PROMPTS:
                raise APIError(400, f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}: split them "
                                    "over several requests", param="prompt")
            if not prompts or not all(prompts):
                raise APIError(400, "prompt must be a non-empty string or a non-empty list of non-empty strings",
                               param="prompt")
            if body.stream:
                if len(prompts) != 1:
                    raise APIError(400, "stream=true takes a single prompt; send one request per prompt",
                                   param="prompt")
                return server._stream("text", body, prompts[0], adapter, params)
            results = server._run("text", prompts, adapter, params)
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": body.model, "system_fingerprint": server._fingerprint(results[0].adapter),
                    "choices": [{"index": i, "text": (p if body.echo else "") + c.text, "finish_reason":
                                 c.finish_reason, "logprobs": None} for i, (p, c) in enumerate(zip(prompts, results))],
                    "usage": _usage(results)}

        return app

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

        def chunk(delta_text=None, finish=None, role=False, usage=None):
            if kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
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
                        if part.text:
                            yield chunk(part.text)
                        yield chunk(finish=part.finish_reason)
                        self._observe(kind, [part.completion], t0)
                        if include_usage:
                            yield chunk(usage=_usage([part.completion]))
                    elif part.text:
                        yield chunk(part.text)
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


def _usage(results) -> dict:
    p = sum(c.prompt_tokens for c in results)
    c = sum(c.completion_tokens for c in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(engine, adapters: list[str] | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    return Server(engine, adapters, api_key, max_body_bytes).app


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
    server = Server(engine, adapters, api_key, max_body_bytes=args.max_body_bytes)
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
