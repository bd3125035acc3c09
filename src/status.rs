//! Writes what meshd concluded back to the cluster (`meshd serve --kube`),
//! through each resource's `status` subresource:
//!
//! - Gateway API resources get the conditions the Gateway API asks of a
//!   controller (GatewayClass `Accepted`; Gateway `Accepted`/`Programmed`
//!   and per listener; HTTPRoute per parent), always;
//! - Istio resources get the analyzers' findings as
//!   `status.validationMessages` (Istio's shape: `type.code`, `level`,
//!   `documentationUrl`), when `--write-analysis-status` asks for it, as
//!   istiod does with `PILOT_ENABLE_ANALYSIS`.
//!
//! A status is written only when it differs from the one the resource
//! carries, and a condition keeps its `lastTransitionTime` while its status
//! stays the same, so replicas writing the same conclusions agree at once
//! and a write never triggers another.
//!
//! meshd writes only its part of a status (an HTTPRoute's parent entries
//! of its own controller, an Istio resource's `validationMessages`): the
//! rest is another writer's. So each write reads the status as the API
//! server has it now, puts meshd's part into it and replaces it on the
//! condition that the object is still at the version read (its
//! `resourceVersion`); when another writer came in between (409
//! Conflict), it reads again. A write never drops what another controller
//! wrote, even one meshd's watch has not brought yet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, PostParams};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::analyze::{Analysis, Finding, Level};
use crate::config::{Kind, Resource, ResourceKey};
use crate::model::gateway_api::CONTROLLER_NAME;
use crate::model::gateway_status::{status_of, with_others};
use crate::model::PushContext;
use crate::xds::Registry;

/// How often statuses are looked at again without a config change (a
/// Gateway's proxy connecting makes it `Programmed`).
const RECHECK: Duration = Duration::from_secs(5);

/// The Istio kinds that carry analysis messages.
const ISTIO_KINDS: &[Kind] = &[
    Kind::Gateway,
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::ServiceEntry,
    Kind::Sidecar,
    Kind::PeerAuthentication,
    Kind::RequestAuthentication,
    Kind::AuthorizationPolicy,
];

/// Keeps the cluster's statuses in line with each analyzed generation
/// (`meshd serve`'s analyzer hands each on once it is analyzed), for as
/// long as `analyzed` has a sender.
pub async fn write_statuses(
    client: Client,
    mut analyzed: watch::Receiver<Option<Arc<Analysis>>>,
    registry: Arc<Registry>,
    analysis: bool,
) {
    let mut tick = tokio::time::interval(RECHECK);
    // What was last written, by resource: a resource whose new version was
    // rejected keeps its last good version (and that version's status) in
    // the config, and must not be written to again and again.
    let mut written: BTreeMap<ResourceKey, Value> = BTreeMap::new();
    // The findings of the generation last analyzed: they change with the
    // config only, while the tick is for proxies coming and going.
    let mut by_resource: Option<(u64, Findings)> = None;
    loop {
        tokio::select! {
            changed = analyzed.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(latest) = analyzed.borrow_and_update().clone() else {
            continue; // the first generation is not analyzed yet
        };
        let push = &latest.push;
        let generation = push.config.generation;
        if analysis && by_resource.as_ref().is_none_or(|(g, _)| *g != generation) {
            let mut findings = Findings::new();
            for f in &latest.findings {
                findings.entry(f.resource.clone()).or_default().push(f.clone());
            }
            by_resource = Some((generation, findings));
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let findings = by_resource.as_ref().map(|(_, f)| f);
        for (key, resource, status) in desired(push, &registry, findings) {
            // Judged first against the resource as meshd last read it: no
            // request when that already carries meshd's conclusions.
            let current = current_status(&resource);
            let status = keep_transition_times(status, &current, &now);
            if status == current || written.get(&key) == Some(&status) {
                continue;
            }
            match write(&client, &key, &status, &now).await {
                Ok(true) => {
                    written.insert(key, status);
                }
                Ok(false) => {} // deleted meanwhile: its watch event is coming
                Err(e) => tracing::warn!("writing the status of {key}: {e}"),
            }
        }
        written.retain(|key, _| push.config.resources.contains_key(key));
    }
}

/// Analyzer findings by the resource they name (`Kind ns/name`).
type Findings = BTreeMap<String, Vec<Finding>>;

/// Every status meshd means to write: (resource, its current object,
/// status); with `findings`, the Istio resources' validation messages too.
fn desired(
    push: &PushContext,
    registry: &Registry,
    findings: Option<&Findings>,
) -> Vec<(ResourceKey, Arc<Resource>, Value)> {
    let config = &*push.config;
    let proxies: Vec<crate::model::Proxy> = registry.list().into_iter().map(|c| c.proxy).collect();
    let mut out = Vec::new();
    for (key, entry) in &config.resources {
        if let Some(status) = status_of(config, &entry.resource, &proxies) {
            out.push((key.clone(), entry.resource.clone(), status));
        }
    }
    if let Some(findings) = findings {
        for (key, entry) in config
            .resources
            .iter()
            .filter(|(k, _)| ISTIO_KINDS.contains(&k.kind))
        {
            let messages: Vec<Value> = findings
                .get(&key.to_string())
                .into_iter()
                .flatten()
                .map(validation_message)
                .collect();
            let current = current_status(&entry.resource);
            if messages.is_empty() && current.get("validationMessages").is_none() {
                continue;
            }
            let status = onto(key.kind, &json!({ "validationMessages": messages }), &current);
            out.push((key.clone(), entry.resource.clone(), status));
        }
    }
    out
}

/// A finding as Istio writes it into `status.validationMessages`.
fn validation_message(f: &Finding) -> Value {
    let level = match f.level {
        Level::Error => "ERROR",
        Level::Warning => "WARNING",
        Level::Info => "INFO",
    };
    let mut message = json!({"type": {"code": f.code}, "level": level});
    // Istio documents its own codes; meshd's (MSH) are in its README.
    if f.code.starts_with("IST") {
        message["documentationUrl"] = json!(format!(
            "https://istio.io/latest/docs/reference/config/analysis/{}/",
            f.code.to_lowercase()
        ));
    }
    message
}

/// The status the resource carries now (`null` when none).
fn current_status(resource: &Resource) -> Value {
    let status = match resource {
        Resource::Gateway(r) => &r.status,
        Resource::VirtualService(r) => &r.status,
        Resource::DestinationRule(r) => &r.status,
        Resource::ServiceEntry(r) => &r.status,
        Resource::Sidecar(r) => &r.status,
        Resource::PeerAuthentication(r) => &r.status,
        Resource::RequestAuthentication(r) => &r.status,
        Resource::AuthorizationPolicy(r) => &r.status,
        Resource::GatewayClass(r) => &r.status,
        Resource::K8sGateway(r) => &r.status,
        Resource::HttpRoute(r) => &r.status,
        Resource::GrpcRoute(r) => &r.status,
        Resource::TcpRoute(r) | Resource::TlsRoute(r) => &r.status,
        _ => &None,
    };
    status.clone().unwrap_or(Value::Null)
}

/// Gives every condition in `status` a `lastTransitionTime`: the one the
/// same condition has in `current` when its status did not change, else
/// `now`.
fn keep_transition_times(mut status: Value, current: &Value, now: &str) -> Value {
    fn walk(v: &mut Value, current: &Value, now: &str) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(conditions)) = map.get_mut("conditions") {
                    let before = current.get("conditions").and_then(Value::as_array);
                    for c in conditions.iter_mut() {
                        let same = before.and_then(|b| {
                            b.iter()
                                .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                        });
                        let time = same
                            .and_then(|o| o.get("lastTransitionTime"))
                            .cloned()
                            .unwrap_or_else(|| json!(now));
                        c["lastTransitionTime"] = time;
                    }
                }
                for (k, child) in map.iter_mut().filter(|(k, _)| k.as_str() != "conditions") {
                    walk(child, current.get(k).unwrap_or(&Value::Null), now);
                }
            }
            Value::Array(items) => {
                // Listeners (by name) and route parents (by parentRef and
                // controller, as other controllers' entries sit among
                // meshd's): matched by what they are about, else by
                // position.
                let before = current.as_array();
                for (i, item) in items.iter_mut().enumerate() {
                    let about = entry_of(item);
                    let same = before
                        .filter(|_| about != (None, None, None))
                        .and_then(|b| b.iter().find(|o| entry_of(o) == about));
                    walk(item, same.or_else(|| current.get(i)).unwrap_or(&Value::Null), now);
                }
            }
            _ => {}
        }
    }
    walk(&mut status, current, now);
    status
}

/// What a listener's or a route parent's status entry is about.
fn entry_of(v: &Value) -> (Option<&Value>, Option<&Value>, Option<&Value>) {
    (v.get("name"), v.get("parentRef"), v.get("controllerName"))
}

/// `ours` (a whole status, of which meshd writes only its part: `onto`)
/// put into the status `current`, as the API server has it.
fn onto(kind: Kind, ours: &Value, current: &Value) -> Value {
    let mut status = match current {
        Value::Object(_) => current.clone(),
        _ => json!({}),
    };
    match kind {
        // meshd's own parent entries, then every other controller's.
        Kind::HttpRoute | Kind::GrpcRoute | Kind::TcpRoute | Kind::TlsRoute => {
            let entries = ours["parents"].as_array().into_iter().flatten();
            let mine = entries
                .filter(|p| p["controllerName"] == CONTROLLER_NAME)
                .cloned();
            status["parents"] = Value::Array(with_others(mine.collect(), current));
        }
        // meshd is the controller of the classes and Gateways it writes.
        Kind::GatewayClass | Kind::K8sGateway => status = ours.clone(),
        // The analysis: the rest is Istio's other writers'.
        _ => status["validationMessages"] = ours["validationMessages"].clone(),
    }
    status
}

/// Times the status of one resource is read and written again when another
/// writer keeps coming in between (409 Conflict); then the next look (a
/// config change, or `RECHECK`) tries again.
const WRITE_TRIES: usize = 3;

/// Writes meshd's part of `ours` into the resource's status as the API
/// server has it now, on the condition that it is still that version:
/// true once the status holds it, false when the resource is gone.
async fn write(client: &Client, key: &ResourceKey, ours: &Value, now: &str) -> Result<bool, String> {
    let resource = crate::source::api_resource(key.kind).ok_or("not a kind meshd writes")?;
    let api: Api<DynamicObject> = match &*key.namespace {
        "" => Api::all_with(client.clone(), &resource),
        ns => Api::namespaced_with(client.clone(), ns, &resource),
    };
    for _ in 0..WRITE_TRIES {
        let read = match api.get_status(&key.name).await {
            Ok(read) => read,
            // Deleted since meshd's watch last saw it: nothing to write.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            Err(e) => return Err(e.to_string()),
        };
        let current = read.data.get("status").cloned().unwrap_or(Value::Null);
        let status = keep_transition_times(onto(key.kind, ours, &current), &current, now);
        if status == current {
            return Ok(true);
        }
        let mut metadata = json!({
            "name": key.name,
            "resourceVersion": read.metadata.resource_version,
        });
        if !key.namespace.is_empty() {
            metadata["namespace"] = json!(key.namespace);
        }
        let body = json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": metadata,
            "status": status,
        });
        let object: DynamicObject = serde_json::from_value(body).map_err(|e| e.to_string())?;
        match api
            .replace_status(&key.name, &PostParams::default(), &object)
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!("the status of {key} changed while being written; reading it again");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "another writer changed it each of the {WRITE_TRIES} times it was read"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let current = json!({"conditions": [
            {"type": "Accepted", "status": "True", "lastTransitionTime": "T0"},
            {"type": "Programmed", "status": "False", "lastTransitionTime": "T0"}],
            "listeners": [{"name": "http", "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "T0"}]}]});
        let next = json!({"conditions": [
            {"type": "Accepted", "status": "True"},
            {"type": "Programmed", "status": "True"}],
            "listeners": [{"name": "http", "conditions": [{"type": "Accepted", "status": "True"}]}]});
        let out = keep_transition_times(next, &current, "T1");
        assert_eq!(out["conditions"][0]["lastTransitionTime"], "T0");
        assert_eq!(out["conditions"][1]["lastTransitionTime"], "T1");
        assert_eq!(out["listeners"][0]["conditions"][0]["lastTransitionTime"], "T0");
        // Written once, the same conclusions compare equal next time.
        let again = keep_transition_times(strip_times(out.clone()), &out, "T2");
        assert_eq!(again, out);
    }

    #[test]
    fn a_parent_keeps_its_transition_times_wherever_it_moved() {
        let theirs = json!({"parentRef": {"name": "theirs"}, "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "T0"}]});
        let current = json!({"parents": [theirs.clone(),
            {"parentRef": {"name": "web"}, "controllerName": CONTROLLER_NAME,
             "conditions": [{"type": "Accepted", "status": "False", "lastTransitionTime": "T0"}]}]});
        let next = json!({"parents": [
            {"parentRef": {"name": "web"}, "controllerName": CONTROLLER_NAME,
             "conditions": [{"type": "Accepted", "status": "False"}]},
            theirs.clone()]});
        let out = keep_transition_times(next, &current, "T1");
        assert_eq!(out["parents"][0]["conditions"][0]["lastTransitionTime"], "T0");
        assert_eq!(
            out["parents"][1], theirs,
            "another controller's entry is left as it was"
        );
    }

    #[test]
    fn meshd_writes_its_part_into_the_status_as_it_is_now() {
        let parent = |name: &str, controller: &str| json!({"parentRef": {"name": name}, "controllerName": controller, "conditions": []});
        // Concluded from an older read: another controller's entry since
        // gone, and none yet of the one that wrote since.
        let ours = json!({"parents": [parent("web", CONTROLLER_NAME), parent("old", "example.com/a")]});
        let now = json!({"parents": [parent("web", CONTROLLER_NAME), parent("new", "example.com/b")]});
        assert_eq!(
            onto(Kind::HttpRoute, &ours, &now),
            json!({"parents": [parent("web", CONTROLLER_NAME), parent("new", "example.com/b")]})
        );
        assert_eq!(
            onto(Kind::HttpRoute, &ours, &Value::Null),
            json!({"parents": [parent("web", CONTROLLER_NAME)]})
        );
        // The analysis leaves whatever else an Istio resource's status holds.
        let ours = json!({"validationMessages": [{"type": {"code": "IST0101"}}], "conditions": []});
        let now = json!({"conditions": [{"type": "Reconciled", "status": "True"}], "validationMessages": []});
        assert_eq!(
            onto(Kind::VirtualService, &ours, &now),
            json!({"conditions": [{"type": "Reconciled", "status": "True"}],
                   "validationMessages": [{"type": {"code": "IST0101"}}]})
        );
        // A Gateway's status is all meshd's, as its controller.
        let gateway = json!({"conditions": [{"type": "Accepted", "status": "True"}]});
        assert_eq!(
            onto(Kind::K8sGateway, &gateway, &json!({"addresses": []})),
            gateway
        );
    }

    fn strip_times(mut v: Value) -> Value {
        match &mut v {
            Value::Object(m) => {
                m.remove("lastTransitionTime");
                for child in m.values_mut() {
                    *child = strip_times(child.take());
                }
            }
            Value::Array(a) => {
                for child in a.iter_mut() {
                    *child = strip_times(child.take());
                }
            }
            _ => {}
        }
        v
    }
}
