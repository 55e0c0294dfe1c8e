//! The WebSocket frame follower (`tunnel.rs`) on any bytes in any reads. A frame-by-frame
//! reading of the whole stream (RFC 6455 §5.2: 2 bytes, then 2 or 8 of extended length, then 4
//! of masking key, then the payload) says where the frames end; the follower must find the same
//! edges however the bytes are cut, say whether a Close frame went by, and `finish` must stop at
//! exactly the end of the frame under way, as the tunnel relies on when it closes a WebSocket.
#![no_main]

use cutover_proxy::fuzzing::websocket::Follower;
use libfuzzer_sys::fuzz_target;

/// The offsets at which frames end, and whether a whole Close frame header went by.
fn expected(stream: &[u8]) -> (Vec<usize>, bool) {
    let mut edges = Vec::new();
    let mut close = false;
    let mut at = 0usize;
    loop {
        let Some(&[first, second]) = stream.get(at..at + 2).map(|s| <&[u8; 2]>::try_from(s).unwrap()) else {
            return (edges, close);
        };
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header = 2 + extended + if second & 0x80 != 0 { 4 } else { 0 };
        let Some(head) = stream.get(at..at + header) else {
            return (edges, close);
        };
        close |= first & 0x0f == 0x8;
        let len = match extended {
            2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            8 => u64::from_be_bytes(head[2..10].try_into().unwrap()),
            _ => u64::from(second & 0x7f),
        };
        // A 64-bit length may be as large as u64::MAX (the follower does not refuse a set top bit).
        match ((at + header) as u64).checked_add(len) {
            Some(end) if end <= stream.len() as u64 => at = end as usize,
            _ => return (edges, close),
        }
        edges.push(at);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(&seed) = data.first() else { return };
    let stream = cutover_fuzz::stream(data);
    let (want_edges, want_close) = expected(stream);

    // Edges found by stepping through the reads.
    let mut follower = Follower::default();
    let mut edges = Vec::new();
    let mut at = 0;
    for read in cutover_fuzz::reads(data) {
        let mut rest = read;
        while !rest.is_empty() {
            let n = follower.step(rest);
            assert!(n > 0 && n <= rest.len(), "step took {n} of {}", rest.len());
            at += n;
            rest = &rest[n..];
            if follower.at_edge() {
                edges.push(at);
            }
        }
    }
    assert_eq!(edges, want_edges);
    assert_eq!(follower.close_sent(), want_close);
    assert_eq!(follower.at_edge(), want_edges.last().copied().unwrap_or(0) == stream.len());

    // `finish` from a cut point: up to the next edge, or none if the frame goes on.
    let cut = (seed as usize * 7919) % (stream.len() + 1);
    let mut follower = Follower::default();
    follower.advance(&stream[..cut]);
    let at_edge = cut == 0 || want_edges.contains(&cut);
    assert_eq!(follower.at_edge(), at_edge, "at {cut}");
    let next = want_edges.iter().find(|&&e| e > cut).copied();
    let got = follower.finish(&stream[cut..]);
    let want = if at_edge { Some(0) } else { next.map(|e| e - cut) };
    assert_eq!(got, want, "finishing from {cut}");
});
