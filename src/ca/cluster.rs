//! The CA in a cluster (`meshd serve --kube`): every replica signs with the
//! same root, kept in a Secret of meshd's namespace as istiod keeps it.
//!
//! A plugged-in `cacerts` Secret (Istio's names: `ca-cert.pem`,
//! `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`) wins; else the
//! self-signed root in `istio-ca-secret`. When neither exists, the replica
//! that holds the `meshd-ca` Lease makes the root and creates the Secret;
//! the others wait and load it. Creating a Secret that exists fails (409),
//! so even a Lease taken over mid-way never leaves two roots: the loser
//! loads the winner's.
//!
//! The root certificate is then published to every namespace as the
//! `istio-ca-root-cert` ConfigMap (key `root-cert.pem`), which Istio's
//! proxies and meshd's injected sidecars mount to trust meshd, and set as
//! the caBundle of the injection webhook (whose serving certificate it
//! signs), as istiod does.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

use super::store::{load_named, new_root};
use super::{Authority, CaError};

/// The Secret holding meshd's self-signed root, as istiod names it.
pub const CA_SECRET: &str = "istio-ca-secret";
/// An operator's own CA, plugged in as Istio takes it.
pub const PLUGGED_SECRET: &str = "cacerts";
/// The Lease whose holder may make the root.
pub const LEASE: &str = "meshd-ca";
/// The ConfigMap each namespace gets with the root certificate.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
const LEASE_SECONDS: i32 = 15;

fn api_error(what: &str, e: kube::Error) -> CaError {
    CaError::Cluster(format!("{what}: {e}"))
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Loads the cluster's CA, making it first when there is none. `holder`
/// names this replica in the Lease. Waits (with a growing pause) while
/// another replica holds the Lease or the API server cannot be reached.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    trust_domain: &str,
    holder: &str,
) -> Result<Authority, CaError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt(&secrets, &leases, namespace, trust_domain, holder).await {
            Ok(Some(authority)) => return Ok(authority),
            Ok(None) => {}
            // The CA material is there but unusable: waiting will not help.
            Err(e @ CaError::BadFiles { .. }) => return Err(e),
            Err(e) => tracing::warn!("CA root from the cluster: {e}; retrying"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// One try: the root if it exists or this replica could make it.
async fn attempt(
    secrets: &Api<Secret>,
    leases: &Api<Lease>,
    namespace: &str,
    trust_domain: &str,
    holder: &str,
) -> Result<Option<Authority>, CaError> {
    for name in [PLUGGED_SECRET, CA_SECRET] {
        let found = secrets
            .get_opt(name)
            .await
            .map_err(|e| api_error(&format!("reading Secret {namespace}/{name}"), e))?;
        if let Some(secret) = found {
            let authority = load_secret(&secret, namespace, name, trust_domain)?;
            tracing::info!("CA root from Secret {namespace}/{name}");
            return Ok(Some(authority));
        }
    }
    if !lead(leases, holder)
        .await
        .map_err(|e| api_error(&format!("Lease {namespace}/{LEASE}"), e))?
    {
        return Ok(None);
    }
    let data = new_root(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!("made a new self-signed root CA for trust domain {trust_domain} in Secret {namespace}/{CA_SECRET}");
            let label = format!("Secret {namespace}/{CA_SECRET}");
            load_named(&label, &data, trust_domain).map(Some)
        }
        // Another replica got there first: load theirs next time round.
        Err(e) if conflict(&e) => Ok(None),
        Err(e) => Err(api_error(&format!("creating Secret {namespace}/{CA_SECRET}"), e)),
    }
}

fn load_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<Authority, CaError> {
    let label = format!("Secret {namespace}/{name}");
    let mut data: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        let text = String::from_utf8(v.0.clone()).map_err(|_| CaError::BadFiles {
            dir: label.clone(),
            reason: format!("{k} is not text"),
        })?;
        data.insert(k.clone(), text);
    }
    for (k, v) in secret.string_data.iter().flatten() {
        data.entry(k.clone()).or_insert_with(|| v.clone());
    }
    load_named(&label, &data, trust_domain)
}

/// Takes (or renews) the Lease when it is free, expired or ours; says
/// whether this replica holds it now. Every write names the version it
/// read, so two replicas never both win.
async fn lead(leases: &Api<Lease>, holder: &str) -> Result<bool, kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let Some(mut lease) = leases.get_opt(LEASE).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let other = spec
        .holder_identity
        .as_deref()
        .is_some_and(|h| !h.is_empty() && h != holder);
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|t| t.0.as_second() + seconds < now.as_second());
    if other && !expired {
        return Ok(false);
    }
    if other {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.acquire_time = Some(MicroTime(now));
    }
    spec.holder_identity = Some(holder.into());
    spec.renew_time = Some(MicroTime(now));
    match leases.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The injection webhook configuration `deploy/` installs; its caBundle
/// is set to meshd's root, which signs the webhook's serving certificate.
pub const WEBHOOK: &str = "meshd-sidecar-injector";

/// Sets the caBundle of every webhook of the `meshd-sidecar-injector`
/// configuration to `root_pem`, if that configuration exists.
async fn trust_webhook(client: &Client, root_pem: &str) -> Result<(), kube::Error> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut config) = configs.get_opt(WEBHOOK).await? else {
        return Ok(());
    };
    let bundle = ByteString(root_pem.as_bytes().to_vec());
    let mut changed = false;
    for hook in config.webhooks.iter_mut().flatten() {
        if hook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            hook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        configs.replace(WEBHOOK, &PostParams::default(), &config).await?;
        tracing::info!("set the caBundle of MutatingWebhookConfiguration {WEBHOOK} to meshd's root");
    }
    Ok(())
}

/// Publishes the root for as long as the task runs: into the injection
/// webhook's caBundle once, and as `istio-ca-root-cert` into every
/// namespace, each seen when listed and when it is added.
pub async fn publish_root(client: Client, root_pem: String) {
    if let Err(e) = trust_webhook(&client, &root_pem).await {
        tracing::warn!("MutatingWebhookConfiguration {WEBHOOK}: {e}");
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut seen = watcher::watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ns) = seen.next().await {
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                tracing::warn!("watching namespaces for {ROOT_CONFIGMAP}: {e}");
                continue;
            }
        };
        if ns.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(name) = ns.metadata.name else { continue };
        if let Err(e) = ensure_root(&client, &name, &root_pem).await {
            tracing::warn!("ConfigMap {name}/{ROOT_CONFIGMAP}: {e}");
        }
    }
}

async fn ensure_root(client: &Client, namespace: &str, root_pem: &str) -> Result<(), kube::Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data: BTreeMap<String, String> = [("root-cert.pem".to_string(), root_pem.to_string())].into();
    match maps.get_opt(ROOT_CONFIGMAP).await? {
        Some(current) if current.data.as_ref() == Some(&data) => Ok(()),
        Some(mut current) => {
            current.data = Some(data);
            match maps
                .replace(ROOT_CONFIGMAP, &PostParams::default(), &current)
                .await
            {
                Err(e) if !conflict(&e) => Err(e),
                _ => Ok(()),
            }
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CONFIGMAP.into()),
                    namespace: Some(namespace.into()),
                    labels: Some([("istio.io/config".to_string(), "true".to_string())].into()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            match maps.create(&PostParams::default(), &map).await {
                Err(e) if !conflict(&e) => Err(e),
                _ => Ok(()),
            }
        }
    }
}
