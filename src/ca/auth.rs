//! Who is calling meshd: an identity from a client certificate meshd issued
//! (checked by the TLS handshake against meshd's root), or from a Kubernetes
//! service-account JWT in the `authorization: Bearer` metadata, verified
//! with a key the operator configures (file mode) or by the API server's
//! TokenReview (`--kube`), which also names the pod a token is bound to.
//! Each refusal says why.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use super::{CaError, SpiffeId};

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The TLS port needs a client certificate or a token.
    #[error("no credentials: present a client certificate issued by meshd or an `authorization: Bearer` service-account token")]
    NoCredentials,
    /// The token's `exp` has passed.
    #[error("the service-account token has expired")]
    TokenExpired,
    /// The token does not verify.
    #[error("the service-account token is not valid: {0}")]
    TokenInvalid(String),
    /// Tokens are presented but meshd has no key to check them with.
    #[error("a token was presented but meshd has no --token-key to verify it")]
    NoTokenKey,
    /// The client certificate has no SPIFFE identity of this trust domain.
    #[error("the client certificate carries no identity of trust domain {0}")]
    Certificate(String),
    /// The API server could not be asked about a token.
    #[error("the service-account token could not be reviewed: {0}")]
    ReviewFailed(String),
}

impl AuthError {
    /// The gRPC status a refused stream ends with.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::unauthenticated(self.to_string())
    }
}

/// The parts of a Kubernetes service-account token that name the identity.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: NamedRef,
}

#[derive(Debug, Deserialize)]
struct NamedRef {
    name: String,
}

/// Verifies service-account JWTs signed by one key.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed by the key whose public half is `pem`
    /// (RSA, RS256; or EC P-256, ES256), for `audience` (Istio's: `istio-ca`).
    pub fn from_pem(pem: &[u8], audience: &str) -> Result<TokenVerifier, CaError> {
        let (key, alg) = match DecodingKey::from_rsa_pem(pem) {
            Ok(k) => (k, Algorithm::RS256),
            Err(_) => match DecodingKey::from_ec_pem(pem) {
                Ok(k) => (k, Algorithm::ES256),
                Err(e) => {
                    return Err(CaError::Identity(format!(
                        "--token-key: not an RSA or EC public key in PEM: {e}"
                    )))
                }
            },
        };
        let mut validation = Validation::new(alg);
        validation.set_audience(&[audience]);
        validation.leeway = 0;
        Ok(TokenVerifier { key, validation })
    }

    /// The identity a token names, if it verifies.
    pub fn verify(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::TokenExpired,
            ErrorKind::InvalidAudience => AuthError::TokenInvalid("wrong audience".into()),
            ErrorKind::InvalidSignature => AuthError::TokenInvalid("bad signature".into()),
            _ => AuthError::TokenInvalid(e.to_string()),
        })?;
        let claims = data.claims;
        let (ns, sa) = match claims.kubernetes {
            Some(k) => (k.namespace, k.serviceaccount.name),
            None => {
                let rest = claims.sub.strip_prefix("system:serviceaccount:").ok_or_else(|| {
                    AuthError::TokenInvalid(format!("subject {:?} is not a service account", claims.sub))
                })?;
                let (ns, sa) = rest.split_once(':').ok_or_else(|| {
                    AuthError::TokenInvalid(format!("subject {:?} is not NS:NAME", claims.sub))
                })?;
                (ns.to_string(), sa.to_string())
            }
        };
        SpiffeId::new(trust_domain, &ns, &sa).map_err(|e| AuthError::TokenInvalid(e.to_string()))
    }
}

/// Asks the API server who a service-account token belongs to
/// (`authentication.k8s.io/v1` TokenReview, for one audience), as istiod
/// does.
#[derive(Clone)]
pub struct TokenReviewer {
    pub client: kube::Client,
    pub audience: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The user name the API server gives a service account's tokens.
const SA_PREFIX: &str = "system:serviceaccount:";
/// The extra field naming the pod a projected token is bound to.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

impl TokenReviewer {
    /// The caller a token names, if the API server vouches for it.
    pub async fn review(&self, token: &str, trust_domain: &str) -> Result<Caller, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::ReviewFailed(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::TokenInvalid(why));
        }
        if let Some(audiences) = &status.audiences {
            if !audiences.contains(&self.audience) {
                return Err(AuthError::TokenInvalid("wrong audience".into()));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (ns, sa) = username
            .strip_prefix(SA_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| AuthError::TokenInvalid(format!("user {username:?} is not a service account")))?;
        let pod = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get(POD_NAME))
            .and_then(|names| names.first())
            .cloned();
        let id = SpiffeId::new(trust_domain, ns, sa).map_err(|e| AuthError::TokenInvalid(e.to_string()))?;
        Ok(Caller { id, pod })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: SpiffeId,
    /// The pod its token is bound to, when the API server said so: the
    /// proxy must then be that pod.
    pub pod: Option<String>,
}

impl From<SpiffeId> for Caller {
    fn from(id: SpiffeId) -> Caller {
        Caller { id, pod: None }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pod {
            Some(pod) => write!(f, "{} (pod {pod})", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

/// A request's `authorization` value and client certificates.
pub type Credentials = (Option<String>, Option<Arc<Vec<CertificateDer<'static>>>>);

/// What a gRPC request presents to authenticate with: its `authorization`
/// metadata and the client certificates of its TLS connection, taken out
/// of the request so it need not be held while a token is reviewed.
pub fn credentials<T>(request: &tonic::Request<T>) -> Credentials {
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (authorization, request.peer_certs())
}

/// Authenticates callers of the xDS and CA services.
#[derive(Debug)]
pub struct Authenticator {
    pub trust_domain: String,
    pub tokens: Option<TokenVerifier>,
    /// With `--kube`: tokens are reviewed by the API server.
    pub reviewer: Option<TokenReviewer>,
}

impl Authenticator {
    /// The caller's identity. On the TLS port (`tls`), a verified client
    /// certificate or a valid token is required; on the plain port there
    /// may be neither (`None`), but a token that is presented must verify.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
        tls: bool,
    ) -> Result<Option<Caller>, AuthError> {
        if let Some(leaf) = peer_certs.as_ref().and_then(|c| c.first()) {
            return self.certificate_identity(leaf).map(|id| Some(id.into()));
        }
        if let Some(value) = authorization {
            let token = value.strip_prefix("Bearer ").unwrap_or(value).trim();
            if let Some(reviewer) = &self.reviewer {
                return reviewer.review(token, &self.trust_domain).await.map(Some);
            }
            let verifier = self.tokens.as_ref().ok_or(AuthError::NoTokenKey)?;
            return verifier
                .verify(token, &self.trust_domain)
                .map(|id| Some(id.into()));
        }
        if tls {
            Err(AuthError::NoCredentials)
        } else {
            Ok(None)
        }
    }

    fn certificate_identity(&self, leaf: &CertificateDer<'_>) -> Result<SpiffeId, AuthError> {
        let bad = || AuthError::Certificate(self.trust_domain.clone());
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| bad())?;
        let sans = cert.subject_alternative_name().ok().flatten().ok_or_else(bad)?;
        sans.value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(uri) => SpiffeId::parse(uri),
                _ => None,
            })
            .filter(|id| id.trust_domain == self.trust_domain)
            .ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use std::time::{SystemTime, UNIX_EPOCH};

    fn keys() -> (EncodingKey, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("encoding key");
        (encoding, key.public_key_pem().into_bytes())
    }

    fn token(key: &EncodingKey, ns: &str, sa: &str, exp_from_now: i64, aud: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": "kubernetes/serviceaccount",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": [aud],
            "exp": now + exp_from_now,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "1"}},
        });
        encode(&Header::new(Algorithm::ES256), &claims, key).expect("token")
    }

    fn authenticator(public: &[u8]) -> Authenticator {
        Authenticator {
            trust_domain: "cluster.local".into(),
            tokens: Some(TokenVerifier::from_pem(public, "istio-ca").expect("verifier")),
            reviewer: None,
        }
    }

    #[tokio::test]
    async fn tokens_name_identities_and_bad_ones_say_why() {
        let (key, public) = keys();
        let auth = authenticator(&public);
        let good = format!("Bearer {}", token(&key, "default", "sleep", 600, "istio-ca"));
        let id = auth
            .authenticate(Some(&good), None, true)
            .await
            .expect("ok")
            .expect("identity");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        let expired = format!("Bearer {}", token(&key, "default", "sleep", -600, "istio-ca"));
        assert_eq!(
            auth.authenticate(Some(&expired), None, true).await,
            Err(AuthError::TokenExpired)
        );
        let wrong_aud = format!("Bearer {}", token(&key, "default", "sleep", 600, "other"));
        assert_eq!(
            auth.authenticate(Some(&wrong_aud), None, true).await,
            Err(AuthError::TokenInvalid("wrong audience".into()))
        );
        let (other_key, _) = keys();
        let forged = format!(
            "Bearer {}",
            token(&other_key, "default", "sleep", 600, "istio-ca")
        );
        assert_eq!(
            auth.authenticate(Some(&forged), None, true).await,
            Err(AuthError::TokenInvalid("bad signature".into()))
        );
        assert_eq!(
            auth.authenticate(None, None, true).await,
            Err(AuthError::NoCredentials)
        );
        assert_eq!(auth.authenticate(None, None, false).await, Ok(None));
    }
}
