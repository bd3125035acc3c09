//! Every golden scenario, served by meshd to a stock Envoy for each of its
//! proxies: Envoy must accept everything it is sent (no NACK). Each proxy
//! runs in a network namespace of its own, so listeners never collide.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::{eventually, meshd_bin};
use crate::netns::{run, Topology};

const MESHD_IP: &str = "10.254.0.2";

struct ProxySpec {
    role: String,
    ip: String,
    name: String,
    namespace: String,
    labels: String,
    service_account: String,
    interception_mode: String,
    locality: String,
    id: String,
}

fn proxies(scenario: &Path) -> (PathBuf, Vec<ProxySpec>) {
    let text = std::fs::read_to_string(scenario.join("scenario.yaml")).expect("scenario.yaml");
    let v: Value = serde_norway::from_str(&text).expect("yaml");
    let config = scenario.join(v["config"].as_str().unwrap_or("config"));
    let specs = v["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let id = p["id"].as_str().expect("id").to_string();
            let parts: Vec<&str> = id.split('~').collect();
            let (name, namespace) = parts[2].rsplit_once('.').expect("POD.NS");
            let labels = p["metadata"]["LABELS"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            ProxySpec {
                role: if parts[0] == "router" {
                    "gateway".into()
                } else {
                    "sidecar".into()
                },
                ip: parts[1].to_string(),
                name: name.to_string(),
                namespace: namespace.to_string(),
                labels,
                service_account: p["metadata"]["SERVICE_ACCOUNT"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                interception_mode: p["metadata"]["INTERCEPTION_MODE"]
                    .as_str()
                    .unwrap_or("REDIRECT")
                    .to_string(),
                locality: p["locality"].as_str().unwrap_or_default().to_string(),
                id,
            }
        })
        .collect();
    (config, specs)
}

fn check(scenario: &Path) -> Result<(), String> {
    let (config, specs) = proxies(scenario);
    let mut t = Topology::new();
    let cp = t.pod("cp", MESHD_IP);
    let mut cmd = t.exec(&cp);
    cmd.arg(meshd_bin())
        .args(["serve", "--config-dir"])
        .arg(&config)
        .args(["--xds-addr", "0.0.0.0:15010", "--xds-tls-addr", "127.0.0.1:15012"])
        .args([
            "--debug-addr",
            "127.0.0.1:15014",
            "--webhook-addr",
            "127.0.0.1:15017",
        ])
        .arg("--insecure-plaintext-identity");
    t.spawn(cmd, "meshd.log");
    eventually("meshd ready", Duration::from_secs(20), || {
        t.curl(&cp, &["http://127.0.0.1:15014/ready"])
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    });
    let envoy = crate::common::envoy_bin();
    for (i, p) in specs.iter().enumerate() {
        let ns = t.pod(&format!("p{i}"), &format!("10.254.0.{}", 10 + i));
        // The pod also holds the address its node id claims, so listeners
        // bound to the workload's own IP can bind.
        run(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{}/32", p.ip), "dev", "lo"]));
        let bootstrap = t.path(&format!("p{i}.yaml"));
        run(Command::new(meshd_bin())
            .args([
                "bootstrap",
                "--role",
                &p.role,
                "--name",
                &p.name,
                "--namespace",
                &p.namespace,
            ])
            .args([
                "--labels",
                &p.labels,
                "--service-account",
                &p.service_account,
                "--ip",
                &p.ip,
                "--interception-mode",
                &p.interception_mode,
                "--locality",
                &p.locality,
            ])
            .args([
                "--xds-addr",
                &format!("{MESHD_IP}:15010"),
                "--admin-addr",
                "127.0.0.1:15000",
                "-o",
            ])
            .arg(&bootstrap));
        let mut cmd = t.exec(&ns);
        cmd.arg(&envoy)
            .arg("-c")
            .arg(&bootstrap)
            .args(["--disable-hot-restart", "-l", "warning"]);
        t.spawn(cmd, &format!("p{i}-envoy.log"));
    }
    for (i, p) in specs.iter().enumerate() {
        let result = eventually_result(Duration::from_secs(20), || {
            let body = t
                .curl(&cp, &["http://127.0.0.1:15014/debug/syncz"])
                .map_err(|e| format!("{e:?}"))?;
            let sync: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let proxy = sync["proxies"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["proxy"] == p.id.as_str())
                .cloned()
                .ok_or_else(|| format!("{} not connected yet", p.id))?;
            let types = proxy["types"].as_object().cloned().unwrap_or_default();
            for (t, st) in &types {
                if !st["nack"].is_null() {
                    return Err(format!("NACK {t}: {}", st["nack"]));
                }
            }
            let settled = ["cds", "lds"].iter().all(|t| {
                types
                    .get(*t)
                    .is_some_and(|s| s["acked_version"] == s["sent_version"] && s["sent_version"].is_string())
            }) && types.values().all(|s| s["acked_version"] == s["sent_version"]);
            if settled {
                Ok(())
            } else {
                Err(format!("not settled: {proxy}"))
            }
        });
        if let Err(e) = result {
            return Err(format!(
                "{}: proxy {} ({}): {e}\nenvoy:\n{}",
                scenario.display(),
                i,
                p.id,
                t.log(&format!("p{i}-envoy.log"))
            ));
        }
    }
    Ok(())
}

/// Like `eventually`, but returns the last error instead of panicking, and
/// stops at once on a NACK.
fn eventually_result(timeout: Duration, mut f: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if e.starts_with("NACK") || std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn every_golden_scenario_is_accepted_by_stock_envoy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let mut scenarios: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("goldens")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("scenario.yaml").exists())
        .collect();
    scenarios.sort();
    let failures: Vec<String> = scenarios.iter().filter_map(|s| check(s).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
