//! Latency samples and their summary (nearest-rank percentiles, in milliseconds).

use std::time::Duration;

/// Latencies of completed operations, in microseconds, plus the error count.
#[derive(Default)]
pub struct Samples {
    pub micros: Vec<u64>,
    pub errors: u64,
}

impl Samples {
    pub fn record(&mut self, d: Duration) {
        self.micros
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
        self.errors += other.errors;
    }

    /// The JSON summary printed on stdout: counts, rate over `elapsed`, percentiles in ms.
    pub fn summary(mut self, elapsed: Duration) -> serde_json::Value {
        self.micros.sort_unstable();
        let n = self.micros.len();
        let pct = |q: f64| -> Option<f64> {
            if n == 0 {
                return None;
            }
            // nearest rank: the smallest value with at least q% of the samples at or below it
            let rank = ((q / 100.0) * n as f64).ceil() as usize;
            Some(self.micros[rank.clamp(1, n) - 1] as f64 / 1000.0)
        };
        let mean = if n == 0 {
            None
        } else {
            Some(self.micros.iter().sum::<u64>() as f64 / n as f64 / 1000.0)
        };
        let secs = elapsed.as_secs_f64().max(1e-9);
        serde_json::json!({
            "requests": n,
            "errors": self.errors,
            "seconds": secs,
            "rps": n as f64 / secs,
            "mean_ms": mean,
            "p50_ms": pct(50.0),
            "p90_ms": pct(90.0),
            "p99_ms": pct(99.0),
            "p999_ms": pct(99.9),
            "max_ms": self.micros.last().map(|v| *v as f64 / 1000.0),
        })
    }
}
