"""The shop's api service: products from PostgreSQL, as its version reads them.

v1 reads `name` and `legacy_code`; v2 reads `name` and `price_cents` (added by v2's expand) and
no longer needs `legacy_code` (dropped by v2's contract, once v1 is retired).
"""
import http.server, json, os, subprocess

VERSION = os.environ.get("CUTOVER_VERSION", "v1")
DATABASE = os.environ.get("SHOP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
COLUMNS = "id, name, legacy_code" if VERSION == "v1" else "id, name, price_cents"


def products():
    sql = f"SELECT json_agg(p ORDER BY id) FROM (SELECT {COLUMNS} FROM products) p"
    out = subprocess.run(["psql", DATABASE, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
                         capture_output=True, text=True, timeout=5)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return json.loads(out.stdout.strip() or "[]") or []


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status, body = 200, b"ok"
        if self.path == "/products":
            try:
                body = json.dumps({"version": VERSION, "products": products()}).encode()
            except Exception as e:
                status, body = 500, json.dumps({"version": VERSION, "error": str(e)}).encode()
        elif self.path != "/up":
            status, body = 404, b"not found"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
