//! The PROXY protocol (versions 1 and 2, as HAProxy specifies them): a load balancer in front
//! that passes TCP through says, in a header before the first byte of the connection, which
//! client it carries. With `proxy_protocol` on, a connection from one of `trusted_proxies` must
//! begin with such a header, and the client it names is the connection's client from then on
//! (its address in `X-Forwarded-For`, and trusted or not by its own address). A connection from
//! any other peer is served as it comes: nobody else may say who the client is.
//!
//! The header is read with exact reads, so not one byte of what follows it (an HTTP request, a
//! TLS ClientHello) is taken from the socket. A version 1 header is read a byte at a time (at
//! most 107 bytes); this runs once per connection from a load balancer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The first twelve bytes of a version 2 header.
const V2_SIGNATURE: [u8; 12] = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];

/// The longest version 1 header, its CRLF included.
const V1_MAX: usize = 107;

/// The connection's client: the one its PROXY header names when `proxy_protocol` is on and the
/// peer is trusted (`None` if the header is missing or malformed, or does not come within
/// `client_header_timeout`: the connection is closed), otherwise the peer itself.
pub(crate) async fn client_of(
    shared: &crate::shared::Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(TcpStream, SocketAddr)> {
    let cfg = &shared.config;
    if !cfg.proxy_protocol || !cfg.trusted_proxies.iter().any(|c| c.contains(peer.ip())) {
        return Some((stream, peer));
    }
    match tokio::time::timeout(cfg.client_header_timeout, read_header(&mut stream)).await {
        Ok(Ok(client)) => Some((stream, client.unwrap_or(peer))),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "closing a connection from a trusted proxy without a valid PROXY header");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "no PROXY header within client_header_timeout; closing the connection");
            None
        }
    }
}

/// Reads the PROXY header at the start of `stream`. `Ok(Some(addr))`: the client it names;
/// `Ok(None)`: a header that names no client (version 1 `UNKNOWN`, version 2 `LOCAL`, or an
/// address family other than TCP over IPv4 or IPv6): the connection's own peer stands. `Err`: no
/// valid header; the connection is to be closed.
pub(crate) async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, String> {
    let mut start = [0u8; 6];
    stream
        .read_exact(&mut start)
        .await
        .map_err(|e| format!("no PROXY header: {e}"))?;
    if &start == b"PROXY " {
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err("a PROXY v1 header longer than 107 bytes".into());
            }
            line.push(
                stream
                    .read_u8()
                    .await
                    .map_err(|e| format!("PROXY v1 header cut: {e}"))?,
            );
        }
        return parse_v1(&line);
    }
    if start[..] != V2_SIGNATURE[..6] {
        return Err("the connection does not begin with a PROXY header".into());
    }
    let mut rest = [0u8; 10];
    stream
        .read_exact(&mut rest)
        .await
        .map_err(|e| format!("PROXY v2 header cut: {e}"))?;
    if rest[..6] != V2_SIGNATURE[6..] {
        return Err("the connection does not begin with a PROXY header".into());
    }
    let len = usize::from(u16::from_be_bytes([rest[8], rest[9]]));
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("PROXY v2 header cut: {e}"))?;
    parse_v2(rest[6], rest[7], &body)
}

/// `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` or `PROXY UNKNOWN...\r\n`.
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a PROXY v1 header that is not text")?;
    let fields: Vec<&str> = text.trim_end_matches("\r\n").split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| format!("PROXY v1: {src:?} is not an address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(format!("PROXY v1: {src} is not a {family} address"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| format!("PROXY v1: {sport:?} is not a port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(format!("a malformed PROXY v1 header: {:?}", text.trim_end())),
    }
}

/// A version 2 header after its signature: version and command, family and protocol, and the
/// address block.
fn parse_v2(version_command: u8, family: u8, body: &[u8]) -> Result<Option<SocketAddr>, String> {
    if version_command >> 4 != 2 {
        return Err(format!("PROXY v2: version {} is not 2", version_command >> 4));
    }
    match version_command & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer's own connection (a health check)
        1 => {}
        c => return Err(format!("PROXY v2: unknown command {c}")),
    }
    match family {
        // TCP over IPv4: source, destination (4 bytes each), source port, destination port.
        0x11 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]]))))
        }
        // TCP over IPv6: 16 bytes each, then the ports.
        0x21 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[32], body[33]]),
            )))
        }
        0x11 | 0x21 => Err("PROXY v2: the address block is too short".into()),
        // UNSPEC, UDP, unix sockets: no TCP client to name.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_headers_name_their_client_or_none() {
        let a = parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n").unwrap();
        assert_eq!(a, Some("203.0.113.7:51234".parse().unwrap()));
        let a = parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 443 443\r\n").unwrap();
        assert_eq!(a, Some("[2001:db8::7]:443".parse().unwrap()));
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert!(parse_v1(b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 80\r\n").is_err());
        assert!(parse_v1(b"PROXY TCP4 203.0.113.7\r\n").is_err());
    }

    #[test]
    fn version_2_headers_name_their_client_or_none() {
        let mut v4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
        v4.extend_from_slice(&51234u16.to_be_bytes());
        v4.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse_v2(0x21, 0x11, &v4).unwrap(),
            Some("203.0.113.7:51234".parse().unwrap())
        );
        assert_eq!(parse_v2(0x20, 0x11, &v4).unwrap(), None, "LOCAL names no client");
        assert!(parse_v2(0x11, 0x11, &v4).is_err(), "version 1 in a version 2 header");
        assert!(parse_v2(0x21, 0x11, &v4[..6]).is_err(), "too short");
        assert_eq!(parse_v2(0x21, 0x00, &[]).unwrap(), None, "UNSPEC");
    }
}
