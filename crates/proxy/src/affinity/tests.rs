use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, COOKIE};

use super::*;
use crate::table::{now_ms, Instance, Pool, Service};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_800_000_000;

fn affinity() -> Affinity {
    Affinity::new("cutover_session", Duration::from_secs(900), KEY).unwrap()
}

/// `web`: blue runs v1, green v2, green live; blue pinned for a minute when `pinned`.
fn service(pinned: bool) -> Service {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut s = Service::new("web");
    s.blue = Pool::new(Some("v1"), vec![Instance::new(addr)]);
    s.green = Pool::new(Some("v2"), vec![Instance::new(addr)]);
    s.active = Colour::Green;
    s.affinity = Some(Arc::new(affinity()));
    if pinned {
        s.pin = Some(Pin {
            colour: Colour::Blue,
            release: Some(Arc::from("v1")),
            until_ms: now_ms() + 60_000,
        });
    }
    s
}

fn cookies(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(COOKIE, HeaderValue::from_str(v).unwrap());
    h
}

fn route(s: &Service, header: &str, now: u64) -> Decision {
    let a = s.affinity.as_ref().unwrap();
    let presented = a.presented(s, &cookies(header), now);
    a.decide(s, presented, now, now_ms())
}

#[test]
fn a_minted_cookie_verifies_for_its_colour_and_release_only() {
    let s = service(true);
    let a = affinity();
    let blue = a.mint_value("web", Colour::Blue, Some("v1"), NOW);
    assert!(blue.starts_with("b.1800000000."), "{blue}");
    assert_eq!(
        a.verify(&s, blue.as_bytes(), NOW + 10),
        Presented::Valid {
            colour: Colour::Blue,
            issued: NOW
        }
    );

    // Blue now runs another release: the cookie is foreign.
    let mut replaced = s.clone();
    replaced.blue = Pool::new(Some("v3"), vec![]);
    assert_eq!(
        a.verify(&replaced, blue.as_bytes(), NOW + 10),
        Presented::Ignored(Ignored::Invalid)
    );
    // Another service's cookie, or one signed with another key.
    let other = a.mint_value("shop", Colour::Blue, Some("v1"), NOW);
    assert_eq!(
        a.verify(&s, other.as_bytes(), NOW),
        Presented::Ignored(Ignored::Invalid)
    );
    let other_key = Affinity::new(
        "cutover_session",
        Duration::from_secs(900),
        b"another key of 32 bytes, or so..",
    )
    .unwrap();
    let foreign = other_key.mint_value("web", Colour::Blue, Some("v1"), NOW);
    assert_eq!(
        a.verify(&s, foreign.as_bytes(), NOW),
        Presented::Ignored(Ignored::Invalid)
    );
}

#[test]
fn forged_cookies_are_ignored() {
    let s = service(true);
    let a = affinity();
    let blue = a.mint_value("web", Colour::Blue, Some("v1"), NOW);
    // The colour changed, the time changed, one character of the tag changed.
    let recoloured = format!("g{}", &blue[1..]);
    assert_eq!(
        a.verify(&s, recoloured.as_bytes(), NOW),
        Presented::Ignored(Ignored::Invalid)
    );
    let retimed = blue.replacen("1800000000", "1800000001", 1);
    assert_eq!(
        a.verify(&s, retimed.as_bytes(), NOW),
        Presented::Ignored(Ignored::Invalid)
    );
    let mut flipped = blue.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(a.verify(&s, &flipped, NOW), Presented::Ignored(Ignored::Invalid));
}

#[test]
fn expired_and_future_cookies_are_ignored() {
    let s = service(true);
    let a = affinity();
    let blue = a.mint_value("web", Colour::Blue, Some("v1"), NOW);
    assert!(matches!(
        a.verify(&s, blue.as_bytes(), NOW + 899),
        Presented::Valid { .. }
    ));
    assert_eq!(
        a.verify(&s, blue.as_bytes(), NOW + 900),
        Presented::Ignored(Ignored::Expired)
    );
    assert_eq!(
        a.verify(&s, blue.as_bytes(), NOW - 61),
        Presented::Ignored(Ignored::Expired)
    );
}

#[test]
fn garbage_never_panics_and_is_malformed() {
    let s = service(true);
    let a = affinity();
    let long = "9".repeat(40);
    let tag = "A".repeat(43);
    for v in [
        "",
        ".",
        "..",
        "b",
        "b.",
        "b.1.",
        "x.1800000000.AAAA",
        "b..AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "b.-1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &format!("b.{long}.{tag}"),
        &format!("b.18446744073709551615.{tag}"),
        "b.1800000000.é",
    ] {
        let got = a.verify(&s, v.as_bytes(), NOW);
        assert!(matches!(got, Presented::Ignored(_)), "{v:?}: {got:?}");
    }
    assert_eq!(
        a.verify(&s, b"b.1800000000.short", NOW),
        Presented::Ignored(Ignored::Malformed)
    );
    // Non-UTF-8 bytes in a header value.
    let mut h = HeaderMap::new();
    h.insert(
        COOKIE,
        HeaderValue::from_bytes(b"cutover_session=\xff\xfe.1.\x80").unwrap(),
    );
    assert_eq!(a.presented(&s, &h, NOW), Presented::Ignored(Ignored::Malformed));
}

#[test]
fn the_cookie_is_found_among_others_and_across_headers() {
    let s = service(true);
    let a = affinity();
    let blue = a.mint_value("web", Colour::Blue, Some("v1"), NOW);
    let header = format!("session_id=abc; cutover_session={blue}; theme=dark");
    assert!(matches!(
        a.presented(&s, &cookies(&header), NOW),
        Presented::Valid { .. }
    ));
    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_static("a=1"));
    h.append(
        COOKIE,
        HeaderValue::from_str(&format!("cutover_session=\"{blue}\"")).unwrap(),
    );
    assert!(matches!(a.presented(&s, &h, NOW), Presented::Valid { .. }));
    // A stale cookie before the valid one does not hide it.
    let header = format!("cutover_session=b.1.{}; cutover_session={blue}", "A".repeat(43));
    assert!(matches!(
        a.presented(&s, &cookies(&header), NOW),
        Presented::Valid { .. }
    ));
    assert_eq!(a.presented(&s, &cookies("xcutover_session=1"), NOW), Presented::None);
    assert_eq!(a.presented(&s, &HeaderMap::new(), NOW), Presented::None);
}

#[test]
fn routing_follows_only_a_valid_cookie_for_a_live_or_pinned_colour() {
    let a = affinity();
    let blue = format!("cutover_session={}", a.mint_value("web", Colour::Blue, Some("v1"), NOW));
    let green = format!(
        "cutover_session={}",
        a.mint_value("web", Colour::Green, Some("v2"), NOW)
    );

    let pinned = service(true);
    let d = route(&pinned, &blue, NOW + 5);
    assert_eq!(
        (d.colour, d.pinned, d.mint, d.ignored),
        (Colour::Blue, true, false, None)
    );
    let d = route(&pinned, &green, NOW + 5);
    assert_eq!(
        (d.colour, d.pinned, d.mint, d.ignored),
        (Colour::Green, false, false, None)
    );
    let d = route(&pinned, "", NOW + 5);
    assert_eq!((d.colour, d.mint, d.ignored), (Colour::Green, true, None));
    let forged = blue.replace("b.", "g.");
    let d = route(&pinned, &forged, NOW + 5);
    assert_eq!(
        (d.colour, d.mint, d.ignored),
        (Colour::Green, true, Some(Ignored::Invalid))
    );
    let d = route(&pinned, &blue, NOW + 900);
    assert_eq!(
        (d.colour, d.mint, d.ignored),
        (Colour::Green, true, Some(Ignored::Expired))
    );
    // Past half the window a valid cookie is renewed.
    let d = route(&pinned, &blue, NOW + 450);
    assert_eq!((d.colour, d.pinned, d.mint), (Colour::Blue, true, true));

    // No pin, a pin run out, a pinned colour without a healthy instance: the live colour.
    let unpinned = service(false);
    let d = route(&unpinned, &blue, NOW + 5);
    assert_eq!(
        (d.colour, d.mint, d.ignored),
        (Colour::Green, true, Some(Ignored::Unpinned))
    );
    let mut over = service(true);
    over.pin.as_mut().unwrap().until_ms = now_ms().saturating_sub(1);
    assert_eq!(route(&over, &blue, NOW + 5).colour, Colour::Green);
    let mut sick = service(true);
    let mut inst = Instance::new("127.0.0.1:1".parse().unwrap());
    inst.healthy = false;
    sick.blue = Pool::new(Some("v1"), vec![inst]);
    assert_eq!(route(&sick, &blue, NOW + 5).colour, Colour::Green);
    // A pin naming another release than the colour runs is not followed.
    let mut other = service(true);
    other.pin.as_mut().unwrap().release = Some(Arc::from("v0"));
    assert_eq!(route(&other, &blue, NOW + 5).colour, Colour::Green);
}

#[test]
fn set_cookie_has_the_attributes() {
    let a = affinity();
    let v = a.set_cookie("b.1.x", false).unwrap();
    assert_eq!(v, "cutover_session=b.1.x; Path=/; Max-Age=900; HttpOnly; SameSite=Lax");
    let v = a.set_cookie("b.1.x", true).unwrap();
    assert!(v.to_str().unwrap().ends_with("; Secure"));
}

#[test]
fn cookie_names_and_windows_are_checked() {
    for bad in ["", "a b", "a;b", "a=b", "ä", "a,b", "(x)"] {
        assert!(!valid_cookie_name(bad), "{bad:?}");
        assert!(Affinity::new(bad, Duration::from_secs(1), KEY).is_err());
    }
    assert!(valid_cookie_name("cutover_session"));
    assert!(Affinity::new("c", Duration::ZERO, KEY).is_err());
    assert!(Affinity::new("c", Duration::from_secs(1), b"short").is_err());
}

#[test]
fn base64url_matches_rfc_4648_vectors() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        let mut out = String::new();
        base64url(input.as_bytes(), &mut out);
        assert_eq!(out, want);
    }
    let mut out = String::new();
    base64url(&[0xfb, 0xff], &mut out);
    assert_eq!(out, "-_8");
}

fn with_app(pinned: bool) -> Service {
    let mut s = service(pinned);
    s.affinity = Some(Arc::new(affinity().with_app_cookie("session_id").unwrap()));
    s
}

fn set_cookie(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.append(http::header::SET_COOKIE, HeaderValue::from_static("theme=dark"));
    h.append(http::header::SET_COOKIE, HeaderValue::from_str(v).unwrap());
    h
}

fn app_route(s: &Service, header: &str, now: u64) -> Decision {
    s.affinity.as_ref().unwrap().route(s, &cookies(header), now, now_ms())
}

#[test]
fn the_application_cookie_keeps_the_colour_that_first_saw_it() {
    let s = with_app(true);
    let a = s.affinity.as_ref().unwrap();
    // Blue's response set the session: it stays on blue while blue is pinned.
    a.learn_app_cookies(&s, Colour::Blue, &set_cookie("session_id=abc; Path=/; HttpOnly"), NOW);
    let d = app_route(&s, "theme=dark; session_id=abc", NOW + 1);
    assert_eq!((d.colour, d.pinned, d.mint), (Colour::Blue, true, true));
    // A later Set-Cookie of the same session from green does not move it.
    a.learn_app_cookies(&s, Colour::Green, &set_cookie("session_id=abc"), NOW + 2);
    assert_eq!(app_route(&s, "session_id=abc", NOW + 3).colour, Colour::Blue);
    // A session first seen now goes live and stays there.
    assert_eq!(app_route(&s, "session_id=new", NOW + 3).colour, Colour::Green);
    assert_eq!(app_route(&s, "session_id=new", NOW + 4).colour, Colour::Green);
    // A valid cutover cookie goes first.
    let green = format!(
        "cutover_session={}",
        a.mint_value("web", Colour::Green, Some("v2"), NOW)
    );
    let d = app_route(&s, &format!("{green}; session_id=abc"), NOW + 5);
    assert_eq!((d.colour, d.pinned), (Colour::Green, false));
    // Idle longer than the window: the session is new again, on the live colour.
    assert_eq!(app_route(&s, "session_id=abc", NOW + 3 + 900).colour, Colour::Green);
    assert_eq!(app_route(&s, "session_id=abc", NOW + 3 + 901).colour, Colour::Green);
    assert_eq!(a.app_sessions().unwrap().len(), 2);
    // The raw session ids are not what is kept: only hashes (checked by type: u64 keys).

    // Without a pin, the blue session moves to green for good.
    let s = with_app(false);
    let a = s.affinity.as_ref().unwrap();
    a.learn_app_cookies(&s, Colour::Blue, &set_cookie("session_id=abc"), NOW);
    assert_eq!(app_route(&s, "session_id=abc", NOW + 1).colour, Colour::Green);
    // A deletion (empty value) is not a session.
    a.learn_app_cookies(&s, Colour::Blue, &set_cookie("session_id=; Max-Age=0"), NOW);
    assert_eq!(a.app_sessions().unwrap().len(), 1);
}

#[test]
fn the_application_sessions_are_bounded() {
    let mut map = AppMap::default();
    let entry = |seen| AppEntry {
        colour: Colour::Blue,
        release: None,
        seen,
    };
    for k in 0..AppSessions::CAP as u64 {
        map.insert(k, entry(NOW), 60);
    }
    // Full of fresh entries: a new one finds no room.
    map.insert(u64::MAX, entry(NOW + 1), 60);
    assert_eq!(map.entries.len(), AppSessions::CAP);
    assert!(!map.entries.contains_key(&u64::MAX));
    // Once they are older than the window, they are swept to make room.
    map.insert(u64::MAX, entry(NOW + 60), 60);
    assert_eq!(map.entries.len(), 1);
    assert!(map.entries.contains_key(&u64::MAX));
}

/// Random bytes and random mutations of a real cookie, as `Cookie` headers: never a panic, and
/// never a valid cookie but the real one.
#[test]
fn random_cookies_never_panic_nor_verify() {
    let s = with_app(true);
    let a = s.affinity.as_ref().unwrap();
    let real = a.mint_value("web", Colour::Blue, Some("v1"), NOW);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let mut v: Vec<u8> = if i % 2 == 0 {
            (0..next() % 80).map(|_| (next() % 256) as u8).collect()
        } else {
            let mut v = real.clone().into_bytes();
            let at = (next() as usize) % v.len();
            v[at] = (next() % 256) as u8;
            v
        };
        v.retain(|&b| b != b'\n' && b != b'\r' && b != 0 && b != 0x7f);
        let Ok(value) = HeaderValue::from_bytes(&[b"session_id=x; cutover_session=".as_slice(), &v].concat()) else {
            continue;
        };
        let mut h = HeaderMap::new();
        h.insert(COOKIE, value);
        let got = a.presented(&s, &h, NOW + 1);
        if v != real.as_bytes() {
            assert!(
                !matches!(got, Presented::Valid { .. }),
                "{:?}",
                String::from_utf8_lossy(&v)
            );
        }
        let _ = a.route(&s, &h, NOW + 1, now_ms());
    }
}
