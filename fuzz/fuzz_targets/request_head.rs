//! A client's request head as the proxy checks and rewrites it: `target_authority`,
//! `refuse_unsupported`, the upgrade check and the upstream head `encode_request` writes.
//!
//! Input: a flags byte (bit 0: the request came over HTTP/2; bits 1-2: the body's framing),
//! then an HTTP/1 request head, parsed as hyper parses it (httparse) into `http` types.
#![no_main]

use cutover_proxy::fuzzing::request::{self, UpstreamFraming, CLIENT_IP};
use http::header::{HeaderName, HeaderValue};
use http::Version;
use libfuzzer_sys::fuzz_target;

/// Never forwarded (`Connection` and `Upgrade` only for an upgrade, checked apart).
const HOP_BY_HOP: &[&str] = &[
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "expect",
    "x-cutover-preview",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(head) else {
        return;
    };
    let version = match (flags & 1, parsed.version) {
        (1, _) => Version::HTTP_2,
        (_, Some(0)) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(version);
    for h in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value))
        else {
            return;
        };
        builder = builder.header(name, value);
    }
    let Ok(req) = builder.body(()) else { return };
    let (parts, ()) = req.into_parts();

    // Transfer codings: only a single `chunked` passes.
    let codings: Vec<String> = parts
        .headers
        .get_all("transfer-encoding")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    let refused = request::refuse_unsupported(&parts);
    let acceptable = parts.method != http::Method::CONNECT && codings.len() <= 1 && codings.iter().all(|c| c == "chunked");
    assert_eq!(refused.is_ok(), acceptable, "{refused:?} for codings {codings:?}");
    if let Err(e) = &refused {
        assert!(e.status().is_client_error() || e.status() == http::StatusCode::NOT_IMPLEMENTED);
    }

    let authority = match request::target_authority(&parts.uri, &parts.headers, parts.version) {
        Ok(a) => a,
        Err(why) => {
            assert!(!why.is_empty());
            return;
        }
    };
    // What routes the request is what the upstream is told, and it is a host[:port].
    assert!(!authority.contains(['@', '/', ' ', '\t', '\r', '\n', '?', '#']), "{authority:?}");
    match parts.uri.authority() {
        Some(target) => assert_eq!(authority, target.as_str()),
        None => match parts.headers.get("host") {
            Some(host) => assert_eq!(authority.as_bytes(), host.as_bytes()),
            None => {
                assert_eq!(authority, "");
                assert_ne!(parts.version, Version::HTTP_11, "an HTTP/1.1 request needs a Host");
            }
        },
    }
    assert!(parts.headers.get_all("host").iter().count() <= 1, "two Host lines were taken");
    let host = request::host_of(authority);
    assert!(authority.starts_with(host), "{host:?} of {authority:?}");

    let upgrade = (parts.version == Version::HTTP_11 && request::wants_upgrade(&parts))
        .then(|| parts.headers.get("upgrade").cloned())
        .flatten();
    let framing = match (flags >> 1) & 3 {
        0 => UpstreamFraming::None,
        1 => UpstreamFraming::Chunked,
        _ => UpstreamFraming::Length(u64::from(flags) * 977),
    };
    let out = request::encode_request(&parts, authority, upgrade.as_ref(), framing);

    // The upstream reads exactly one complete head, ending where the bytes end.
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut up = httparse::Request::new(&mut slots);
    let len = match up.parse(&out) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("the upstream head does not parse ({other:?}): {:?}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(len, out.len());
    assert_eq!(up.method, Some(parts.method.as_str()));
    assert_eq!(up.version, Some(1));
    let path = up.path.unwrap();
    assert!(path.starts_with('/') || path == "*" || parts.uri.path_and_query().is_none(), "{path:?}");
    let all = |name: &str| -> Vec<&[u8]> {
        up.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    assert_eq!(all("host"), [authority.as_bytes()]);
    let xff = all("x-forwarded-for");
    assert_eq!(xff.len(), 1);
    assert!(xff[0].ends_with(CLIENT_IP.as_bytes()));
    assert_eq!(all("x-forwarded-proto"), [b"http".as_slice()]);
    assert_eq!(all("x-request-id").len(), 1);
    for name in HOP_BY_HOP {
        assert!(all(name).is_empty(), "{name} went upstream");
    }
    // Headers the client named in Connection are hop-by-hop too, unless the proxy writes them.
    const WRITTEN_BY_THE_PROXY: &[&str] = &[
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
    ];
    for value in parts.headers.get_all("connection") {
        let Ok(list) = value.to_str() else { continue };
        for token in list.split(',').map(str::trim) {
            let Ok(name) = HeaderName::from_bytes(token.as_bytes()) else { continue };
            if ["close", "keep-alive"].contains(&name.as_str()) || WRITTEN_BY_THE_PROXY.contains(&name.as_str()) {
                continue;
            }
            assert!(all(name.as_str()).is_empty(), "{name}, named in Connection, went upstream");
        }
    }
    match &upgrade {
        Some(proto) => {
            assert_eq!(all("upgrade"), [proto.as_bytes()]);
            assert_eq!(all("connection"), [b"upgrade".as_slice()]);
        }
        None => assert!(all("upgrade").is_empty() && all("connection").is_empty()),
    }
    let lengths = all("content-length");
    let chunked = all("transfer-encoding");
    match framing {
        UpstreamFraming::None => assert!(lengths.is_empty() && chunked.is_empty()),
        UpstreamFraming::Chunked => {
            assert!(lengths.is_empty());
            assert_eq!(chunked, [b"chunked".as_slice()]);
        }
        UpstreamFraming::Length(n) => {
            assert!(chunked.is_empty());
            assert_eq!(lengths, [n.to_string().as_bytes()]);
        }
    }
});
