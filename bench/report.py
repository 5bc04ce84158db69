"""Medians, ratios, the Markdown report, the PNG charts and the README section."""
import json
import os
import re
import statistics
import sys

LABELS = {"http1": "HTTP/1.1", "http2": "HTTP/2 (h2c)", "https1": "HTTP/1.1 + TLS",
          "grpc_unary": "gRPC unary", "grpc_bidi": "gRPC bidi stream", "grpc_server": "gRPC server stream"}
PCTS = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))
NAMES = {"envoy": "Envoy", "nginx": "nginx", "legate": "Legate"}
README_BEGIN = "<!-- bench:begin (written by bench/run.py; do not edit by hand) -->"
README_END = "<!-- bench:end -->"


def med(values):
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(values) if values else None


def ratio(a, b):
    """a / b; none when either is missing or negative (a negative *added* latency is noise)."""
    return a / b if a is not None and b and a >= 0 and b > 0 else None


def fmt(v, d=1):
    return "-" if v is None else f"{v:.{d}f}"


def median_row(rows):
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    out = {k: med([r.get(k) for r in rows]) for k in sorted(keys)}
    src = [r["latency_source"] for r in rows if "latency_source" in r]
    if src:
        out["latency_source"] = src[0]
    return out


def summarize(doc, raw, memory, scenarios, max_noise):
    """Fills doc["median"], doc["rounds_used"], doc["targets"] and the raw figures."""
    rounds = len(raw["direct"])
    proxies = [k for k in raw if k != "direct"]

    # A round is undisturbed when, in every proxy's CPU loads, other processes used at most
    # max_noise % of the proxy's CPU (contention changes CPU per request too: cache). The
    # medians use the undisturbed rounds when there are any, else all rounds; the same rounds
    # for every row, so that the ratios compare runs made side by side.
    def undisturbed(i):
        return all((raw[k][i][s].get("others_on_proxy_cpu_pct") or 0) <= max_noise
                   for k in proxies for s in (*scenarios, "rate"))
    used = [i for i in range(rounds) if undisturbed(i)] or list(range(rounds))
    doc["rounds_used"] = [i + 1 for i in used]
    summary = {}
    for kind, runs in raw.items():
        for s in (*scenarios, "rate"):
            rows = [r[s] for r in runs if s in r]
            if not rows:
                continue
            row = median_row([rows[i] for i in used])
            row["errors"] = sum(r.get("errors") or 0 for r in rows)  # all rounds
            row["rounds_used"], row["rounds"] = len(used), len(rows)
            if s == "rate" and kind != "direct":
                # latency added over the direct run of the same round, then the median
                for key, _ in PCTS:
                    row[f"added_{key}"] = med([runs[i]["rate"].get(key) - raw["direct"][i]["rate"].get(key)
                                               for i in used if runs[i]["rate"].get(key) is not None
                                               and raw["direct"][i]["rate"].get(key) is not None])
            summary[f"{kind}/{s}"] = row
    for kind, rows in memory.items():
        if rows:
            summary[f"{kind}/memory"] = median_row(rows)
    doc["median"], doc["raw"], doc["memory_raw"] = summary, raw, memory
    doc["targets"] = targets(summary)


def targets(s):
    """The issue's targets, each with Legate's figure, the reference and whether it is met
    (None: no verdict, for a missing figure or a disturbed baseline)."""
    out = []

    def add(name, value, ref, unit, noisy=False):
        met = None if value is None or ref is None or noisy else value <= ref
        out.append({"target": name, "legate": value, "reference": ref, "unit": unit, "met": met})
    g = lambda k, f: (s.get(k) or {}).get(f)  # noqa: E731
    for proto in ("http1", "http2"):
        l, n, e = (g(f"{k}/{proto}", "cpu_us_per_req") for k in ("legate", "nginx", "envoy"))
        add(f"{LABELS[proto]}: CPU/request ≤ nginx's", l, n, "µs")
        add(f"{LABELS[proto]}: CPU/request ≤ 1/3 of Envoy's", l, None if e is None else e / 3, "µs")
    l, n = g("legate/rate", "added_p99_ms"), g("nginx/rate", "added_p99_ms")
    # a negative added latency means the direct baseline was disturbed: no verdict
    add("fixed rate: added p99 ≤ nginx's", l, n, "ms", noisy=(l or 0) < 0 or (n or 0) < 0)
    add("idle RSS < 15 MB", g("legate/memory", "rss_idle_mb"), 15.0, "MB")
    add("memory per idle connection < 10 KB", g("legate/memory", "kb_per_conn"), 10.0, "KB")
    return out


def header(doc):
    a, m = doc["params"], doc["machine"]
    lines = [f"# Legate vs Envoy vs nginx: {doc['date']}", ""]
    if doc.get("quick"):
        lines += ["**Quick run** (`--quick`: one round, short loads): for before/after checks on one "
                  "machine only; the numbers are noisy, do not quote them.", ""]
    lines += [
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, load average "
        f"{' '.join(m['loadavg_before'])} before, {' '.join(m.get('loadavg_after', ['?']))} after.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        f"{a['rounds']} round(s), each: the loads straight at the upstreams, then "
        + ", ".join(doc["order"]) + f" (interleaved, each freshly started), {a['seconds']} s per load; "
        "medians over the rounds.",
        "Legate and Envoy: bench/bootstrap.yaml, `--concurrency 1 -l error --disable-hot-restart`. "
        "nginx: 1 process, `proxy_pass` with upstream keep-alive (HTTP/1.1), `grpc_pass`, "
        "`listen ... http2` for h2c and `ssl http2` for TLS (bench/proxies.py)."
        + (f" CPU pinning: proxy on CPU {a['proxy_cpus']}, upstreams and load generators on CPU {a['load_cpus']}."
           if a["proxy_cpus"] else " No CPU pinning."),
        f"Loads: `wrk -t1 -c{a['h1_connections']}` (HTTP/1.1, and over TLS: https, same self-signed "
        f"ECDSA P-256 certificate for all), `h2load -t1 -c{a['h2_connections']} -m{a['h2_streams']}` "
        f"(h2c prior knowledge), `legate-load grpc` ({a['grpc_streams']} concurrent calls over "
        f"{a['grpc_connections']} connections), `legate-load rate` ({a['rate']:.0f} req/s open loop "
        f"over {a['rate_connections']} connections), `legate-load idle` ({a['idle_connections']} connections).",
        "",
    ]
    return lines


def targets_table(doc):
    judged = [t for t in doc["targets"] if t["met"] is not None]
    lines = [f"Legate meets {sum(t['met'] for t in judged)} of the {len(judged)} targets judged in this run"
             + (f" ({len(doc['targets']) - len(judged)} without a verdict: a proxy not run, or a disturbed "
                "baseline)" if len(judged) < len(doc["targets"]) else "") + ".", "",
             "| target (issue 7) | Legate | reference | met? |", "|---|---:|---:|:---:|"]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {fmt(t['legate'], 2)} {t['unit']} | "
                     f"{fmt(t['reference'], 2)} {t['unit'] if t['reference'] is not None else ''} | {met} |")
    return lines


def ratio_cells(s, a, b, keys):
    return [fmt(ratio((s.get(a) or {}).get(k), (s.get(b) or {}).get(k)), 2) for k in keys]


def throughput_table(doc, scenarios):
    s, order = doc["median"], doc["order"]
    keys = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_pct", "rss_after_mb")
    lines = ["| load | proxy | req/s | p50 ms | p99 ms | CPU µs/request | proxy CPU % | RSS after MB | errors | rounds used |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sc in scenarios:
        label = LABELS[sc]
        for kind in ("direct", *order):
            r = s.get(f"{kind}/{sc}")
            if not r:
                continue
            name = "upstream direct" if kind == "direct" else kind
            lines.append(f"| {label} | {name} | {fmt(r.get('rps'), 0)} | {fmt(r.get('p50_ms'), 3)} | "
                         f"{fmt(r.get('p99_ms'), 3)} | {fmt(r.get('cpu_us_per_req'))} | {fmt(r.get('cpu_pct'), 0)} | "
                         f"{fmt(r.get('rss_after_mb'))} | {r['errors']:.0f} | {r['rounds_used']}/{r['rounds']} |")
        for ref in ("envoy", "nginx"):
            if "legate" in order and ref in order:
                c = ratio_cells(s, f"legate/{sc}", f"{ref}/{sc}", keys)
                lines.append(f"| {label} | **Legate/{NAMES[ref]}** | {c[0]} | {c[1]} | {c[2]} | **{c[3]}** | {c[4]} | {c[5]} | | |")
    return lines


def latency_table(doc):
    s, order = doc["median"], doc["order"]
    a = doc["params"]
    lines = [f"Fixed rate {a['rate']:.0f} req/s, HTTP/1.1, open loop: latency = completion − scheduled "
             "send time (no coordinated omission). *Added* = proxy minus upstream direct, same round, "
             "then the median over the rounds. Latency suffers most from other work on the proxy's "
             "CPU: see the *others on proxy CPU* column.", "",
             "| proxy | p50 ms | p90 ms | p99 ms | p99.9 ms | added p50 | added p90 | added p99 | added p99.9 | achieved req/s | CPU µs/request | others on proxy CPU % | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("direct", *order):
        r = s.get(f"{kind}/rate")
        if not r:
            continue
        added = " | ".join(fmt(r.get(f"added_{k}"), 3) for k, _ in PCTS) if kind != "direct" else "- | - | - | -"
        lines.append(f"| {'upstream direct' if kind == 'direct' else kind} | "
                     + " | ".join(fmt(r.get(k), 3) for k, _ in PCTS)
                     + f" | {added} | {fmt(r.get('rps'), 0)} | {fmt(r.get('cpu_us_per_req'))} "
                     f"| {fmt(r.get('others_on_proxy_cpu_pct'), 0)} | {r['errors']:.0f} |")
    for ref in ("envoy", "nginx"):
        if "legate" in order and ref in order:
            c = ratio_cells(s, "legate/rate", f"{ref}/rate", [f"added_{k}" for k, _ in PCTS])
            lines.append(f"| **Legate/{NAMES[ref]}** (added) | | | | | " + " | ".join(c) + " | | | | |")
    return lines


def memory_table(doc):
    s, order = doc["median"], doc["order"]
    n = doc["params"]["idle_connections"]
    keys = ("rss_idle_mb", "rss_conns_mb", "kb_per_conn")
    lines = [f"| proxy | RSS idle MB | RSS with {n} idle keep-alive connections MB | KB per idle connection | connections opened / failed |",
             "|---|---:|---:|---:|---:|"]
    for kind in order:
        r = s.get(f"{kind}/memory")
        if r:
            lines.append(f"| {kind} | {fmt(r.get('rss_idle_mb'))} | {fmt(r.get('rss_conns_mb'))} | "
                         f"{fmt(r.get('kb_per_conn'), 2)} | {fmt(r.get('connections_opened'), 0)} / "
                         f"{fmt(r.get('connections_failed'), 0)} |")
    for ref in ("envoy", "nginx"):
        if "legate" in order and ref in order:
            c = ratio_cells(s, "legate/memory", f"{ref}/memory", keys)
            lines.append(f"| **Legate/{NAMES[ref]}** | " + " | ".join(c) + " | |")
    return lines


def noise_warning(doc):
    noisy = [v.get("others_on_proxy_cpu_pct") or 0 for k, v in doc["median"].items()
             if not k.startswith("direct/")]
    if noisy and max(noisy) > doc["params"]["max_noise"]:
        return ["", f"**Warning:** no round was undisturbed: other processes used up to {max(noisy):.0f}% "
                "of the proxy's CPU during the loads (median per row; `others_on_proxy_cpu_pct` in "
                "latest.json). These numbers are disturbed, CPU per request included (cache "
                "pollution); rerun on a quiet machine."]
    return []


NOTES = [
    "- req/s and latency: from the load generator (wrk `--latency`; h2load's per-request log; "
    "legate-load per call for gRPC unary, per echoed message for the bidi ping-pong, per message "
    "for server streaming, where req/s counts messages). These are closed-loop loads: their latency "
    "is not coordinated-omission free; the fixed-rate table is.",
    "- CPU µs/request: the proxy process's utime+stime (/proc/PID/stat, all threads) over the load, "
    "divided by the requests (messages) completed. Softirq time of loopback networking is charged "
    "to no process, for any proxy. proxy CPU %: the same over wall time (100 = one core saturated).",
    "- Memory: a freshly started process; RSS idle once the listeners accept and RSS has settled; "
    "then one request, then the idle connections (each sends one request and stays open); KB per "
    "idle connection = (RSS holding them − RSS before) / connections opened. nginx preallocates "
    "its connection slots (`worker_connections` = 12000, needed to hold them), which is in its idle RSS.",
    "- Ratio rows: Legate's median divided by Envoy's or nginx's (below 1 = Legate lower). A "
    "negative *added* latency means the direct run was disturbed more than the proxy's (noise): "
    "no ratio, and no verdict on that target.",
    "- HTTP/1.1 + TLS: keep-alive connections, so this is record encryption, not handshakes; "
    "wrk offers no ALPN, so HTTP/1.1 is negotiated by every proxy.",
    "- rounds used: rounds in which, for every proxy, other processes took at most the noise "
    "threshold of the proxy's CPU during the loads (from /proc/stat); the medians use only those "
    "rounds when there are any, else all rounds.",
]


def render(doc, scenarios):
    lines = header(doc)
    lines += ["## Targets", ""] + targets_table(doc)
    lines += ["", "## Throughput and CPU per request", ""] + throughput_table(doc, scenarios)
    lines += noise_warning(doc)
    lines += ["", "## Added latency at a fixed rate", ""] + latency_table(doc)
    lines += ["", "## Memory", ""] + memory_table(doc)
    lines += ["", "## Charts", "", "![throughput](throughput.png) ![CPU per request](cpu.png)",
              "![latency](latency.png) ![memory](memory.png)", "", "## Notes", ""] + NOTES
    return "\n".join(lines) + "\n"


def readme_section(doc, scenarios, report_path="bench/results/latest.md"):
    """The compact table copied into README.md between the markers."""
    s, m = doc["median"], doc["machine"]
    order = [k for k in ("legate", "envoy", "nginx") if k in doc["order"]]
    lines = [README_BEGIN, "",
             f"Latest `bench/run.sh` run: {doc['date']}, {m['nproc']} CPUs ({m['cpu_model']}), "
             f"load average {' '.join(m['loadavg_before'])}; {doc['params']['rounds']} round(s) of "
             f"{doc['params']['seconds']} s, medians. Full table and charts: "
             f"[`{report_path}`]({report_path}).", ""]
    if doc.get("quick"):
        lines += ["**Quick, noisy run**: not a measurement to quote.", ""]
    lines += ["| CPU µs/request | " + " | ".join(NAMES[k] for k in order) + " | Legate/Envoy | Legate/nginx |",
              "|---|" + "---:|" * (len(order) + 2)]
    for sc in scenarios:
        v = {k: (s.get(f"{k}/{sc}") or {}).get("cpu_us_per_req") for k in order}
        lines.append(f"| {LABELS[sc]} | " + " | ".join(fmt(v[k]) for k in order)
                     + f" | {fmt(ratio(v.get('legate'), v.get('envoy')), 2)} | {fmt(ratio(v.get('legate'), v.get('nginx')), 2)} |")
    rate = doc["params"]["rate"]
    for key, name in (("added_p99_ms", f"added p99 ms at {rate:.0f} req/s"),
                      ("added_p999_ms", f"added p99.9 ms at {rate:.0f} req/s")):
        v = {k: (s.get(f"{k}/rate") or {}).get(key) for k in order}
        lines.append(f"| {name} | " + " | ".join(fmt(v[k], 3) for k in order) + " | | |")
    for key, name in (("rss_idle_mb", "RSS idle MB"), ("kb_per_conn", "KB per idle connection")):
        v = {k: (s.get(f"{k}/memory") or {}).get(key) for k in order}
        lines.append(f"| {name} | " + " | ".join(fmt(v[k]) for k in order) + " | | |")
    lines += [""] + targets_table(doc) + ["", README_END]
    return "\n".join(lines)


def update_readme(path, section):
    with open(path) as f:
        text = f.read()
    pat = re.compile(re.escape(README_BEGIN.split(" (")[0]) + r".*?" + re.escape(README_END), re.S)
    if not pat.search(text):
        print(f"{path}: no '{README_BEGIN}' ... '{README_END}' section; not updated", file=sys.stderr)
        return False
    with open(path, "w") as f:
        f.write(pat.sub(lambda _m: section, text, count=1))
    return True


def write_all(doc, out, scenarios, readme=None):
    os.makedirs(out, exist_ok=True)
    doc["charts"] = charts(doc, out, scenarios)
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    text = render(doc, scenarios)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(text)
    print(text)
    rel = os.path.relpath(os.path.join(out, "latest.md"), os.path.dirname(readme)) if readme else None
    if readme and update_readme(readme, readme_section(doc, scenarios, rel)):
        print("(README.md performance section updated from this run)", file=sys.stderr)
    print(f"(took {doc['elapsed_s']} s; written to {out}/latest.md, latest.json and the charts)", file=sys.stderr)


def charts(doc, out, scenarios):
    """throughput.png, cpu.png, latency.png, memory.png (matplotlib; skipped if missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (bench/run.sh installs it into .venv)", file=sys.stderr)
        return []
    s, order = doc["median"], doc["order"]
    colors = {"direct": "#999999", "legate": "#1f77b4", "envoy": "#d62728", "nginx": "#2ca02c"}
    suffix = " (QUICK, noisy)" if doc.get("quick") else ""
    written = []

    def bars(fname, title, ylabel, groups, kinds, get, labels=LABELS):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(len(kinds), 1)
        for j, kind in enumerate(kinds):
            vals = [get(kind, g) or 0 for g in groups]
            xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, vals, width, label="upstream direct" if kind == "direct" else kind, color=colors.get(kind))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([labels.get(g, g) for g in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {doc['date']}{suffix}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)
        written.append(fname)

    bars("throughput.png", "Requests per second (one worker)", "req/s", list(scenarios), ["direct", *order],
         lambda k, g: (s.get(f"{k}/{g}") or {}).get("rps"))
    bars("cpu.png", "Proxy CPU per request (lower is better)", "µs / request", list(scenarios), order,
         lambda k, g: (s.get(f"{k}/{g}") or {}).get("cpu_us_per_req"))
    bars("latency.png", f"Latency added over direct at {doc['params']['rate']:.0f} req/s (open loop)", "ms",
         [k for k, _ in PCTS], order, lambda k, g: max((s.get(f"{k}/rate") or {}).get(f"added_{g}") or 0, 0),
         labels={k: f"{n} added" for k, n in PCTS})
    bars("memory.png", "Resident memory", "MB", ["rss_idle_mb", "rss_conns_mb"], order,
         lambda k, g: (s.get(f"{k}/memory") or {}).get(g),
         labels={"rss_idle_mb": "RSS idle (MB)",
                 "rss_conns_mb": f"RSS with {doc['params']['idle_connections']} idle connections (MB)"})
    return written
