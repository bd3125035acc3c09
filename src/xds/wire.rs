//! ADS responses written straight to the wire. Every resource is encoded
//! once per generation (`Encoded::wire`, a shared `Bytes`). A response is
//! the gRPC frame header and its own few small fields around the body of
//! its `Batch`: the resources' fields, encoded once for all the streams
//! sending that batch at the time (small resources gathered into one
//! buffer, large ones their own shared bytes), handed to HTTP/2 as a few
//! chunks. Nothing of a resource is copied per stream, and no stream keeps
//! an encode buffer the size of the largest response it ever sent (what
//! tonic's per-stream encoder does).
//!
//! The two ADS methods are served by `AdsService`, a gRPC service written
//! against tonic's request decoding and an `http_body::Body` of our own.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use tokio::sync::mpsc;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

use super::request::MessageDecoder;
use super::server::AdsServer;
use super::stream::Outgoing;
use super::Encoded;

/// One encoded ADS response: its chunks, gRPC header first. The middle
/// chunks are the batch's body, and each holds it (see `Batch`).
#[derive(Debug, Default)]
pub struct Wire {
    pub chunks: Vec<Bytes>,
}

fn varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// A length-delimited field's key and length.
fn delimited(buf: &mut BytesMut, field: u32, len: usize) {
    varint(buf, u64::from(field << 3 | 2));
    varint(buf, len as u64);
}

fn string_field(buf: &mut BytesMut, field: u32, s: &str) {
    if !s.is_empty() {
        delimited(buf, field, s.len());
        buf.put_slice(s.as_bytes());
    }
}

fn varint_len(v: usize) -> usize {
    let mut v = v as u64;
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// The size of a string field as `string_field` writes it (field numbers
/// below 16 take one byte of key).
fn string_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(s.len())
    }
}

/// The size of a length-delimited field holding `len` bytes.
fn delimited_len(len: usize) -> usize {
    1 + varint_len(len) + len
}

/// The size of a length-delimited field's key and length alone.
fn prefix_len(len: usize) -> usize {
    delimited_len(len) - len
}

fn control_plane_id() -> String {
    format!("meshd {}", env!("CARGO_PKG_VERSION"))
}

/// Resources sent together, with their part of a response's message
/// encoded once for each protocol variant while any stream is sending it.
/// A stream's walk over a snapshot is shared by the streams of one config
/// key (`Walks`), and so is its batch: two thousand proxies sent the same
/// thousand clusters at once hold one copy of the encoded bytes, not one
/// each. Every chunk of the body handed to HTTP/2 holds it until h2 has
/// written that chunk (a body dropped when its chunks were handed over was
/// made again, a copy, for each next stream while h2 still queued the
/// last one's). Once no chunk holds it and `RecentBodies` has let it go,
/// the body is dropped, so a snapshot does not keep a second copy of its
/// resources.
#[derive(Default)]
pub struct Batch {
    items: Vec<Arc<Encoded>>,
    sotw: Mutex<Weak<Body>>,
    delta: Mutex<Weak<Body>>,
}

/// The encoded `resources` fields of a response: small resources copied
/// into one buffer, a large one its own shared bytes (so that it is not
/// copied into every batch that carries it).
#[derive(Debug, Default)]
struct Body {
    segments: Vec<Bytes>,
    len: usize,
}

/// One segment of a body as a chunk of a response: it keeps the body, so
/// the batch hands the same body to other streams while h2 holds it.
struct Segment {
    body: Arc<Body>,
    index: usize,
}

/// The bodies used last, kept for the streams that send the same
/// resources after HTTP/2 has written every response holding one: at an
/// initial sync, proxies connect one after another, those of every config
/// key are sent the same thousand clusters (one shared map, walked once
/// per config key, so a batch of each), and each would copy them into a
/// body of its own. A body is found again by the resources it was made of
/// (the same `Encoded`s, in order). At most `budget` bytes are kept (the
/// bodies' segments, the shared ones included, and what the resource
/// lists hold) in at most `KEPT_MAX` bodies, the one used longest ago let
/// go first; a body larger than the budget is not kept, nor one under
/// `KEPT_MIN` bytes (made again for less than finding it costs: an
/// endpoint change's bodies of one assignment would otherwise fill the
/// list with thousands).
pub struct RecentBodies {
    budget: usize,
    kept: Mutex<KeptBodies>,
}

struct KeptBodies {
    bodies: VecDeque<Kept>,
    bytes: usize,
}

/// A kept body and what it was made of. The `Weak`s keep the resources'
/// allocations (not their contents), so an address seen again is the same
/// resource, not a new one where a dropped one was.
struct Kept {
    delta: bool,
    items: Vec<Weak<Encoded>>,
    body: Arc<Body>,
}

impl Kept {
    fn bytes(&self) -> usize {
        Kept::size(&self.body, self.items.len())
    }

    /// What keeping `body` holds at most: its bytes, and for each of its
    /// `items` a `Weak` and the allocation it keeps once the resource is
    /// dropped (the `Encoded` and its two reference counts).
    fn size(body: &Body, items: usize) -> usize {
        use std::mem::size_of;
        body.len + items * (size_of::<Weak<Encoded>>() + size_of::<Encoded>() + 2 * size_of::<usize>())
    }
}

impl RecentBodies {
    /// What a server keeps: a few config keys' clusters and endpoints at
    /// a thousand services.
    pub const BUDGET: usize = 4 << 20;
    /// Bodies kept at most, so that finding one is a short walk.
    const KEPT_MAX: usize = 64;
    const KEPT_MIN: usize = 16 * 1024;

    pub const fn new(budget: usize) -> RecentBodies {
        RecentBodies {
            budget,
            kept: Mutex::new(KeptBodies {
                bodies: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    /// A kept body of the `delta` variant made of `items`, which is then
    /// the last to be let go.
    fn find(&self, delta: bool, items: &[Arc<Encoded>]) -> Option<Arc<Body>> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let at = kept.bodies.iter().rposition(|k| {
            k.delta == delta
                && k.items.len() == items.len()
                && k.items
                    .iter()
                    .zip(items)
                    .all(|(w, a)| w.as_ptr() == Arc::as_ptr(a))
        })?;
        let found = kept.bodies.remove(at)?;
        let body = found.body.clone();
        kept.bodies.push_back(found);
        Some(body)
    }

    fn keep(&self, delta: bool, items: &[Arc<Encoded>], body: &Arc<Body>) {
        if Kept::size(body, items.len()) > self.budget || body.len < RecentBodies::KEPT_MIN {
            return;
        }
        let kept = Kept {
            delta,
            items: items.iter().map(Arc::downgrade).collect(),
            body: body.clone(),
        };
        let mut gone = Vec::new();
        {
            let mut all = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
            all.bytes += kept.bytes();
            all.bodies.push_back(kept);
            while all.bytes > self.budget || all.bodies.len() > RecentBodies::KEPT_MAX {
                let Some(oldest) = all.bodies.pop_front() else {
                    break;
                };
                all.bytes -= oldest.bytes();
                gone.push(oldest);
            }
        }
        // Freed outside the lock.
        drop(gone);
    }
}

impl std::fmt::Debug for RecentBodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("RecentBodies")
            .field("budget", &self.budget)
            .field("bodies", &kept.bodies.len())
            .field("bytes", &kept.bytes)
            .finish()
    }
}

impl Default for RecentBodies {
    fn default() -> RecentBodies {
        RecentBodies::new(RecentBodies::BUDGET)
    }
}

impl AsRef<[u8]> for Segment {
    fn as_ref(&self) -> &[u8] {
        &self.body.segments[self.index]
    }
}

impl Batch {
    /// Resources at least this large are not copied into a batch's body.
    const SHARED: usize = 16 * 1024;

    pub fn new(items: Vec<Arc<Encoded>>) -> Arc<Batch> {
        Arc::new(Batch {
            items,
            ..Default::default()
        })
    }

    /// The body in `slot` if a response still holds it, else the one
    /// `recent` kept of the same resources, else a new one, which `recent`
    /// keeps for a while.
    fn body(&self, delta: bool, recent: &RecentBodies, make: impl FnOnce() -> Body) -> Arc<Body> {
        let slot = if delta { &self.delta } else { &self.sotw };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(body) = slot.upgrade() {
            return body;
        }
        let body = match recent.find(delta, &self.items) {
            Some(body) => body,
            None => {
                let body = Arc::new(make());
                recent.keep(delta, &self.items, &body);
                body
            }
        };
        *slot = Arc::downgrade(&body);
        body
    }

    /// `repeated google.protobuf.Any resources = 2` of a `DiscoveryResponse`.
    fn sotw(&self, recent: &RecentBodies) -> Arc<Body> {
        self.body(false, recent, || {
            Body::of(
                &self.items,
                |r| (prefix_len(r.wire.len()), 0),
                |buf, r| delimited(buf, 2, r.wire.len()),
                |_, _| {},
            )
        })
    }

    /// `repeated Resource resources = 2` of a `DeltaDiscoveryResponse`,
    /// each `Resource { version = 1, resource = 2 (the Any), name = 3 }`.
    fn delta(&self, recent: &RecentBodies) -> Arc<Body> {
        self.body(true, recent, || {
            let inner =
                |r: &Encoded| string_len(&r.version) + delimited_len(r.wire.len()) + string_len(&r.name);
            Body::of(
                &self.items,
                |r| {
                    let head = prefix_len(inner(r)) + string_len(&r.version) + prefix_len(r.wire.len());
                    (head, string_len(&r.name))
                },
                |buf, r| {
                    delimited(buf, 2, inner(r));
                    string_field(buf, 1, &r.version);
                    delimited(buf, 2, r.wire.len());
                },
                |buf, r| string_field(buf, 3, &r.name),
            )
        })
    }
}

impl Body {
    /// Each resource as `before`, its `wire`, `after` write it; `sizes`
    /// gives what those two write, for one exact buffer.
    fn of(
        items: &[Arc<Encoded>],
        sizes: impl Fn(&Encoded) -> (usize, usize),
        before: impl Fn(&mut BytesMut, &Encoded),
        after: impl Fn(&mut BytesMut, &Encoded),
    ) -> Body {
        let copied: usize = items
            .iter()
            .map(|r| {
                let (b, a) = sizes(r);
                let wire = if r.wire.len() < Batch::SHARED {
                    r.wire.len()
                } else {
                    0
                };
                b + wire + a
            })
            .sum();
        let mut current = BytesMut::with_capacity(copied);
        let mut segments = Vec::new();
        let mut len = 0;
        for r in items {
            before(&mut current, r);
            if r.wire.len() < Batch::SHARED {
                current.put_slice(&r.wire);
            } else {
                if !current.is_empty() {
                    len += current.len();
                    segments.push(current.split().freeze());
                }
                len += r.wire.len();
                segments.push(r.wire.clone());
            }
            after(&mut current, r);
        }
        if !current.is_empty() {
            len += current.len();
            segments.push(current.freeze());
        }
        Body { segments, len }
    }
}

impl std::ops::Deref for Batch {
    type Target = [Arc<Encoded>];
    fn deref(&self) -> &[Arc<Encoded>] {
        &self.items
    }
}

impl PartialEq for Batch {
    fn eq(&self, other: &Batch) -> bool {
        self.items == other.items
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.items.iter().map(|r| &r.name))
            .finish()
    }
}

impl Wire {
    /// Bytes on the wire (the gRPC frame, header included).
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// A gRPC frame: the header and `first` field, the batch's shared
    /// body, then the `last` fields.
    fn frame(first: &str, body: Arc<Body>, last_len: usize, last: impl FnOnce(&mut BytesMut)) -> Wire {
        let len = string_len(first) + body.len + last_len;
        let mut head = BytesMut::with_capacity(5 + string_len(first));
        head.put_u8(0);
        head.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        string_field(&mut head, 1, first);
        let mut tail = BytesMut::with_capacity(last_len);
        last(&mut tail);
        let mut chunks = Vec::with_capacity(body.segments.len() + 2);
        chunks.push(head.freeze());
        chunks.extend((0..body.segments.len()).map(|index| {
            Bytes::from_owner(Segment {
                body: body.clone(),
                index,
            })
        }));
        if !tail.is_empty() {
            chunks.push(tail.freeze());
        }
        Wire { chunks }
    }

    /// A `DiscoveryResponse`.
    pub fn sotw(out: &Outgoing, recent: &RecentBodies) -> Wire {
        let id = control_plane_id();
        let tail = string_len(out.type_.url()) + string_len(&out.nonce) + delimited_len(string_len(&id));
        Wire::frame(&out.version, out.resources.sotw(recent), tail, |buf| {
            string_field(buf, 4, out.type_.url());
            string_field(buf, 5, &out.nonce);
            delimited(buf, 6, string_len(&id));
            string_field(buf, 1, &id);
        })
    }

    /// A `DeltaDiscoveryResponse`.
    pub fn delta(out: &Outgoing, recent: &RecentBodies) -> Wire {
        let id = control_plane_id();
        let removed: usize = out.removed.iter().map(|n| string_len(n)).sum();
        let tail =
            string_len(out.type_.url()) + string_len(&out.nonce) + removed + delimited_len(string_len(&id));
        Wire::frame(&out.version, out.resources.delta(recent), tail, |buf| {
            string_field(buf, 4, out.type_.url());
            string_field(buf, 5, &out.nonce);
            for removed in &out.removed {
                string_field(buf, 6, removed);
            }
            delimited(buf, 7, string_len(&id));
            string_field(buf, 1, &id);
        })
    }
}

/// The requests of one ADS stream, read by `D` from the DATA frames of
/// the request body as they arrive.
pub struct Requests<B, D> {
    body: B,
    decoder: D,
    /// What is left of the last DATA frame.
    data: Bytes,
    /// The body has ended.
    done: bool,
    /// An error was returned: the stream is over.
    failed: bool,
}

impl<B, D> Requests<B, D> {
    pub fn new(body: B, decoder: D) -> Self {
        Requests {
            body,
            decoder,
            data: Bytes::new(),
            done: false,
            failed: false,
        }
    }

    /// Ends the stream with `status`.
    fn fail<T>(&mut self, status: Status) -> Poll<Option<Result<T, Status>>> {
        self.failed = true;
        Poll::Ready(Some(Err(status)))
    }
}

impl<B, D> futures::Stream for Requests<B, D>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
    D: MessageDecoder + Unpin,
{
    type Item = Result<D::Item, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.failed {
                return Poll::Ready(None);
            }
            if !this.data.is_empty() {
                match this.decoder.decode(&mut this.data) {
                    Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                    Ok(None) => {}
                    Err(status) => return this.fail(status),
                }
                continue;
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    if this.decoder.mid_message() {
                        return this.fail(Status::internal("the request stream ended inside a message"));
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    return this.fail(Status::unavailable(format!("request stream: {e}")));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.data = data;
                    }
                }
            }
        }
    }
}

/// The response body of one ADS stream: the chunks of each response as
/// they come, then the gRPC status as trailers.
struct ResponseBody {
    rx: mpsc::Receiver<Result<Wire, Status>>,
    /// The chunks of the response being sent not yet handed to HTTP/2.
    pending: std::vec::IntoIter<Bytes>,
    done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(chunk) = self.pending.next() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(wire))) => {
                    self.pending = wire.chunks.into_iter();
                }
                Poll::Ready(end) => {
                    self.done = true;
                    let status = match end {
                        Some(Err(status)) => status,
                        _ => Status::ok(""),
                    };
                    let mut trailers = http::HeaderMap::new();
                    // A status whose message cannot be a header value is
                    // sent without it.
                    if status.add_header(&mut trailers).is_err() {
                        let _ = Status::new(status.code(), "").add_header(&mut trailers);
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
    }
}

/// The ADS gRPC service (state of the world and delta) on responses written
/// as `Wire`.
#[derive(Debug, Clone)]
pub struct AdsService {
    server: AdsServer,
}

impl AdsServer {
    /// The gRPC service serving this server's streams.
    pub fn into_service(self) -> AdsService {
        AdsService { server: self }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

fn grpc_response(body: ResponseBody) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let server = self.server.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let request = tonic::Request::from_http(req);
            let (tx, rx) = mpsc::channel(16);
            let body = ResponseBody {
                rx,
                pending: Vec::new().into_iter(),
                done: false,
            };
            let started = match path.rsplit('/').next() {
                Some("StreamAggregatedResources") => {
                    server
                        .start::<super::request::SotwRequest, B>("sotw", request, tx)
                        .await
                }
                Some("DeltaAggregatedResources") => {
                    server
                        .start::<super::server::DeltaRequestMessage, B>("delta", request, tx)
                        .await
                }
                _ => Err(Status::unimplemented(format!("no method {path}"))),
            };
            match started {
                Ok(()) => Ok(grpc_response(body)),
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };
    use envoy_types::pb::google::rpc;
    use http_body::Frame;
    use prost::Message;

    use super::*;
    use crate::xds::request::Framed;
    use crate::xds::{Encoded, XdsType};

    fn outgoing() -> Outgoing {
        let cluster = |name: &str| {
            Arc::new(Encoded::new(
                name.to_string(),
                &Cluster {
                    name: name.to_string(),
                    ..Default::default()
                },
            ))
        };
        Outgoing {
            type_: XdsType::Cluster,
            version: "v1".into(),
            nonce: "7".into(),
            resources: Batch::new(vec![cluster("a"), cluster(&"b".repeat(300))]),
            removed: vec!["gone".into()],
        }
    }

    /// Keeps no body: a body lives while a response holds it.
    static NONE: RecentBodies = RecentBodies::new(0);

    fn message(wire: &Wire) -> Vec<u8> {
        let all: Vec<u8> = wire.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(all[0], 0, "not compressed");
        let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
        assert_eq!(len, all.len() - 5, "the frame header gives the message length");
        all[5..].to_vec()
    }

    fn framed_request(r: &DiscoveryRequest) -> Vec<u8> {
        let body = r.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn requests(chunks: Vec<Vec<u8>>) -> Vec<Result<DiscoveryRequest, Status>> {
        use futures::StreamExt;
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let reader = Requests::new(body, Framed::<DiscoveryRequest>::default());
        futures::executor::block_on(reader.collect::<Vec<_>>())
    }

    #[test]
    fn requests_are_read_across_and_within_chunks() {
        let a = DiscoveryRequest {
            type_url: "a".into(),
            resource_names: (0..500).map(|i| format!("outbound|80||svc-{i}")).collect(),
            ..Default::default()
        };
        let b = DiscoveryRequest {
            type_url: "b".into(),
            ..Default::default()
        };
        let mut bytes = framed_request(&a);
        bytes.extend(framed_request(&b));
        // Split at awkward places: inside the header, inside a message.
        let chunks = vec![
            bytes[..3].to_vec(),
            bytes[3..1000].to_vec(),
            bytes[1000..].to_vec(),
        ];
        let got: Vec<DiscoveryRequest> = requests(chunks)
            .into_iter()
            .map(|r| r.expect("decodes"))
            .collect();
        assert_eq!(got, vec![a.clone(), b]);
        // A message cut short, a compressed one, an oversized one.
        let cut = framed_request(&a)[..10].to_vec();
        assert!(requests(vec![cut]).last().is_some_and(Result::is_err));
        let mut compressed = framed_request(&a);
        compressed[0] = 1;
        assert_eq!(
            requests(vec![compressed])[0].as_ref().map_err(Status::code).err(),
            Some(tonic::Code::Unimplemented)
        );
        let huge = vec![0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            requests(vec![huge])[0].as_ref().map_err(Status::code).err(),
            Some(tonic::Code::ResourceExhausted)
        );
    }

    #[test]
    fn the_wire_encodings_decode_as_the_messages_they_stand_for() {
        let out = outgoing();
        let sotw = DiscoveryResponse::decode(message(&Wire::sotw(&out, &NONE)).as_slice()).expect("decodes");
        assert_eq!(sotw.version_info, "v1");
        assert_eq!(sotw.nonce, "7");
        assert_eq!(sotw.type_url, XdsType::Cluster.url());
        assert_eq!(
            sotw.resources,
            out.resources.iter().map(|r| r.body()).collect::<Vec<_>>()
        );
        assert!(sotw
            .control_plane
            .is_some_and(|c| c.identifier.starts_with("meshd ")));
        let delta =
            DeltaDiscoveryResponse::decode(message(&Wire::delta(&out, &NONE)).as_slice()).expect("decodes");
        assert_eq!(delta.system_version_info, "v1");
        assert_eq!(delta.removed_resources, ["gone"]);
        let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b".repeat(300).as_str()]);
        assert_eq!(delta.resources[1].version, out.resources[1].version);
        assert_eq!(
            delta.resources[1].resource.as_ref(),
            Some(&out.resources[1].body())
        );
    }

    #[test]
    fn the_server_reads_a_discovery_request_as_envoy_encodes_it() {
        use crate::xds::request::SotwRequest;
        use crate::xds::server::{DeltaRequestMessage, Limits, XdsRequest};
        let request = DiscoveryRequest {
            version_info: "v3".into(),
            node: Some(Node {
                id: "sidecar~10.0.0.1~a.default~default.svc.cluster.local".into(),
                ..Default::default()
            }),
            resource_names: vec!["outbound|80||a.default.svc.cluster.local".into(), "é".into()],
            type_url: XdsType::Endpoint.url().into(),
            response_nonce: "4".into(),
            error_detail: Some(rpc::Status {
                code: 3,
                message: "rejected".into(),
                details: vec![],
            }),
            resource_locators: vec![],
        };
        let read = SotwRequest::read(request.encode_to_vec().into(), &[]).expect("decodes");
        assert!(read.check(&Limits::default()).is_ok());
        assert_eq!(read.version_info, request.version_info);
        assert_eq!(XdsRequest::node(&read).expect("node decodes"), request.node);
        assert_eq!(read.type_url, request.type_url);
        assert_eq!(read.response_nonce, request.response_nonce);
        assert_eq!(read.error_detail, request.error_detail);
        assert_eq!(read.names().expect("UTF-8"), request.resource_names);
        let delta = DeltaDiscoveryRequest {
            node: request.node.clone(),
            type_url: XdsType::Endpoint.url().into(),
            resource_names_subscribe: vec!["a".into(), "b".into()],
            resource_names_unsubscribe: vec!["c".into()],
            initial_resource_versions: [("a".to_string(), "v1".to_string())].into(),
            response_nonce: "5".into(),
            error_detail: request.error_detail.clone(),
            ..Default::default()
        };
        let read = DeltaRequestMessage::decode(Bytes::from(delta.encode_to_vec())).expect("decodes");
        assert!(read.check(&Limits::default()).is_ok());
        assert_eq!(XdsRequest::node(&read).expect("node decodes"), delta.node);
        assert_eq!(read.type_url, delta.type_url);
        assert_eq!(
            read.resource_names_subscribe,
            [Bytes::from("a"), Bytes::from("b")]
        );
        assert_eq!(read.resource_names_unsubscribe, [Bytes::from("c")]);
        assert_eq!(
            read.initial_resource_versions,
            delta
                .initial_resource_versions
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        );
        assert_eq!(read.response_nonce, delta.response_nonce);
        assert_eq!(read.error_detail, delta.error_detail);
        // A name that is not UTF-8 (prost would reject such a `string`),
        // among good ones, long and short.
        let long = "x".repeat(200);
        for names in [
            vec![&[0xff, 0xfe][..]],
            vec![b"a", &[0xc3], b"b"],
            vec![long.as_bytes(), &[0xe9]],
        ] {
            let mut frame = Vec::new();
            for n in &names {
                prost::encoding::bytes::encode(3, &n.to_vec(), &mut frame);
            }
            let read = SotwRequest::read(frame.into(), &[]).expect("decodes");
            let mut state = crate::xds::stream::StreamState::default();
            assert_eq!(
                read.apply(XdsType::Endpoint, &mut state, &Default::default())
                    .map_err(|s| s.code()),
                Err(tonic::Code::InvalidArgument)
            );
        }
        // A request that repeats the subscribed names byte for byte (an
        // ACK) is taken as them; one that differs is read and checked.
        let snapshot = crate::xds::Snapshot::default();
        let mut state = crate::xds::stream::StreamState::default();
        let sotw = |names: Vec<&[u8]>, nonce: &str| {
            let mut frame = Vec::new();
            for n in names {
                prost::encoding::bytes::encode(3, &n.to_vec(), &mut frame);
            }
            prost::encoding::string::encode(4, &XdsType::Endpoint.url().to_string(), &mut frame);
            prost::encoding::string::encode(5, &nonce.to_string(), &mut frame);
            SotwRequest::read(frame.into(), &[]).expect("decodes")
        };
        let first = sotw(vec![b"a", "é".as_bytes()], "");
        let sent = first
            .apply(XdsType::Endpoint, &mut state, &snapshot)
            .expect("UTF-8")
            .expect("answered");
        let ack = sotw(vec![b"a", "é".as_bytes()], &sent.nonce);
        assert!(ack.names_repeat(state.subscribed_names(XdsType::Endpoint).expect("subscribed")));
        assert_eq!(
            ack.apply(XdsType::Endpoint, &mut state, &snapshot)
                .map_err(|s| s.code()),
            Ok(None)
        );
        assert_eq!(
            state
                .types
                .get(&XdsType::Endpoint)
                .and_then(|s| s.acked_version.clone()),
            Some(sent.version)
        );
        let broken = sotw(vec![b"a", &"é".as_bytes()[..1]], &sent.nonce);
        assert_eq!(
            broken
                .apply(XdsType::Endpoint, &mut state, &snapshot)
                .map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        // Names longer than a one-byte length, and not ASCII, read whole.
        let names = vec![long.clone(), "é".repeat(70), "b".into()];
        let frame = DiscoveryRequest {
            resource_names: names.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        let read = SotwRequest::read(frame.into(), &[]).expect("decodes");
        assert!(read.check(&Limits::default()).is_ok());
        assert_eq!(read.names().expect("UTF-8"), names);
        // Truncated and wrongly typed fields are bad requests.
        let mut frame = request.encode_to_vec();
        frame.truncate(frame.len() - 3);
        assert!(SotwRequest::read(frame.into(), &[]).is_err());
        assert!(SotwRequest::read(Bytes::from_static(&[0x18, 0x01]), &[]).is_err());
    }

    #[test]
    fn a_batch_is_encoded_once_and_its_large_resources_are_shared_uncopied() {
        let cluster = |name: String| {
            Arc::new(Encoded::new(
                name.clone(),
                &Cluster {
                    name,
                    ..Default::default()
                },
            ))
        };
        let mut out = outgoing();
        // Small resources around one past the sharing size.
        let mut items: Vec<Arc<Encoded>> = (0..3000)
            .map(|i| cluster(format!("outbound|80||svc-{i}.ns.svc.cluster.local")))
            .collect();
        let big = cluster("x".repeat(20 * 1024));
        items.insert(1500, big.clone());
        out.resources = Batch::new(items);
        // Another stream's response of the same batch.
        let other = Outgoing {
            version: "v2".into(),
            nonce: "12".into(),
            ..out.clone()
        };
        for encode in [Wire::sotw, Wire::delta] {
            let (wire, again) = (encode(&out, &NONE), encode(&other, &NONE));
            // Header, the small ones before, the large one, the small ones
            // after, the last fields.
            assert_eq!(wire.chunks.len(), 5);
            assert_eq!(
                wire.chunks[2].as_ptr(),
                big.wire.as_ptr(),
                "the large resource is not copied"
            );
            for (a, b) in wire.chunks[1..4].iter().zip(&again.chunks[1..4]) {
                assert_eq!(a.as_ptr(), b.as_ptr(), "both responses carry the same bytes");
            }
            assert_ne!(wire.chunks[0], again.chunks[0], "each has its own version");
        }
        // No response holds a body any more: the batch keeps none.
        for slot in [&out.resources.sotw, &out.resources.delta] {
            assert!(slot.lock().expect("not poisoned").upgrade().is_none());
        }
        // A chunk handed to HTTP/2 and not yet written holds its body: the
        // next stream's response carries the same bytes, not a copy.
        let queued = Wire::sotw(&out, &NONE).chunks.swap_remove(1);
        assert_eq!(Wire::sotw(&other, &NONE).chunks[1].as_ptr(), queued.as_ptr());
        drop(queued);
        assert!(out
            .resources
            .sotw
            .lock()
            .expect("not poisoned")
            .upgrade()
            .is_none());
        for out in [&out, &other] {
            let sotw =
                DiscoveryResponse::decode(message(&Wire::sotw(out, &NONE)).as_slice()).expect("decodes");
            assert_eq!(
                sotw.resources,
                out.resources.iter().map(|r| r.body()).collect::<Vec<_>>()
            );
            assert_eq!(
                (sotw.version_info.as_str(), sotw.nonce.as_str()),
                (out.version.as_str(), out.nonce.as_str())
            );
            let delta = DeltaDiscoveryResponse::decode(message(&Wire::delta(out, &NONE)).as_slice())
                .expect("decodes");
            let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
            let sent: Vec<&str> = out.resources.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, sent);
            assert_eq!(delta.resources[1500].resource.as_ref(), Some(&big.body()));
            assert_eq!(delta.removed_resources, ["gone"]);
        }
        // Nothing to send is a response of the other fields alone.
        out.resources = Arc::default();
        let empty = DiscoveryResponse::decode(message(&Wire::sotw(&out, &NONE)).as_slice()).expect("decodes");
        assert!(empty.resources.is_empty() && empty.nonce == "7");
    }

    #[test]
    fn recent_bodies_serve_the_same_resources_again_within_their_budget() {
        // Enough clusters for a body over the size worth keeping.
        let clusters = |prefix: &str| -> Vec<Arc<Encoded>> {
            (0..400)
                .map(|i| {
                    let name = format!("outbound|80||{prefix}-{i}.ns.svc.cluster.local");
                    Arc::new(Encoded::new(
                        name.clone(),
                        &Cluster {
                            name,
                            ..Default::default()
                        },
                    ))
                })
                .collect()
        };
        let (a, b) = (clusters("a"), clusters("b"));
        let response = |items: &[Arc<Encoded>]| Outgoing {
            resources: Batch::new(items.to_vec()),
            ..outgoing()
        };
        // A chunk of a response's body: it holds the body, so that no
        // other is made where it was.
        let body = |wire: &Wire| wire.chunks[1].clone();
        let one_body = Wire::sotw(&response(&a), &NONE).chunks[1].len();
        assert!(one_body >= RecentBodies::KEPT_MIN);
        // What keeping one such body counts for.
        let one_kept = Kept::size(
            &Body {
                segments: Vec::new(),
                len: one_body,
            },
            a.len(),
        );
        let recent = RecentBodies::new(one_kept * 3);

        // No response holds the first body any more; another batch of the
        // same resources (another config key's walk) is sent its bytes.
        let first = body(&Wire::sotw(&response(&a), &recent));
        assert_eq!(body(&Wire::sotw(&response(&a), &recent)).as_ptr(), first.as_ptr());
        // The delta variant and other resources are bodies of their own.
        let delta = body(&Wire::delta(&response(&a), &recent));
        assert_ne!(delta.as_ptr(), first.as_ptr());
        assert_eq!(
            body(&Wire::delta(&response(&a), &recent)).as_ptr(),
            delta.as_ptr()
        );
        // The same names in new resources (a new generation) are not the
        // same resources.
        let renewed = clusters("a");
        let wire = Wire::sotw(&response(&renewed), &recent);
        assert_ne!(body(&wire).as_ptr(), first.as_ptr());
        assert_eq!(
            DiscoveryResponse::decode(message(&wire).as_slice())
                .expect("decodes")
                .resources,
            renewed.iter().map(|r| r.body()).collect::<Vec<_>>()
        );
        // Over the budget (three sotw bodies, with the delta one larger),
        // the oldest go first, and the first is made again; the newest
        // stays.
        let other = body(&Wire::sotw(&response(&b), &recent));
        assert_ne!(body(&Wire::sotw(&response(&a), &recent)).as_ptr(), first.as_ptr());
        assert_eq!(body(&Wire::sotw(&response(&b), &recent)).as_ptr(), other.as_ptr());
        // A body over the whole budget is not kept at all.
        let small = RecentBodies::new(one_kept / 2);
        let made = body(&Wire::sotw(&response(&a), &small));
        assert_ne!(body(&Wire::sotw(&response(&a), &small)).as_ptr(), made.as_ptr());
        // Nor is a body under the size worth keeping.
        let recent = RecentBodies::default();
        let few = &a[..10];
        let made = body(&Wire::sotw(&response(few), &recent));
        assert_ne!(body(&Wire::sotw(&response(few), &recent)).as_ptr(), made.as_ptr());
        // Well within the budget, no more than `KEPT_MAX` bodies are kept,
        // and the one used longest ago goes first.
        let recent = RecentBodies::new(1 << 30);
        let all: Vec<Arc<Encoded>> = a.iter().chain(&b).cloned().collect();
        let part = |i: usize| &all[i..i + 300];
        let sotw = |i: usize| body(&Wire::sotw(&response(part(i)), &recent));
        let (first, second) = (sotw(0), sotw(1));
        for i in 2..RecentBodies::KEPT_MAX {
            sotw(i);
        }
        assert_eq!(sotw(0).as_ptr(), first.as_ptr());
        let newest = sotw(RecentBodies::KEPT_MAX);
        assert_ne!(sotw(1).as_ptr(), second.as_ptr());
        assert_eq!(sotw(0).as_ptr(), first.as_ptr());
        assert_eq!(sotw(RecentBodies::KEPT_MAX).as_ptr(), newest.as_ptr());
    }
}
