"""``vitqc serve``: an HTTP inspection service on the exported ONNX model (FastAPI on
uvicorn, no torch in the serving process).

``app.py`` the routes (``/predict``, ``/predict/batch``, ``/health``, ``/model``) and
``create_app``, ``service.py`` the worker pool and bounded queue, ``images.py`` the
upload checks, ``results_log.py`` the JSON-lines decision log, ``overlay.py`` the
heat-map overlay, ``server.py`` the command (``run_server``: model preparation, socket,
uvicorn). This package module stays light: the command checks its options before
FastAPI, uvicorn and onnxruntime are imported.
"""

from __future__ import annotations

from vitqc.serve.config import API_KEY_ENV, ServeConfig

__all__ = ["API_KEY_ENV", "ServeConfig"]
