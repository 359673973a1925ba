"""App for the latency benchmark: POST /enqueue adds a task stamped with the
time just before the add; the handler records start - stamp."""

from __future__ import annotations

import os
import time

from google.protobuf.wrappers_pb2 import DoubleValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import tq_web
from tq_web.starlette import runner_lifespan

latencies: list[float] = []
d = tq_web.Dispatcher(os.environ["TQ_WEB_BACKEND"], secret_key="bench-key")


def handler(p: DoubleValue) -> None:
    latencies.append(time.time() - p.value)


d.register_task(DoubleValue, handler)


async def enqueue(request: Request) -> Response:
    await d.add_task_async(tq_web.Task(DoubleValue(value=time.time())))
    return Response(b"")


async def results(request: Request) -> Response:
    return JSONResponse(latencies)


lifespan = None
if os.environ.get("BENCH_INPROCESS") == "1":
    lifespan = runner_lifespan(d, os.environ["BENCH_TARGET"])
app = Starlette(
    routes=[Route("/enqueue", enqueue, methods=["POST"]), Route("/results", results)],
    lifespan=lifespan,
)
d.install_routes(app)
