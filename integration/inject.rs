//! Sidecar injection: `meshd inject` on the seed's Deployment, and the
//! webhook answering an AdmissionReview over real TLS.

use base64::Engine;
use serde_json::{json, Value};

use crate::common::{curl, meshd, write, Meshd, MeshdPorts};

#[test]
fn inject_cli_adds_the_sidecar_like_kube_inject() {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inject/helloworld-deployment.yaml");
    let out = meshd(&["inject", "-f", &file.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name: istio-proxy"));
    assert!(text.contains("meshd iptables && meshd bootstrap --role sidecar"));
    assert!(text.contains("runAsUser: 1337"));
    assert!(text.contains("security.istio.io/tlsMode: istio"));
    let missing = meshd(&["inject", "-f", "/nonexistent.yaml"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn webhook_answers_an_admission_review_with_a_json_patch() {
    let work = tempfile::tempdir().expect("tmp");
    let config = work.path().join("config");
    write(
        &config.join("namespaces.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {istio-injection: enabled}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kube-system\n",
    );
    let ca_dir = work.path().join("ca").display().to_string();
    let m = Meshd::start_with(&config, work.path(), MeshdPorts::free(), &["--ca-dir", &ca_dir]);
    let root = work.path().join("ca/root-cert.pem").display().to_string();
    let post = |namespace: &str| -> Value {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": namespace,
                "operation": "CREATE",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"generateName": "curltest-", "labels": {"run": "curltest"}},
                    "spec": {"containers": [{"name": "curltest", "image": "infoblox/dnstools"}]},
                },
            },
        });
        let url = format!("https://localhost:{}/inject", m.webhook_port);
        let body = review.to_string();
        let (code, text) = curl(&[
            "--cacert",
            &root,
            "-H",
            "Content-Type: application/json",
            "--data",
            &body,
            &url,
        ])
        .expect("webhook over TLS, verified against meshd's root");
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).expect("json")
    };

    let answer = post("default");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: Value = serde_json::from_slice(&patch).expect("a JSON patch");
    let ops: Vec<&str> = patch
        .as_array()
        .expect("ops")
        .iter()
        .filter_map(|o| o["op"].as_str())
        .collect();
    assert_eq!(ops, vec!["add", "add", "replace"]);
    assert_eq!(patch[0]["value"]["security.istio.io/tlsMode"], "istio");
    let containers: Vec<&str> = patch[2]["value"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(containers, vec!["curltest", "istio-proxy"]);
    assert_eq!(patch[2]["value"]["initContainers"][0]["name"], "istio-init");

    // A namespace not labelled istio-injection=enabled: allowed, unchanged.
    let untouched = post("kube-system");
    assert_eq!(untouched["response"]["allowed"], true);
    assert!(untouched["response"].get("patch").is_none(), "{untouched}");
}
