//! Who can reach the admin API of the real `cutover serve`: the state directory and the unix
//! socket under `umask 000`, the token file's mode, wrong tokens on the TCP listener, and the
//! socket file of a start that fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// A config with one static service (no instances to start) listening on a free port, with
/// `server_extra` added to `[server]`. Returns the config file and the proxy's address.
fn write_config(dir: &Path, server_extra: &str) -> (PathBuf, SocketAddr) {
    let port = free_port();
    let config = dir.join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n{server_extra}\n\
             [services.api]\nhealth = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n"
        ),
    )
    .unwrap();
    (config, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).arg("-c").arg(config).output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Entries of `dir` a start may leave behind when it binds the socket.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "admin.sock" || n.starts_with(".cutover-bind"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn under_umask_000_the_state_dir_is_private_and_the_socket_never_wider_than_0600() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), "");
    let state = dir.path().join("state");
    let socket = state.join("admin.sock");
    let daemon = Stopping(
        Command::new("sh")
            .args(["-c", "umask 000; exec \"$0\" serve -c \"$1\"", BIN])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Every mode the directory and the socket have from the start until the daemon answers, as
    // fast as they can be looked at.
    let (mut dir_modes, mut socket_modes) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "the daemon answers on {}", socket.display());
        if let Ok(meta) = std::fs::symlink_metadata(&state) {
            dir_modes.push(format!("{:04o}", meta.mode() & 0o7777));
        }
        if let Ok(meta) = std::fs::symlink_metadata(&socket) {
            if meta.file_type().is_socket() {
                socket_modes.push(format!("{:04o}", meta.mode() & 0o7777));
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    break;
                }
            }
        }
        std::thread::yield_now();
    }
    dir_modes.dedup();
    socket_modes.dedup();
    assert_eq!(dir_modes, ["0700"], "modes of the state directory seen");
    assert_eq!(socket_modes, ["0600"], "modes of the admin socket seen");
    // The socket answers once it is linked into place; the private directory it was bound in
    // goes right after.
    let gone = Instant::now() + Duration::from_secs(2);
    while leftovers(&state) != ["admin.sock"] && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(leftovers(&state), ["admin.sock"]);
    assert!(cli(&config, &["status"]).status.success());

    // A clean stop removes the socket.
    drop(daemon);
    assert!(!socket.exists(), "admin.sock removed at stop");
}

#[test]
fn a_state_dir_others_can_write_to_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (config, front) = write_config(dir.path(), "");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = serve_refused(&config);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("mode 0777"), "{said}");
    assert!(said.contains(&format!("chmod 700 {}", state.display())), "{said}");
    assert_eq!(mode(&state), 0o777, "left as it was");
    assert!(leftovers(&state).is_empty(), "no socket made");
    assert!(TcpStream::connect(front).is_err(), "the proxy was not started");
}

#[test]
fn a_token_file_others_can_read_is_refused_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (config, front) = write_config(
        dir.path(),
        &format!("admin = \"{admin}\"\ntoken_file = \"admin.token\""),
    );
    let token = dir.path().join("admin.token");
    for loose in [0o644, 0o666, 0o640] {
        std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(loose)).unwrap();
        let out = serve_refused(&config);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let said = text(&out);
        assert!(said.contains(&format!("mode {loose:04o}")), "{said}");
        assert!(said.contains(&format!("chmod 600 {}", token.display())), "{said}");
        assert!(TcpStream::connect(admin).is_err(), "no admin listener");
        assert!(TcpStream::connect(front).is_err(), "no proxy");
        assert!(!dir.path().join("state").exists(), "no state directory");
        // The CLI will not send it either.
        let out = cli(&config, &["status"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("chmod 600 {}", token.display())),
            "{}",
            text(&out)
        );
    }

    // The same file made private is accepted.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _daemon = Stopping(spawn_serve(&config));
    assert!(
        wait_until(Duration::from_secs(20), || cli(&config, &["status"]).status.success()),
        "the daemon starts with the token file at 0600"
    );
}

/// `GET /v1/status` on a fresh connection from `from` with the bearer `token`: the status and
/// the `Retry-After` header, if any.
fn status_from(from: [u8; 4], admin: SocketAddr, token: &str) -> (u16, Option<u64>) {
    exchange_from(
        from,
        admin,
        &format!("GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
}

/// The dashboard's sign-in (`POST /v1/session`) from `from` with `token`: the status.
fn sign_in_from(from: [u8; 4], admin: SocketAddr, token: &str) -> u16 {
    let body = format!("{{\"token\": \"{token}\"}}");
    let request = format!(
        "POST /v1/session HTTP/1.1\r\nHost: x\r\nX-Cutover-Request: 1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange_from(from, admin, &request).0
}

/// One request on a fresh connection from the address `from`: the status and `Retry-After`.
fn exchange_from(from: [u8; 4], admin: SocketAddr, request: &str) -> (u16, Option<u64>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&admin.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let retry_after = answer
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok());
    (status, retry_after)
}

#[test]
fn wrong_tokens_are_slowed_per_client_address_and_the_right_token_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (config, _) = write_config(
        dir.path(),
        &format!("admin = \"{admin}\"\ntoken_file = \"admin.token\""),
    );
    let token = "0123456789abcdef0123456789abcdef";
    write_private(&dir.path().join("admin.token"), token);
    let _daemon = Stopping(spawn_serve(&config));
    assert!(wait_until(Duration::from_secs(20), || cli(&config, &["status"])
        .status
        .success()));

    // 300 guesses as fast as one client can send them.
    let attacker = [127, 0, 0, 1];
    let t0 = Instant::now();
    let answers: Vec<_> = (0..300)
        .map(|i| status_from(attacker, admin, &format!("guess-{i:027}")))
        .collect();
    let took = t0.elapsed();
    let compared = answers.iter().filter(|a| a.0 == 401).count() as u64;
    let limited: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!(compared + limited.len() as u64, 300, "only 401 and 429: {answers:?}");
    // A few back to back, then one a second: however slow this machine, no more got through.
    let allowed = 5 + took.as_secs() + 1;
    assert!(
        (1..=allowed).contains(&compared),
        "{compared} of 300 wrong tokens were compared in {took:?} (at most {allowed} may be)"
    );
    assert!(
        limited.iter().all(|a| a.1.is_some_and(|s| s >= 1)),
        "each 429 says when to retry: {limited:?}"
    );

    // The operator at another address is not held up; at the guesser's address, even the right
    // token waits its turn (comparing it would tell a right guess from a wrong one).
    assert_eq!(status_from([127, 0, 0, 2], admin, token).0, 200);
    assert_eq!(status_from(attacker, admin, token).0, 429);
    // The dashboard's sign-in takes the token too, and is held to the same allowance.
    assert_eq!(sign_in_from(attacker, admin, token), 429);
    assert_eq!(sign_in_from([127, 0, 0, 2], admin, token), 200);
}

#[test]
fn a_start_that_fails_after_binding_the_admin_socket_leaves_no_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let (config, front) = write_config(dir.path(), "");
    let _taken = TcpListener::bind(front).unwrap();
    let out = serve_refused(&config);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&front.to_string()),
        "names the address: {}",
        text(&out)
    );
    let state = dir.path().join("state");
    assert!(state.is_dir(), "the start got as far as the state directory");
    assert!(leftovers(&state).is_empty(), "left behind: {:?}", leftovers(&state));
    // And the next start is not told that a daemon is running.
    drop(_taken);
    let _daemon = Stopping(spawn_serve(&config));
    assert!(wait_until(Duration::from_secs(20), || cli(&config, &["status"])
        .status
        .success()));
}
