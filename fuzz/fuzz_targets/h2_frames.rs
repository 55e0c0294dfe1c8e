//! The HTTP/2 frame follower (`h2.rs`) on any bytes in any reads: it never panics, and where it
//! stands after the bytes does not depend on how they were cut. A second, frame-by-frame reading
//! of the whole stream says where that is: in the preface, in a frame header, in a payload, and
//! whether a header block (HEADERS, then CONTINUATIONs up to END_HEADERS) is open.
#![no_main]

use cutover_proxy::fuzzing::h2::{Follower, Position, PREFACE};
use libfuzzer_sys::fuzz_target;

/// Where a frame-by-frame reading of the whole stream ends.
fn expected(stream: &[u8]) -> Position {
    let preface = stream.len().min(PREFACE.len());
    let mut rest = &stream[preface..];
    let mut in_block = false;
    loop {
        if rest.len() < 9 {
            let open = in_block || !rest.is_empty();
            return Position {
                preface_left: (PREFACE.len() - preface) as u8,
                frame_header_bytes: rest.len() as u8,
                payload_left: 0,
                in_block,
                open,
            };
        }
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]);
        let (kind, flags) = (rest[3], rest[4]);
        let header_block = kind == 0x1 || kind == 0x9;
        if header_block {
            in_block = true;
        }
        rest = &rest[9..];
        if (rest.len() as u64) < u64::from(len) {
            return Position {
                preface_left: 0,
                frame_header_bytes: 0,
                payload_left: len - rest.len() as u32,
                in_block,
                open: in_block,
            };
        }
        rest = &rest[len as usize..];
        if header_block && flags & 0x4 != 0 {
            in_block = false;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let stream = cutover_fuzz::stream(data);
    let mut cut = Follower::default();
    let mut open_after_reads = Vec::new();
    for read in cutover_fuzz::reads(data) {
        cut.feed(read);
        open_after_reads.push(cut.open());
    }
    let mut whole = Follower::default();
    whole.feed(stream);
    let want = expected(stream);
    assert_eq!(whole.position(), want, "in one read");
    assert_eq!(cut.position(), want, "in reads");
    assert_eq!(cut.open(), want.open);
    // Cutting the bytes finer can only show more openings, never fewer.
    assert!(cut.opened() >= whole.opened(), "{} < {}", cut.opened(), whole.opened());
});
