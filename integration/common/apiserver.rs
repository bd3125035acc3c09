//! A Kubernetes API server for tests, on loopback: it answers list, watch,
//! get, create, replace and delete in the API server's own wire format
//! (`<Kind>List` with `metadata.resourceVersion` and `continue`, watch
//! events as chunked JSON lines, BOOKMARK events, a `410 Gone` ERROR event
//! for a resourceVersion older than the compacted history, `Status` bodies
//! for 404 and 409) and records every request it gets.
//!
//! No real API server can run on these machines; this one keeps objects in
//! memory and knows nothing of schemas, which the code under test does not
//! rely on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One request, as the RBAC check needs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    /// get, list, watch, create, update, delete (the RBAC verbs).
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    /// The resource, with `/subresource` when one was named.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// The `fieldSelector` of a list or watch.
    pub field_selector: String,
}

/// Where a request points.
#[derive(Debug, Clone)]
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: String,
    name: String,
    subresource: String,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let (namespace, plural, name, subresource) = match rest {
            [plural] => ("", *plural, "", ""),
            ["namespaces", ns, plural] => (*ns, *plural, "", ""),
            ["namespaces", ns, plural, name] => (*ns, *plural, *name, ""),
            ["namespaces", ns, plural, name, sub] => (*ns, *plural, *name, *sub),
            [plural, name] => ("", *plural, *name, ""),
            [plural, name, sub] => ("", *plural, *name, *sub),
            _ => return None,
        };
        Some(Target {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            namespace: namespace.into(),
            name: name.into(),
            subresource: subresource.into(),
        })
    }

    fn api_version(&self) -> String {
        match self.group.as_str() {
            "" => self.version.clone(),
            g => format!("{g}/{}", self.version),
        }
    }

    /// The key objects of this resource are stored under.
    fn collection(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }
}

/// One change, kept for watches that start from an older version.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a version below this one get `410 Gone`.
    compacted: u64,
    /// collection → (namespace, name) → object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    requests: Vec<Request>,
    /// Answers for TokenReview, by token.
    tokens: BTreeMap<String, Value>,
    /// Collections this server does not serve (a CRD not installed).
    refused: Vec<String>,
    /// Statuses another writer stores just before the next status update
    /// of their object arrives: (collection, namespace, name) → status.
    races: BTreeMap<(String, String, String), Value>,
}

/// The running server. Dropping it stops it.
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Option<Change>>,
    _runtime: tokio::runtime::Runtime,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        ApiServer::start_at(0)
    }

    /// Starts on a chosen loopback port (0: any).
    pub fn start_at(port: u16) -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..State::default()
        }));
        let (changes, _) = broadcast::channel(4096);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler = {
            let state = state.clone();
            let changes = changes.clone();
            move |method: Method, uri: Uri, body: Bytes| {
                let state = state.clone();
                let changes = changes.clone();
                async move { handle(state, changes, method, uri, body) }
            }
        };
        let app = axum::Router::new().fallback(handler);
        runtime.spawn(async move { axum::serve(listener, app).await });
        ApiServer {
            addr,
            state,
            changes,
            _runtime: runtime,
        }
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        kubeconfig(path, self.addr.port());
    }

    /// Creates or replaces an object (from YAML), as `kubectl apply` would,
    /// and tells the watches.
    pub fn apply(&self, yaml: &str) {
        for object in documents(yaml) {
            self.store(object, true);
        }
    }

    /// Changes an object without any watch seeing it, as a change made while
    /// a watch was down and then compacted away; only a relist finds it.
    pub fn apply_unwatched(&self, yaml: &str) {
        for object in documents(yaml) {
            self.store(object, false);
        }
    }

    /// Deletes an object without any watch seeing it (see `apply_unwatched`).
    pub fn delete_unwatched(&self, api_version: &str, plural: &str, namespace: &str, name: &str) {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let mut s = self.state.lock().expect("state");
        s.rv += 1;
        s.objects
            .get_mut(&format!("{group}/{plural}"))
            .and_then(|m| m.remove(&(namespace.to_string(), name.to_string())))
            .unwrap_or_else(|| panic!("no {plural} {namespace}/{name} to delete"));
    }

    fn store(&self, mut object: Value, tell: bool) {
        let target = target_of(&object);
        let mut s = self.state.lock().expect("state");
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (target.namespace.clone(), target.name.clone());
        let objects = s.objects.entry(target.collection()).or_default();
        // A write to the resource itself leaves its status alone, as the
        // API server does for kinds with a status subresource.
        if let Some(status) = objects
            .get(&key)
            .map(|o| o["status"].clone())
            .filter(|s| !s.is_null())
        {
            object["status"] = status;
        }
        let existed = objects.insert(key, object.clone()).is_some();
        if tell {
            let kind = if existed { "MODIFIED" } else { "ADDED" };
            record(&mut s, &self.changes, target.collection(), kind, object);
        }
    }

    /// Deletes an object and tells the watches.
    pub fn delete(&self, api_version: &str, plural: &str, namespace: &str, name: &str) {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let collection = format!("{group}/{plural}");
        let mut s = self.state.lock().expect("state");
        let removed = s
            .objects
            .get_mut(&collection)
            .and_then(|m| m.remove(&(namespace.to_string(), name.to_string())));
        let Some(mut object) = removed else {
            panic!("no {collection} {namespace}/{name} to delete");
        };
        s.rv += 1;
        object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        record(&mut s, &self.changes, collection, "DELETED", object);
    }

    /// Compacts the history: a watch from any version seen so far gets
    /// `410 Gone`. Open watches are closed, as an API server restart does.
    pub fn expire_history(&self) {
        let mut s = self.state.lock().expect("state");
        s.rv += 1;
        s.compacted = s.rv;
        drop(s);
        let _ = self.changes.send(None);
    }

    /// Closes every open watch; clients come back from the version they saw.
    pub fn drop_watches(&self) {
        let _ = self.changes.send(None);
    }

    /// The object stored under this API path, if any.
    pub fn get(&self, api_version: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let s = self.state.lock().expect("state");
        s.objects
            .get(&format!("{group}/{plural}"))
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Every object of a resource.
    pub fn list(&self, api_version: &str, plural: &str) -> Vec<Value> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let s = self.state.lock().expect("state");
        s.objects
            .get(&format!("{group}/{plural}"))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The TokenReview answer for `token`: authenticated as `username` with
    /// the bound pod's name, or not at all when `username` is `None`.
    pub fn token(&self, token: &str, username: Option<&str>, pod: &str) {
        let status = match username {
            Some(user) => json!({
                "authenticated": true,
                "audiences": ["istio-ca"],
                "user": {"username": user, "uid": "u-1", "groups": ["system:serviceaccounts"],
                         "extra": {"authentication.kubernetes.io/pod-name": [pod],
                                   "authentication.kubernetes.io/pod-uid": ["p-1"]}}
            }),
            None => json!({"authenticated": false, "error": "token is not valid"}),
        };
        self.state
            .lock()
            .expect("state")
            .tokens
            .insert(token.to_string(), status);
    }

    /// Stops serving a resource (`group/plural`, `""` for the core group),
    /// as a cluster without that CRD or API: every request gets 404.
    pub fn refuse(&self, group: &str, plural: &str) {
        self.state
            .lock()
            .expect("state")
            .refused
            .push(format!("{group}/{plural}"));
    }

    /// Serves a resource `refuse` stopped serving, as a cluster where its
    /// CRD has just been installed.
    pub fn install(&self, group: &str, plural: &str) {
        let collection = format!("{group}/{plural}");
        self.state
            .lock()
            .expect("state")
            .refused
            .retain(|r| *r != collection);
    }

    /// Has another writer store `status` into an object just before the
    /// next update of its status arrives, as a controller writing between
    /// a client's read and its write: that update conflicts (409) when it
    /// asks for the version it read.
    pub fn race_status_update(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let object = (
            format!("{group}/{plural}"),
            namespace.to_string(),
            name.to_string(),
        );
        self.state.lock().expect("state").races.insert(object, status);
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("state").requests.clone()
    }
}

/// Writes a kubeconfig for an API server on this loopback port.
pub fn kubeconfig(path: &std::path::Path, port: u16) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: 'http://127.0.0.1:{port}'}}\n\
         users:\n- name: test\n  user: {{token: test-token}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\n\
         current-context: test\n"
    );
    std::fs::write(path, text).expect("kubeconfig");
}

fn record(
    s: &mut State,
    changes: &broadcast::Sender<Option<Change>>,
    collection: String,
    kind: &'static str,
    object: Value,
) {
    let change = Change {
        rv: s.rv,
        collection,
        kind,
        object,
    };
    s.history.push(change.clone());
    let _ = changes.send(Some(change));
}

fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| {
            let v = serde_norway::Value::deserialize(doc).expect("test YAML");
            serde_json::to_value(v).expect("JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Where an object of a manifest is stored: its plural is its kind
/// lower-cased with an `s` (`-es`/`-ies` as English has them: a policy,
/// policies; a gateway, gateways).
fn target_of(object: &Value) -> Target {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind").to_lowercase();
    let plural = if kind.ends_with('y') && !kind.ends_with("ay") {
        format!("{}ies", &kind[..kind.len() - 1])
    } else if kind.ends_with('s') {
        format!("{kind}es")
    } else if kind == "endpoints" {
        kind
    } else {
        format!("{kind}s")
    };
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    Target {
        group: group.into(),
        version: version.into(),
        plural,
        namespace: object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .into(),
        name: object["metadata"]["name"].as_str().expect("name").into(),
        subresource: String::new(),
    }
}

fn kind_of(plural: &str) -> String {
    let singular = if let Some(s) = plural.strip_suffix("ies") {
        format!("{s}y")
    } else if plural.ends_with("sses") || plural.ends_with("ses") && plural != "leases" {
        plural[..plural.len() - 2].to_string()
    } else if plural == "endpoints" {
        plural.to_string()
    } else {
        plural.trim_end_matches('s').to_string()
    };
    match singular.as_str() {
        "endpointslice" => "EndpointSlice".into(),
        "virtualservice" => "VirtualService".into(),
        "destinationrule" => "DestinationRule".into(),
        "serviceentry" => "ServiceEntry".into(),
        "peerauthentication" => "PeerAuthentication".into(),
        "ingressclass" => "IngressClass".into(),
        "gatewayclass" => "GatewayClass".into(),
        "httproute" => "HTTPRoute".into(),
        "configmap" => "ConfigMap".into(),
        "tokenreview" => "TokenReview".into(),
        "endpoints" => "Endpoints".into(),
        other => {
            let mut c = other.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The API server's 404 for an object that is not there.
fn not_found(target: &Target) -> Response {
    status(
        404,
        "NotFound",
        format!("{} \"{}\" not found", target.plural, target.name),
    )
}

fn ok(code: StatusCode, body: Value) -> Response {
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

/// Whether the object passes a `fieldSelector` (metadata.name/namespace).
fn fields_match(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector else { return true };
    selector.split(',').all(|term| match term.split_once('=') {
        Some(("metadata.name", v)) => object["metadata"]["name"] == *v,
        Some(("metadata.namespace", v)) => object["metadata"]["namespace"] == *v,
        _ => true,
    })
}

fn handle(
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Option<Change>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let Some(target) = Target::parse(uri.path()) else {
        return status(
            404,
            "NotFound",
            format!("the server could not find {}", uri.path()),
        );
    };
    let q = query(&uri);
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, target.name.is_empty()) {
        (&Method::GET, true) if watching => "watch",
        (&Method::GET, true) => "list",
        (&Method::GET, false) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    let mut s = state.lock().expect("state");
    s.requests.push(Request {
        verb: verb.into(),
        group: target.group.clone(),
        resource: match target.subresource.as_str() {
            "" => target.plural.clone(),
            sub => format!("{}/{sub}", target.plural),
        },
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        field_selector: q.get("fieldSelector").cloned().unwrap_or_default(),
    });
    let collection = target.collection();
    if s.refused.contains(&collection) {
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({collection})"),
        );
    }
    let key = (target.namespace.clone(), target.name.clone());
    match verb {
        "list" => {
            let all: Vec<Value> = s
                .objects
                .get(&collection)
                .into_iter()
                .flat_map(|m| m.iter())
                .filter(|((ns, _), _)| target.namespace.is_empty() || *ns == target.namespace)
                .map(|(_, o)| o.clone())
                .filter(|o| fields_match(o, q.get("fieldSelector")))
                .collect();
            let start: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
            let limit: usize = q
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let end = start.saturating_add(limit).min(all.len());
            // The API server leaves kind and apiVersion out of the items of
            // built-in kinds, and keeps them in custom resources.
            let builtin = !target.group.contains("istio.io") && !target.group.contains("gateway.networking");
            let items: Vec<Value> = all[start.min(end)..end]
                .iter()
                .cloned()
                .map(|mut o| {
                    if builtin {
                        if let Some(m) = o.as_object_mut() {
                            m.remove("kind");
                            m.remove("apiVersion");
                        }
                    }
                    o
                })
                .collect();
            let mut meta = json!({"resourceVersion": s.rv.to_string()});
            if end < all.len() {
                meta["continue"] = json!(end.to_string());
                meta["remainingItemCount"] = json!(all.len() - end);
            }
            let list = json!({"kind": format!("{}List", kind_of(&target.plural)),
                              "apiVersion": target.api_version(), "metadata": meta, "items": items});
            ok(StatusCode::OK, list)
        }
        "watch" => {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(s.rv);
            let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .map_or(Duration::from_secs(300), Duration::from_secs);
            let mut lines: Vec<Value> = Vec::new();
            if from < s.compacted {
                lines.push(
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", s.compacted),
                    "reason": "Expired", "code": 410}}),
                );
                let body = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
                return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
            }
            let selector = q.get("fieldSelector").cloned();
            let ns = target.namespace.clone();
            let wanted = move |c: &Change| {
                c.collection == collection
                    && (ns.is_empty() || c.object["metadata"]["namespace"] == *ns)
                    && fields_match(&c.object, selector.as_ref())
            };
            lines.extend(
                s.history
                    .iter()
                    .filter(|c| c.rv > from && wanted(c))
                    .map(|c| json!({"type": c.kind, "object": c.object})),
            );
            if bookmarks {
                lines.push(
                    json!({"type": "BOOKMARK", "object": {"kind": kind_of(&target.plural),
                    "apiVersion": target.api_version(),
                    "metadata": {"resourceVersion": s.rv.to_string(),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}}),
                );
            }
            let rx = changes.subscribe();
            drop(s);
            let head = futures::stream::iter(
                lines
                    .into_iter()
                    .map(|l| Ok::<_, std::io::Error>(Bytes::from(format!("{l}\n")))),
            );
            let tail = futures::stream::unfold(rx, move |mut rx| {
                let wanted = wanted.clone();
                async move {
                    loop {
                        match rx.recv().await {
                            Ok(Some(c)) if wanted(&c) => {
                                let line = json!({"type": c.kind, "object": c.object});
                                return Some((Ok(Bytes::from(format!("{line}\n"))), rx));
                            }
                            Ok(Some(_)) => continue,
                            // Closed by the test, or fallen behind: the
                            // watch ends and the client comes back.
                            _ => return None,
                        }
                    }
                }
            });
            let stream = futures::StreamExt::take_until(
                futures::StreamExt::chain(head, tail),
                tokio::time::sleep(timeout),
            );
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        "get" => match s.objects.get(&collection).and_then(|m| m.get(&key)) {
            Some(o) => ok(StatusCode::OK, o.clone()),
            None => not_found(&target),
        },
        "create" => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "not JSON".into());
            };
            if target.plural == "tokenreviews" {
                let token = object["spec"]["token"].as_str().unwrap_or_default();
                let answer = s
                    .tokens
                    .get(token)
                    .cloned()
                    .unwrap_or(json!({"authenticated": false, "error": "unknown token"}));
                object["status"] = answer;
                return ok(StatusCode::CREATED, object);
            }
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = (target.namespace.clone(), name.clone());
            if s.objects.get(&collection).is_some_and(|m| m.contains_key(&key)) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", target.plural),
                );
            }
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            if !target.namespace.is_empty() {
                object["metadata"]["namespace"] = json!(target.namespace);
            }
            s.objects
                .entry(collection.clone())
                .or_default()
                .insert(key, object.clone());
            record(&mut s, &changes, collection, "ADDED", object.clone());
            ok(StatusCode::CREATED, object)
        }
        "update" => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "not JSON".into());
            };
            let raced = (collection.clone(), key.0.clone(), key.1.clone());
            if let Some(status) = (target.subresource == "status")
                .then(|| s.races.remove(&raced))
                .flatten()
            {
                if let Some(mut current) = s.objects.get(&collection).and_then(|m| m.get(&key)).cloned() {
                    s.rv += 1;
                    current["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                    current["status"] = status;
                    s.objects
                        .entry(collection.clone())
                        .or_default()
                        .insert(key.clone(), current.clone());
                    record(&mut s, &changes, collection.clone(), "MODIFIED", current);
                }
            }
            let Some(current) = s.objects.get(&collection).and_then(|m| m.get(&key)).cloned() else {
                return not_found(&target);
            };
            let asked = object["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if !asked.is_empty() && current["metadata"]["resourceVersion"] != *asked {
                return status(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                        target.plural, target.name
                    ),
                );
            }
            if target.subresource == "status" {
                let mut merged = current.clone();
                merged["status"] = object["status"].clone();
                object = merged;
            } else if !current["status"].is_null() {
                object["status"] = current["status"].clone();
            }
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.objects
                .entry(collection.clone())
                .or_default()
                .insert(key, object.clone());
            record(&mut s, &changes, collection, "MODIFIED", object.clone());
            ok(StatusCode::OK, object)
        }
        "delete" => match s.objects.get_mut(&collection).and_then(|m| m.remove(&key)) {
            Some(mut object) => {
                s.rv += 1;
                object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                record(&mut s, &changes, collection, "DELETED", object.clone());
                ok(StatusCode::OK, object)
            }
            None => not_found(&target),
        },
        _ => status(405, "MethodNotAllowed", format!("{method} is not supported here")),
    }
}
