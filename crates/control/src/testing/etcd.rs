//! A real 3-member etcd cluster on loopback, for tests of the fleet's store.
//!
//! [`EtcdCluster::start`] runs Debian's `/usr/bin/etcd` (package `etcd-server`, installed by
//! `scripts/test.sh`) three times, on free loopback ports, with data directories and logs in a
//! temporary directory, and waits until every member reports itself healthy. One member can be
//! killed and restarted on its data directory. Dropping the cluster (also when a test panics)
//! kills every member and removes the directory. A member outlives the test process only if
//! that process is itself killed with SIGKILL.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's etcd-server installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";

/// How long a cluster may take to elect a leader and report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running 3-member etcd cluster; see the module documentation.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    // Last, so that the members are killed before their directory goes.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts three members and waits until all are healthy. Panics, naming what to do, if
    /// `/usr/bin/etcd` is missing or the cluster does not come up.
    pub fn start() -> EtcdCluster {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: the etcd store's tests need a real etcd; run scripts/test.sh, which \
             installs Debian's etcd-server (or apt-get install etcd-server)"
        );
        let mut last_failure = String::new();
        // Ports are picked free, then released for etcd to take: another process may take one
        // meanwhile, so a cluster that does not come up is tried again on other ports.
        for _ in 0..3 {
            let mut cluster = EtcdCluster::launch();
            match cluster.wait_until_healthy(&[0, 1, 2], START_TIMEOUT) {
                Ok(()) => return cluster,
                Err(why) => last_failure = format!("{why}\n{}", cluster.logs()),
            }
        }
        panic!("the etcd test cluster did not start: {last_failure}");
    }

    fn launch() -> EtcdCluster {
        let dir = tempfile::Builder::new()
            .prefix("cutover-etcd-")
            .tempdir()
            .expect("create a temporary directory for etcd");
        let ports = free_ports(6);
        let token = format!("cutover-test-{}", std::process::id());
        let mut members = Vec::new();
        for i in 0..3 {
            let name = format!("m{i}");
            members.push(Member {
                data_dir: dir.path().join(format!("{name}.etcd")),
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            dir,
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open an etcd member's log file");
        let log_err = log.try_clone().expect("clone an etcd member's log file");
        // A shell watches over each member: it kills the member when told to (SIGTERM) and when
        // the test process is gone, even if that was killed with SIGKILL and never dropped us.
        let watchdog = format!(
            "\"$@\" & member=$!; trap 'kill -9 $member; wait $member; exit 0' TERM; \
             while kill -0 {} 2>/dev/null && kill -0 $member 2>/dev/null; do sleep 0.1; done; \
             kill -9 $member 2>/dev/null; wait $member",
            std::process::id()
        );
        let child = Command::new("/bin/sh")
            .args(["-c", &watchdog, "etcd-member", ETCD])
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Fast elections: loopback round trips are microseconds.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {ETCD}: {e}; run scripts/test.sh to install it"));
        self.members[i].child = Some(child);
    }

    /// The client URLs of all three members.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The temporary directory with the members' data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills member `i` (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            // The watchdog kills the member with SIGKILL, waits for it, and exits.
            let pid = i32::try_from(child.id()).map(nix::unistd::Pid::from_raw);
            match pid {
                Ok(pid) if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() => {}
                _ => {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory (no-op if it runs). Does not wait: see
    /// [`EtcdCluster::wait_until_healthy`].
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
    }

    /// Waits until every member in `which` answers its health check with `true` (which needs a
    /// leader), at most `timeout`.
    pub fn wait_until_healthy(&mut self, which: &[usize], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut unhealthy = Vec::new();
            for &i in which {
                if let Some(child) = self.members[i].child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("etcd member {} exited: {status}", self.members[i].name));
                    }
                }
                if !healthy(self.members[i].client_port) {
                    unhealthy.push(self.members[i].name.clone());
                }
            }
            if unhealthy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd members {} not healthy within {timeout:?}",
                    unhealthy.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of every member's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {} ({}):\n", m.name, m.log.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `n` distinct loopback ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound socket's address").port())
        .collect()
}

/// Whether the member on `port` answers `GET /health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(300))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") && answer.contains("\"health\":\"true\"")
}
