"""The processes under test and their upstreams, with equivalent configurations.

- upstream: nginx (1 process, keep-alive, `return 200 "hello\\n"`) and the gRPC echo service
  (`legate-load serve-grpc`, HTTP/2 cleartext);
- legate and envoy: bench/bootstrap.yaml, `--concurrency 1 -l error --disable-hot-restart`;
- nginx as a proxy: one process, `proxy_pass` to the same nginx upstream over HTTP/1.1 with
  upstream keep-alive, `grpc_pass` to the gRPC upstream, and the same three entry points
  (HTTP/1.1, h2c prior knowledge, TLS with ALPN h2/http/1.1), on three ports because nginx
  cannot serve HTTP/1.1 and h2c on one plaintext port before 1.25.
"""
import os
import shutil
import string
import subprocess

from procs import free_port, spawn, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
GRPC_PREFIX = "/legate.bench.Echo/"
# nginx needs a slot per connection (client side and upstream side) to hold the idle ones.
NGINX_CONNECTIONS = 12000


def nginx_bin():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_common(tmp, name):
    return f"""worker_processes 1;
daemon off;
master_process off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err error;
worker_rlimit_nofile {NGINX_CONNECTIONS * 2};
events {{ worker_connections {NGINX_CONNECTIONS}; }}
"""


def http_common(tmp, name):
    return f"""  access_log off;
  client_body_temp_path {tmp}/{name}-body; proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fcgi; uwsgi_temp_path {tmp}/{name}-uwsgi; scgi_temp_path {tmp}/{name}-scgi;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
"""


def start_nginx_conf(tmp, name, conf_text, port, cpus):
    conf = os.path.join(tmp, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    err = os.path.join(tmp, f"{name}.err")
    p = spawn([nginx_bin(), "-p", tmp, "-c", conf, "-e", err], cpus)
    wait_port(port, p, name, err)
    return p, err


def start_upstream_nginx(tmp, port, cpus):
    text = nginx_common(tmp, "upstream") + "http {\n" + http_common(tmp, "upstream") + f"""  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ default_type text/plain; return 200 "hello\\n"; }}
  }}
}}
"""
    return start_nginx_conf(tmp, "upstream", text, port, cpus)[0]


def start_grpc_upstream(load_bin, tmp, cpus):
    port = free_port()
    err = os.path.join(tmp, "grpc-upstream.err")
    with open(err, "w") as ef:
        p = spawn([load_bin, "serve-grpc", "--port", str(port)], cpus, stderr=ef)
    wait_port(port, p, "grpc upstream", err)
    return p, port


def make_cert(tmp):
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 (openssl CLI); all proxies use it."""
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=bench",
                    "-addext", "subjectAltName=DNS:bench,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


class Proxy:
    """A started proxy: its process and its entry points (h1, h2c, tls, grpc ports)."""

    def __init__(self, kind, proc, ports, err):
        self.kind, self.proc, self.ports, self.err = kind, proc, ports, err

    @property
    def pid(self):
        return self.proc.pid

    def stderr_tail(self):
        try:
            with open(self.err, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""


def start_envoy_like(kind, binary, tmp, up, cpus):
    """legate or envoy on bench/bootstrap.yaml; one plaintext port serves h1, h2c and gRPC."""
    listen, tls = free_port(), free_port()
    with open(os.path.join(HERE, "bootstrap.yaml")) as f:
        text = string.Template(f.read()).substitute(
            LISTEN_PORT=listen, TLS_PORT=tls, UPSTREAM_PORT=up["http"], GRPC_PORT=up["grpc"],
            CERT=up["cert"], KEY=up["key"])
    cfg = os.path.join(tmp, f"{kind}.yaml")
    with open(cfg, "w") as f:
        f.write(text)
    err = os.path.join(tmp, f"{kind}.err")
    args = [binary, "-c", cfg, "--concurrency", "1", "-l", "error", "--disable-hot-restart"]
    with open(err, "w") as ef:
        p = spawn(args, cpus, stderr=ef)
    wait_port(listen, p, kind, err)
    wait_port(tls, p, kind, err)
    return Proxy(kind, p, {"h1": listen, "h2": listen, "tls": tls, "grpc": listen}, err)


def start_nginx_proxy(tmp, up, cpus):
    h1, h2, tls = free_port(), free_port(), free_port()
    text = nginx_common(tmp, "nginx-proxy") + "http {\n" + http_common(tmp, "nginx-proxy") + f"""
  upstream http_up {{ server 127.0.0.1:{up['http']}; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }}
  upstream grpc_up {{ server 127.0.0.1:{up['grpc']}; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }}
  server {{
    listen 127.0.0.1:{h1} backlog=4096;
    listen 127.0.0.1:{h2} http2 backlog=4096;
    listen 127.0.0.1:{tls} ssl http2 backlog=4096;
    ssl_certificate {up['cert']};
    ssl_certificate_key {up['key']};
    location / {{
      proxy_pass http://http_up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location {GRPC_PREFIX} {{
      grpc_pass grpc://grpc_up;
      grpc_read_timeout 300s;
      grpc_send_timeout 300s;
      client_body_timeout 300s;
    }}
  }}
}}
"""
    p, err = start_nginx_conf(tmp, "nginx-proxy", text, h1, cpus)
    wait_port(h2, p, "nginx-proxy", err)
    wait_port(tls, p, "nginx-proxy", err)
    return Proxy("nginx", p, {"h1": h1, "h2": h2, "tls": tls, "grpc": h2}, err)


def start_proxy(kind, binary, tmp, up, cpus):
    if kind == "nginx":
        return start_nginx_proxy(tmp, up, cpus)
    return start_envoy_like(kind, binary, tmp, up, cpus)
