//! Header rewriting between client and upstream: hop-by-hop headers out, forwarding headers in,
//! a request id kept or made. W3C `traceparent`/`tracestate` are end-to-end and pass untouched.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Carries the preview token; removed from every request before it is forwarded.
pub static X_CUTOVER_PREVIEW: HeaderName = HeaderName::from_static("x-cutover-preview");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

const HTTP: HeaderValue = HeaderValue::from_static("http");
const UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// Longest client-supplied request id that is passed on; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

const HOP_CONNECTION: u8 = 1;
const HOP_OTHER: u8 = 2;
const HOP_PREVIEW: u8 = 4;

/// One pass over the header names: which kinds of headers to remove are present. Most requests
/// and responses carry none (or only `Connection`), so this spares a hash lookup per name.
fn scan(h: &HeaderMap) -> u8 {
    let mut found = 0;
    for name in h.keys() {
        if name == header::CONNECTION {
            found |= HOP_CONNECTION;
        } else if name == header::TE
            || name == header::TRAILER
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
        {
            found |= HOP_OTHER;
        } else if name == X_CUTOVER_PREVIEW {
            found |= HOP_PREVIEW;
        }
    }
    found
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 7.6.1),
/// including any the `Connection` header itself names.
fn strip_hop_by_hop(h: &mut HeaderMap, found: u8) {
    if found & HOP_CONNECTION != 0 {
        // Extra names in Connection are rare; only then is anything allocated.
        let mut named: Vec<HeaderName> = Vec::new();
        for conn in h.get_all(header::CONNECTION) {
            let Ok(list) = conn.to_str() else { continue };
            for name in list.split(',') {
                let name = name.trim();
                if name.is_empty() || ["close", "keep-alive", "upgrade"].iter().any(|n| name.eq_ignore_ascii_case(n)) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    named.push(name);
                }
            }
        }
        h.remove(header::CONNECTION);
        for name in named {
            h.remove(name);
        }
    }
    if found & HOP_OTHER != 0 {
        h.remove(&KEEP_ALIVE);
        h.remove(&PROXY_CONNECTION);
        h.remove(header::TE);
        h.remove(header::TRAILER);
        h.remove(header::TRANSFER_ENCODING);
        h.remove(header::UPGRADE);
    }
}

/// What the proxy adds to a request on its way upstream.
pub(crate) struct Forwarding<'a> {
    /// The client address, already formatted (once per connection).
    pub client_ip: &'a HeaderValue,
    /// The protocol the client spoke to the proxy.
    pub proto: &'a HeaderValue,
}

/// Rewrites a client request's headers for the upstream. `upgrade` is the protocol the client
/// asked to switch to, which is kept (with `Connection: upgrade`) so the upstream can accept it.
pub(crate) fn request_to_upstream(h: &mut HeaderMap, fwd: &Forwarding<'_>, upgrade: Option<HeaderValue>) {
    let found = scan(h);
    strip_hop_by_hop(h, found);
    if found & HOP_PREVIEW != 0 {
        h.remove(&X_CUTOVER_PREVIEW);
    }
    if let Some(proto) = upgrade {
        h.insert(header::CONNECTION, UPGRADE);
        h.insert(header::UPGRADE, proto);
    }

    match h.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(v) => {
            v.insert(fwd.client_ip.clone());
        }
        header::Entry::Occupied(mut o) => {
            // Join the existing chain into one value: "a, b, client".
            let mut joined = Vec::with_capacity(64);
            for v in o.iter() {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(fwd.client_ip.as_bytes());
            match HeaderValue::from_bytes(&joined) {
                Ok(v) => {
                    o.insert(v);
                }
                Err(_) => {
                    o.insert(fwd.client_ip.clone());
                }
            }
        }
    }
    h.insert(&X_FORWARDED_PROTO, fwd.proto.clone());
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert(&X_FORWARDED_HOST, host);
    }

    let keep = h
        .get(&X_REQUEST_ID)
        .map(|v| v.len() <= MAX_REQUEST_ID && !v.is_empty() && v.as_bytes().iter().all(|b| b.is_ascii_graphic()))
        .unwrap_or(false);
    if !keep {
        h.insert(&X_REQUEST_ID, new_request_id());
    }
}

/// Rewrites an upstream response's headers for the client. A `101 Switching Protocols` keeps its
/// `Upgrade` and `Connection` headers: they are the handshake.
pub(crate) fn response_to_client(h: &mut HeaderMap, switching: bool) {
    if switching {
        return;
    }
    let found = scan(h);
    strip_hop_by_hop(h, found);
}

thread_local! {
    static ID_STATE: Cell<u64> = Cell::new({
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id() as u64);
        hasher.finish() | 1
    });
}

/// 32 hex digits from a per-thread xorshift generator seeded randomly: unique enough to join log
/// lines, cheap enough for every request.
pub(crate) fn new_request_id() -> HeaderValue {
    let (a, b) = (random_u64(), random_u64());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (i, byte) in a.to_be_bytes().iter().chain(b.to_be_bytes().iter()).enumerate() {
        buf[2 * i] = HEX[(byte >> 4) as usize];
        buf[2 * i + 1] = HEX[(byte & 15) as usize];
    }
    // Only hex digits: always a valid header value.
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

/// A per-thread xorshift64 step: fast, not cryptographic.
pub(crate) fn random_u64() -> u64 {
    ID_STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

pub(crate) fn proto_http() -> HeaderValue {
    HTTP
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd_headers(h: &mut HeaderMap, upgrade: Option<HeaderValue>) {
        let ip = HeaderValue::from_static("10.1.2.3");
        let proto = proto_http();
        request_to_upstream(h, &Forwarding { client_ip: &ip, proto: &proto }, upgrade);
    }

    #[test]
    fn strips_hop_by_hop_and_named_connection_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        h.insert(&X_CUTOVER_PREVIEW, HeaderValue::from_static("tok"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        fwd_headers(&mut h, None);
        for gone in ["connection", "keep-alive", "x-secret", "te", "transfer-encoding", "proxy-connection", "upgrade", "x-cutover-preview"] {
            assert!(h.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(h["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-request-id"].len(), 32);
    }

    #[test]
    fn appends_to_forwarded_for_chain_and_keeps_request_id() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        fwd_headers(&mut h, None);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h["x-request-id"], "abc-123");
    }

    #[test]
    fn replaces_unusable_request_id() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_str(&"a".repeat(500)).unwrap());
        fwd_headers(&mut h, None);
        assert_eq!(h["x-request-id"].len(), 32);
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        fwd_headers(&mut h, None);
        assert_ne!(h["x-request-id"], "has space");
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let proto = h.get(header::UPGRADE).cloned();
        fwd_headers(&mut h, proto);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn request_ids_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn response_keeps_handshake_headers_only_on_101() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        response_to_client(&mut h, true);
        assert!(h.contains_key("upgrade"));
        response_to_client(&mut h, false);
        assert!(!h.contains_key("upgrade") && !h.contains_key("connection"));
    }
}
