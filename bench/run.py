#!/usr/bin/env python3
"""Legate vs Envoy side by side: same bootstrap, same nginx upstream, same load generators.

Started by bench/run.sh (which installs the tools and builds legate). Each round runs
direct-to-nginx, then each proxy in turn (A, B, A, B, ...), every proxy freshly started with
--concurrency 1 on the bootstrap bench/bootstrap.yaml, and measures:
  - HTTP/1.1 keep-alive with wrk, HTTP/2 cleartext (prior knowledge) with h2load;
  - requests/second and latency percentiles from the load generator (for h2load, from its
    per-request log, since its summary only has min/max/mean);
  - CPU time per request from the proxy's own accounting (/proc/PID/stat utime+stime, all
    threads, before and after the load, divided by the requests completed);
  - resident memory (VmRSS from /proc/PID/status) idle, and after each load.
Reports the median over the rounds, writes bench/results/latest.{json,md}. Only loopback
addresses; every load run is bounded in time; every process started is killed on exit.
"""
import argparse
import atexit
import ctypes
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")
PROTOCOLS = ("http1", "http2")
CHILDREN = []  # every long-lived process started, killed on exit
STARTUP_DEADLINE = 20.0


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def kill(p):
    """SIGKILL the process and its whole process group (anything it forked)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    if p.poll() is None:
        try:
            p.kill()
        except OSError:
            pass


def kill_all():
    for p in CHILDREN:
        kill(p)
    for p in CHILDREN:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    CHILDREN.clear()


def preexec(cpus):
    """In the child: die with us (even on SIGKILL), optionally pinned to `cpus`."""
    libc = ctypes.CDLL(None, use_errno=True)

    def f():
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)
    return f


def spawn(args, cpus, stderr=subprocess.DEVNULL):
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                         preexec_fn=preexec(cpus), start_new_session=True)
    CHILDREN.append(p)
    return p


def run_bounded(args, cpus, seconds):
    """A load generator run: bounded by its own duration flag and by a hard timeout."""
    r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=seconds + 30, preexec_fn=preexec(cpus))
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, err_file=None):
    end = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    tail = ""
    if err_file and os.path.exists(err_file):
        with open(err_file, errors="replace") as f:
            tail = f.read()[-2000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "still not listening"
    raise RuntimeError(f"{what}: port {port} never accepted within {STARTUP_DEADLINE:.0f}s ({state})\n{tail}")


def check_route(port):
    """One plain HTTP/1.1 request through the proxy: the route must reach nginx."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n", 1)[0]
    if b" 200 " not in head + b" " or not data.endswith(b"hello\n"):
        raise RuntimeError(f"request through the proxy did not reach nginx: {data[:300]!r}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, fields 14 and 15


def cpu_stat(cpus):
    """(total, busy, irq+softirq) ticks of the given CPUs, from /proc/stat."""
    total = busy = irq = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
                v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(v)
                busy += sum(v) - v[3] - v[4]
                irq += v[5] + v[6]
    return total, busy, irq


def settled_rss_mb(pid, deadline=2.0):
    """VmRSS once it stops moving (two samples 0.1 s apart within 1%), at most `deadline` s."""
    end = time.monotonic() + deadline
    prev = rss_mb(pid)
    while time.monotonic() < end:
        time.sleep(0.1)
        cur = rss_mb(pid)
        if abs(cur - prev) <= 0.01 * prev:
            return cur
        prev = cur
    return prev


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def start_nginx(tmp, port, cpus):
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ default_type text/plain; return 200 "hello\\n"; }}
  }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = spawn([nginx, "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "nginx.err")], cpus)
    wait_port(port, p, "nginx", os.path.join(tmp, "nginx.err"))
    return p


def start_proxy(kind, binary, tmp, upstream_port, cpus):
    listen = free_port()
    with open(os.path.join(HERE, "bootstrap.yaml")) as f:
        text = string.Template(f.read()).substitute(LISTEN_PORT=listen, UPSTREAM_PORT=upstream_port)
    cfg = os.path.join(tmp, f"{kind}.yaml")
    with open(cfg, "w") as f:
        f.write(text)
    err = os.path.join(tmp, f"{kind}.err")
    args = [binary, "-c", cfg, "--concurrency", "1", "-l", "error", "--disable-hot-restart"]
    with open(err, "w") as ef:
        p = spawn(args, cpus, stderr=ef)
    wait_port(listen, p, kind, err)
    return p, listen, err


def stop(p):
    kill(p)
    p.wait(timeout=10)
    if p in CHILDREN:
        CHILDREN.remove(p)


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port, seconds, conns, cpus):
    out = run_bounded(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
                       f"http://127.0.0.1:{port}/"], cpus, seconds)
    try:
        res = {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
               "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
        for pct in ("50", "99"):
            m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            res[f"p{pct}_ms"] = to_ms(*m.groups())
    except (AttributeError, TypeError) as e:
        raise RuntimeError(f"cannot parse wrk output: {e}\n{out}") from e
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = int(errors.group(1)) if errors else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["errors"] += sum(int(x) for x in sock.groups()) if sock else 0
    res["latency_source"] = "wrk --latency percentiles"
    return res


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))  # nearest-rank
    return sorted_values[min(len(sorted_values), max(rank, 1)) - 1]


def run_h2load(port, seconds, conns, streams, cpus, tmp):
    log = os.path.join(tmp, "h2load.log")
    out = run_bounded(["h2load", f"-c{conns}", f"-m{streams}", "-t1", "-D", str(seconds),
                       f"--log-file={log}", f"http://127.0.0.1:{port}/"], cpus, seconds)
    try:
        m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                      r"(\d+) errored", out)
        done, ok = int(m.group(1)), int(m.group(2))
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        rt = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
        codes = re.search(r"status codes: (\d+) 2xx", out)
    except AttributeError as e:
        raise RuntimeError(f"cannot parse h2load output\n{out}") from e
    res = {"requests": done, "rps": rps, "errors": done - (int(codes.group(1)) if codes else ok),
           "mean_ms": to_ms(rt.group(5), rt.group(6)), "max_ms": to_ms(rt.group(3), rt.group(4))}
    durations = []
    try:
        with open(log) as f:
            for line in f:
                cols = line.split("\t")
                if len(cols) >= 3 and cols[1].startswith("2"):
                    durations.append(int(cols[2]))
        os.unlink(log)
    except (OSError, ValueError):
        durations = []
    if durations:
        durations.sort()
        res["p50_ms"] = percentile(durations, 50) / 1000
        res["p99_ms"] = percentile(durations, 99) / 1000
        res["latency_source"] = "h2load --log-file per-request times"
    else:  # no per-request log: fall back to h2load's summary
        res["p50_ms"], res["p99_ms"] = res["mean_ms"], res["max_ms"]
        res["latency_source"] = "h2load summary: mean and max (no percentiles)"
    return res


def load(proto, port, args, cpus, tmp, seconds=None):
    seconds = seconds or args.seconds
    if proto == "http1":
        return run_wrk(port, seconds, args.h1_connections, cpus)
    return run_h2load(port, seconds, args.h2_connections, args.h2_streams, cpus, tmp)


def measure(kind, binary, tmp, upstream_port, args, proxy_cpus, load_cpus):
    p, port, err = start_proxy(kind, binary, tmp, upstream_port, proxy_cpus)
    try:
        idle = settled_rss_mb(p.pid)
        check_route(port)
        # Warm-up (not measured): upstream connections, allocator arenas, caches.
        run_wrk(port, 1, args.h1_connections, load_cpus)
        out = {"rss_idle_mb": idle}
        for proto in PROTOCOLS:
            s0 = cpu_stat(proxy_cpus) if proxy_cpus else None
            c0, t0 = cpu_seconds(p.pid), time.monotonic()
            r = load(proto, port, args, load_cpus, tmp)
            c1, t1 = cpu_seconds(p.pid), time.monotonic()
            if s0:
                # Share of the proxy's own CPU taken by other processes (a compile...) meanwhile.
                s1 = cpu_stat(proxy_cpus)
                others = (s1[1] - s0[1]) - (s1[2] - s0[2]) - (c1 - c0) * TICK
                r["others_on_proxy_cpu_pct"] = max(0.0, 100 * others / max(s1[0] - s0[0], 1))
            if p.poll() is not None:
                raise RuntimeError(f"{kind} exited during the {proto} load")
            r["cpu_s"] = c1 - c0
            r["cpu_us_per_req"] = (c1 - c0) * 1e6 / r["requests"] if r["requests"] else None
            r["cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
            r["rss_idle_mb"] = idle
            r["rss_after_mb"] = rss_mb(p.pid)
            out[proto] = r
        return out
    except Exception:
        with open(err, errors="replace") as f:
            sys.stderr.write(f"--- {kind} stderr (tail) ---\n{f.read()[-2000:]}\n")
        raise
    finally:
        stop(p)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, d=1):
    return "-" if v is None else f"{v:.{d}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def cmd_out(args):
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "loadavg_before": open("/proc/loadavg").read().split()[:3]}


def versions(proxies):
    def word(text, i):
        parts = text.split()
        return parts[i] if len(parts) > abs(i) else text
    v = {"wrk": word(cmd_out(["wrk", "-v"]), 1),
         "h2load": word(cmd_out(["h2load", "--version"]), 1),
         "nginx": word(cmd_out([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]), -1)}
    if "envoy" in proxies:
        m = re.search(r"version: ([0-9a-f]{7})[0-9a-f]*/([^/\s]+)", cmd_out([proxies["envoy"], "--version"]))
        v["envoy"] = f"{m.group(2)} ({m.group(1)})" if m else "?"
    if "legate" in proxies:
        if "/debug/" in proxies["legate"]:
            v["legate_warning"] = f"DEBUG BUILD {proxies['legate']}"
        rev = cmd_out(["git", "-C", HERE, "rev-parse", "--short", "HEAD"])
        dirty = cmd_out(["git", "-C", HERE, "status", "--porcelain", "--", "../proxy", "../proto", "../filters"])
        built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(proxies["legate"]).st_mtime))
        v["legate"] = (f"binary built {built}; source tree at run time: git {rev}"
                       + (" + uncommitted changes" if dirty else ""))
    return v


def render(doc):
    a, s = doc["params"], doc["median"]
    m = doc["machine"]
    lines = [
        f"# Legate vs Envoy: {doc['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"load average before the run {' '.join(m['loadavg_before'])}.",
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        f"{a['rounds']} round(s), each: direct nginx, then " + ", ".join(doc["order"]) +
        f" (interleaved), {a['seconds']} s per load run; the table shows the median over the rounds.",
        f"Both proxies: the same bootstrap (bench/bootstrap.yaml), `--concurrency 1 -l error "
        f"--disable-hot-restart`; upstream nginx (1 worker, keep-alive, body `hello\\n`)."
        + (f" CPU pinning: proxy on CPU {a['proxy_cpus']}, nginx and load generators on CPU {a['load_cpus']}."
           if a["proxy_cpus"] else " No CPU pinning."),
        f"Load: HTTP/1.1 keep-alive `wrk -t1 -c{a['h1_connections']} -d{a['seconds']}s --latency`; "
        f"HTTP/2 cleartext prior knowledge `h2load -t1 -c{a['h2_connections']} -m{a['h2_streams']} -D {a['seconds']}`.",
        "",
        "| proxy | protocol | req/s | p50 ms | p99 ms | CPU µs/request | proxy CPU % | RSS idle MB | RSS after MB | errors (all rounds) | rounds used |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    d = s.get("nginx-direct/http1")
    if d:
        lines.append(f"| nginx direct | http1 | {d['rps']:.0f} | {fmt(d['p50_ms'], 3)} | {fmt(d['p99_ms'], 3)} "
                     f"| - | - | - | - | {d['errors']:.0f} | {d['rounds_used']}/{d['rounds']} |")
    for proto in PROTOCOLS:
        for kind in doc["order"]:
            r = s[f"{kind}/{proto}"]
            lines.append(f"| {kind} | {proto} | {r['rps']:.0f} | {fmt(r['p50_ms'], 3)} | {fmt(r['p99_ms'], 3)} "
                         f"| {fmt(r['cpu_us_per_req'])} | {fmt(r['cpu_pct'], 0)} | {fmt(r['rss_idle_mb'])} "
                         f"| {fmt(r['rss_after_mb'])} | {r['errors']:.0f} | {r['rounds_used']}/{r['rounds']} |")
        if "legate" in doc["order"] and "envoy" in doc["order"]:
            l, e = s[f"legate/{proto}"], s[f"envoy/{proto}"]
            cells = [fmt(ratio(l[k], e[k]), 2) for k in
                     ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_pct", "rss_idle_mb", "rss_after_mb")]
            lines.append(f"| **Legate/Envoy** | {proto} | " + " | ".join(cells[:3]) +
                         f" | **{cells[3]}** | " + " | ".join(cells[4:]) + " | | |")
    noisy = [v.get("others_on_proxy_cpu_pct") or 0 for v in s.values()]
    if noisy and max(noisy) > a["max_noise"]:
        lines += ["", f"**Warning:** no round was undisturbed: other processes used up to {max(noisy):.0f}% "
                  "of the proxy's CPU during the load runs (median per row; `others_on_proxy_cpu_pct` in "
                  "latest.json). These numbers are disturbed, CPU per request included (cache "
                  "pollution); rerun on a quiet machine."]
    lines += [
        "",
        "- req/s, p50, p99: from the load generator. HTTP/1.1 percentiles are wrk's `--latency`; "
        "HTTP/2 percentiles are computed from h2load's per-request log (`--log-file`), since its summary "
        "has only min/max/mean"
        + (" (**this run fell back to mean and max for some HTTP/2 rows**)"
           if any("mean and max" in str(r.get("latency_source")) for r in doc["median"].values()) else "") + ".",
        "- CPU µs/request: the proxy process's utime+stime (/proc/PID/stat, all threads) over the load "
        "run, divided by the requests completed (softirq time of loopback networking is not charged "
        "to any process, for either proxy). proxy CPU %: the same CPU time over the wall time "
        "(100 = one core saturated, so req/s is then bounded by the proxy).",
        "- RSS idle: VmRSS once the listener accepts and RSS has settled, before any request; RSS after: VmRSS right "
        "after that protocol's load (HTTP/1.1 runs first, then HTTP/2, in the same process).",
        "- Ratio rows: Legate's median divided by Envoy's (below 1 = Legate lower).",
        f"- rounds used: rounds in which, for every proxy, other processes took at most {a['max_noise']:.0f}% of "
        "the proxy's CPU during the loads (from /proc/stat); the medians use only those rounds when there "
        "are any, else all rounds. The same rounds for every row.",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round (well under two minutes)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per load run (default 10, --quick 5)")
    ap.add_argument("--only", choices=["legate", "envoy"], help="benchmark one proxy only")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the load to separate CPUs")
    ap.add_argument("--max-noise", type=float, default=10.0,
                    help="a round counts as undisturbed when other processes used at most this %% of the "
                         "proxy's CPU; medians use undisturbed rounds when there are any (default 10)")
    ap.add_argument("--h1-connections", type=int, default=50)
    ap.add_argument("--h2-connections", type=int, default=10)
    ap.add_argument("--h2-streams", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="where latest.{md,json} go")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seconds = args.seconds or (5 if args.quick else 10)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(kill_all)

    proxies = {}
    for kind in ("legate", "envoy"):
        if args.only in (None, kind):
            binary = os.environ.get(f"{kind.upper()}_BIN")
            if not binary or not os.access(binary, os.X_OK):
                sys.exit(f"{kind}: no executable binary in ${kind.upper()}_BIN ({binary!r})")
            proxies[kind] = binary

    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        proxy_cpus, load_cpus = {cpus[0]}, set(cpus[1:])
    else:
        proxy_cpus, load_cpus = None, None

    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "versions": versions(proxies), "binaries": proxies, "order": list(proxies),
           "params": {"rounds": args.rounds, "seconds": args.seconds, "max_noise": args.max_noise, "h1_connections": args.h1_connections,
                      "h2_connections": args.h2_connections, "h2_streams": args.h2_streams,
                      "proxy_cpus": ",".join(map(str, sorted(proxy_cpus))) if proxy_cpus else None,
                      "load_cpus": ",".join(map(str, sorted(load_cpus))) if load_cpus else None}}
    tmp = tempfile.mkdtemp(prefix="legate-bench-")
    raw = {"nginx-direct": [], **{k: [] for k in proxies}}
    started = time.monotonic()
    try:
        up_port = free_port()
        nginx = start_nginx(tmp, up_port, load_cpus)
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}: nginx direct", file=sys.stderr, flush=True)
            raw["nginx-direct"].append({"http1": run_wrk(up_port, args.seconds, args.h1_connections, load_cpus)})
            for kind, binary in proxies.items():  # interleaved: A, B, A, B...
                print(f"round {rnd + 1}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
                raw[kind].append(measure(kind, binary, tmp, up_port, args, proxy_cpus, load_cpus))
        stop(nginx)
    finally:
        kill_all()
        shutil.rmtree(tmp, ignore_errors=True)

    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    # A round is undisturbed when, in every proxy's load runs, other processes used at most
    # --max-noise % of the proxy's CPU (contention changes CPU per request too: cache). The medians
    # use the undisturbed rounds when there is at least one, else all rounds; the same rounds for
    # every row, so that the ratios compare runs made side by side.
    def undisturbed(i):
        return all((runs[i][proto].get("others_on_proxy_cpu_pct") or 0) <= args.max_noise
                   for kind, runs in raw.items() if kind != "nginx-direct" for proto in PROTOCOLS)
    used = [i for i in range(args.rounds) if undisturbed(i)] or list(range(args.rounds))
    doc["rounds_used"] = [i + 1 for i in used]
    summary = {}
    for kind, runs in raw.items():
        for proto in PROTOCOLS:
            rows = [r[proto] for r in runs if proto in r]
            if not rows:
                continue
            sel = [rows[i] for i in used]
            row = {k: med([r.get(k) for r in sel]) for k in rows[0] if isinstance(rows[0][k], (int, float))}
            row["errors"] = sum(r["errors"] for r in rows)  # all rounds
            row["rounds_used"], row["rounds"] = len(sel), len(rows)
            row["latency_source"] = rows[0]["latency_source"]
            summary[f"{kind}/{proto}"] = row
    doc["median"], doc["raw"] = summary, raw

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    table = render(doc)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"(took {doc['elapsed_s']} s; written to {os.path.join(args.out, 'latest.md')} and latest.json)",
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
