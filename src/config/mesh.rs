//! The mesh-wide settings Istio keeps in its MeshConfig (`meshConfig` in
//! its install, the `mesh` key of the `istio` ConfigMap), as far as meshd
//! reads them: the extension providers CUSTOM AuthorizationPolicies name.
//! Fields meshd does not read are accepted and ignored, so an existing
//! Istio mesh config can be given as it is.

use serde::Deserialize;

/// `MeshConfig`, the parts meshd reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
}

/// One `extensionProviders` entry; only the external authorizers are read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
}

/// `envoyExtAuthzHttp`: an HTTP authorization service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzHttp {
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

/// `envoyExtAuthzGrpc`: a gRPC (`envoy.service.auth.v3.Authorization`)
/// authorization service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzGrpc {
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<String>,
}

impl MeshConfig {
    /// Reads a mesh config file (YAML or JSON): a MeshConfig, or Istio's
    /// `istio` ConfigMap whose `data.mesh` holds one.
    pub fn load(path: &std::path::Path) -> Result<MeshConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        MeshConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<MeshConfig, String> {
        let value: serde_json::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let inner = value
            .get("data")
            .and_then(|d| d.get("mesh"))
            .and_then(serde_json::Value::as_str);
        let value = match inner {
            Some(mesh) => serde_norway::from_str(mesh).map_err(|e| format!("data.mesh: {e}"))?,
            None => value,
        };
        let mesh: MeshConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            format!("field {path}: {}", e.into_inner())
        })?;
        for (i, p) in mesh.extension_providers.iter().enumerate() {
            if p.name.is_empty() {
                return Err(format!("field extensionProviders[{i}].name: is required"));
            }
        }
        Ok(mesh)
    }

    /// The provider of that name.
    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_mesh_config_or_the_istio_config_map() {
        let direct = "extensionProviders:\n- name: authz\n  envoyExtAuthzHttp: {service: authz.foo.svc.cluster.local, port: 8000, \
                      includeRequestHeadersInCheck: [x-ext-authz]}\n- name: zipkin\n  zipkin: {service: z, port: 9411}\n\
                      accessLogFile: /dev/stdout\n";
        let mesh = MeshConfig::parse(direct).expect("mesh config");
        let http = mesh
            .provider("authz")
            .and_then(|p| p.envoy_ext_authz_http.as_ref());
        assert_eq!(http.map(|h| h.port), Some(8000));
        assert!(mesh
            .provider("zipkin")
            .is_some_and(|p| p.envoy_ext_authz_http.is_none()));
        let map = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n{}",
            direct.lines().map(|l| format!("    {l}\n")).collect::<String>()
        );
        assert_eq!(MeshConfig::parse(&map).expect("config map"), mesh);
        let bad =
            MeshConfig::parse("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: x}\n");
        assert!(bad.is_err_and(|e| e.contains("extensionProviders[0].envoyExtAuthzHttp.port")));
    }
}
