//! TLS credentials from Kubernetes Secrets, read the way Istio reads them
//! for gateways: `cert`/`key`/`cacert` or `tls.crt`/`tls.key`/`ca.crt`, and
//! a separate `<name>-cacert` Secret for the client CA. Each credential is
//! checked once per generation: the certificates parse, the key matches the
//! leaf, and the leaf is valid at the generation's time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

/// A server certificate chain and its private key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCredential {
    pub cert_chain: Vec<u8>,
    pub key: Vec<u8>,
}

/// Why a credential cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, thiserror::Error)]
pub enum CredentialError {
    /// No Secret of that name in the namespace.
    #[error("Secret {namespace}/{name} not found")]
    Missing { namespace: String, name: String },
    /// The Secret lacks the keys a credential needs.
    #[error("Secret {namespace}/{name} has no {wanted} (it has: {has})")]
    MissingKeys {
        namespace: String,
        name: String,
        wanted: &'static str,
        has: String,
    },
    /// The material is there but unusable.
    #[error("Secret {namespace}/{name}: {reason}")]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Every Secret's credentials, checked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Credentials {
    secrets: BTreeMap<(String, String), Arc<Secret>>,
    now: u64,
}

impl Credentials {
    /// Indexes `secrets`; validity is judged at `now`.
    pub fn new(secrets: impl IntoIterator<Item = Arc<Secret>>, now: SystemTime) -> Credentials {
        let secrets = secrets
            .into_iter()
            .map(|s| {
                let key = (
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                );
                (key, s)
            })
            .collect();
        Credentials {
            secrets,
            now: unix_seconds(now),
        }
    }

    /// The same Secrets, judged at `now`.
    pub fn at(&self, now: SystemTime) -> Credentials {
        Credentials {
            secrets: self.secrets.clone(),
            now: unix_seconds(now),
        }
    }

    /// The server certificate and key of Secret `namespace/name`.
    pub fn server(&self, namespace: &str, name: &str) -> Result<ServerCredential, CredentialError> {
        let secret = self.get(namespace, name)?;
        let (Some(cert), Some(key)) = (
            value(secret, &["cert", "tls.crt"]),
            value(secret, &["key", "tls.key"]),
        ) else {
            return Err(missing_keys(
                secret,
                namespace,
                name,
                "cert and key (or tls.crt and tls.key)",
            ));
        };
        let invalid = |reason: String| CredentialError::Invalid {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason,
        };
        check_pair(&cert, &key, self.now).map_err(invalid)?;
        Ok(ServerCredential {
            cert_chain: cert,
            key,
        })
    }

    /// The CA bundle that client certificates are checked against, as Istio
    /// finds it: `cacert`/`ca.crt` in the credential's own Secret, else in
    /// a Secret named `<name>-cacert`.
    pub fn client_ca(&self, namespace: &str, name: &str) -> Result<(String, Vec<u8>), CredentialError> {
        const KEYS: &[&str] = &["cacert", "ca.crt"];
        let own = self.get(namespace, name).ok().and_then(|s| value(s, KEYS));
        let (source, bundle) = match own {
            Some(b) => (name.to_string(), b),
            None => {
                let ca_name = format!("{name}-cacert");
                let secret = self.get(namespace, &ca_name)?;
                let bundle = value(secret, KEYS)
                    .ok_or_else(|| missing_keys(secret, namespace, &ca_name, "cacert (or ca.crt)"))?;
                (ca_name, bundle)
            }
        };
        let count = CertificateDer::pem_slice_iter(&bundle)
            .filter(Result::is_ok)
            .count();
        if count == 0 {
            return Err(CredentialError::Invalid {
                namespace: namespace.to_string(),
                name: source,
                reason: "the CA bundle holds no PEM certificate".into(),
            });
        }
        Ok((source, bundle))
    }

    fn get(&self, namespace: &str, name: &str) -> Result<&Secret, CredentialError> {
        self.secrets
            .get(&(namespace.to_string(), name.to_string()))
            .map(AsRef::as_ref)
            .ok_or_else(|| CredentialError::Missing {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
    }
}

/// The first of `keys` present in the Secret's `data` or `stringData`.
fn value(secret: &Secret, keys: &[&str]) -> Option<Vec<u8>> {
    keys.iter().find_map(|k| {
        let data = secret.data.as_ref().and_then(|d| d.get(*k)).map(|b| b.0.clone());
        data.or_else(|| {
            let s = secret.string_data.as_ref().and_then(|d| d.get(*k));
            s.map(|s| s.as_bytes().to_vec())
        })
    })
}

fn missing_keys(secret: &Secret, namespace: &str, name: &str, wanted: &'static str) -> CredentialError {
    let data = secret.data.iter().flat_map(|d| d.keys());
    let mut has: Vec<&str> = data
        .chain(secret.string_data.iter().flat_map(|d| d.keys()))
        .map(String::as_str)
        .collect();
    has.sort_unstable();
    has.dedup();
    CredentialError::MissingKeys {
        namespace: namespace.to_string(),
        name: name.to_string(),
        wanted,
        has: if has.is_empty() {
            "nothing".into()
        } else {
            has.join(", ")
        },
    }
}

/// Why a CA bundle cannot verify anything, when none of its certificates
/// is a CA (basicConstraints CA:TRUE): the seed put the server's own
/// certificate under `cacert`.
pub fn not_a_ca(bundle: &[u8]) -> Option<String> {
    let mut subjects = Vec::new();
    for der in CertificateDer::pem_slice_iter(bundle).flatten() {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        if cert.is_ca() {
            return None;
        }
        subjects.push(cert.subject().to_string());
    }
    if subjects.is_empty() {
        return None; // nothing parsed: reported elsewhere
    }
    Some(format!(
        "the CA bundle holds no CA certificate ({} is not a CA)",
        subjects.join(", ")
    ))
}

/// Checks that `cert` (PEM chain) and `key` (PEM) belong together and that
/// the leaf is valid at `now` (Unix seconds).
fn check_pair(cert: &[u8], key: &[u8], now: u64) -> Result<(), String> {
    let leaf = CertificateDer::pem_slice_iter(cert)
        .next()
        .ok_or("the certificate holds no PEM CERTIFICATE block")?
        .map_err(|e| format!("the certificate is not valid PEM: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let validity = parsed.validity();
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    if validity.not_after.timestamp() < now {
        return Err(format!("the certificate expired at {}", validity.not_after));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the key is not a PEM private key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("the key is not a supported RSA, ECDSA or Ed25519 key: {e}"))?;
    let public = signer
        .public_key()
        .ok_or("the key's public half cannot be derived")?;
    if public.as_ref() != parsed.public_key().raw {
        return Err("the certificate does not match the key".into());
    }
    Ok(())
}
