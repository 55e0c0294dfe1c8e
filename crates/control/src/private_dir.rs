//! Directories only cutover's user may enter: the state directory (the database, the preview
//! token, instance logs, by default the admin socket) and the directory the admin socket is bound
//! in before it is published.
//!
//! Modes are given to `mkdir` itself, never left to the umask: the umask is shared by every
//! thread of the process, and under `umask 000` anything created without a mode is open to all.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Group and other permission bits.
const SHARED_BITS: u32 = 0o077;
/// Group and other write bits.
const SHARED_WRITE: u32 = 0o022;

/// Creates `path` and any missing parents with mode 0700. An existing directory is left as it is.
pub fn create(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Why the state directory cannot be used. Each message names the directory and what to run.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state directory {}: cannot create it: {source}; check that its parent exists and is \
         writable, or set server.state_dir to another directory",
        path.display()
    )]
    Create { path: PathBuf, source: io::Error },
    #[error(
        "state directory {}: {source}; set server.state_dir to a directory this user owns",
        path.display()
    )]
    Inspect { path: PathBuf, source: io::Error },
    #[error(
        "state directory {}: not a directory; move it aside or set server.state_dir to another \
         directory",
        path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "state directory {}: owned by uid {owner}, not by uid {me} that cutover runs as; its \
         owner could replace the state and the admin socket. Run cutover as its owner, or, if the \
         directory is yours to take, `chown -R {me} {}`",
        path.display(),
        path.display()
    )]
    Foreign { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "state directory {}: writable by group or others (mode {mode:04o}); they could replace \
         the state database, the preview token or the admin socket. Check what is in it, run \
         `chmod 700 {}`, then start again",
        path.display(),
        path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("state directory {}: cannot make it private (mode 0700): {source}", path.display())]
    Tighten { path: PathBuf, source: io::Error },
    #[error(
        "state directory {}: in use by another cutover daemon ({holder}); two daemons on one state \
         directory would adopt and stop each other's instances. Stop that one first, or give this \
         one another server.state_dir",
        path.display()
    )]
    InUse { path: PathBuf, holder: String },
    #[error("state directory {}: cannot lock {}: {source}", path.display(), LOCK_FILE)]
    Lock { path: PathBuf, source: io::Error },
}

/// Makes sure the state directory exists and only this user can enter it.
///
/// A missing directory is created 0700. An existing one must be ours and writable by nobody
/// else: a directory someone else can write to may already hold their files, so it is refused
/// rather than repaired. One that others may only read or enter (the usual 0755 of a directory
/// made under umask 022) is tightened to 0700 with a warning: files in it are created with the
/// process umask, which may leave them open to anyone who can reach them.
pub fn prepare_state_dir(path: &Path) -> Result<(), StateDirError> {
    create(path).map_err(|source| StateDirError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = std::fs::metadata(path).map_err(|source| StateDirError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateDirError::Foreign {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & SHARED_WRITE != 0 {
        return Err(StateDirError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    if mode & SHARED_BITS != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !SHARED_BITS)).map_err(|source| {
            StateDirError::Tighten {
                path: path.to_path_buf(),
                source,
            }
        })?;
        tracing::warn!(
            path = %path.display(),
            "state directory {} was mode {mode:04o}; made it {:04o} so that only this user can reach \
             the admin socket, the state database and the instance logs",
            path.display(),
            mode & !SHARED_BITS
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_state_dir_and_its_parents_are_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b/state");
        prepare_state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
    }

    #[test]
    fn an_existing_state_dir_others_can_read_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
    }

    #[test]
    fn an_existing_state_dir_others_can_write_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_state_dir(&state).unwrap_err().to_string();
        assert!(err.contains("mode 0777"), "{err}");
        assert!(err.contains(&format!("chmod 700 {}", state.display())), "{err}");
        assert_eq!(mode(&state), 0o777, "left as it was");
    }

    #[test]
    fn a_state_dir_owned_by_another_user_is_refused() {
        if nix::unistd::geteuid().as_raw() != 0 {
            eprintln!("skipped: giving a directory to another user needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
        let err = prepare_state_dir(&state).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(err.contains(&format!("chown -R 0 {}", state.display())), "{err}");
    }

    #[test]
    fn a_file_in_place_of_the_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::write(&state, "").unwrap();
        let err = prepare_state_dir(&state).unwrap_err().to_string();
        assert!(err.contains(&state.display().to_string()), "{err}");
    }
}

/// The file in the state directory a running daemon holds an exclusive `flock` on, with its pid.
pub const LOCK_FILE: &str = "daemon.lock";

/// The running daemon's hold on its state directory: one daemon per directory, whatever its
/// admin transport. The kernel releases the lock when the process ends, kill -9 included, so a
/// crashed daemon never blocks the next start.
#[derive(Debug)]
pub struct StateDirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the state directory's lock, or says which daemon holds it.
pub fn lock_state_dir(dir: &Path) -> Result<StateDirLock, StateDirError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let failed = |source: io::Error| StateDirError::Lock {
        path: dir.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(failed)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            // The pid, for the message a second daemon gives.
            let written = lock
                .set_len(0)
                .and_then(|_| lock.rewind())
                .and_then(|_| writeln!(lock, "{}", std::process::id()));
            written.map_err(failed)?;
            Ok(StateDirLock { _lock: lock })
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "its pid unknown".to_string(),
            };
            Err(StateDirError::InUse {
                path: dir.to_path_buf(),
                holder,
            })
        }
        Err((_, e)) => Err(failed(io::Error::from(e))),
    }
}
