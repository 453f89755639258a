"""Starlette app for `cargo xtask bench`: the same app with and without the in-process
metrics middleware flyprobe replaces (starlette-exporter), chosen by FLYPROBE_BENCH_EXPORTER.
"""
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def ok(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", ok)])

if os.environ.get("FLYPROBE_BENCH_EXPORTER") == "1":
    from starlette_exporter import PrometheusMiddleware, handle_metrics

    app.add_middleware(PrometheusMiddleware)
    app.add_route("/metrics", handle_metrics)
