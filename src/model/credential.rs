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
    /// When each server certificate's validity starts and ends (Unix
    /// seconds): the only times at which a judgment can change.
    bounds: Arc<Vec<i64>>,
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
            .collect::<BTreeMap<_, Arc<Secret>>>();
        let bounds = secrets
            .values()
            .filter_map(|s| value(s, &["cert", "tls.crt"]))
            .filter_map(|cert| validity(&cert))
            .flat_map(|(from, to)| [from, to])
            .collect();
        Credentials {
            secrets,
            now: unix_seconds(now),
            bounds: Arc::new(bounds),
        }
    }

    /// The same Secrets, judged at `now`.
    pub fn at(&self, now: SystemTime) -> Credentials {
        Credentials {
            secrets: self.secrets.clone(),
            now: unix_seconds(now),
            bounds: self.bounds.clone(),
        }
    }

    /// Whether `later` judges every credential as this does: the same
    /// Secrets, and no server certificate's validity starts or ends
    /// between the two times.
    pub fn judged_alike(&self, later: &Credentials) -> bool {
        let same = self.secrets.len() == later.secrets.len()
            && self
                .secrets
                .iter()
                .zip(&later.secrets)
                .all(|((a, x), (b, y))| a == b && (Arc::ptr_eq(x, y) || x == y));
        let (from, to) = (self.now.min(later.now), self.now.max(later.now));
        let (from, to) = (
            i64::try_from(from).unwrap_or(i64::MAX),
            i64::try_from(to).unwrap_or(i64::MAX),
        );
        same && !self.bounds.iter().any(|t| (from..=to).contains(t))
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

/// When the leaf of `cert` (PEM chain) becomes valid and stops being
/// valid, Unix seconds; `None` when it does not parse.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let leaf = CertificateDer::pem_slice_iter(cert).next()?.ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let v = parsed.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A Secret holding a certificate valid for days 10 to 20 of the epoch.
    fn secret() -> Secret {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["example.com".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(1970, 1, 11);
        params.not_after = rcgen::date_time_ymd(1970, 1, 21);
        let cert = params.self_signed(&key).expect("cert");
        let mut secret = Secret::default();
        secret.metadata.name = Some("gw".into());
        secret.metadata.namespace = Some("istio-system".into());
        secret.string_data = Some(
            [
                ("tls.crt".to_string(), cert.pem()),
                ("tls.key".to_string(), key.serialize_pem()),
            ]
            .into(),
        );
        secret
    }

    fn day(n: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(n * 86_400)
    }

    /// Two times judge alike unless a certificate's validity starts or
    /// ends between them; other Secrets never judge alike.
    #[test]
    fn judgments_change_only_where_a_certificate_starts_or_ends() {
        let at = |d| Credentials::new([Arc::new(secret())], day(d));
        let inside = at(12);
        assert!(inside.server("istio-system", "gw").is_ok());
        assert!(inside.judged_alike(&inside.at(day(19))));
        assert!(!inside.judged_alike(&inside.at(day(25))), "it expires in between");
        assert!(inside.at(day(25)).server("istio-system", "gw").is_err());
        assert!(!inside.at(day(5)).judged_alike(&inside), "it starts in between");
        assert!(inside.at(day(25)).judged_alike(&inside.at(day(30))));
        assert!(!inside.judged_alike(&at(12)), "another certificate");
        assert!(!inside.judged_alike(&Credentials::new([], day(12))));
    }
}
