//! The CA with real openssl: every issued leaf verifies against the root,
//! its only SAN is the SPIFFE id, the root survives a restart, and a
//! plugged-in intermediate chains to its outside root.

use std::path::Path;

use crate::common::{meshd, openssl, succeeded};

fn issue(ca_dir: &Path, out_dir: &Path, ns: &str, sa: &str) {
    let (ca, out) = (ca_dir.display().to_string(), out_dir.display().to_string());
    succeeded(
        meshd(&[
            "ca",
            "issue",
            "--ca-dir",
            &ca,
            "--namespace",
            ns,
            "--service-account",
            sa,
            "--out-dir",
            &out,
        ]),
        "meshd ca issue",
    );
}

#[test]
fn issued_leaves_verify_and_carry_exactly_the_spiffe_id() {
    let work = tempfile::tempdir().expect("tmp");
    let ca_dir = work.path().join("ca");
    let ca = ca_dir.display().to_string();
    succeeded(meshd(&["ca", "init", "--ca-dir", &ca]), "meshd ca init");
    let root_before = std::fs::read(ca_dir.join("root-cert.pem")).expect("root");
    for (ns, sa) in [("default", "sleep"), ("shop", "cart")] {
        let out = work.path().join(format!("{ns}-{sa}"));
        issue(&ca_dir, &out, ns, sa);
        let verified = openssl(&out, &["verify", "-CAfile", "root-cert.pem", "cert-chain.pem"]);
        assert!(verified.contains("cert-chain.pem: OK"), "{verified}");
        let san = openssl(
            &out,
            &[
                "x509",
                "-in",
                "cert-chain.pem",
                "-noout",
                "-ext",
                "subjectAltName",
            ],
        );
        let names: Vec<&str> = san
            .lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .collect();
        assert_eq!(
            names,
            vec![format!("URI:spiffe://cluster.local/ns/{ns}/sa/{sa}")],
            "{san}"
        );
    }
    // Running init again (a restart) keeps the root.
    succeeded(meshd(&["ca", "init", "--ca-dir", &ca]), "meshd ca init again");
    assert_eq!(
        std::fs::read(ca_dir.join("root-cert.pem")).expect("root"),
        root_before
    );
    let inspect = succeeded(meshd(&["ca", "inspect", "--ca-dir", &ca]), "meshd ca inspect");
    assert!(inspect.contains("CN=meshd root CA"), "{inspect}");
}

#[test]
fn plugged_in_intermediate_chains_to_the_outside_root() {
    let work = tempfile::tempdir().expect("tmp");
    let dir = work.path();
    // An outside root and an intermediate for meshd, the way Istio's
    // plug-in-certificates task makes them.
    std::fs::write(
        dir.join("int.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "365",
            "-subj",
            "/O=Outside/CN=Outside Root",
            "-keyout",
            "root-key.pem",
            "-out",
            "root-cert.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/O=cluster.local/CN=meshd intermediate",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-days",
            "180",
            "-extfile",
            "int.ext",
            "-out",
            "ca-cert.pem",
        ],
    );
    let ca_dir = dir.join("plugged");
    std::fs::create_dir(&ca_dir).expect("mkdir");
    for f in ["ca-cert.pem", "ca-key.pem", "root-cert.pem"] {
        std::fs::copy(dir.join(f), ca_dir.join(f)).expect("copy");
    }
    let chain = [
        std::fs::read_to_string(dir.join("ca-cert.pem")),
        std::fs::read_to_string(dir.join("root-cert.pem")),
    ]
    .map(|r| r.expect("read"))
    .concat();
    std::fs::write(ca_dir.join("cert-chain.pem"), chain).expect("chain");

    let out = dir.join("leaf");
    issue(&ca_dir, &out, "default", "sleep");
    // The leaf file holds leaf + intermediate; openssl takes the intermediate as untrusted.
    let verified = openssl(
        &out,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "cert-chain.pem",
        ],
    );
    assert!(verified.contains("OK"), "{verified}");
    let root = std::fs::read(out.join("root-cert.pem")).expect("root");
    assert_eq!(
        root,
        std::fs::read(dir.join("root-cert.pem")).expect("outside root"),
        "the outside root is the root"
    );

    // A key that does not belong to ca-cert.pem stops the CA with a clear error.
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "other-key.pem",
        ],
    );
    std::fs::copy(dir.join("other-key.pem"), ca_dir.join("ca-key.pem")).expect("copy");
    let out = meshd(&["ca", "inspect", "--ca-dir", &ca_dir.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca-key.pem does not match ca-cert.pem"), "{err}");
}

/// Racing first starts end with one root, owner-only, and nothing staged
/// left behind (a corrupt key stopping start-up is checked in identity.rs).
#[test]
fn a_root_is_made_once_even_by_racing_first_starts() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let work = tempfile::tempdir().expect("tmp");
    let ca_dir = work.path().join("ca");
    let dir = ca_dir.display().to_string();
    // Four first starts at once on an empty directory.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            Command::new(crate::common::meshd_bin())
                .args(["ca", "init", "--ca-dir", &dir])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("meshd ca init")
        })
        .collect();
    let fingerprints: Vec<String> = racers
        .into_iter()
        .map(|child| {
            let out = succeeded(child.wait_with_output().expect("wait"), "meshd ca init");
            out.lines()
                .find_map(|l| l.trim().strip_prefix("root fingerprint (SHA-256): "))
                .unwrap_or_else(|| panic!("no fingerprint in {out}"))
                .to_string()
        })
        .collect();
    let on_disk = openssl(
        work.path(),
        &[
            "x509",
            "-in",
            &format!("{dir}/root-cert.pem"),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    );
    let on_disk = on_disk.trim().rsplit('=').next().unwrap_or_default().to_string();
    for f in &fingerprints {
        assert_eq!(*f, on_disk, "every start uses the one root on disk");
    }
    let mode = std::fs::metadata(ca_dir.join("ca-key.pem"))
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the key is owner-only");
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("staging"))
        .collect();
    assert!(leftovers.is_empty(), "no staging directory left: {leftovers:?}");
}
