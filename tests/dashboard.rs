//! The Grafana dashboard in deploy/grafana loads as JSON, every panel has a
//! query, and every query names metrics meshd exports (by the names the
//! code records them under).

use meshd::ca::metric as ca;
use meshd::process;
use meshd::xds::metric as xds;

const DASHBOARD: &str = include_str!("../deploy/grafana/meshd-dashboard.json");

/// Histograms are scraped as these series.
const HISTOGRAM_SERIES: [&str; 3] = ["_bucket", "_count", "_sum"];

#[test]
fn every_dashboard_query_names_a_metric_meshd_exports() {
    let counters_and_gauges = [
        xds::XDS,
        xds::PUSHES,
        xds::REJECTS,
        xds::REG_EVENTS,
        xds::CFG_EVENTS,
        ca::CSR_COUNT,
        ca::ISSUED,
        ca::SIGN_ERRORS,
        ca::ROOT_EXPIRY,
        process::CPU,
        process::RSS,
        process::OPEN_FDS,
        process::START_TIME,
    ];
    let histograms = [xds::CONVERGENCE, xds::PUSH_TIME, xds::CONFIG_SIZE];
    let exported = |series: &str| {
        counters_and_gauges.contains(&series)
            || histograms.iter().any(|h| {
                HISTOGRAM_SERIES
                    .iter()
                    .any(|suffix| series.strip_suffix(suffix) == Some(*h))
            })
    };

    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let names = regex::Regex::new(r"\b(pilot|citadel|envoy|process)_[a-z0-9_]+").expect("regex");
    let mut seen = std::collections::BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let found: Vec<&str> = names.find_iter(expr).map(|m| m.as_str()).collect();
            assert!(!found.is_empty(), "{expr} names no metric");
            for series in found {
                assert!(
                    exported(series),
                    "{series} (in {expr}) is not a metric meshd exports"
                );
                seen.insert(series.to_string());
            }
        }
    }
    // The dashboard shows the xDS side and the CA side.
    assert!(seen.iter().any(|s| s.starts_with("pilot_")));
    assert!(seen.iter().any(|s| s.starts_with("citadel_")));
}
