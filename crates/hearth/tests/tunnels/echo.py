# A service for the port proxy's test, run in the guest on 127.0.0.1 unless a second
# argument names the address to listen on:
#   GET /headers  -> the request's headers as JSON
#   GET /peer     -> the address and port the request's connection comes from (sshd's
#                    loopback one per channel, or the host's bridge address when direct)
#   GET /         -> a page that loads /app.js by its absolute path (as apps' pages do)
#   POST /sha256  -> the SHA-256 of the request body (streamed), and its length
#   GET /ws       -> a WebSocket that echoes every text or binary message
import base64, hashlib, http.server, json, struct, sys

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/peer":
            host, port = self.client_address[:2]
            self.answer(200, json.dumps({"host": host, "port": port}).encode())
        elif self.path == "/":
            self.answer(200, b'<script src="/app.js"></script>', "text/html")
        elif self.path == "/app.js":
            self.answer(200, b"document.title = 'app';", "text/javascript")
        elif self.path == "/headers":
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.answer(200, json.dumps(headers).encode())
        elif self.path == "/cookies":
            self.send_response(200)
            self.send_header("Set-Cookie", "hearth_session=from-the-guest; Path=/")
            self.send_header("Set-Cookie", "app=1; Path=/")
            self.send_header("Clear-Site-Data", '"cookies"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.websocket()
        else:
            self.answer(404, b"{}")

    def do_POST(self):
        digest, left, seen = hashlib.sha256(), int(self.headers["Content-Length"]), 0
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
            seen += len(chunk)
        self.answer(200, json.dumps({"sha256": digest.hexdigest(), "bytes": seen}).encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"] + GUID
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            op, n = head[0] & 15, head[1] & 127
            if n == 126:
                n = struct.unpack(">H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 128 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if op == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            if op in (1, 2):
                if n < 126:
                    size = bytes([n])
                elif n < 65536:
                    size = bytes([126]) + struct.pack(">H", n)
                else:
                    size = bytes([127]) + struct.pack(">Q", n)
                self.wfile.write(bytes([0x80 | op]) + size + data)
                self.wfile.flush()


address = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
http.server.ThreadingHTTPServer((address, int(sys.argv[1])), Handler).serve_forever()
