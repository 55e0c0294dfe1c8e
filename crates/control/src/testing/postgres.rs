//! A real PostgreSQL server on loopback, for tests of schema changes.
//!
//! [`PgServer::start`] runs Debian's PostgreSQL (package `postgresql`, installed by
//! `scripts/test.sh`): `initdb` into a temporary directory, then `postgres` on a free loopback
//! port with its socket in that directory, trusting local connections, and waits until it
//! accepts them. PostgreSQL refuses to run as root: when the tests run as root (as CI does), the
//! server runs as the `postgres` user (or `nobody`), which owns the directory. Dropping the
//! server (also when a test panics) stops it and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `postgresql` package puts the server's programs.
const BIN_DIRS: [&str; 3] = [
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
];

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running PostgreSQL server; see the module documentation.
pub struct PgServer {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    // Last, so that the server stops before its directory goes.
    dir: tempfile::TempDir,
}

impl PgServer {
    /// Starts a server and waits until it accepts connections. Panics, naming what to do, if
    /// PostgreSQL is not installed or does not start.
    pub fn start() -> PgServer {
        let bin = BIN_DIRS
            .iter()
            .map(Path::new)
            .find(|d| d.join("postgres").exists())
            .unwrap_or_else(|| {
                panic!(
                    "PostgreSQL is not installed (none of {BIN_DIRS:?}): the schema-change tests need a real \
                     server; run scripts/test.sh, which installs Debian's postgresql"
                )
            });
        let dir = tempfile::Builder::new()
            .prefix("cutover-pg-")
            .tempdir()
            .expect("create a temporary directory for PostgreSQL");
        let user = unprivileged_user();
        if let Some((uid, gid)) = &user {
            // The server's user owns its directory (and can reach it: /tmp is world-searchable).
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown {uid} {}", dir.path().display());
        }
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let out = as_user(&user, &bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = PgServer {
            child: None,
            port: 0,
            log,
            dir,
        };
        let mut last = String::new();
        // The port is picked free, then released for the server to take: another process may
        // take it meanwhile, so a server that does not come up is tried again on another.
        for _ in 0..3 {
            server.port = free_port();
            let logfile = std::fs::File::create(&server.log).expect("create the server's log");
            if let Some((uid, _)) = &user {
                let _ = Command::new("chown").arg(uid).arg(&server.log).status();
            }
            let child = as_user(&user, &bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "-k"])
                .arg(server.dir.path())
                .args([
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ])
                .stdout(Stdio::null())
                .stderr(logfile)
                .spawn()
                .expect("start postgres");
            server.child = Some(child);
            if server.wait_ready() {
                return server;
            }
            last = std::fs::read_to_string(&server.log).unwrap_or_default();
            server.stop();
        }
        panic!("PostgreSQL did not start: {last}");
    }

    /// The URL of database `postgres` as user `postgres`, for `psql` and clients.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` with `psql` and returns its output (unaligned, tuples only); panics on error.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg(self.url())
            .args(["-v", "ON_ERROR_STOP=1", "-tAc", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn wait_ready(&mut self) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < START_TIMEOUT {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            let ok = Command::new("psql")
                .arg(self.url())
                .args(["-tAc", "SELECT 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The user and group ids to run PostgreSQL as when this process is root (it refuses to run as
/// root): those of `postgres`, or else of `nobody`.
fn unprivileged_user() -> Option<(String, String)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    for user in ["postgres", "nobody"] {
        if let Ok(Some(u)) = nix::unistd::User::from_name(user) {
            return Some((u.uid.to_string(), u.gid.to_string()));
        }
    }
    panic!("running as root, and neither user postgres nor nobody exists to run PostgreSQL as");
}

/// `program` run as `user` (`setpriv`), or as this process's user.
fn as_user(user: &Option<(String, String)>, program: &Path) -> Command {
    match user {
        None => Command::new(program),
        Some((uid, gid)) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
            ])
            .arg(program);
            cmd
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
