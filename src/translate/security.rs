//! Request policies as stock Envoy HTTP filters, in Istio's order ahead of
//! the router: `jwt_authn` for the RequestAuthentications that apply (a bad
//! token is refused with 401, a missing one passes), then RBAC for the
//! AuthorizationPolicies: AUDIT (Envoy's LOG), DENY, then ALLOW (403). TCP
//! chains get the network RBAC filter with what TCP traffic can be judged
//! on (peer identity, namespace, addresses, ports), as Istio does.
//!
//! Identities come from where Envoy has them: the peer certificate's URI SAN
//! (the SPIFFE identity meshd's CA issued) for `principals` and
//! `namespaces`; the verified token's payload, which `jwt_authn` keeps in
//! dynamic metadata under `payload`, for `requestPrincipals` (`iss/sub`)
//! and `request.auth.claims[...]`.
//!
//! Envoy's RBAC and jwt_authn configs hold maps; protobuf encodes a map as
//! a repeated entry message, and they are written that way here, in name
//! order, so the same policies always encode to the same bytes.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::accesslog::v3::{access_log_filter, AccessLogFilter, MetadataFilter};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    data_source, http_uri, transport_socket, CidrRange, DataSource, HttpUri, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, Permission, Policy, Principal, SourcedMetadata,
};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, route_match, HeaderMatcher, RouteMatch};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider, jwt_requirement, requirement_rule, JwksAsyncFetch, JwtClaimToHeader, JwtHeader,
    JwtProvider, JwtRequirement, JwtRequirementOrList, RemoteJwks, RequirementRule,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter, LocalReplyConfig, ResponseMapper,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CertificateValidationContext, CommonTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    list_matcher, metadata_matcher, path_matcher, string_matcher, value_matcher, ListMatcher,
    MetadataMatcher, OrMatcher, PathMatcher, RegexMatcher, StringMatcher, ValueMatcher,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Empty, UInt32Value};
use envoy_types::util::pack_any;

use super::{duration, socket, Diagnostic, Generated};
use crate::config::security::{cidr, Condition, Operation, Rule, Source};
use crate::config::{parse_duration, AuthorizationPolicy, RequestAuthentication};
use crate::model::request_policy;
use crate::model::PushContext;

/// Envoy's JWT filter; also the dynamic metadata namespace of the payload.
pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// Where a verified token's payload is kept in the JWT filter's metadata.
const PAYLOAD: &str = "payload";
/// Where a token's verification failure is kept (`code`, `message`).
const FAILURE: &str = "failure";
/// Envoy's message for a token of an audience the provider does not take.
const AUDIENCE_NOT_ALLOWED: &str = "Audiences in Jwt are not allowed";
const RBAC_FILTER: &str = "envoy.filters.http.rbac";
const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";

/// Envoy answers a token of the wrong audience with 403, every other bad
/// token with 401; Istio's users (and RFC 6750) expect 401 for any token
/// that does not verify. The connection manager of a proxy that checks
/// tokens rewrites that one local reply to 401.
pub fn local_reply() -> LocalReplyConfig {
    let matcher = MetadataMatcher {
        filter: JWT_FILTER.into(),
        path: [FAILURE, "message"]
            .iter()
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(k.to_string())),
            })
            .collect(),
        value: Some(ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::StringMatch(string_match(
                AUDIENCE_NOT_ALLOWED,
                false,
            ))),
        }),
        invert: false,
    };
    LocalReplyConfig {
        mappers: vec![ResponseMapper {
            filter: Some(AccessLogFilter {
                filter_specifier: Some(access_log_filter::FilterSpecifier::MetadataFilter(
                    MetadataFilter {
                        matcher: Some(matcher),
                        match_if_key_not_found: Some(BoolValue { value: false }),
                    },
                )),
            }),
            status_code: Some(UInt32Value { value: 401 }),
            ..Default::default()
        }],
        ..Default::default()
    }
}
/// Where Debian and Envoy's images keep the public CA bundle that an
/// `https://` jwksUri is verified against.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The filters the request policies of one workload need: HTTP filters
/// for its HTTP chains, network filters for its TCP chains.
#[derive(Debug, Clone, Default)]
pub struct PolicyFilters {
    pub http: Vec<HttpFilter>,
    pub tcp: Vec<Filter>,
    /// What the TCP filters leave unchecked (a CUSTOM policy whose
    /// provider speaks HTTP only), reported where a TCP chain is served.
    pub tcp_unchecked: Vec<Diagnostic>,
}

impl PolicyFilters {
    /// A TCP chain of the workload, its policy filters in front of
    /// `chain`'s; what they leave unchecked goes into `diagnostics`.
    pub fn guard_tcp(&self, mut chain: FilterChain, diagnostics: &mut Vec<Diagnostic>) -> FilterChain {
        diagnostics.extend(self.tcp_unchecked.iter().cloned());
        chain.filters.splice(0..0, self.tcp.iter().cloned());
        chain
    }
}

/// The filters the policies that apply to a workload of `namespace` with
/// `labels` need, in order; JWKS clusters go into `out`.
pub fn filters(
    push: &PushContext,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    out: &mut Generated,
) -> PolicyFilters {
    let mut filters = PolicyFilters::default();
    let authentications = request_policy::applying(&push.request_authentications, namespace, labels);
    if let Some(f) = jwt_filter(&authentications, out) {
        filters.http.push(f);
    }
    let policies = request_policy::applying(&push.authorization_policies, namespace, labels);
    let custom: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| p.spec.action() == "CUSTOM")
        .map(|p| &***p)
        .collect();
    if !custom.is_empty() {
        custom_filters(push, &custom, out, &mut filters);
    }
    for (action, envoy_action) in [("AUDIT", 2), ("DENY", 1), ("ALLOW", 0)] {
        let of_action: Vec<&AuthorizationPolicy> = policies
            .iter()
            .filter(|p| p.spec.action() == action)
            .map(|p| &***p)
            .collect();
        if of_action.is_empty() {
            continue;
        }
        if let Some(rules) = rbac_rules(&of_action, action, envoy_action, false, &mut out.diagnostics) {
            filters
                .http
                .push(rbac_http_filter(&RbacFilterConfig { rules: Some(rules) }));
        }
        let mut quiet = Vec::new(); // the HTTP pass reported what applies to both
        if let Some(rules) = rbac_rules(&of_action, action, envoy_action, true, &mut quiet) {
            filters.tcp.push(rbac_network_filter(&NetworkRbacConfig {
                rules: Some(rules),
                stat_prefix: TCP_STAT_PREFIX.into(),
                ..Default::default()
            }));
        }
    }
    filters
}

/// The prefix of the network filters' statistics, as Istio's.
const TCP_STAT_PREFIX: &str = "tcp.";

fn rbac_network_filter(config: &NetworkRbacConfig) -> Filter {
    Filter {
        name: NETWORK_RBAC_FILTER.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(
            "envoy.extensions.filters.network.rbac.v3.RBAC",
            config,
        ))),
    }
}

/// CUSTOM policies, as Istio builds them: an RBAC filter whose shadow
/// rules mark the requests (on TCP chains, the connections) the policies'
/// rules match, and the external authorization filter of the provider,
/// enabled only for what is marked. A workload takes one provider; a
/// provider the mesh config does not define denies what its rules match
/// (fail closed). An HTTP provider cannot check a TCP connection: TCP
/// chains are left unchecked then, as Istio leaves them, and each one
/// served says so. A rule's fields that TCP does not carry are dropped on
/// TCP chains, so the rule matches more there (sends more to the
/// authorizer), and a rule meshd cannot express matches everything: what
/// is in doubt is checked.
fn custom_filters(
    push: &PushContext,
    policies: &[&AuthorizationPolicy],
    out: &mut Generated,
    filters: &mut PolicyFilters,
) {
    let name_of = |ap: &AuthorizationPolicy| {
        ap.spec
            .provider
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default()
    };
    let chosen = name_of(policies[0]);
    let resource = |ap: &AuthorizationPolicy| format!("AuthorizationPolicy {}/{}", ap.namespace(), ap.name());
    let mut same = Vec::new();
    for ap in policies {
        if name_of(ap) == chosen {
            same.push(*ap);
        } else {
            out.diagnostics.push(Diagnostic {
                resource: resource(ap),
                field: "spec.provider.name".into(),
                message: format!(
                    "a workload takes one CUSTOM provider; {chosen:?} is used and this policy is left out"
                ),
            });
        }
    }
    let provider = push.mesh.provider(&chosen);
    let service = provider.and_then(|p| {
        p.envoy_ext_authz_http
            .as_ref()
            .map(|h| (h.service.as_str(), h.port, false))
            .or(p
                .envoy_ext_authz_grpc
                .as_ref()
                .map(|g| (g.service.as_str(), g.port, true)))
    });
    let (Some(provider), Some((host, port, grpc))) = (provider, service) else {
        for ap in &same {
            out.diagnostics.push(Diagnostic {
                resource: resource(ap),
                field: "spec.provider.name".into(),
                message: format!(
                    "no extensionProviders entry {chosen:?} with envoyExtAuthzHttp or envoyExtAuthzGrpc in the mesh config (--mesh-config): what the policy's rules match is denied"
                ),
            });
        }
        if let Some(rules) = rbac_rules(&same, "DENY", 1, false, &mut out.diagnostics) {
            filters
                .http
                .push(rbac_http_filter(&RbacFilterConfig { rules: Some(rules) }));
        }
        let mut quiet = Vec::new(); // the HTTP pass reported the rules
        if let Some(rules) = rbac_rules(&same, "DENY", 1, true, &mut quiet) {
            filters.tcp.push(rbac_network_filter(&NetworkRbacConfig {
                rules: Some(rules),
                stat_prefix: TCP_STAT_PREFIX.into(),
                ..Default::default()
            }));
        }
        return;
    };
    let marked = |tcp: bool, diagnostics: &mut Vec<Diagnostic>| {
        let mut rules = rbac_rules(&same, "CUSTOM", 1, tcp, diagnostics)?;
        for entry in rules.policies.iter_mut() {
            entry.key = format!("{EXT_AUTHZ_POLICY}-{}", entry.key);
        }
        Some(rules)
    };
    let Some(rules) = marked(false, &mut out.diagnostics) else {
        return;
    };
    filters.http.push(rbac_http_filter(&ShadowRbacConfig {
        shadow_rules: Some(rules),
        shadow_rules_stat_prefix: EXT_AUTHZ_PREFIX.into(),
    }));
    let cluster_name = format!("extauthz|{host}|{port}");
    if !out.clusters.iter().any(|c| c.name == cluster_name) {
        if let Some(mut cluster) = uri_cluster(&format!("http://{host}:{port}"), "extauthz") {
            if grpc {
                super::cluster::http2(&mut cluster);
            }
            out.clusters.push(cluster);
        }
    }
    filters
        .http
        .extend(ext_authz_filter(provider, &cluster_name, host, port));
    let Some(rules) = marked(true, &mut Vec::new()) else {
        return;
    };
    match tcp_ext_authz_filter(provider, &cluster_name, host) {
        Some(check) => {
            filters.tcp.push(rbac_network_filter(&NetworkRbacConfig {
                shadow_rules: Some(rules),
                shadow_rules_stat_prefix: EXT_AUTHZ_PREFIX.into(),
                stat_prefix: TCP_STAT_PREFIX.into(),
                ..Default::default()
            }));
            filters.tcp.push(check);
        }
        None => filters.tcp_unchecked.extend(same.iter().map(|ap| Diagnostic {
            resource: resource(ap),
            field: "spec.provider.name".into(),
            message: format!(
                "{chosen:?} is an envoyExtAuthzHttp provider, which checks HTTP requests only: \
                 TCP connections to this workload are not sent to it (as in Istio); \
                 an envoyExtAuthzGrpc provider checks both"
            ),
        })),
    }
}

/// Where Istio's shadow rules put the policy they matched, and the prefix
/// of the policies that send a request to the external authorizer.
const EXT_AUTHZ_PREFIX: &str = "istio_ext_authz_";
const EXT_AUTHZ_POLICY: &str = "istio-ext-authz";

fn rbac_http_filter(config: &impl prost::Message) -> HttpFilter {
    HttpFilter {
        name: RBAC_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            config,
        ))),
        ..Default::default()
    }
}

/// The external authorization filter of a provider, enabled for requests
/// the CUSTOM shadow rules marked.
fn ext_authz_filter(
    provider: &crate::config::mesh::ExtensionProvider,
    cluster: &str,
    host: &str,
    port: u16,
) -> Option<HttpFilter> {
    use envoy_types::pb::envoy::config::core::v3::ApiVersion;
    use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
        ext_authz, AuthorizationRequest, AuthorizationResponse, ExtAuthz, HttpService,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::ListStringMatcher;
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    let timeout = |t: Option<&String>| duration(provider_timeout(t));
    let status = |s: Option<&String>| {
        s.and_then(|s| s.parse::<i32>().ok())
            .map(|code| HttpStatus { code })
    };
    let names = |headers: &[String]| {
        (!headers.is_empty()).then(|| ListStringMatcher {
            patterns: headers.iter().map(|h| string_match(h, true)).collect(),
        })
    };
    let http = provider.envoy_ext_authz_http.as_ref();
    let grpc = provider.envoy_ext_authz_grpc.as_ref();
    let (services, fail_open, status_on_error) = match (http, grpc) {
        (Some(h), _) => (
            ext_authz::Services::HttpService(HttpService {
                server_uri: Some(HttpUri {
                    uri: format!("http://{host}:{port}"),
                    timeout: Some(timeout(h.timeout.as_ref())),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster.to_string())),
                }),
                path_prefix: h.path_prefix.clone().unwrap_or_default(),
                #[allow(deprecated)] // allowed_headers moved to ExtAuthz, where it is set
                authorization_request: Some(AuthorizationRequest {
                    allowed_headers: None,
                    headers_to_add: h
                        .include_additional_headers_in_check
                        .iter()
                        .map(|(k, v)| envoy_types::pb::envoy::config::core::v3::HeaderValue {
                            key: k.clone(),
                            value: v.clone(),
                            ..Default::default()
                        })
                        .collect(),
                }),
                authorization_response: Some(AuthorizationResponse {
                    allowed_upstream_headers: names(&h.headers_to_upstream_on_allow),
                    allowed_client_headers: names(&h.headers_to_downstream_on_deny),
                    allowed_client_headers_on_success: names(&h.headers_to_downstream_on_allow),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            h.fail_open,
            status(h.status_on_error.as_ref()),
        ),
        (None, Some(g)) => (
            ext_authz::Services::GrpcService(grpc_service(g, cluster, host)),
            g.fail_open,
            status(g.status_on_error.as_ref()),
        ),
        (None, None) => return None,
    };
    let allowed_headers = http.and_then(|h| names(&h.include_request_headers_in_check));
    let config = ExtAuthz {
        transport_api_version: ApiVersion::V3 as i32,
        allowed_headers,
        services: Some(services),
        failure_mode_allow: fail_open,
        status_on_error,
        filter_enabled_metadata: Some(marked_by(RBAC_FILTER)),
        ..Default::default()
    };
    Some(HttpFilter {
        name: "envoy.filters.http.ext_authz".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(config))),
        ..Default::default()
    })
}

/// How long Envoy waits for the authorizer: the provider's `timeout`, else
/// Istio's default of ten minutes.
fn provider_timeout(timeout: Option<&String>) -> std::time::Duration {
    timeout
        .and_then(|t| parse_duration(t))
        .unwrap_or(std::time::Duration::from_secs(600))
}

/// The gRPC service of an `envoyExtAuthzGrpc` provider, through `cluster`.
fn grpc_service(
    provider: &crate::config::mesh::ExtAuthzGrpc,
    cluster: &str,
    host: &str,
) -> envoy_types::pb::envoy::config::core::v3::GrpcService {
    use envoy_types::pb::envoy::config::core::v3::{grpc_service, GrpcService};
    GrpcService {
        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
            grpc_service::EnvoyGrpc {
                cluster_name: cluster.to_string(),
                authority: host.to_string(),
                ..Default::default()
            },
        )),
        timeout: Some(duration(provider_timeout(provider.timeout.as_ref()))),
        ..Default::default()
    }
}

/// The network external authorization filter of a gRPC provider, enabled
/// for the connections the CUSTOM shadow rules marked; `None` for an HTTP
/// provider, which cannot check a connection.
fn tcp_ext_authz_filter(
    provider: &crate::config::mesh::ExtensionProvider,
    cluster: &str,
    host: &str,
) -> Option<Filter> {
    use envoy_types::pb::envoy::config::core::v3::ApiVersion;
    use envoy_types::pb::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz;
    if provider.envoy_ext_authz_http.is_some() {
        return None;
    }
    let grpc = provider.envoy_ext_authz_grpc.as_ref()?;
    let config = ExtAuthz {
        stat_prefix: TCP_STAT_PREFIX.into(),
        grpc_service: Some(grpc_service(grpc, cluster, host)),
        failure_mode_allow: grpc.fail_open,
        transport_api_version: ApiVersion::V3 as i32,
        filter_enabled_metadata: Some(marked_by(NETWORK_RBAC_FILTER)),
        ..Default::default()
    };
    Some(Filter {
        name: "envoy.filters.network.ext_authz".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(config))),
    })
}

/// Matches what the CUSTOM shadow rules of the RBAC filter `filter`
/// marked for the external authorizer.
fn marked_by(filter: &str) -> MetadataMatcher {
    MetadataMatcher {
        filter: filter.into(),
        path: vec![metadata_matcher::PathSegment {
            segment: Some(metadata_matcher::path_segment::Segment::Key(format!(
                "{EXT_AUTHZ_PREFIX}shadow_effective_policy_id"
            ))),
        }],
        value: Some(ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix(EXT_AUTHZ_POLICY.into())),
                ignore_case: false,
            })),
        }),
        invert: false,
    }
}

/// The RBAC rules of the policies of one action, for HTTP or for TCP
/// traffic; `None` when there is nothing to enforce.
fn rbac_rules(
    policies: &[&AuthorizationPolicy],
    action: &str,
    envoy_action: i32,
    tcp: bool,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<RbacRules> {
    let mut entries = Vec::new();
    for ap in policies {
        for (i, rule) in ap.spec.rules.iter().enumerate() {
            let name = format!("ns[{}]-policy[{}]-rule[{i}]", ap.namespace(), ap.name());
            let resource = format!("AuthorizationPolicy {}/{}", ap.namespace(), ap.name());
            let rule = if tcp {
                match tcp_rule(rule) {
                    // Istio on TCP: an ALLOW rule with HTTP-only fields
                    // matches nothing; a DENY or AUDIT rule drops them and
                    // so matches more.
                    // CUSTOM rules are judged as DENY rules (so the
                    // authorizer sees more), as Istio does.
                    (_, true) if action == "ALLOW" => continue,
                    (stripped, _) => std::borrow::Cow::Owned(stripped),
                }
            } else {
                std::borrow::Cow::Borrowed(rule)
            };
            match rule_policy(&rule) {
                Ok(policy) => entries.push((name, policy)),
                Err(why) => {
                    // Istio fails closed: a DENY rule it cannot express
                    // denies everything; an ALLOW rule allows nothing.
                    let (message, fallback) = match action {
                        "DENY" => (
                            format!("{why}; the rule denies every request"),
                            Some(any_policy()),
                        ),
                        "CUSTOM" => (
                            format!("{why}; every request is sent to the external authorizer"),
                            Some(any_policy()),
                        ),
                        _ => (format!("{why}; the rule matches no request"), None),
                    };
                    diagnostics.push(Diagnostic {
                        resource,
                        field: format!("spec.rules[{i}]"),
                        message,
                    });
                    if let Some(p) = fallback {
                        entries.push((name, p));
                    }
                }
            }
        }
    }
    // An ALLOW policy without rules (or whose rules match nothing) still
    // counts: with no policy matching, everything is denied.
    if entries.is_empty() && action != "ALLOW" {
        return None;
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Some(RbacRules {
        action: envoy_action,
        policies: entries
            .into_iter()
            .map(|(key, value)| PolicyEntry {
                key,
                value: Some(value),
            })
            .collect(),
    })
}

/// A rule as TCP traffic can be judged: without the fields that only HTTP
/// carries (request principals, hosts, methods, paths, `request.*`
/// conditions); says whether it had any.
fn tcp_rule(rule: &Rule) -> (Rule, bool) {
    let mut had = false;
    let mut out = rule.clone();
    for from in out.from.iter_mut() {
        if let Some(s) = from.source.as_mut() {
            had |= !s.request_principals.is_empty() || !s.not_request_principals.is_empty();
            s.request_principals.clear();
            s.not_request_principals.clear();
        }
    }
    for to in out.to.iter_mut() {
        if let Some(o) = to.operation.as_mut() {
            let http = [
                &mut o.hosts,
                &mut o.not_hosts,
                &mut o.methods,
                &mut o.not_methods,
                &mut o.paths,
                &mut o.not_paths,
            ];
            for field in http {
                had |= !field.is_empty();
                field.clear();
            }
        }
    }
    let before = out.when.len();
    out.when.retain(|c| !c.key.starts_with("request."));
    had |= out.when.len() != before;
    (out, had)
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC` (its `rules`), with the
/// policies map written as its entries in name order.
#[derive(Clone, PartialEq, prost::Message)]
struct RbacFilterConfig {
    #[prost(message, optional, tag = "1")]
    rules: Option<RbacRules>,
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC` with shadow rules only.
#[derive(Clone, PartialEq, prost::Message)]
struct ShadowRbacConfig {
    #[prost(message, optional, tag = "2")]
    shadow_rules: Option<RbacRules>,
    #[prost(string, tag = "3")]
    shadow_rules_stat_prefix: String,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
#[derive(Clone, PartialEq, prost::Message)]
struct NetworkRbacConfig {
    #[prost(message, optional, tag = "1")]
    rules: Option<RbacRules>,
    #[prost(message, optional, tag = "2")]
    shadow_rules: Option<RbacRules>,
    #[prost(string, tag = "3")]
    stat_prefix: String,
    #[prost(string, tag = "5")]
    shadow_rules_stat_prefix: String,
}

/// `envoy.config.rbac.v3.RBAC`.
#[derive(Clone, PartialEq, prost::Message)]
struct RbacRules {
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(message, repeated, tag = "2")]
    policies: Vec<PolicyEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PolicyEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Policy>,
}

/// `envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication`, with
/// the providers map written as its entries in name order.
#[derive(Clone, PartialEq, prost::Message)]
struct JwtAuthentication {
    #[prost(message, repeated, tag = "1")]
    providers: Vec<ProviderEntry>,
    #[prost(message, repeated, tag = "2")]
    rules: Vec<RequirementRule>,
    #[prost(bool, tag = "4")]
    bypass_cors_preflight: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProviderEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<JwtProvider>,
}

fn any(type_name: &str, message: &impl prost::Message) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

/// The JWT filter: one provider per jwtRule of every RequestAuthentication
/// that applies (`origins-N`, in order), any one of which may verify the
/// token, and a request without a token let through, as Istio has it.
fn jwt_filter(
    authentications: &[&std::sync::Arc<RequestAuthentication>],
    out: &mut Generated,
) -> Option<HttpFilter> {
    let mut providers = Vec::new();
    for ra in authentications {
        for (i, rule) in ra.spec.jwt_rules.iter().enumerate() {
            let resource = format!("RequestAuthentication {}/{}", ra.namespace(), ra.name());
            let jwks = match (&rule.jwks, &rule.jwks_uri) {
                (Some(inline), _) => jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(inline.clone())),
                    ..Default::default()
                }),
                (None, Some(uri)) => match jwks_cluster(uri) {
                    Some(cluster) => {
                        let timeout = rule
                            .timeout
                            .as_deref()
                            .and_then(parse_duration)
                            .unwrap_or(std::time::Duration::from_secs(5));
                        let remote = RemoteJwks {
                            http_uri: Some(HttpUri {
                                uri: uri.clone(),
                                timeout: Some(duration(timeout)),
                                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                                    cluster.name.clone(),
                                )),
                            }),
                            cache_duration: Some(duration(std::time::Duration::from_secs(20 * 60))),
                            // Fetched when the listener starts, and again
                            // every second while that fails.
                            async_fetch: Some(JwksAsyncFetch {
                                fast_listener: false,
                                failed_refetch_duration: Some(duration(std::time::Duration::from_secs(1))),
                            }),
                            ..Default::default()
                        };
                        if !out.clusters.iter().any(|c| c.name == cluster.name) {
                            out.clusters.push(cluster);
                        }
                        jwt_provider::JwksSourceSpecifier::RemoteJwks(remote)
                    }
                    None => {
                        out.diagnostics.push(Diagnostic {
                            resource,
                            field: format!("spec.jwtRules[{i}].jwksUri"),
                            message: format!("cannot fetch {uri}: no host to connect to; tokens of this issuer are refused"),
                        });
                        continue;
                    }
                },
                (None, None) => {
                    out.diagnostics.push(Diagnostic {
                        resource,
                        field: format!("spec.jwtRules[{i}]"),
                        message: "neither jwks nor jwksUri: tokens of this issuer cannot be verified and are refused"
                            .into(),
                    });
                    continue;
                }
            };
            let from_headers = rule
                .from_headers
                .iter()
                .map(|h| JwtHeader {
                    name: h.name.clone(),
                    value_prefix: h.prefix.clone().unwrap_or_default(),
                })
                .collect();
            providers.push(JwtProvider {
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                forward: rule.forward_original_token,
                from_headers,
                from_params: rule.from_params.clone(),
                from_cookies: rule.from_cookies.clone(),
                forward_payload_header: rule.output_payload_to_header.clone().unwrap_or_default(),
                payload_in_metadata: PAYLOAD.into(),
                failed_status_in_metadata: FAILURE.into(),
                claim_to_headers: rule
                    .output_claim_to_headers
                    .iter()
                    .map(|c| JwtClaimToHeader {
                        header_name: c.header.clone(),
                        claim_name: c.claim.clone(),
                        ..Default::default()
                    })
                    .collect(),
                jwks_source_specifier: Some(jwks),
                ..Default::default()
            });
        }
    }
    if providers.is_empty() {
        return None;
    }
    let entries: Vec<ProviderEntry> = providers
        .into_iter()
        .enumerate()
        .map(|(i, p)| ProviderEntry {
            key: format!("origins-{i}"),
            value: Some(p),
        })
        .collect();
    let mut requirements: Vec<JwtRequirement> = entries
        .iter()
        .map(|e| JwtRequirement {
            requires_type: Some(jwt_requirement::RequiresType::ProviderName(e.key.clone())),
        })
        .collect();
    requirements.push(JwtRequirement {
        requires_type: Some(jwt_requirement::RequiresType::AllowMissing(Empty {})),
    });
    let config = JwtAuthentication {
        providers: entries,
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(JwtRequirement {
                requires_type: Some(jwt_requirement::RequiresType::RequiresAny(JwtRequirementOrList {
                    requirements,
                })),
            })),
        }],
        bypass_cors_preflight: true,
    };
    Some(HttpFilter {
        name: JWT_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            &config,
        ))),
        ..Default::default()
    })
}

/// The cluster a `jwksUri` is fetched through: `jwks|HOST|PORT`, to the
/// address in the URI, over TLS (checked against the system CAs) for
/// `https`.
fn jwks_cluster(uri: &str) -> Option<Cluster> {
    uri_cluster(uri, "jwks")
}

/// A cluster to the host and port of `uri`: `PREFIX|HOST|PORT`, over TLS
/// (checked against the system CAs) for `https`.
fn uri_cluster(uri: &str, prefix: &str) -> Option<Cluster> {
    let (https, rest) = match uri.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h.trim_matches(['[', ']']), p),
            Err(_) => (authority, if https { 443 } else { 80 }),
        },
        _ => (authority.trim_matches(['[', ']']), if https { 443 } else { 80 }),
    };
    if host.is_empty() {
        return None;
    }
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let discovery = if is_ip {
        cluster::DiscoveryType::Static
    } else {
        cluster::DiscoveryType::StrictDns
    };
    let name = format!("{prefix}|{host}|{port}");
    let transport_socket = https.then(|| {
        let tls = UpstreamTlsContext {
            sni: host.to_string(),
            common_tls_context: Some(CommonTlsContext {
                validation_context_type: Some(common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: Some(DataSource {
                            specifier: Some(data_source::Specifier::Filename(SYSTEM_CA.into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
        }
    });
    Some(Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(discovery as i32)),
        connect_timeout: Some(duration(std::time::Duration::from_secs(5))),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(host, port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket,
        ..Default::default()
    })
}

fn any_policy() -> Policy {
    Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::Any(true)),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::Any(true)),
        }],
        ..Default::default()
    }
}

/// One rule as an Envoy policy: the request matches when one of `from`,
/// one of `to` and every `when` match.
fn rule_policy(rule: &Rule) -> Result<Policy, String> {
    let mut ids = Vec::new();
    let mut perms = Vec::new();
    if !rule.from.is_empty() {
        let sources = rule
            .from
            .iter()
            .map(|f| source(f.source.as_ref().unwrap_or(&Source::default())))
            .collect::<Result<Vec<_>, _>>()?;
        ids.push(or_ids(sources));
    }
    if !rule.to.is_empty() {
        let operations = rule
            .to
            .iter()
            .map(|t| operation(t.operation.as_ref().unwrap_or(&Operation::default())))
            .collect::<Result<Vec<_>, _>>()?;
        perms.push(or_rules(operations));
    }
    for c in &rule.when {
        match condition(c)? {
            Side::Principal(p) => ids.push(p),
            Side::Permission(p) => perms.push(p),
        }
    }
    Ok(Policy {
        permissions: vec![and_rules(perms)],
        principals: vec![and_ids(ids)],
        ..Default::default()
    })
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => Principal {
            identifier: Some(principal::Identifier::Any(true)),
        },
        1 => ids.into_iter().next().unwrap_or_default(),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
        },
    }
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    match ids.len() {
        1 => ids.into_iter().next().unwrap_or_default(),
        _ => Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
        },
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn and_rules(rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => Permission {
            rule: Some(permission::Rule::Any(true)),
        },
        1 => rules.into_iter().next().unwrap_or_default(),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules })),
        },
    }
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    match rules.len() {
        1 => rules.into_iter().next().unwrap_or_default(),
        _ => Permission {
            rule: Some(permission::Rule::OrRules(permission::Set { rules })),
        },
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

/// Istio's string forms: `*` (anything), `abc*` (prefix), `*abc`
/// (suffix), else exact.
fn string_match(value: &str, ignore_case: bool) -> StringMatcher {
    let pattern = if value == "*" {
        string_matcher::MatchPattern::SafeRegex(regex(".+"))
    } else if let Some(prefix) = value.strip_suffix('*') {
        string_matcher::MatchPattern::Prefix(prefix.to_string())
    } else if let Some(suffix) = value.strip_prefix('*') {
        string_matcher::MatchPattern::Suffix(suffix.to_string())
    } else {
        string_matcher::MatchPattern::Exact(value.to_string())
    };
    // Envoy refuses ignore_case on a regex (which matches anything here).
    let regex = matches!(pattern, string_matcher::MatchPattern::SafeRegex(_));
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: ignore_case && !regex,
    }
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

/// A peer identity (`cluster.local/ns/default/sa/sleep`, with Istio's
/// wildcards) against the certificate's SPIFFE URI.
fn peer_principal(value: &str) -> Principal {
    let matcher = if value == "*" {
        string_match("*", false)
    } else if value.starts_with('*') {
        string_match(value, false)
    } else {
        string_match(&format!("spiffe://{value}"), false)
    };
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(matcher),
        })),
    }
}

/// A namespace, as the `/ns/NAME/` part of the peer's SPIFFE URI.
fn peer_namespace(ns: &str) -> Principal {
    let escaped = regex_escape(ns);
    let body = if ns == "*" {
        "[^/]+".to_string()
    } else if let Some(p) = ns.strip_suffix('*') {
        format!("{}[^/]*", regex_escape(p))
    } else if let Some(s) = ns.strip_prefix('*') {
        format!("[^/]*{}", regex_escape(s))
    } else {
        escaped
    };
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex(&format!(
                    "spiffe://[^/]+/ns/{body}/sa/[^/]+"
                )))),
                ignore_case: false,
            }),
        })),
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}

/// A value of the verified token's payload (`path` below `payload`).
fn payload(path: &[&str], value: ValueMatcher) -> Principal {
    let matcher = MetadataMatcher {
        filter: JWT_FILTER.into(),
        path: std::iter::once(PAYLOAD)
            .chain(path.iter().copied())
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(k.to_string())),
            })
            .collect(),
        value: Some(value),
        invert: false,
    };
    Principal {
        identifier: Some(principal::Identifier::SourcedMetadata(SourcedMetadata {
            metadata_matcher: Some(matcher),
            metadata_source: 0, // dynamic metadata
        })),
    }
}

fn present() -> ValueMatcher {
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::PresentMatch(true)),
    }
}

/// A claim equal to `value`, or a list claim holding it.
fn claim_value(value: &str) -> ValueMatcher {
    let string = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::StringMatch(string_match(
            value, false,
        ))),
    };
    let list = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(ListMatcher {
            match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(string.clone()))),
        }))),
    };
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::OrMatch(OrMatcher {
            value_matchers: vec![string, list],
        })),
    }
}

/// A request principal `ISS/SUB` (the issuer may hold slashes: the subject
/// is what follows the last one), `*`, or `ISS/*`.
fn request_principal(value: &str) -> Result<Principal, String> {
    if value == "*" {
        return Ok(payload(&["iss"], present()));
    }
    let Some((iss, sub)) = value.rsplit_once('/') else {
        return Err(format!("request principal {value:?} is not ISSUER/SUBJECT"));
    };
    if iss.contains('*') {
        return Err(format!(
            "request principal {value:?}: a wildcard in the issuer is not supported"
        ));
    }
    let iss = payload(&["iss"], claim_value(iss));
    let sub = if sub == "*" {
        payload(&["sub"], present())
    } else {
        payload(&["sub"], claim_value(sub))
    };
    Ok(and_ids(vec![iss, sub]))
}

fn cidr_range(block: &str) -> Result<CidrRange, String> {
    let (ip, len) = cidr(block).ok_or_else(|| format!("{block:?} is not an IP block"))?;
    Ok(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    })
}

/// Adds `field` (any of `values`, or none of `not_values`) to `into`.
fn field_ids(
    into: &mut Vec<Principal>,
    values: &[String],
    not_values: &[String],
    make: impl Fn(&str) -> Result<Principal, String>,
) -> Result<(), String> {
    if !values.is_empty() {
        into.push(or_ids(values.iter().map(|v| make(v)).collect::<Result<_, _>>()?));
    }
    if !not_values.is_empty() {
        into.push(not_id(or_ids(
            not_values.iter().map(|v| make(v)).collect::<Result<_, _>>()?,
        )));
    }
    Ok(())
}

fn field_rules(
    into: &mut Vec<Permission>,
    values: &[String],
    not_values: &[String],
    make: impl Fn(&str) -> Result<Permission, String>,
) -> Result<(), String> {
    if !values.is_empty() {
        into.push(or_rules(
            values.iter().map(|v| make(v)).collect::<Result<_, _>>()?,
        ));
    }
    if !not_values.is_empty() {
        into.push(not_rule(or_rules(
            not_values.iter().map(|v| make(v)).collect::<Result<_, _>>()?,
        )));
    }
    Ok(())
}

fn source(s: &Source) -> Result<Principal, String> {
    let mut ids = Vec::new();
    field_ids(&mut ids, &s.principals, &s.not_principals, |v| {
        Ok(peer_principal(v))
    })?;
    field_ids(
        &mut ids,
        &s.request_principals,
        &s.not_request_principals,
        request_principal,
    )?;
    field_ids(&mut ids, &s.namespaces, &s.not_namespaces, |v| {
        Ok(peer_namespace(v))
    })?;
    field_ids(&mut ids, &s.ip_blocks, &s.not_ip_blocks, |v| {
        Ok(Principal {
            identifier: Some(principal::Identifier::DirectRemoteIp(cidr_range(v)?)),
        })
    })?;
    field_ids(&mut ids, &s.remote_ip_blocks, &s.not_remote_ip_blocks, |v| {
        Ok(Principal {
            identifier: Some(principal::Identifier::RemoteIp(cidr_range(v)?)),
        })
    })?;
    Ok(and_ids(ids))
}

fn header(name: &str, matcher: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(matcher)),
        ..Default::default()
    }
}

fn header_rule(name: &str, matcher: StringMatcher) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(header(name, matcher))),
    }
}

/// A host, with or without a port in the authority, case-insensitive.
fn host_rule(host: &str) -> Permission {
    let plain = header_rule(":authority", string_match(host, true));
    if host == "*" || host.ends_with('*') {
        return plain;
    }
    let with_port = header_rule(
        ":authority",
        StringMatcher {
            // Case-insensitive in the regex itself: Envoy refuses
            // ignore_case on a regex.
            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex(&format!(
                "(?i){}{}:[0-9]+",
                if host.starts_with('*') { ".*" } else { "" },
                regex_escape(host.trim_start_matches('*'))
            )))),
            ignore_case: false,
        },
    );
    or_rules(vec![plain, with_port])
}

fn port_rule(port: &str) -> Result<Permission, String> {
    let port: u32 = port.parse().map_err(|_| format!("{port:?} is not a port"))?;
    Ok(Permission {
        rule: Some(permission::Rule::DestinationPort(port)),
    })
}

fn path_rule(path: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string_match(path, false))),
        })),
    }
}

fn operation(o: &Operation) -> Result<Permission, String> {
    let mut rules = Vec::new();
    field_rules(&mut rules, &o.hosts, &o.not_hosts, |h| Ok(host_rule(h)))?;
    field_rules(&mut rules, &o.ports, &o.not_ports, port_rule)?;
    field_rules(&mut rules, &o.methods, &o.not_methods, |m| {
        Ok(header_rule(":method", string_match(m, false)))
    })?;
    field_rules(&mut rules, &o.paths, &o.not_paths, |p| Ok(path_rule(p)))?;
    Ok(and_rules(rules))
}

/// Which side of a policy a `when` condition lands on.
enum Side {
    Principal(Principal),
    Permission(Permission),
}

/// `name[a][b]` → `["a", "b"]` after `name`.
fn brackets<'a>(key: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let rest = key.strip_prefix(name)?;
    let mut parts = Vec::new();
    let mut rest = rest;
    while let Some(r) = rest.strip_prefix('[') {
        let (part, after) = r.split_once(']')?;
        parts.push(part);
        rest = after;
    }
    (rest.is_empty() && !parts.is_empty()).then_some(parts)
}

fn condition(c: &Condition) -> Result<Side, String> {
    let key = c.key.as_str();
    let ids = |make: &dyn Fn(&str) -> Result<Principal, String>| -> Result<Side, String> {
        let mut out = Vec::new();
        field_ids(&mut out, &c.values, &c.not_values, make)?;
        Ok(Side::Principal(and_ids(out)))
    };
    let rules = |make: &dyn Fn(&str) -> Result<Permission, String>| -> Result<Side, String> {
        let mut out = Vec::new();
        field_rules(&mut out, &c.values, &c.not_values, make)?;
        Ok(Side::Permission(and_rules(out)))
    };
    if let Some(path) = brackets(key, "request.auth.claims") {
        return ids(&|v| Ok(payload(&path, claim_value(v))));
    }
    if let Some(name) = brackets(key, "request.headers") {
        let [name] = name.as_slice() else {
            return Err(format!("{key}: one header name in brackets"));
        };
        return rules(&|v| Ok(header_rule(&name.to_ascii_lowercase(), string_match(v, false))));
    }
    match key {
        "request.auth.principal" => ids(&request_principal),
        "request.auth.audiences" => ids(&|v| Ok(payload(&["aud"], claim_value(v)))),
        "request.auth.presenter" => ids(&|v| Ok(payload(&["azp"], claim_value(v)))),
        "source.principal" => ids(&|v| Ok(peer_principal(v))),
        "source.namespace" => ids(&|v| Ok(peer_namespace(v))),
        "source.ip" => ids(&|v| {
            Ok(Principal {
                identifier: Some(principal::Identifier::DirectRemoteIp(cidr_range(v)?)),
            })
        }),
        "remote.ip" => ids(&|v| {
            Ok(Principal {
                identifier: Some(principal::Identifier::RemoteIp(cidr_range(v)?)),
            })
        }),
        "destination.ip" => rules(&|v| {
            Ok(Permission {
                rule: Some(permission::Rule::DestinationIp(cidr_range(v)?)),
            })
        }),
        "destination.port" => rules(&port_rule),
        "connection.sni" => rules(&|v| {
            Ok(Permission {
                rule: Some(permission::Rule::RequestedServerName(string_match(v, false))),
            })
        }),
        other => Err(format!("the condition key {other:?} is not supported")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_take_claim_paths_apart() {
        assert_eq!(
            brackets("request.auth.claims[groups]", "request.auth.claims"),
            Some(vec!["groups"])
        );
        assert_eq!(
            brackets("request.auth.claims[nested][key]", "request.auth.claims"),
            Some(vec!["nested", "key"])
        );
        assert_eq!(brackets("request.auth.claims", "request.auth.claims"), None);
        assert_eq!(brackets("request.auth.claims[a", "request.auth.claims"), None);
    }

    #[test]
    fn jwks_clusters_reach_the_uri_host() {
        let c = jwks_cluster("http://127.0.0.1:8081/jwks.json").expect("cluster");
        assert_eq!(c.name, "jwks|127.0.0.1|8081");
        assert!(c.transport_socket.is_none());
        let c = jwks_cluster("https://www.googleapis.com/oauth2/v3/certs").expect("cluster");
        assert_eq!(c.name, "jwks|www.googleapis.com|443");
        assert!(c.transport_socket.is_some());
        assert!(jwks_cluster("file:///x").is_none());
    }

    #[test]
    fn the_same_policies_encode_to_the_same_bytes() {
        let rule: Rule = serde_json::from_value(serde_json::json!({
            "from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"], "notNamespaces": ["x"]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
            "when": [{"key": "request.auth.claims[groups]", "values": ["admin"]}]
        }))
        .expect("rule");
        let encode = || {
            let config = RbacRules {
                action: 0,
                policies: (0..5)
                    .map(|i| PolicyEntry {
                        key: format!("p{i}"),
                        value: Some(rule_policy(&rule).expect("policy")),
                    })
                    .collect(),
            };
            prost::Message::encode_to_vec(&config)
        };
        assert_eq!(encode(), encode());
        // And Envoy's own type reads it back as the map it is.
        let decoded: envoy_types::pb::envoy::config::rbac::v3::Rbac =
            prost::Message::decode(encode().as_slice()).expect("decodes as Envoy's RBAC");
        assert_eq!(decoded.policies.len(), 5);
    }
}

#[cfg(test)]
mod custom_tests {
    use std::sync::Arc;

    use envoy_types::pb::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz as NetworkExtAuthz;
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
    use prost::Message;

    use super::*;
    use crate::config::mesh::MeshConfig;
    use crate::config::{parse_file, ConfigSnapshot};

    const MESH_CONFIG: &str = "extensionProviders:\n\
        - name: grpc-authz\n  envoyExtAuthzGrpc: {service: 127.0.0.1, port: 9000, failOpen: true}\n\
        - name: http-authz\n  envoyExtAuthzHttp: {service: 127.0.0.1, port: 9001}\n";

    /// The policy filters of an `app: db` workload in `shop` under one
    /// CUSTOM policy naming `provider`, with a rule only HTTP can judge.
    fn custom(provider: &str) -> (PolicyFilters, Generated) {
        let policy = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: ext, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: db}}}}\n  action: CUSTOM\n\
             \x20 provider: {{name: {provider}}}\n\
             \x20 rules:\n  - to: [{{operation: {{paths: [\"/admin/*\"]}}}}]\n"
        );
        let snapshot = ConfigSnapshot::from_files(vec![parse_file("p.yaml", &policy)]);
        let mesh = MeshConfig::parse(MESH_CONFIG).expect("mesh config");
        let push = PushContext::new(Arc::new(snapshot)).with_mesh(Arc::new(mesh));
        let labels = BTreeMap::from([("app".to_string(), "db".to_string())]);
        let mut out = Generated::default();
        let filters = filters(&push, "shop", &labels, &mut out);
        (filters, out)
    }

    fn config(f: &Filter) -> &[u8] {
        match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => &any.value,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_grpc_provider_checks_the_tcp_connections_the_rules_mark() {
        let (filters, out) = custom("grpc-authz");
        let names: Vec<&str> = filters.http.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [RBAC_FILTER, "envoy.filters.http.ext_authz"]);
        let names: Vec<&str> = filters.tcp.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [NETWORK_RBAC_FILTER, "envoy.filters.network.ext_authz"]);
        assert!(filters.tcp_unchecked.is_empty());

        let rbac = NetworkRbac::decode(config(&filters.tcp[0])).expect("rbac");
        assert!(rbac.rules.is_none(), "marks, never enforces: {rbac:?}");
        assert_eq!(rbac.shadow_rules_stat_prefix, EXT_AUTHZ_PREFIX);
        let shadow = rbac.shadow_rules.expect("shadow rules");
        let (key, policy) = shadow.policies.iter().next().expect("one policy");
        assert_eq!(key, "istio-ext-authz-ns[shop]-policy[ext]-rule[0]");
        // A path is not on a TCP connection: the rule matches every one
        // there, and the authorizer decides.
        assert_eq!(
            policy.permissions[0].rule,
            Some(permission::Rule::Any(true)),
            "{policy:?}"
        );

        let check = NetworkExtAuthz::decode(config(&filters.tcp[1])).expect("ext_authz");
        assert!(check.failure_mode_allow, "failOpen");
        let enabled = check.filter_enabled_metadata.expect("enabled by the marks");
        assert_eq!(enabled.filter, NETWORK_RBAC_FILTER);
        let cluster = match check.grpc_service.and_then(|g| g.target_specifier) {
            Some(envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier::EnvoyGrpc(g)) => {
                g.cluster_name
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(cluster, "extauthz|127.0.0.1|9000");
        assert!(out.clusters.iter().any(|c| c.name == cluster));
    }

    #[test]
    fn an_http_provider_leaves_tcp_unchecked_and_says_so() {
        let (filters, _) = custom("http-authz");
        assert_eq!(filters.http.len(), 2);
        assert!(filters.tcp.is_empty(), "{:?}", filters.tcp);
        let [note] = filters.tcp_unchecked.as_slice() else {
            panic!("{:?}", filters.tcp_unchecked);
        };
        assert_eq!(note.resource, "AuthorizationPolicy shop/ext");
        assert!(note.message.contains("envoyExtAuthzHttp"), "{}", note.message);
    }

    #[test]
    fn an_unknown_provider_refuses_the_connections_the_rules_match() {
        let (filters, out) = custom("nowhere");
        let names: Vec<&str> = filters.tcp.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [NETWORK_RBAC_FILTER]);
        let rbac = NetworkRbac::decode(config(&filters.tcp[0])).expect("rbac");
        assert_eq!(rbac.rules.map(|r| r.action), Some(1), "DENY");
        assert!(out
            .diagnostics
            .iter()
            .any(|d| d.message.contains("no extensionProviders entry \"nowhere\"")));
    }
}
