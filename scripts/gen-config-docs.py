#!/usr/bin/env python3
"""Regenerates docs/configuration.md from the field tables in proxy/src/config/check.rs.

A unit test (`config::check::tests::docs_list_every_table_entry`) fails when the two drift, so
run this after changing the tables: python3 scripts/gen-config-docs.py
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = open(os.path.join(ROOT, "proxy/src/config/check.rs")).read()

INTRO = """# Configuration reference

Legate reads Envoy's v3 `Bootstrap` (YAML or JSON, the proto3 JSON mapping). Every field that
is set is checked against the tables below (`proxy/src/config/check.rs`; this page is generated
from them by `scripts/gen-config-docs.py`):

- a field in **Implemented** is honoured as Envoy documents it;
- a field in **Accepted with a warning** tunes or observes without changing traffic; Legate logs
  a warning naming it and carries on;
- any other field is an error naming its path, e.g.
  `static_resources.clusters[0].health_checks: field not supported by Legate`;
- a field that is not in Envoy's API at all is an error too
  (`static_resources.clusters[0]: unrecognized field name 'bogus'`);
- an extension (`typed_config`) whose `@type` is not listed is rejected with its type URL.

Defaults follow Envoy's (route timeout 15 s, `stream_idle_timeout` 5 min, connection
`idle_timeout` 1 h, `max_request_headers_kb` 60, `generate_request_id` true,
`validate_clusters` true for inline route configurations, `connect_timeout` 5 s,
`dns_refresh_rate` 5 s, `per_connection_buffer_limit_bytes` 1 MiB for the HTTP/1.1 read
buffer).

## Deliberate differences from Envoy

- The default `server` header is `legate` (Envoy: `envoy`); set `server_name` to choose.
- With `use_remote_address: true` and a loopback peer, Envoy appends the host's own
  non-loopback address to `x-forwarded-for`; Legate appends the real peer address (`127.0.0.1`).
- Priorities: without health checking every host is healthy, so the lowest priority with
  endpoints takes all traffic (what Envoy computes too); locality weights are not used.
- `typed_per_filter_config` for a filter the connection manager does not run is kept unused
  (as Envoy does) only when its type is one Legate knows; otherwise it is an error.
"""


def table(name):
    start = SRC.index(f"const {name}")
    body = SRC[start:SRC.index("];\n", start)]
    out = []
    for m in re.finditer(r'\(\s*"([^"]+)",\s*&\[(.*?)\],?\s*\)', body, re.S):
        out.append((m.group(1), re.findall(r'"([^"]+)"', m.group(2))))
    return out


def section(title, rows):
    lines = [f"## {title}", ""]
    for ty, fields in rows:
        lines.append(f"- `{ty}`: " + (", ".join(f"`{f}`" for f in fields) if fields else "(no fields)"))
    return lines


lines = [INTRO.rstrip(), ""]
lines += section("Accepted with a warning", table("IGNORED")) + [""]
lines += section("Implemented", table("SUPPORTED")) + [""]
lines += ["Well-known `google.protobuf.*` types (durations, wrappers, `Struct`) are accepted wherever the",
          "field that holds them is implemented."]
with open(os.path.join(ROOT, "docs/configuration.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
