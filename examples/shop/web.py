"""The shop's web service: a page of products, read from the api service of its own colour.

It calls api through cutover with the headers that keep it on its own colour (see the README's
"Same-colour calls between services"): green web talks to green api while green is validated.
"""
import http.server, json, os, urllib.request

VERSION = os.environ.get("CUTOVER_VERSION", "v1")
COLOUR = os.environ.get("CUTOVER_COLOUR", "blue")


def products():
    request = urllib.request.Request(os.environ["CUTOVER_PEER_URL"] + "/products", headers={
        "Host": "api.shop.test",
        "X-Cutover-Preview": os.environ["CUTOVER_PEER_TOKEN"],
        "X-Cutover-Colour": COLOUR,
    })
    return json.loads(urllib.request.urlopen(request, timeout=5).read())


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status, body = 200, "ok"
        if self.path == "/":
            try:
                answer = products()
                if VERSION == "v1":
                    items = ", ".join(f"{p['name']} ({p['legacy_code']})" for p in answer["products"])
                else:
                    items = ", ".join(f"{p['name']} {p['price_cents'] / 100:.2f}" for p in answer["products"])
                body = f"shop web {VERSION} / api {answer['version']}: {items}"
            except Exception as e:
                status, body = 502, f"shop web {VERSION}: api failed: {e}"
        elif self.path != "/up":
            status, body = 404, "not found"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
