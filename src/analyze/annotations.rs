//! Annotations in Istio's domain (`*.istio.io/...`) that Istio does not
//! define (`IST0108` UnknownAnnotation: a misspelt `sidecar.istio.io/inject`
//! does nothing, silently), and the `galley.istio.io/analyze-suppress`
//! annotation through which a resource silences findings about itself.

use super::{Finding, Level};
use crate::config::ConfigSnapshot;

/// The annotations Istio defines (its `annotation` package), and meshd's.
const KNOWN: &[&str] = &[
    "alpha.istio.io/canonical-serviceaccounts",
    "alpha.istio.io/identity",
    "alpha.istio.io/kubernetes-serviceaccounts",
    "ambient.istio.io/bypass-inbound-capture",
    "ambient.istio.io/dns-capture",
    "ambient.istio.io/redirection",
    "galley.istio.io/analyze-suppress",
    "gateway.istio.io/controller-version",
    "gateway.istio.io/service-account",
    "inject.istio.io/templates",
    "install.operator.istio.io/chart-owner",
    "install.operator.istio.io/owner-generation",
    "install.operator.istio.io/version",
    "istio.io/dry-run",
    "istio.io/autoRegistrationGroup",
    "istio.io/connectedAt",
    "istio.io/disconnectedAt",
    "istio.io/workloadController",
    "istio.io/rev",
    "istio.io/use-waypoint",
    "istio.io/waypoint-for",
    "networking.istio.io/address-type",
    "networking.istio.io/exportTo",
    "networking.istio.io/service-type",
    "networking.istio.io/traffic-distribution",
    "prometheus.istio.io/merge-metrics",
    "proxy.istio.io/config",
    "proxy.istio.io/overrides",
    "readiness.status.sidecar.istio.io/applicationPorts",
    "readiness.status.sidecar.istio.io/failureThreshold",
    "readiness.status.sidecar.istio.io/initialDelaySeconds",
    "readiness.status.sidecar.istio.io/periodSeconds",
    "sidecar.istio.io/agentLogLevel",
    "sidecar.istio.io/bootstrapOverride",
    "sidecar.istio.io/componentLogLevel",
    "sidecar.istio.io/controlPlaneAuthPolicy",
    "sidecar.istio.io/discoveryAddress",
    "sidecar.istio.io/enableCoreDump",
    "sidecar.istio.io/extraStatTags",
    "sidecar.istio.io/inject",
    "sidecar.istio.io/interceptionMode",
    "sidecar.istio.io/logLevel",
    "sidecar.istio.io/nativeSidecar",
    "sidecar.istio.io/proxyCPU",
    "sidecar.istio.io/proxyCPULimit",
    "sidecar.istio.io/proxyImage",
    "sidecar.istio.io/proxyImageType",
    "sidecar.istio.io/proxyMemory",
    "sidecar.istio.io/proxyMemoryLimit",
    "sidecar.istio.io/rewriteAppHTTPProbers",
    "sidecar.istio.io/statsCompression",
    "sidecar.istio.io/statsFlushInterval",
    "sidecar.istio.io/statsHistogramBuckets",
    "sidecar.istio.io/statsInclusionPrefixes",
    "sidecar.istio.io/statsInclusionRegexps",
    "sidecar.istio.io/statsInclusionSuffixes",
    "sidecar.istio.io/status",
    "sidecar.istio.io/userVolume",
    "sidecar.istio.io/userVolumeMount",
    "status.sidecar.istio.io/port",
    "topology.istio.io/controlPlaneClusters",
    "traffic.istio.io/nodeSelector",
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/excludeInterfaces",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.sidecar.istio.io/includeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
    "traffic.sidecar.istio.io/includeOutboundPorts",
    "traffic.sidecar.istio.io/kubevirtInterfaces",
];

/// `IST0108` for each annotation of Istio's domain that Istio does not know.
pub(super) fn unknown(config: &ConfigSnapshot, out: &mut Vec<Finding>) {
    for (key, entry) in &config.resources {
        let annotations = entry.resource.metadata().annotations.iter().flatten();
        for (name, _) in annotations {
            let domain = name.split_once('/').map_or("", |(d, _)| d);
            let istio = domain == "istio.io" || domain.ends_with(".istio.io");
            if istio && !KNOWN.contains(&name.as_str()) {
                let near = KNOWN
                    .iter()
                    .map(|k| (distance(k, name), k))
                    .filter(|(d, _)| *d <= 2)
                    .min()
                    .map(|(_, k)| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                out.push(Finding::about(
                    Level::Warning,
                    "IST0108",
                    key,
                    entry,
                    format!("Unknown annotation: {name}{near}; it has no effect"),
                ));
            }
        }
    }
}

/// Edit distance, case-insensitive (a misspelt annotation is near its
/// intended name).
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (
        a.to_ascii_lowercase().chars().collect(),
        b.to_ascii_lowercase().chars().collect(),
    );
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut diagonal = row[0];
        row[0] = i;
        for j in 1..=b.len() {
            let above = row[j];
            row[j] = (above + 1)
                .min(row[j - 1] + 1)
                .min(diagonal + usize::from(a[i - 1] != b[j - 1]));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Drops the findings a resource suppresses with
/// `galley.istio.io/analyze-suppress: CODE,CODE` (or `*`).
pub(super) fn suppressed(config: &ConfigSnapshot, findings: &mut Vec<Finding>) {
    let silenced: Vec<(String, Vec<String>)> = config
        .resources
        .iter()
        .filter_map(|(key, entry)| {
            let codes = entry
                .resource
                .metadata()
                .annotations
                .as_ref()?
                .get("galley.istio.io/analyze-suppress")?;
            Some((
                key.to_string(),
                codes.split(',').map(|c| c.trim().to_string()).collect(),
            ))
        })
        .collect();
    if silenced.is_empty() {
        return;
    }
    findings.retain(|f| {
        !silenced
            .iter()
            .any(|(resource, codes)| *resource == f.resource && codes.iter().any(|c| c == "*" || c == f.code))
    });
}

#[cfg(test)]
mod tests {
    use crate::config::{parse_file, ConfigSnapshot};

    fn findings(yaml: &str) -> Vec<String> {
        let config = ConfigSnapshot::from_files(vec![parse_file("a.yaml", yaml)]);
        crate::analyze::analyze(&config)
            .iter()
            .filter(|f| f.code == "IST0108")
            .map(|f| f.message.clone())
            .collect()
    }

    #[test]
    fn a_misspelt_istio_annotation_is_reported_and_can_be_suppressed() {
        let pod = |annotations: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {{{annotations}}}\n\
                 spec: {{containers: [{{name: c}}]}}\n"
            )
        };
        assert_eq!(
            findings(&pod("sidecar.istio.io/injet: 'true', example.com/x: y")),
            ["Unknown annotation: sidecar.istio.io/injet (did you mean sidecar.istio.io/inject?); it has no effect"]
        );
        assert!(findings(&pod(
            "sidecar.istio.io/inject: 'false', proxy.istio.io/config: '{}'"
        ))
        .is_empty());
        assert!(findings(&pod(
            "sidecar.istio.io/injet: 'true', galley.istio.io/analyze-suppress: 'IST0108'"
        ))
        .is_empty());
    }
}
