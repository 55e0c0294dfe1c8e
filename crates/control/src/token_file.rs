//! The admin bearer token's file (`server.token_file`), read by the daemon and by the CLI. Like
//! ssh with a private key, a file that group or others may read or change is refused: whoever
//! reads the token can deploy, promote and roll back.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The shortest token accepted, in characters.
pub const MIN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error(
        "server.token_file {}: cannot read it: {source}; write a long random token into it, e.g. \
         `head -c 32 /dev/urandom | base64 > {}; chmod 600 {}`",
        path.display(),
        path.display(),
        path.display()
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "server.token_file {}: group or others may read or change it (mode {mode:04o}), and \
         whoever reads the token can drive cutover; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "server.token_file {}: the token is shorter than {MIN_LEN} characters; write a long \
         random token into it, e.g. `head -c 32 /dev/urandom | base64 > {}`",
        path.display(),
        path.display()
    )]
    Short { path: PathBuf },
}

/// The token in `path`, trimmed. The mode checked is that of the file opened, so a file swapped
/// between the check and the read cannot slip through.
pub fn read_token_file(path: &Path) -> Result<String, TokenFileError> {
    let read = |source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mode = file.metadata().map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    let token = text.trim();
    if token.chars().count() < MIN_LEN {
        return Err(TokenFileError::Short {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("admin.token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            let path = token_file(dir.path(), "0123456789abcdef0123\n", mode);
            assert_eq!(read_token_file(&path).unwrap(), "0123456789abcdef0123");
        }
    }

    #[test]
    fn a_token_file_group_or_others_may_read_or_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o666, 0o640, 0o604, 0o620, 0o602] {
            let path = token_file(dir.path(), "0123456789abcdef0123\n", mode);
            let err = read_token_file(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
            assert!(err.contains(&format!("chmod 600 {}", path.display())), "{err}");
        }
    }

    #[test]
    fn a_missing_or_short_token_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = read_token_file(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let path = token_file(dir.path(), "short\n", 0o600);
        let err = read_token_file(&path).unwrap_err().to_string();
        assert!(err.contains("shorter than 16"), "{err}");
    }
}
