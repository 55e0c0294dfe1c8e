//! Sticky sessions across a switch (opt-in per service): a cookie cutover signs, naming the colour
//! a session began on and bound to the release that colour ran.
//!
//! The cookie's value is `<b|g>.<issued unix seconds>.<tag>`, the tag being HMAC-SHA256 (base64url,
//! no padding) over the service's name, the colour, the release running on that colour and the
//! issue time. The release is not spelled out in the cookie: it is bound by the tag, so a cookie
//! minted while a colour ran an earlier release no longer verifies once that colour runs another.
//! A cookie older than the window is expired.
//!
//! A valid cookie selects a colour only if that colour is live, or if it is the colour that was
//! live before the last promotion, its pin is still open (see [`Pin`]), it still runs the release
//! the pin names and it has a healthy instance. Everything else (no cookie, a malformed, forged,
//! expired or foreign one, a colour no longer pinned) goes to the live colour and gets a new
//! cookie. Cookies are attacker input: nothing here panics on them, and the tag is compared in
//! constant time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use ring::hmac;

use crate::table::{Colour, Service};

/// Cookies accepted up to this far in the future (clock steps between nodes or after a restart).
const FUTURE_SKEW_S: u64 = 60;

/// Occurrences of the cookie looked at in one request (a stale cookie of a parent domain or path
/// may come before ours); the first that verifies wins.
const MAX_CANDIDATES: usize = 4;

/// A service's affinity settings and counters. Shared (one `Arc`) by every table the service is in.
pub struct Affinity {
    cookie: Box<str>,
    window: Duration,
    key: hmac::Key,
    counters: Counters,
    /// The application's own session cookie, followed too (see [`AppSessions`]).
    app: Option<AppSessions>,
}

/// Sessions of the application's own cookie (`app_cookie`): which colour first saw each, for as
/// long as the window since its last request. Keys are keyed hashes of the cookie's value, never
/// the value itself. At most [`AppSessions::CAP`] entries: when full, entries older than the
/// window are swept (at most once a second); a session that still finds no room is not followed
/// (it goes to the live colour).
pub struct AppSessions {
    name: Box<str>,
    hasher: std::collections::hash_map::RandomState,
    map: std::sync::Mutex<AppMap>,
}

#[derive(Default)]
struct AppMap {
    entries: std::collections::HashMap<u64, AppEntry>,
    last_sweep: u64,
}

struct AppEntry {
    colour: Colour,
    release: Option<std::sync::Arc<str>>,
    /// Unix seconds of its last request (or of the response that set it).
    seen: u64,
}

impl AppSessions {
    pub const CAP: usize = 100_000;

    fn key(&self, value: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AppMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AppMap {
    /// Inserts unless full after a sweep of entries older than `window_s`.
    fn insert(&mut self, key: u64, entry: AppEntry, window_s: u64) {
        if self.entries.len() >= AppSessions::CAP && !self.entries.contains_key(&key) {
            if entry.seen > self.last_sweep {
                self.last_sweep = entry.seen;
                let now = entry.seen;
                self.entries.retain(|_, e| now.saturating_sub(e.seen) < window_s);
            }
            if self.entries.len() >= AppSessions::CAP {
                return;
            }
        }
        self.entries.insert(key, entry);
    }
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity")
            .field("cookie", &self.cookie)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Counters {
    pinned: [AtomicU64; 2],
    minted: AtomicU64,
    ignored: [AtomicU64; 4],
}

/// Why a cookie presented by a client was not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Not of the form `<b|g>.<seconds>.<tag>`.
    Malformed,
    /// The tag does not verify: forged, for another service, or minted while the colour ran
    /// another release (or with another key).
    Invalid,
    /// Older than the window (or too far in the future).
    Expired,
    /// Valid, but for a colour that is neither live nor pinned any more.
    Unpinned,
}

impl Ignored {
    pub const ALL: [Ignored; 4] = [
        Ignored::Malformed,
        Ignored::Invalid,
        Ignored::Expired,
        Ignored::Unpinned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::Malformed => "malformed",
            Ignored::Invalid => "invalid",
            Ignored::Expired => "expired",
            Ignored::Unpinned => "unpinned",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one service's affinity, read at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffinitySnapshot {
    /// Requests sent to blue, green by a valid cookie for a colour that was not live (pinned).
    pub pinned: [u64; 2],
    /// Cookies set on responses (new sessions, refreshed ones).
    pub minted: u64,
    /// Cookies presented and not followed, in the order of [`Ignored::ALL`].
    pub ignored: [u64; 4],
}

/// The previously live colour of a service, kept for the sessions that began on it until
/// `until_ms` ([`crate::table::now_ms`]), while it runs `release`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub colour: Colour,
    pub release: Option<std::sync::Arc<str>>,
    pub(crate) until_ms: u64,
}

impl Pin {
    /// How long the pin has left (zero once over).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.until_ms.saturating_sub(crate::table::now_ms()))
    }
}

/// What the cookies of a request say, before any routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Presented {
    None,
    Ignored(Ignored),
    Valid { colour: Colour, issued: u64 },
}

/// How affinity routed one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) colour: Colour,
    /// Sent to a colour that is not live because of its cookie.
    pub(crate) pinned: bool,
    pub(crate) ignored: Option<Ignored>,
    /// Set a new cookie for `colour` on the response.
    pub(crate) mint: bool,
}

/// Whether `name` may be a cookie's name: an HTTP token (RFC 6265 §4.1.1, RFC 9110 §5.6.2).
pub fn valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Affinity {
    /// `cookie` must be a valid cookie name ([`valid_cookie_name`]), `window` above zero; `key`
    /// is the HMAC key, shared by every node that serves the service.
    pub fn new(cookie: &str, window: Duration, key: &[u8]) -> Result<Affinity, String> {
        if !valid_cookie_name(cookie) {
            return Err(format!("{cookie:?} is not a valid cookie name"));
        }
        if window.is_zero() {
            return Err("the affinity window must be longer than 0".into());
        }
        if key.len() < 16 {
            return Err("the affinity key must be at least 16 bytes".into());
        }
        Ok(Affinity {
            cookie: cookie.into(),
            window,
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            counters: Counters::default(),
            app: None,
        })
    }

    /// Follows the application's session cookie `name` too: a session whose cookie the old
    /// colour saw first stays there while it is pinned, as with cutover's own cookie.
    pub fn with_app_cookie(mut self, name: &str) -> Result<Affinity, String> {
        if !valid_cookie_name(name) {
            return Err(format!("{name:?} is not a valid cookie name"));
        }
        self.app = Some(AppSessions {
            name: name.into(),
            hasher: Default::default(),
            map: Default::default(),
        });
        Ok(self)
    }

    /// The application's sessions being followed, with `app_cookie`.
    pub fn app_sessions(&self) -> Option<&AppSessions> {
        self.app.as_ref()
    }

    /// Routes a live request by cutover's cookie, or failing a valid one, by the application's
    /// session cookie (with `app_cookie`).
    pub(crate) fn route(&self, svc: &Service, headers: &HeaderMap, now: u64, now_ms: u64) -> Decision {
        let presented = self.presented(svc, headers, now);
        let d = self.decide(svc, presented, now, now_ms);
        match (&self.app, presented) {
            (Some(app), Presented::None | Presented::Ignored(_)) => match cookie_value(headers, &app.name) {
                Some(value) => self.by_app_cookie(app, svc, app.key(value), d, now, now_ms),
                None => d,
            },
            _ => d,
        }
    }

    /// `d` is where the request goes without the application's cookie (the live colour).
    fn by_app_cookie(
        &self,
        app: &AppSessions,
        svc: &Service,
        key: u64,
        d: Decision,
        now: u64,
        now_ms: u64,
    ) -> Decision {
        let window_s = self.window.as_secs().max(1);
        // Where a new session goes: the live colour, or its draw during a gradual switch.
        let live = d.colour;
        let mut map = app.lock();
        if let Some(e) = map.entries.get_mut(&key) {
            if now.saturating_sub(e.seen) < window_s && e.release == svc.pool(e.colour).version {
                if svc.takes_live(e.colour) {
                    e.seen = now;
                    return Decision { colour: e.colour, ..d };
                }
                if pinned(svc, e.colour, now_ms) {
                    e.seen = now;
                    return Decision {
                        colour: e.colour,
                        pinned: true,
                        ..d
                    };
                }
            }
            // Expired, or its colour is neither live nor pinned: the session moves to live.
            *e = AppEntry {
                colour: live,
                release: svc.pool(live).version.clone(),
                seen: now,
            };
            return d;
        }
        let entry = AppEntry {
            colour: live,
            release: svc.pool(live).version.clone(),
            seen: now,
        };
        map.insert(key, entry, window_s);
        d
    }

    /// A response of `colour` set the application's session cookie: that colour saw it first,
    /// unless a request carried it before.
    pub(crate) fn learn_app_cookies(&self, svc: &Service, colour: Colour, response: &HeaderMap, now: u64) {
        let Some(app) = &self.app else { return };
        for v in response.get_all(header::SET_COOKIE) {
            let first = v.as_bytes().split(|&b| b == b';').next().unwrap_or_default();
            let Some(eq) = first.iter().position(|&b| b == b'=') else {
                continue;
            };
            if trim(&first[..eq]) != app.name.as_bytes() {
                continue;
            }
            let value = trim(&first[eq + 1..]);
            if value.is_empty() {
                continue; // a deletion
            }
            let key = app.key(value);
            let mut map = app.lock();
            if !map.entries.contains_key(&key) {
                let entry = AppEntry {
                    colour,
                    release: svc.pool(colour).version.clone(),
                    seen: now,
                };
                map.insert(key, entry, self.window.as_secs().max(1));
            }
        }
    }

    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn snapshot(&self) -> AffinitySnapshot {
        let c = &self.counters;
        AffinitySnapshot {
            pinned: [c.pinned[0].load(Ordering::Relaxed), c.pinned[1].load(Ordering::Relaxed)],
            minted: c.minted.load(Ordering::Relaxed),
            ignored: std::array::from_fn(|i| c.ignored[i].load(Ordering::Relaxed)),
        }
    }

    fn tag(&self, service: &str, colour: Colour, release: Option<&str>, issued: u64) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"cutover-affinity-v1\0");
        ctx.update(service.as_bytes());
        ctx.update(b"\0");
        ctx.update(colour.as_str().as_bytes());
        ctx.update(b"\0");
        // `None` (no release recorded) and `Some("")` must not sign alike.
        match release {
            Some(r) => {
                ctx.update(b"r");
                ctx.update(r.as_bytes());
            }
            None => ctx.update(b"-"),
        }
        ctx.update(b"\0");
        ctx.update(&issued.to_be_bytes());
        ctx.sign()
    }

    /// The cookie's value for a session of `colour` (running `release`) begun at `issued`.
    pub fn mint_value(&self, service: &str, colour: Colour, release: Option<&str>, issued: u64) -> String {
        let tag = self.tag(service, colour, release, issued);
        let mut out = String::with_capacity(2 + 20 + 44);
        out.push(colour_letter(colour));
        out.push('.');
        out.push_str(&issued.to_string());
        out.push('.');
        base64url(tag.as_ref(), &mut out);
        out
    }

    /// The `Set-Cookie` header for `value`; `Secure` on a TLS listener.
    pub(crate) fn set_cookie(&self, value: &str, secure: bool) -> Option<HeaderValue> {
        let mut s = String::with_capacity(self.cookie.len() + value.len() + 64);
        s.push_str(&self.cookie);
        s.push('=');
        s.push_str(value);
        s.push_str("; Path=/; Max-Age=");
        s.push_str(&self.window.as_secs().max(1).to_string());
        s.push_str("; HttpOnly; SameSite=Lax");
        if secure {
            s.push_str("; Secure");
        }
        HeaderValue::from_str(&s).ok()
    }

    /// Verifies one cookie value for `svc`, at `now` (unix seconds).
    pub(crate) fn verify(&self, svc: &Service, value: &[u8], now: u64) -> Presented {
        let mut parts = value.splitn(3, |&b| b == b'.');
        let (Some(c), Some(issued), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Presented::Ignored(Ignored::Malformed);
        };
        let colour = match c {
            b"b" => Colour::Blue,
            b"g" => Colour::Green,
            _ => return Presented::Ignored(Ignored::Malformed),
        };
        if issued.is_empty() || issued.len() > 19 || !issued.iter().all(u8::is_ascii_digit) || tag.len() != 43 {
            return Presented::Ignored(Ignored::Malformed);
        }
        let issued = issued.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        let release = svc.pool(colour).version.as_deref();
        let expected = self.tag(&svc.name, colour, release, issued);
        let mut encoded = String::with_capacity(44);
        base64url(expected.as_ref(), &mut encoded);
        // Constant time in the tag's content: every byte is compared.
        let diff = encoded
            .as_bytes()
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Presented::Ignored(Ignored::Invalid);
        }
        let window = self.window.as_secs().max(1);
        if issued > now.saturating_add(FUTURE_SKEW_S) || now.saturating_sub(issued) >= window {
            return Presented::Ignored(Ignored::Expired);
        }
        Presented::Valid { colour, issued }
    }

    /// Finds this service's cookie among the request's `Cookie` headers and verifies it.
    pub(crate) fn presented(&self, svc: &Service, headers: &HeaderMap, now: u64) -> Presented {
        let mut seen = Presented::None;
        let mut looked = 0;
        for value in headers.get_all(header::COOKIE) {
            for pair in value.as_bytes().split(|&b| b == b';') {
                let pair = trim(pair);
                let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                    continue;
                };
                if trim(&pair[..eq]) != self.cookie.as_bytes() {
                    continue;
                }
                let mut v = trim(&pair[eq + 1..]);
                if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
                    v = &v[1..v.len() - 1];
                }
                match self.verify(svc, v, now) {
                    valid @ Presented::Valid { .. } => return valid,
                    // The most telling reason wins: a well-formed cookie's over a malformed one's.
                    Presented::Ignored(why) => {
                        seen = match seen {
                            Presented::Ignored(before) if before.index() > why.index() => seen,
                            _ => Presented::Ignored(why),
                        }
                    }
                    Presented::None => {}
                }
                looked += 1;
                if looked == MAX_CANDIDATES {
                    return seen;
                }
            }
        }
        seen
    }

    /// Routes a live request of `svc` by its cookie: the live colour, or the pinned one.
    pub(crate) fn decide(&self, svc: &Service, presented: Presented, now: u64, now_ms: u64) -> Decision {
        // A new session goes to the live colour, or during a gradual switch, to the colour its
        // draw gives it (`Service::live_colour`), and keeps it.
        let to_live = |ignored| Decision {
            colour: svc.live_colour(),
            pinned: false,
            ignored,
            mint: true,
        };
        match presented {
            Presented::None => to_live(None),
            Presented::Ignored(why) => to_live(Some(why)),
            Presented::Valid { colour, issued } => {
                // Past half the window a session's cookie is renewed, so that an active session
                // keeps a valid one.
                let refresh = now.saturating_sub(issued) >= self.window.as_secs().max(1) / 2;
                if svc.takes_live(colour) {
                    return Decision {
                        colour,
                        pinned: false,
                        ignored: None,
                        mint: refresh,
                    };
                }
                if pinned(svc, colour, now_ms) {
                    Decision {
                        colour,
                        pinned: true,
                        ignored: None,
                        mint: refresh,
                    }
                } else {
                    to_live(Some(Ignored::Unpinned))
                }
            }
        }
    }

    /// Counts a routed request's decision.
    pub(crate) fn count(&self, d: &Decision) {
        let c = &self.counters;
        if d.pinned {
            c.pinned[colour_index(d.colour)].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(why) = d.ignored {
            c.ignored[why.index()].fetch_add(1, Ordering::Relaxed);
        }
        if d.mint {
            c.minted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `colour` of `svc` is pinned now: its pin is open, names the release the colour runs,
/// and the colour has a healthy instance.
fn pinned(svc: &Service, colour: Colour, now_ms: u64) -> bool {
    let pool = svc.pool(colour);
    svc.pin.as_ref().is_some_and(|p| {
        p.colour == colour
            && p.until_ms > now_ms
            && p.release == pool.version
            && pool.instances.iter().any(|i| i.healthy)
    })
}

/// The value of the first cookie named `name` in the request's `Cookie` headers.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for value in headers.get_all(header::COOKIE) {
        for pair in value.as_bytes().split(|&b| b == b';') {
            let pair = trim(pair);
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if trim(&pair[..eq]) == name.as_bytes() {
                let v = trim(&pair[eq + 1..]);
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
    }
    None
}

fn colour_index(c: Colour) -> usize {
    match c {
        Colour::Blue => 0,
        Colour::Green => 1,
    }
}

fn colour_letter(c: Colour) -> char {
    match c {
        Colour::Blue => 'b',
        Colour::Green => 'g',
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Base64url without padding (RFC 4648 §5), appended to `out`.
fn base64url(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
}

/// 32 bytes from the system's secure random source, for a key.
pub fn random_key() -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(key)
}

/// The current time in unix seconds (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
