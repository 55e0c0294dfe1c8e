//! The request head as the upstream receives it, written straight from the client's request:
//! hop-by-hop headers and the preview token left out, forwarding headers added, a request id
//! kept or made. W3C `traceparent`/`tracestate` are end-to-end and pass untouched.
//!
//! Encoding once into bytes (rather than editing the header map and letting a client library
//! serialize it) is what makes a replay cheap: the same bytes can be sent again.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Carries the preview token; removed from every request before it is forwarded.
pub static X_CUTOVER_PREVIEW: HeaderName = HeaderName::from_static("x-cutover-preview");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Longest client-supplied request id that is passed on; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// How the request body is framed on the way upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body.
    None,
    /// A length the client declared and hyper holds the body to (HTTP/1 `Content-Length`,
    /// HTTP/2 `content-length`): sent upstream as `Content-Length`, the bytes copied as they come.
    Length(u64),
    /// Length unknown (HTTP/1 chunked or HTTP/2 without a length): chunked upstream.
    Chunked,
}

impl BodyFraming {
    /// Whether body bytes follow the head (a declared length of 0 has none).
    pub(crate) fn has_body(self) -> bool {
        !matches!(self, BodyFraming::None | BodyFraming::Length(0))
    }
}

/// What the proxy adds to a request on its way upstream.
pub(crate) struct Forwarding<'a> {
    /// The client address, already formatted (once per connection).
    pub client_ip: &'a HeaderValue,
    /// The protocol the client spoke to the proxy.
    pub proto: &'static str,
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::EXPECT // the proxy streams the body without waiting; see encode_request
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == X_CUTOVER_PREVIEW
}

/// Header names listed in `Connection` (other than the standard tokens) are hop-by-hop too.
/// Rare; only then is anything allocated.
fn named_in_connection(parts: &Parts) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for v in parts.headers.get_all(header::CONNECTION) {
        let Ok(list) = v.to_str() else { continue };
        for t in list.split(',').map(str::trim) {
            if t.is_empty()
                || ["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|s| t.eq_ignore_ascii_case(s))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                named.push(n);
            }
        }
    }
    named
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes the HTTP/1.1 request head for the upstream into `out`. `upgrade` is the protocol the
/// client asked to switch to, kept (with `Connection: upgrade`) so the upstream can accept it.
/// `Expect: 100-continue` is answered by the proxy itself and not forwarded. Returns the request
/// id it made up, if the client's could not be kept.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    parts: &Parts,
    fwd: &Forwarding<'_>,
    upgrade: Option<&HeaderValue>,
    body: BodyFraming,
) -> Option<[u8; 32]> {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let named = if parts.headers.contains_key(header::CONNECTION) {
        named_in_connection(parts)
    } else {
        Vec::new()
    };
    let mut host: Option<&HeaderValue> = None;
    let mut xff_seen = false;
    let mut request_id_kept = false;
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name) || (!named.is_empty() && named.contains(name)) {
            continue;
        }
        if name == header::HOST {
            if host.is_some() {
                continue; // one Host only
            }
            host = Some(value);
        } else if name == X_FORWARDED_FOR {
            // Folded into one chain below.
            xff_seen = true;
            continue;
        } else if name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST {
            continue; // the proxy's own view replaces the client's claim
        } else if name == X_REQUEST_ID {
            let sane = value.len() <= MAX_REQUEST_ID
                && !value.is_empty()
                && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
            if !sane || request_id_kept {
                continue;
            }
            request_id_kept = true;
        } else if name == header::CONTENT_LENGTH {
            continue; // written below from the length hyper holds the body to, once
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // HTTP/2 requests carry the host in the URI authority.
    let authority;
    if host.is_none() {
        if let Some(a) = parts.uri.authority() {
            authority = a.as_str().as_bytes();
            put_header(out, b"host", authority);
        }
    }

    out.extend_from_slice(b"x-forwarded-for: ");
    if xff_seen {
        for v in parts.headers.get_all(&X_FORWARDED_FOR) {
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(fwd.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    put_header(out, b"x-forwarded-proto", fwd.proto.as_bytes());
    match (host, parts.uri.authority()) {
        (Some(h), _) => put_header(out, b"x-forwarded-host", h.as_bytes()),
        (None, Some(a)) => put_header(out, b"x-forwarded-host", a.as_str().as_bytes()),
        (None, None) => {}
    }
    let generated = (!request_id_kept).then(new_request_id);
    if let Some(id) = &generated {
        put_header(out, b"x-request-id", id);
    }
    if let Some(proto) = upgrade {
        put_header(out, b"connection", b"upgrade");
        put_header(out, b"upgrade", proto.as_bytes());
    }
    match body {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => put_header(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
    generated
}

thread_local! {
    static ID_STATE: Cell<u64> = Cell::new({
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id() as u64);
        hasher.finish() | 1
    });
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

/// 32 hex digits from the per-thread generator: unique enough to join log lines, cheap enough
/// for every request.
pub(crate) fn new_request_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let (a, b) = (random_u64(), random_u64());
    let mut buf = [0u8; 32];
    for (i, byte) in a.to_be_bytes().iter().chain(b.to_be_bytes().iter()).enumerate() {
        buf[2 * i] = HEX[(byte >> 4) as usize];
        buf[2 * i + 1] = HEX[(byte & 15) as usize];
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a request built by `f` and parses the result back into (name, value) pairs.
    fn encode(b: http::request::Builder, body: BodyFraming, upgrade: Option<&str>) -> (String, Vec<(String, String)>) {
        let (parts, _) = b.body(()).unwrap().into_parts();
        let ip = HeaderValue::from_static("10.1.2.3");
        let mut out = Vec::new();
        let up = upgrade.map(|u| HeaderValue::from_str(u).unwrap());
        encode_request(
            &mut out,
            &parts,
            &Forwarding {
                client_ip: &ip,
                proto: "http",
            },
            up.as_ref(),
            body,
        );
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert!(
            req.parse(&out).unwrap().is_complete(),
            "{}",
            String::from_utf8_lossy(&out)
        );
        let line = format!("{} {}", req.method.unwrap(), req.path.unwrap());
        let hs = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        (line, hs)
    }

    fn get<'a>(hs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        hs.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    #[test]
    fn strips_hop_by_hop_and_named_connection_headers() {
        let b = http::Request::get("/p?q=1")
            .header("host", "shop.example")
            .header("connection", "keep-alive, x-secret")
            .header("keep-alive", "timeout=5")
            .header("x-secret", "1")
            .header("te", "trailers")
            .header("transfer-encoding", "chunked")
            .header("proxy-connection", "keep-alive")
            .header("upgrade", "websocket")
            .header("expect", "100-continue")
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .header("x-cutover-preview", "tok");
        let (line, hs) = encode(b, BodyFraming::None, None);
        assert_eq!(line, "GET /p?q=1");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "proxy-connection",
            "upgrade",
            "x-cutover-preview",
            "expect",
        ] {
            assert!(get(&hs, gone).is_empty(), "{gone} should be removed");
        }
        assert_eq!(
            get(&hs, "traceparent"),
            ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
        );
        assert_eq!(get(&hs, "x-forwarded-for"), ["10.1.2.3"]);
        assert_eq!(get(&hs, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&hs, "x-forwarded-host"), ["shop.example"]);
        assert_eq!(get(&hs, "host"), ["shop.example"]);
        assert_eq!(get(&hs, "x-request-id")[0].len(), 32);
    }

    #[test]
    fn folds_forwarded_for_chain_and_keeps_request_id() {
        let b = http::Request::get("/")
            .header("x-forwarded-for", "1.1.1.1")
            .header("x-forwarded-for", "2.2.2.2")
            .header("x-forwarded-proto", "https")
            .header("x-request-id", "abc-123");
        let (_, hs) = encode(b, BodyFraming::None, None);
        assert_eq!(get(&hs, "x-forwarded-for"), ["1.1.1.1, 2.2.2.2, 10.1.2.3"]);
        assert_eq!(get(&hs, "x-forwarded-proto"), ["http"], "client claims are replaced");
        assert_eq!(get(&hs, "x-request-id"), ["abc-123"]);
    }

    #[test]
    fn replaces_unusable_request_id() {
        let long = "a".repeat(500);
        let (_, hs) = encode(
            http::Request::get("/").header("x-request-id", long.as_str()),
            BodyFraming::None,
            None,
        );
        assert_eq!(get(&hs, "x-request-id").len(), 1);
        assert_eq!(get(&hs, "x-request-id")[0].len(), 32);
    }

    #[test]
    fn http2_authority_becomes_host() {
        let b = http::Request::get("http://shop.example:8443/x").version(http::Version::HTTP_2);
        let (line, hs) = encode(b, BodyFraming::None, None);
        assert_eq!(line, "GET /x");
        assert_eq!(get(&hs, "host"), ["shop.example:8443"]);
        assert_eq!(get(&hs, "x-forwarded-host"), ["shop.example:8443"]);
    }

    #[test]
    fn body_framing_and_upgrade() {
        let b = http::Request::post("/up").header("content-length", "5");
        let (_, hs) = encode(b, BodyFraming::Length(5), None);
        assert_eq!(get(&hs, "content-length"), ["5"]);
        assert!(get(&hs, "transfer-encoding").is_empty());
        // One length, the one the body is held to, whatever the client's headers repeat.
        for n in [0, 7, 10, 1_000_000, u64::MAX] {
            let b = http::Request::post("/up")
                .version(http::Version::HTTP_2)
                .header("content-length", n.to_string())
                .header("content-length", n.to_string());
            let (_, hs) = encode(b, BodyFraming::Length(n), None);
            assert_eq!(get(&hs, "content-length"), [n.to_string()]);
        }
        // A chunked body never carries a client's length along.
        let b = http::Request::post("/up").header("content-length", "5");
        let (_, hs) = encode(b, BodyFraming::Chunked, None);
        assert!(get(&hs, "content-length").is_empty());
        let b = http::Request::post("/up").header("transfer-encoding", "chunked");
        let (_, hs) = encode(b, BodyFraming::Chunked, None);
        assert_eq!(get(&hs, "transfer-encoding"), ["chunked"]);
        let b = http::Request::get("/ws")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket");
        let (_, hs) = encode(b, BodyFraming::None, Some("websocket"));
        assert_eq!(get(&hs, "connection"), ["upgrade"]);
        assert_eq!(get(&hs, "upgrade"), ["websocket"]);
    }

    #[test]
    fn request_ids_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
    }
}
