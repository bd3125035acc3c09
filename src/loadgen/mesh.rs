//! The synthetic mesh `meshd loadgen` serves: S services of E endpoints in
//! N namespaces, V VirtualServices bound to the mesh and to an ingress
//! Gateway, optionally a Sidecar per namespace scoping each sidecar to its
//! own namespace; and the scripted changes, each leaving a marker string in
//! the resources that carry it, so a client can tell it has the change.

use std::fmt::Write as _;
use std::path::Path;

/// The shape of the generated mesh.
#[derive(Debug, Clone, Copy)]
pub struct MeshSpec {
    pub services: usize,
    pub endpoints: usize,
    pub virtual_services: usize,
    pub namespaces: usize,
    pub sidecar_scoping: bool,
}

/// The scripted change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// One endpoint of the first service moves to a new address.
    Endpoint,
    /// A new service (with endpoints) appears in the first namespace.
    Service,
    /// The first VirtualService gains a request header.
    #[value(name = "virtualservice")]
    #[serde(rename = "virtualservice")]
    VirtualService,
}

impl Change {
    /// A string that appears in the bytes of every resource carrying the
    /// change, and in none before it.
    pub fn marker(self) -> &'static str {
        match self {
            Change::Endpoint => "10.255.255.254",
            Change::Service => "loadgen-new",
            Change::VirtualService => "loadgen-change",
        }
    }
}

/// The address of endpoint `j` of service `i`.
fn endpoint_ip(spec: &MeshSpec, i: usize, j: usize) -> String {
    let n = i * spec.endpoints + j + 1;
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

fn namespace(spec: &MeshSpec, i: usize) -> String {
    format!("ns-{}", i % spec.namespaces.max(1))
}

fn endpoints_doc(spec: &MeshSpec, i: usize, moved: bool) -> String {
    let mut addresses: Vec<String> = (0..spec.endpoints).map(|j| endpoint_ip(spec, i, j)).collect();
    if moved {
        if let Some(first) = addresses.first_mut() {
            *first = Change::Endpoint.marker().into();
        }
    }
    let list: Vec<String> = addresses.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
    format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nsubsets:\n\
         - addresses: [{}]\n  ports: [{{name: http, port: 8080}}]\n",
        list.join(", "),
        ns = namespace(spec, i)
    )
}

fn service_doc(name: &str, ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    )
}

fn virtual_service_doc(spec: &MeshSpec, i: usize, changed: bool) -> String {
    let ns = namespace(spec, i);
    let host = format!("svc-{i}.{ns}.svc.cluster.local");
    let headers = if changed {
        format!(
            "\n    headers:\n      request:\n        set: {{x-loadgen: {}}}",
            Change::VirtualService.marker()
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: svc-{i}, namespace: {ns}}}\n\
         spec:\n  hosts: [{host}, svc-{i}.example.com]\n  gateways: [mesh, istio-system/gw]\n  http:\n\
         \x20 - match: [{{uri: {{prefix: /api}}}}]\n    timeout: 5s\n    route: [{{destination: {{host: {host}}}}}]{headers}\n\
         \x20 - route: [{{destination: {{host: {host}}}}}]\n"
    )
}

/// Writes `text` to `dir/file` in one step (a temporary file renamed), so
/// a meshd watching `dir` never reads it half-written.
fn write_file(dir: &Path, file: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(file))
}

/// The file of a scripted new service: a run leaves it behind, and the
/// next run in the same directory must start without it.
const NEW_SERVICE_FILE: &str = "new-service.yaml";

/// The file that tells a running meshd's clusters apart from a mesh
/// written before (see [`write_sync`]).
const SYNC_FILE: &str = "loadgen-sync.yaml";

/// Writes the mesh into `dir`: one file for most of it, and the resources
/// the changes touch in files of their own. A new service a run before
/// left in `dir` is removed.
pub fn write(dir: &Path, spec: &MeshSpec) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut main = String::from(
        "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\n\
         spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*/*']\n",
    );
    for n in 0..spec.namespaces.max(1) {
        let _ = write!(
            main,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}}}\n"
        );
        if spec.sidecar_scoping {
            let _ = write!(
                main,
                "---\napiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {{name: default, namespace: ns-{n}}}\n\
                 spec:\n  egress:\n  - hosts: ['./*', 'istio-system/*']\n"
            );
        }
    }
    for i in 0..spec.services {
        main.push_str("---\n");
        main.push_str(&service_doc(&format!("svc-{i}"), &namespace(spec, i)));
        if i > 0 {
            main.push_str("---\n");
            main.push_str(&endpoints_doc(spec, i, false));
        }
        if i > 0 && i < spec.virtual_services {
            main.push_str("---\n");
            main.push_str(&virtual_service_doc(spec, i, false));
        }
    }
    write_file(dir, "mesh.yaml", &main)?;
    if spec.services > 0 {
        write_file(dir, "endpoints-0.yaml", &endpoints_doc(spec, 0, false))?;
        if spec.virtual_services > 0 {
            write_file(dir, "vs-0.yaml", &virtual_service_doc(spec, 0, false))?;
        }
    }
    remove(dir, NEW_SERVICE_FILE)
}

fn remove(dir: &Path, file: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(file)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes, after the mesh, a service of the first namespace named after
/// `nonce`; returns its name. Its cluster reaches a sidecar of that
/// namespace only from a reading of `dir` made after every file of the
/// mesh was in place.
pub fn write_sync(dir: &Path, spec: &MeshSpec, nonce: u64) -> std::io::Result<String> {
    let name = format!("loadgen-sync-{nonce:016x}");
    write_file(dir, SYNC_FILE, &service_doc(&name, &namespace(spec, 0)))?;
    Ok(name)
}

/// Removes the service [`write_sync`] wrote.
pub fn remove_sync(dir: &Path) -> std::io::Result<()> {
    remove(dir, SYNC_FILE)
}

/// Soak churn step `k`: svc-0's endpoints move to another address (never
/// the change's marker), written in one step.
pub fn churn(dir: &Path, spec: &MeshSpec, k: u64) -> std::io::Result<()> {
    let mut text = endpoints_doc(spec, 0, false);
    let moved = format!("10.254.{}.{}", (k / 250) % 250, k % 250 + 1);
    if let Some(first) = text.find("{ip: ") {
        let end = text[first..].find('}').map_or(text.len(), |e| first + e + 1);
        text.replace_range(first..end, &format!("{{ip: {moved}}}"));
    }
    write_file(dir, "endpoints-0.yaml", &text)
}

/// Applies `change` to the mesh in `dir` (written in one step, so the
/// watcher sees one change).
pub fn apply(dir: &Path, spec: &MeshSpec, change: Change) -> std::io::Result<()> {
    let (file, text) = match change {
        Change::Endpoint => ("endpoints-0.yaml", endpoints_doc(spec, 0, true)),
        Change::VirtualService => ("vs-0.yaml", virtual_service_doc(spec, 0, true)),
        Change::Service => {
            let ns = namespace(spec, 0);
            let name = Change::Service.marker();
            let text = format!(
                "{}---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: {ns}}}\nsubsets:\n\
                 - addresses: [{{ip: 10.255.255.1}}]\n  ports: [{{name: http, port: 8080}}]\n",
                service_doc(name, &ns)
            );
            (NEW_SERVICE_FILE, text)
        }
    };
    write_file(dir, file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_and_every_change_load_cleanly() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = MeshSpec {
            services: 12,
            endpoints: 3,
            virtual_services: 4,
            namespaces: 3,
            sidecar_scoping: true,
        };
        write(dir.path(), &spec).expect("write");
        for change in [Change::Endpoint, Change::Service, Change::VirtualService] {
            apply(dir.path(), &spec, change).expect("apply");
        }
        let files = crate::source::load_dir(dir.path()).expect("load");
        let snapshot = crate::config::ConfigSnapshot::from_files(files);
        assert!(snapshot.rejections.is_empty(), "{:?}", snapshot.rejections);
        let push = crate::model::PushContext::new(std::sync::Arc::new(snapshot));
        assert_eq!(push.services.len(), 13);
        let moved = &push.services["svc-0.ns-0.svc.cluster.local"].ports[0].endpoints;
        assert!(moved.iter().any(|e| e.ip == Change::Endpoint.marker()));
    }
}
