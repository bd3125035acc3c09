//! Sends a request through a generated RouteConfiguration the way Envoy's
//! router picks a virtual host and a route, and says where it lands. Used by
//! the behaviour tests (and by `meshd dump routes` to explain a 404).

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, route, route_action, route_match, HeaderMatcher, Route, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use serde::Serialize;

/// A request as the router sees it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The `Host`/`:authority` header.
    pub host: String,
    /// The path, with any query string.
    pub path: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
}

/// Where a request lands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Routed to one cluster.
    Cluster { virtual_host: String, cluster: String },
    /// Split across clusters by weight.
    Weighted {
        virtual_host: String,
        clusters: Vec<(String, u32)>,
    },
    /// Answered with a redirect.
    Redirect {
        virtual_host: String,
        status: u32,
        location: String,
    },
    /// Answered directly.
    Direct { virtual_host: String, status: u32 },
    /// A 301 to https because the virtual host requires TLS.
    RequireTls { virtual_host: String },
    /// No virtual host or no route matched: Envoy answers 404.
    NotFound { reason: String },
}

/// Routes `req` through `rc`.
pub fn route(rc: &RouteConfiguration, req: &Request) -> Outcome {
    let Some(vh) = virtual_host(rc, &req.host.to_ascii_lowercase()) else {
        return Outcome::NotFound {
            reason: format!("no virtual host of {} matches host {:?}", rc.name, req.host),
        };
    };
    let virtual_host = vh.name.clone();
    if vh.require_tls != 0 {
        return Outcome::RequireTls { virtual_host };
    }
    let Some(r) = vh.routes.iter().find(|r| matches(r, req)) else {
        return Outcome::NotFound {
            reason: format!(
                "no route of virtual host {virtual_host} matches {} {}",
                req.method, req.path
            ),
        };
    };
    match &r.action {
        Some(route::Action::Route(a)) => match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => Outcome::Cluster {
                virtual_host,
                cluster: c.clone(),
            },
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => Outcome::Weighted {
                virtual_host,
                clusters: w
                    .clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                    .collect(),
            },
            _ => Outcome::NotFound {
                reason: "route without a cluster".into(),
            },
        },
        Some(route::Action::Redirect(r)) => {
            let location = format!(
                "{}{}",
                if r.host_redirect.is_empty() { &req.host } else { &r.host_redirect },
                match &r.path_rewrite_specifier {
                    Some(envoy_types::pb::envoy::config::route::v3::redirect_action::PathRewriteSpecifier::PathRedirect(p)) => p.as_str(),
                    _ => req.path.as_str(),
                }
            );
            let status = match r.response_code {
                1 => 302,
                2 => 303,
                3 => 307,
                4 => 308,
                _ => 301,
            };
            Outcome::Redirect {
                virtual_host,
                status,
                location,
            }
        }
        Some(route::Action::DirectResponse(d)) => Outcome::Direct {
            virtual_host,
            status: d.status,
        },
        _ => Outcome::NotFound {
            reason: "route without an action".into(),
        },
    }
}

/// Envoy's virtual host selection: an exact domain, then the longest
/// suffix wildcard (`*.foo.com`), then the longest prefix wildcard
/// (`foo.com:*`), then `*`.
fn virtual_host<'a>(rc: &'a RouteConfiguration, host: &str) -> Option<&'a VirtualHost> {
    let domains = || {
        rc.virtual_hosts
            .iter()
            .flat_map(|vh| vh.domains.iter().map(move |d| (d.as_str(), vh)))
    };
    if let Some((_, vh)) = domains().find(|(d, _)| *d == host) {
        return Some(vh);
    }
    let best = |pick: &dyn Fn(&str) -> Option<usize>| {
        domains()
            .filter_map(|(d, vh)| pick(d).map(|len| (len, vh)))
            .max_by_key(|(len, _)| *len)
            .map(|(_, vh)| vh)
    };
    best(&|d| {
        let suffix = d.strip_prefix('*').filter(|s| !s.is_empty())?;
        (host.len() > suffix.len() && host.ends_with(suffix)).then_some(suffix.len())
    })
    .or_else(|| {
        best(&|d| {
            let prefix = d.strip_suffix('*').filter(|p| !p.is_empty())?;
            (host.len() > prefix.len() && host.starts_with(prefix)).then_some(prefix.len())
        })
    })
    .or_else(|| domains().find(|(d, _)| *d == "*").map(|(_, vh)| vh))
}

fn matches(r: &Route, req: &Request) -> bool {
    let Some(m) = &r.r#match else { return false };
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let path = req.path.split('?').next().unwrap_or_default();
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let p = fold(path);
    let path_ok = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(x)) => p.starts_with(&fold(x)),
        Some(route_match::PathSpecifier::Path(x)) => p == fold(x),
        // The prefix, then the end of the path or a `/` (the query and
        // fragment are gone already).
        Some(route_match::PathSpecifier::PathSeparatedPrefix(x)) => p
            .strip_prefix(&fold(x))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        Some(route_match::PathSpecifier::SafeRegex(re)) => full_match(&re.regex, path),
        _ => false,
    };
    path_ok && m.headers.iter().all(|h| header_ok(h, req))
}

fn header_value<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    match name {
        ":authority" => Some(req.host.as_str()),
        ":method" => Some(req.method.as_str()),
        ":path" => Some(req.path.as_str()),
        ":scheme" => Some("http"),
        _ => req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str()),
    }
}

fn header_ok(h: &HeaderMatcher, req: &Request) -> bool {
    let value = header_value(req, &h.name);
    let ok = match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(p)) => value.is_some() == *p,
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => {
            value.is_some_and(|v| string_ok(sm, v))
        }
        _ => false,
    };
    ok != h.invert_match
}

fn string_ok(sm: &StringMatcher, v: &str) -> bool {
    match &sm.match_pattern {
        Some(string_matcher::MatchPattern::Exact(x)) => v == x,
        Some(string_matcher::MatchPattern::Prefix(x)) => v.starts_with(x.as_str()),
        Some(string_matcher::MatchPattern::Suffix(x)) => v.ends_with(x.as_str()),
        Some(string_matcher::MatchPattern::Contains(x)) => v.contains(x.as_str()),
        Some(string_matcher::MatchPattern::SafeRegex(re)) => full_match(&re.regex, v),
        _ => false,
    }
}

/// RE2 full match, as Envoy's safe_regex does.
fn full_match(re: &str, v: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(v))
}
