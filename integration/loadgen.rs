//! `meshd loadgen` against a real meshd process: what each kind of change
//! sends, and to whom. An endpoint change is EDS only, and only to the
//! proxies whose scope holds that service; a VirtualService change is RDS
//! only; a new service's cluster and endpoints reach every proxy. (Times
//! are measured by `make bench`, not asserted here.) Against a running
//! meshd, a run starts on the mesh it wrote, not on what a run before left
//! in the directory.

use serde_json::Value;

use crate::common::{meshd, Meshd};

fn loadgen(args: &[&str]) -> Value {
    let mut all = vec![
        "loadgen",
        "--services",
        "30",
        "--endpoints",
        "2",
        "--virtual-services",
        "5",
        "--clients",
        "12",
        "--namespaces",
        "3",
        "--json",
    ];
    all.extend_from_slice(args);
    let out = meshd(&all);
    assert!(
        out.status.success(),
        "meshd loadgen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn types(report: &Value) -> Vec<String> {
    report["responses_by_type"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn an_endpoint_change_is_eds_only_and_only_where_the_service_is_seen() {
    for delta in [false, true] {
        let mut args = vec!["--change", "endpoint", "--sidecar-scoping"];
        if delta {
            args.push("--delta");
        }
        let r = loadgen(&args);
        assert!(r["initial_sync_s"].as_f64().is_some_and(|s| s > 0.0), "{r}");
        assert_eq!(types(&r), ["eds"], "{r}");
        // The gateway and the sidecars of ns-0 (clients 3, 6 and 9) see svc-0.
        assert_eq!(r["clients_pushed"], 4, "{r}");
        assert_eq!(r["clients_changed"], 4, "{r}");
        assert!(r["convergence_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
        assert!(r["meshd_peak_rss_mb"].as_f64().is_some_and(|mb| mb > 0.0), "{r}");
        assert_eq!(r["delta"], delta, "{r}");
    }
}

#[test]
fn a_virtual_service_change_is_rds_only_and_a_new_service_reaches_every_proxy() {
    let vs = loadgen(&["--change", "virtualservice"]);
    assert_eq!(types(&vs), ["rds"], "{vs}");
    assert_eq!(vs["clients_changed"], 12, "every proxy routes svc-0: {vs}");
    // meshd's own push (from its generation installed) ends before the last
    // proxy has ACKed it (counted from the file written).
    let push = vs["meshd_push_ms"].as_f64().expect("meshd's push time");
    let last = vs["convergence_max_ms"].as_f64().expect("convergence");
    assert!(push > 0.0 && push < last, "{vs}");
    let svc = loadgen(&["--change", "service", "--baseline"]);
    let t = types(&svc);
    assert!(
        t.contains(&"cds".to_string()) && t.contains(&"eds".to_string()),
        "{svc}"
    );
    assert_eq!(svc["clients_changed"], 12, "{svc}");
    assert!(svc["baseline_ratio"].as_f64().is_some(), "{svc}");
    // The baseline's floor is the median of its runs.
    let mut runs: Vec<f64> = svc["baseline_runs_ms"]
        .as_array()
        .expect("the baseline's runs")
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    runs.sort_by(f64::total_cmp);
    assert_eq!(runs.len(), 3, "{svc}");
    assert_eq!(svc["baseline_fan_out_ms"].as_f64(), Some(runs[1]), "{svc}");
}

#[test]
fn a_short_soak_keeps_every_client_fed_and_ends_on_the_final_version() {
    // Without Sidecar scoping every client sees the churned service.
    let r = loadgen(&["--soak", "3s", "--churn-rate", "40"]);
    let soak = &r["soak"];
    assert!(soak["changes_written"].as_u64().is_some_and(|n| n >= 60), "{r}");
    assert!(
        soak["min_client_responses"].as_u64().is_some_and(|n| n > 0),
        "no stream starved: {r}"
    );
    assert!(soak["rss_slope_mb_per_min"].is_number(), "memory sampled: {r}");
    assert_eq!(
        r["clients_changed"], 12,
        "every client ends on the final version: {r}"
    );
}

#[test]
fn a_run_against_a_running_meshd_starts_on_the_mesh_it_wrote() {
    let work = tempfile::tempdir().expect("tmp");
    let dir = work.path().join("config");
    std::fs::create_dir(&dir).expect("config dir");
    // A run before left its new service behind, without endpoints.
    std::fs::write(
        dir.join("new-service.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: loadgen-new, namespace: ns-0}\n\
         spec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    )
    .expect("stale file");
    let m = Meshd::start(&dir, work.path());
    let pid = m.proc.child.id().to_string();
    let addr = format!("127.0.0.1:{}", m.xds_port);
    let dir = dir.to_str().expect("utf-8 path");
    let r = loadgen(&[
        "--change",
        "service",
        "--xds-addr",
        &addr,
        "--config-dir",
        dir,
        "--meshd-pid",
        &pid,
    ]);
    // The service is new to every proxy: its cluster as well as its
    // endpoints arrive with the change.
    let t = types(&r);
    assert!(
        t.contains(&"cds".to_string()) && t.contains(&"eds".to_string()),
        "{r}"
    );
    assert_eq!(r["clients_changed"], 12, "{r}");
    assert!(r["meshd_peak_rss_mb"].as_f64().is_some_and(|mb| mb > 0.0), "{r}");
    // The marking service is gone from the directory and from the mesh.
    assert!(!std::path::Path::new(dir).join("loadgen-sync.yaml").exists());
    let services = m.json("/debug/registryz");
    assert!(!services.to_string().contains("loadgen-sync"), "{services}");
}
