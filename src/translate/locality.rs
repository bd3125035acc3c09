//! Locality-aware load balancing, as Istio programs it. Endpoints are
//! grouped by locality (`REGION/ZONE/SUBZONE`). A DestinationRule's
//! `localityLbSetting.distribute` gives the proxy's locality shares of
//! traffic per destination locality (Envoy's locality weights); otherwise,
//! where outlier detection can tell an endpoint is failing, endpoints are
//! ranked into priorities by how close they are to the proxy (same zone and
//! subzone, same zone, same region, the region `failover` names, the rest),
//! or by how many `failoverPriority` labels they share with it, so that
//! Envoy spills to the next priority only when the nearer ones fail.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::config::istio::LocalityLbSetting;
use crate::model::Endpoint;

/// What decides how one cluster's endpoints are grouped and ranked.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalityPolicy<'a> {
    /// The proxy's locality; empty when unknown.
    pub proxy: &'a str,
    /// The proxy's labels, for `failoverPriority`.
    pub proxy_labels: Option<&'a BTreeMap<String, String>>,
    pub setting: Option<&'a LocalityLbSetting>,
    /// Whether the cluster has outlier detection (failover needs it).
    pub outlier_detection: bool,
}

/// Whether `locality` falls under `pattern` (`us-west`, `us-west/zone1/*`).
pub fn matches(pattern: &str, locality: &str) -> bool {
    let mut have = locality.split('/');
    for part in pattern.split('/') {
        if part == "*" {
            return true;
        }
        if have.next() != Some(part) {
            return false;
        }
    }
    true
}

fn part(locality: &str, i: usize) -> &str {
    locality.split('/').nth(i).unwrap_or_default()
}

fn envoy_locality(l: &str) -> Option<Locality> {
    (!l.is_empty()).then(|| Locality {
        region: part(l, 0).to_string(),
        zone: part(l, 1).to_string(),
        sub_zone: part(l, 2).to_string(),
    })
}

/// How far `endpoint` is from `proxy`: 0 same subzone, 1 same zone, 2 same
/// region, 3 the region the proxy's region fails over to, 4 elsewhere.
fn distance(proxy: &str, endpoint: &str, setting: Option<&LocalityLbSetting>) -> u32 {
    let same = |n: usize| (0..n).all(|i| part(proxy, i) == part(endpoint, i));
    if same(3) {
        0
    } else if same(2) {
        1
    } else if same(1) {
        2
    } else if setting
        .into_iter()
        .flat_map(|s| &s.failover)
        .any(|f| matches(&f.from, proxy) && matches(&f.to, endpoint))
    {
        3
    } else {
        4
    }
}

/// The value of a `failoverPriority` label for a workload: the locality
/// labels read its locality, others its labels.
fn label_value<'a>(key: &str, locality: &'a str, labels: Option<&'a BTreeMap<String, String>>) -> &'a str {
    match key {
        "topology.kubernetes.io/region" => part(locality, 0),
        "topology.kubernetes.io/zone" => part(locality, 1),
        "topology.istio.io/subzone" => part(locality, 2),
        _ => labels.and_then(|l| l.get(key)).map_or("", String::as_str),
    }
}

/// The endpoints of one cluster as Envoy's locality groups; `true` when
/// they carry locality weights (the cluster must then turn them on).
pub fn groups(
    endpoints: &[&Endpoint],
    p: &LocalityPolicy<'_>,
    lb: impl Fn(&Endpoint) -> LbEndpoint,
) -> (Vec<LocalityLbEndpoints>, bool) {
    let setting = p.setting.filter(|s| s.enabled != Some(false));
    let known = !p.proxy.is_empty();
    // Shares by locality, for the first `distribute` entry the proxy is in.
    if let Some(rule) = setting
        .filter(|_| known)
        .and_then(|s| s.distribute.iter().find(|d| matches(&d.from, p.proxy)))
    {
        let mut by_locality: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
        for e in endpoints {
            by_locality.entry(e.locality.as_str()).or_default().push(e);
        }
        // Each `to` weight is split among the localities it covers; the
        // localities it names none of get nothing.
        let target = |l: &str| rule.to.keys().find(|k| matches(k, l));
        let mut sharing: BTreeMap<&String, u32> = BTreeMap::new();
        for l in by_locality.keys() {
            if let Some(k) = target(l) {
                *sharing.entry(k).or_default() += 1;
            }
        }
        let out = by_locality
            .into_iter()
            .filter_map(|(l, eps)| {
                let k = target(l)?;
                let weight = (rule.to[k] / sharing[k]).max(1);
                Some(LocalityLbEndpoints {
                    locality: envoy_locality(l),
                    lb_endpoints: eps.into_iter().map(&lb).collect(),
                    load_balancing_weight: Some(UInt32Value { value: weight }),
                    ..Default::default()
                })
            })
            .collect();
        return (out, true);
    }
    // Priorities, where outlier detection lets Envoy see endpoints fail.
    let rank = |e: &Endpoint| -> (u32, u32) {
        let Some(s) = setting.filter(|_| p.outlier_detection) else {
            return (0, 0);
        };
        let by_labels = if s.failover_priority.is_empty() {
            0
        } else {
            let shared = s
                .failover_priority
                .iter()
                .take_while(|k| {
                    let mine = label_value(k, p.proxy, p.proxy_labels);
                    !mine.is_empty() && mine == label_value(k, &e.locality, Some(&e.labels))
                })
                .count();
            (s.failover_priority.len() - shared) as u32
        };
        let by_distance = if known && (s.failover_priority.is_empty() || !s.failover.is_empty()) {
            distance(p.proxy, &e.locality, Some(s))
        } else {
            0
        };
        (by_labels, by_distance)
    };
    let mut by_group: BTreeMap<((u32, u32), &str), Vec<&Endpoint>> = BTreeMap::new();
    for e in endpoints {
        by_group
            .entry((rank(e), e.locality.as_str()))
            .or_default()
            .push(e);
    }
    // Envoy wants priorities without gaps.
    let ranks: BTreeSet<(u32, u32)> = by_group.keys().map(|(r, _)| *r).collect();
    let dense: BTreeMap<(u32, u32), u32> = ranks.into_iter().zip(0..).collect();
    let out = by_group
        .into_iter()
        .map(|((r, l), eps)| LocalityLbEndpoints {
            locality: envoy_locality(l),
            lb_endpoints: eps.into_iter().map(&lb).collect(),
            priority: dense[&r],
            ..Default::default()
        })
        .collect();
    (out, false)
}

/// The default policy with no DestinationRule setting: Istio enables
/// locality failover mesh-wide, so proximity ranks endpoints whenever
/// outlier detection is on.
pub fn mesh_default() -> LocalityLbSetting {
    LocalityLbSetting {
        enabled: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, locality: &str) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            port: 80,
            mesh: None,
            pod: None,
            labels: BTreeMap::new(),
            locality: locality.into(),
        }
    }

    fn summary(groups: &[LocalityLbEndpoints]) -> Vec<(String, u32, u32)> {
        groups
            .iter()
            .map(|g| {
                let l = g.locality.clone().unwrap_or_default();
                (
                    format!("{}/{}", l.region, l.zone),
                    g.priority,
                    g.load_balancing_weight.as_ref().map_or(0, |w| w.value),
                )
            })
            .collect()
    }

    #[test]
    fn patterns_match_by_leading_parts() {
        assert!(matches("us-west", "us-west/zone1/a"));
        assert!(matches("us-west/zone1/*", "us-west/zone1/a"));
        assert!(matches("*", "eu/1"));
        assert!(!matches("us-west/zone2", "us-west/zone1"));
        assert!(!matches("us-west/zone1", "us-west"));
    }

    #[test]
    fn failover_ranks_by_proximity_then_the_named_region() {
        let eps = [
            ep("1", "us-east/z1"),
            ep("2", "us-east/z2"),
            ep("3", "eu-west/z1"),
            ep("4", "ap-south/z1"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let setting: LocalityLbSetting =
            serde_norway::from_str("failover: [{from: us-east, to: eu-west}]").expect("yaml");
        let policy = LocalityPolicy {
            proxy: "us-east/z1",
            proxy_labels: None,
            setting: Some(&setting),
            outlier_detection: true,
        };
        let (g, weighted) = groups(&refs, &policy, |_| LbEndpoint::default());
        assert!(!weighted);
        let mut s = summary(&g);
        s.sort_by_key(|x| x.1);
        assert_eq!(
            s,
            vec![
                ("us-east/z1".into(), 0, 0),
                ("us-east/z2".into(), 1, 0),
                ("eu-west/z1".into(), 2, 0),
                ("ap-south/z1".into(), 3, 0)
            ]
        );
        // Without outlier detection nothing can be seen failing: one priority.
        let (g, _) = groups(
            &refs,
            &LocalityPolicy {
                outlier_detection: false,
                ..policy
            },
            |_| LbEndpoint::default(),
        );
        assert!(g.iter().all(|g| g.priority == 0));
    }

    #[test]
    fn distribute_splits_weights_and_drops_unnamed_localities() {
        let eps = [
            ep("1", "us-west/z1"),
            ep("2", "us-west/z2"),
            ep("3", "us-west/z3"),
            ep("4", "eu/z1"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let setting: LocalityLbSetting = serde_norway::from_str(
            "distribute: [{from: 'us-west/z1/*', to: {'us-west/z1/*': 80, 'us-west/z2/*': 10, 'us-west/z3/*': 10}}]",
        )
        .expect("yaml");
        let policy = LocalityPolicy {
            proxy: "us-west/z1/a",
            proxy_labels: None,
            setting: Some(&setting),
            outlier_detection: false,
        };
        let (g, weighted) = groups(&refs, &policy, |_| LbEndpoint::default());
        assert!(weighted);
        assert_eq!(
            summary(&g),
            vec![
                ("us-west/z1".into(), 0, 80),
                ("us-west/z2".into(), 0, 10),
                ("us-west/z3".into(), 0, 10)
            ]
        );
    }
}
