"""HTTP/1.1-over-TLS client for flyprobe's tests: keep-alive connections with Python's
http.client (OpenSSL, as the server's; the certificate is not verified).

    https_client.py HOST PORT --request 'GET /' --request 'POST /echo' ... [--repeat N]
                    [--connections C] [--body BYTES] [--parallel]

Each connection sends every request REPEAT times, one after the other, reading each
response whole, and closes. Prints one JSON object: the statuses the client saw, by
"METHOD STATUS", and the number of requests and connections (a server that closes a
connection after a response, like gunicorn's sync workers, makes the client open another:
counted). With --parallel the connections run at once, a thread each (a server then
interleaves their reads and writes).
"""
import argparse
import collections
import concurrent.futures
import http.client
import json
import ssl


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--request", action="append", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--body", type=int, default=16)
    parser.add_argument("--parallel", action="store_true")
    args = parser.parse_args()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    requests = [tuple(r.split(" ", 1)) for r in args.request] * args.repeat

    def run_connection(_):
        """The requests on one keep-alive connection (more, where the server closes it):
        (statuses seen, connections opened)."""
        seen = collections.Counter()
        opened = 0
        conn = None
        for method, path in requests:
            if conn is None:
                conn = http.client.HTTPSConnection(args.host, args.port, context=ctx)
                opened += 1
            body = b"x" * args.body if method in ("POST", "PUT", "PATCH") else None
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            resp.read()
            seen[f"{method} {resp.status}"] += 1
            if resp.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        return seen, opened

    workers = args.connections if args.parallel else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run_connection, range(args.connections)))
    seen = sum((s for s, _ in results), collections.Counter())
    connections = sum(n for _, n in results)
    print(json.dumps({
        "seen": dict(seen),
        "requests": sum(seen.values()),
        "connections": connections,
    }))


if __name__ == "__main__":
    main()
