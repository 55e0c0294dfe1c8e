//! The lint of SQL migration files for the expand phase: statements that break the version still
//! running (which reads and writes the old schema until the switch, and afterwards while an
//! instant rollback to it is possible) are reported with file:line before anything runs.
//!
//! The files are parsed with a real SQL parser (`sqlparser`, PostgreSQL's dialect by default),
//! statement by statement; a file that does not parse is an error naming the file, line and
//! column, not something skipped. What breaks the old version:
//!
//! | kind | statement | why |
//! | --- | --- | --- |
//! | `drop-table` | `DROP TABLE` | it still reads and writes the table |
//! | `drop-view` | `DROP VIEW`, `DROP MATERIALIZED VIEW` | it still reads the view |
//! | `drop-column` | `ALTER TABLE ... DROP COLUMN` | its queries name the column |
//! | `rename-table` | `ALTER TABLE ... RENAME TO` | its queries name the old table |
//! | `rename-column` | `ALTER TABLE ... RENAME COLUMN` | its queries name the old column |
//! | `change-type` | `ALTER TABLE ... ALTER COLUMN ... TYPE` | its values may no longer fit, and the rewrite locks the table |
//! | `set-not-null` | `ALTER TABLE ... ALTER COLUMN ... SET NOT NULL`, unless a default was set for that column earlier in the files | its inserts that leave the column out fail |
//! | `add-required-column` | `ALTER TABLE ... ADD COLUMN ... NOT NULL` without `DEFAULT` | its inserts do not know the column and fail |
//! | `drop-default` | `ALTER TABLE ... ALTER COLUMN ... DROP DEFAULT` | its inserts that rely on the default fail |
//! | `drop-object` | `DROP SCHEMA`, `DROP SEQUENCE`, `DROP TYPE` | it may use it (a schema's tables, a sequence behind a serial column, a column's type) |
//! | `truncate` | `TRUNCATE` | its data is deleted under it |
//!
//! MySQL's `CHANGE COLUMN` and `MODIFY COLUMN` count as the renames, type changes and `NOT NULL`
//! they make, and `RENAME TABLE` as a rename; a column added as `PRIMARY KEY` without a default
//! is a required column.
//!
//! Each belongs in the contract phase, after the old version is retired. A statement that must
//! run in expand anyway is allowed with a comment on a line of its own before it (after the
//! statement before it has ended, on a later line), `-- cutover: allow drop-column` (several kinds
//! separated by commas or spaces), or for every statement of its kind by the caller's `allow`
//! list. A comment at the end of a statement's line allows nothing: it would otherwise allow the
//! statement after it.

use std::fmt;
use std::path::{Path, PathBuf};

use sqlparser::ast::{
    AlterColumnOperation, AlterTableOperation, AlterTypeOperation, ColumnOption, ObjectType, Spanned, Statement,
};
use sqlparser::dialect::{Dialect, GenericDialect, MySqlDialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, Tokenizer, Whitespace};

/// What a statement does that the running version does not survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Breaking {
    DropTable,
    DropView,
    DropColumn,
    RenameTable,
    RenameColumn,
    ChangeType,
    SetNotNull,
    AddRequiredColumn,
    DropDefault,
    DropObject,
    Truncate,
    AddConstraint,
    RenameObject,
}

impl Breaking {
    pub const ALL: [Breaking; 13] = [
        Breaking::DropTable,
        Breaking::DropView,
        Breaking::DropColumn,
        Breaking::RenameTable,
        Breaking::RenameColumn,
        Breaking::ChangeType,
        Breaking::SetNotNull,
        Breaking::AddRequiredColumn,
        Breaking::DropDefault,
        Breaking::DropObject,
        Breaking::Truncate,
        Breaking::AddConstraint,
        Breaking::RenameObject,
    ];

    /// The name used in `allow` lists and comments.
    pub fn name(self) -> &'static str {
        match self {
            Breaking::DropTable => "drop-table",
            Breaking::DropView => "drop-view",
            Breaking::DropColumn => "drop-column",
            Breaking::RenameTable => "rename-table",
            Breaking::RenameColumn => "rename-column",
            Breaking::ChangeType => "change-type",
            Breaking::SetNotNull => "set-not-null",
            Breaking::AddRequiredColumn => "add-required-column",
            Breaking::DropDefault => "drop-default",
            Breaking::DropObject => "drop-object",
            Breaking::Truncate => "truncate",
            Breaking::AddConstraint => "add-constraint",
            Breaking::RenameObject => "rename-object",
        }
    }

    pub fn from_name(name: &str) -> Option<Breaking> {
        Breaking::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Why the running version breaks.
    fn why(self) -> &'static str {
        match self {
            Breaking::DropTable => "the running version still reads and writes the table",
            Breaking::DropView => "the running version still reads the view",
            Breaking::DropColumn => "the running version's queries still name the column",
            Breaking::RenameTable => "the running version's queries still name the table by its old name",
            Breaking::RenameColumn => "the running version's queries still name the column by its old name",
            Breaking::ChangeType => {
                "the running version's values may no longer fit the new type (and the rewrite locks the table)"
            }
            Breaking::SetNotNull => {
                "the running version's inserts that leave the column out fail (no default is set for it)"
            }
            Breaking::AddRequiredColumn => {
                "the running version's inserts do not know the column and fail (NOT NULL without DEFAULT)"
            }
            Breaking::DropDefault => "the running version's inserts that rely on the default fail",
            Breaking::DropObject => {
                "the running version may use it (a schema's tables, a sequence behind a serial column, a column's type)"
            }
            Breaking::Truncate => "the running version's data is deleted under it",
            Breaking::AddConstraint => {
                "the running version was written without it: its writes that do not satisfy it fail \
                 (a missing value, a duplicate, a row without its parent)"
            }
            Breaking::RenameObject => {
                "the running version still uses the old name (a column's type, an enum value it writes)"
            }
        }
    }

    /// What to do instead.
    fn instead(self) -> &'static str {
        match self {
            Breaking::AddRequiredColumn => "add it with a DEFAULT, or nullable now and NOT NULL in the contract phase",
            Breaking::SetNotNull => "set a DEFAULT for it first, or move this to the contract phase",
            Breaking::RenameTable | Breaking::RenameColumn => {
                "add the new name beside the old one now (and copy), drop the old one in the contract phase"
            }
            Breaking::ChangeType => "add a column of the new type now, drop the old one in the contract phase",
            Breaking::AddConstraint => {
                "move it to the contract phase, or allow it (`-- cutover: allow add-constraint`) if the running \
                 version's writes already satisfy it"
            }
            Breaking::RenameObject => "add the new name beside the old one now, drop the old one in the contract phase",
            _ => "move it to the contract phase",
        }
    }
}

impl fmt::Display for Breaking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The SQL dialect the files are parsed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqlDialect {
    #[default]
    Postgres,
    Sqlite,
    Mysql,
    Generic,
}

impl SqlDialect {
    pub const NAMES: &'static str = "postgres, sqlite, mysql or generic";

    pub fn from_name(name: &str) -> Option<SqlDialect> {
        match name {
            "postgres" | "postgresql" => Some(SqlDialect::Postgres),
            "sqlite" => Some(SqlDialect::Sqlite),
            "mysql" => Some(SqlDialect::Mysql),
            "generic" => Some(SqlDialect::Generic),
            _ => None,
        }
    }

    fn dialect(self) -> Box<dyn Dialect> {
        match self {
            SqlDialect::Postgres => Box::new(PostgreSqlDialect {}),
            SqlDialect::Sqlite => Box::new(SQLiteDialect {}),
            SqlDialect::Mysql => Box::new(MySqlDialect {}),
            SqlDialect::Generic => Box::new(GenericDialect {}),
        }
    }
}

/// One statement that breaks the running version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    /// Where the statement begins, 1-based.
    pub line: u64,
    pub column: u64,
    pub kind: Breaking,
    /// What it does, e.g. `DROP COLUMN users.email`.
    pub what: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {} ({}): {}; {}, or allow it with `-- cutover: allow {}` on the line before it",
            self.file.display(),
            self.line,
            self.column,
            self.what,
            self.kind,
            self.kind.why(),
            self.kind.instead(),
            self.kind
        )
    }
}

/// What a lint found: every statement that breaks the running version, and those of them that
/// are allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The files read, in the order they run (by name).
    pub files: Vec<PathBuf>,
    pub statements: usize,
    /// Not allowed: the expand phase must not run.
    pub refused: Vec<Finding>,
    /// Allowed by a comment or the allow list.
    pub allowed: Vec<Finding>,
}

/// Why the files could not be linted. Nothing ran.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LintError {
    #[error("{pattern:?} is not a usable file pattern: {message}")]
    Pattern { pattern: String, message: String },
    #[error("no file matches {pattern:?} (relative to {dir}); check the pattern, e.g. \"migrations/*.sql\"")]
    NoFiles { pattern: String, dir: String },
    #[error("cannot read {file}: {message}")]
    Read { file: String, message: String },
    #[error("{file}:{line}:{column}: not SQL the {dialect} parser understands: {message}; fix the statement, or set the dialect the files are written in ({names})", names = SqlDialect::NAMES)]
    Parse {
        file: String,
        line: u64,
        column: u64,
        dialect: String,
        message: String,
    },
}

/// Lints every file matching `patterns` (globs, relative to `dir`), in name order as one
/// sequence: a default set in an earlier file counts for a later `SET NOT NULL`.
pub fn lint_files(
    patterns: &[String],
    dir: &Path,
    dialect: SqlDialect,
    allow: &[Breaking],
) -> Result<Report, LintError> {
    let mut files = Vec::new();
    for pattern in patterns {
        let full = dir.join(pattern);
        let text = full.to_string_lossy().into_owned();
        let matched = glob::glob(&text).map_err(|e| LintError::Pattern {
            pattern: pattern.clone(),
            message: e.to_string(),
        })?;
        let before = files.len();
        for entry in matched {
            let path = entry.map_err(|e| LintError::Read {
                file: e.path().display().to_string(),
                message: e.error().to_string(),
            })?;
            if path.is_file() {
                files.push(path);
            }
        }
        if files.len() == before {
            return Err(LintError::NoFiles {
                pattern: pattern.clone(),
                dir: match dir.as_os_str().is_empty() {
                    true => "the current directory".to_string(),
                    false => dir.display().to_string(),
                },
            });
        }
    }
    files.sort();
    files.dedup();
    let mut lint = Lint {
        dialect,
        allow,
        defaults: Vec::new(),
        report: Report::default(),
    };
    for file in &files {
        let sql = std::fs::read_to_string(file).map_err(|e| LintError::Read {
            file: file.display().to_string(),
            message: e.to_string(),
        })?;
        lint.file(file, &sql)?;
    }
    lint.report.files = files;
    Ok(lint.report)
}

/// Lints one file's text.
pub fn lint_sql(file: &Path, sql: &str, dialect: SqlDialect, allow: &[Breaking]) -> Result<Report, LintError> {
    let mut lint = Lint {
        dialect,
        allow,
        defaults: Vec::new(),
        report: Report::default(),
    };
    lint.file(file, sql)?;
    lint.report.files = vec![file.to_path_buf()];
    Ok(lint.report)
}

struct Lint<'a> {
    dialect: SqlDialect,
    allow: &'a [Breaking],
    /// (table, column) pairs given a default so far, lower-case.
    defaults: Vec<(String, String)>,
    report: Report,
}

/// Where a statement begins and the kinds its comment allows.
struct Start {
    at: Location,
    allows: Vec<Breaking>,
}

impl Lint<'_> {
    fn file(&mut self, file: &Path, sql: &str) -> Result<(), LintError> {
        let dialect = self.dialect.dialect();
        let parse_error = |message: String| {
            let (line, column) = error_location(&message);
            LintError::Parse {
                file: file.display().to_string(),
                line,
                column,
                dialect: format!("{:?}", self.dialect).to_lowercase(),
                message,
            }
        };
        let tokens = Tokenizer::new(dialect.as_ref(), sql)
            .tokenize_with_location()
            .map_err(|e| parse_error(e.to_string()))?;
        let statements = Parser::new(dialect.as_ref())
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements())
            .map_err(|e| parse_error(e.to_string()))?;
        let starts = starts(&tokens);
        for (i, statement) in statements.iter().enumerate() {
            self.report.statements += 1;
            // The statement's first token; the parser's own span when the two disagree on how
            // many statements there are (it starts at a name, not at the keyword).
            let (at, allows) = match starts.get(i).filter(|_| starts.len() == statements.len()) {
                Some(s) => (s.at, s.allows.clone()),
                None => (statement.span().start, Vec::new()),
            };
            for (kind, what) in self.breaking(statement) {
                let finding = Finding {
                    file: file.to_path_buf(),
                    line: at.line,
                    column: at.column,
                    kind,
                    what,
                };
                if allows.contains(&kind) || self.allow.contains(&kind) {
                    self.report.allowed.push(finding);
                } else {
                    self.report.refused.push(finding);
                }
            }
        }
        Ok(())
    }

    /// What `statement` does that breaks the running version; notes the defaults it sets.
    fn breaking(&mut self, statement: &Statement) -> Vec<(Breaking, String)> {
        let mut out = Vec::new();
        match statement {
            Statement::Drop { object_type, names, .. } => {
                let kind = match object_type {
                    ObjectType::Table => Some((Breaking::DropTable, "DROP TABLE")),
                    ObjectType::View | ObjectType::MaterializedView => Some((Breaking::DropView, "DROP VIEW")),
                    ObjectType::Schema => Some((Breaking::DropObject, "DROP SCHEMA")),
                    ObjectType::Sequence => Some((Breaking::DropObject, "DROP SEQUENCE")),
                    ObjectType::Type => Some((Breaking::DropObject, "DROP TYPE")),
                    _ => None,
                };
                if let Some((kind, what)) = kind {
                    for name in names {
                        out.push((kind, format!("{what} {name}")));
                    }
                }
            }
            Statement::RenameTable(renames) => {
                for r in renames {
                    out.push((
                        Breaking::RenameTable,
                        format!("RENAME TABLE {} TO {}", r.old_name, r.new_name),
                    ));
                }
            }
            Statement::CreateIndex(index) if index.unique => {
                out.push((
                    Breaking::AddConstraint,
                    format!("CREATE UNIQUE INDEX ON {}", index.table_name),
                ));
            }
            Statement::AlterType(alter) => match &alter.operation {
                AlterTypeOperation::Rename(r) => out.push((
                    Breaking::RenameObject,
                    format!("ALTER TYPE {} RENAME TO {}", alter.name, r.new_name),
                )),
                AlterTypeOperation::RenameValue(r) => out.push((
                    Breaking::RenameObject,
                    format!("ALTER TYPE {} RENAME VALUE {} TO {}", alter.name, r.from, r.to),
                )),
                AlterTypeOperation::AddValue(_) => {}
            },
            Statement::Truncate(t) => {
                for target in &t.table_names {
                    out.push((Breaking::Truncate, format!("TRUNCATE {}", target.name)));
                }
            }
            Statement::AlterTable(alter) => {
                let table = alter.name.to_string();
                for op in &alter.operations {
                    match op {
                        AlterTableOperation::DropColumn { column_names, .. } => {
                            for c in column_names {
                                out.push((Breaking::DropColumn, format!("DROP COLUMN {table}.{c}")));
                            }
                        }
                        AlterTableOperation::RenameColumn {
                            old_column_name,
                            new_column_name,
                        } => out.push((
                            Breaking::RenameColumn,
                            format!("RENAME COLUMN {table}.{old_column_name} TO {new_column_name}"),
                        )),
                        AlterTableOperation::RenameTable { table_name } => {
                            out.push((Breaking::RenameTable, format!("RENAME TABLE {table} {table_name}")))
                        }
                        AlterTableOperation::AlterColumn { column_name, op } => {
                            let column = column_name.value.to_lowercase();
                            match op {
                                AlterColumnOperation::SetDataType { data_type, .. } => out.push((
                                    Breaking::ChangeType,
                                    format!("ALTER COLUMN {table}.{column_name} TYPE {data_type}"),
                                )),
                                AlterColumnOperation::SetNotNull if !self.has_default(&table, &column) => {
                                    out.push((
                                        Breaking::SetNotNull,
                                        format!("ALTER COLUMN {table}.{column_name} SET NOT NULL"),
                                    ));
                                }
                                AlterColumnOperation::SetDefault { .. } => {
                                    self.defaults.push((table.to_lowercase(), column));
                                }
                                AlterColumnOperation::DropDefault => {
                                    self.defaults
                                        .retain(|(t, c)| !(*t == table.to_lowercase() && *c == column));
                                    out.push((
                                        Breaking::DropDefault,
                                        format!("ALTER COLUMN {table}.{column_name} DROP DEFAULT"),
                                    ));
                                }
                                _ => {}
                            }
                        }
                        AlterTableOperation::ChangeColumn {
                            old_name,
                            new_name,
                            data_type,
                            options,
                            ..
                        } => {
                            if old_name.value.to_lowercase() != new_name.value.to_lowercase() {
                                out.push((
                                    Breaking::RenameColumn,
                                    format!("CHANGE COLUMN {table}.{old_name} TO {new_name}"),
                                ));
                            }
                            out.push((
                                Breaking::ChangeType,
                                format!("CHANGE COLUMN {table}.{new_name} {data_type}"),
                            ));
                            if required(options.iter()) {
                                out.push((
                                    Breaking::SetNotNull,
                                    format!("CHANGE COLUMN {table}.{new_name} NOT NULL without DEFAULT"),
                                ));
                            }
                        }
                        AlterTableOperation::ModifyColumn {
                            col_name,
                            data_type,
                            options,
                            ..
                        } => {
                            out.push((
                                Breaking::ChangeType,
                                format!("MODIFY COLUMN {table}.{col_name} {data_type}"),
                            ));
                            if required(options.iter()) {
                                out.push((
                                    Breaking::SetNotNull,
                                    format!("MODIFY COLUMN {table}.{col_name} NOT NULL without DEFAULT"),
                                ));
                            }
                        }
                        AlterTableOperation::AddConstraint { constraint, .. } => {
                            out.push((Breaking::AddConstraint, format!("ALTER TABLE {table} ADD {constraint}")));
                        }
                        AlterTableOperation::AddColumn { column_def, .. } => {
                            let options = || column_def.options.iter().map(|o| &o.option);
                            let not_null = required(options());
                            let default = options().any(|o| matches!(o, ColumnOption::Default(_)));
                            let column = column_def.name.value.to_lowercase();
                            if default {
                                self.defaults.push((table.to_lowercase(), column));
                            } else if not_null {
                                out.push((
                                    Breaking::AddRequiredColumn,
                                    format!("ADD COLUMN {table}.{} NOT NULL without DEFAULT", column_def.name),
                                ));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        out
    }

    fn has_default(&self, table: &str, column: &str) -> bool {
        let table = table.to_lowercase();
        self.defaults.iter().any(|(t, c)| *t == table && c == column)
    }
}

/// Whether column options make a value required (NOT NULL or PRIMARY KEY) without giving a
/// default.
fn required<'a>(options: impl Iterator<Item = &'a ColumnOption> + Clone) -> bool {
    let default = options.clone().any(|o| matches!(o, ColumnOption::Default(_)));
    let mut options = options;
    let needed = options.any(|o| matches!(o, ColumnOption::NotNull | ColumnOption::PrimaryKey(_)));
    needed && !default
}

/// Where each statement of `tokens` begins (its first token that is neither a blank, a comment
/// nor a `;`), with the kinds allowed by a `-- cutover: allow ...` comment since the statement
/// before it.
fn starts(tokens: &[sqlparser::tokenizer::TokenWithSpan]) -> Vec<Start> {
    let mut starts = Vec::new();
    let mut inside = false;
    let mut allows = Vec::new();
    // The line the statement before ended on: a comment there trails it.
    let mut ended_on = 0;
    for t in tokens {
        match &t.token {
            Token::SemiColon => {
                inside = false;
                allows.clear();
                ended_on = t.span.end.line;
            }
            Token::Whitespace(Whitespace::SingleLineComment { comment, .. })
                if !inside && t.span.start.line > ended_on =>
            {
                allows.extend(allowed_in(comment));
            }
            Token::Whitespace(Whitespace::MultiLineComment(comment)) if !inside && t.span.start.line > ended_on => {
                allows.extend(allowed_in(comment));
            }
            Token::Whitespace(_) | Token::EOF => {}
            _ if !inside => {
                inside = true;
                starts.push(Start {
                    at: t.span.start,
                    allows: std::mem::take(&mut allows),
                });
            }
            _ => {}
        }
    }
    starts
}

/// The kinds a comment allows: `cutover: allow drop-column, rename-column`.
fn allowed_in(comment: &str) -> Vec<Breaking> {
    let Some(rest) = comment.trim().strip_prefix("cutover:") else {
        return Vec::new();
    };
    let Some(list) = rest.trim().strip_prefix("allow") else {
        return Vec::new();
    };
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|name| Breaking::from_name(name.trim()))
        .collect()
}

/// The line and column in a parser error (`... at Line: 2, Column: 13`), or 0 and 0.
fn error_location(message: &str) -> (u64, u64) {
    let number_after = |key: &str| {
        message.rfind(key).and_then(|i| {
            let digits: String = message[i + key.len()..]
                .chars()
                .skip_while(|c| c.is_whitespace())
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
    };
    (number_after("Line:").unwrap_or(0), number_after("Column:").unwrap_or(0))
}

#[cfg(test)]
mod tests;
