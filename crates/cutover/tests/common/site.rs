//! A daemon run from the binary with one process-driver service (two demo-app instances), in a
//! temporary directory, and the ways an operator starts, stops and inspects it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, wait_until, BIN};

/// A daemon with one process-driver service of two demo-app instances, in a temporary dir.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub front: SocketAddr,
    pub marker: String,
    pub daemon: Option<std::process::Child>,
    logs: u32,
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        // Every daemon a handover started, and every instance: they carry the marker or run
        // from this dir's config.
        for pid in self.pids_where(|_| true) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        for pid in self.daemon_pids() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

impl Site {
    pub fn new(app_args: &str) -> Site {
        Site::with(app_args, "watch = { duration = \"300ms\", min_requests = 1 }\n")
    }

    /// A site whose service has `service_extra` (TOML lines) after its command and health.
    pub fn with(app_args: &str, service_extra: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let marker = format!(
            "CUTOVER_TEST_MARK={}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let config = dir.path().join("cutover.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\n[proxy]\nshutdown_timeout = \"6s\"\n\n\
                 [services.web]\ncommand = \"{marker} {BIN} demo-app --port {{port}} {app_args}\"\ninstances = 2\n\
                 health = {{ path = \"/up\", interval = \"200ms\", timeout = \"1s\", healthy = 1, unhealthy = 2, deadline = \"20s\" }}\n{service_extra}"
            ),
        )
        .unwrap();
        Site {
            dir,
            config,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            marker,
            daemon: None,
            logs: 0,
        }
    }

    fn log_file(&mut self) -> std::fs::File {
        self.logs += 1;
        std::fs::File::create(self.dir.path().join(format!("serve-{:03}.log", self.logs))).unwrap()
    }

    /// Starts `serve` and waits until it answers `status`.
    pub fn start(&mut self) {
        let log = self.log_file();
        let child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        self.wait_answering();
    }

    /// Starts `serve` with `socket` as descriptor 3 and `LISTEN_FDS=1`, as systemd does.
    pub fn start_activated(&mut self, socket: &TcpListener) {
        use command_fds::{CommandFdExt, FdMapping};
        let log = self.log_file();
        let fd = std::os::fd::OwnedFd::from(socket.try_clone().unwrap());
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "-c"])
            .arg(&self.config)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http")
            .stdout(Stdio::null())
            .stderr(log);
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: fd,
            child_fd: 3,
        }])
        .unwrap();
        self.daemon = Some(cmd.spawn().unwrap());
        self.wait_answering();
    }

    pub fn wait_answering(&self) {
        let cfg = self.config.clone();
        assert!(
            wait_until(Duration::from_secs(30), || cli(&cfg, &["status"]).status.success()),
            "the daemon answers status; {}",
            self.logs()
        );
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    pub fn deploy(&self, version: &str) {
        let out = self.cli(&["deploy", "web", "--version", version]);
        assert!(out.status.success(), "{}\n{}", text(&out), self.logs());
    }

    /// SIGTERM to the daemon, and wait until it has exited.
    pub fn stop(&mut self) {
        let mut d = self.daemon.take().expect("a daemon runs");
        let _ = Command::new("kill").args(["-TERM", &d.id().to_string()]).status();
        let exited = wait_until(Duration::from_secs(30), || d.try_wait().ok().flatten().is_some());
        assert!(exited, "the daemon exits after SIGTERM");
    }

    pub fn kill(&mut self) {
        let mut d = self.daemon.take().expect("a daemon runs");
        let _ = d.kill();
        let _ = d.wait();
    }

    /// The pids of the instances (processes carrying this site's marker).
    pub fn instance_pids(&self) -> Vec<u32> {
        self.pids_where(|vars| vars.iter().any(|v| v.starts_with(b"CUTOVER_VERSION=")))
    }

    pub fn pids_where(&self, keep: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            if vars.contains(&self.marker.as_bytes()) && keep(&vars) {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }

    /// Daemons serving this site's config (started by the test or by a handover).
    pub fn daemon_pids(&self) -> Vec<u32> {
        let config = self.config.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == "serve") && args.contains(&config) {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }

    pub fn logs(&self) -> String {
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("serve-"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .collect()
    }
}

pub fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).arg("-c").arg(config).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
