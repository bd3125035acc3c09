//! Renders Envoy protobufs as JSON, the way Envoy's admin endpoint does
//! (snake_case field names, `Any` expanded with `@type`), through the Envoy
//! API descriptor set that `build.rs` copies from `envoy-types`.

use std::sync::OnceLock;

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// The JSON form of a message packed in an `Any`, with its `@type`.
pub fn any_to_json(any: &Any) -> Result<Value, String> {
    let pool = pool()?;
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let desc = pool
        .get_message_by_name(name)
        .ok_or_else(|| format!("unknown message type {name}"))?;
    let msg = DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| e.to_string())?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    let mut value = msg
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| e.to_string())?;
    if let Value::Object(map) = &mut value {
        map.insert("@type".into(), Value::String(any.type_url.clone()));
    }
    Ok(value)
}

/// Reads a message of type `name` from its JSON (an `@type` in it is
/// ignored; fields unknown to these descriptors are skipped).
fn dynamic_from_json(name: &str, json: &Value) -> Result<DynamicMessage, String> {
    let desc = pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("unknown message type {name}"))?;
    let mut body = json.clone();
    if let Value::Object(map) = &mut body {
        map.remove("@type");
    }
    let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(false);
    DynamicMessage::deserialize_with_options(desc, body, &options).map_err(|e| e.to_string())
}

/// A message's JSON (with its `@type`) as `any_to_json` renders it: read
/// into the message type and written out again, so that two renderings of
/// the same message (meshd's and Envoy's admin) compare equal.
pub fn canonical(json: &Value) -> Result<Value, String> {
    let type_url = json["@type"].as_str().ok_or("a resource without @type")?;
    let name = type_url.rsplit('/').next().unwrap_or_default();
    let msg = dynamic_from_json(name, json)?;
    any_to_json(&Any {
        type_url: type_url.to_string(),
        value: msg.encode_to_vec(),
    })
}

/// A typed message from its JSON (as `any_to_json` or Envoy's admin
/// render it).
pub fn message_from_json<M: Message + prost::Name + Default>(json: &Value) -> Result<M, String> {
    let msg = dynamic_from_json(&M::full_name(), json)?;
    M::decode(msg.encode_to_vec().as_slice()).map_err(|e| e.to_string())
}

/// The JSON form of a typed message.
pub fn message_to_json<M: Message + prost::Name>(m: &M) -> Result<Value, String> {
    any_to_json(&Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    })
}

/// A Secret as Envoy's admin shows it: private keys replaced by
/// `[redacted]`, certificates and CAs as they are.
pub fn redacted_secret(secret: &Secret) -> Secret {
    let mut out = secret.clone();
    if let Some(secret::Type::TlsCertificate(cert)) = &mut out.r#type {
        if cert.private_key.is_some() {
            cert.private_key = Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString("[redacted]".into())),
                ..Default::default()
            });
        }
    }
    out
}

/// `redacted_secret` for a Secret packed in an `Any`.
pub fn redacted_secret_any(any: &Any) -> Any {
    match Secret::decode(any.value.as_slice()) {
        Ok(s) => Any {
            type_url: any.type_url.clone(),
            value: redacted_secret(&s).encode_to_vec(),
        },
        Err(_) => any.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn renders_snake_case_with_type() {
        let c = Cluster {
            name: "outbound|80||a.default.svc.cluster.local".into(),
            alt_stat_name: "x".into(),
            ..Default::default()
        };
        let v = message_to_json(&c).expect("renders");
        assert_eq!(v["@type"], "type.googleapis.com/envoy.config.cluster.v3.Cluster");
        assert_eq!(v["alt_stat_name"], "x");
    }
}
