"""The app the delivery benchmark serves (uvicorn, one worker)."""

from __future__ import annotations

import os

from google.protobuf.duration_pb2 import Duration
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import tq_web


async def bare(request: Request) -> Response:
    await request.body()
    return Response(b"")


dispatcher = tq_web.Dispatcher(
    os.environ["TQ_WEB_BACKEND"], secret_key=os.environ["TQ_WEB_SECRET_KEY"]
)


async def noop(p: Duration) -> None:
    return None


dispatcher.register_task(Duration, noop)
app = Starlette(routes=[Route("/bare", bare, methods=["POST"])])
dispatcher.install_routes(app)
