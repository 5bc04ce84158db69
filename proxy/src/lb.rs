//! Load balancers: round robin (weighted), least request (power of two choices), random,
//! ring hash and Maglev. A balancer is built with its host set and never mutated after, except
//! for the atomic cursor of round robin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::cluster::Host;

/// `lb_policy` as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest { choice_count: u32 },
    Random,
    RingHash { min_ring: u64, max_ring: u64 },
    Maglev { table_size: u64 },
}

/// A balancer over one host set.
#[derive(Debug)]
pub struct Balancer {
    hosts: Vec<Arc<Host>>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    RoundRobin {
        order: Vec<u32>,
        cursor: AtomicUsize,
    },
    LeastRequest {
        choice_count: u32,
    },
    Random,
    /// Sorted (hash, host index).
    Ring(Vec<(u64, u32)>),
    Maglev(Vec<u32>),
}

/// 64-bit FNV-1a followed by a murmur finaliser: stable across processes and runs.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Balancer {
    /// Builds a balancer over `hosts` (all of one priority).
    pub fn new(policy: LbPolicy, hosts: Vec<Arc<Host>>) -> Self {
        let kind = match policy {
            LbPolicy::RoundRobin => {
                let g = hosts.iter().map(|h| h.weight.max(1)).fold(0, gcd).max(1);
                // Interleave by weight so that heavier hosts are spread, not clustered.
                let mut credits: Vec<i64> = vec![0; hosts.len()];
                let weights: Vec<i64> = hosts
                    .iter()
                    .map(|h| i64::from(h.weight.max(1) / g))
                    .collect();
                let total: i64 = weights.iter().sum();
                let steps = usize::try_from(total.min(65_536)).unwrap_or(1);
                let mut order = Vec::with_capacity(steps);
                for _ in 0..steps {
                    for (c, w) in credits.iter_mut().zip(&weights) {
                        *c += w;
                    }
                    let best = credits
                        .iter()
                        .enumerate()
                        .max_by_key(|(i, c)| (**c, usize::MAX - i))
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    credits[best] -= total;
                    order.push(u32::try_from(best).unwrap_or(0));
                }
                Kind::RoundRobin {
                    order,
                    cursor: AtomicUsize::new(0),
                }
            }
            LbPolicy::LeastRequest { choice_count } => Kind::LeastRequest { choice_count },
            LbPolicy::Random => Kind::Random,
            LbPolicy::RingHash { min_ring, max_ring } => {
                Kind::Ring(build_ring(&hosts, min_ring, max_ring))
            }
            LbPolicy::Maglev { table_size } => Kind::Maglev(build_maglev(&hosts, table_size)),
        };
        Self { hosts, kind }
    }

    /// The hosts this balancer picks from.
    pub fn hosts(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    /// Picks a host. `hash` is the request's hash-policy value, if it produced one.
    pub fn pick(&self, hash: Option<u64>) -> Option<&Arc<Host>> {
        if self.hosts.is_empty() {
            return None;
        }
        let n = self.hosts.len();
        let idx = match &self.kind {
            Kind::RoundRobin { order, cursor } => {
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                order.get(i % order.len().max(1)).map_or(0, |x| *x as usize)
            }
            Kind::Random => rand::rng().random_range(0..n),
            Kind::LeastRequest { choice_count } => {
                let mut rng = rand::rng();
                let mut best = rng.random_range(0..n);
                for _ in 1..*choice_count {
                    let c = rng.random_range(0..n);
                    if self.hosts[c].active_requests() < self.hosts[best].active_requests() {
                        best = c;
                    }
                }
                best
            }
            Kind::Ring(ring) => {
                let h = hash.unwrap_or_else(|| rand::rng().random());
                let pos = ring.partition_point(|(k, _)| *k < h);
                ring.get(pos)
                    .or(ring.first())
                    .map_or(0, |(_, i)| *i as usize)
            }
            Kind::Maglev(table) => {
                let h = hash.unwrap_or_else(|| rand::rng().random());
                let len = table.len().max(1) as u64;
                table.get((h % len) as usize).map_or(0, |i| *i as usize)
            }
        };
        self.hosts.get(idx)
    }
}

fn build_ring(hosts: &[Arc<Host>], min_ring: u64, max_ring: u64) -> Vec<(u64, u32)> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let total_weight: u64 = hosts.iter().map(|h| u64::from(h.weight.max(1))).sum();
    let min_w =
        hosts.iter().map(|h| h.weight.max(1)).min().unwrap_or(1) as f64 / total_weight as f64;
    let scale = ((min_ring as f64 * (min_w * hosts.len() as f64)).ceil() / min_w)
        .min(max_ring as f64)
        .max(min_ring as f64);
    let mut ring = Vec::with_capacity(scale as usize + hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let share = f64::from(h.weight.max(1)) / total_weight as f64;
        let count = (share * scale).ceil() as u64;
        let key = h.address.to_string();
        for j in 0..count {
            let hash = hash64(format!("{key}_{j}").as_bytes());
            ring.push((hash, u32::try_from(i).unwrap_or(0)));
        }
    }
    ring.sort_unstable();
    ring
}

fn build_maglev(hosts: &[Arc<Host>], table_size: u64) -> Vec<u32> {
    let m = table_size.max(1) as usize;
    if hosts.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(usize, usize)> = hosts
        .iter()
        .map(|h| {
            let key = h.address.to_string();
            let offset = (hash64(key.as_bytes()) % m as u64) as usize;
            let skip =
                (hash64(format!("{key}#skip").as_bytes()) % (m as u64 - 1).max(1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let max_w = hosts.iter().map(|h| h.weight.max(1)).max().unwrap_or(1);
    let mut next = vec![0usize; hosts.len()];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    let mut iteration: u64 = 0;
    while filled < m {
        iteration += 1;
        for (i, h) in hosts.iter().enumerate() {
            // Weighted Maglev: a host takes a turn in proportion to its weight.
            let w = u64::from(h.weight.max(1));
            let max = u64::from(max_w);
            if (iteration * w) / max == ((iteration - 1) * w) / max {
                continue;
            }
            let (offset, skip) = perms[i];
            loop {
                let c = (offset + next[i] * skip) % m;
                next[i] += 1;
                if table[c] == u32::MAX {
                    table[c] = u32::try_from(i).unwrap_or(0);
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}
