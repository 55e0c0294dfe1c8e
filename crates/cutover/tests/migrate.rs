//! Schema changes in phases (`migrate`), through a real daemon, a real app on a real database
//! (SQLite, and PostgreSQL started by the test), and real commands: expand before the release's
//! instances start, the live release checked again after it, a rollback of the expand when that
//! check fails, contract once the old colour is retired, and the SQL lint before anything runs.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli_at, free_port, get_host, keep_alive_client, output_text, spawn_serve, wait_until, Proc};
use cutover_control::testing::postgres::PgServer;

/// How the app and the migrations reach the database: SQLite's `app.db`, or, when the file
/// `db-url` exists, the PostgreSQL server it names, through `psql`.
const DB: &str = r#"
import os, sqlite3, subprocess
def query(sql):
    if os.path.exists("db-url"):
        url = open("db-url").read().strip()
        out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-tAc", sql], capture_output=True, text=True)
        if out.returncode != 0:
            raise Exception(out.stderr.strip())
        return [l for l in out.stdout.splitlines() if l]
    db = sqlite3.connect("app.db", timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()
def script(path):
    if os.path.exists("db-url"):
        url = open("db-url").read().strip()
        out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-f", path], capture_output=True, text=True)
        if out.returncode != 0:
            raise Exception(out.stderr.strip())
        return
    db = sqlite3.connect("app.db", timeout=5)
    db.executescript(open(path).read())
    db.commit()
    db.close()
"#;

/// The app: `GET /` reads the items as its version needs them (v1 the column `name`, v2 and
/// later `title`) and answers `VERSION N` (500 when the query fails); `GET /up` answers 200.
const APP: &str = r#"
import http.server, os, sys
from db import query
version = os.environ["CUTOVER_VERSION"]
column = "name" if version == "v1" else "title"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status, body = 200, b"ok"
        if self.path != "/up":
            try:
                rows = query(f"SELECT {column} FROM items")
                body = f"{version} {len(rows)}".encode()
            except Exception as e:
                status, body = 500, f"{version} {e}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// The migrations: `python3 migrate.py STEP` runs `migrations/VERSION-STEP.sql` when it exists,
/// and prints what it ran.
const MIGRATE: &str = r#"
import os, sys
from db import script
step, version = sys.argv[1], os.environ["CUTOVER_VERSION"]
path = f"migrations/{version}-{step}.sql"
if not os.path.exists(path):
    print(f"{path}: nothing to run")
    sys.exit(0)
try:
    script(path)
except Exception as e:
    print(f"{path}: {e}", file=sys.stderr)
    sys.exit(3)
print(f"{path}: ran")
"#;

/// The database a test runs against.
enum Db {
    Sqlite,
    Postgres(PgServer),
}

struct Site {
    // The daemon stops first, then the database goes, then the directory.
    _daemon: Proc,
    db: Db,
    dir: tempfile::TempDir,
    config: PathBuf,
    front: SocketAddr,
}

impl Site {
    fn start(db: Db) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(dir.path().join("db.py"), DB).unwrap();
        std::fs::write(dir.path().join("app.py"), APP).unwrap();
        std::fs::write(dir.path().join("migrate.py"), MIGRATE).unwrap();
        let dialect = match &db {
            Db::Sqlite => "sqlite",
            Db::Postgres(pg) => {
                std::fs::write(dir.path().join("db-url"), pg.url()).unwrap();
                "postgres"
            }
        };
        std::fs::create_dir(dir.path().join("migrations")).unwrap();
        for (file, sql) in [
            (
                "v1-expand.sql",
                "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\n\
                 INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c');\n",
            ),
            // Additive: v1 keeps working, v2 reads the new column.
            (
                "v2-expand.sql",
                "ALTER TABLE items ADD COLUMN title TEXT;\nUPDATE items SET title = name;\n",
            ),
            // Only once v1 is retired.
            ("v2-contract.sql", "ALTER TABLE items DROP COLUMN name;\n"),
            // Destructive, told to pass the lint: the live check catches what it breaks.
            (
                "v3-expand.sql",
                "-- cutover: allow drop-column\nALTER TABLE items DROP COLUMN title;\n",
            ),
            (
                "v3-rollback.sql",
                "ALTER TABLE items ADD COLUMN title TEXT;\nUPDATE items SET title = 'restored';\n",
            ),
        ] {
            std::fs::write(dir.path().join("migrations").join(file), sql).unwrap();
        }
        let config = dir.path().join("cutover.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\
                 [services.web]\ncommand = \"exec python3 app.py\"\ninstances = 2\n\
                 health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n\
                 keep_warm = \"2s\"\n\
                 watch = {{ duration = \"500ms\", min_requests = 1 }}\n\
                 validate = {{ smoke = 'curl -sf -H \"X-Cutover-Preview: $CUTOVER_PREVIEW_TOKEN\" \"$CUTOVER_PREVIEW_URL/\"' }}\n\
                 migrate = {{ expand = \"python3 migrate.py expand\", contract = \"python3 migrate.py contract\", \
                 rollback = \"python3 migrate.py rollback\", files = \"migrations/*-expand.sql\", dialect = \"{dialect}\" }}\n"
            ),
        )
        .unwrap();
        let daemon = Proc(spawn_serve(&config));
        let site = Site {
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            db,
            dir,
            config,
            _daemon: daemon,
        };
        assert!(
            wait_until(Duration::from_secs(20), || site.cli(&["status"]).status.success()),
            "the daemon did not start"
        );
        site
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.config, args)
    }

    fn deploy(&self, version: &str) -> Output {
        self.cli(&["deploy", "web", "--version", version])
    }

    /// The steps of deployment `id`, as the admin API gives them.
    fn steps(&self, id: u64) -> serde_json::Value {
        let socket = self.dir.path().join("state/admin.sock");
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        write!(
            s,
            "GET /v1/services/web/deployments/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
    }

    /// The columns of table `items` now.
    fn columns(&self) -> Vec<String> {
        let text = match &self.db {
            Db::Postgres(pg) => pg
                .psql("SELECT string_agg(column_name, ' ') FROM information_schema.columns WHERE table_name = 'items'"),
            Db::Sqlite => {
                let out = Command::new("python3")
                    .args([
                        "-c",
                        "import sqlite3,sys; print(' '.join(r[1] for r in sqlite3.connect(sys.argv[1]).execute('PRAGMA table_info(items)')))",
                    ])
                    .arg(self.dir.path().join("app.db"))
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        };
        text.split_whitespace().map(str::to_string).collect()
    }
}

fn get(addr: SocketAddr) -> Option<(u16, String)> {
    get_host(addr, "test")
}

/// A keep-alive client sending GET / (see `common::keep_alive_client`).
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    keep_alive_client(addr, &["test"], stop)
}

/// The steps of a deployment's schema change, as the API lists them: (step, ok).
fn migration_steps(steps: &serde_json::Value) -> Vec<(String, bool)> {
    steps["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["kind"] == "migration")
        .map(|s| {
            let message = s["message"].as_str().unwrap_or_default();
            let step = message.split([':', ' ']).next().unwrap_or_default().to_string();
            (step, !message.contains(" failed: "))
        })
        .collect()
}

#[test]
fn schema_changes_run_in_phases_around_the_switch_on_sqlite() {
    schema_changes_run_in_phases_around_the_switch(Db::Sqlite);
}

#[test]
fn schema_changes_run_in_phases_around_the_switch_on_postgresql() {
    schema_changes_run_in_phases_around_the_switch(Db::Postgres(PgServer::start()));
}

fn schema_changes_run_in_phases_around_the_switch(db: Db) {
    let site = Site::start(db);

    // v1: its expand creates the table, before its instances start.
    let out = site.deploy("v1");
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(get(site.front), Some((200, "v1 3".to_string())));

    // v2 under load: an additive expand; v1 answers throughout, then v2.
    let stop = Arc::new(AtomicBool::new(false));
    let client = load(site.front, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let out = site.deploy("v2");
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    for expected in [
        "expand of v2: running `python3 migrate.py expand`",
        "expand: `python3 migrate.py expand` exited with exit status: 0",
        "migrations/v2-expand.sql: ran",
        "check: the smoke test passed against the live route",
    ] {
        assert!(said.contains(expected), "{expected:?} in {said}");
    }
    // The expand and the check come before the instances of v2.
    let (expand, instances) = (
        said.find("expand of v2").unwrap(),
        said.find("instances started on green").unwrap(),
    );
    assert!(
        expand < instances && said.find("check: ").unwrap() < instances,
        "{said}"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (answers, failures) = client.join().unwrap();
    assert!(
        failures.is_empty(),
        "failed while the schema changed: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(answers.iter().any(|a| a == "v1 3") && answers.last().map(String::as_str) == Some("v2 3"));
    let seen_v2 = answers.iter().position(|a| a == "v2 3").unwrap();
    assert!(answers[seen_v2..].iter().all(|a| a == "v2 3"), "v1 after v2");

    // v2's contract waits for v1's retirement (keep_warm 2 s), then runs.
    let went_live = Instant::now();
    assert!(site.columns().contains(&"name".to_string()), "{:?}", site.columns());
    let column_gone = || !site.columns().contains(&"name".to_string());
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!column_gone(), "contract ran while v1 was still warm");
    assert!(wait_until(Duration::from_secs(10), column_gone), "contract did not run");
    assert!(went_live.elapsed() >= Duration::from_millis(1500));
    // The column goes with the contract command; its step is recorded once the command exits.
    let contract_recorded = || migration_steps(&site.steps(2)).len() == 3;
    assert!(
        wait_until(Duration::from_secs(5), contract_recorded),
        "{}",
        site.steps(2)
    );
    let steps = site.steps(2);
    assert_eq!(
        migration_steps(&steps),
        vec![
            ("expand".to_string(), true),
            ("check".to_string(), true),
            ("contract".to_string(), true)
        ],
        "{steps}"
    );
    assert_eq!(
        get(site.front),
        Some((200, "v2 3".to_string())),
        "v2 works with the contracted schema"
    );

    // After the contract, no rollback to v1: it would need the column just dropped.
    let out = site.cli(&["rollback", "web"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("cannot roll back to v1: the contract step of v2 ran"),
        "{said}"
    );
    assert_eq!(get(site.front), Some((200, "v2 3".to_string())));

    // v3's expand breaks the live v2: the live check catches it before any v3 instance starts,
    // the expand's rollback runs, the deployment aborts, v2 serves again.
    let out = site.deploy("v3");
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("check failed: the smoke test against the live route"),
        "{said}"
    );
    assert!(
        said.contains("rollback: `python3 migrate.py rollback` exited with exit status: 0"),
        "{said}"
    );
    assert!(
        !said.contains("instances started on blue"),
        "no v3 instance started: {said}"
    );
    let history = output_text(&site.cli(&["history", "web", "--json"]));
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    let v3 = history
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["version"] == "v3")
        .unwrap_or_else(|| panic!("{history}"));
    assert!(
        v3["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("aborted: the live release failed its check after the schema change")),
        "{v3}"
    );
    assert_eq!(
        get(site.front),
        Some((200, "v2 3".to_string())),
        "v2 serves again after the rollback"
    );

    // An expand file that breaks the live release without being allowed: refused before
    // anything runs, with file:line; nothing recorded, v2 untouched.
    std::fs::write(
        site.dir.path().join("migrations/v4-expand.sql"),
        "ALTER TABLE items ADD COLUMN extra TEXT;\nDROP TABLE items;\n",
    )
    .unwrap();
    let before = site.cli(&["history", "web", "--json"]).stdout;
    let out = site.deploy("v4");
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("migrations/v4-expand.sql:2:1: DROP TABLE items (drop-table)"),
        "{said}"
    );
    assert_eq!(
        site.cli(&["history", "web", "--json"]).stdout,
        before,
        "nothing recorded"
    );
    assert_eq!(get(site.front), Some((200, "v2 3".to_string())));
}

/// A failing expand aborts the deployment before any instance starts; its output is in the
/// history; live traffic is untouched.
#[test]
fn a_failing_expand_aborts_with_its_output_kept() {
    let site = Site::start(Db::Sqlite);
    let out = site.deploy("v1");
    assert!(out.status.success(), "{}", output_text(&out));
    std::fs::write(
        site.dir.path().join("migrations/v2-expand.sql"),
        "ALTER TABLE no_such_table ADD COLUMN title TEXT;\n",
    )
    .unwrap();
    let out = site.deploy("v2");
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("expand failed: `python3 migrate.py expand` exited with exit status: 3"),
        "{said}"
    );
    assert!(
        said.contains("no such table: no_such_table"),
        "the output's tail: {said}"
    );
    assert!(!said.contains("instances started on green"), "{said}");
    let steps = site.steps(2);
    assert_eq!(migration_steps(&steps), vec![("expand".to_string(), false)], "{steps}");
    assert!(steps.to_string().contains("no such table: no_such_table"), "{steps}");
    assert_eq!(get(site.front), Some((200, "v1 3".to_string())));
}
