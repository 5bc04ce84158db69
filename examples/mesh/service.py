#!/usr/bin/env python3
"""A tiny workload for the local mesh: answers every GET with JSON naming itself, and, with
--call HOST, first calls the service HOST through its sidecar's outbound listener (the way an
application configured with an HTTP proxy would), nesting the answer.

Only the standard library; binds the address it is given (a loopback "pod IP")."""

import argparse
import json
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--listen", required=True, help="IP:PORT")
    p.add_argument("--call", help="a service to call through the sidecar, e.g. reviews")
    p.add_argument("--sidecar", help="the sidecar's outbound listener, IP:PORT")
    args = p.parse_args()
    ip, port = args.listen.rsplit(":", 1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = {"service": args.name, "pod": args.listen, "path": self.path}
            if args.call and args.sidecar:
                req = urllib.request.Request(
                    f"http://{args.sidecar}/", headers={"Host": args.call}
                )
                try:
                    with urllib.request.urlopen(req, timeout=3) as r:
                        body["called"] = json.loads(r.read())
                except Exception as e:  # the demo shows the failure instead of hiding it
                    body["called"] = {"error": str(e)}
            data = (json.dumps(body, indent=2) + "\n").encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args) -> None:
            pass

    ThreadingHTTPServer((ip, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
