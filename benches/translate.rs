//! `make bench`: translation and snapshot cost as the mesh grows.
//!
//! For each mesh size it builds a config of N Services (with 10 Endpoints
//! and a VirtualService each, all bound to one Gateway and the mesh), then
//! measures: loading it (parse and validate), building the push context,
//! translating and encoding one gateway's snapshot and one sidecar's (which
//! sees every service; from a cache of its own, so none of the gateway's
//! clusters is reused), then a sidecar of another namespace (another
//! config key, which shares the first sidecar's clusters), serving 1,000
//! gateway proxies with the same config key from the cache, and updating the push context for one
//! service's endpoints changed and for one VirtualService edited, and the
//! config store for one endpoint moved and for a file added. Prints a table; run it twice to compare.
//! Under `cargo test` it runs the smallest size once, as a check that the
//! bench still works.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd::config::{parse_file, ConfigSnapshot, ConfigStore, FileLoad};
use meshd::model::{Proxy, PushContext};
use meshd::xds::{SnapshotCache, XdsType};

const ENDPOINTS: usize = 10;

/// The mesh's YAML: one file of N Services, Endpoints and VirtualServices.
fn mesh_text(services: usize) -> String {
    let mut docs = vec![
        "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n"
            .to_string(),
    ];
    for i in 0..services {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\nsubsets:\n- addresses: [{addresses}]\n  ports: [{{name: http, port: 8080}}]\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\nspec:\n  hosts: [svc-{i}.example.com, svc-{i}]\n  gateways: [istio-system/gw, mesh]\n  http:\n  - match:\n    - uri: {{prefix: /api}}\n    route:\n    - destination: {{host: svc-{i}}}\n",
            ns = i % 20,
            addresses = (0..ENDPOINTS)
                .map(|j| format!("{{ip: 10.{}.{}.{}}}", i / 250, i % 250, j + 1))
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    docs.join("---\n")
}

/// Loads the mesh's YAML as meshd loads a config file: parsed, validated
/// and stored.
fn load(text: &str) -> Arc<ConfigSnapshot> {
    let snapshot = ConfigSnapshot::from_files(vec![parse_file("mesh.yaml", text)]);
    assert!(
        snapshot.rejections.is_empty(),
        "{:?}",
        snapshot.rejections.first()
    );
    Arc::new(snapshot)
}

/// `config` with one document replaced (or added): the next generation.
fn edited(config: &ConfigSnapshot, doc: &str) -> Arc<ConfigSnapshot> {
    let one = ConfigSnapshot::from_files(vec![parse_file("edit.yaml", doc)]);
    assert!(one.rejections.is_empty(), "{:?}", one.rejections.first());
    let mut next = config.clone();
    next.generation += 1;
    next.resources.extend(one.resources);
    Arc::new(next)
}

/// A small file of one service's Endpoints (`ip`), and with `service` its
/// Service too.
fn extra(file: &str, ip: &str, service: bool) -> FileLoad {
    let mut text = format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: extra, namespace: ns-0}}\nsubsets:\n- addresses: [{{ip: {ip}}}]\n  ports: [{{name: http, port: 8080}}]\n"
    );
    if service {
        text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: ns-0}\nspec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n");
    }
    parse_file(file, &text)
}

/// The config store taking in one small file next to the mesh's (read
/// again, the mesh's file hands on its earlier reading): `before`, the
/// small file it held (if any); `after`, the one read now. Parsing that
/// file and the store's next generation, which changes `changed`
/// resources.
fn store_step(
    mesh: &str,
    before: Option<FileLoad>,
    after: impl FnOnce() -> FileLoad,
    changed: usize,
) -> Duration {
    let mesh = parse_file("mesh.yaml", mesh);
    let mut store = ConfigStore::default();
    let held = store.apply([mesh.clone()].into_iter().chain(before).collect());
    let t = Instant::now();
    let next = store.apply(vec![mesh, after()]);
    let elapsed = t.elapsed();
    assert_eq!(next.generation, held.generation + 1);
    assert_eq!(held.changes(&next).len(), changed);
    elapsed
}

fn gateway(i: usize) -> Proxy {
    let meta = serde_json::json!({"LABELS": {"istio": "ingressgateway"}});
    Proxy::parse(
        &format!(
            "router~10.9.0.{}~gw-{i}.istio-system~istio-system.svc.cluster.local",
            i % 250
        ),
        meta.as_object().expect("object"),
    )
    .expect("proxy")
}

fn sidecar(ns: &str) -> Proxy {
    let meta = serde_json::json!({"LABELS": {"app": "client"}});
    Proxy::parse(
        &format!("sidecar~10.250.0.1~client-0.{ns}~{ns}.svc.cluster.local"),
        meta.as_object().expect("object"),
    )
    .expect("proxy")
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[100, 1000, 10000] } else { &[10] };
    let proxies = if full { 1000 } else { 10 };
    println!(
        "{:>9} | {:>9} | {:>8} | {:>11} | {:>12} | {:>12} | {:>15} | {:>9} | {:>13} | {:>13} | {:>14} | {:>16} | {:>9} | {:>11}",
        "services",
        "endpoints",
        "load ms",
        "push ctx ms",
        "store upd ms",
        "store add ms",
        "endpoint upd ms",
        "vs upd ms",
        "gateway 1st ms",
        "sidecar 1st ms",
        "2nd key ms",
        format!("{proxies} cached ms"),
        "resources",
        "encoded KiB"
    );
    println!("{}", "-".repeat(204));
    for &n in sizes {
        let text = mesh_text(n);
        let t = Instant::now();
        let config = load(&text);
        let load_time = t.elapsed();
        let t = Instant::now();
        let push = Arc::new(PushContext::new(config.clone()));
        let push_time = t.elapsed();
        // One endpoint moved in place; a new service's file added, as a
        // new object is in Kubernetes mode.
        let store_update_time = store_step(
            &text,
            Some(extra("endpoints.yaml", "10.254.0.1", false)),
            || extra("endpoints.yaml", "10.254.0.2", false),
            1,
        );
        let store_add_time = store_step(&text, None, || extra("new.yaml", "10.254.0.1", true), 2);

        let moved = edited(
            &config,
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: svc-0, namespace: ns-0}\nsubsets:\n- addresses: [{ip: 10.254.0.1}]\n  ports: [{name: http, port: 8080}]\n",
        );
        let t = Instant::now();
        let after_move = push.next(moved.clone(), std::time::SystemTime::now());
        let endpoint_update_time = t.elapsed();
        assert_eq!(
            after_move.services,
            PushContext::new(moved).services,
            "the updated services equal the rebuilt ones"
        );
        let rerouted = edited(
            &config,
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: svc-0, namespace: ns-0}\nspec:\n  hosts: [svc-0]\n  http:\n  - route:\n    - destination: {host: svc-1}\n",
        );
        let t = Instant::now();
        let after_edit = push.next(rerouted, std::time::SystemTime::now());
        let vs_update_time = t.elapsed();
        assert_eq!(after_edit.virtual_services.len(), n);

        let cache = SnapshotCache::new(push.clone());
        let t = Instant::now();
        let first = cache.snapshot(&gateway(0));
        let first_time = t.elapsed();
        let sidecars = SnapshotCache::new(push);
        let t = Instant::now();
        let side = sidecars.snapshot(&sidecar("ns-0"));
        let sidecar_time = t.elapsed();
        assert!(
            side.of(XdsType::Cluster).is_some_and(|c| c.len() > n),
            "the sidecar sees every service"
        );
        let t = Instant::now();
        let other = sidecars.snapshot(&sidecar("ns-1"));
        let other_time = t.elapsed();
        assert!(!Arc::ptr_eq(&side, &other), "another config key");
        assert!(
            Arc::ptr_eq(
                &side.resources[&XdsType::Cluster],
                &other.resources[&XdsType::Cluster]
            ),
            "the same clusters, shared"
        );

        let t = Instant::now();
        for i in 1..=proxies {
            let s = cache.snapshot(&gateway(i));
            assert!(
                Arc::ptr_eq(&s, &first),
                "proxies with one config key share one snapshot"
            );
        }
        let cached_time = t.elapsed();

        let resources: usize = XdsType::ALL
            .iter()
            .filter_map(|t| first.of(*t))
            .map(|m| m.len())
            .sum();
        let bytes: usize = XdsType::ALL
            .iter()
            .filter_map(|t| first.of(*t))
            .flat_map(|m| m.values())
            .map(|e| e.wire.len())
            .sum();
        println!(
            "{n:>9} | {:>9} | {:>8} | {:>11} | {:>12} | {:>12} | {:>15} | {:>9} | {:>13} | {:>13} | {:>14} | {:>16} | {resources:>9} | {:>11}",
            n * ENDPOINTS,
            ms(load_time),
            ms(push_time),
            ms(store_update_time),
            ms(store_add_time),
            ms(endpoint_update_time),
            ms(vs_update_time),
            ms(first_time),
            ms(sidecar_time),
            ms(other_time),
            ms(cached_time),
            bytes / 1024
        );
    }
}
