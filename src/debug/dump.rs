//! What `meshd dump` prints: the proxies as a table (like `istioctl
//! proxy-status`), and the difference between what meshd sent a proxy and
//! what that proxy's own admin `/config_dump` holds.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use super::render;

/// The sync state of one type, as `istioctl proxy-status` words it.
fn type_state(t: &Value) -> &'static str {
    let sent = t["sent_version"].as_str();
    let nacked = t["nack"]["version"].as_str();
    match sent {
        None => "NOT SENT",
        Some(v) if nacked == Some(v) => "NACK",
        Some(v) if t["acked_version"].as_str() == Some(v) => "SYNCED",
        Some(_) => "STALE",
    }
}

/// `/debug/syncz` as a table: one row per proxy, the state of each type.
pub fn proxies_table(syncz: &Value) -> String {
    let types = ["cds", "eds", "lds", "rds", "sds"];
    let mut rows = vec![[
        "NAME",
        "ROLE",
        "MODE",
        "CDS",
        "EDS",
        "LDS",
        "RDS",
        "SDS",
        "GENERATION",
    ]
    .map(String::from)
    .to_vec()];
    for p in syncz["proxies"].as_array().into_iter().flatten() {
        let mut row = vec![
            p["proxy"].as_str().unwrap_or_default().to_string(),
            p["role"].as_str().unwrap_or_default().to_lowercase(),
            p["mode"].as_str().unwrap_or_default().to_string(),
        ];
        for t in types {
            let state = match p["types"].get(t) {
                Some(s) => type_state(s),
                None => "-",
            };
            row.push(state.to_string());
        }
        row.push(p["generation"].to_string());
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// A config dump as a table: one row per resource, its type, name and
/// version.
pub fn config_table(dump: &Value) -> String {
    // (section, resource field, name field, short type)
    const SECTIONS: [(&str, &str, &str, &str); 5] = [
        ("dynamic_active_clusters", "cluster", "name", "cluster"),
        (
            "dynamic_endpoint_configs",
            "endpoint_config",
            "cluster_name",
            "endpoints",
        ),
        ("dynamic_listeners", "listener", "name", "listener"),
        ("dynamic_route_configs", "route_config", "name", "route"),
        ("dynamic_active_secrets", "secret", "name", "secret"),
    ];
    let mut rows = vec![["TYPE".to_string(), "NAME".to_string(), "VERSION".to_string()]];
    for config in dump["configs"].as_array().into_iter().flatten() {
        for (section, field, name_field, kind) in SECTIONS {
            for item in config[section].as_array().into_iter().flatten() {
                let resource = [&item[field], &item["active_state"][field]]
                    .into_iter()
                    .find(|v| v.is_object());
                let name = item["name"]
                    .as_str()
                    .or_else(|| resource.and_then(|r| r[name_field].as_str()))
                    .unwrap_or_default();
                let version = item["version_info"]
                    .as_str()
                    .or_else(|| item["active_state"]["version_info"].as_str())
                    .unwrap_or_default();
                rows.push([kind.to_string(), name.to_string(), version.to_string()]);
            }
        }
    }
    let widths: Vec<usize> = (0..3)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            format!("{}\n", cells.join("   ").trim_end())
        })
        .collect()
}

/// The types `diff` compares, as `istioctl proxy-status PROXY` does:
/// (name in the dump, where the resources are, the resource's field, its
/// name field).
const COMPARED: [(&str, &str, &str, &str); 3] = [
    ("clusters", "dynamic_active_clusters", "cluster", "name"),
    ("listeners", "dynamic_listeners", "listener", "name"),
    ("routes", "dynamic_route_configs", "route_config", "name"),
];

/// How what meshd sent and what the proxy holds differ.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    /// Resources equal on both sides, per type.
    pub same: BTreeMap<&'static str, usize>,
    /// (type, name) sent by meshd, not held by the proxy.
    pub only_sent: Vec<(&'static str, String)>,
    /// (type, name) held by the proxy, not in what meshd sent.
    pub only_held: Vec<(&'static str, String)>,
    /// (type, name) on both sides, with different contents.
    pub differ: Vec<(&'static str, String)>,
}

impl Diff {
    pub fn in_sync(&self) -> bool {
        self.only_sent.is_empty() && self.only_held.is_empty() && self.differ.is_empty()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (t, n) in self.same.iter() {
            writeln!(f, "{t}: {n} in sync")?;
        }
        for (t, name) in &self.differ {
            writeln!(
                f,
                "{t} {name}: differs (the proxy holds another version than meshd sent; a NACK?)"
            )?;
        }
        for (t, name) in &self.only_sent {
            writeln!(f, "{t} {name}: sent by meshd, not held by the proxy")?;
        }
        for (t, name) in &self.only_held {
            writeln!(f, "{t} {name}: held by the proxy, not sent by meshd")?;
        }
        if self.in_sync() {
            writeln!(f, "in sync")?;
        }
        Ok(())
    }
}

/// The resources of one type in a ConfigDump (meshd's or Envoy's), by
/// name, in a canonical JSON form (so that the two renderings compare).
fn resources(
    dump: &Value,
    section: &str,
    field: &str,
    name_field: &str,
) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    for config in dump["configs"].as_array().into_iter().flatten() {
        for item in config[section].as_array().into_iter().flatten() {
            // A listener sits in its active (or warming) state.
            let resource = [
                &item[field],
                &item["active_state"][field],
                &item["warming_state"][field],
            ]
            .into_iter()
            .find(|v| v.is_object());
            let Some(resource) = resource else { continue };
            let name = resource[name_field].as_str().unwrap_or_default().to_string();
            out.insert(name, render::canonical(resource)?);
        }
    }
    Ok(out)
}

/// Compares meshd's `/debug/config_dump?proxy=ID` with the proxy's own
/// admin `/config_dump`: clusters, listeners and routes.
pub fn diff(sent: &Value, held: &Value) -> Result<Diff, String> {
    let mut d = Diff::default();
    for (t, section, field, name_field) in COMPARED {
        let ours = resources(sent, section, field, name_field)?;
        let theirs = resources(held, section, field, name_field)?;
        let mut same = 0;
        for (name, value) in &ours {
            match theirs.get(name) {
                Some(v) if v == value => same += 1,
                Some(_) => d.differ.push((t, name.clone())),
                None => d.only_sent.push((t, name.clone())),
            }
        }
        d.only_held.extend(
            theirs
                .keys()
                .filter(|n| !ours.contains_key(*n))
                .map(|n| (t, n.clone())),
        );
        d.same.insert(t, same);
    }
    Ok(d)
}

/// Where a request to `req` would go through each route configuration
/// meshd sent (its `/debug/config_dump?proxy=ID`), one line each: the
/// virtual host it picks and the route's outcome, or why Envoy would
/// answer 404.
pub fn explain_routes(sent: &Value, req: &crate::translate::simulate::Request) -> Result<String, String> {
    use crate::translate::simulate::{route, Outcome};
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    let mut out = String::new();
    for config in sent["configs"].as_array().into_iter().flatten() {
        for item in config["dynamic_route_configs"].as_array().into_iter().flatten() {
            let rc: RouteConfiguration = render::message_from_json(&item["route_config"])?;
            let line = match route(&rc, req) {
                Outcome::Cluster {
                    virtual_host,
                    cluster,
                } => {
                    format!("virtual host {virtual_host} → cluster {cluster}")
                }
                Outcome::Weighted {
                    virtual_host,
                    clusters,
                } => {
                    let split: Vec<String> = clusters.iter().map(|(c, w)| format!("{c} ({w})")).collect();
                    format!("virtual host {virtual_host} → split: {}", split.join(", "))
                }
                Outcome::Redirect {
                    virtual_host,
                    status,
                    location,
                } => format!("virtual host {virtual_host} → {status} redirect to {location}"),
                Outcome::Direct { virtual_host, status } => {
                    format!("virtual host {virtual_host} → direct response {status}")
                }
                Outcome::RequireTls { virtual_host } => {
                    format!("virtual host {virtual_host} → 301 to https (the server requires TLS)")
                }
                Outcome::NotFound { reason } => format!("404: {reason}"),
            };
            out.push_str(&format!("{}: {line}\n", rc.name));
        }
    }
    if out.is_empty() {
        return Err("the proxy was sent no route configuration".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn type_states_read_as_proxy_status_words_them() {
        let cases = [
            (json!({}), "NOT SENT"),
            (json!({"sent_version": "a", "acked_version": "a"}), "SYNCED"),
            (json!({"sent_version": "b", "acked_version": "a"}), "STALE"),
            (
                json!({"sent_version": "b", "acked_version": "a", "nack": {"version": "b"}}),
                "NACK",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(type_state(&t), want, "{t}");
        }
        let syncz = json!({"proxies": [{"proxy": "router~1", "role": "Router", "mode": "sotw", "generation": 3,
            "types": {"cds": {"sent_version": "a", "acked_version": "a"}}}]});
        let table = proxies_table(&syncz);
        let row = table.lines().nth(1).expect("a row");
        assert!(
            row.starts_with("router~1") && row.contains("SYNCED") && row.contains("router"),
            "{table}"
        );
    }

    fn cluster_dump(clusters: Vec<Value>) -> Value {
        let items: Vec<Value> = clusters.into_iter().map(|c| json!({"cluster": c})).collect();
        json!({"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "dynamic_active_clusters": items}]})
    }

    #[test]
    fn diff_compares_the_messages_not_their_renderings() {
        const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
        // The same cluster, written two ways (field order, a default left out
        // or spelled out, a duration's digits).
        let ours = cluster_dump(vec![
            json!({"@type": CLUSTER, "name": "a", "connect_timeout": "5s", "type": "EDS"}),
            json!({"@type": CLUSTER, "name": "b", "connect_timeout": "1s"}),
        ]);
        let theirs = cluster_dump(vec![
            json!({"connect_timeout": "5.000s", "name": "a", "@type": CLUSTER, "type": "EDS", "per_connection_buffer_limit_bytes": null}),
            json!({"@type": CLUSTER, "name": "b", "connect_timeout": "2s"}),
            json!({"@type": CLUSTER, "name": "c"}),
        ]);
        let d = diff(&ours, &theirs).expect("diff");
        assert_eq!(d.same.get("clusters"), Some(&1));
        assert_eq!(d.differ, [("clusters", "b".to_string())]);
        assert_eq!(d.only_held, [("clusters", "c".to_string())]);
        assert!(!d.in_sync());
        assert!(diff(&ours, &ours).expect("diff").in_sync());
    }
}
