//! A whole client connection through hyper's server connection and cutover's request path, up
//! to an in-memory upstream (`cutover_proxy::fuzzing::request::serve_connection` says what is
//! left out): HTTP/1 or, after the preface, HTTP/2, the bytes cut into reads anywhere.
//!
//! Checked for every request that reaches the upstream: its head is one complete HTTP/1.1
//! request head with one Host (the authority it was routed by), no hop-by-hop header, and one
//! body framing that the bytes written after it follow exactly; every refusal is a 4xx or 501.
#![no_main]

use std::sync::{Arc, OnceLock};

use cutover_proxy::fuzzing::request::{serve_connection, UpstreamFraming};
use cutover_proxy::{Pool, RouteTable, Service};
use libfuzzer_sys::fuzz_target;

/// Two services: `api.example` by name, `web` for every other host.
fn table() -> Arc<RouteTable> {
    static TABLE: OnceLock<Arc<RouteTable>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let addr = "127.0.0.1:9".parse().unwrap();
            let mut api = Service::new("api");
            api.hosts = vec!["api.example".into()];
            api.blue = Pool::new(Some("v1"), vec![cutover_proxy::Instance::new(addr)]);
            let mut web = Service::new("web");
            web.blue = Pool::new(Some("v1"), vec![cutover_proxy::Instance::new(addr)]);
            Arc::new(RouteTable::new(vec![api, web]).expect("a valid table"))
        })
        .clone()
}

/// Decodes a chunked body as an upstream would; `None` if it is not exactly one.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?, 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return (b == b"\r\n").then_some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

fuzz_target!(|data: &[u8]| {
    let reads = cutover_fuzz::reads(data);
    let served = serve_connection(table(), &reads, 16 * 1024);
    for (status, why) in &served.refused {
        assert!(
            status.is_client_error() || *status == http::StatusCode::NOT_IMPLEMENTED,
            "{status} for {why}"
        );
    }
    for f in &served.forwarded {
        let mut slots = [httparse::EMPTY_HEADER; 256];
        let mut up = httparse::Request::new(&mut slots);
        let len = match up.parse(&f.head) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("upstream head does not parse ({other:?}): {:?}", String::from_utf8_lossy(&f.head)),
        };
        assert_eq!(len, f.head.len());
        assert_eq!(up.method, Some(f.method.as_str()));
        let all = |name: &str| -> Vec<&[u8]> {
            up.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
                .collect()
        };
        assert_eq!(all("host"), [f.authority.as_bytes()]);
        for hop in ["te", "trailer", "keep-alive", "proxy-connection", "expect", "x-cutover-preview"] {
            assert!(all(hop).is_empty(), "{hop} went upstream");
        }
        if f.upgrade.is_none() {
            assert!(all("connection").is_empty() && all("upgrade").is_empty());
        }
        let lengths = all("content-length");
        let codings = all("transfer-encoding");
        match f.framing {
            UpstreamFraming::None => {
                assert!(lengths.is_empty() && codings.is_empty());
                assert!(f.body.is_empty());
            }
            UpstreamFraming::Length(n) => {
                assert!(codings.is_empty());
                assert_eq!(lengths, [n.to_string().as_bytes()]);
                assert!(f.body.len() as u64 <= n, "{} bytes sent for a length of {n}", f.body.len());
                if f.body_result.is_ok() {
                    assert_eq!(f.body.len() as u64, n);
                }
            }
            UpstreamFraming::Chunked => {
                assert!(lengths.is_empty());
                assert_eq!(codings, [b"chunked".as_slice()]);
                if f.body_result.is_ok() {
                    assert!(dechunk(&f.body).is_some(), "not one chunked body: {:?}", f.body);
                }
            }
        }
    }
});
