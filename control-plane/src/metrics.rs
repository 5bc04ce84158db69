//! Counters the admin endpoint renders in Prometheus' text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::snapshot::ResourceType;

/// A Prometheus histogram of durations with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds; the last bucket (`+Inf`) is implicit.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), `bounds.len() + 1` of them.
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

/// Convergence takes from milliseconds to, under load, seconds.
const CONVERGENCE_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The buckets of convergence times, the one histogram so far.
impl Default for Histogram {
    fn default() -> Self {
        Self::new(CONVERGENCE_BOUNDS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum:.6}\n{name}_count {cumulative}");
    }
}

/// The control plane's counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses sent, per resource type (indexed by [`ResourceType::index`]).
    pub pushes: [AtomicU64; ResourceType::COUNT],
    pub acks: [AtomicU64; ResourceType::COUNT],
    pub nacks: [AtomicU64; ResourceType::COUNT],
    /// Sum (in microseconds) and count of push → ACK/NACK round trips.
    pub push_ack_micros: AtomicU64,
    pub push_ack_count: AtomicU64,
    /// ADS streams opened since start.
    pub streams_total: AtomicU64,
    /// Models handed to translation (after debounce).
    pub model_updates: AtomicU64,
    /// Manifests rejected by the file source, and Ingress TLS entries left out (their
    /// Secret missing or invalid).
    pub config_errors: AtomicU64,
    /// Snapshots published to a proxy group.
    pub snapshots_published: AtomicU64,
    /// Snapshots withheld because they were not consistent.
    pub snapshots_inconsistent: AtomicU64,
    /// From a change of the model being seen to a proxy it concerns being in sync with it.
    pub convergence: Histogram,
}

impl Metrics {
    pub fn inc(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn inc_type(&self, counters: &[AtomicU64; ResourceType::COUNT], t: ResourceType) {
        counters[t.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_push_ack(&self, elapsed: std::time::Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.push_ack_micros.fetch_add(micros, Ordering::Relaxed);
        self.push_ack_count.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self, connected: usize) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP pilot_xds_connected_proxies ADS streams currently open.\n\
             # TYPE pilot_xds_connected_proxies gauge\npilot_xds_connected_proxies {connected}"
        );
        for (name, help, counters) in [
            ("pilot_xds_pushes_total", "Responses sent.", &self.pushes),
            ("pilot_xds_acks_total", "Responses ACKed.", &self.acks),
            (
                "pilot_xds_nacks_total",
                "Responses NACKed (error_detail set).",
                &self.nacks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for t in ResourceType::ORDER {
                let _ = writeln!(
                    out,
                    "{name}{{type=\"{}\"}} {}",
                    t.short_name(),
                    get(&counters[t.index()])
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP pilot_xds_push_ack_seconds Time from a push to the proxy's ACK or NACK.\n\
             # TYPE pilot_xds_push_ack_seconds summary\n\
             pilot_xds_push_ack_seconds_sum {:.6}\npilot_xds_push_ack_seconds_count {}",
            get(&self.push_ack_micros) as f64 / 1e6,
            get(&self.push_ack_count)
        );
        self.convergence.render(
            &mut out,
            "pilot_proxy_convergence_seconds",
            "From a model change being seen (before debounce) to a proxy it concerns being in sync with every type it changed.",
        );
        for (name, help, counter) in [
            (
                "pilot_xds_streams_total",
                "ADS streams opened.",
                &self.streams_total,
            ),
            (
                "pilot_model_updates_total",
                "Debounced model changes translated.",
                &self.model_updates,
            ),
            (
                "pilot_config_errors_total",
                "Manifests rejected and Ingress TLS entries left out.",
                &self.config_errors,
            ),
            (
                "pilot_snapshots_published_total",
                "Snapshots published to proxy groups.",
                &self.snapshots_published,
            ),
            (
                "pilot_snapshots_inconsistent_total",
                "Snapshots withheld as inconsistent.",
                &self.snapshots_inconsistent,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                get(counter)
            );
        }
        out
    }
}
