//! Limits and timeouts of the data plane. Validated by whoever builds it (the control plane reads
//! them from the config file); the proxy takes them as given.

use std::net::SocketAddr;
use std::time::Duration;

/// A listening socket of the proxy.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// A preview listener routes every request to the inactive colour of its service.
    pub preview: bool,
    /// A TLS listener terminates TLS with the certificate chosen by SNI from the set handed to
    /// [`crate::Proxy::set_certificates`], and speaks HTTP/2 when ALPN chose `h2`.
    pub tls: bool,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listeners: Vec<ListenerConfig>,
    /// Worker threads, each running its own event loop with its own accept socket
    /// (`SO_REUSEPORT`) and its own upstream connection pools.
    pub workers: usize,
    /// Time a new connection has to send its first byte, and a request head (HTTP/2: a header
    /// block) to arrive whole from its first byte. A keep-alive connection waiting for its next request is governed by
    /// `idle_timeout` instead.
    pub client_header_timeout: Duration,
    /// A client connection with no bytes moving either way and no request in flight is closed
    /// after between one and two times this long (the check runs once per period). A client
    /// connection silent for half this long is probed with TCP keepalive, about every eighth of
    /// it, so that a tunnel whose client vanished is noticed (see `send_timeout`).
    pub idle_timeout: Duration,
    /// A client that acknowledges none of the bytes sent to it for this long (it stopped reading,
    /// or vanished with data or keepalive probes unanswered) is cut by the kernel
    /// (`TCP_USER_TIMEOUT`, 1 s to 24 days). A slow reader that takes some bytes now and then
    /// is not, nor is a response waiting for its upstream.
    pub send_timeout: Duration,
    /// Time to establish a TCP connection to an upstream instance; for a service with
    /// `upstream_tls`, the TLS handshake that follows gets the same time again.
    pub connect_timeout: Duration,
    /// Time from sending a request upstream to receiving its response head; also the longest
    /// an upstream may take none of the request body being written to it.
    pub upstream_timeout: Duration,
    /// Idle upstream keep-alive connections are closed after this long; keep it below the
    /// upstream's own keep-alive timeout so that the proxy, not the upstream, closes them.
    pub upstream_idle_timeout: Duration,
    /// Idle upstream connections kept per instance and worker.
    pub upstream_pool_size: usize,
    /// Client connections open at once, over all workers, a connection upgraded to a tunnel
    /// included until the tunnel closes; further clients wait in the listen backlog. At start
    /// the soft open files limit is raised to the hard one, and a value whose connections
    /// cannot fit in it is refused.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// How long a graceful shutdown waits for in-flight requests and open tunnels; tunnels
    /// (WebSockets) are closed at random instants over the first half of what it leaves after
    /// their 1 s closing grace.
    pub shutdown_timeout: Duration,
    /// Replays a request whose upstream connection failed before any response byte arrived,
    /// when its method is idempotent and it has no body. Connect failures are always retried.
    pub retry_idempotent: bool,
    /// Counts every answered request per colour (status class, latency). The post-promotion
    /// watch and the metrics read these counters; off only to measure what they cost.
    pub record_stats: bool,
    /// Logs one line per request (target `cutover::access`): request id, service, colour,
    /// method, path, status and duration.
    pub access_log: bool,
    /// Longest a worker runs without a preemption point: a system call that reads its own CPU
    /// time, after which Linux switches to a waiting thread if the worker's time slice is used up.
    /// Without one, the kernel applies the end of the slice at its next tick (every 4 ms at
    /// 250 Hz), and a process woken onto the worker's CPU (an upstream on the same host, a local
    /// client) waits that long while a worker that never sleeps serves everyone else. There is a
    /// point whenever the worker comes back from its wait for events, one before the writes a
    /// pass held go out, one after a pass over the ready events when at least 250 µs (or this,
    /// if shorter) went by since the last such one, and one before a request when this long went
    /// by since the last one. The worker never gives up the CPU itself: the kernel decides by its
    /// usual rules. Zero turns the points off.
    pub preempt_interval: Duration,
    /// Time a connection to a TLS listener has, from its accept, to complete its TLS handshake
    /// (and, before it, to send its first byte). It counts under `max_connections` meanwhile;
    /// waiting costs no CPU.
    pub tls_handshake_timeout: Duration,
    /// Peers whose `X-Forwarded-For`, `-Proto` and `-Host` are believed (a load balancer or
    /// proxy in front): their chain is kept and the peer appended, their proto and host are
    /// passed on. From any other peer those headers are replaced with what the proxy sees.
    pub trusted_proxies: Vec<Cidr>,
    /// Connections from `trusted_proxies` begin with a PROXY protocol header (v1 or v2) naming
    /// the client they carry; see `proxy_protocol.rs`.
    pub proxy_protocol: bool,
}

/// An address block, e.g. `10.0.0.0/8` or `::1/128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or a bare address (the one address). The error says what is wrong.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address block; write e.g. \"10.0.0.0/8\" or \"192.0.2.7\""))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{text:?}: the prefix length must be 0 to {max}")),
            },
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(format!(
                "{text:?} has bits set past its prefix; write the block's first address, {}/{prefix}",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    fn network(&self) -> std::net::IpAddr {
        match self.addr {
            std::net::IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                std::net::IpAddr::V4((u32::from(a) & mask).into())
            }
            std::net::IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                std::net::IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (std::net::IpAddr::V4(_), std::net::IpAddr::V4(_)) | (std::net::IpAddr::V6(_), std::net::IpAddr::V6(_)) => {
                Cidr {
                    addr: ip,
                    prefix: self.prefix,
                }
                .network()
                    == self.addr
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listeners: Vec::new(),
            workers: 1,
            client_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(30),
            upstream_pool_size: 1024,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            retry_idempotent: true,
            record_stats: true,
            access_log: false,
            preempt_interval: Duration::from_millis(2),
            tls_handshake_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cidr;

    #[test]
    fn address_blocks_parse_and_match() {
        let b = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(b.contains("10.200.3.4".parse().unwrap()));
        assert!(
            b.contains("::ffff:10.1.1.1".parse().unwrap()),
            "an IPv4-mapped address is its IPv4 one"
        );
        assert!(!b.contains("11.0.0.1".parse().unwrap()));
        assert!(!b.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()) && !one.contains("192.0.2.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()) && !v6.contains("2001:db9::".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::parse("example.com").unwrap_err().contains("not an address block"));
    }
}
