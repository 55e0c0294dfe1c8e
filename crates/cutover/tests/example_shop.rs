//! The worked example in `examples/shop`, run as its README says: two services on a real
//! PostgreSQL, released together, with v2's schema change in phases.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli_at, free_port, get_host, kill_marked, output_text, serve_marked, wait_until, Proc};
use cutover_control::testing::postgres::PgServer;

const V1_PAGE: &str = "shop web v1 / api v1: tea (T-01), coffee (C-07), cocoa (K-12)";
const V2_PAGE: &str = "shop web v2 / api v2: tea 2.50, coffee 3.20, cocoa 2.90";

struct Shop {
    _daemon: Proc,
    marker: String,
    pg: PgServer,
    _dir: tempfile::TempDir,
    config: PathBuf,
    front: SocketAddr,
}

impl Drop for Shop {
    fn drop(&mut self) {
        kill_marked(&self.marker);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

impl Shop {
    /// The example copied to a temporary directory, on a free port, with `keep_warm` and the
    /// watch shortened so that the contract step comes within the test.
    fn start() -> Shop {
        let pg = PgServer::start();
        let dir = tempfile::tempdir().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop");
        copy_dir(&example, dir.path());
        let port = free_port();
        let config = dir.path().join("cutover.toml");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("keep_warm = \"1m\"", "keep_warm = \"2s\"")
            .replace("duration = \"10s\"", "duration = \"500ms\"");
        std::fs::write(&config, text).unwrap();
        let marker = format!("shop-{}-{port}", std::process::id());
        let daemon = serve_marked(&config, &marker, &[("SHOP_DATABASE_URL", pg.url())]);
        Shop {
            _daemon: Proc(daemon),
            marker: format!("CUTOVER_TEST_OWNER={marker}"),
            pg,
            _dir: dir,
            config,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.config, args)
    }

    fn page(&self) -> Option<(u16, String)> {
        get_host(self.front, "shop.test")
    }
}

#[test]
fn the_shop_example_releases_both_services_with_its_schema_in_phases() {
    let shop = Shop::start();
    let out = shop.cli(&["deploy", "web", "api", "--version", "v1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(shop.page(), Some((200, V1_PAGE.into())));

    // v2 under load: every page is a whole v1 or a whole v2 page, none fails, no v1 after v2.
    let stop = Arc::new(AtomicBool::new(false));
    let front = shop.front;
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut pages, mut failures) = (Vec::new(), Vec::new());
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) && pages.len() < 5000 {
                let stream = TcpStream::connect(front).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                writer
                    .write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
                    .unwrap();
                match common::read_answer(&mut reader) {
                    Ok((200, page)) => pages.push(page),
                    other => failures.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (pages, failures)
        })
    };
    let out = shop.cli(&["deploy", "web", "api", "--version", "v2"]);
    let said = output_text(&out);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (pages, failures) = load.join().unwrap();
    assert!(out.status.success(), "{said}");
    for expected in [
        "expand: `./migrate.sh expand` exited with exit status: 0",
        "migrations/v2-expand.sql: ran",
        "check: the smoke test passed against the live route",
        "switched in one store",
    ] {
        assert!(said.contains(expected), "{expected:?} in {said}");
    }
    assert!(failures.is_empty(), "{:?}", &failures[..failures.len().min(5)]);
    assert!(pages.iter().all(|p| p == V1_PAGE || p == V2_PAGE), "{pages:?}");
    let first_v2 = pages.iter().position(|p| p == V2_PAGE).expect("a v2 page under load");
    assert!(
        pages[first_v2..].iter().all(|p| p == V2_PAGE),
        "a v1 page after a v2 page"
    );
    assert!(pages[..first_v2].iter().any(|p| p == V1_PAGE));
    assert_eq!(shop.page(), Some((200, V2_PAGE.into())));

    // The contract waits for v1's retirement (keep_warm 2 s here), then drops legacy_code.
    let columns = || {
        shop.pg
            .psql("SELECT string_agg(column_name, ',' ORDER BY column_name) FROM information_schema.columns WHERE table_name = 'products'")
    };
    assert_eq!(columns(), "id,legacy_code,name,price_cents", "v1 is still warm");
    assert!(
        wait_until(Duration::from_secs(15), || columns() == "id,name,price_cents"),
        "contract did not run: {}",
        columns()
    );
    assert_eq!(shop.page(), Some((200, V2_PAGE.into())));
    // The column goes with the contract command; until the command exits and its step is
    // recorded, a rollback is refused as one that waits for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = shop.cli(&["rollback", "api"]);
        let said = output_text(&out);
        assert!(!out.status.success(), "{said}");
        if said.contains("the contract step of v2 ran") {
            break;
        }
        assert!(
            said.contains("the contract step of v2 (deployment 2) is running") && Instant::now() < deadline,
            "{said}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
