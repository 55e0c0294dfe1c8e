use std::path::Path;

use cutover_proxy::{ProxyConfig, RouteTable, Service};

use super::*;

/// A self-signed certificate for `name` valid until `not_after` (unix seconds), as PEM files
/// `<stem>.pem` and `<stem>.key` in `dir`; returns the certificate as loaded.
fn write_cert(dir: &Path, stem: &str, name: &str, not_after: i64) -> TlsCertificate {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    let ((y, m, d), _) = crate::process::utc_civil(not_after as u64);
    params.not_after =
        rcgen::date_time_ymd(y as i32, m as u8, d as u8) + Duration::from_secs(not_after.rem_euclid(86_400) as u64);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    TlsCertificate::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
}

fn files(dir: &Path, stem: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

const YEAR_2031: i64 = 1_935_720_121; // 2031-05-05 04:02:01 UTC
const YEAR_2055: i64 = 2_691_014_400; // 2055-04-10 00:00:00 UTC

#[test]
fn the_expiry_is_read_in_both_time_forms_and_garbage_gives_none() {
    let dir = tempfile::tempdir().unwrap();
    for (stem, when) in [("utc-time", YEAR_2031), ("generalized-time", YEAR_2055)] {
        let cert = write_cert(dir.path(), stem, "a.example", when);
        assert_eq!(
            not_after(cert.leaf_der()),
            Some(UNIX_EPOCH + Duration::from_secs(when as u64)),
            "{stem}"
        );
        // Every truncation and a flipped length byte: no panic, no date from a broken input.
        let der = cert.leaf_der();
        for n in 0..der.len() {
            assert_eq!(not_after(&der[..n]), None, "{stem}: {n} bytes");
        }
        let mut bad = der.to_vec();
        bad[1] ^= 0x7f;
        let _ = not_after(&bad);
    }
    assert_eq!(not_after(b""), None);
    assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(
        format_utc(UNIX_EPOCH + Duration::from_secs(YEAR_2031 as u64)),
        "2031-05-05 04:02:01 UTC"
    );
    for days in [0u64, 59, 365 * 30 + 7, 30_000] {
        let ((y, m, d), _) = crate::process::utc_civil(days * 86_400);
        assert_eq!(days_from_civil(y, m as u32, d as u32), days as i64);
    }
}

fn proxy() -> Arc<Proxy> {
    Arc::new(
        Proxy::start(
            ProxyConfig::default(),
            RouteTable::new(vec![Service::new("web")]).unwrap(),
        )
        .unwrap(),
    )
}

fn sources(dir: &Path) -> Vec<Source> {
    vec![
        Source {
            name: "default".into(),
            key: "server.tls".into(),
            hosts: vec![],
            files: files(dir, "default"),
            admin: false,
        },
        Source {
            name: "web".into(),
            key: "services.web.tls".into(),
            hosts: vec!["a.example".into()],
            files: files(dir, "web"),
            admin: false,
        },
    ]
}

fn served(proxy: &Proxy, name: &str) -> TlsCertificate {
    proxy.certificates().choose(Some(name)).cloned().expect("a certificate")
}

#[test]
fn a_broken_file_keeps_its_certificate_and_leaves_the_others_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = write_cert(dir.path(), "default", "default.example", YEAR_2031);
    let a = write_cert(dir.path(), "web", "a.example", YEAR_2031);
    let proxy = proxy();
    let certs = Certificates::load(sources(dir.path())).unwrap();
    certs.install(proxy.clone()).unwrap();
    assert!(served(&proxy, "a.example").same_chain(&a));
    assert!(served(&proxy, "other.example").same_chain(&d));

    // Unchanged files are not read again.
    let before = proxy.certificates();
    let views = certs.reload(false);
    assert!(Arc::ptr_eq(&before, &proxy.certificates()), "nothing stored");
    assert!(views.iter().all(|v| v.error.is_none() && v.errors == 0));

    // The web certificate's file broken: web keeps `a`, the default is untouched, the error
    // names the file.
    std::fs::write(dir.path().join("web.pem"), "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let views = certs.reload(false);
    let web = views.iter().find(|v| v.name == "web").unwrap();
    let error = web.error.as_deref().expect("an error");
    assert!(error.contains("web.pem"), "{error}");
    assert_eq!(web.errors, 1);
    assert!(views.iter().find(|v| v.name == "default").unwrap().error.is_none());
    assert!(served(&proxy, "a.example").same_chain(&a));
    assert!(served(&proxy, "other.example").same_chain(&d));
    // Not retried while the files stay as they are.
    assert_eq!(certs.reload(false).iter().find(|v| v.name == "web").unwrap().errors, 1);
    // A forced reload tries again (and fails again).
    assert_eq!(certs.reload(true).iter().find(|v| v.name == "web").unwrap().errors, 2);

    // A key that is not the certificate's: both files named.
    let b = write_cert(dir.path(), "web", "a.example", YEAR_2031);
    let (_, other) = (
        write_cert(dir.path(), "spare", "a.example", YEAR_2031),
        dir.path().join("spare.key"),
    );
    std::fs::copy(&other, dir.path().join("web.key")).unwrap();
    let views = certs.reload(true);
    let error = views
        .iter()
        .find(|v| v.name == "web")
        .unwrap()
        .error
        .clone()
        .expect("an error");
    assert!(
        error.contains("web.pem") && error.contains("web.key") && error.contains("does not belong"),
        "{error}"
    );
    assert!(served(&proxy, "a.example").same_chain(&a));

    // Repaired: the new certificate is served, the error cleared, the count kept.
    let b2 = write_cert(dir.path(), "web", "a.example", YEAR_2055);
    assert!(!b2.same_chain(&b));
    let views = certs.reload(false);
    let web = views.iter().find(|v| v.name == "web").unwrap();
    assert_eq!(web.error, None);
    assert_eq!(web.errors, 3);
    assert_eq!(web.not_after, Some(YEAR_2055 as u64 * 1000));
    assert!(served(&proxy, "a.example").same_chain(&b2));
    assert!(served(&proxy, "other.example").same_chain(&d));

    // A file removed: an error, the certificate kept.
    std::fs::remove_file(dir.path().join("default.key")).unwrap();
    let views = certs.reload(false);
    let error = views
        .iter()
        .find(|v| v.name == "default")
        .unwrap()
        .error
        .clone()
        .expect("an error");
    assert!(
        error.contains("default.key") && error.contains("cannot read"),
        "{error}"
    );
    assert!(served(&proxy, "other.example").same_chain(&d));
    proxy.shutdown();
}

#[test]
fn a_valid_certificate_is_not_replaced_by_an_expired_one() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "default", "default.example", YEAR_2031);
    let a = write_cert(dir.path(), "web", "a.example", YEAR_2031);
    let proxy = proxy();
    let certs = Certificates::load(sources(dir.path())).unwrap();
    certs.install(proxy.clone()).unwrap();
    write_cert(dir.path(), "web", "a.example", 1_600_000_000); // 2020-09-13
    let views = certs.reload(false);
    let error = views
        .iter()
        .find(|v| v.name == "web")
        .unwrap()
        .error
        .clone()
        .expect("an error");
    assert!(error.contains("expired on 2020-09-13"), "{error}");
    assert!(served(&proxy, "a.example").same_chain(&a));
    proxy.shutdown();
}

#[test]
fn at_start_a_certificate_that_does_not_load_is_an_error_naming_its_file() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "default", "default.example", YEAR_2031);
    write_cert(dir.path(), "web", "a.example", YEAR_2031);
    std::fs::write(dir.path().join("web.key"), "").unwrap();
    let proxy = proxy();
    let e = Certificates::load(sources(dir.path())).err().expect("an error");
    assert_eq!(e.key, "services.web.tls");
    assert!(
        e.message.contains("web.key") && e.message.contains("no private key"),
        "{e}"
    );
    // An expired one loads (with a warning): there is nothing better to serve.
    write_cert(dir.path(), "web", "a.example", 1_600_000_000);
    let certs = Certificates::load(sources(dir.path())).unwrap();
    assert_eq!(certs.views()[1].not_after, Some(1_600_000_000_000));
    proxy.shutdown();
}
