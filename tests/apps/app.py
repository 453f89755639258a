"""ASGI app for flyprobe's tests and demo (no framework, so the server is the only variable).

GET /         -> 200 "ok"
GET /slow?ms= -> 200 after ms milliseconds
GET /exit?code= -> the worker process exits at once with that status (no response)
Every response names the serving process in an `x-worker-pid` header.
"""
import asyncio
import os
from urllib.parse import parse_qs


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
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    status, body = 200, b"ok"
    query = parse_qs(scope["query_string"].decode())
    if scope["path"] == "/exit":
        os._exit(int(query.get("code", ["1"])[0]))
    if scope["path"] == "/slow":
        ms = int(query.get("ms", ["0"])[0])
        await asyncio.sleep(ms / 1000)
        body = b"slow ok"
    elif scope["path"] != "/":
        status, body = 404, b"not found"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-worker-pid", str(os.getpid()).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
