use super::*;

fn lint(sql: &str) -> Report {
    lint_sql(Path::new("m.sql"), sql, SqlDialect::Postgres, &[]).unwrap()
}

/// (line, column, kind) of each refused statement.
fn refused(sql: &str) -> Vec<(u64, u64, Breaking)> {
    lint(sql).refused.iter().map(|f| (f.line, f.column, f.kind)).collect()
}

#[test]
fn each_breaking_kind_is_found_at_its_line() {
    let sql = "\
CREATE TABLE orders (id bigint PRIMARY KEY);
ALTER TABLE users ADD COLUMN nickname text;
DROP TABLE carts;
  DROP VIEW order_totals;
ALTER TABLE users DROP COLUMN email;
ALTER TABLE users RENAME COLUMN name TO full_name;
ALTER TABLE users RENAME TO people;
ALTER TABLE orders ALTER COLUMN total TYPE numeric(12, 2);
ALTER TABLE orders ALTER COLUMN note SET NOT NULL;
ALTER TABLE orders ADD COLUMN status text NOT NULL;
ALTER TABLE orders ALTER COLUMN created DROP DEFAULT;
CREATE INDEX CONCURRENTLY orders_status ON orders (status);
";
    assert_eq!(
        refused(sql),
        vec![
            (3, 1, Breaking::DropTable),
            (4, 3, Breaking::DropView),
            (5, 1, Breaking::DropColumn),
            (6, 1, Breaking::RenameColumn),
            (7, 1, Breaking::RenameTable),
            (8, 1, Breaking::ChangeType),
            (9, 1, Breaking::SetNotNull),
            (10, 1, Breaking::AddRequiredColumn),
            (11, 1, Breaking::DropDefault),
        ]
    );
    assert_eq!(lint(sql).statements, 12);
}

#[test]
fn additive_changes_pass() {
    let sql = "\
ALTER TABLE users ADD COLUMN nickname text;
ALTER TABLE users ADD COLUMN score int NOT NULL DEFAULT 0;
CREATE TABLE audit (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
CREATE INDEX CONCURRENTLY users_nickname ON users (nickname);
ALTER TABLE users ALTER COLUMN nickname SET DEFAULT '';
ALTER TABLE users ALTER COLUMN nickname SET NOT NULL;
UPDATE users SET nickname = '' WHERE nickname IS NULL;
";
    let report = lint(sql);
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!(report.statements, 7);
}

#[test]
fn a_default_set_earlier_makes_set_not_null_safe_but_not_one_dropped_since() {
    let sql = "\
ALTER TABLE t ALTER COLUMN c SET DEFAULT 1;
ALTER TABLE t ALTER COLUMN c DROP DEFAULT;
ALTER TABLE t ALTER COLUMN c SET NOT NULL;
";
    assert_eq!(
        refused(sql),
        vec![(2, 1, Breaking::DropDefault), (3, 1, Breaking::SetNotNull)]
    );
}

#[test]
fn a_comment_allows_the_next_statement_only() {
    let sql = "\
-- cutover: allow drop-column
ALTER TABLE users DROP COLUMN legacy;
ALTER TABLE users DROP COLUMN email;
/* cutover: allow drop-table, rename-column */
DROP TABLE old_carts;
";
    let report = lint(sql);
    let refused_here: Vec<_> = report.refused.iter().map(|f| (f.line, f.kind)).collect();
    let allowed: Vec<_> = report.allowed.iter().map(|f| (f.line, f.kind)).collect();
    assert_eq!(refused_here, vec![(3, Breaking::DropColumn)]);
    assert_eq!(allowed, vec![(2, Breaking::DropColumn), (5, Breaking::DropTable)]);
    // A comment for another kind allows nothing.
    assert_eq!(
        refused("-- cutover: allow drop-table\nALTER TABLE t DROP COLUMN c;\n"),
        vec![(2, 1, Breaking::DropColumn)]
    );
    // The allow list allows every statement of its kinds.
    let report = lint_sql(
        Path::new("m.sql"),
        "DROP TABLE a;\nALTER TABLE t DROP COLUMN c;\n",
        SqlDialect::Postgres,
        &[Breaking::DropTable],
    )
    .unwrap();
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.allowed.len(), 1);
}

#[test]
fn a_finding_names_file_line_what_and_how() {
    let report = lint("SELECT 1;\n\nALTER TABLE users DROP COLUMN email;\n");
    let shown = report.refused[0].to_string();
    assert_eq!(
        shown,
        "m.sql:3:1: DROP COLUMN users.email (drop-column): the running version's queries still name the column; \
         move it to the contract phase, or allow it with `-- cutover: allow drop-column` on the line before it"
    );
}

#[test]
fn semicolons_inside_strings_and_function_bodies_do_not_split_statements() {
    let sql = "\
INSERT INTO notes VALUES ('a; DROP TABLE x;');
CREATE FUNCTION f() RETURNS int AS $$ BEGIN DROP TABLE y; RETURN 1; END $$ LANGUAGE plpgsql;
ALTER TABLE t DROP COLUMN c;
";
    assert_eq!(refused(sql), vec![(3, 1, Breaking::DropColumn)]);
}

#[test]
fn sql_that_does_not_parse_is_an_error_with_its_place() {
    let e = lint_sql(
        Path::new("m.sql"),
        "SELECT 1;\nALTER TABLE ;\n",
        SqlDialect::Postgres,
        &[],
    )
    .unwrap_err();
    match &e {
        LintError::Parse { file, line, column, .. } => {
            assert_eq!((file.as_str(), *line, *column), ("m.sql", 2, 13), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string()
            .starts_with("m.sql:2:13: not SQL the postgres parser understands"),
        "{e}"
    );
}

#[test]
fn files_are_linted_in_name_order_and_a_pattern_without_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("migrations");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(
        m.join("002_not_null.sql"),
        "ALTER TABLE t ALTER COLUMN c SET NOT NULL;\n",
    )
    .unwrap();
    std::fs::write(
        m.join("001_default.sql"),
        "ALTER TABLE t ALTER COLUMN c SET DEFAULT 0;\n",
    )
    .unwrap();
    std::fs::write(m.join("003_drop.sql"), "\n\nDROP TABLE old;\n").unwrap();
    std::fs::write(m.join("notes.txt"), "DROP TABLE x;").unwrap();
    let report = lint_files(&["migrations/*.sql".into()], dir.path(), SqlDialect::Postgres, &[]).unwrap();
    let names: Vec<_> = report
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["001_default.sql", "002_not_null.sql", "003_drop.sql"]);
    assert_eq!(report.statements, 3);
    // The default from 001 counts for 002; only 003 is refused.
    assert_eq!(report.refused.len(), 1);
    assert!(report.refused[0].file.ends_with("migrations/003_drop.sql"));
    assert_eq!(report.refused[0].line, 3);

    let e = lint_files(&["missing/*.sql".into()], dir.path(), SqlDialect::Postgres, &[]).unwrap_err();
    assert!(matches!(e, LintError::NoFiles { .. }), "{e}");
    assert!(e.to_string().contains("no file matches \"missing/*.sql\""), "{e}");
    let e = lint_files(&["migrations/[.sql".into()], dir.path(), SqlDialect::Postgres, &[]).unwrap_err();
    assert!(matches!(e, LintError::Pattern { .. }), "{e}");
}

#[test]
fn sqlite_files_parse_in_the_sqlite_dialect() {
    let sql = "ALTER TABLE users ADD COLUMN nickname TEXT;\nALTER TABLE users DROP COLUMN email;\n";
    let report = lint_sql(Path::new("m.sql"), sql, SqlDialect::Sqlite, &[]).unwrap();
    assert_eq!(
        report.refused.iter().map(|f| (f.line, f.kind)).collect::<Vec<_>>(),
        vec![(2, Breaking::DropColumn)]
    );
}

#[test]
fn kind_names_round_trip() {
    for kind in Breaking::ALL {
        assert_eq!(Breaking::from_name(kind.name()), Some(kind));
    }
    assert_eq!(Breaking::from_name("drop"), None);
}

#[test]
fn a_comment_at_the_end_of_a_line_allows_nothing() {
    let sql = "\
ALTER TABLE users DROP COLUMN legacy; -- cutover: allow drop-column
ALTER TABLE orders DROP COLUMN total;
";
    assert_eq!(
        refused(sql),
        vec![(1, 1, Breaking::DropColumn), (2, 1, Breaking::DropColumn)]
    );
}

#[test]
fn schemas_sequences_types_truncates_and_required_keys_are_found() {
    let sql = "\
DROP SCHEMA reporting CASCADE;
DROP SEQUENCE orders_id_seq;
DROP TYPE mood;
TRUNCATE carts;
ALTER TABLE t ADD COLUMN id2 int PRIMARY KEY;
ALTER TABLE t ADD COLUMN id3 int PRIMARY KEY DEFAULT 0;
";
    assert_eq!(
        refused(sql),
        vec![
            (1, 1, Breaking::DropObject),
            (2, 1, Breaking::DropObject),
            (3, 1, Breaking::DropObject),
            (4, 1, Breaking::Truncate),
            (5, 1, Breaking::AddRequiredColumn),
        ]
    );
}

#[test]
fn mysql_change_modify_and_rename_table_are_found() {
    let sql = "\
ALTER TABLE users CHANGE COLUMN name full_name VARCHAR(200);
ALTER TABLE users MODIFY COLUMN age BIGINT NOT NULL;
RENAME TABLE carts TO baskets;
ALTER TABLE users ADD COLUMN nick VARCHAR(20);
";
    let report = lint_sql(Path::new("m.sql"), sql, SqlDialect::Mysql, &[]).unwrap();
    let got: Vec<_> = report.refused.iter().map(|f| (f.line, f.kind)).collect();
    assert_eq!(
        got,
        vec![
            (1, Breaking::RenameColumn),
            (1, Breaking::ChangeType),
            (2, Breaking::ChangeType),
            (2, Breaking::SetNotNull),
            (3, Breaking::RenameTable),
        ]
    );
}

#[test]
fn new_constraints_and_renamed_types_are_found() {
    let sql = "\
ALTER TABLE orders ADD CONSTRAINT total_set CHECK (total IS NOT NULL);
ALTER TABLE users ADD CONSTRAINT users_email UNIQUE (email);
ALTER TABLE orders ADD CONSTRAINT orders_user FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;
CREATE UNIQUE INDEX CONCURRENTLY users_handle ON users (handle);
CREATE INDEX users_name ON users (name);
ALTER TYPE mood RENAME TO feeling;
ALTER TYPE mood RENAME VALUE 'sad' TO 'blue';
ALTER TYPE mood ADD VALUE 'calm';
";
    assert_eq!(
        refused(sql),
        vec![
            (1, 1, Breaking::AddConstraint),
            (2, 1, Breaking::AddConstraint),
            (3, 1, Breaking::AddConstraint),
            (4, 1, Breaking::AddConstraint),
            (6, 1, Breaking::RenameObject),
            (7, 1, Breaking::RenameObject),
        ]
    );
    let report = lint(sql);
    assert!(
        report.refused[3].what.contains("CREATE UNIQUE INDEX ON users")
            && report.refused[0].what.contains("CHECK (total IS NOT NULL)"),
        "{:?}",
        report.refused
    );
    // Allowed per statement, as the other kinds.
    let allowed = "-- cutover: allow add-constraint\nALTER TABLE users ADD CONSTRAINT users_email UNIQUE (email);\n";
    assert!(lint(allowed).refused.is_empty());
}
