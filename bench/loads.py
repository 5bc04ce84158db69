"""The load generators: wrk (HTTP/1.1, plain and TLS), h2load (HTTP/2 cleartext) and
legate-load (gRPC, open-loop fixed rate, idle connections). Each returns a dict of numbers."""
import json
import math
import os
import re
import subprocess
import time

from procs import CHILDREN, preexec, run_bounded


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))  # nearest-rank
    return sorted_values[min(len(sorted_values), max(rank, 1)) - 1]


def run_wrk(port, seconds, conns, cpus, tls=False):
    scheme = "https" if tls else "http"
    out = run_bounded(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
                       f"{scheme}://127.0.0.1:{port}/"], cpus, seconds)
    try:
        res = {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
               "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
        for pct in ("50", "90", "99"):
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
        for q in (50, 90, 99):
            res[f"p{q}_ms"] = percentile(durations, q) / 1000
        res["latency_source"] = "h2load --log-file per-request times"
    else:  # no per-request log: fall back to h2load's summary
        res["p50_ms"], res["p99_ms"] = res["mean_ms"], res["max_ms"]
        res["latency_source"] = "h2load summary: mean and max (no percentiles)"
    return res


def run_load_json(load_bin, args, cpus, seconds):
    out = run_bounded([load_bin, *map(str, args)], cpus, seconds)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise RuntimeError(f"cannot parse legate-load output: {out[-500:]!r}") from e


def run_grpc(load_bin, port, mode, seconds, conns, streams, cpus):
    r = run_load_json(load_bin, ["grpc", "--port", port, "--mode", mode, "--seconds", seconds,
                                 "--connections", conns, "--streams", streams], cpus, seconds)
    r["latency_source"] = "legate-load: per call (unary) or per echoed message (bidi), closed loop"
    return r


def run_rate(load_bin, port, rate, seconds, conns, cpus):
    r = run_load_json(load_bin, ["rate", "--port", port, "--rate", rate, "--seconds", seconds,
                                 "--connections", conns], cpus, seconds)
    r["latency_source"] = "legate-load rate: open loop, completion minus scheduled send time"
    return r


class IdleConnections:
    """`legate-load idle`: N keep-alive connections, one request each, held until close()."""

    def __init__(self, load_bin, port, n, cpus):
        self.p = subprocess.Popen([load_bin, "idle", "--port", str(port), "--connections", str(n),
                                   "--hold-seconds", "120"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, preexec_fn=preexec(cpus), start_new_session=True)
        CHILDREN.append(self.p)
        start = time.monotonic()
        line = self.p.stdout.readline()  # bounded: the tool stops opening connections after 60 s
        if not line:
            err = self.p.stderr.read()[-500:] if self.p.poll() is not None else ""
            raise RuntimeError(f"legate-load idle printed nothing: {err}")
        self.result = json.loads(line)
        self.result["open_s"] = time.monotonic() - start

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait(timeout=10)
        if self.p in CHILDREN:
            CHILDREN.remove(self.p)
