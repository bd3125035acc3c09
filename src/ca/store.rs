//! The CA's files, named as Istio names plugged-in CA certificates:
//! `ca-cert.pem` (the signing certificate), `ca-key.pem` (its key),
//! `root-cert.pem` (the root everyone trusts) and `cert-chain.pem` (the
//! signing certificate's chain up to the root). On first start in an empty
//! directory a self-signed root is made and written there, owner-only; a
//! restart loads it again and never makes another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use super::authority::{ensure_newline, root_params, split_pem, Authority};
use super::CaError;

/// The file names of a CA directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: PathBuf,
}

impl CaFiles {
    pub const CA_CERT: &'static str = "ca-cert.pem";
    pub const CA_KEY: &'static str = "ca-key.pem";
    pub const ROOT_CERT: &'static str = "root-cert.pem";
    pub const CERT_CHAIN: &'static str = "cert-chain.pem";

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Result<String, CaError> {
        let path = self.path(name);
        std::fs::read_to_string(&path).map_err(|source| CaError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    fn bad(&self, reason: impl Into<String>) -> CaError {
        CaError::BadFiles {
            dir: self.dir.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Where CA material is read from: a directory, or the data of a Secret.
trait Material {
    fn read(&self, name: &str) -> Result<String, CaError>;
    fn has(&self, name: &str) -> bool;
    fn bad(&self, reason: String) -> CaError;
}

impl Material for CaFiles {
    fn read(&self, name: &str) -> Result<String, CaError> {
        CaFiles::read(self, name)
    }
    fn has(&self, name: &str) -> bool {
        self.path(name).exists()
    }
    fn bad(&self, reason: String) -> CaError {
        CaFiles::bad(self, reason)
    }
}

/// CA material held under the same names as the files, as the cluster
/// keeps it in a Secret (`istio-ca-secret`, or a plugged-in `cacerts`).
struct Named<'a> {
    label: &'a str,
    data: &'a BTreeMap<String, String>,
}

impl Material for Named<'_> {
    fn read(&self, name: &str) -> Result<String, CaError> {
        self.data
            .get(name)
            .cloned()
            .ok_or_else(|| self.bad(format!("{name} missing")))
    }
    fn has(&self, name: &str) -> bool {
        self.data.get(name).is_some_and(|v| !v.trim().is_empty())
    }
    fn bad(&self, reason: String) -> CaError {
        CaError::BadFiles {
            dir: self.label.to_string(),
            reason,
        }
    }
}

/// Loads a CA from material named like the files (`ca-cert.pem`, ...);
/// `label` names where it came from in errors.
pub fn load_named(
    label: &str,
    data: &BTreeMap<String, String>,
    trust_domain: &str,
) -> Result<Authority, CaError> {
    load(&Named { label, data }, trust_domain)
}

/// A new self-signed root, as the material `load_named` reads.
pub fn new_root(trust_domain: &str) -> Result<BTreeMap<String, String>, CaError> {
    let (key, pem) = make_root(trust_domain)?;
    Ok([
        (CaFiles::CA_KEY.to_string(), key.serialize_pem()),
        (CaFiles::CA_CERT.to_string(), pem.clone()),
        (CaFiles::ROOT_CERT.to_string(), pem.clone()),
        (CaFiles::CERT_CHAIN.to_string(), pem),
    ]
    .into())
}

/// How long a root made by meshd is valid.
const ROOT_YEARS: u64 = 10;

/// Loads the CA from `dir`, making a self-signed root there first when the
/// directory holds no CA files at all. An incomplete, corrupt or
/// mismatched set is an error: a restart must never silently change the root.
pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Authority, CaError> {
    let files = CaFiles {
        dir: dir.to_path_buf(),
    };
    let required = [CaFiles::CA_CERT, CaFiles::CA_KEY, CaFiles::ROOT_CERT];
    let look = || {
        let present: Vec<&str> = required
            .iter()
            .copied()
            .filter(|f| files.path(f).exists())
            .collect();
        let none = present.is_empty() && !files.path(CaFiles::CERT_CHAIN).exists();
        (present, none)
    };
    let (mut present, mut none) = look();
    if !none && present.len() < required.len() {
        // The files are looked at one by one, so a root that another meshd
        // renamed into place between two looks shows as part of a set. Its
        // files are never taken away again: a second look sees all of it.
        (present, none) = look();
    }
    if none {
        create(&files, trust_domain)?;
    } else if present.len() < required.len() {
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|f| !present.contains(f))
            .collect();
        return Err(files.bad(format!("incomplete: {} missing", missing.join(", "))));
    }
    load(&files, trust_domain)
}

/// A root kept only in memory, for `meshd serve` without `--ca-dir`.
pub fn ephemeral(trust_domain: &str) -> Result<Authority, CaError> {
    let (key, pem) = make_root(trust_domain)?;
    let not_after = SystemTime::now() + Duration::from_secs(ROOT_YEARS * 365 * 24 * 3600);
    Ok(Authority::new(
        trust_domain,
        key,
        pem.clone(),
        String::new(),
        pem,
        not_after,
    ))
}

fn make_root(trust_domain: &str) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
    let params = root_params(trust_domain, SystemTime::now(), ROOT_YEARS)?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((key, cert.pem()))
}

/// Makes a root in `files.dir`, all of it or nothing: the four files are
/// written (owner-only, synced) into a staging directory beside it, which
/// is then renamed onto the CA directory in one step. A crash before the
/// rename leaves only the staging directory, which the next start ignores;
/// two meshd starting at once both stage a root but only one rename
/// lands, and the other loads that one. Where the directory cannot be
/// renamed onto (a mount point), the files are created in place, the key
/// first, each only if absent.
fn create(files: &CaFiles, trust_domain: &str) -> Result<(), CaError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CaError::Io { path, source }
    };
    let (key, pem) = make_root(trust_domain)?;
    let material = [
        (CaFiles::CA_KEY, key.serialize_pem()),
        (CaFiles::CA_CERT, pem.clone()),
        (CaFiles::ROOT_CERT, pem.clone()),
        (CaFiles::CERT_CHAIN, pem),
    ];
    let parent = files
        .dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = files
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ca".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.staging-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    set_mode(&staging, 0o700).map_err(io(&staging))?;
    for (file, text) in &material {
        let path = staging.join(file);
        write_private(&path, text).map_err(io(&path))?;
    }
    sync_dir(&staging).map_err(io(&staging))?;
    match std::fs::rename(&staging, &files.dir) {
        Ok(()) => {
            sync_dir(parent).map_err(io(parent))?;
            tracing::info!(dir = %files.dir.display(), "made a new self-signed root CA for trust domain {trust_domain}");
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            // Another meshd's root landed first: use it.
            if files.path(CaFiles::CA_KEY).exists() {
                return Ok(());
            }
            tracing::debug!(
                "cannot rename onto {}: {e}; writing the files in place",
                files.dir.display()
            );
            std::fs::create_dir_all(&files.dir).map_err(io(&files.dir))?;
            set_mode(&files.dir, 0o700).map_err(io(&files.dir))?;
            for (file, text) in &material {
                let path = files.path(file);
                write_private(&path, text).map_err(io(&path))?;
            }
            tracing::info!(dir = %files.dir.display(), "made a new self-signed root CA for trust domain {trust_domain}");
            Ok(())
        }
    }
}

/// Makes a directory's entries durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()
}

fn certs(files: &dyn Material, name: &str, text: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| files.bad(format!("{name}: not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(files.bad(format!("{name}: no certificate")));
    }
    Ok(certs)
}

fn parse<'a>(
    files: &dyn Material,
    name: &str,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| files.bad(format!("{name}: does not parse: {e}")))
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or_default())
}

/// Loads and checks a CA directory.
fn load(files: &dyn Material, trust_domain: &str) -> Result<Authority, CaError> {
    let key_pem = files.read(CaFiles::CA_KEY)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        files.bad(format!(
            "{}: not a usable PKCS#8 private key: {e}",
            CaFiles::CA_KEY
        ))
    })?;
    let cert_pem = files.read(CaFiles::CA_CERT)?;
    let cert_der = certs(files, CaFiles::CA_CERT, &cert_pem)?.remove(0);
    let cert = parse(files, CaFiles::CA_CERT, &cert_der)?;
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(files.bad(format!("{} does not match {}", CaFiles::CA_KEY, CaFiles::CA_CERT)));
    }
    if !cert.is_ca() {
        return Err(files.bad(format!("{} is not a CA certificate", CaFiles::CA_CERT)));
    }
    let now = SystemTime::now();
    if system_time(cert.validity().not_after.to_owned()) < now {
        return Err(files.bad(format!(
            "{} expired at {}",
            CaFiles::CA_CERT,
            cert.validity().not_after
        )));
    }
    let root_pem = files.read(CaFiles::ROOT_CERT)?;
    let root_der = certs(files, CaFiles::ROOT_CERT, &root_pem)?.remove(0);
    let root = parse(files, CaFiles::ROOT_CERT, &root_der)?;
    root.verify_signature(None)
        .map_err(|_| files.bad(format!("{} is not a self-signed root", CaFiles::ROOT_CERT)))?;

    // The chain from the signing certificate up to the root, each link
    // signed by the next. Istio's cert-chain.pem may or may not repeat the
    // signing certificate and the root; both are accepted.
    let chain_text = if files.has(CaFiles::CERT_CHAIN) {
        files.read(CaFiles::CERT_CHAIN)?
    } else {
        String::new()
    };
    let mut chain: Vec<(String, CertificateDer<'static>)> = split_pem(&chain_text)
        .into_iter()
        .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
        .map(|pem| {
            let der = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| files.bad(format!("{}: not valid PEM: {e}", CaFiles::CERT_CHAIN)))?;
            Ok((pem, der))
        })
        .collect::<Result<_, CaError>>()?;
    if chain.first().map(|c| &c.1) == Some(&cert_der) {
        chain.remove(0);
    }
    if chain.last().map(|c| &c.1) == Some(&root_der) {
        chain.pop();
    }
    let intermediates: Vec<X509Certificate<'_>> = chain
        .iter()
        .map(|(_, d)| parse(files, CaFiles::CERT_CHAIN, d))
        .collect::<Result<_, _>>()?;
    let mut child = &cert;
    for (i, issuer) in intermediates.iter().chain(std::iter::once(&root)).enumerate() {
        let self_signed_root = cert_der == root_der && i == 0;
        if !self_signed_root && child.verify_signature(Some(issuer.public_key())).is_err() {
            return Err(files.bad(format!(
                "the chain is broken: \"{}\" is not signed by \"{}\"",
                child.subject(),
                issuer.subject()
            )));
        }
        child = issuer;
    }
    let intermediates_pem: String = chain.iter().map(|(pem, _)| ensure_newline(pem)).collect();
    let root_not_after = system_time(root.validity().not_after.to_owned());
    Ok(Authority::new(
        trust_domain,
        key,
        ensure_newline(&cert_pem),
        intermediates_pem,
        ensure_newline(&root_pem),
        root_not_after,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::SpiffeId;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyUsagePurpose};

    fn leaf_uri(chain: &str) -> (String, X509Certificate<'static>) {
        let der = CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()
            .expect("a cert")
            .expect("pem");
        let der: &'static [u8] = Box::leak(der.as_ref().to_vec().into_boxed_slice());
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parses");
        let sans = cert.subject_alternative_name().expect("ok").expect("has SAN");
        let uris: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(uris.len(), 1, "exactly one SAN: {uris:?}");
        (uris[0].clone(), cert)
    }

    fn root_of(dir: &Path) -> X509Certificate<'static> {
        let pem = std::fs::read(dir.join(CaFiles::ROOT_CERT)).expect("root");
        let der = CertificateDer::from_pem_slice(&pem).expect("pem");
        let der: &'static [u8] = Box::leak(der.as_ref().to_vec().into_boxed_slice());
        x509_parser::parse_x509_certificate(der).expect("parses").1
    }

    #[test]
    fn first_start_makes_a_root_and_a_restart_keeps_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca_dir = dir.path().join("ca");
        let a = load_or_create(&ca_dir, "cluster.local").expect("created");
        let b = load_or_create(&ca_dir, "cluster.local").expect("reloaded");
        assert_eq!(a.root_pem(), b.root_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode(ca_dir.join(CaFiles::CA_KEY)), 0o600);
            assert_eq!(mode(ca_dir.clone()), 0o700);
        }
    }

    #[test]
    fn issued_leaf_carries_exactly_the_spiffe_id_and_chains_to_the_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = load_or_create(dir.path(), "cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "default", "sleep").expect("id");
        let issued = ca.issue(&id, Duration::from_secs(3600)).expect("issued");
        let (uri, leaf) = leaf_uri(&issued.cert_chain);
        assert_eq!(uri, "spiffe://cluster.local/ns/default/sa/sleep");
        let root = root_of(dir.path());
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the root");
        assert!(!leaf.is_ca());
    }

    #[test]
    fn csr_identity_comes_from_the_caller_not_the_csr() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = load_or_create(dir.path(), "cluster.local").expect("ca");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["admin.example.com".to_string()]).expect("params");
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/kube-system/sa/admin")
                .expect("uri"),
        ));
        let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
        let id = SpiffeId::new("cluster.local", "default", "sleep").expect("id");
        let chain = ca.sign_csr(&csr, &id, Duration::from_secs(600)).expect("signed");
        assert_eq!(chain.len(), 2, "leaf and root");
        let (uri, leaf) = leaf_uri(&chain[0]);
        assert_eq!(uri, id.to_string());
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.der_bytes()
        );
        assert!(ca.sign_csr("not a csr", &id, Duration::from_secs(600)).is_err());
    }

    #[test]
    fn mismatched_or_incomplete_files_stop_start_up() {
        let dir = tempfile::tempdir().expect("tmp");
        load_or_create(dir.path(), "cluster.local").expect("ca");
        std::fs::remove_file(dir.path().join(CaFiles::CA_KEY)).expect("rm");
        let err = load_or_create(dir.path(), "cluster.local")
            .expect_err("incomplete")
            .to_string();
        assert!(err.contains("ca-key.pem missing"), "{err}");
        let other = KeyPair::generate().expect("key");
        std::fs::write(dir.path().join(CaFiles::CA_KEY), other.serialize_pem()).expect("write");
        let err = load_or_create(dir.path(), "cluster.local")
            .expect_err("mismatch")
            .to_string();
        assert!(err.contains("ca-key.pem does not match ca-cert.pem"), "{err}");
        std::fs::write(dir.path().join(CaFiles::CA_KEY), "garbage").expect("write");
        assert!(load_or_create(dir.path(), "cluster.local").is_err());
    }

    #[test]
    fn plugged_in_intermediate_chains_to_the_outside_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca_params = || {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p
        };
        let root_key = KeyPair::generate().expect("key");
        let mut root_p = ca_params();
        root_p
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outside root");
        let root = root_p.self_signed(&root_key).expect("root");
        let int_key = KeyPair::generate().expect("key");
        let mut int_p = ca_params();
        int_p
            .distinguished_name
            .push(rcgen::DnType::CommonName, "meshd intermediate");
        let issuer = Issuer::from_params(&root_p, &root_key);
        let int = int_p.signed_by(&int_key, &issuer).expect("intermediate");
        let w = |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("write");
        w(CaFiles::CA_CERT, int.pem());
        w(CaFiles::CA_KEY, int_key.serialize_pem());
        w(CaFiles::ROOT_CERT, root.pem());
        w(CaFiles::CERT_CHAIN, format!("{}{}", int.pem(), root.pem()));
        let ca = load_or_create(dir.path(), "cluster.local").expect("plugged in");
        let id = SpiffeId::new("cluster.local", "default", "sleep").expect("id");
        let issued = ca.issue(&id, Duration::from_secs(600)).expect("issued");
        assert_eq!(
            issued.cert_chain.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf + intermediate"
        );
        // A chain that does not lead to the root is refused.
        let stranger_key = KeyPair::generate().expect("key");
        let stranger = ca_params().self_signed(&stranger_key).expect("stranger");
        w(CaFiles::ROOT_CERT, stranger.pem());
        w(CaFiles::CERT_CHAIN, int.pem());
        let err = load_or_create(dir.path(), "cluster.local")
            .expect_err("broken chain")
            .to_string();
        assert!(err.contains("the chain is broken"), "{err}");
    }
}
