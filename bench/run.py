#!/usr/bin/env python3
"""Legate, Envoy and nginx side by side: equivalent configurations, the same upstreams, the same
load generators, in the same run.

Started by bench/run.sh (which installs the tools and builds legate and legate-load). Each round
runs the loads straight at the upstreams (the baseline), then each proxy in turn (L, E, N, L, E,
N...), every proxy freshly started with one worker, and measures for each:
  - HTTP/1.1 keep-alive (wrk), HTTP/2 cleartext (h2load), HTTP/1.1 over TLS (wrk https),
    gRPC unary, bidi streaming and server streaming (legate-load): requests/s, latency
    percentiles, CPU time per request from the proxy's own accounting (/proc/PID/stat
    utime+stime, all threads, divided by the requests completed);
  - a fixed-rate HTTP/1.1 run (legate-load rate, open loop: latency = completion - scheduled
    send time, so no coordinated omission), also run straight at the upstream, so that the
    latency the proxy *adds* is reported at p50/p90/p99/p99.9;
  - resident memory: idle, after each load, and with 10,000 idle keep-alive connections (a
    fresh process), giving KB per idle connection.
Reports medians over the rounds and ratios to Envoy and to nginx; writes bench/results/
latest.{json,md} and PNG charts; a full run also copies the table into README.md. Only loopback
addresses; every load run is bounded in time; every process started is killed on exit.
"""
import argparse
import atexit
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loads  # noqa: E402
import procs  # noqa: E402
import proxies  # noqa: E402
import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The loads that measure throughput and CPU per request, in the order they run.
CPU_SCENARIOS = ("http1", "http2", "https1", "grpc_unary", "grpc_bidi", "grpc_server")
KINDS = ("legate", "envoy", "nginx")


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def http_get(port, tls=False):
    """One plain HTTP/1.1 request (optionally over TLS): the route must reach the upstream."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        raw = ctx.wrap_socket(raw, server_hostname="bench")
    with raw as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n", 1)[0]
    if b" 200 " not in head + b" " or not data.endswith(b"hello\n"):
        raise RuntimeError(f"request through port {port} did not reach nginx: {data[:300]!r}")


def scenario(name, port_of, args, cpus, tmp, seconds=None):
    """Runs one load against the entry point `port_of[...]`."""
    s = seconds or args.seconds
    if name == "http1":
        return loads.run_wrk(port_of["h1"], s, args.h1_connections, cpus)
    if name == "https1":
        return loads.run_wrk(port_of["tls"], s, args.h1_connections, cpus, tls=True)
    if name == "rate":
        return loads.run_rate(args.load_bin, port_of["h1"], args.rate, s, args.rate_connections, cpus)
    if name == "http2":
        return loads.run_h2load(port_of["h2"], s, args.h2_connections, args.h2_streams, cpus, tmp)
    mode = name.split("_", 1)[1]
    return loads.run_grpc(args.load_bin, port_of["grpc"], mode, s, args.grpc_connections,
                          args.grpc_streams, cpus)


def direct_round(up, args, cpus, tmp):
    """The baseline: the loads straight at the upstreams (no proxy)."""
    ports = {"h1": up["http"], "grpc": up["grpc"]}
    return {name: scenario(name, ports, args, cpus, tmp)
            for name in ("http1", "grpc_unary", "grpc_bidi", "grpc_server", "rate")}


def measure_memory(kind, binary, tmp, up, args, proxy_cpus, load_cpus):
    """A fresh process: idle RSS, then RSS holding `--idle-connections` keep-alive connections."""
    p = proxies.start_proxy(kind, binary, tmp, up, proxy_cpus)
    try:
        idle = procs.settled_rss_mb(p.pid)
        http_get(p.ports["h1"])
        before = procs.settled_rss_mb(p.pid)
        conns = loads.IdleConnections(args.load_bin, p.ports["h1"], args.idle_connections, load_cpus)
        try:
            held = procs.settled_rss_mb(p.pid, deadline=5.0)
            if p.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited while holding the idle connections")
        finally:
            conns.close()
        opened = conns.result["opened"]
        return {"rss_idle_mb": idle, "rss_before_conns_mb": before, "rss_conns_mb": held,
                "connections_opened": opened, "connections_failed": conns.result["failed"],
                "open_s": conns.result["open_s"],
                "kb_per_conn": (held - before) * 1024 / opened if opened else None}
    except Exception:
        sys.stderr.write(f"--- {kind} stderr (tail) ---\n{p.stderr_tail()}\n")
        raise
    finally:
        procs.stop(p.proc)


def accounted(p, name, proxy_cpus, run_load):
    """Runs one load with the proxy's CPU accounting: CPU per request, CPU %, others' share."""
    s0 = procs.cpu_stat(proxy_cpus) if proxy_cpus else None
    c0, t0 = procs.cpu_seconds(p.pid), time.monotonic()
    r = run_load()
    c1, t1 = procs.cpu_seconds(p.pid), time.monotonic()
    if s0:
        # Share of the proxy's own CPU taken by other processes (a compile...) meanwhile.
        s1 = procs.cpu_stat(proxy_cpus)
        others = (s1[1] - s0[1]) - (s1[2] - s0[2]) - (c1 - c0) * procs.TICK
        r["others_on_proxy_cpu_pct"] = max(0.0, 100 * others / max(s1[0] - s0[0], 1))
    if p.proc.poll() is not None:
        raise RuntimeError(f"{p.kind} exited during the {name} load")
    r["cpu_s"] = c1 - c0
    r["cpu_us_per_req"] = (c1 - c0) * 1e6 / r["requests"] if r["requests"] else None
    r["cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
    r["rss_after_mb"] = procs.rss_mb(p.pid)
    return r


def measure(kind, binary, tmp, up, args, proxy_cpus, load_cpus):
    p = proxies.start_proxy(kind, binary, tmp, up, proxy_cpus)
    try:
        idle = procs.settled_rss_mb(p.pid)
        http_get(p.ports["h1"])
        http_get(p.ports["tls"], tls=True)
        # Warm-up (not measured): upstream connections, allocator arenas, caches.
        loads.run_wrk(p.ports["h1"], 1, args.h1_connections, load_cpus)
        out = {"rss_idle_mb": idle}
        for name in (*CPU_SCENARIOS, "rate"):
            out[name] = accounted(p, name, proxy_cpus, lambda n=name: scenario(n, p.ports, args, load_cpus, tmp))
        return out
    except Exception:
        sys.stderr.write(f"--- {kind} stderr (tail) ---\n{p.stderr_tail()}\n")
        raise
    finally:
        procs.stop(p.proc)


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "loadavg_before": open("/proc/loadavg").read().split()[:3]}


def versions(binaries):
    def word(text, i):
        parts = text.split()
        return parts[i] if len(parts) > abs(i) else text
    v = {"wrk": word(procs.cmd_out(["wrk", "-v"]), 1),
         "h2load": word(procs.cmd_out(["h2load", "--version"]), 1),
         "nginx": word(procs.cmd_out([proxies.nginx_bin(), "-v"]), -1),
         "openssl": word(procs.cmd_out(["openssl", "version"]), 1)}
    if "envoy" in binaries:
        m = re.search(r"version: ([0-9a-f]{7})[0-9a-f]*/([^/\s]+)", procs.cmd_out([binaries["envoy"], "--version"]))
        v["envoy"] = f"{m.group(2)} ({m.group(1)})" if m else "?"
    if "legate" in binaries:
        if "/debug/" in binaries["legate"]:
            v["legate_warning"] = f"DEBUG BUILD {binaries['legate']}"
        rev = procs.cmd_out(["git", "-C", HERE, "rev-parse", "--short", "HEAD"])
        dirty = procs.cmd_out(["git", "-C", HERE, "status", "--porcelain", "--", "../proxy", "../proto", "../filters"])
        built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(binaries["legate"]).st_mtime))
        v["legate"] = (f"binary built {built}; source tree at run time: git {rev}"
                       + (" + uncommitted changes" if dirty else ""))
    return v


def raise_nofile(want):
    """Raise our soft RLIMIT_NOFILE (inherited by every child) as far as `want` allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
    if hard == resource.RLIM_INFINITY:
        target = max(want, soft)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round (under two minutes)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per load run (default 10, --quick 2)")
    ap.add_argument("--only", action="append", choices=KINDS,
                    help="benchmark this proxy only (repeatable: --only legate --only nginx)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the load to separate CPUs")
    ap.add_argument("--max-noise", type=float, default=10.0,
                    help="a round counts as undisturbed when other processes used at most this %% of the "
                         "proxy's CPU; medians use undisturbed rounds when there are any (default 10)")
    ap.add_argument("--h1-connections", type=int, default=50)
    ap.add_argument("--h2-connections", type=int, default=10)
    ap.add_argument("--h2-streams", type=int, default=10)
    ap.add_argument("--grpc-connections", type=int, default=10)
    ap.add_argument("--grpc-streams", type=int, default=50, help="concurrent gRPC calls (default 50)")
    ap.add_argument("--rate", type=float, default=2000.0, help="fixed-rate run, requests/s (default 2000)")
    ap.add_argument("--rate-connections", type=int, default=50)
    ap.add_argument("--idle-connections", type=int, default=10000)
    ap.add_argument("--readme", dest="readme", action="store_true", default=None,
                    help="copy the table into README.md's performance section (default: full runs only)")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    ap.add_argument("--out", help="where latest.* and the charts go (default bench/results, "
                                   "--quick: bench/results/quick, not committed)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seconds = args.seconds or (2 if args.quick else 10)
    args.out = args.out or os.path.join(HERE, "results", "quick" if args.quick else "")
    if args.readme is None:
        args.readme = not args.quick
    args.load_bin = os.environ.get("LEGATE_LOAD_BIN")
    if not args.load_bin or not os.access(args.load_bin, os.X_OK):
        sys.exit(f"no executable legate-load in $LEGATE_LOAD_BIN ({args.load_bin!r})")
    return args


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(procs.kill_all)

    binaries = {}
    for kind in KINDS:
        if args.only and kind not in args.only:
            continue
        if kind == "nginx":
            binaries[kind] = proxies.nginx_bin()
            continue
        binary = os.environ.get(f"{kind.upper()}_BIN")
        if not binary or not os.access(binary, os.X_OK):
            sys.exit(f"{kind}: no executable binary in ${kind.upper()}_BIN ({binary!r})")
        binaries[kind] = binary
    nofile = raise_nofile(args.idle_connections * 2 + 1000)
    if nofile < args.idle_connections + 500:
        args.idle_connections = max(nofile - 500, 100)
        print(f"RLIMIT_NOFILE is {nofile}: holding {args.idle_connections} idle connections", file=sys.stderr)

    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        proxy_cpus, load_cpus = {cpus[0]}, set(cpus[1:])
    else:
        proxy_cpus, load_cpus = None, None

    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "versions": versions(binaries), "binaries": binaries, "order": list(binaries),
           "quick": args.quick,
           "params": {k: getattr(args, k) for k in (
               "rounds", "seconds", "max_noise", "h1_connections", "h2_connections", "h2_streams",
               "grpc_connections", "grpc_streams", "rate", "rate_connections", "idle_connections")}}
    doc["params"]["proxy_cpus"] = ",".join(map(str, sorted(proxy_cpus))) if proxy_cpus else None
    doc["params"]["load_cpus"] = ",".join(map(str, sorted(load_cpus))) if load_cpus else None
    tmp = tempfile.mkdtemp(prefix="legate-bench-")
    raw = {"direct": [], **{k: [] for k in binaries}}
    memory = {k: [] for k in binaries}
    started = time.monotonic()
    try:
        cert, key = proxies.make_cert(tmp)
        up = {"http": procs.free_port(), "cert": cert, "key": key}
        proxies.start_upstream_nginx(tmp, up["http"], load_cpus)
        _, up["grpc"] = proxies.start_grpc_upstream(args.load_bin, tmp, load_cpus)
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}: direct", file=sys.stderr, flush=True)
            raw["direct"].append(direct_round(up, args, load_cpus, tmp))
            for kind, binary in binaries.items():  # interleaved: L, E, N, L, E, N...
                print(f"round {rnd + 1}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
                memory[kind].append(measure_memory(kind, binary, tmp, up, args, proxy_cpus, load_cpus))
                raw[kind].append(measure(kind, binary, tmp, up, args, proxy_cpus, load_cpus))
    finally:
        procs.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)

    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    report.summarize(doc, raw, memory, CPU_SCENARIOS, args.max_noise)
    report.write_all(doc, args.out, CPU_SCENARIOS, readme=os.path.join(HERE, "..", "README.md") if args.readme else None)


if __name__ == "__main__":
    sys.exit(main())
