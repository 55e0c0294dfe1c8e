//! The admin unix socket under `umask 000`, the umask that leaves everything created without an
//! explicit mode open to every user. A test binary of its own, because the umask is process-wide.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cutover_control::api::bind_unix;
use nix::sys::stat::{umask, Mode};

fn mode(path: &Path) -> String {
    format!("{:04o}", std::fs::symlink_metadata(path).unwrap().mode() & 0o7777)
}

#[test]
fn the_admin_socket_is_never_seen_with_a_wider_mode_than_0600() {
    umask(Mode::empty());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let dir = tempfile::tempdir().unwrap();

    // A missing directory for the socket is made private.
    let path = dir.path().join("run/admin.sock");
    let listener = bind_unix(&path).unwrap();
    assert_eq!(
        mode(&dir.path().join("run")),
        "0700",
        "the socket's directory is made private"
    );
    assert_eq!(mode(&path), "0600");
    drop(listener);
    assert!(!path.exists(), "dropping the listener removes its socket file");

    // The worst case: a directory anyone may enter and write to. A watcher looks at the socket's
    // path and at every entry of the directory as fast as it can while the socket is bound again
    // and again, and records every mode it sees.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = open.join("admin.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<(String, u32, bool)>::new()));
    let watcher = {
        let (open, path, stop, seen) = (open.clone(), path.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut local = Vec::new();
            let mut record = |name: String, meta: std::fs::Metadata| {
                local.push((name, meta.mode() & 0o7777, meta.file_type().is_socket()));
            };
            for round in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(meta) = std::fs::symlink_metadata(&path) {
                    record("admin.sock".into(), meta);
                }
                if round % 16 == 0 {
                    for entry in std::fs::read_dir(&open).into_iter().flatten().flatten() {
                        if let Ok(meta) = std::fs::symlink_metadata(entry.path()) {
                            record(entry.file_name().to_string_lossy().into_owned(), meta);
                        }
                    }
                }
            }
            seen.lock().unwrap().extend(local);
        })
    };
    for _ in 0..1000 {
        drop(bind_unix(&path).unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let seen = seen.lock().unwrap();
    let sockets = seen.iter().filter(|(_, _, socket)| *socket).count();
    assert!(sockets > 0, "the watcher saw the socket at least once");
    for (name, mode, socket) in seen.iter() {
        if *socket {
            assert_eq!(*mode, 0o600, "{name} seen with mode {mode:04o}");
        } else {
            assert_eq!(*mode, 0o700, "{name} seen with mode {mode:04o}");
        }
    }
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "nothing is left behind");
}

#[test]
fn a_live_socket_is_refused_and_kept_and_a_stale_one_is_replaced() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");

    let live = bind_unix(&path).unwrap();
    let err = bind_unix(&path).err().expect("a socket a daemon answers on is refused");
    assert!(err.to_string().contains("in use by a running daemon"), "{err}");
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_ok(),
        "the running daemon's socket is kept"
    );
    drop(live);

    // A socket file whose daemon died (kill -9) answers nothing and is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let _listener = bind_unix(&path).unwrap();
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    assert_eq!(mode(&path), "0600");
}
