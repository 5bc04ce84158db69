//! Counters and gauges with Envoy's stat names, rendered by the admin `/stats` endpoints.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge that can be shared with connection tasks.
#[derive(Debug, Default, Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Another handle on the same gauge.
    pub fn clone_handle(&self) -> Gauge {
        self.clone()
    }
}

/// Counts responses by class (`1xx` … `5xx`).
#[derive(Debug, Default)]
pub struct StatusClasses([Counter; 5]);

impl StatusClasses {
    pub fn record(&self, status: u16) {
        if let Some(c) = self.0.get(usize::from(status / 100).wrapping_sub(1)) {
            c.inc();
        }
    }
    fn render(&self, prefix: &str, name: &str, out: &mut Vec<(String, Stat)>) {
        for (i, c) in self.0.iter().enumerate() {
            out.push((
                format!("{prefix}{name}_{}xx", i + 1),
                Stat::Counter(c.get()),
            ));
        }
    }
}

/// Stats of one HTTP connection manager (`http.<stat_prefix>.`).
#[derive(Debug, Default)]
pub struct HttpStats {
    pub rq_total: Counter,
    pub rq_classes: StatusClasses,
    pub rq_active: Gauge,
    pub cx_total: Counter,
    pub cx_active: Gauge,
    pub rq_timeout: Counter,
    pub rq_idle_timeout: Counter,
    pub no_route: Counter,
    pub no_cluster: Counter,
}

/// Stats of one cluster (`cluster.<name>.`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub rq_total: Counter,
    pub rq_classes: StatusClasses,
    pub rq_active: Gauge,
    pub rq_timeout: Counter,
    pub cx_total: Counter,
    pub cx_active: Gauge,
    pub cx_connect_fail: Counter,
    pub cx_connect_timeout: Counter,
    pub cx_none_healthy: Counter,
}

/// A rendered stat value.
#[derive(Debug, Clone, Copy)]
pub enum Stat {
    Counter(u64),
    Gauge(i64),
}

impl HttpStats {
    pub fn render(&self, stat_prefix: &str, out: &mut Vec<(String, Stat)>) {
        let p = format!("http.{stat_prefix}.");
        out.push((
            format!("{p}downstream_rq_total"),
            Stat::Counter(self.rq_total.get()),
        ));
        self.rq_classes.render(&p, "downstream_rq", out);
        out.push((
            format!("{p}downstream_rq_active"),
            Stat::Gauge(self.rq_active.get()),
        ));
        out.push((
            format!("{p}downstream_cx_total"),
            Stat::Counter(self.cx_total.get()),
        ));
        out.push((
            format!("{p}downstream_cx_active"),
            Stat::Gauge(self.cx_active.get()),
        ));
        out.push((
            format!("{p}downstream_rq_timeout"),
            Stat::Counter(self.rq_timeout.get()),
        ));
        out.push((
            format!("{p}downstream_rq_idle_timeout"),
            Stat::Counter(self.rq_idle_timeout.get()),
        ));
        out.push((format!("{p}no_route"), Stat::Counter(self.no_route.get())));
        out.push((
            format!("{p}no_cluster"),
            Stat::Counter(self.no_cluster.get()),
        ));
    }
}

impl ClusterStats {
    pub fn render(&self, name: &str, out: &mut Vec<(String, Stat)>) {
        let p = format!("cluster.{name}.");
        out.push((
            format!("{p}upstream_rq_total"),
            Stat::Counter(self.rq_total.get()),
        ));
        self.rq_classes.render(&p, "upstream_rq", out);
        out.push((
            format!("{p}upstream_rq_active"),
            Stat::Gauge(self.rq_active.get()),
        ));
        out.push((
            format!("{p}upstream_rq_timeout"),
            Stat::Counter(self.rq_timeout.get()),
        ));
        out.push((
            format!("{p}upstream_cx_total"),
            Stat::Counter(self.cx_total.get()),
        ));
        out.push((
            format!("{p}upstream_cx_active"),
            Stat::Gauge(self.cx_active.get()),
        ));
        out.push((
            format!("{p}upstream_cx_connect_fail"),
            Stat::Counter(self.cx_connect_fail.get()),
        ));
        out.push((
            format!("{p}upstream_cx_connect_timeout"),
            Stat::Counter(self.cx_connect_timeout.get()),
        ));
        out.push((
            format!("{p}upstream_cx_none_healthy"),
            Stat::Counter(self.cx_none_healthy.get()),
        ));
    }
}

/// Envoy's `/stats` text: `name: value` per line, sorted.
pub fn render_text(stats: &[(String, Stat)]) -> String {
    let mut out = String::new();
    for (name, v) in stats {
        let _ = match v {
            Stat::Counter(c) => writeln!(out, "{name}: {c}"),
            Stat::Gauge(g) => writeln!(out, "{name}: {g}"),
        };
    }
    out
}

/// Prometheus exposition format with Envoy's `envoy_` prefix and `.`→`_` mangling.
pub fn render_prometheus(stats: &[(String, Stat)]) -> String {
    let mut out = String::new();
    for (name, v) in stats {
        let metric: String = format!("envoy_{name}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let (kind, value) = match v {
            Stat::Counter(c) => ("counter", c.to_string()),
            Stat::Gauge(g) => ("gauge", g.to_string()),
        };
        let _ = writeln!(out, "# TYPE {metric} {kind}\n{metric}{{}} {value}");
    }
    out
}
