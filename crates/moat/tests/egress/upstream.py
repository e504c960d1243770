"""A test upstream for moat's egress tests: HTTP and (with --cert/--key) HTTPS on one address.

Every request is appended to --log as one JSON line (server, method, path, headers, body), and
answered with `hello from NAME <path>`. Prints `ports HTTP HTTPS` once both listen. Loopback
only: the test gives it a 127.x address.
"""
import argparse, json, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--bind", required=True)
ap.add_argument("--name", default="up")
ap.add_argument("--log", required=True)
ap.add_argument("--cert")
ap.add_argument("--key")
args = ap.parse_args()
if not args.bind.startswith("127."):
    sys.exit("refusing to listen outside loopback")
lock = threading.Lock()


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        rec = {
            "server": self.server.label,
            "method": self.command,
            "path": self.path,
            "headers": {k: v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        with lock, open(args.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.path.startswith("/big/"):
            out = b"z" * int(self.path[5:])
        else:
            out = f"hello from {self.server.label} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = handle_any


def serve(label, tls):
    s = ThreadingHTTPServer((args.bind, 0), H)
    s.daemon_threads = True
    s.label = label
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    return s.server_address[1]


http_port = serve(args.name + "-http", False)
https_port = serve(args.name + "-https", True) if args.cert else 0
print(f"ports {http_port} {https_port}", flush=True)
sys.stdin.read()  # runs until the test closes our stdin (or dies)
