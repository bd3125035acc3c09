//! Turns the text of one file into typed resources or rejections.
//!
//! YAML streams may hold many documents (`---`), and a `kind: List` document
//! holds many items; JSON files hold one document. Each document is decoded
//! on its own, so one bad document never hides the good ones around it.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{validate, Kind, Origin, Rejection, Resource, ResourceKey};

/// The outcome of reading one file.
#[derive(Debug, Clone)]
pub struct FileLoad {
    pub file: Arc<str>,
    /// `Err` when the file as a whole could not be read or parsed. Shared:
    /// a file re-read unchanged hands on the same documents.
    pub documents: Result<Arc<[DocumentLoad]>, Rejection>,
}

/// The outcome of decoding one document.
#[derive(Debug, Clone)]
pub struct DocumentLoad {
    pub origin: Origin,
    /// Shared: a file re-read unchanged hands on the same resources.
    pub result: Result<Arc<Resource>, Rejection>,
}

/// Parses a file's text. `file` is the name used in reports.
pub fn parse_file(file: &str, text: &str) -> FileLoad {
    // One name shared by the file's every origin.
    let name: Arc<str> = file.into();
    let documents = if file.ends_with(".json") {
        serde_json::from_str::<Value>(text)
            .map(|v| {
                let mut out = Vec::new();
                decode_value(&name, v, &[1], 0, &mut out);
                out
            })
            .map_err(|e| e.to_string())
    } else {
        yaml_file(&name, text)
    };
    let documents = documents.map(Arc::from).map_err(|reason| Rejection {
        origin: Origin {
            file: name.clone(),
            document: 0,
            line: 0,
        },
        key: None,
        field: None,
        reason: format!("not valid YAML/JSON: {reason}"),
        last_good_kept: false,
    });
    FileLoad {
        file: name,
        documents,
    }
}

/// Decodes `value`, the `i`-th document of `file` (0-based; a List gives
/// one load per item, an empty document none), onto `out`; `lines` has
/// the line each of the file's documents starts on.
fn decode_value(file: &Arc<str>, value: Value, lines: &[usize], i: usize, out: &mut Vec<DocumentLoad>) {
    if value.is_null() {
        return;
    }
    let origin = Origin {
        file: file.clone(),
        document: i + 1,
        line: lines.get(i).copied().unwrap_or(0),
    };
    out.extend(
        expand_list(value)
            .into_iter()
            .map(|item| decode_document(origin.clone(), item)),
    );
}

/// Files at least this large are parsed on every core.
const PARALLEL_FROM: usize = 1 << 20;

/// A YAML stream's documents, decoded. A large file is cut at document
/// markers into one part per core, parsed and decoded at once; where the
/// parts disagree with the whole (a count that differs, an error), the
/// file is parsed again as one, so reports are the same either way.
fn yaml_file(file: &Arc<str>, text: &str) -> Result<Vec<DocumentLoad>, String> {
    let lines = document_lines(text);
    let cores = crate::parallel::cores();
    if text.len() >= PARALLEL_FROM && cores > 1 {
        if let Some(documents) = yaml_in_parts(file, text, &lines, cores) {
            return Ok(documents);
        }
    }
    Ok(yaml_decoded(file, text, &lines)?.1)
}

fn yaml_in_parts(file: &Arc<str>, text: &str, lines: &[usize], parts: usize) -> Option<Vec<DocumentLoad>> {
    let mut cuts = vec![0];
    for k in 1..parts {
        let from = (text.len() * k / parts).max(*cuts.last()?);
        if let Some(cut) = next_document_marker(text, from) {
            if cut > *cuts.last()? {
                cuts.push(cut);
            }
        }
    }
    cuts.push(text.len());
    let pieces: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let parsed = crate::parallel::map(true, &pieces, |part| yaml_decoded(file, part, &[]).ok());
    let mut out = Vec::new();
    let mut first = 0;
    for part in parsed {
        let (count, documents) = part?;
        for mut d in documents {
            let i = first + d.origin.document - 1;
            let origin = Origin {
                file: file.clone(),
                document: i + 1,
                line: lines.get(i).copied().unwrap_or(0),
            };
            if let Err(r) = &mut d.result {
                r.origin = origin.clone();
            }
            d.origin = origin;
            out.push(d);
        }
        first += count;
    }
    (first == lines.len()).then_some(out)
}

/// The start of the first line at or after byte `from` that is a document
/// marker (`---` alone or followed by a space or tab).
fn next_document_marker(text: &str, from: usize) -> Option<usize> {
    // Bytes, not `str`: `from` may fall inside a character.
    let bytes = text.as_bytes();
    let mut at = from;
    while let Some(found) = bytes.get(at..)?.windows(4).position(|w| w == b"\n---") {
        let start = at + found + 1;
        let rest = &bytes[start + 3..];
        if rest
            .first()
            .is_none_or(|c| matches!(c, b'\n' | b'\r' | b' ' | b'\t'))
        {
            return Some(start);
        }
        at = start;
    }
    None
}

/// The line each document of a YAML stream starts on (its first line
/// that is not blank or a comment), in the order the parser yields them:
/// `---` ends a document (an empty one too), except a `---` before any
/// content, which only opens the first.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut start = 1;
    let mut content = false;
    let mut opened = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let rest = line
            .strip_prefix("---")
            .filter(|r| r.is_empty() || r.starts_with([' ', '\t']));
        if let Some(rest) = rest {
            if opened || content {
                starts.push(start);
            }
            opened = true;
            start = n;
            let inline = rest.trim();
            content = !inline.is_empty() && !inline.starts_with('#');
            continue;
        }
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t == "..." {
            continue;
        }
        if !content {
            start = n;
        }
        content = true;
    }
    if content {
        starts.push(start);
    }
    starts
}

/// The documents of a YAML stream, each decoded as soon as it is parsed,
/// so that one document's JSON value is freed before the next is made:
/// how many documents the stream holds, and their loads. Any document
/// that does not parse fails the whole stream.
fn yaml_decoded(file: &Arc<str>, text: &str, lines: &[usize]) -> Result<(usize, Vec<DocumentLoad>), String> {
    use serde::Deserialize;
    let mut out = Vec::new();
    let mut count = 0;
    for doc in serde_norway::Deserializer::from_str(text) {
        // Straight into a JSON value: no YAML value tree built and converted.
        let value = Value::deserialize(doc).map_err(|e| e.to_string())?;
        decode_value(file, value, lines, count, &mut out);
        count += 1;
    }
    Ok((count, out))
}

fn expand_list(value: Value) -> Vec<Value> {
    let is_list = value.get("kind").and_then(Value::as_str) == Some("List");
    match value {
        Value::Object(mut map) if is_list => match map.remove("items") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        other => vec![other],
    }
}

/// Decodes and validates one document (a file's, or an object the cluster
/// source received).
// A rejection is built once per bad document, off any hot path; boxing it
// would only add noise.
#[allow(clippy::result_large_err)]
pub fn decode_document(origin: Origin, mut value: Value) -> DocumentLoad {
    let reject = |key: Option<ResourceKey>, field: Option<String>, reason: String| Rejection {
        origin: origin.clone(),
        key,
        field,
        reason,
        last_good_kept: false,
    };
    let result = (|| {
        let Some(obj) = value.as_object_mut() else {
            return Err(reject(None, None, "a document must be a mapping".into()));
        };
        let api_version = str_field(obj, "apiVersion");
        let kind_name = str_field(obj, "kind");
        let Some(kind) = Kind::from_type(&api_version, &kind_name) else {
            let field = if kind_name.is_empty() {
                "kind"
            } else {
                "apiVersion"
            };
            let what = if kind_name.is_empty() {
                "a document needs apiVersion and kind".to_string()
            } else {
                format!("{kind_name} ({api_version}) is not a kind meshd reads")
            };
            return Err(reject(None, Some(field.into()), what));
        };
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut namespace = String::new();
        if kind.namespaced() {
            if let Some(m) = meta.as_object_mut() {
                let ns = m
                    .entry("namespace")
                    .or_insert_with(|| Value::String("default".into()));
                namespace = ns.as_str().unwrap_or_default().to_string();
            }
        }
        let key = ResourceKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        };
        if key.name.is_empty() {
            return Err(reject(
                Some(key),
                Some("metadata.name".into()),
                "is required".into(),
            ));
        }
        let resource =
            decode_kind(kind, value).map_err(|(field, reason)| reject(Some(key.clone()), field, reason))?;
        if let Some((field, reason)) = validate::validate(&resource) {
            return Err(reject(Some(key), Some(field), reason));
        }
        Ok(Arc::new(resource))
    })();
    DocumentLoad { origin, result }
}

fn str_field(obj: &serde_json::Map<String, Value>, name: &str) -> String {
    obj.get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

type DecodeError = (Option<String>, String);

fn decode_kind(kind: Kind, value: Value) -> Result<Resource, DecodeError> {
    Ok(match kind {
        Kind::Namespace => Resource::Namespace(typed(value)?),
        Kind::Node => Resource::Node(typed(value)?),
        Kind::Service => Resource::Service(typed(value)?),
        Kind::Endpoints => Resource::Endpoints(typed(value)?),
        Kind::EndpointSlice => Resource::EndpointSlice(typed(value)?),
        Kind::Pod => Resource::Pod(typed(value)?),
        Kind::Secret => Resource::Secret(Arc::new(typed(value)?)),
        Kind::Gateway => Resource::Gateway(Arc::new(typed(value)?)),
        Kind::VirtualService => Resource::VirtualService(Arc::new(typed(value)?)),
        Kind::DestinationRule => Resource::DestinationRule(Arc::new(typed(value)?)),
        Kind::ServiceEntry => Resource::ServiceEntry(typed(value)?),
        Kind::Sidecar => Resource::Sidecar(typed(value)?),
        Kind::PeerAuthentication => Resource::PeerAuthentication(Arc::new(typed(value)?)),
        Kind::RequestAuthentication => Resource::RequestAuthentication(Arc::new(typed(value)?)),
        Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(Arc::new(typed(value)?)),
        Kind::Ingress => Resource::Ingress(typed(value)?),
        Kind::IngressClass => Resource::IngressClass(typed(value)?),
        Kind::GatewayClass => Resource::GatewayClass(typed(value)?),
        Kind::K8sGateway => Resource::K8sGateway(typed(value)?),
        Kind::HttpRoute => Resource::HttpRoute(typed(value)?),
        Kind::GrpcRoute => Resource::GrpcRoute(typed(value)?),
        Kind::TcpRoute => Resource::TcpRoute(typed(value)?),
        Kind::TlsRoute => Resource::TlsRoute(typed(value)?),
        Kind::ReferenceGrant => Resource::ReferenceGrant(typed(value)?),
    })
}

/// Deserializes, with the path of the failing field. Most documents
/// decode, so the value is read first without tracking the path (which
/// copies every map key it passes); only a failing one is read again.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, DecodeError> {
    T::deserialize(&value).or_else(|_| with_path(value))
}

fn with_path<T: DeserializeOwned>(value: Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        (field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn documents_know_the_line_they_start_on() {
        let text = "# a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n\n\
                    apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
        let load = parse_file("ns.yaml", text);
        let origins: Vec<(usize, usize)> = load
            .documents
            .expect("parses")
            .iter()
            .map(|d| (d.origin.document, d.origin.line))
            .collect();
        // The empty document between the two separators is counted, as the
        // parser counts it.
        assert_eq!(origins, [(1, 3), (3, 9)]);
        assert_eq!(
            Origin {
                file: "ns.yaml".into(),
                document: 3,
                line: 9
            }
            .to_string(),
            "ns.yaml:9: document 3"
        );
    }
    use super::*;

    fn rejection(text: &str) -> Rejection {
        let load = parse_file("t.yaml", text);
        let docs = load.documents.expect("file parses");
        docs.iter()
            .find_map(|d| d.result.clone().err())
            .expect("a rejection")
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let r = rejection(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: hw}\n\
             spec:\n  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a, prot: {number: 80}}\n",
        );
        assert_eq!(r.field.as_deref(), Some("spec.http[0].route[0].destination.prot"));
        assert!(r.reason.contains("unknown field `prot`"), "{}", r.reason);
        assert_eq!(r.key.expect("key").to_string(), "VirtualService default/hw");
    }

    #[test]
    fn documents_are_numbered_and_bad_ones_do_not_hide_good_ones() {
        let load = parse_file(
            "t.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\nkind: Nope\napiVersion: v1\n\
             metadata: {name: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        );
        let docs = load.documents.expect("parses");
        let indexes: Vec<_> = docs.iter().map(|d| d.origin.document).collect();
        assert_eq!(indexes, vec![1, 3, 4]);
        assert!(docs[0].result.is_ok() && docs[1].result.is_err() && docs[2].result.is_ok());
        let err = docs[1].result.clone().expect_err("unknown kind");
        assert!(err.reason.contains("not a kind meshd reads"));
    }

    /// A file large enough to be parsed in parts gives what parsing it
    /// as one gives: the same documents, origins, lines and rejections.
    #[test]
    fn a_large_file_parsed_in_parts_reads_as_one() {
        let mut docs = Vec::new();
        for i in 0..20000 {
            docs.push(match i % 7 {
                0 => format!("# service {i}, café ünïcode\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n"),
                1 => String::new(),
                2 => format!("apiVersion: v1\nkind: Nope\nmetadata: {{name: n{i}}}\n"),
                3 => format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v{i}}}\nspec:\n  hosts: [s{i}]\n  http: [{{route: [{{destination: {{host: s{i}, prot: 1}}}}]}}]\n"),
                4 => format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: c{i}}}\nstringData:\n  pem: |\n    line one\n    --- not a marker\n"),
                _ => format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{i}\n"),
            });
        }
        let text = docs.join("---\n");
        assert!(text.len() >= PARALLEL_FROM);
        let lines = document_lines(&text);
        let parts =
            yaml_in_parts(&"big.yaml".into(), &text, &lines, 3).expect("the parts agree with the whole");
        let (_, whole) = yaml_decoded(&"big.yaml".into(), &text, &lines).expect("parses");
        assert_eq!(parts.len(), whole.len());
        for (a, b) in parts.iter().zip(&whole) {
            assert_eq!(a.origin, b.origin);
            assert_eq!(a.result, b.result);
        }
        assert!(whole.iter().any(|d| d.result.is_err()) && whole.iter().any(|d| d.result.is_ok()));
        let read = parse_file("big.yaml", &text).documents.expect("parses");
        assert_eq!(read.len(), whole.len());
    }

    #[test]
    fn malformed_yaml_fails_the_file() {
        let load = parse_file("bad.yaml", "kind: [unclosed\n");
        let err = load.documents.expect_err("malformed");
        assert!(err.reason.starts_with("not valid YAML/JSON"), "{}", err.reason);
    }

    #[test]
    fn namespace_defaults_and_lists_expand() {
        let load = parse_file(
            "l.json",
            r#"{"kind":"List","apiVersion":"v1","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"s"}}]}"#,
        );
        let docs = load.documents.expect("parses");
        let res = docs[0].result.clone().expect("ok");
        assert_eq!(&*res.key().namespace, "default");
    }
}
