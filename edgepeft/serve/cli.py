"""`edgepeft serve`: an OpenAI-compatible server over an export folder (the [serve] extra).

    edgepeft serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--adapter NAME=FILE ...] [--served-model-name NAME] [limits]
        Engine(EXPORT_DIR) + each --adapter ──► create_app (app.py) ──► uvicorn
        SIGTERM / Ctrl-C: no new connections; requests in flight finish; the worker
        drains; exit 0 (a second Ctrl-C forces the exit)

Importing this module is light (argparse only): FastAPI, uvicorn and onnxruntime load when
the command runs, so `edgepeft --help` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from edgepeft.serve.config import ServeConfig
from edgepeft.settings import parse_size

API_KEY_ENV = "EDGEPEFT_API_KEY"
DEFAULTS = ServeConfig()


def add_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve an export over an OpenAI-compatible HTTP API (adapters picked by 'model')",
        description="Serve an export folder with edgepeft.runtime.Engine behind OpenAI's "
        "/v1/completions, /v1/chat/completions and /v1/models, plus vLLM's "
        "/v1/load_lora_adapter and /v1/unload_lora_adapter, /health and /metrics. A "
        "request's 'model' is an adapter's name or the base's. Needs "
        "pip install 'edgepeft[serve]'.",
    )
    serve.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by edgepeft export")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    serve.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port)")
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)",
    )
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="load an adapter file (*.onnx_adapter, *.kvprefix.safetensors) "
        "besides the export's own; a bare FILE is named after it (repeatable)",
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the base's name in 'model' (default: the manifest's base)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULTS.max_queue,
        metavar="N",
        help=f"requests that may wait; more get 429 (default: {DEFAULTS.max_queue})",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULTS.max_batch,
        metavar="N",
        help="most requests decoding together (a request joins the running batch between "
        f"decode steps), mixed adapters included (default: {DEFAULTS.max_batch}; 1: one at a time)",
    )
    serve.add_argument(
        "--batch-context",
        type=int,
        default=DEFAULTS.batch_context,
        metavar="N",
        help="cache columns of the running batch (KV memory: --max-batch x N); it grows to 4x "
        f"for a long request, longer ones run alone (default: {DEFAULTS.batch_context})",
    )
    serve.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULTS.max_tokens_limit,
        metavar="N",
        help="largest max_tokens a request may ask for; more get 400 "
        f"(default: {DEFAULTS.max_tokens_limit})",
    )
    serve.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULTS.default_max_tokens,
        metavar="N",
        help=f"max_tokens of a request without one (default: {DEFAULTS.default_max_tokens})",
    )
    serve.add_argument(
        "--max-body-bytes",
        default=str(DEFAULTS.max_body_bytes),
        metavar="SIZE",
        help="largest request body, e.g. 1MiB; more get 413 (default: 1MiB)",
    )
    serve.add_argument(
        "--timeout",
        type=float,
        default=DEFAULTS.request_timeout_s,
        metavar="S",
        help="seconds a request may take, queueing included; then 504 "
        f"(default: {DEFAULTS.request_timeout_s:g})",
    )
    serve.add_argument(
        "--disable-adapter-loading",
        action="store_true",
        help="refuse /v1/load_lora_adapter and /v1/unload_lora_adapter (403)",
    )
    serve.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    serve.add_argument(
        "--device",
        metavar="PROFILE",
        help="device profile (name or .toml path): providers, threads",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )
    serve.set_defaults(run=run)


def named_files(values: list[str]) -> list[tuple[str | None, Path]]:
    """(name or None, file) of each `[NAME=]FILE`; None: the engine names it after the file."""
    out = []
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or Path(value).expanduser().is_file():
            name, file = None, value
        path = Path(file).expanduser()
        if not path.is_file():
            raise ValueError(f"--adapter {value}: {path} is not a file")
        out.append((name or None, path))
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from edgepeft.serve.app import create_app
    except ImportError as e:
        raise ValueError(
            f"edgepeft serve needs {e.name or 'fastapi and uvicorn'}, which this install lacks; "
            "pip install 'edgepeft[serve]'"
        ) from e
    from edgepeft.runtime.engine import Engine

    config = ServeConfig(
        api_key=args.api_key or None,
        model_name=args.served_model_name,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_context=args.batch_context,
        max_tokens_limit=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_body_bytes=parse_size(args.max_body_bytes, "--max-body-bytes"),
        request_timeout_s=args.timeout,
        allow_adapter_loading=not args.disable_adapter_loading,
    )
    folder = Path(args.export_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"export folder {folder} does not exist")
    extra = named_files(args.adapter)
    engine = Engine(folder, threads=args.threads, device=args.device)
    for name, error in engine.load_errors.items():
        print(f"warning: adapter {name!r} was not loaded: {error}", file=sys.stderr)
    for name, path in extra:
        engine.load_adapter(path, name)
    app = create_app(engine, config)
    if not is_loopback(args.host) and config.api_key is None:
        print(
            f"warning: serving on {args.host} without an API key: anyone who reaches this "
            f"address can use the model and load files as adapters; set --api-key or "
            f"${API_KEY_ENV}",
            file=sys.stderr,
        )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            # requests in flight get their whole timeout to finish before they are cut off
            timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
        )
    )
    names = ", ".join(app.state.server.names())
    print(f"edgepeft serve: {folder} as models {names}", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found:
    # give it one that does nothing, so a graceful stop exits 0 rather than as interrupted.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main_thread else None
    try:
        server.run()
    finally:
        if main_thread and previous is not None:  # None: a handler not set from Python
            signal.signal(signal.SIGTERM, previous)
    served = app.state.server.metrics.requests
    print(f"edgepeft serve: stopped after {sum(served.values())} requests", file=sys.stderr)
    return 0


def _stopped(signum, frame) -> None:
    """SIGTERM after uvicorn's graceful shutdown: nothing left to do."""


__all__ = ["API_KEY_ENV", "add_parser", "is_loopback", "named_files", "run"]
