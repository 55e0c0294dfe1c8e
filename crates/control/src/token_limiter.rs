//! How fast a client of the TCP admin listener may try tokens: a few wrong ones in a row, then
//! one per [`INTERVAL`]; a client over that is answered 429 before its token is even compared.
//!
//! Kept per client address (an IPv6 client per /64, the block one host usually gets), so that
//! someone guessing from one address does not lock out the operator at another. Clients sharing
//! one address (every local user on 127.0.0.1) share its allowance. The check, the comparison and
//! the recording of a failure happen under one lock, so parallel connections cannot slip guesses
//! in between. Pure logic: the caller gives the instant.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong tokens a client may send back to back before it has to wait.
pub const BURST: u32 = 5;
/// After the burst, one more wrong token per interval.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Clients remembered at most; past this, new addresses share one allowance, so that a flood of
/// addresses cannot grow the map without bound (nor guess faster than one client).
const MAX_CLIENTS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix(u64),
    /// Every new client while [`MAX_CLIENTS`] are remembered.
    Overflow,
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// What became of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The token was right.
    Allowed,
    /// The token was wrong; the failure is counted.
    Wrong,
    /// Too many wrong tokens from this client: the token was not compared. Try again after this.
    Limited(Duration),
}

/// Wrong-token allowances of the clients that sent one recently.
#[derive(Default)]
pub struct TokenLimiter {
    /// Per client, the instant its wrong tokens are paid off: each adds [`INTERVAL`], time pays
    /// them back, and a client may try while it owes less than [`BURST`] intervals.
    clients: Mutex<HashMap<ClientKey, Instant>>,
}

impl TokenLimiter {
    pub fn new() -> TokenLimiter {
        TokenLimiter::default()
    }

    /// One attempt by `ip` at `now`; `compare` says whether its token is right, and is called
    /// only if the client is within its allowance.
    pub fn attempt(&self, ip: IpAddr, now: Instant, compare: impl FnOnce() -> bool) -> Verdict {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = ClientKey::of(ip);
        if !clients.contains_key(&key) && clients.len() >= MAX_CLIENTS {
            clients.retain(|_, paid_at| *paid_at > now);
            if clients.len() >= MAX_CLIENTS {
                key = ClientKey::Overflow;
            }
        }
        let owed = clients
            .get(&key)
            .map(|paid_at| paid_at.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO);
        let allowance = INTERVAL * (BURST - 1);
        if owed > allowance {
            return Verdict::Limited(owed - allowance);
        }
        if compare() {
            return Verdict::Allowed;
        }
        let paid_at = clients.entry(key).or_insert(now);
        *paid_at = (*paid_at).max(now) + INTERVAL;
        Verdict::Wrong
    }
}

/// A wait in whole seconds for `Retry-After`: rounded up, and at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_of_wrong_tokens_then_one_per_interval() {
        let limiter = TokenLimiter::new();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..BURST {
            assert_eq!(limiter.attempt(a, t0, || false), Verdict::Wrong);
        }
        assert_eq!(limiter.attempt(a, t0, || false), Verdict::Limited(INTERVAL));
        // Limited: not even a right token is compared, or the answer would tell a guess apart.
        let mut compared = false;
        assert!(matches!(
            limiter.attempt(a, t0, || {
                compared = true;
                true
            }),
            Verdict::Limited(_)
        ));
        assert!(!compared);
        // Time pays back one attempt per interval.
        let t1 = t0 + INTERVAL;
        assert_eq!(limiter.attempt(a, t1, || false), Verdict::Wrong);
        assert_eq!(limiter.attempt(a, t1, || false), Verdict::Limited(INTERVAL));
        assert_eq!(
            limiter.attempt(a, t1 + INTERVAL / 2, || true),
            Verdict::Limited(INTERVAL / 2)
        );
        assert_eq!(limiter.attempt(a, t1 + INTERVAL, || true), Verdict::Allowed);
        // A right token costs nothing.
        let t2 = t1 + INTERVAL * BURST;
        for _ in 0..100 {
            assert_eq!(limiter.attempt(a, t2, || true), Verdict::Allowed);
        }
    }

    #[test]
    fn clients_at_other_addresses_are_not_held_up() {
        let limiter = TokenLimiter::new();
        let now = Instant::now();
        for _ in 0..100 {
            limiter.attempt(ip("192.0.2.1"), now, || false);
            limiter.attempt(ip("2001:db8:1:2::1"), now, || false);
        }
        assert_eq!(limiter.attempt(ip("192.0.2.2"), now, || true), Verdict::Allowed);
        assert_eq!(limiter.attempt(ip("2001:db8:1:3::1"), now, || true), Verdict::Allowed);
        // The same /64, and the same IPv4 address written as IPv6, are the same client.
        assert!(matches!(
            limiter.attempt(ip("2001:db8:1:2::ffff"), now, || true),
            Verdict::Limited(_)
        ));
        assert!(matches!(
            limiter.attempt(ip("::ffff:192.0.2.1"), now, || true),
            Verdict::Limited(_)
        ));
    }

    #[test]
    fn a_flood_of_addresses_shares_one_allowance_once_the_map_is_full() {
        let limiter = TokenLimiter::new();
        let now = Instant::now();
        for i in 0..MAX_CLIENTS as u32 {
            let a = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            assert_eq!(limiter.attempt(a, now, || false), Verdict::Wrong);
        }
        let mut wrong = 0;
        for i in 0..100u32 {
            let a = IpAddr::from((0x0b00_0000u32 + i).to_be_bytes());
            if limiter.attempt(a, now, || false) == Verdict::Wrong {
                wrong += 1;
            }
        }
        assert_eq!(wrong, BURST);
        assert_eq!(limiter.clients.lock().unwrap().len(), MAX_CLIENTS + 1);
        // Once the old entries are paid off, they make room again.
        let later = now + INTERVAL * 2;
        assert_eq!(limiter.attempt(ip("198.51.100.7"), later, || false), Verdict::Wrong);
        assert_eq!(limiter.clients.lock().unwrap().len(), 2);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
