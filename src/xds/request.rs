//! Requests read off an ADS stream's body as its DATA frames arrive.
//!
//! A SotW ACK repeats every name the proxy subscribes to: a thousand for a
//! sidecar's EDS, some 45 KB, from every proxy at every push. Buffered
//! whole, each ACK in flight holds a buffer of that size, and after a push
//! thousands are in flight at once. So a SotW request is read field by
//! field as its bytes arrive, and its names are compared with the stream's
//! current subscriptions (`Subscriptions`): names that repeat one are not
//! kept at all. Only names that differ from every subscription (a new one)
//! are stored, in one buffer. Each subscription is compared as the bytes a
//! request encodes it in (`Flat`, made once per interned set): a run of
//! names that repeats it is one comparison of bytes, not one per name.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::{Buf, Bytes, BytesMut};
use tonic::Status;

use super::stream::StreamState;

/// Requests largest accepted, as tonic's default.
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// Reads messages from a request body's DATA frames.
pub trait MessageDecoder: Send + 'static {
    type Item;
    /// Reads from `data` up to the end of a message: returns the message
    /// when it ends there, leaving the rest of `data` for the next call.
    fn decode(&mut self, data: &mut Bytes) -> Result<Option<Self::Item>, Status>;
    /// Whether a message has begun and not ended.
    fn mid_message(&self) -> bool;
}

/// How a request message is read, given the stream's subscriptions.
pub trait DecodeRequest: Sized {
    type Decoder: MessageDecoder<Item = Self>;
    fn decoder(subscriptions: Subscriptions) -> Self::Decoder;
}

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("bad request: {e}"))
}

/// The five bytes in front of each gRPC message.
#[derive(Debug, Default)]
struct Prefix {
    bytes: [u8; 5],
    have: usize,
}

impl Prefix {
    /// Reads the prefix; returns the message's length once it is whole.
    fn read(&mut self, data: &mut Bytes) -> Result<Option<usize>, Status> {
        let n = (5 - self.have).min(data.len());
        self.bytes[self.have..self.have + n].copy_from_slice(&data[..n]);
        data.advance(n);
        self.have += n;
        if self.have < 5 {
            return Ok(None);
        }
        self.have = 0;
        if self.bytes[0] != 0 {
            return Err(Status::unimplemented("compressed requests are not supported"));
        }
        let [_, a, b, c, d] = self.bytes;
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > MAX_REQUEST {
            return Err(Status::resource_exhausted(format!(
                "a request of {len} bytes is over the {MAX_REQUEST} byte limit"
            )));
        }
        Ok(Some(len))
    }
}

/// Whole messages decoded by prost (the delta request: after the first,
/// it carries only what changed).
pub struct Framed<T> {
    prefix: Prefix,
    /// The message being read: its length and what has arrived of it.
    message: Option<(usize, BytesMut)>,
    _message: std::marker::PhantomData<fn() -> T>,
}

impl<T> Default for Framed<T> {
    fn default() -> Self {
        Framed {
            prefix: Prefix::default(),
            message: None,
            _message: std::marker::PhantomData,
        }
    }
}

impl<T: prost::Message + Default + 'static> MessageDecoder for Framed<T> {
    type Item = T;

    fn decode(&mut self, data: &mut Bytes) -> Result<Option<T>, Status> {
        let (len, buf) = match &mut self.message {
            Some(m) => m,
            None => {
                let Some(len) = self.prefix.read(data)? else {
                    return Ok(None);
                };
                // A message within the frame is decoded where it lies.
                if data.len() >= len {
                    return T::decode(data.split_to(len)).map(Some).map_err(bad_request);
                }
                // One that is not gets a buffer of exactly its size.
                self.message.insert((len, BytesMut::with_capacity(len)))
            }
        };
        let n = (*len - buf.len()).min(data.len());
        buf.extend_from_slice(&data[..n]);
        data.advance(n);
        if buf.len() < *len {
            return Ok(None);
        }
        let (_, buf) = self.message.take().unwrap_or_default();
        T::decode(buf.freeze()).map(Some).map_err(bad_request)
    }

    fn mid_message(&self) -> bool {
        self.prefix.have > 0 || self.message.is_some()
    }
}

/// The names a stream subscribes to now, by type: what the requests it
/// reads next most likely repeat. The stream's loop publishes them after
/// each request; its reader takes them at the start of each message. Name
/// sets are interned, so this holds no names of its own.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions(Arc<Mutex<NameSets>>);

/// Name sets with their encodings, shared by the stream's loop and its
/// reader (the sets themselves are shared by many streams: taking this one
/// `Arc` does not touch their counts).
type NameSets = Arc<Vec<Candidate>>;

/// A set of names a request may repeat, and the bytes it repeats it in.
type Candidate = (Arc<BTreeSet<String>>, Arc<Flat>);

/// A set's names as a request encodes them: each a `resource_names` field
/// (3) in order, one after the other, and where each name lies.
#[derive(Debug, Default)]
struct Flat {
    wire: Vec<u8>,
    /// Each name's start and the end of its field, in `wire`.
    names: Vec<(u32, u32)>,
}

impl Flat {
    fn of(set: &BTreeSet<String>) -> Flat {
        let mut flat = Flat::default();
        for name in set {
            prost::encoding::string::encode(3, name, &mut flat.wire);
            let end = flat.wire.len();
            flat.names.push(((end - name.len()) as u32, end as u32));
        }
        flat
    }

    /// The `i`th name.
    fn name(&self, i: usize) -> Option<&[u8]> {
        let &(start, end) = self.names.get(i)?;
        Some(&self.wire[start as usize..end as usize])
    }

    /// Where the `i`th name's field begins.
    fn field_start(&self, i: usize) -> usize {
        match i.checked_sub(1) {
            Some(before) => self.names[before].1 as usize,
            None => 0,
        }
    }
}

/// The encoding of each interned set some stream subscribes to, made once
/// (by the set's address; the `Weak` tells a reused address apart).
fn flat_of(set: &Arc<BTreeSet<String>>) -> Arc<Flat> {
    type Flats = Mutex<HashMap<usize, (Weak<BTreeSet<String>>, Arc<Flat>)>>;
    static FLATS: std::sync::OnceLock<Flats> = std::sync::OnceLock::new();
    let key = Arc::as_ptr(set) as usize;
    let mut flats = FLATS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((held, flat)) = flats.get(&key) {
        if held.upgrade().is_some_and(|held| Arc::ptr_eq(&held, set)) {
            return flat.clone();
        }
    }
    // Forget the sets no stream holds any more, now and then.
    if flats.len() >= 64 && flats.len().is_power_of_two() {
        flats.retain(|_, (held, _)| held.strong_count() > 0);
    }
    let flat = Arc::new(Flat::of(set));
    flats.insert(key, (Arc::downgrade(set), flat.clone()));
    flat
}

fn candidates(sets: &[Arc<BTreeSet<String>>]) -> NameSets {
    Arc::new(sets.iter().map(|s| (s.clone(), flat_of(s))).collect())
}

impl Subscriptions {
    /// Publishes `state`'s named subscriptions, when they changed.
    pub fn publish(&self, state: &StreamState) {
        let named = || {
            state
                .types
                .iter()
                .filter(|(_, s)| s.subscribed && !s.names.is_empty())
                .map(|(_, s)| &s.names)
        };
        let mut current = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut now = named();
        let same = current
            .iter()
            .all(|(c, _)| now.next().is_some_and(|n| Arc::ptr_eq(c, n)))
            && now.next().is_none();
        if !same {
            *current = Arc::new(named().map(|s| (s.clone(), flat_of(s))).collect());
        }
    }

    fn current(&self) -> NameSets {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A `DiscoveryRequest` as the server reads it, by hand (see the module
/// documentation for its names).
#[derive(Debug, Clone, Default)]
pub struct SotwRequest {
    pub version_info: String,
    /// The `Node` message, left encoded: Envoy sends it on every request
    /// and only the first is read.
    pub node: Option<Bytes>,
    pub type_url: String,
    pub response_nonce: String,
    pub error_detail: Option<envoy_types::pb::google::rpc::Status>,
    names: Names,
}

/// A request's `resource_names`: the first `n` names of a subscription's
/// set, then the names stored as they came.
#[derive(Debug, Clone, Default)]
struct Names {
    repeated: Option<(Arc<BTreeSet<String>>, usize)>,
    /// The stored names, one after the other.
    stored: Bytes,
    /// Where each stored name ends in `stored`.
    ends: Vec<u32>,
}

impl Names {
    fn len(&self) -> usize {
        self.repeated.as_ref().map_or(0, |(_, n)| *n) + self.ends.len()
    }

    /// The repeated names, then the stored ones as bytes.
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let repeated = self.repeated.iter().flat_map(|(set, n)| set.iter().take(*n));
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        let stored = starts
            .zip(&self.ends)
            .map(|(s, &e)| &self.stored[s as usize..e as usize]);
        repeated.map(String::as_bytes).chain(stored)
    }
}

impl SotwRequest {
    /// Reads one message (without its gRPC prefix), its names compared
    /// with `subscriptions`.
    pub fn read(message: Bytes, subscriptions: &[Arc<BTreeSet<String>>]) -> Result<SotwRequest, Status> {
        let mut reader = SotwReader::new(message.len(), candidates(subscriptions));
        let mut data = message;
        reader.read(&mut data)?;
        reader.finish()
    }

    /// The number of names.
    pub fn name_count(&self) -> usize {
        self.names.len()
    }

    /// The names, in the order sent.
    pub fn names(&self) -> Result<Vec<&str>, Status> {
        self.names
            .iter()
            .map(|n| std::str::from_utf8(n).map_err(|_| not_utf8()))
            .collect()
    }

    /// Whether the names are `subscribed`, byte for byte and in order (then
    /// they are UTF-8 too), as an ACK repeats them.
    pub fn names_repeat(&self, subscribed: &BTreeSet<String>) -> bool {
        if let (Some((set, n)), true) = (&self.names.repeated, self.names.ends.is_empty()) {
            if *n == set.len() && std::ptr::eq(&**set, subscribed) {
                return true;
            }
        }
        self.names.len() == subscribed.len() && self.names.iter().eq(subscribed.iter().map(String::as_bytes))
    }
}

pub fn not_utf8() -> Status {
    Status::invalid_argument("a resource name is not valid UTF-8")
}

/// Reads SotW requests as their bytes arrive.
pub struct SotwDecoder {
    subscriptions: Subscriptions,
    prefix: Prefix,
    message: Option<SotwReader>,
}

impl DecodeRequest for SotwRequest {
    type Decoder = SotwDecoder;
    fn decoder(subscriptions: Subscriptions) -> SotwDecoder {
        SotwDecoder {
            subscriptions,
            prefix: Prefix::default(),
            message: None,
        }
    }
}

impl MessageDecoder for SotwDecoder {
    type Item = SotwRequest;

    fn decode(&mut self, data: &mut Bytes) -> Result<Option<SotwRequest>, Status> {
        let reader = match &mut self.message {
            Some(reader) => reader,
            None => {
                let Some(len) = self.prefix.read(data)? else {
                    return Ok(None);
                };
                self.message
                    .insert(SotwReader::new(len, self.subscriptions.current()))
            }
        };
        if !reader.read(data)? {
            return Ok(None);
        }
        match self.message.take() {
            Some(reader) => reader.finish().map(Some),
            None => Ok(None),
        }
    }

    fn mid_message(&self) -> bool {
        self.prefix.have > 0 || self.message.is_some()
    }
}

/// The key of `resource_names` (field 3, length-delimited).
const NAME_KEY: u8 = 3 << 3 | 2;

/// A key and length take at most two varints of ten bytes.
const MAX_HEAD: usize = 20;

/// What is being read of a message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    /// A field's key (and length).
    Head,
    /// The bytes left of a name.
    Name(usize),
    /// The bytes left of another field, kept as they are.
    Other(usize),
}

/// One SotW request being read.
struct SotwReader {
    /// Bytes of the message not read yet.
    remaining: usize,
    field: Field,
    /// A field's head cut by the end of a DATA frame.
    head: Vec<u8>,
    /// The fields other than names, as encoded.
    rest: BytesMut,
    /// A name cut by the end of a DATA frame.
    name: Vec<u8>,
    names: NameReader,
}

impl SotwReader {
    fn new(len: usize, sets: NameSets) -> SotwReader {
        SotwReader {
            remaining: len,
            field: Field::Head,
            head: Vec::new(),
            rest: BytesMut::new(),
            name: Vec::new(),
            names: NameReader {
                alive: vec![true; sets.len()],
                sets,
                ..Default::default()
            },
        }
    }

    /// Reads from `data`; true once the message has ended.
    fn read(&mut self, data: &mut Bytes) -> Result<bool, Status> {
        let read = self.read_fields(&data[..data.len().min(self.remaining)])?;
        data.advance(read);
        self.remaining -= read;
        if self.remaining == 0 && (self.field != Field::Head || !self.head.is_empty()) {
            return Err(bad_request("a field runs past the end of the message"));
        }
        Ok(self.remaining == 0)
    }

    /// Reads the fields in `data` (no further than the message's end):
    /// how many bytes it read.
    fn read_fields(&mut self, data: &[u8]) -> Result<usize, Status> {
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            // Names that repeat the one subscription left, as many as are
            // whole in the frame: most of an ACK, in one compare.
            if self.field == Field::Head && self.head.is_empty() && rest[0] == NAME_KEY {
                let repeated = self.names.repeats(rest);
                if repeated > 0 {
                    at += repeated;
                    continue;
                }
            }
            match self.field {
                // A name shorter than 128 bytes, whole in the frame.
                Field::Head if self.head.is_empty() && rest.len() > 2 && rest[0] == NAME_KEY => {
                    let len = usize::from(rest[1]);
                    match rest.get(2..2 + len) {
                        Some(name) if len < 0x80 => {
                            self.names.name(name);
                            at += 2 + len;
                        }
                        _ => at += self.head(rest, self.remaining - at)?,
                    }
                }
                Field::Head => at += self.head(rest, self.remaining - at)?,
                Field::Name(left) => {
                    let n = left.min(rest.len());
                    at += n;
                    if n < left {
                        self.field = Field::Name(left - n);
                        self.name.extend_from_slice(&rest[..n]);
                    } else if self.name.is_empty() {
                        self.field = Field::Head;
                        self.names.name(&rest[..n]);
                    } else {
                        self.field = Field::Head;
                        self.name.extend_from_slice(&rest[..n]);
                        self.names.name(&self.name);
                        self.name.clear();
                    }
                }
                Field::Other(left) => {
                    let n = left.min(rest.len());
                    at += n;
                    self.rest.extend_from_slice(&rest[..n]);
                    self.field = if n < left {
                        Field::Other(left - n)
                    } else {
                        Field::Head
                    };
                }
            }
        }
        Ok(at)
    }

    /// Reads a field's key and length from `data`, continuing one cut off
    /// before; `remaining` bytes are left of the message. Returns how many
    /// bytes of `data` it read.
    fn head(&mut self, data: &[u8], remaining: usize) -> Result<usize, Status> {
        let before = self.head.len();
        let take = (MAX_HEAD - before).min(data.len());
        let parsed = if before == 0 {
            parse_head(data)?
        } else {
            self.head.extend_from_slice(&data[..take]);
            parse_head(&self.head)?
        };
        let Some((len, field)) = parsed else {
            // Cut off by the end of the frame: kept for the next one. (Two
            // varints end within twenty bytes, or fail.)
            if before == 0 {
                self.head.extend_from_slice(&data[..take]);
            }
            return Ok(take);
        };
        let read = len - before;
        let body = match field {
            Field::Name(n) | Field::Other(n) => n,
            Field::Head => 0,
        };
        if body > remaining - read {
            return Err(bad_request("a field runs past the end of the message"));
        }
        if let Field::Other(_) = field {
            // Kept encoded, head and all, for `finish` to decode.
            let head = if before == 0 {
                &data[..len]
            } else {
                &self.head[..len]
            };
            self.rest.extend_from_slice(head);
        }
        self.head.clear();
        self.field = match field {
            Field::Name(0) => {
                self.names.name(b"");
                Field::Head
            }
            Field::Other(0) => Field::Head,
            field => field,
        };
        Ok(read)
    }

    /// The request, once its bytes are read.
    fn finish(self) -> Result<SotwRequest, Status> {
        let mut out = parse_rest(self.rest.freeze())?;
        out.names = self.names.finish();
        Ok(out)
    }
}

/// A varint at `*at` in `buf`, moving past it; `None` when `buf` ends
/// inside it.
fn varint_at(buf: &[u8], at: &mut usize) -> Result<Option<u64>, Status> {
    let mut value = 0u64;
    for shift in 0..10 {
        let Some(&b) = buf.get(*at) else {
            return Ok(None);
        };
        *at += 1;
        value |= u64::from(b & 0x7f) << (7 * shift);
        if b < 0x80 {
            return Ok(Some(value));
        }
    }
    Err(bad_request("a varint runs over ten bytes"))
}

/// A field's key (and length, for a length-delimited one) at the start of
/// `buf`: its size and what follows it. `None` when `buf` ends inside it.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Field)>, Status> {
    let mut at = 0;
    let Some(key) = varint_at(buf, &mut at)? else {
        return Ok(None);
    };
    let (tag, wire) = (key >> 3, key & 7);
    if tag == 0 || tag > u64::from(u32::MAX >> 3) {
        return Err(bad_request(format!("a field has the invalid number {tag}")));
    }
    let field = match wire {
        2 => {
            let Some(len) = varint_at(buf, &mut at)? else {
                return Ok(None);
            };
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if tag == 3 {
                Field::Name(len)
            } else {
                Field::Other(len)
            }
        }
        // The fields read (1 to 6) are all length-delimited.
        _ if tag <= 6 => return Err(bad_request(format!("field {tag} has wire type {wire}"))),
        0 => {
            if varint_at(buf, &mut at)?.is_none() {
                return Ok(None);
            }
            Field::Other(0)
        }
        1 => Field::Other(8),
        5 => Field::Other(4),
        _ => {
            return Err(bad_request(format!(
                "field {tag} has wire type {wire}, which is not read"
            )))
        }
    };
    Ok(Some((at, field)))
}

/// The fields of a request other than its names.
fn parse_rest(frame: Bytes) -> Result<SotwRequest, Status> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    use prost::Message;
    let mut out = SotwRequest::default();
    let string = |b: &[u8]| std::str::from_utf8(b).map(str::to_string).map_err(bad_request);
    let mut buf: &[u8] = &frame;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(bad_request)?;
        if !(1..=6).contains(&tag) || wire != WireType::LengthDelimited {
            skip_field(wire, tag, &mut buf, DecodeContext::default()).map_err(bad_request)?;
            continue;
        }
        let len = usize::try_from(decode_varint(&mut buf).map_err(bad_request)?).unwrap_or(usize::MAX);
        if len > buf.len() {
            return Err(bad_request("a field runs past the end of the message"));
        }
        let start = frame.len() - buf.len();
        let (field, rest) = buf.split_at(len);
        match tag {
            1 => out.version_info = string(field)?,
            2 => out.node = Some(frame.slice(start..start + len)),
            4 => out.type_url = string(field)?,
            5 => out.response_nonce = string(field)?,
            6 => {
                let status = envoy_types::pb::google::rpc::Status::decode(field).map_err(bad_request)?;
                out.error_detail = Some(status);
            }
            // Names (3) never reach here.
            _ => {}
        }
        buf = rest;
    }
    Ok(out)
}

/// How many bytes `a` and `b` begin with alike: one compare when they
/// agree as far as the shorter goes, as an ACK does.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    if a[..n] == b[..n] {
        return n;
    }
    // Narrowed down in blocks, then byte by byte.
    let mut i = 0;
    while i + 256 <= n && a[i..i + 256] == b[i..i + 256] {
        i += 256;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// A request's names as they are read.
#[derive(Default)]
struct NameReader {
    /// The stream's subscriptions when the request began.
    sets: NameSets,
    /// Those that every name so far repeats, in order.
    alive: Vec<bool>,
    /// How many names they repeat.
    matched: usize,
    /// No candidate is left: names are stored.
    storing: bool,
    /// Then, the candidate that held out longest: the first `matched`
    /// names are its first.
    repeated: Option<Arc<BTreeSet<String>>>,
    stored: BytesMut,
    ends: Vec<u32>,
}

impl NameReader {
    fn name(&mut self, name: &[u8]) {
        if !self.storing {
            let (mut held, mut next) = (None, false);
            for (i, (alive, (_, flat))) in self.alive.iter_mut().zip(self.sets.iter()).enumerate() {
                if !*alive {
                    continue;
                }
                held.get_or_insert(i);
                if flat.name(self.matched) == Some(name) {
                    next = true;
                } else {
                    *alive = false;
                }
            }
            if next {
                self.matched += 1;
                return;
            }
            self.storing = true;
            self.repeated = held.map(|i| self.sets[i].0.clone());
        }
        self.stored.extend_from_slice(name);
        // Requests are at most `MAX_REQUEST` bytes: ends fit in u32.
        self.ends.push(self.stored.len() as u32);
    }

    /// With one candidate left, how many bytes at the start of `data` are
    /// whole name fields that go on repeating it (0 for none, or when
    /// several candidates are left: `name` tells them apart). Those names
    /// are counted as matched.
    fn repeats(&mut self, data: &[u8]) -> usize {
        if self.storing {
            return 0;
        }
        let mut alive = self.alive.iter().enumerate().filter(|(_, a)| **a);
        let (Some((only, _)), None) = (alive.next(), alive.next()) else {
            return 0;
        };
        let flat = &self.sets[only].1;
        if self.matched >= flat.names.len() {
            return 0;
        }
        let from = flat.field_start(self.matched);
        let same = common_prefix(data, &flat.wire[from..]);
        // The names whose fields end within the bytes that agree.
        let whole = flat.names[self.matched..].partition_point(|&(_, end)| end as usize - from <= same);
        if whole == 0 {
            return 0;
        }
        self.matched += whole;
        flat.field_start(self.matched) - from
    }

    fn finish(self) -> Names {
        let matched = self.matched;
        let repeated = match self.storing {
            true => self.repeated,
            // Every name repeats the candidates left: one they make whole,
            // if any.
            false => {
                let mut alive = self
                    .sets
                    .iter()
                    .zip(&self.alive)
                    .filter_map(|((s, _), &a)| a.then_some(s));
                alive
                    .clone()
                    .find(|s| s.len() == matched)
                    .or(alive.next())
                    .cloned()
            }
        };
        Names {
            repeated: repeated.filter(|_| matched > 0).map(|s| (s, matched)),
            stored: self.stored.freeze(),
            ends: self.ends,
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, ResourceLocator};
    use prost::Message;

    use super::*;

    fn set(names: &[&str]) -> Arc<BTreeSet<String>> {
        Arc::new(names.iter().map(|n| n.to_string()).collect())
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    /// The requests in `bytes`, fed to one decoder in pieces cut at `cuts`.
    fn read(
        bytes: &[u8],
        cuts: &[usize],
        sets: &[Arc<BTreeSet<String>>],
    ) -> Vec<Result<SotwRequest, Status>> {
        let subscriptions = Subscriptions(Arc::new(Mutex::new(candidates(sets))));
        let mut decoder = SotwRequest::decoder(subscriptions);
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&bytes.len()]) {
            let mut data = Bytes::copy_from_slice(&bytes[from..to]);
            from = to;
            while !data.is_empty() {
                match decoder.decode(&mut data) {
                    Ok(Some(request)) => out.push(Ok(request)),
                    Ok(None) => {}
                    Err(status) => {
                        out.push(Err(status));
                        return out;
                    }
                }
            }
        }
        assert!(!decoder.mid_message(), "the bytes end inside a message");
        out
    }

    fn request(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: "7".into(),
            node: Some(Node {
                id: "sidecar~10.0.0.1~a.default~default.svc.cluster.local".into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment".into(),
            response_nonce: "12".into(),
            ..Default::default()
        }
    }

    fn names(r: &SotwRequest) -> Vec<String> {
        r.names()
            .expect("UTF-8")
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// `n` cluster names, in order.
    fn cluster_names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("outbound|80||svc-{i:03}.ns.svc.cluster.local"))
            .collect()
    }

    #[test]
    fn an_ack_that_repeats_a_subscription_is_read_without_keeping_its_names() {
        let eds = cluster_names(40);
        let eds: Vec<&str> = eds.iter().map(String::as_str).collect();
        let (rds, sds, eds_set) = (set(&["80"]), set(&["default"]), set(&eds));
        let sent = request(&eds);
        let bytes = framed(&sent.encode_to_vec());
        // Cut once anywhere (inside the prefix, a head, a name, another
        // field), and into many small pieces.
        let small: Vec<usize> = (1..bytes.len()).step_by(7).collect();
        let cuts = (0..=bytes.len()).map(|c| vec![c]).chain([small]);
        for cuts in cuts {
            let got = read(&bytes, &cuts, &[rds.clone(), eds_set.clone(), sds.clone()]);
            let [Ok(got)] = &got[..] else {
                panic!("one request at {cuts:?}: {got:?}")
            };
            assert!(
                got.names.ends.is_empty() && got.names.stored.is_empty(),
                "at {cuts:?}"
            );
            assert!(got.names_repeat(&eds_set) && !got.names_repeat(&rds));
            assert_eq!(names(got), eds);
            assert_eq!(got.version_info, sent.version_info);
            assert_eq!(got.type_url, sent.type_url);
            assert_eq!(got.response_nonce, sent.response_nonce);
            assert_eq!(
                got.node.as_ref().map(|n| Node::decode(n.clone()).expect("node")),
                sent.node
            );
        }
    }

    #[test]
    fn a_long_list_that_differs_from_its_subscription_deep_inside_is_read_exactly() {
        let subscribed = cluster_names(300);
        let sub: Vec<&str> = subscribed.iter().map(String::as_str).collect();
        let candidates = [set(&sub[..10]), set(&sub)];
        // The bytes a run of names is compared with are the request's own.
        let names_only = DiscoveryRequest {
            resource_names: subscribed.clone(),
            ..Default::default()
        };
        assert_eq!(Flat::of(&candidates[1]).wire, names_only.encode_to_vec());
        let long = "l".repeat(200);
        let mut changed = sub.clone();
        changed[150] = "outbound|80||svc-150.ns.svc.cluster.localx";
        let mut inserted = sub.clone();
        inserted.insert(200, "outbound|80||svc-1999.ns.svc.cluster.local");
        let mut dropped = sub.clone();
        dropped.remove(299);
        let mut longer = sub.clone();
        longer.insert(100, &long);
        for sent in [sub.clone(), changed, inserted, dropped, longer] {
            let bytes = framed(&request(&sent).encode_to_vec());
            let small: Vec<usize> = (1..bytes.len()).step_by(7).collect();
            let cuts = (0..=bytes.len()).step_by(3).map(|c| vec![c]).chain([small]);
            for cuts in cuts {
                let got = read(&bytes, &cuts, &candidates);
                let [Ok(got)] = &got[..] else {
                    panic!("one request at {cuts:?}: {got:?}")
                };
                assert_eq!(names(got), sent, "at {cuts:?}");
                assert_eq!(got.names_repeat(&candidates[1]), sent == sub);
                // Only names past where they part from it are stored.
                assert_eq!(got.names.stored.is_empty(), sub.starts_with(&sent), "at {cuts:?}");
            }
        }
    }

    #[test]
    fn names_that_differ_from_every_subscription_are_read_exactly() {
        let sub = set(&["a", "b", "c", "d"]);
        let other = set(&["a", "b", "x"]);
        let cases: Vec<Vec<&str>> = vec![
            vec![],
            vec!["a", "b", "c", "d"],
            vec!["a", "b"],
            vec!["a", "b", "x"],
            vec!["a", "b", "x", "y"],
            vec!["z", "a"],
            vec!["a", "b", "c", "e"],
            vec!["a", "b", "c", "d", "e"],
            vec!["b", "a", "c", "d"],
            vec!["a", "a"],
            vec!["", "a"],
            vec!["*"],
        ];
        for sent in cases {
            let bytes = framed(&request(&sent).encode_to_vec());
            for candidates in [vec![], vec![sub.clone()], vec![sub.clone(), other.clone()]] {
                for cut in 0..=bytes.len() {
                    let got = read(&bytes, &[cut], &candidates);
                    let [Ok(got)] = &got[..] else {
                        panic!("{sent:?} at {cut}: {got:?}")
                    };
                    assert_eq!(names(got), sent, "cut at {cut} with {candidates:?}");
                    assert_eq!(got.name_count(), sent.len());
                    for s in [&sub, &other] {
                        assert_eq!(got.names_repeat(s), s.iter().eq(sent.iter()));
                    }
                }
            }
        }
    }

    #[test]
    fn requests_follow_one_another_and_unknown_fields_are_skipped() {
        let mut first = request(&["a", "b"]);
        first.resource_locators = vec![ResourceLocator {
            name: "xdstp://x".into(),
            ..Default::default()
        }];
        let mut bytes = first.encode_to_vec();
        // Unknown fields of every wire type read: varint, 64- and 32-bit.
        prost::encoding::uint64::encode(20, &300, &mut bytes);
        prost::encoding::fixed64::encode(21, &1, &mut bytes);
        prost::encoding::fixed32::encode(22, &1, &mut bytes);
        prost::encoding::string::encode(3, &"c".to_string(), &mut bytes);
        let mut stream = framed(&bytes);
        stream.extend(framed(&[]));
        stream.extend(framed(&request(&["d"]).encode_to_vec()));
        for cut in 0..=stream.len() {
            let got: Vec<SotwRequest> = read(&stream, &[cut], &[set(&["a", "b"])])
                .into_iter()
                .map(|r| r.expect("reads"))
                .collect();
            let got: Vec<Vec<String>> = got.iter().map(names).collect();
            assert_eq!(got, [vec!["a", "b", "c"], vec![], vec!["d"]], "cut at {cut}");
        }
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let good = request(&["a", "b"]).encode_to_vec();
        let bad: Vec<Vec<u8>> = vec![
            // A field running past the end of the message.
            good[..good.len() - 3].to_vec(),
            // Names sent as a varint.
            vec![0x18, 0x01],
            // A key that never ends.
            vec![0xff; 12],
            // A length that runs past the message.
            vec![0x1a, 0x05, b'a'],
            // Field number zero.
            vec![0x02, 0x00],
            // A group.
            vec![0xa3, 0x01],
        ];
        for message in bad {
            let got = read(&framed(&message), &[], &[]);
            assert!(
                matches!(&got[..], [Err(s)] if s.code() == tonic::Code::InvalidArgument),
                "{message:?}: {got:?}"
            );
        }
        let mut compressed = framed(&good);
        compressed[0] = 1;
        let got = read(&compressed, &[], &[]);
        assert!(matches!(&got[..], [Err(s)] if s.code() == tonic::Code::Unimplemented));
        let got = read(&[0, 0xff, 0xff, 0xff, 0xff], &[], &[]);
        assert!(matches!(&got[..], [Err(s)] if s.code() == tonic::Code::ResourceExhausted));
        let not_utf8 = SotwRequest::read(Bytes::from_static(&[0x1a, 0x01, 0xff]), &[]).expect("reads");
        assert_eq!(
            not_utf8.names().map_err(|s| s.code()).err(),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[test]
    fn a_stream_publishes_what_it_subscribes_to_for_its_next_requests() {
        use crate::xds::XdsType;
        let subscriptions = Subscriptions::default();
        let mut state = StreamState::default();
        let snapshot = crate::xds::Snapshot::default();
        let _ = state.sotw_request(XdsType::Cluster, &[], "", None, &snapshot);
        let _ = state.sotw_request(XdsType::Endpoint, &["a", "b"], "", None, &snapshot);
        subscriptions.publish(&state);
        let published = subscriptions.current();
        // Wildcard CDS names nothing; EDS its two, the interned set itself.
        assert_eq!(published.len(), 1);
        assert!(Arc::ptr_eq(
            &published[0].0,
            &state.types.get(&XdsType::Endpoint).expect("EDS").names
        ));
        let bytes = framed(&request(&["a", "b"]).encode_to_vec());
        let mut decoder = SotwRequest::decoder(subscriptions);
        let mut data = Bytes::from(bytes);
        let got = decoder.decode(&mut data).expect("reads").expect("a request");
        assert!(got.names.ends.is_empty());
        assert!(got.names_repeat(state.subscribed_names(XdsType::Endpoint).expect("subscribed")));
    }
}
