//! The parts of a VirtualService HTTP rule beyond where it goes: retries
//! (Istio's default when none is given), fault injection, mirroring, CORS
//! and header changes, as Envoy route settings.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option, HeaderValue, HeaderValueOption, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    retry_policy, route_action, CorsPolicy, RetryPolicy, Route, RouteAction,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{fault_delay, FaultDelay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, FaultAbort, HttpFault};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent, FractionalPercent};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;

use super::duration;
use crate::config::istio::{HeaderOperations, HttpRetry, HttpRoute, Percent, RETRY_ON_FAILURES};
use crate::config::parse_duration;

/// The name of Envoy's fault filter, which gateways and sidecars carry.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Istio's retry policy when a rule says nothing: 2 attempts on
/// connection failures, refused streams, unavailable, cancelled and 503.
fn default_retries() -> RetryPolicy {
    retry(&HttpRetry {
        attempts: 2,
        ..Default::default()
    })
}

fn retry(r: &HttpRetry) -> RetryPolicy {
    let default_on = format!("{RETRY_ON_FAILURES},503");
    let on = r.retry_on.as_deref().unwrap_or(&default_on);
    let mut retry_on: Vec<String> = Vec::new();
    let mut codes = Vec::new();
    for part in on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => retry_on.push(part.to_string()),
        }
    }
    if !codes.is_empty() && !retry_on.iter().any(|p| p == "retriable-status-codes") {
        retry_on.push("retriable-status-codes".into());
    }
    RetryPolicy {
        retry_on: retry_on.join(","),
        num_retries: Some(UInt32Value {
            value: u32::try_from(r.attempts.max(0)).unwrap_or(0),
        }),
        per_try_timeout: r
            .per_try_timeout
            .as_deref()
            .and_then(parse_duration)
            .map(duration),
        retriable_status_codes: codes,
        retry_back_off: r.backoff.as_deref().and_then(parse_duration).map(|base| {
            retry_policy::RetryBackOff {
                base_interval: Some(duration(base)),
                max_interval: None,
            }
        }),
        // Try another endpoint than the one that failed, as Istio does.
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                pack_any(PreviousHostsPredicate::default()),
            )),
        }],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

fn percent(p: Option<&Percent>, legacy: Option<i32>) -> Option<FractionalPercent> {
    let value = p.map(|p| p.value).or(legacy.map(f64::from)).unwrap_or(100.0);
    Some(FractionalPercent {
        numerator: (value.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    })
}

/// Retries, mirrors and CORS on the route action.
#[allow(deprecated)]
pub fn apply_to_action(rule: &HttpRoute, action: &mut RouteAction, mirrors: Vec<(String, Option<f64>)>) {
    action.cors = cors(rule);
    action.retry_policy = Some(match &rule.retries {
        None => default_retries(),
        Some(r) if r.attempts <= 0 => RetryPolicy {
            num_retries: Some(UInt32Value { value: 0 }),
            ..Default::default()
        },
        Some(r) => retry(r),
    });
    action.request_mirror_policies = mirrors
        .into_iter()
        .map(|(cluster, share)| route_action::RequestMirrorPolicy {
            cluster,
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: percent(share.map(|value| Percent { value }).as_ref(), None),
                runtime_key: String::new(),
            }),
            ..Default::default()
        })
        .collect();
}

pub(super) fn header_options(ops: &HeaderOperations) -> Vec<HeaderValueOption> {
    let option =
        |k: &String, v: &String, action: header_value_option::HeaderAppendAction| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        };
    let set = ops.set.iter().map(|(k, v)| {
        option(
            k,
            v,
            header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd,
        )
    });
    let add = ops
        .add
        .iter()
        .map(|(k, v)| option(k, v, header_value_option::HeaderAppendAction::AppendIfExistsOrAdd));
    set.chain(add).collect()
}

/// Istio's corsPolicy as the route's CORS policy (read by the CORS filter
/// every HTTP connection manager carries).
pub fn cors(rule: &HttpRoute) -> Option<CorsPolicy> {
    let c = rule.cors_policy.as_ref()?;
    let origins = c
        .allow_origins
        .iter()
        .filter_map(super::route::string_matcher_of)
        .chain(c.allow_origin.iter().map(|o| StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(o.clone())),
            ignore_case: false,
        }))
        .collect();
    let max_age = c
        .max_age
        .as_deref()
        .and_then(parse_duration)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    Some(CorsPolicy {
        allow_origin_string_match: origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age,
        allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
        forward_not_matching_preflights: c
            .unmatched_preflights
            .as_deref()
            .map(|u| BoolValue { value: u != "IGNORE" }),
        ..Default::default()
    })
}

/// Header changes and fault injection on the route.
pub fn apply_to_route(rule: &HttpRoute, route: &mut Route) {
    if let Some(h) = &rule.headers {
        if let Some(req) = &h.request {
            route.request_headers_to_add = header_options(req);
            route.request_headers_to_remove = req.remove.clone();
        }
        if let Some(resp) = &h.response {
            route.response_headers_to_add = header_options(resp);
            route.response_headers_to_remove = resp.remove.clone();
        }
    }
    if let Some(f) = &rule.fault {
        let delay = f.delay.as_ref().and_then(|d| {
            let fixed = d.fixed_delay.as_deref().and_then(parse_duration)?;
            Some(FaultDelay {
                fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(duration(fixed))),
                percentage: percent(d.percentage.as_ref(), d.percent),
            })
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let status = u32::try_from(a.http_status?).ok()?;
            Some(FaultAbort {
                error_type: Some(fault_abort::ErrorType::HttpStatus(status)),
                percentage: percent(a.percentage.as_ref(), None),
                ..Default::default()
            })
        });
        let fault = HttpFault {
            delay,
            abort,
            ..Default::default()
        };
        // One entry: prost encodes a map in iteration order, and a
        // single-entry map has only one.
        route.typed_per_filter_config = HashMap::from([(FAULT_FILTER.to_string(), pack_any(fault))]);
    }
}
