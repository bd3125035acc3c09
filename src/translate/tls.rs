//! Gateway TLS: the DownstreamTlsContext of a terminating server, the SDS
//! Secrets it names (`kubernetes://NAME`, `kubernetes://NAME-cacert`, as
//! Istio names them), and the SNI filter chains of PASSTHROUGH servers.
//! Key material only ever travels in Secrets over SDS, never in listeners.

use envoy_types::pb::envoy::config::core::v3::{data_source, transport_socket, DataSource, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, FilterChainMatch};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, subject_alt_name_matcher, tls_parameters, CertificateValidationContext,
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher, TlsCertificate,
    TlsParameters,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::gateway::{binds, intersect, BoundServer};
use super::route::destination_cluster;
use super::{ads, Diagnostic};
use crate::ca::workload::{DEFAULT_SECRET, ROOT_SECRET};
use crate::config::istio::ServerTlsSettings;
use crate::model::{Proxy, PushContext};

/// What a Gateway server's `tls.mode` asks of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Terminate TLS with the server's certificate.
    Simple,
    /// Terminate, and require a client certificate signed by the CA.
    Mutual,
    /// Terminate, and check a client certificate when one is offered.
    OptionalMutual,
    /// Terminate with the gateway's own workload certificate (SDS
    /// `default`) and require a client certificate from the mesh (`ROOTCA`).
    IstioMutual,
    /// Route the still-encrypted stream by SNI (VirtualService `tls:`).
    Passthrough,
    /// Route by SNI names of Istio's `outbound_.PORT_._.HOST` form.
    AutoPassthrough,
}

impl Mode {
    /// The mode a server's settings ask for. Istio's default is PASSTHROUGH.
    pub fn of(tls: &ServerTlsSettings) -> Option<Mode> {
        Some(match tls.mode.as_deref().unwrap_or("PASSTHROUGH") {
            "SIMPLE" => Mode::Simple,
            "MUTUAL" => Mode::Mutual,
            "OPTIONAL_MUTUAL" => Mode::OptionalMutual,
            "ISTIO_MUTUAL" => Mode::IstioMutual,
            "PASSTHROUGH" => Mode::Passthrough,
            "AUTO_PASSTHROUGH" => Mode::AutoPassthrough,
            _ => return None,
        })
    }

    /// Whether the gateway terminates TLS in this mode.
    pub fn terminates(self) -> bool {
        matches!(
            self,
            Mode::Simple | Mode::Mutual | Mode::OptionalMutual | Mode::IstioMutual
        )
    }
}

struct ServerContext<'a> {
    bound: &'a BoundServer<'a>,
    diags: &'a mut Vec<Diagnostic>,
}

impl ServerContext<'_> {
    fn diag(&mut self, field: &str, message: String) {
        let gw = self.bound.gateway;
        self.diags.push(Diagnostic {
            resource: format!("Gateway {}/{}", gw.namespace(), gw.name()),
            field: format!("spec.servers[{}].tls{field}", self.bound.index),
            message,
        });
    }
}

pub(super) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads()),
    }
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

fn file(path: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    })
}

/// The SDS Secret `name` (`kubernetes://NAME`, or for a certificate a
/// Gateway API listener reads from another namespace
/// `kubernetes-gateway://NS/NAME`) holding a credential's certificate
/// chain and key, inline.
fn server_secret(name: String, c: &crate::model::ServerCredential) -> Secret {
    Secret {
        name,
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&c.cert_chain),
            private_key: inline(&c.key),
            ..Default::default()
        })),
    }
}

/// Where a server's `credentialName` is read from, and the name its SDS
/// secret goes by: a Secret of the gateway proxy's namespace, as Istio
/// reads it, or for a Gateway API listener whose certificate another
/// namespace grants it (`kubernetes-gateway://NS/NAME`), that Secret.
/// `None` (with a diagnostic) when the grant is not there.
fn credential_source<'a>(
    push: &PushContext,
    bound: &BoundServer<'_>,
    proxy_namespace: &'a str,
    credential: &'a str,
    ctx: &mut ServerContext<'_>,
) -> Option<(&'a str, &'a str, String)> {
    use crate::model::gateway_api::{may_read_secret, CROSS_NAMESPACE_CREDENTIAL};
    let Some(reference) = credential.strip_prefix(CROSS_NAMESPACE_CREDENTIAL) else {
        return Some((proxy_namespace, credential, format!("kubernetes://{credential}")));
    };
    match reference.split_once('/') {
        Some((ns, name)) if may_read_secret(&push.config, bound.gateway, ns, name) => {
            Some((ns, name, credential.to_string()))
        }
        _ => {
            ctx.diag(
                ".credentialName",
                format!(
                    "{credential}: only a Gateway API listener may name a Secret of another namespace, and only \
                     one that a ReferenceGrant there allows; the server is left out"
                ),
            );
            None
        }
    }
}

/// The transport socket of a terminating server, adding the Secrets it
/// names to `secrets`. `None` (with a diagnostic) when its certificate or
/// CA is missing or unusable: the server is then left out.
pub fn downstream_transport(
    push: &PushContext,
    proxy: &Proxy,
    bound: &BoundServer<'_>,
    mode: Mode,
    diags: &mut Vec<Diagnostic>,
    out_secrets: &mut Vec<Secret>,
) -> Option<TransportSocket> {
    let tls = bound.server.tls.as_ref()?;
    let mut ctx = ServerContext { bound, diags };
    if mode == Mode::IstioMutual {
        return istio_mutual(proxy, tls, &mut ctx);
    }
    // Kept aside until the server is known to be served.
    let mut secrets = Vec::new();
    // `credentialName`, or the certificates of `credentialNames` (one RSA
    // and one ECDSA, say: Envoy presents the one the client can verify).
    let credentials: Vec<&String> = tls.credential_name.iter().chain(&tls.credential_names).collect();
    let credential = credentials.first().map(|c| c.to_string());
    let cert_secrets: Vec<String> = match (&credential, &tls.server_certificate, &tls.private_key) {
        (Some(_), _, _) => {
            let mut names = Vec::new();
            for name in credentials {
                let (namespace, secret, sds_name) =
                    credential_source(push, bound, &proxy.namespace, name, &mut ctx)?;
                match push.credentials.server(namespace, secret) {
                    Ok(c) => {
                        secrets.push(server_secret(sds_name.clone(), &c));
                        names.push(sds_name);
                    }
                    Err(e) => {
                        ctx.diag(".credentialName", format!("{e}; the server is left out"));
                        return None;
                    }
                }
            }
            names
        }
        (None, Some(cert), Some(key)) => {
            // Files on the gateway's own disk: Envoy reads them.
            let name = format!("file-cert:{cert}~{key}");
            secrets.push(Secret {
                name: name.clone(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: file(cert),
                    private_key: file(key),
                    ..Default::default()
                })),
            });
            vec![name]
        }
        _ => {
            ctx.diag(
                "",
                "a terminating server needs credentialName, or serverCertificate and privateKey; the server is left out"
                    .into(),
            );
            return None;
        }
    };
    let mut common = CommonTlsContext {
        tls_params: Some(tls_params(tls)),
        alpn_protocols: vec!["h2".into(), "http/1.1".into()],
        tls_certificate_sds_secret_configs: cert_secrets.iter().map(|name| sds(name)).collect(),
        ..Default::default()
    };
    let mutual = matches!(mode, Mode::Mutual | Mode::OptionalMutual);
    if mutual {
        let ca_secret = client_ca(push, proxy, tls, credential.as_deref(), &mut ctx, &mut secrets)?;
        common.validation_context_type = Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: tls
                            .subject_alt_names
                            .iter()
                            .flat_map(|s| san_matchers(s))
                            .collect(),
                        verify_certificate_spki: tls.verify_certificate_spki.clone(),
                        verify_certificate_hash: tls.verify_certificate_hash.clone(),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(&ca_secret)),
                    ..Default::default()
                },
            ),
        );
    }
    let context = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(BoolValue {
            value: mode == Mode::Mutual,
        }),
        ..Default::default()
    };
    out_secrets.append(&mut secrets);
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    })
}

/// ISTIO_MUTUAL: the gateway's workload certificate and the mesh root, both
/// delivered by meshd's CA on the proxy's own stream.
fn istio_mutual(
    proxy: &Proxy,
    tls: &ServerTlsSettings,
    ctx: &mut ServerContext<'_>,
) -> Option<TransportSocket> {
    if proxy.identity.is_none() {
        ctx.diag(
            ".mode",
            "ISTIO_MUTUAL needs the gateway's workload certificate, and this proxy has no authenticated identity \
             (connect it to the TLS xDS port with a token or client certificate); the server is left out"
                .into(),
        );
        return None;
    }
    let common = CommonTlsContext {
        tls_params: Some(tls_params(tls)),
        alpn_protocols: vec!["h2".into(), "http/1.1".into()],
        ..istio_common_tls_context(Vec::new(), tls.subject_alt_names.clone())
    };
    let context = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    })
}

/// Istio mutual TLS: the proxy's own `default` certificate, the peer
/// checked against `ROOTCA` and, when given, its SPIFFE identities (URI
/// SANs) or other subject alt names.
pub fn istio_common_tls_context(spiffe_ids: Vec<String>, sans: Vec<String>) -> CommonTlsContext {
    let uri = |id: String| SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(id)),
            ignore_case: false,
        }),
        ..Default::default()
    };
    let matchers = spiffe_ids
        .into_iter()
        .map(uri)
        .chain(sans.iter().flat_map(|s| san_matchers(s)))
        .collect();
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(DEFAULT_SECRET)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: matchers,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

/// For TLS originated with `credentialName`: the client certificate's SDS
/// name (MUTUAL only) and the CA's, adding their Secrets (from the proxy's
/// namespace) to `secrets`; `None` with the reasons in `diags`.
pub(super) fn credential_secrets(
    push: &PushContext,
    namespace: &str,
    name: &str,
    mutual: bool,
    secrets: &mut Vec<Secret>,
    diags: &mut Vec<String>,
) -> Option<(Option<String>, String)> {
    let cert = if mutual {
        match push.credentials.server(namespace, name) {
            Ok(c) => {
                let sds_name = format!("kubernetes://{name}");
                secrets.push(server_secret(sds_name.clone(), &c));
                Some(sds_name)
            }
            Err(e) => {
                diags.push(format!("{e}; TLS origination is left out"));
                return None;
            }
        }
    } else {
        None
    };
    match push.credentials.client_ca(namespace, name) {
        Ok((_, bundle)) => {
            let ca = format!("kubernetes://{name}-cacert");
            secrets.push(Secret {
                name: ca.clone(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(&bundle),
                    ..Default::default()
                })),
            });
            Some((cert, ca))
        }
        Err(e) => {
            diags.push(format!("{e}; TLS origination is left out"));
            None
        }
    }
}

/// The SDS name of the client CA, adding its Secret.
fn client_ca(
    push: &PushContext,
    proxy: &Proxy,
    tls: &ServerTlsSettings,
    credential: Option<&str>,
    ctx: &mut ServerContext<'_>,
    secrets: &mut Vec<Secret>,
) -> Option<String> {
    let (name, trusted_ca) = match (credential, &tls.ca_certificates) {
        (Some(cred), _) => match push.credentials.client_ca(&proxy.namespace, cred) {
            Ok((_, bundle)) => (format!("kubernetes://{cred}-cacert"), inline(&bundle)),
            Err(e) => {
                ctx.diag(
                    ".credentialName",
                    format!("{e}: MUTUAL needs a CA (cacert or ca.crt in {cred}, or a Secret {cred}-cacert); the server is left out"),
                );
                return None;
            }
        },
        (None, Some(path)) => (format!("file-root:{path}"), file(path)),
        (None, None) => {
            ctx.diag(
                ".caCertificates",
                "MUTUAL needs caCertificates or credentialName; the server is left out".into(),
            );
            return None;
        }
    };
    secrets.push(Secret {
        name: name.clone(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca,
            ..Default::default()
        })),
    });
    Some(name)
}

pub(super) fn san_matchers(san: &str) -> Vec<SubjectAltNameMatcher> {
    let exact = |t: subject_alt_name_matcher::SanType| SubjectAltNameMatcher {
        san_type: t as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(san.to_string())),
            ignore_case: false,
        }),
        ..Default::default()
    };
    if san.contains("://") {
        vec![exact(subject_alt_name_matcher::SanType::Uri)]
    } else {
        vec![exact(subject_alt_name_matcher::SanType::Dns)]
    }
}

fn tls_params(tls: &ServerTlsSettings) -> TlsParameters {
    use tls_parameters::TlsProtocol;
    let version = |v: Option<&str>, default: TlsProtocol| match v {
        Some("TLSV1_0") => TlsProtocol::TlSv10,
        Some("TLSV1_1") => TlsProtocol::TlSv11,
        Some("TLSV1_2") => TlsProtocol::TlSv12,
        Some("TLSV1_3") => TlsProtocol::TlSv13,
        Some("TLS_AUTO") => TlsProtocol::TlsAuto,
        _ => default,
    };
    TlsParameters {
        // Istio's gateway default: TLS 1.2 at least.
        tls_minimum_protocol_version: version(tls.min_protocol_version.as_deref(), TlsProtocol::TlSv12)
            as i32,
        tls_maximum_protocol_version: version(tls.max_protocol_version.as_deref(), TlsProtocol::TlsAuto)
            as i32,
        cipher_suites: tls.cipher_suites.clone(),
        ..Default::default()
    }
}

/// SNI filter chains of a PASSTHROUGH server: one per VirtualService TLS
/// route match bound to the Gateway, forwarding the encrypted stream.
pub fn passthrough_chains(
    push: &PushContext,
    proxy: &Proxy,
    bound: &BoundServer<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<FilterChain> {
    let gw = bound.gateway;
    let mut chains = Vec::new();
    for vs in push.virtual_services.iter().filter(|vs| binds(vs, gw)) {
        for (i, rule) in vs.spec.tls.iter().enumerate() {
            for m in &rule.matches {
                let gateway_ok = m.gateways.is_empty()
                    || m.gateways.iter().any(|g| {
                        super::gateway::resolve_gateway_ref(g, vs.namespace())
                            == Some((gw.namespace().to_string(), gw.name().to_string()))
                    });
                if !gateway_ok || m.port.is_some_and(|p| p != u32::from(bound.port)) {
                    continue;
                }
                let mut names: Vec<String> = m
                    .sni_hosts
                    .iter()
                    .flat_map(|sni| {
                        bound
                            .server
                            .hosts
                            .iter()
                            .filter_map(|h| intersect(vs, sni, gw, h))
                    })
                    .collect();
                names.sort();
                names.dedup();
                if names.is_empty() {
                    continue;
                }
                let mut clusters = Vec::new();
                for (j, dest) in rule.route.iter().enumerate() {
                    let Some(d) = &dest.destination else { continue };
                    let field = format!("spec.tls[{i}].route[{j}].destination");
                    if let Some(c) = destination_cluster(push, vs, &field, d, diags) {
                        clusters.push((
                            c,
                            if rule.route.len() == 1 {
                                1
                            } else {
                                dest.weight.max(0) as u32
                            },
                        ));
                    }
                }
                if clusters.is_empty() {
                    continue;
                }
                let tunnel = super::cluster::tunnel(push, proxy, &clusters);
                chains.push(sni_chain(names, clusters, tunnel));
            }
        }
    }
    chains
}

/// AUTO_PASSTHROUGH: one chain per service port and DestinationRule
/// subset, matched on Istio's SNI form `outbound_.PORT_.SUBSET_.HOST`
/// (`outbound_.PORT_._.HOST` without one), forwarding to that cluster's SNI-DNAT twin, which
/// the cluster translation adds for gateways with such a server
/// (`ClusterView::sni_dnat`).
pub fn auto_passthrough_chains(push: &PushContext, proxy: &Proxy) -> Vec<FilterChain> {
    let scope = crate::model::sidecar_scope::SidecarScope::default();
    let mut chains = Vec::new();
    for service in super::cluster::services(push, proxy, &scope, None) {
        let svc = service.service;
        let subsets = service.rule.into_iter().flat_map(|r| &r.spec.subsets);
        let subsets: Vec<&str> = std::iter::once("")
            .chain(subsets.map(|s| s.name.as_str()))
            .collect();
        for port in svc
            .ports
            .iter()
            .filter(|p| p.protocol.eq_ignore_ascii_case("TCP"))
        {
            for subset in &subsets {
                let cluster = super::outbound_cluster_name(port.port, subset, &svc.hostname);
                let sni = super::cluster::sni_dnat_name(&cluster);
                chains.push(sni_chain(vec![sni.clone()], vec![(sni, 1)], None));
            }
        }
    }
    chains
}

/// A chain forwarding TCP to one cluster or several by weight; `None`
/// without a cluster.
pub(super) fn tcp_chain(
    clusters: Vec<(String, u32)>,
    tunnel: Option<tcp_proxy::TunnelingConfig>,
) -> Option<FilterChain> {
    if clusters.is_empty() {
        return None;
    }
    let mut chain = sni_chain(Vec::new(), clusters, tunnel);
    chain.filter_chain_match = None;
    Some(chain)
}

pub(super) fn sni_chain(
    server_names: Vec<String>,
    mut clusters: Vec<(String, u32)>,
    tunnel: Option<tcp_proxy::TunnelingConfig>,
) -> FilterChain {
    let stat_prefix = clusters.first().map(|c| c.0.clone()).unwrap_or_default();
    let specifier = if clusters.len() == 1 {
        tcp_proxy::ClusterSpecifier::Cluster(clusters.remove(0).0)
    } else {
        tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: clusters
                .into_iter()
                .filter(|(_, w)| *w > 0)
                .map(|(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                    name,
                    weight,
                    ..Default::default()
                })
                .collect(),
        })
    };
    let proxy = TcpProxy {
        stat_prefix,
        cluster_specifier: Some(specifier),
        tunneling_config: tunnel,
        ..Default::default()
    };
    FilterChain {
        name: format!("sni:{}", server_names.join(",")),
        filter_chain_match: Some(FilterChainMatch {
            server_names,
            transport_protocol: "tls".into(),
            ..Default::default()
        }),
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(proxy))),
        }],
        ..Default::default()
    }
}
