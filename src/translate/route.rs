//! VirtualService HTTP rules to Envoy routes: matches, destinations
//! (`outbound|PORT|SUBSET|HOST`), redirects, direct responses, rewrites and
//! timeouts. Fields not honoured yet become diagnostics, never silent.

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match,
    weighted_cluster, DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, Route,
    RouteAction, RouteMatch, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher, RegexMatchAndSubstitute, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::gateway::resolve_gateway_ref;
use super::{duration, outbound_cluster_name, Diagnostic};
use super::{policy, route_policy};
use crate::config::istio::{Destination, HttpMatchRequest, HttpRedirect, HttpRoute, StringMatch};
use crate::config::VirtualService;
use crate::model::{resolve_host, PushContext};

/// Where the routes are being built for: a gateway (or the mesh's
/// sidecars) and a port.
pub struct RouteScope<'a> {
    /// `(namespace, name)` of the Gateway; `None` for sidecars (`mesh`).
    pub gateway: Option<(&'a str, &'a str)>,
    pub port: u16,
    /// The proxy's namespace: which DestinationRules it sees first.
    pub proxy_namespace: &'a str,
    /// The proxy's labels, for `sourceLabels` matches.
    pub proxy_labels: &'a std::collections::BTreeMap<String, String>,
}

/// The Envoy routes of one VirtualService for one scope, in rule order.
pub fn http_routes(
    push: &PushContext,
    vs: &VirtualService,
    scope: &RouteScope<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Route> {
    let mut ctx = RuleContext {
        push,
        vs,
        diags,
        field: String::new(),
        proxy_namespace: scope.proxy_namespace,
        proxy_labels: scope.proxy_labels,
    };
    let gateway_paths = gateway_semantics(vs);
    let mut routes = Vec::new();
    for (i, rule) in vs.spec.http.iter().enumerate() {
        ctx.field = format!("spec.http[{i}]");
        if let Some(d) = &rule.delegate {
            let ns = d.namespace.as_deref().unwrap_or(vs.namespace());
            let found = push
                .virtual_services
                .iter()
                .find(|v| v.namespace() == ns && v.name() == d.name && v.spec.hosts.is_empty());
            match found {
                Some(delegate) => {
                    let mut merged = (**delegate).clone();
                    for r in &mut merged.spec.http {
                        r.matches = merge_matches(&rule.matches, &r.matches);
                    }
                    routes.extend(http_routes(push, &merged, scope, ctx.diags));
                }
                None => ctx.diag(
                    ".delegate",
                    format!("delegate VirtualService {ns}/{} not found (a delegate has no hosts); the rule is left out", d.name),
                ),
            }
            continue;
        }
        let Some(action) = ctx.action(rule) else { continue };
        let matches: Vec<Option<&HttpMatchRequest>> = if rule.matches.is_empty() {
            vec![None]
        } else {
            rule.matches.iter().map(Some).collect()
        };
        for m in matches {
            if !m.is_none_or(|m| applies(m, vs.namespace(), scope)) {
                continue;
            }
            let mut route = Route {
                name: rule.name.clone().unwrap_or_default(),
                r#match: Some(route_match(m, gateway_paths)),
                action: Some(action.clone()),
                ..Default::default()
            };
            let matched_prefix = m.and_then(|m| m.uri.as_ref()).and_then(|u| u.prefix.as_deref());
            if let (true, Some(matched)) = (gateway_paths, matched_prefix) {
                replace_segments(&mut route, matched);
            }
            route_policy::apply_to_route(rule, &mut route);
            routes.push(route);
        }
    }
    routes
}

/// A delegate's matches under its root rule's, as Istio merges them: each
/// root match with each delegate match, the delegate's conditions winning
/// where both set one.
fn merge_matches(root: &[HttpMatchRequest], delegate: &[HttpMatchRequest]) -> Vec<HttpMatchRequest> {
    if root.is_empty() {
        return delegate.to_vec();
    }
    if delegate.is_empty() {
        return root.to_vec();
    }
    root.iter()
        .flat_map(|r| {
            delegate.iter().map(move |d| {
                let mut m = d.clone();
                m.uri = d.uri.clone().or_else(|| r.uri.clone());
                m.scheme = d.scheme.clone().or_else(|| r.scheme.clone());
                m.method = d.method.clone().or_else(|| r.method.clone());
                m.authority = d.authority.clone().or_else(|| r.authority.clone());
                m.port = d.port.or(r.port);
                m.gateways = r.gateways.clone();
                for (k, v) in &r.headers {
                    m.headers.entry(k.clone()).or_insert_with(|| v.clone());
                }
                for (k, v) in &r.query_params {
                    m.query_params.entry(k.clone()).or_insert_with(|| v.clone());
                }
                for (k, v) in &r.without_headers {
                    m.without_headers.entry(k.clone()).or_insert_with(|| v.clone());
                }
                m
            })
        })
        .collect()
}

/// Whether a match block applies to this gateway and port.
fn applies(m: &HttpMatchRequest, vs_namespace: &str, scope: &RouteScope<'_>) -> bool {
    let gateway_ok = m.gateways.is_empty()
        || m.gateways
            .iter()
            .any(|g| match (resolve_gateway_ref(g, vs_namespace), scope.gateway) {
                (None, None) => true, // `mesh` and a sidecar
                (Some((ns, name)), Some((gw_ns, gw_name))) => ns == gw_ns && name == gw_name,
                _ => false,
            });
    let port_ok = m.port.is_none_or(|p| p == u32::from(scope.port));
    // Source conditions are decided here, per proxy, as Istio decides them.
    let source_ok = crate::model::is_subset(&m.source_labels, scope.proxy_labels)
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns == scope.proxy_namespace);
    gateway_ok && port_ok && source_ok
}

struct RuleContext<'a> {
    push: &'a PushContext,
    vs: &'a VirtualService,
    diags: &'a mut Vec<Diagnostic>,
    field: String,
    proxy_namespace: &'a str,
    proxy_labels: &'a std::collections::BTreeMap<String, String>,
}

impl RuleContext<'_> {
    fn diag(&mut self, field: &str, message: String) {
        self.diags.push(Diagnostic {
            resource: format!("VirtualService {}/{}", self.vs.namespace(), self.vs.name()),
            field: format!("{}{field}", self.field),
            message,
        });
    }

    fn action(&mut self, rule: &HttpRoute) -> Option<route::Action> {
        if let Some(r) = &rule.redirect {
            return Some(route::Action::Redirect(redirect(r)));
        }
        if let Some(d) = &rule.direct_response {
            let body = d
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .map(|s| DataSource {
                    specifier: Some(data_source::Specifier::InlineString(s)),
                    ..Default::default()
                });
            return Some(route::Action::DirectResponse(DirectResponseAction {
                status: d.status,
                body,
                ..Default::default()
            }));
        }
        let mut clusters = Vec::new();
        let mut hash = Vec::new();
        for (j, dest) in rule.route.iter().enumerate() {
            let Some(d) = &dest.destination else { continue };
            let field = format!("{}.route[{j}].destination", self.field);
            let Some(cluster) = destination_cluster(self.push, self.vs, &field, d, self.diags) else {
                continue;
            };
            if hash.is_empty() {
                hash = self.hash_policy(d);
            }
            let weight = if rule.route.len() == 1 {
                100
            } else {
                dest.weight.max(0) as u32
            };
            clusters.push((cluster, weight, dest.headers.as_ref()));
        }
        if clusters.is_empty() {
            return None;
        }
        // One destination goes by name, unless it has headers of its own:
        // those live on a weighted cluster's entry.
        let specifier = if clusters.len() == 1 && clusters[0].2.is_none() {
            route_action::ClusterSpecifier::Cluster(clusters.remove(0).0)
        } else {
            route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: clusters
                    .into_iter()
                    .filter(|(_, w, _)| *w > 0)
                    .map(|(name, weight, headers)| {
                        let mut entry = weighted_cluster::ClusterWeight {
                            name,
                            weight: Some(UInt32Value { value: weight }),
                            ..Default::default()
                        };
                        if let Some(req) = headers.and_then(|h| h.request.as_ref()) {
                            entry.request_headers_to_add = route_policy::header_options(req);
                            entry.request_headers_to_remove = req.remove.clone();
                        }
                        if let Some(resp) = headers.and_then(|h| h.response.as_ref()) {
                            entry.response_headers_to_add = route_policy::header_options(resp);
                            entry.response_headers_to_remove = resp.remove.clone();
                        }
                        entry
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let timeout = rule
            .timeout
            .as_deref()
            .and_then(crate::config::parse_duration)
            .unwrap_or_default();
        let mut action = RouteAction {
            cluster_specifier: Some(specifier),
            // Istio disables Envoy's default 15 s route timeout unless asked.
            timeout: Some(duration(timeout)),
            hash_policy: hash,
            ..Default::default()
        };
        // `mirror` takes the rule's mirrorPercentage; each of `mirrors` its
        // own percentage, else all requests (Istio's defaults).
        let rule_share = rule
            .mirror_percentage
            .as_ref()
            .map(|p| p.value)
            .or(rule.mirror_percent.map(f64::from));
        let mirrors = rule
            .mirror
            .iter()
            .map(|d| (format!("{}.mirror", self.field), d, rule_share))
            .chain(rule.mirrors.iter().enumerate().filter_map(|(j, m)| {
                let share = m.percentage.as_ref().map(|p| p.value);
                Some((
                    format!("{}.mirrors[{j}]", self.field),
                    m.destination.as_ref()?,
                    share,
                ))
            }))
            .filter_map(|(field, d, share)| {
                let cluster = destination_cluster(self.push, self.vs, &field, d, self.diags)?;
                Some((cluster, share))
            })
            .collect();
        route_policy::apply_to_action(rule, &mut action, mirrors);
        if let Some(rw) = &rule.rewrite {
            action.prefix_rewrite = rw.uri.clone().unwrap_or_default();
            if let Some(re) = &rw.uri_regex_rewrite {
                action.regex_rewrite = Some(RegexMatchAndSubstitute {
                    pattern: Some(regex(&re.pattern)),
                    substitution: re.rewrite.clone(),
                });
            }
            if let Some(a) = &rw.authority {
                action.host_rewrite_specifier =
                    Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(a.clone()));
            }
        }
        Some(route::Action::Route(action))
    }
}

/// The cluster a destination goes to (`outbound|PORT|SUBSET|FQDN`). Reports
/// unknown hosts and missing ports as Istio's analyzer does; `None` when no
/// port can be chosen.
pub(super) fn destination_cluster(
    push: &PushContext,
    vs: &VirtualService,
    field: &str,
    dest: &Destination,
    diags: &mut Vec<Diagnostic>,
) -> Option<String> {
    let host = resolve_host(&dest.host, vs.namespace());
    let mut diag = |field: String, message: String| {
        diags.push(Diagnostic {
            resource: format!("VirtualService {}/{}", vs.namespace(), vs.name()),
            field,
            message,
        })
    };
    let svc = push.services.get(&host);
    let port = dest.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
    let port = match (svc, port) {
        (None, Some(p)) => {
            diag(
                format!("{field}.host"),
                format!("host {host} is not a known service; requests get 503"),
            );
            p
        }
        (None, None) => {
            diag(
                format!("{field}.host"),
                format!(
                    "host {host} is not a known service and no port is given; the destination is left out"
                ),
            );
            return None;
        }
        (Some(svc), Some(p)) => {
            if svc.port(p).is_none() {
                diag(format!("{field}.port"), format!("service {host} has no port {p}"));
            }
            p
        }
        (Some(svc), None) if svc.ports.len() == 1 => svc.ports[0].port,
        (Some(_), None) => {
            diag(
                format!("{field}.port"),
                format!("service {host} has several ports; the destination must name one"),
            );
            return None;
        }
    };
    let subset = dest.subset.as_deref().unwrap_or_default();
    Some(outbound_cluster_name(port, subset, &host))
}

/// The weighted clusters of a VirtualService's L4 destinations.
pub(super) fn l4_clusters(
    push: &PushContext,
    vs: &VirtualService,
    field: &str,
    route: &[crate::config::istio::RouteDestination],
    diags: &mut Vec<Diagnostic>,
) -> Vec<(String, u32)> {
    route
        .iter()
        .enumerate()
        .filter_map(|(j, d)| {
            let field = format!("{field}.route[{j}].destination");
            let c = destination_cluster(push, vs, &field, d.destination.as_ref()?, diags)?;
            let weight = if route.len() == 1 {
                1
            } else {
                d.weight.max(0) as u32
            };
            Some((c, weight))
        })
        .collect()
}

impl RuleContext<'_> {
    /// The hash policy consistent hashing to this destination needs.
    fn hash_policy(&self, d: &Destination) -> Vec<route_action::HashPolicy> {
        let host = resolve_host(&d.host, self.vs.namespace());
        let Some(svc) = self.push.services.get(&host) else {
            return Vec::new();
        };
        let dr = self
            .push
            .destination_rule(self.proxy_namespace, self.proxy_labels, &host, &svc.namespace);
        let subset = dr.and_then(|dr| {
            let name = d.subset.as_deref()?;
            dr.spec.subsets.iter().find(|s| s.name == name)
        });
        let port = d
            .port
            .as_ref()
            .and_then(|p| u16::try_from(p.number).ok())
            .unwrap_or_default();
        policy::hash_policy(policy::effective(dr, subset, port).load_balancer)
    }
}

fn redirect(r: &HttpRedirect) -> RedirectAction {
    use redirect_action::RedirectResponseCode as Code;
    let response_code = match r.redirect_code.unwrap_or(301) {
        302 => Code::Found,
        303 => Code::SeeOther,
        307 => Code::TemporaryRedirect,
        308 => Code::PermanentRedirect,
        _ => Code::MovedPermanently,
    };
    // derivePort FROM_PROTOCOL_DEFAULT: the scheme's own port.
    let derived = match (r.derive_port.as_deref(), r.scheme.as_deref()) {
        (Some("FROM_PROTOCOL_DEFAULT"), Some("https")) => 443,
        (Some("FROM_PROTOCOL_DEFAULT"), _) => 80,
        _ => 0,
    };
    RedirectAction {
        host_redirect: r.authority.clone().unwrap_or_default(),
        port_redirect: r.port.unwrap_or(derived),
        response_code: response_code as i32,
        scheme_rewrite_specifier: r
            .scheme
            .clone()
            .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
        // `%PREFIX()%PATH` replaces only the prefix the route matched, as
        // Istio reads it (its Gateway API conversion writes it so).
        path_rewrite_specifier: r.uri.as_deref().map(|uri| {
            match uri.strip_prefix(crate::config::istio::PREFIX_REDIRECT) {
                Some(prefix) => redirect_action::PathRewriteSpecifier::PrefixRewrite(prefix.to_string()),
                None => redirect_action::PathRewriteSpecifier::PathRedirect(uri.to_string()),
            }
        }),
        ..Default::default()
    }
}

/// Whether a VirtualService was converted from a Gateway API route (its
/// paths and its rules' order follow the Gateway API).
pub(super) fn gateway_semantics(vs: &VirtualService) -> bool {
    vs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::config::istio::ROUTE_SEMANTICS))
        .is_some_and(|v| v == "gateway")
}

/// Sorts the routes of Gateway API rules into the Gateway API's
/// precedence, as Istio sorts them: an exact path before a prefix before
/// a regex, a longer path first, then a method match, more header
/// matches, more query parameter matches. The sort is stable, so ties
/// keep the order they came in: the older route first, then the order
/// of its rules.
pub(super) fn sort_by_gateway_precedence(routes: &mut [Route]) {
    routes.sort_by_cached_key(|r| {
        let m = r.r#match.as_ref();
        let (rank, length) = match m.and_then(|m| m.path_specifier.as_ref()) {
            Some(route_match::PathSpecifier::Path(p)) => (3, p.len()),
            Some(
                route_match::PathSpecifier::PathSeparatedPrefix(p) | route_match::PathSpecifier::Prefix(p),
            ) => (2, p.len()),
            Some(route_match::PathSpecifier::SafeRegex(re)) => (1, re.regex.len()),
            _ => (0, 0),
        };
        let headers = m.map(|m| m.headers.as_slice()).unwrap_or_default();
        let method = headers.iter().any(|h| h.name == ":method");
        let header_count = headers.iter().filter(|h| h.name != ":method").count();
        let query_count = m.map_or(0, |m| m.query_parameters.len());
        std::cmp::Reverse((rank, length, method, header_count, query_count))
    });
}

/// How the Gateway API replaces a matched prefix (`ReplacePrefixMatch`):
/// by whole segments, so that `/foo` replaced by `/xyz` makes `/foo/bar`
/// `/xyz/bar`, and replaced by `/` makes it `/bar` (and `/foo` itself `/`),
/// where Envoy's plain prefix rewrite would make `//bar`.
enum PrefixReplacement {
    Prefix(String),
    Regex(RegexMatchAndSubstitute),
}

fn prefix_replacement(matched: &str, replacement: &str) -> PrefixReplacement {
    let matched = matched.trim_end_matches('/');
    let replacement = replacement.trim_end_matches('/');
    if replacement.is_empty() {
        PrefixReplacement::Regex(RegexMatchAndSubstitute {
            pattern: Some(regex(&format!("^{}/*", regex::escape(matched)))),
            substitution: "/".into(),
        })
    } else if matched.is_empty() {
        PrefixReplacement::Prefix(format!("{replacement}/"))
    } else {
        PrefixReplacement::Prefix(replacement.to_string())
    }
}

/// A Gateway API route's prefix rewrite or prefix redirect, made to
/// replace the segments `matched` matched (`prefix_replacement`).
fn replace_segments(route: &mut Route, matched: &str) {
    use redirect_action::PathRewriteSpecifier as Redirect;
    match &mut route.action {
        Some(route::Action::Route(a)) if !a.prefix_rewrite.is_empty() => {
            match prefix_replacement(matched, &a.prefix_rewrite) {
                PrefixReplacement::Prefix(p) => a.prefix_rewrite = p,
                PrefixReplacement::Regex(r) => {
                    a.prefix_rewrite.clear();
                    a.regex_rewrite = Some(r);
                }
            }
        }
        Some(route::Action::Redirect(r)) => {
            if let Some(Redirect::PrefixRewrite(p)) = &r.path_rewrite_specifier {
                r.path_rewrite_specifier = Some(match prefix_replacement(matched, p) {
                    PrefixReplacement::Prefix(p) => Redirect::PrefixRewrite(p),
                    PrefixReplacement::Regex(re) => Redirect::RegexRewrite(re),
                });
            }
        }
        _ => {}
    }
}

/// The Envoy match of a VirtualService match. `gateway_paths`: a prefix
/// matches whole path segments, as the Gateway API's PathPrefix does
/// (Envoy's `path_separated_prefix`; a trailing `/` is ignored).
fn route_match(m: Option<&HttpMatchRequest>, gateway_paths: bool) -> RouteMatch {
    let prefix = || Some(route_match::PathSpecifier::Prefix("/".into()));
    let Some(m) = m else {
        return RouteMatch {
            path_specifier: prefix(),
            ..Default::default()
        };
    };
    let path_specifier = match &m.uri {
        Some(StringMatch { exact: Some(p), .. }) => Some(route_match::PathSpecifier::Path(p.clone())),
        Some(StringMatch { prefix: Some(p), .. })
            if gateway_paths && !p.trim_end_matches('/').is_empty() && !p.contains(['?', '#']) =>
        {
            Some(route_match::PathSpecifier::PathSeparatedPrefix(
                p.trim_end_matches('/').to_string(),
            ))
        }
        Some(StringMatch { prefix: Some(p), .. }) => Some(route_match::PathSpecifier::Prefix(p.clone())),
        Some(StringMatch { regex: Some(r), .. }) => Some(route_match::PathSpecifier::SafeRegex(regex(r))),
        _ => prefix(),
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, sm)| header(name, sm, false))
        .collect();
    for (pseudo, sm) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(sm) = sm {
            headers.push(header(pseudo, sm, false));
        }
    }
    headers.extend(m.without_headers.iter().map(|(name, sm)| header(name, sm, true)));
    let query_parameters = m
        .query_params
        .iter()
        .map(|(name, sm)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(match string_matcher(sm) {
                Some(s) => query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s),
                None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
            }),
        })
        .collect();
    RouteMatch {
        path_specifier,
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn header(name: &str, sm: &StringMatch, invert: bool) -> HeaderMatcher {
    let spec = match string_matcher(sm) {
        Some(s) => header_matcher::HeaderMatchSpecifier::StringMatch(s),
        None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
    };
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        header_match_specifier: Some(spec),
        invert_match: invert,
        ..Default::default()
    }
}

/// Istio's StringMatch as Envoy's; `None` for the empty (presence) match.
pub(super) fn string_matcher_of(sm: &StringMatch) -> Option<StringMatcher> {
    string_matcher(sm)
}

fn string_matcher(sm: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(e) = &sm.exact {
        string_matcher::MatchPattern::Exact(e.clone())
    } else if let Some(p) = &sm.prefix {
        string_matcher::MatchPattern::Prefix(p.clone())
    } else {
        string_matcher::MatchPattern::SafeRegex(regex(sm.regex.as_deref()?))
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}
