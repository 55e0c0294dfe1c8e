//! The certificates of the TLS listeners: read from their PEM files, handed to the proxy as one
//! [`CertificateSet`], watched for changes, reloaded, and reported.
//!
//! Each certificate is a [`Source`]: the default one (`[server] tls`) or a service's (for its
//! hosts). Sources are independent: a file that fails to load leaves its own source on the
//! certificate it served before (the error reported in the status, the log and the metrics) and
//! changes nothing for the others. At start there is no "before": every certificate must load,
//! or the daemon does not start (the error names the file).
//!
//! A reload is a pass over the sources ([`Certificates::reload`]): the files of a source whose
//! files changed (device, inode, size or modification time, so an atomic rename and an edit in
//! place are both seen) are read again, or of every source when asked (`cutover reload`). When
//! any source has a new certificate, a new set is built from every source's current one and
//! stored in one step; handshakes from then on get it, connections set up before keep theirs.
//! The files are polled every [`POLL_INTERVAL`] from a blocking thread: a stat per file, no
//! watcher, nothing on the proxy's threads.
//!
//! This module never decides anything about traffic; it only reads files and hands over sets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutover_proxy::{CertificateFile, CertificateSet, CertificateSlot, Proxy, TlsCertificate, UpstreamTls};
use serde::Serialize;

use crate::config::{Config, TlsFiles};

/// How often the certificate files are looked at for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Which certificate a source is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// `"default"` for `[server] tls`, `"admin API"` for `[server] admin_tls`, else the service's name.
    pub name: String,
    /// The config key the files come from (`server.tls`, `services.web.tls`), for messages.
    pub key: String,
    /// The names it is presented for; empty for the default and the admin API's.
    pub hosts: Vec<String>,
    pub files: TlsFiles,
    /// The admin API's certificate (`server.admin_tls`), not the proxy's.
    pub admin: bool,
}

impl Source {
    /// Every certificate `config` names: the default first, then the services', by name.
    pub fn all(config: &Config) -> Vec<Source> {
        let default = config.server.tls.iter().map(|files| Source {
            name: "default".to_string(),
            key: "server.tls".to_string(),
            hosts: Vec::new(),
            files: files.clone(),
            admin: false,
        });
        let services = config.services.iter().filter_map(|s| {
            s.tls.as_ref().map(|files| Source {
                name: s.name.clone(),
                key: format!("services.{}.tls", s.name),
                hosts: s.hosts.clone(),
                files: files.clone(),
                admin: false,
            })
        });
        let admin = config.server.admin_tls.iter().map(|t| Source {
            name: "admin API".to_string(),
            key: "server.admin_tls".to_string(),
            hosts: Vec::new(),
            files: t.files.clone(),
            admin: true,
        });
        default.chain(services).chain(admin).collect()
    }
}

/// What `cutover status` and `/v1/status` show of one certificate.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CertificateView {
    /// `"default"`, `"admin API"` or the service's name.
    pub name: String,
    /// The names it is presented for; empty for the default.
    pub hosts: Vec<String>,
    pub cert: String,
    pub key: String,
    /// When the certificate served now expires (its notAfter), unix ms; `None` when its date
    /// could not be read.
    pub not_after: Option<u64>,
    /// When the certificate served now was loaded, unix ms.
    pub loaded_at: u64,
    /// Why the files on disk could not be loaded at the last attempt, while the certificate
    /// loaded before is still served; `None` when the files load.
    pub error: Option<String>,
    /// Failed loads since the daemon started.
    pub errors: u64,
}

/// A certificate that could not be loaded; the message names the file and what to do.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct LoadError {
    pub key: String,
    pub message: String,
}

/// The identity of a file's contents as far as a stat can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.modified().ok(),
    })
}

/// A source's files as last looked at: `None` for a file that could not be stat'ed.
type Stamps = (Option<Stamp>, Option<Stamp>);

fn stamps(files: &TlsFiles) -> Stamps {
    (stamp(&files.cert), stamp(&files.key))
}

struct Loaded {
    certificate: TlsCertificate,
    not_after: Option<SystemTime>,
    at: SystemTime,
}

struct Entry {
    source: Source,
    /// What is served for this source.
    served: Loaded,
    /// The files as they were at the last attempt to load them, successful or not: a poll
    /// tries again only when they change.
    tried: Stamps,
    /// The last attempt's failure, while `served` is the certificate loaded before it.
    error: Option<String>,
    errors: u64,
}

impl Entry {
    fn view(&self) -> CertificateView {
        CertificateView {
            name: self.source.name.clone(),
            hosts: self.source.hosts.clone(),
            cert: self.source.files.cert.display().to_string(),
            key: self.source.files.key.display().to_string(),
            not_after: self.served.not_after.map(unix_ms),
            loaded_at: unix_ms(self.served.at),
            error: self.error.clone(),
            errors: self.errors,
        }
    }
}

/// The certificates of one daemon and the proxy they are handed to.
pub struct Certificates {
    /// Set by [`Certificates::install`].
    proxy: std::sync::OnceLock<Arc<Proxy>>,
    /// What the admin API presents, when it speaks TLS.
    admin: Option<Arc<CertificateSlot>>,
    /// One reload at a time (a poll and `cutover reload` may meet).
    entries: Mutex<Vec<Entry>>,
}

/// Reads a source's files and checks the pair. The error names the file and what to do.
fn load(source: &Source) -> Result<Loaded, String> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the {what} file {}: {e}; check the path (relative paths are relative to the config file) and that cutover may read it",
                path.display()
            )
        })
    };
    let cert = read(&source.files.cert, "certificate")?;
    let key = read(&source.files.key, "private key")?;
    let certificate = TlsCertificate::from_pem(&cert, &key).map_err(|e| match e.file() {
        CertificateFile::Cert => format!("{}: {e}", source.files.cert.display()),
        CertificateFile::Key => format!("{}: {e}", source.files.key.display()),
        CertificateFile::Both => format!(
            "{} and {}: {e}",
            source.files.cert.display(),
            source.files.key.display()
        ),
    })?;
    let not_after = not_after(certificate.leaf_der());
    Ok(Loaded {
        certificate,
        not_after,
        at: SystemTime::now(),
    })
}

/// The `upstream_tls` settings of every service that has them, by service name, each CA file
/// read and checked. The first that fails is the error, naming the key, the file and what to do.
/// Read at start only (a new daemon, `cutover upgrade` or SIGHUP, reads them again). Blocking
/// (file reads).
pub fn load_upstream_tls(config: &Config) -> Result<std::collections::BTreeMap<String, Arc<UpstreamTls>>, LoadError> {
    let mut loaded = std::collections::BTreeMap::new();
    for service in &config.services {
        if let Some(tls) = load_service_upstream_tls(service)? {
            loaded.insert(service.name.clone(), tls);
        }
    }
    Ok(loaded)
}

/// One service's `upstream_tls` read from its CA file (`None` without `upstream_tls`).
/// Blocking (a file read).
pub fn load_service_upstream_tls(
    service: &crate::config::ServiceConfig,
) -> Result<Option<Arc<UpstreamTls>>, LoadError> {
    let Some(settings) = &service.upstream_tls else {
        return Ok(None);
    };
    let key = format!("services.{}.upstream_tls.ca", service.name);
    let file = settings.ca.display().to_string();
    let pem = std::fs::read(&settings.ca).map_err(|e| LoadError {
        key: key.clone(),
        message: format!(
            "cannot read the CA file {file}: {e}; check the path (relative paths are relative to the config file) and that cutover may read it"
        ),
    })?;
    let tls = UpstreamTls::new(&pem, &file, settings.server_name.as_deref()).map_err(|e| LoadError {
        key,
        message: format!("{file}: {e}"),
    })?;
    Ok(Some(Arc::new(tls)))
}

/// What a reload did with one service's upstream CA file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UpstreamCaView {
    pub service: String,
    pub file: String,
    /// Why the file was not taken; the CA loaded before stays in use. `None`: new connections
    /// to the instances verify them with the CA just read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Certificates {
    /// Loads every source; the first that fails is the error. Nothing is handed to a proxy
    /// yet ([`Certificates::install`]). Blocking (file reads).
    pub fn load(sources: Vec<Source>) -> Result<Certificates, LoadError> {
        let mut entries = Vec::new();
        for source in sources {
            let tried = stamps(&source.files);
            let served = load(&source).map_err(|message| LoadError {
                key: source.key.clone(),
                message,
            })?;
            if let Some(t) = served.not_after.filter(|t| *t < SystemTime::now()) {
                tracing::warn!(
                    certificate = %source.name,
                    file = %source.files.cert.display(),
                    "the certificate of {} expired on {}; clients will refuse it: renew it (a reload picks the new files up)",
                    source.name,
                    format_utc(t)
                );
            }
            entries.push(Entry {
                source,
                served,
                tried,
                error: None,
                errors: 0,
            });
        }
        let admin = entries
            .iter()
            .find(|e| e.source.admin)
            .map(|e| CertificateSlot::new(e.served.certificate.clone()));
        Ok(Certificates {
            proxy: std::sync::OnceLock::new(),
            admin,
            entries: Mutex::new(entries),
        })
    }

    /// The admin API's certificate, kept current by reloads; `None` when the admin API does not
    /// speak TLS.
    pub fn admin(&self) -> Option<Arc<CertificateSlot>> {
        self.admin.clone()
    }

    /// Hands the current certificates to `proxy`, as one set; reloads hand theirs to it too.
    /// Without certificates for the proxy (only the admin API's) it gets none.
    pub fn install(&self, proxy: Arc<Proxy>) -> Result<(), LoadError> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.iter().all(|e| e.source.admin) {
            return Ok(());
        }
        let installed = proxy.set_certificates(set_of(&entries)).map_err(|e| LoadError {
            key: "tls".into(),
            message: e.to_string(),
        });
        let _ = self.proxy.set(proxy);
        installed
    }

    /// Loads again the sources whose files changed since the last attempt (every source with
    /// `force`), keeps the previous certificate of each one that fails, and hands the proxy a
    /// new set if any certificate changed. Blocking (file reads): call off the async threads.
    /// Returns every certificate's view afterwards.
    pub fn reload(&self, force: bool) -> Vec<CertificateView> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for entry in entries.iter_mut() {
            let now = stamps(&entry.source.files);
            if !force && now == entry.tried {
                continue;
            }
            entry.tried = now;
            let name = entry.source.name.clone();
            let loaded = load(&entry.source).and_then(|loaded| {
                // Never a valid certificate replaced by an expired one: that is a mistake in the
                // new files (an old backup restored, a renewal that did not happen).
                let expired = loaded.not_after.filter(|t| *t < SystemTime::now());
                let served_valid = entry.served.not_after.is_none_or(|t| t >= SystemTime::now());
                match expired {
                    Some(t) if served_valid => Err(format!(
                        "{}: the certificate expired on {}; renew it",
                        entry.source.files.cert.display(),
                        format_utc(t)
                    )),
                    _ => Ok(loaded),
                }
            });
            match loaded {
                Ok(loaded) => {
                    let same = loaded.certificate.same_chain(&entry.served.certificate);
                    if !same || entry.error.is_some() {
                        tracing::info!(
                            certificate = %name,
                            file = %entry.source.files.cert.display(),
                            not_after = loaded.not_after.map(format_utc),
                            "certificate of {name} loaded{}",
                            if same { " again (unchanged)" } else { "; new TLS handshakes get it" }
                        );
                    }
                    entry.error = None;
                    if !same {
                        entry.served = loaded;
                        match (&self.admin, entry.source.admin) {
                            (Some(slot), true) => slot.replace(entry.served.certificate.clone()),
                            _ => changed = true,
                        }
                    }
                }
                Err(message) => {
                    entry.errors += 1;
                    tracing::error!(
                        certificate = %name,
                        error = %message,
                        "the certificate of {name} could not be loaded: {message}; the certificate loaded at {} is still served",
                        format_utc(entry.served.at)
                    );
                    entry.error = Some(message);
                }
            }
        }
        if let (true, Some(proxy)) = (changed, self.proxy.get()) {
            if let Err(e) = proxy.set_certificates(set_of(&entries)) {
                tracing::error!(error = %e, "the reloaded certificates could not be handed to the proxy; the ones before are still served");
            }
        }
        entries.iter().map(Entry::view).collect()
    }

    /// Every certificate, as served now.
    pub fn views(&self) -> Vec<CertificateView> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().map(Entry::view).collect()
    }

    /// Polls the files every [`POLL_INTERVAL`] and reloads what changed, until the task is
    /// dropped or aborted.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let me = self.clone();
            // A panic in a reload (there is none to expect) must not end the watching.
            let _ = tokio::task::spawn_blocking(move || me.reload(false)).await;
        }
    }
}

/// The set the proxy chooses from: each service's certificate for its hosts, the default for
/// the rest.
fn set_of(entries: &[Entry]) -> CertificateSet {
    let mut set = CertificateSet::new();
    for e in entries.iter().filter(|e| !e.source.admin) {
        if e.source.hosts.is_empty() {
            set.set_default(e.served.certificate.clone());
        }
        for host in &e.source.hosts {
            set.insert_host(host, e.served.certificate.clone());
        }
    }
    set
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `2027-03-01 12:00:00 UTC`.
pub fn format_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ((y, m, d), (hh, mm, ss)) = crate::process::utc_civil(secs);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
}

// ---------------------------------------------------------------------------------------------
// The expiry date of a certificate: just enough DER to reach tbsCertificate.validity.notAfter.

/// One DER element: its tag, its contents and what follows it. `None` for anything malformed.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize)
    };
    let (contents, after) = rest.split_at_checked(len)?;
    Some((tag, contents, after))
}

/// The notAfter of an X.509 certificate (DER), or `None` when it cannot be read.
fn not_after(der: &[u8]) -> Option<SystemTime> {
    const SEQUENCE: u8 = 0x30;
    let (tag, certificate, _) = der_element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] EXPLICIT version, when present.
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest)?.2;
    }
    // serialNumber, signature (AlgorithmIdentifier), issuer (Name).
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (tag, validity, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, after_not_before) = der_element(validity)?;
    let (tag, time, _) = der_element(after_not_before)?;
    asn1_time(tag, time)
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), the
/// forms RFC 5280 allows in a certificate.
fn asn1_time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (hour, minute, second) = (digits(&rest[4..6])?, digits(&rest[6..8])?, digits(&rest[8..10])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year as i64, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    u64::try_from(secs).ok().map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

fn digits(text: &[u8]) -> Option<u32> {
    text.iter().try_fold(0u32, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
