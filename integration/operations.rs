//! What operators read, with a stock Envoy gateway connected: `/metrics`
//! parsed with a Prometheus text parser (the xDS metrics, named as istiod
//! names them, move after a push and after Envoy rejects a config),
//! `/debug/push_status` and `/debug/registryz`.

use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use crate::common::{
    eventually, free_port, hello_virtual_service, ingress_gateway, loopback_service, write, Backend, Envoy,
    Meshd, Pod,
};

fn scrape(meshd: &Meshd) -> Scrape {
    let (code, body) = meshd.get("/metrics").expect("scrape");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of a counter or gauge, or the count of a histogram, summed
/// over the samples carrying `labels`; 0 when there is none.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => panic!("{name} is a summary, not a histogram"),
        })
        .sum()
}

#[test]
fn metrics_and_push_status_follow_pushes_and_rejections() {
    let work = tempfile::tempdir().expect("tmp");
    let backend = Backend::start("hello");
    let config = work.path().join("config");
    write(
        &config.join("mesh.yaml"),
        &format!(
            "{}{}",
            ingress_gateway(free_port()),
            loopback_service("hello", "http", 80, backend.port)
        ),
    );
    write(&config.join("vs.yaml"), &hello_virtual_service("config-v1", None));
    let meshd = Meshd::start(&config, work.path());
    // Envoy's own stats on a port Prometheus can scrape, as Istio's 15090.
    let stats_port = free_port();
    let stats_addr = format!("127.0.0.1:{stats_port}");
    let envoy = Envoy::start_with_bootstrap_args(
        &meshd,
        work.path(),
        &Pod::ingress_gateway("istio-ingressgateway-0"),
        &["--stats-addr", &stats_addr],
    );
    let wait_for = |version: &str| {
        eventually(&format!("Envoy holds {version}"), Duration::from_secs(30), || {
            if envoy.holds_route(version) {
                Ok(())
            } else {
                Err(envoy.proc.log_tail())
            }
        })
    };
    wait_for("config-v1");

    let (code, envoy_stats) =
        crate::common::curl(&[&format!("http://{stats_addr}/stats/prometheus")]).expect("Envoy's stats");
    assert_eq!(code, 200);
    let envoy_scrape =
        Scrape::parse(envoy_stats.lines().map(|l| Ok(l.to_string()))).expect("Envoy's Prometheus text");
    // Its connection to meshd, as Envoy counts it.
    let xds = [("envoy_cluster_name", "xds-grpc")];
    assert!(
        value(&envoy_scrape, "envoy_cluster_upstream_cx_total", &xds) >= 1.0,
        "{envoy_stats}"
    );

    let first = scrape(&meshd);
    assert_eq!(
        value(&first, "pilot_xds", &[("type", "router")]),
        1.0,
        "one gateway connected"
    );
    for t in ["cds", "eds", "lds", "rds"] {
        assert!(
            value(&first, "pilot_xds_pushes", &[("type", t)]) >= 1.0,
            "{t} sent"
        );
        assert!(
            value(&first, "pilot_xds_config_size_bytes", &[("type", t)]) >= 1.0,
            "{t} size recorded"
        );
    }
    assert_eq!(value(&first, "pilot_total_xds_rejects", &[]), 0.0);
    assert!(
        value(&first, "process_resident_memory_bytes", &[]) > 1e6,
        "meshd's RSS"
    );
    assert!(value(&first, "process_open_fds", &[]) >= 3.0);
    assert!(value(&first, "process_start_time_seconds", &[]) > 1.6e9);

    // A routing change: one more RDS push, timed, and counted as a config event.
    write(&config.join("vs.yaml"), &hello_virtual_service("config-v2", None));
    wait_for("config-v2");
    let second = eventually("the push is counted", Duration::from_secs(10), || {
        let s = scrape(&meshd);
        let rds = value(&s, "pilot_xds_pushes", &[("type", "rds")]);
        if rds > value(&first, "pilot_xds_pushes", &[("type", "rds")]) {
            Ok(s)
        } else {
            Err(format!("rds pushes still {rds}"))
        }
    });
    assert!(
        value(
            &second,
            "pilot_k8s_cfg_events",
            &[("type", "VirtualService"), ("event", "update")]
        ) >= 1.0
    );
    assert!(value(&second, "pilot_proxy_convergence_time", &[]) >= 1.0);
    assert!(value(&second, "pilot_xds_push_time", &[("type", "rds")]) >= 1.0);
    assert_eq!(value(&second, "pilot_total_xds_rejects", &[]), 0.0);

    // `meshd dump`: the proxy is in sync, as its own admin dump shows.
    let debug_addr = format!("127.0.0.1:{}", meshd.debug_port);
    let admin = format!("127.0.0.1:{}", envoy.admin_port);
    let dump = |args: &[&str]| {
        let mut all = vec!["dump", "--debug-addr", &debug_addr];
        all.extend_from_slice(args);
        let out = crate::common::meshd(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, diff) = dump(&["diff", &envoy.node_id, "--admin", &admin]);
    assert!(
        ok && diff.contains("in sync") && diff.contains("routes: 1 in sync"),
        "{diff}"
    );
    let (ok, routes) = dump(&[
        "routes",
        &envoy.node_id,
        "--host",
        "hello.example.com",
        "--path",
        "/hi",
    ]);
    assert!(
        ok && routes.contains("→ cluster outbound|80||hello.default.svc.cluster.local"),
        "{routes}"
    );
    let (_, routes) = dump(&["routes", &envoy.node_id, "--host", "nope.example.com"]);
    assert!(routes.contains("404: no virtual host"), "{routes}");
    // What the proxy was sent, one type, as a table; the endpoint filters
    // by type and refuses an unknown one.
    let (ok, clusters) = dump(&["config", &envoy.node_id, "--type", "clusters", "-o", "table"]);
    assert!(ok && clusters.starts_with("TYPE"), "{clusters}");
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("cluster") && l.contains("outbound|80||hello.default.svc.cluster.local")),
        "{clusters}"
    );
    assert!(!clusters.lines().any(|l| l.starts_with("route")), "{clusters}");
    let proxy = envoy.node_id.replace('~', "%7E");
    let only_routes = meshd.json(&format!("/debug/config_dump?proxy={proxy}&types=rds"));
    let configs = only_routes["configs"].as_array().cloned().unwrap_or_default();
    assert_eq!(configs.len(), 1, "{only_routes}");
    assert!(configs[0]["@type"]
        .as_str()
        .is_some_and(|t| t.ends_with("RoutesConfigDump")));
    let (code, body) = meshd
        .get(&format!("/debug/config_dump?proxy={proxy}&types=nothing"))
        .expect("debug");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown type"), "{body}");
    let (_, table) = dump(&["proxies"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&envoy.node_id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("router") && row.contains("SYNCED") && !row.contains("NACK"),
        "{table}"
    );

    // The push is on /debug/push_status, with what triggered it.
    let status = meshd.json("/debug/push_status");
    let latest = &status["pushes"][0];
    assert_eq!(
        latest["trigger"],
        serde_json::json!(["VirtualService default/hello updated"]),
        "{status}"
    );
    assert_eq!(latest["endpoint_only"], false);
    assert!(latest["proxies"].as_u64() >= Some(1), "{status}");
    // The registry as meshd sees it.
    let registry = meshd.json("/debug/registryz");
    let hello = registry["services"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|s| s["hostname"] == "hello.default.svc.cluster.local")
        })
        .unwrap_or_else(|| panic!("{registry}"));
    let port = &hello["ports"][0];
    assert_eq!(port["port"], 80);
    assert_eq!(port["endpoints"][0]["address"], "127.0.0.1");
    assert_eq!(port["endpoints"][0]["port"], backend.port);
    assert_eq!(port["endpoints"][0]["tls_mode"], "disabled");

    // A regex meshd accepts but Envoy's RE2 refuses as too large (its
    // program-size limit): Envoy NACKs, meshd counts it, and Envoy keeps
    // serving the routes it had.
    write(
        &config.join("vs.yaml"),
        &hello_virtual_service("config-v3", Some("/(a{200}){5}")),
    );
    let rejected = eventually("the NACK is counted", Duration::from_secs(30), || {
        let s = scrape(&meshd);
        if value(&s, "pilot_total_xds_rejects", &[("type", "rds")]) >= 1.0 {
            Ok(s)
        } else {
            Err(envoy.proc.log_tail())
        }
    });
    assert!(value(&rejected, "pilot_total_xds_rejects", &[("type", "rds")]) >= 1.0);
    assert!(
        envoy.holds_route("config-v2") && !envoy.holds_route("config-v3"),
        "Envoy keeps the last good routes"
    );
    // `meshd dump` shows the rejection: the route differs from what meshd
    // sent, and the proxy's RDS is NACK.
    let (ok, diff) = dump(&["diff", &envoy.node_id, "--admin", &admin]);
    assert!(!ok, "{diff}");
    assert!(
        diff.lines()
            .any(|l| l.starts_with("routes ") && l.contains("differs")),
        "{diff}"
    );
    let (_, table) = dump(&["proxies"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&envoy.node_id) && l.contains("NACK")),
        "{table}"
    );
    let sync = meshd.json("/debug/syncz");
    let nack = &sync["proxies"][0]["types"]["rds"]["nack"];
    assert!(
        nack["error"].as_str().is_some_and(|e| e.contains("program size")),
        "{sync}"
    );
}

#[test]
fn logs_are_json_lines_at_the_level_asked_for() {
    let work = tempfile::tempdir().expect("tmp");
    let config = work.path().join("config");
    write(
        &config.join("mesh.yaml"),
        &loopback_service("hello", "http", 80, free_port()),
    );
    let meshd = Meshd::start_with(
        &config,
        work.path(),
        crate::common::MeshdPorts::free(),
        &["--log-format", "json", "--log-level", "warn,meshd::serve=debug"],
    );
    // A change: the push context is rebuilt, which meshd::serve logs at debug.
    write(&config.join("vs.yaml"), &hello_virtual_service("config-v1", None));
    let lines: Vec<serde_json::Value> = eventually(
        "the rebuild and the analysis are logged",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&meshd.proc.log).map_err(|e| e.to_string())?;
            let lines: Vec<serde_json::Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON: {l}: {e}")))
                .collect::<Result<_, _>>()?;
            let rebuilt = lines
                .iter()
                .any(|l| l["fields"]["message"] == "push context built");
            // The analyzers run on what is served: the VirtualService names a
            // Gateway this config does not have.
            let analyzed = lines
                .iter()
                .any(|l| l["fields"]["code"] == "IST0101" && l["level"] == "WARN");
            if rebuilt && analyzed {
                Ok(lines)
            } else {
                Err(text)
            }
        },
    );
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["target"].is_string(),
            "{line}"
        );
        let level = line["level"].as_str().unwrap_or_default();
        let debug_here = line["target"] == "meshd::serve";
        assert!(
            matches!(level, "WARN" | "ERROR") || debug_here,
            "only warnings, and meshd::serve at debug: {line}"
        );
    }

    // A filter that does not parse stops meshd with the flag named.
    let out = crate::common::meshd(&["serve", "--log-level", "meshd=loudest"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-level"), "{err}");
}

#[test]
fn analyze_prints_json_and_takes_suppressions() {
    let work = tempfile::tempdir().expect("tmp");
    let config = work.path().join("config");
    // The gateway's Service exposes port 80 only; the Gateway also serves 8080.
    let gateway = ingress_gateway(free_port()).replace(
        "    hosts: [\"*\"]\n",
        "    hosts: [\"*\"]\n  - port: {number: 8080, name: http-alt, protocol: HTTP}\n    hosts: [\"*\"]\n",
    );
    write(&config.join("gateway.yaml"), &gateway);
    let dir = config.display().to_string();
    let out = crate::common::meshd(&["analyze", "-o", "json", &dir]);
    assert!(!out.status.success(), "a warning fails the run");
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(findings.as_array().map(Vec::len), Some(1), "{findings}");
    assert_eq!(findings[0]["code"], "IST0104");
    assert_eq!(findings[0]["resource"], "Gateway istio-system/ingressgateway");
    assert_eq!(findings[0]["origin"]["file"], format!("{dir}/gateway.yaml"));

    let out = crate::common::meshd(&[
        "analyze",
        "-o",
        "json",
        "-S",
        "IST0104=Gateway istio-system/*",
        &dir,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(findings, serde_json::json!([]));
}
