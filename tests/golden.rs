//! Golden and behaviour tests for translation.
//!
//! Each `testdata/golden/<scenario>/scenario.yaml` names a config directory,
//! the proxies to translate it for, and requests to send through the result.
//! For every proxy and xDS type the resources are compared with
//! `out/<proxy>.<type>.json`; `make golden` (MESHD_UPDATE_GOLDEN=1) rewrites
//! them and removes orphans. Every request is routed through the generated
//! RouteConfiguration as Envoy would, and must land where the scenario says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshd::config::ConfigSnapshot;
use meshd::debug::render::{message_to_json, redacted_secret};
use meshd::model::{Proxy, PushContext};
use meshd::translate::simulate::{self, Outcome};
use meshd::translate::{generate, Generated};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    #[serde(default = "default_config")]
    config: String,
    proxies: Vec<ProxySpec>,
    #[serde(default)]
    requests: Vec<RequestSpec>,
    /// A mesh config file (as `meshd serve --mesh-config` takes it).
    #[serde(default)]
    mesh: Option<String>,
}

fn default_config() -> String {
    "config".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxySpec {
    name: String,
    id: String,
    /// The SPIFFE identity the proxy authenticated as, if any.
    #[serde(default)]
    identity: Option<String>,
    /// The node's locality, `REGION/ZONE/SUBZONE`.
    #[serde(default)]
    locality: Option<String>,
    #[serde(default)]
    metadata: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestSpec {
    proxy: String,
    route: String,
    host: String,
    #[serde(default = "root")]
    path: String,
    #[serde(default = "get")]
    method: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// `cluster NAME`, `weighted A=50,B=50`, `redirect 301 LOCATION`,
    /// `direct STATUS`, `require_tls` or `404`.
    expect: String,
}

fn root() -> String {
    "/".into()
}

fn get() -> String {
    "GET".into()
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Cluster { cluster, .. } => format!("cluster {cluster}"),
        Outcome::Weighted { clusters, .. } => {
            let parts: Vec<String> = clusters.iter().map(|(c, w)| format!("{c}={w}")).collect();
            format!("weighted {}", parts.join(","))
        }
        Outcome::Redirect { status, location, .. } => format!("redirect {status} {location}"),
        Outcome::Direct { status, .. } => format!("direct {status}"),
        Outcome::RequireTls { .. } => "require_tls".into(),
        Outcome::NotFound { .. } => "404".into(),
    }
}

/// 2030-01-01T00:00:00Z.
fn golden_time() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_893_456_000)
}

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("testdata/golden")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("scenario.yaml").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no scenarios under {}", root.display());
    dirs
}

fn rendered<M: prost::Message + prost::Name>(items: &[M]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|m| message_to_json(m).expect("renders"))
            .collect(),
    )
}

fn outputs(g: &Generated) -> Vec<(&'static str, Value)> {
    vec![
        ("clusters", rendered(&g.clusters)),
        ("endpoints", rendered(&g.endpoints)),
        ("listeners", rendered(&g.listeners)),
        ("routes", rendered(&g.routes)),
        (
            "secrets",
            rendered(&g.secrets.iter().map(redacted_secret).collect::<Vec<_>>()),
        ),
        (
            "diagnostics",
            serde_json::to_value(&g.diagnostics).expect("diagnostics"),
        ),
    ]
}

/// Writes `value` as the golden `file` (`update`), or records a failure
/// when the file holds something else.
fn check_golden(
    file: &std::path::Path,
    value: &impl serde::Serialize,
    update: bool,
    failures: &mut Vec<String>,
) {
    let text = serde_json::to_string_pretty(value).expect("json") + "\n";
    if update {
        std::fs::create_dir_all(file.parent().expect("out dir")).expect("mkdir out");
        std::fs::write(file, &text).expect("write golden");
    } else if std::fs::read_to_string(file).ok().as_deref() != Some(text.as_str()) {
        failures.push(format!(
            "{} differs (run `make golden` and review the diff)",
            file.display()
        ));
    }
}

#[test]
fn golden_scenarios() {
    let update = std::env::var_os("MESHD_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for dir in scenarios() {
        let scenario: Scenario = serde_norway::from_str(
            &std::fs::read_to_string(dir.join("scenario.yaml")).expect("scenario.yaml"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let files = meshd::source::load_dir(&dir.join(&scenario.config)).expect("config dir");
        let config = ConfigSnapshot::from_files(files);
        assert!(
            config.rejections.is_empty(),
            "{}: rejected documents: {:?}",
            dir.display(),
            config.rejections
        );
        // Certificates are judged at a fixed time, so goldens do not age.
        let mesh = scenario.mesh.as_ref().map(|m| {
            meshd::config::mesh::MeshConfig::load(&dir.join(m))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        });
        let push = PushContext::new_at(Arc::new(config), golden_time())
            .with_mesh(Arc::new(mesh.unwrap_or_default()));
        let out_dir = dir.join("out");
        let mut written = BTreeSet::new();
        let mut generated = BTreeMap::new();
        for spec in &scenario.proxies {
            let mut proxy = Proxy::parse(&spec.id, &spec.metadata).expect("proxy id");
            proxy.identity = spec.identity.clone();
            proxy.locality = spec.locality.clone().unwrap_or_default();
            let g = generate(&push, &proxy);
            for (kind, value) in outputs(&g) {
                let file = out_dir.join(format!("{}.{kind}.json", spec.name));
                check_golden(&file, &value, update, &mut failures);
                written.insert(file);
            }
            generated.insert(spec.name.clone(), g);
        }
        // What `meshd analyze -o json` says of the scenario's config.
        let findings = meshd::analyze::analyze_push(&push);
        let file = out_dir.join("analyze.json");
        check_golden(&file, &findings, update, &mut failures);
        written.insert(file);
        if update {
            for entry in std::fs::read_dir(&out_dir).expect("out").flatten() {
                if !written.contains(&entry.path()) {
                    std::fs::remove_file(entry.path()).expect("remove orphan");
                }
            }
        }
        for (i, req) in scenario.requests.iter().enumerate() {
            let g = &generated[&req.proxy];
            let Some(rc) = g.routes.iter().find(|r| r.name == req.route) else {
                failures.push(format!("{}: request {i}: no route {}", dir.display(), req.route));
                continue;
            };
            let request = simulate::Request {
                host: req.host.clone(),
                path: req.path.clone(),
                method: req.method.clone(),
                headers: req.headers.clone().into_iter().collect(),
            };
            let got = describe(&simulate::route(rc, &request));
            if got != req.expect {
                failures.push(format!(
                    "{}: request {i} ({} {}{}): expected {:?}, got {got:?}",
                    dir.display(),
                    req.method,
                    req.host,
                    req.path,
                    req.expect
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `meshd inject` output for every `testdata/inject/*.yaml`, compared with
/// `*.yaml.injected`; `make golden` rewrites them.
#[test]
fn inject_goldens() {
    let update = std::env::var_os("MESHD_UPDATE_GOLDEN").is_some();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inject");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/inject")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty());
    let mut failures = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(&input).expect("input");
        let out =
            meshd::inject::inject_yaml(&text, &meshd::inject::InjectOptions::default()).expect("injects");
        let golden = input.with_extension("yaml.injected");
        if update {
            std::fs::write(&golden, &out).expect("write golden");
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(out.as_str()) {
            failures.push(format!(
                "{} differs (run `make golden` and review the diff)",
                golden.display()
            ));
        }
        // Injecting twice changes nothing more.
        let again =
            meshd::inject::inject_yaml(&out, &meshd::inject::InjectOptions::default()).expect("again");
        assert_eq!(again, out, "{}: injection is idempotent", input.display());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
