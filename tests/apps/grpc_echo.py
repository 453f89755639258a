"""A gRPC server and client for flyprobe's HTTP/2 tests, without generated code: one unary
method, /flyprobe.Echo/Echo, whose request and response are raw bytes. A request whose body
is b"fail" gets status INVALID_ARGUMENT (still HTTP 200: gRPC's status is in the trailers).

    grpc_echo.py serve PORT
    grpc_echo.py call PORT N [--fail K] [--threads T]

`call` makes N calls (K of them failing) on one channel (one HTTP/2 connection), T at once,
and prints one JSON object: {"ok": .., "failed": .., "calls": N}.
"""
import json
import sys
from concurrent import futures

import grpc

METHOD = "/flyprobe.Echo/Echo"


def echo(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
    return request


def serve(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        "flyprobe.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"serving on {port}", flush=True)
    server.wait_for_termination()


def call(port, n, fail, threads):
    ok = failed = 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(METHOD)
        bodies = [b"fail" if i < fail else b"hello %d" % i for i in range(n)]
        with futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for result in pool.map(lambda b: _one(stub, b), bodies):
                if result:
                    ok += 1
                else:
                    failed += 1
    print(json.dumps({"ok": ok, "failed": failed, "calls": n}))


def _one(stub, body):
    try:
        return stub(body, timeout=30) == body
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return False


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "serve":
        serve(int(args[1]))
    else:
        fail = int(args[args.index("--fail") + 1]) if "--fail" in args else 0
        threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 8
        call(int(args[1]), int(args[2]), fail, threads)
