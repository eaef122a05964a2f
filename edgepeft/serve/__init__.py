"""edgepeft.serve: an OpenAI-compatible HTTP server over edgepeft.runtime.Engine.

    edgepeft serve out/ [--adapter NAME=FILE ...]          (cli.py; `pip install "edgepeft[serve]"`)
        HTTP ──► app.py (FastAPI routes: auth, body limit, OpenAI JSON and SSE, errors.py)
             ──► scheduler.py (bounded queue; one worker thread: Engine.stream per request)
             ──► metrics.py (Prometheus text)

The `model` field of a request picks the adapter (an adapter's name, or the base's), as in
vLLM and LoRAX. Importing this package loads neither FastAPI nor onnxruntime: `app.py`
needs the [serve] extra; config.py, scheduler.py and metrics.py need only the runtime.
"""

from edgepeft.serve.config import ServeConfig

__all__ = ["ServeConfig"]
