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
/// With a valid `X-Cutover-Preview`: the colour to route to (`blue` or `green`), live or not.
/// Lets an instance reach the other services' instances of its own colour through the proxy.
/// Without a valid token it selects nothing. Stripped before forwarding.
pub static X_CUTOVER_COLOUR: HeaderName = HeaderName::from_static("x-cutover-colour");
/// Marks a copy made by mirroring (`crate::mirror`); a client's own is removed, so that only
/// cutover's copies carry it.
pub static X_CUTOVER_MIRROR: HeaderName = HeaderName::from_static("x-cutover-mirror");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Longest client-supplied request id that is passed on; longer ones are replaced.
pub(crate) const MAX_REQUEST_ID: usize = 128;

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
    /// The peer is a trusted proxy: its `X-Forwarded-For` chain is kept (the peer appended), and
    /// its `X-Forwarded-Proto` and `-Host` are passed on. From anyone else they are replaced.
    pub trusted: bool,
    /// The authority the request was routed by (see [`target_authority`]): the upstream gets it
    /// as its `Host` and `X-Forwarded-Host`, whatever Host lines the client sent.
    pub authority: &'a str,
}

/// The authority (`host[:port]`) a request is for, which both routes it and becomes the `Host`
/// the upstream receives, so that the two can never disagree:
/// - the request target's authority when it has one (HTTP/2 `:authority`, HTTP/1 absolute-form
///   `GET http://host/path`), which replaces any Host header (RFC 9112 §3.2.2); an HTTP/2 request
///   whose Host differs from its `:authority` is malformed (RFC 9113 §8.3.1);
/// - otherwise its one Host header;
/// - otherwise nothing (empty): allowed for HTTP/1.0 and HTTP/2 only.
///
/// More than one Host line, a Host that is not a `host[:port]`, user information in the target
/// (`http://user@host/`), a scheme other than http or https, and an HTTP/1.1 request without a
/// Host are refused (RFC 9112 §3.2: 400).
pub(crate) fn target_authority<'a>(
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    version: http::Version,
) -> Result<&'a str, &'static str> {
    let mut lines = headers.get_all(header::HOST).iter();
    let host = lines.next();
    if lines.next().is_some() {
        return Err("more than one Host header");
    }
    let host = match host {
        Some(v) => match v.to_str() {
            Ok(h) if is_authority(h) => Some(h),
            _ => return Err("the Host header is not a host[:port]"),
        },
        None => None,
    };
    match uri.authority() {
        Some(target) => {
            let target = target.as_str();
            if target.contains('@') {
                return Err("the request target carries user information");
            }
            if !uri
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
            {
                return Err("the request target's scheme is not http or https");
            }
            if version == http::Version::HTTP_2 && host.is_some_and(|h| !h.eq_ignore_ascii_case(target)) {
                return Err("the Host header differs from the request's :authority");
            }
            Ok(target)
        }
        None => match host {
            Some(h) => Ok(h),
            None if version == http::Version::HTTP_11 => Err("an HTTP/1.1 request needs a Host header"),
            None => Ok(""),
        },
    }
}

/// Whether `s` has only the characters of an RFC 3986 `host [ ":" port ]` (a registered name,
/// an IPv4 address or a bracketed IPv6 literal): no spaces, no user information, no path.
fn is_authority(s: &str) -> bool {
    s.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// The host of an authority, without its port; an IPv6 literal keeps its brackets.
pub(crate) fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |end| &authority[..=end]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::EXPECT // the proxy streams the body without waiting; see encode_request
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == X_CUTOVER_PREVIEW
        || name == X_CUTOVER_COLOUR
        || name == X_CUTOVER_MIRROR
}

/// Header names listed in `Connection` (other than the standard tokens) are hop-by-hop too.
/// Rare; only then is anything allocated.
pub(crate) fn named_in_connection(parts: &Parts) -> Vec<HeaderName> {
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
    match parts.uri.path_and_query().map(|pq| pq.as_str()) {
        // An absolute-form target with an empty path and a query (`http://host?q`): the origin
        // form of it starts with the path `/` (RFC 9112 §3.2.1, §3.2.2), never with the `?`.
        Some(pq) if pq.starts_with('?') => {
            out.push(b'/');
            out.extend_from_slice(pq.as_bytes());
        }
        Some(pq) if !pq.is_empty() => out.extend_from_slice(pq.as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let named = if parts.headers.contains_key(header::CONNECTION) {
        named_in_connection(parts)
    } else {
        Vec::new()
    };
    let mut xff_seen = false;
    let mut request_id_kept = false;
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name) || (!named.is_empty() && named.contains(name)) {
            continue;
        }
        if name == header::HOST {
            continue; // written below from the authority the request was routed by
        } else if name == X_FORWARDED_FOR {
            // Folded into one chain below, from a trusted proxy only.
            xff_seen = fwd.trusted;
            continue;
        } else if name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST {
            // The proxy's own view replaces an untrusted client's claim; a trusted proxy's
            // first value is passed on below.
            continue;
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
    // Always one Host, empty when the request named none (RFC 9112 §3.2).
    put_header(out, b"host", fwd.authority.as_bytes());

    out.extend_from_slice(b"x-forwarded-for: ");
    if xff_seen {
        for v in parts.headers.get_all(&X_FORWARDED_FOR) {
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(fwd.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    let claimed = |name: &HeaderName| {
        fwd.trusted
            .then(|| parts.headers.get(name))
            .flatten()
            .filter(|v| !v.is_empty())
    };
    match claimed(&X_FORWARDED_PROTO) {
        Some(proto) => put_header(out, b"x-forwarded-proto", proto.as_bytes()),
        None => put_header(out, b"x-forwarded-proto", fwd.proto.as_bytes()),
    }
    match claimed(&X_FORWARDED_HOST) {
        Some(host) => put_header(out, b"x-forwarded-host", host.as_bytes()),
        None if !fwd.authority.is_empty() => put_header(out, b"x-forwarded-host", fwd.authority.as_bytes()),
        None => {}
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
        encode_from(b, body, upgrade, false)
    }

    /// [`encode`], the peer trusted or not.
    fn encode_from(
        b: http::request::Builder,
        body: BodyFraming,
        upgrade: Option<&str>,
        trusted: bool,
    ) -> (String, Vec<(String, String)>) {
        let (parts, _) = b.body(()).unwrap().into_parts();
        let authority = target_authority(&parts.uri, &parts.headers, parts.version).expect("a routable request");
        let ip = HeaderValue::from_static("10.1.2.3");
        let mut out = Vec::new();
        let up = upgrade.map(|u| HeaderValue::from_str(u).unwrap());
        encode_request(
            &mut out,
            &parts,
            &Forwarding {
                client_ip: &ip,
                proto: "http",
                trusted,
                authority,
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

    /// A trusted proxy's `X-Forwarded-For` chain is kept with the peer appended, and its
    /// `X-Forwarded-Proto` and `-Host` are passed on; from anyone else all three are replaced.
    #[test]
    fn forwarded_headers_are_believed_from_trusted_proxies_only() {
        let b = || {
            http::Request::get("/")
                .header("host", "x")
                .header("x-forwarded-for", "1.1.1.1")
                .header("x-forwarded-for", "2.2.2.2")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "shop.example")
                .header("x-request-id", "abc-123")
        };
        let (_, hs) = encode_from(b(), BodyFraming::None, None, true);
        assert_eq!(get(&hs, "x-forwarded-for"), ["1.1.1.1, 2.2.2.2, 10.1.2.3"]);
        assert_eq!(get(&hs, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&hs, "x-forwarded-host"), ["shop.example"]);
        assert_eq!(get(&hs, "x-request-id"), ["abc-123"]);
        let (_, hs) = encode_from(b(), BodyFraming::None, None, false);
        assert_eq!(
            get(&hs, "x-forwarded-for"),
            ["10.1.2.3"],
            "an untrusted chain is replaced"
        );
        assert_eq!(get(&hs, "x-forwarded-proto"), ["http"], "client claims are replaced");
        assert_eq!(get(&hs, "x-forwarded-host"), ["x"]);
        assert_eq!(get(&hs, "x-request-id"), ["abc-123"]);
    }

    #[test]
    fn replaces_unusable_request_id() {
        let long = "a".repeat(500);
        let (_, hs) = encode(
            http::Request::get("/")
                .header("host", "x")
                .header("x-request-id", long.as_str()),
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
        let b = http::Request::post("/up")
            .header("host", "x")
            .header("content-length", "5");
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
        let b = http::Request::post("/up")
            .header("host", "x")
            .header("content-length", "5");
        let (_, hs) = encode(b, BodyFraming::Chunked, None);
        assert!(get(&hs, "content-length").is_empty());
        let b = http::Request::post("/up")
            .header("host", "x")
            .header("transfer-encoding", "chunked");
        let (_, hs) = encode(b, BodyFraming::Chunked, None);
        assert_eq!(get(&hs, "transfer-encoding"), ["chunked"]);
        let b = http::Request::get("/ws")
            .header("host", "x")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket");
        let (_, hs) = encode(b, BodyFraming::None, Some("websocket"));
        assert_eq!(get(&hs, "connection"), ["upgrade"]);
        assert_eq!(get(&hs, "upgrade"), ["websocket"]);
    }

    #[test]
    fn the_target_authority_routes_and_becomes_the_host() {
        use http::Version;
        let parts = |b: http::request::Builder| b.body(()).unwrap().into_parts().0;
        let authority = |b| {
            let p = parts(b);
            target_authority(&p.uri, &p.headers, p.version).map(str::to_string)
        };
        // Absolute-form: the target's authority, not the Host line, and it is what goes upstream.
        let absolute = || http::Request::get("http://api.example:8080/x").header("host", "web.example");
        assert_eq!(authority(absolute()).as_deref(), Ok("api.example:8080"));
        let (line, hs) = encode(absolute(), BodyFraming::None, None);
        assert_eq!(line, "GET /x");
        assert_eq!(get(&hs, "host"), ["api.example:8080"]);
        assert_eq!(get(&hs, "x-forwarded-host"), ["api.example:8080"]);
        // Origin-form: the one Host line.
        assert_eq!(
            authority(http::Request::get("/").header("host", "Web.Example:80")).as_deref(),
            Ok("Web.Example:80")
        );
        assert_eq!(
            authority(http::Request::get("/").header("host", "[::1]:8080")).as_deref(),
            Ok("[::1]:8080")
        );
        // Without a Host: refused in HTTP/1.1, an empty Host in HTTP/1.0.
        assert!(authority(http::Request::get("/")).is_err());
        assert_eq!(
            authority(http::Request::get("/").version(Version::HTTP_10)).as_deref(),
            Ok("")
        );
        let (_, hs) = encode(
            http::Request::get("/").version(Version::HTTP_10),
            BodyFraming::None,
            None,
        );
        assert_eq!(get(&hs, "host"), [""]);
        assert!(get(&hs, "x-forwarded-host").is_empty());
        // Refused: two Host lines, a Host that is not host[:port], user information, other schemes,
        // an HTTP/2 Host that names another authority.
        for bad in [
            http::Request::get("/")
                .header("host", "a.example")
                .header("host", "b.example"),
            http::Request::get("/")
                .header("host", "a.example")
                .header("host", "a.example"),
            http::Request::get("/").header("host", "a example"),
            http::Request::get("/").header("host", "user@a.example"),
            http::Request::get("/").header("host", "a.example/path"),
            http::Request::get("http://user:pw@a.example/"),
            http::Request::get("ftp://a.example/"),
            http::Request::get("http://a.example/")
                .version(Version::HTTP_2)
                .header("host", "b.example"),
        ] {
            let p = parts(bad);
            assert!(target_authority(&p.uri, &p.headers, p.version).is_err(), "{p:?}");
        }
        // HTTP/2 with a Host equal to its :authority is fine.
        let ok = http::Request::get("https://a.example/")
            .version(Version::HTTP_2)
            .header("host", "A.example");
        assert_eq!(authority(ok).as_deref(), Ok("a.example"));
    }

    /// Found by fuzzing: `GET http://host?q` went upstream as `GET ?q HTTP/1.1`, which is no
    /// request target at all.
    #[test]
    fn an_absolute_target_without_a_path_goes_upstream_with_the_path_slash() {
        for (target, line) in [
            ("http://api.example?le:8080/x", "GET /?le:8080/x"),
            ("http://api.example:8080?q=1", "GET /?q=1"),
            ("http://api.example", "GET /"),
            ("http://api.example/?q", "GET /?q"),
        ] {
            let b = http::Request::get(target).header("host", "web.example");
            let (got, hs) = encode(b, BodyFraming::None, None);
            assert_eq!(got, line, "{target}");
            assert_eq!(get(&hs, "host").len(), 1);
        }
        // The same through HTTP/2, where the target comes from :authority and :path.
        let b = http::Request::get("https://api.example?q").version(http::Version::HTTP_2);
        assert_eq!(encode(b, BodyFraming::None, None).0, "GET /?q");
    }

    #[test]
    fn a_host_named_in_connection_is_still_sent() {
        let b = http::Request::get("/")
            .header("host", "shop.example")
            .header("connection", "host");
        let (_, hs) = encode(b, BodyFraming::None, None);
        assert_eq!(get(&hs, "host"), ["shop.example"]);
    }

    #[test]
    fn request_ids_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
    }
}
