"""HTTP/2 client for flyprobe's tests: prior-knowledge h2c (or h2 over TLS with --tls), many
requests multiplexed on each connection, with the `h2` library (hypercorn's own).

    h2_client.py HOST PORT --request 'GET /' --request 'POST /echo' ... [--repeat N]
                 [--connections C] [--window W] [--body BYTES] [--tls] [--parallel]

Each connection sends every request REPEAT times, at most WINDOW streams open at once, and
closes cleanly (GOAWAY) once all are answered. Prints one JSON object: the statuses the
client saw, by "METHOD STATUS", and the number of requests and connections.
"""
import argparse
import collections
import concurrent.futures
import json
import socket
import ssl
import struct
import time

import h2.config
import h2.connection
import h2.events


def run_connection(args, requests):
    sock = socket.create_connection((args.host, args.port))
    if args.tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        sock = ctx.wrap_socket(sock, server_hostname=args.host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    pending = list(requests)
    open_streams = {}
    seen = collections.Counter()
    done = 0

    def start_next():
        method, path = pending.pop(0)
        stream = conn.get_next_available_stream_id()
        body = b"x" * args.body if method in ("POST", "PUT", "PATCH") else b""
        headers = [
            (":method", method),
            (":scheme", "https" if args.tls else "http"),
            (":authority", f"{args.host}:{args.port}"),
            (":path", path),
            ("user-agent", "flyprobe-h2-test"),
        ]
        if body:
            headers.append(("content-length", str(len(body))))
        conn.send_headers(stream, headers, end_stream=not body)
        if body:
            conn.send_data(stream, body, end_stream=True)
        open_streams[stream] = method

    if args.abandon or args.cancel:
        while pending and len(open_streams) < args.window:
            start_next()
        sock.sendall(conn.data_to_send())
        # Until the server has read them: it acknowledges the SETTINGS sent before them.
        acked = False
        while not acked:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the server closed the connection")
            for event in conn.receive_data(data):
                acked |= isinstance(event, h2.events.SettingsAcknowledged)
            sock.sendall(conn.data_to_send())
        time.sleep(0.3)
        gone = collections.Counter(f"{m} abandoned" for m in open_streams.values())
        if args.abandon:
            # A reset, not a FIN: the server's later writes fail, on every hook set. After a
            # FIN a server may still write a response (hypercorn does, once its handler
            # returns), which is an answer where the write succeeds; on loopback the
            # client's reset to it can end the connection inside that very write.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return gone
        for stream in list(open_streams):
            conn.reset_stream(stream, error_code=8)
        sock.sendall(conn.data_to_send())
        open_streams.clear()
        pending.extend(tuple(r.split(" ", 1)) for r in args.then)
        requests = list(requests) + pending
        done = sum(gone.values())
        seen += gone
    while done < len(requests):
        while pending and len(open_streams) < args.window:
            start_next()
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the server closed the connection")
        for event in conn.receive_data(data):
            if getattr(event, "stream_id", None) not in (None, *open_streams):
                continue  # a stream this client reset
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"].decode()
                seen[f"{open_streams[event.stream_id]} {status}"] += 1
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                open_streams.pop(event.stream_id, None)
                done += 1
            elif isinstance(event, h2.events.StreamReset):
                raise SystemExit(f"stream {event.stream_id} reset: {event.error_code}")
        sock.sendall(conn.data_to_send())
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    return seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--request", action="append", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--body", type=int, default=16)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the connections at once, a thread each",
    )
    parser.add_argument(
        "--abandon",
        action="store_true",
        help="send the requests, then close each connection with a reset (SO_LINGER 0) "
        "without reading a response",
    )
    parser.add_argument(
        "--cancel",
        action="store_true",
        help="send the requests, reset each stream (RST_STREAM CANCEL) once the server has "
        "read them, then send the --then requests on the same connection",
    )
    parser.add_argument("--then", action="append", default=[])
    args = parser.parse_args()
    requests = [tuple(r.split(" ", 1)) for r in args.request] * args.repeat
    workers = args.connections if args.parallel else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda _: run_connection(args, requests), range(args.connections)))
    total = sum(results, collections.Counter())
    print(json.dumps({
        "seen": dict(total),
        "requests": sum(total.values()),
        "connections": args.connections,
    }))


if __name__ == "__main__":
    main()
