"""A WSGI app for gunicorn's sync workers, which serve one connection at a time: the tests of
time spent waiting for a worker (tests/tests/waiting.rs).

GET /slow?ms=N answers 200 after N ms (any other path at once). GET /spawn?n=N forks N
children that exit at once, as a worker running subprocesses does, before it answers (the
tests of a stalled daemon: a burst of process events). Every response names the
process that served it (`x-worker-pid`) and how long the app took (`x-service-us`), so a
client can take the service time out of what it waited.
"""
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    started = time.monotonic()
    query = parse_qs(environ.get("QUERY_STRING", ""))
    ms = int(query.get("ms", ["0"])[0]) if environ.get("PATH_INFO") == "/slow" else 0
    if ms:
        time.sleep(ms / 1000)
    if environ.get("PATH_INFO") == "/spawn":
        for _ in range(int(query.get("n", ["0"])[0])):
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
    body = b"ok"
    took = int((time.monotonic() - started) * 1e6)
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("x-worker-pid", str(os.getpid())),
            ("x-service-us", str(took)),
        ],
    )
    return [body]
