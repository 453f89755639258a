"""ASGI app for flyprobe's tests and demo (no framework, so the server is the only variable).

Any method on /  -> 200 "ok"            GET /redirect -> 302 to /
GET /error       -> 500                 anything else -> 404
POST /echo       -> 200 "received N" after reading the whole body
GET /slow?ms=N   -> 200 after N ms      GET /big?kb=N -> 200, N KiB sent in 64 KiB chunks
GET /exit?code=N -> the worker process exits at once with that status (no response)
Every response names the serving process in an `x-worker-pid` header.
"""
import asyncio
import os
from urllib.parse import parse_qs

CHUNK = 64 * 1024


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    # Drain the request body, however many reads it takes.
    received, more = 0, True
    while more:
        message = await receive()
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    path, method = scope["path"], scope["method"]
    query = parse_qs(scope["query_string"].decode())
    status, body, size = 200, b"ok", None
    if path == "/exit":
        os._exit(int(query.get("code", ["1"])[0]))
    elif path == "/":
        pass
    elif path == "/slow":
        await asyncio.sleep(int(query.get("ms", ["0"])[0]) / 1000)
        body = b"slow ok"
    elif path == "/echo" and method == "POST":
        body = b"received %d" % received
    elif path == "/redirect":
        status, body = 302, b""
    elif path == "/error":
        status, body = 500, b"error"
    elif path == "/big":
        size = int(query.get("kb", ["1"])[0]) * 1024
    else:
        status, body = 404, b"not found"
    length = size if size is not None else len(body)
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", str(length).encode()),
        (b"x-worker-pid", str(os.getpid()).encode()),
    ]
    if status == 302:
        headers.append((b"location", b"/"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if size is None:
        await send({"type": "http.response.body", "body": body if method != "HEAD" else b""})
        return
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        sent += n
        await send({"type": "http.response.body", "body": b"x" * n, "more_body": sent < size})
