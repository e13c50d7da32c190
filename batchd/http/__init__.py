"""batchd's HTTP layer (Starlette): `create_app` builds the ASGI app.

    server   the app: routes, middleware, lifespan
    frame    what every prediction shares: admission, errors to statuses, metrics, logs
    native   the native API (/health, /ready, /models, /metrics, /predict)
    v2       the Open Inference Protocol (KServe v2)
    payload  reading bodies within limits
    auth     bearer-token authentication
"""

from batchd.http.server import create_app

__all__ = ["create_app"]
