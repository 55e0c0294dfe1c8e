//! What the fuzz targets share: cutting one input into the reads a peer's bytes arrive in.

/// Splits `data` into consecutive reads. The first byte picks the largest read (1, 2, 3, 7, 16,
/// 64, 512 bytes, or all at once) and seeds the sizes, so that the fuzzer explores how the same
/// bytes are cut as well as the bytes themselves; the rest is the byte stream.
pub fn reads(data: &[u8]) -> Vec<&[u8]> {
    let Some((&seed, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let largest = match seed & 7 {
        0 => 1,
        1 => 2,
        2 => 3,
        3 => 7,
        4 => 16,
        5 => 64,
        6 => 512,
        _ => usize::MAX,
    };
    let mut x = u64::from(seed) | 0x9e37_79b9_7f4a_7c00;
    let mut out = Vec::new();
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = if largest == usize::MAX {
            rest.len()
        } else {
            1 + (x % largest as u64) as usize
        };
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

/// The stream `reads` cuts (everything after the first byte).
pub fn stream(data: &[u8]) -> &[u8] {
    data.get(1..).unwrap_or(&[])
}
