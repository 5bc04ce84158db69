#!/usr/bin/env python3
"""Regenerates docs/configuration.md from Legate's field tables.

The proxy's tables live in proxy/src/config/check.rs; each HTTP filter's table lives with the
filter (its factory's `fields()`, in filters/src/). The script asks the code for all of them
(an ignored unit test prints them as JSON), so there is one list per filter and this page
follows it. A unit test (`config::check::tests::docs_list_every_table_entry`) fails when the
page and the tables drift: run this after changing a table: python3 scripts/gen-config-docs.py
"""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INTRO = """# Configuration reference

Legate reads Envoy's v3 `Bootstrap` (YAML or JSON, the proto3 JSON mapping). Every field that
is set is checked against the tables below (the proxy's in `proxy/src/config/check.rs`, each
HTTP filter's in its factory, `FilterFactory::fields`; this page is generated from them by
`scripts/gen-config-docs.py`):

- a field in **Implemented** is honoured as Envoy documents it;
- a field in **Accepted with a warning** tunes or observes without changing traffic; Legate logs
  a warning naming it and carries on;
- any other field is an error naming its path, e.g.
  `static_resources.clusters[0].health_checks: field not supported by Legate`;
- a field that is not in Envoy's API at all is an error too
  (`static_resources.clusters[0]: unrecognized field name 'bogus'`);
- an extension (`typed_config`) whose `@type` is not listed is rejected with its type URL.

An HTTP filter's `typed_config` may also be an `xds.type.v3.TypedStruct` (or
`udpa.type.v1.TypedStruct`) whose `type_url` names a registered filter and whose `value` holds
its configuration in proto3 JSON, as Envoy accepts it. That is how a filter built into a custom
`legate` with its own configuration message is configured (see `docs/filters.md`).

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


def tables():
    out = subprocess.run(
        ["cargo", "test", "-q", "-p", "legate-proxy", "--lib", "--",
         "--ignored", "--exact", "config::check::tests::print_field_tables", "--nocapture"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    start = out.index("FIELD-TABLES-BEGIN") + len("FIELD-TABLES-BEGIN")
    return json.loads(out[start:out.index("FIELD-TABLES-END")])


def rows(table):
    return [f"- `{ty}`: " + (", ".join(f"`{f}`" for f in fields) if fields else "(no fields)")
            for ty, fields in table]


t = tables()
lines = [INTRO.rstrip(), ""]
lines += ["## Accepted with a warning", ""] + rows(t["ignored"]) + [""]
lines += ["## Implemented", ""] + rows(t["supported"]) + [""]
lines += ["### HTTP filters", "",
          "Each filter's configuration (and its per-route configuration) is checked against its",
          "own table; the filter's factory decodes with the same table.", ""]
for f in t["filters"]:
    lines += [f"#### `{f['type']}`", ""]
    if f["per_route"]:
        lines += [f"Per-route configuration: `{f['per_route']}`.", ""]
    lines += rows(f["fields"]) + [""]
lines += ["Well-known `google.protobuf.*` types (durations, wrappers, `Struct`) are accepted wherever the",
          "field that holds them is implemented."]
with open(os.path.join(ROOT, "docs/configuration.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
