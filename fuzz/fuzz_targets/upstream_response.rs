//! An upstream's response as the proxy reads it (`h1.rs`): status line, headers, then the body
//! by Content-Length, chunking or the close, with the bytes cut into reads anywhere.
//!
//! Input: a byte that picks how the stream is cut (see `cutover_fuzz::reads`), then the bytes
//! the upstream sends; bit 3 of that byte says the request was a HEAD.
//! Checked: nothing panics or spins; a length-framed body is never longer than its length, and
//! ends clean only when whole; how the bytes are cut changes nothing (the same head, body,
//! ending and leftover bytes as when they come in one read).
#![no_main]

use cutover_proxy::fuzzing::response::{read_response, ResponseFraming, UpstreamResponse};
use libfuzzer_sys::fuzz_target;

/// Largest head the reader takes (h1.rs's MAX_HEAD); past it, where the reads are cut decides
/// whether a long head is refused before it is complete, so the comparison stops there.
const MAX_HEAD: usize = 64 * 1024;

fn summary(r: &Result<UpstreamResponse, String>) -> String {
    match r {
        Ok(r) => format!(
            "{} {:?} {:?} ka={} body={:?} end={:?} left={:?}",
            r.status, r.headers, r.framing, r.keep_alive, r.body, r.body_result, r.leftover
        ),
        Err(e) => format!("head error: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(&flags) = data.first() else { return };
    let head_request = flags & 8 != 0;
    let stream = cutover_fuzz::stream(data);
    let cut = read_response(&cutover_fuzz::reads(data), head_request);
    if let Ok(r) = &cut {
        match r.framing {
            ResponseFraming::Length(n) => {
                assert!(r.body.len() as u64 <= n, "{} body bytes for a length of {n}", r.body.len());
                if r.body_result.is_ok() {
                    assert_eq!(r.body.len() as u64, n);
                }
                let declared = r.headers.get_all("content-length").iter().collect::<Vec<_>>();
                assert_eq!(declared.len(), 1, "one Content-Length goes to the client");
                // As the upstream wrote it (leading zeros and all), so long as it says n.
                let value = std::str::from_utf8(declared[0].as_bytes()).expect("digits");
                assert_eq!(value.parse::<u64>().ok(), Some(n), "{value:?}");
            }
            ResponseFraming::Empty => {
                assert!(r.body.is_empty());
                assert_eq!(r.body_result, Ok(()));
            }
            ResponseFraming::Chunked => {
                assert!(!r.headers.contains_key("content-length"));
                assert!(r.body.len() <= stream.len());
            }
            ResponseFraming::Close => {
                assert!(!r.keep_alive, "a body ended by the close cannot leave the connection open");
                assert!(r.leftover.is_empty());
            }
        }
        assert!(!r.headers.contains_key("transfer-encoding"));
        assert!(!r.headers.contains_key("connection") || r.status == 101);
        assert!(r.body.len() + r.leftover.len() <= stream.len());
    }
    if stream.len() < MAX_HEAD {
        let whole = read_response(&[stream], head_request);
        assert_eq!(summary(&cut), summary(&whole), "cutting the reads changed the outcome");
    }
});
