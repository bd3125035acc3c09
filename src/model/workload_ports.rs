//! The ports each workload IP serves as some service's endpoint, and
//! whether each speaks HTTP: what a sidecar's inbound listeners are built
//! from. Kept as counts, so one service's endpoints are taken out and put
//! in again without looking at any other service, and spread over buckets
//! by IP, so the next generation copies only the buckets a change touches.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::MeshService;

const BUCKETS: usize = 256;

/// How many service ports name a workload port, as HTTP and as anything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Uses {
    http: u32,
    other: u32,
}

/// By IP, its ports (sorted, without duplicates) and their uses: most
/// workloads serve one or two ports, so a short list rather than a map.
type Bucket = BTreeMap<String, Vec<(u16, Uses)>>;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadPorts {
    buckets: Vec<Arc<Bucket>>,
}

impl Default for WorkloadPorts {
    fn default() -> WorkloadPorts {
        WorkloadPorts {
            buckets: vec![Arc::default(); BUCKETS],
        }
    }
}

/// FNV-1a: a stable spread of IPs over the buckets.
fn bucket_of(ip: &str) -> usize {
    let hash = ip.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash % BUCKETS as u64) as usize
}

impl WorkloadPorts {
    /// The ports the endpoints of `services` name.
    pub fn of<'a>(services: impl IntoIterator<Item = &'a Arc<MeshService>>) -> WorkloadPorts {
        let mut out = WorkloadPorts::default();
        for svc in services {
            out.add(svc);
        }
        out
    }

    /// The ports workload `ip` serves, and whether each speaks HTTP (for
    /// any service that names it).
    pub fn get(&self, ip: &str) -> impl Iterator<Item = (u16, bool)> + '_ {
        self.buckets[bucket_of(ip)]
            .get(ip)
            .into_iter()
            .flatten()
            .map(|(port, uses)| (*port, uses.http > 0))
    }

    /// Counts the ports `svc`'s endpoints name.
    pub fn add(&mut self, svc: &MeshService) {
        self.count(svc, true);
    }

    /// Takes back what `add(svc)` counted.
    pub fn remove(&mut self, svc: &MeshService) {
        self.count(svc, false);
    }

    fn count(&mut self, svc: &MeshService, add: bool) {
        for sp in &svc.ports {
            let http = sp.is_http();
            for e in &sp.endpoints {
                let bucket = Arc::make_mut(&mut self.buckets[bucket_of(&e.ip)]);
                if add {
                    let ports = bucket.entry(e.ip.clone()).or_default();
                    let i = match ports.binary_search_by_key(&e.port, |(port, _)| *port) {
                        Ok(i) => i,
                        Err(i) => {
                            ports.insert(i, (e.port, Uses::default()));
                            i
                        }
                    };
                    let uses = &mut ports[i].1;
                    *(if http { &mut uses.http } else { &mut uses.other }) += 1;
                    continue;
                }
                let Some(ports) = bucket.get_mut(&e.ip) else {
                    continue;
                };
                if let Ok(i) = ports.binary_search_by_key(&e.port, |(port, _)| *port) {
                    let uses = &mut ports[i].1;
                    let n = if http { &mut uses.http } else { &mut uses.other };
                    *n = n.saturating_sub(1);
                    if *uses == Uses::default() {
                        ports.remove(i);
                    }
                }
                if ports.is_empty() {
                    bucket.remove(&e.ip);
                }
            }
        }
    }
}
