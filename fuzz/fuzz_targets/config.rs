//! The config parser on any text: it never panics, and every error it returns names where the
//! fix belongs (file, a line and column inside the text, and the key when the file is TOML).
#![no_main]

use cutover_control::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            // What the daemon does next with a parsed file must not panic either.
            let _ = config.proxy_config();
            assert!(!config.services.is_empty(), "a valid config has a service");
        }
        Err(e) => {
            let location = e.location().expect("a parse error has a location");
            assert_eq!(location.file, "fuzz.toml");
            // Lines as an editor counts them: a trailing newline opens one more.
            let lines = text.split('\n').count();
            assert!(
                (1..=lines).contains(&location.line),
                "line {} outside the text's {lines} lines: {e}",
                location.line
            );
            let line_text = text.split('\n').nth(location.line - 1).unwrap_or("");
            assert!(
                location.column >= 1 && location.column <= line_text.chars().count() + 1,
                "column {} outside line {} ({} characters): {e}",
                location.column,
                location.line,
                line_text.chars().count()
            );
            if let ConfigError::Invalid { key, .. } = &e {
                assert!(!key.is_empty(), "an invalid value names its key: {e}");
            }
            let message = e.to_string();
            assert!(message.starts_with(&format!("{location}: ")), "{message}");
        }
    }
});
