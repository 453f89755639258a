"""Plain-socket HTTP/1.1 servers (stdlib only) for tests/tests/sockets.rs: the ways a
connection reaches the process that serves it other than "this process accepted it".

    socket_server.py MODE --port N [--upstream PORT]

MODE
  blocking  one process, one thread: a blocking accept() loop serving each connection in
            turn (so between connections it sits blocked in accept)
  serial    the same, but waiting in select() until a connection is there, so accept()
            itself never blocks (as event-loop servers do); the other modes wait so too
  pass-fd   the parent accepts and hands each connection to one worker child over a unix
            socketpair (SCM_RIGHTS), then closes its copy; the child serves (as Node's
            cluster does)
  fork      the parent accepts and forks a child per connection, then closes its copy; the
            child serves and exits
  threads   the parent forks --workers N children (default 2) that accept on the shared
            listener and serve each connection on a thread of its own, started for it and
            ended with it (as thread-per-connection servers do); the parent forks a new
            worker for each that dies

Every request gets the same answer, 200 "ok" with Content-Length and keep-alive, naming the
serving process in `x-worker-pid`; a connection stays open until the client closes it.

GET /close-unread
  is answered, then, 200 ms later (what the client sent after the request head has arrived),
  the connection is closed with that data unread, so the kernel resets it (a reset sent).

GET /exit-holding
  is not answered: the server takes the next connection off its listener and exits at once
  without touching it (as a recycled worker may exit holding connections it accepted and
  never read).

GET /retire?how=dup2|dup3|close_range
  is answered, then the connection ends without close(2): its fd number is taken over by a
  regular file (dup2(2) or dup3(2) of the file onto it, or close_range(2) of it and a
  reopen that gets the same number), which the server then writes and reads (an
  HTTP-looking request and response). Once that file I/O is done it prints
  `retired HOW fd=N` on stdout. The file stays open.

--upstream PORT (blocking and serial modes)
  before answering, each request makes outbound HTTP requests of the server's own to
  127.0.0.1:PORT: one on a keep-alive connection opened (and used once) at start-up, before
  any client, and one on a fresh connection that the server then closes itself.
"""
import argparse
import ctypes
import os
import select
import signal
import socket
import stat
import sys
import threading
import time

SYS_CLOSE_RANGE = 436  # the same number on every Linux architecture
KEPT_FILES = []  # the files that took over retired connections' fd numbers, kept open
LISTENER = None  # the listening socket, for /exit-holding


def response():
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
        b"Connection: keep-alive\r\nx-worker-pid: %d\r\n\r\nok" % os.getpid()
    )


def read_message(sock, buf):
    """One HTTP/1.x message from `sock`, `buf` holding what was read before it. Returns
    (head, the bytes after the message), or (None, b"") at end of stream."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    return head, buf[length:]


def exchange(sock, buf):
    """One GET / on an upstream connection; returns what was read past its response."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    head, buf = read_message(sock, buf)
    if head is None or not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("upstream answered %r" % head)
    return buf


class Upstream:
    """The server's own outbound connections to a second server."""

    def __init__(self, port):
        self.port = port
        self.pool = socket.create_connection(("127.0.0.1", port))
        self.pool_buf = exchange(self.pool, b"")

    def exchange(self):
        self.pool_buf = exchange(self.pool, self.pool_buf)
        fresh = socket.create_connection(("127.0.0.1", self.port))
        exchange(fresh, b"")
        fresh.close()


def serve(conn, upstream):
    """Answer requests on `conn` until the client closes it (or a request retires it)."""
    buf = b""
    try:
        while True:
            head, buf = read_message(conn, buf)
            if head is None:
                break
            target = head.split(b" ")[1] if head.count(b" ") >= 2 else b"/"
            if target.startswith(b"/exit-holding"):
                held = LISTENER.accept()  # kept: a dropped socket object would close it
                os._exit(len(held) - 2)
            if upstream is not None:
                upstream.exchange()
            conn.sendall(response())
            if target.startswith(b"/close-unread"):
                # Let the rest the client sent arrive first: closed before it did, the socket
                # would end with a FIN and reset only when the late data came in.
                time.sleep(0.2)
                break
            if target.startswith(b"/retire"):
                how = target.partition(b"how=")[2].decode()
                retire(conn.detach(), how)
                return
    except ConnectionError:
        pass
    conn.close()


def retire(fd, how):
    """End the connection on `fd` without close(2): a regular file takes its number."""
    path = "/tmp/flyprobe-socket-server-%d-%d" % (os.getpid(), len(KEPT_FILES))
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
    if how in ("dup2", "dup3"):
        file_fd = os.open(path, flags, 0o600)
        # inheritable=True is dup2(2); inheritable=False is dup3(fd, fd2, O_CLOEXEC).
        os.dup2(file_fd, fd, inheritable=how == "dup2")
        os.close(file_fd)
    elif how == "close_range":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(SYS_CLOSE_RANGE, fd, fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "close_range")
        reopened = os.open(path, flags, 0o600)
        if reopened != fd:
            raise RuntimeError("the file got fd %d, not the retired %d" % (reopened, fd))
    else:
        raise ValueError("unknown retire method %r" % how)
    os.unlink(path)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise RuntimeError("fd %d is not the regular file" % fd)
    # What a request and its response would look like, through the reused fd number.
    os.write(fd, b"GET /phantom HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    os.lseek(fd, 0, os.SEEK_SET)
    if not os.read(fd, 4096).startswith(b"GET /phantom"):
        raise RuntimeError("read back something else")
    os.write(fd, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    KEPT_FILES.append(fd)
    print("retired %s fd=%d" % (how, fd), flush=True)


def accept_ready(listener):
    """accept() once a connection is waiting (select() blocks, accept() does not)."""
    select.select([listener], [], [])
    return listener.accept()[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["blocking", "serial", "pass-fd", "fork", "threads"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--upstream", type=int)
    args = parser.parse_args()
    global LISTENER
    listener = socket.create_server(("127.0.0.1", args.port), backlog=128)
    LISTENER = listener
    upstream = Upstream(args.upstream) if args.upstream else None

    if args.mode == "blocking":
        while True:
            conn, _ = listener.accept()
            serve(conn, upstream)

    elif args.mode == "serial":
        while True:
            serve(accept_ready(listener), upstream)

    elif args.mode == "pass-fd":
        parent_end, child_end = socket.socketpair()
        if os.fork() == 0:
            listener.close()
            parent_end.close()
            while True:
                _, fds, _, _ = socket.recv_fds(child_end, 1, 1)
                if not fds:
                    os._exit(0)
                serve(socket.socket(fileno=fds[0]), upstream)
        child_end.close()
        while True:
            conn = accept_ready(listener)
            socket.send_fds(parent_end, [b"c"], [conn.fileno()])
            conn.close()

    elif args.mode == "threads":
        alive = 0
        while True:
            while alive < args.workers:
                if os.fork() == 0:
                    while True:
                        conn = accept_ready(listener)
                        threading.Thread(target=serve, args=(conn, upstream)).start()
                alive += 1
            os.wait()
            alive -= 1

    else:  # fork
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
        while True:
            conn = accept_ready(listener)
            if os.fork() == 0:
                listener.close()
                serve(conn, upstream)
                os._exit(0)
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
