//! `cutover lint-migrations` as a user runs it: exit codes, findings with file:line, allowed
//! statements, and the errors for a pattern without files and SQL that does not parse.

use std::process::Command;

mod common;
use common::site::text;
use common::*;

fn lint(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("lint-migrations")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn the_lint_reports_each_breaking_statement_with_its_place_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("migrations");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(
        m.join("001_add.sql"),
        "ALTER TABLE users ADD COLUMN nickname text;\nALTER TABLE users ADD COLUMN score int NOT NULL DEFAULT 0;\n",
    )
    .unwrap();
    let out = lint(dir.path(), &["migrations/*.sql"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("2 statement(s): nothing breaks the running version"),
        "{}",
        text(&out)
    );

    std::fs::write(
        m.join("002_drop.sql"),
        "-- cleanup\nALTER TABLE users DROP COLUMN email;\n-- cutover: allow drop-table\nDROP TABLE carts;\n\n  ALTER TABLE users RENAME COLUMN name TO full_name;\n",
    )
    .unwrap();
    let out = lint(dir.path(), &["migrations/*.sql"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("migrations/002_drop.sql:2:1: DROP COLUMN users.email (drop-column)"),
        "{shown}"
    );
    assert!(
        shown.contains("migrations/002_drop.sql:6:3: RENAME COLUMN users.name TO full_name (rename-column)"),
        "{shown}"
    );
    assert!(
        shown.contains("migrations/002_drop.sql:4:1: DROP TABLE carts (drop-table): allowed"),
        "{shown}"
    );
    assert!(shown.contains("2 break(s) the running version"), "{shown}");

    let out = lint(
        dir.path(),
        &["--allow", "drop-column", "--allow", "rename-column", "migrations/*.sql"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let out = lint(dir.path(), &["--dialect", "oracle", "migrations/*.sql"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--dialect \"oracle\""), "{}", text(&out));
    let out = lint(dir.path(), &["other/*.sql"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no file matches \"other/*.sql\""), "{}", text(&out));
    std::fs::write(m.join("003_broken.sql"), "SELECT 1;\nALTER TABLE ;\n").unwrap();
    let out = lint(dir.path(), &["migrations/*.sql"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("migrations/003_broken.sql:2:13: not SQL the postgres parser understands"),
        "{}",
        text(&out)
    );
}
