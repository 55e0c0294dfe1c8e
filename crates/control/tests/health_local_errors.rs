//! Health checks that this host cannot make. A test binary of its own: it uses up every file
//! descriptor of the process for a moment.

use std::time::{Duration, Instant};

use cutover_control::config::HealthConfig;
use cutover_control::health::{check_once, CheckFailure, CheckSpec, HealthChecker, Status};
use cutover_proxy::Colour;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// An instance that answers every check with 200, in a process of its own: in this one, it
/// could not accept connections while the test holds every descriptor, and a check that got a
/// socket (one the instance had just closed) would time out for a reason of the test's making.
struct Instance(std::process::Child, std::net::SocketAddr);

impl Instance {
    fn start() -> Instance {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let script = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
        let child = std::process::Command::new("python3")
            .args(["-c", script, &addr.port().to_string()])
            .spawn()
            .expect("python3 runs the test's instance");
        Instance(child, addr)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Out of file descriptors, a check cannot even open its socket: that is this host's failure,
/// reported as such, and the instance keeps its status however many checks it misses. Once
/// descriptors are free again, checks pass as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_this_host_cannot_make_leave_the_instance_healthy() {
    let instance = Instance::start();
    let addr = instance.1;
    let checker = HealthChecker::start(CheckSpec {
        service: "web".into(),
        colour: Colour::Green,
        instances: vec![addr],
        config: HealthConfig {
            path: "/up".into(),
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            healthy: 1,
            unhealthy: 1,
            deadline: Duration::from_secs(60),
            host: None,
        },
        tls: None,
    });
    let status = || checker.snapshot().get(addr).map(|h| h.status);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status() != Some(Status::Healthy) {
        assert!(
            Instant::now() < deadline,
            "never healthy: {:?}",
            checker.snapshot().get(addr)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A soft limit of 4096 keeps the number of descriptors to use up small whatever the hard
    // limit is (it may be a million).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 4096.min(hard), hard).unwrap();
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
        assert!(hog.len() <= 4096, "open never failed");
    }
    // The checker's own checks free a descriptor now and then (each closes its socket), and a
    // check that gets one reaches the instance: take what was freed, then check, a few times.
    let mut direct = Ok(());
    for _ in 0..20 {
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hog.push(f);
        }
        direct = check_once(addr, "/up", None, Duration::from_secs(1), None).await;
        if direct.is_err() {
            break;
        }
    }
    // 25 intervals with no descriptor to spare; one failed check would make it unhealthy.
    let until = Instant::now() + Duration::from_millis(500);
    let mut seen = Vec::new();
    while Instant::now() < until {
        seen.push(status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(hog);
    match direct {
        Err(CheckFailure::Local(reason)) => assert!(reason.contains("Too many open files"), "{reason}"),
        other => panic!("out of descriptors, a check is this host's failure, not {other:?}"),
    }
    assert!(seen.iter().all(|s| *s == Some(Status::Healthy)), "{seen:?}");
    let health = checker.snapshot().get(addr).cloned().unwrap();
    assert_eq!(health.consecutive_fail, 0, "{health:?}");
    assert_eq!(
        check_once(addr, "/up", None, Duration::from_secs(1), None).await,
        Ok(())
    );
}
