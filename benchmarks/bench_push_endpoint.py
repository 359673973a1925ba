"""Push endpoint overhead, in-process: tq_web's route (signature check, decode,
context, no-op handler) next to a bare route that reads the body and returns
200, for Starlette and for Flask (run by hand).

    python benchmarks/bench_push_endpoint.py [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time

import flask
from google.protobuf.duration_pb2 import Duration
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import tq_web

BODY = b'{"type":"google.protobuf.Duration","body":"123s"}'
PATH = "/internal/tasks/google.protobuf.Duration"


def dispatcher(async_handler: bool = True) -> tuple[tq_web.Dispatcher, str]:
    """A dispatcher with a no-op handler: async for Starlette, sync for Flask."""
    d = tq_web.Dispatcher("memory://", secret_key="bench")

    async def anoop(p: Duration) -> None:
        return None

    def noop(p: Duration) -> None:
        return None

    d.register_task(Duration, anoop if async_handler else noop)
    return d, d.signer.sign(PATH, BODY)  # type: ignore[union-attr]


def asgi_rate(app, path: str, headers: list[tuple[bytes, bytes]], n: int) -> float:
    async def run() -> float:
        async def receive():
            return {"type": "http.request", "body": BODY, "more_body": False}

        status: list[int] = []

        async def send(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])

        t0 = time.perf_counter()
        for _ in range(n):
            scope = {
                "type": "http",
                "method": "POST",
                "path": path,
                "root_path": "",
                "headers": headers,
                "query_string": b"",
                "http_version": "1.1",
                "scheme": "http",
                "server": ("127.0.0.1", 80),
                "client": ("127.0.0.1", 1),
                "app": app,
            }
            await app(scope, receive, send)
        dt = time.perf_counter() - t0
        assert set(status) == {200}, set(status)
        return n / dt

    return asyncio.run(run())


def wsgi_rate(app, path: str, headers: dict[str, str], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(BODY),
            "CONTENT_LENGTH": str(len(BODY)),
            "CONTENT_TYPE": "application/json",
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
            **headers,
        }
        status: list[str] = []
        out = app(environ, lambda s, h, e=None, status=status: status.append(s))
        for _chunk in out:
            pass
        getattr(out, "close", lambda: None)()
        assert status[0].startswith("200"), status
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    d, sig = dispatcher()

    async def bare(request: Request) -> Response:
        await request.body()
        return Response(b"")

    bare_star = Starlette(routes=[Route(PATH, bare, methods=["POST"])])
    tq_star = Starlette()
    d.install_routes(tq_star)
    bare_flask = flask.Flask("bare")
    bare_flask.add_url_rule(
        PATH,
        "bare",
        lambda: (flask.request.get_data(), 200)[1:] and "",
        methods=["POST"],
    )
    tq_flask = flask.Flask("tq")
    dispatcher(async_handler=False)[0].install_routes(tq_flask)
    sig_header = [(b"x-tq-web-signature", sig.encode())]
    rows = []
    for name, f_bare, f_tq in [
        (
            "Starlette",
            lambda: asgi_rate(bare_star, PATH, [], args.n),
            lambda: asgi_rate(tq_star, PATH, sig_header, args.n),
        ),
        (
            "Flask",
            lambda: wsgi_rate(bare_flask, PATH, {}, args.n // 4),
            lambda: wsgi_rate(
                tq_flask, PATH, {"HTTP_X_TQ_WEB_SIGNATURE": sig}, args.n // 4
            ),
        ),
    ]:
        b = statistics.median(f_bare() for _ in range(args.runs))
        t = statistics.median(f_tq() for _ in range(args.runs))
        rows.append((name, b, t))
    for name, b, t in rows:
        print(f"{name:10} bare {b:9,.0f}/s   tq_web {t:9,.0f}/s   = {t / b:.2f}x")


if __name__ == "__main__":
    main()
