"""A gRPC server and client for flyprobe's HTTP/2 tests, without generated code: one unary
method, /flyprobe.Echo/Echo, whose request and response are raw bytes. A request whose body
is b"fail" gets status INVALID_ARGUMENT (still HTTP 200: gRPC's status is in the trailers).

    grpc_echo.py serve PORT [--tls CERT KEY]
    grpc_echo.py call PORT N [--fail K] [--threads T] [--tls CERT]

`call` makes N calls (K of them failing) on one channel (one HTTP/2 connection), T at once,
and prints one JSON object: {"ok": .., "failed": .., "calls": N}. With --tls the server
speaks TLS (grpcio's own, BoringSSL linked in) with the certificate, for `localhost`, which
the client trusts.
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


def serve(port, tls):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        "flyprobe.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    if tls:
        cert, key = (open(path, "rb").read() for path in tls)
        credentials = grpc.ssl_server_credentials([(key, cert)])
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"serving on {port}", flush=True)
    server.wait_for_termination()


def _channel(port, cert):
    target = f"127.0.0.1:{port}"
    if cert is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=open(cert, "rb").read())
    return grpc.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def call(port, n, fail, threads, cert):
    ok = failed = 0
    with _channel(port, cert) as channel:
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
    tls = args[args.index("--tls") + 1 :][:2] if "--tls" in args else None
    if args[0] == "serve":
        serve(int(args[1]), tls)
    else:
        fail = int(args[args.index("--fail") + 1]) if "--fail" in args else 0
        threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 8
        call(int(args[1]), int(args[2]), fail, threads, tls[0] if tls else None)
