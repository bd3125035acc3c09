#!/usr/bin/env python3
"""The demo backend: answers every GET like Google's hello-app, which the
seed walk-through deploys as `helloworld`."""
import argparse
import http.server
import socket


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"Hello, world!\nVersion: 1.0.0\nHostname: {socket.gethostname()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9080)
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args()
    http.server.ThreadingHTTPServer((args.bind, args.port), Hello).serve_forever()


if __name__ == "__main__":
    main()
