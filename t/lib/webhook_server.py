# webhook_server.py: the HTTP endpoint of the TAP tests, for the webhook, SMS
# and push channels. Usage: webhook_server.py PORT SECRET_FILE LOG_FILE STATUS_FILE
# Every POST is appended to LOG_FILE as one JSON line: path, the
# Idempotency-Key, Authorization, timestamp and signature headers, the body,
# whether the webhook signature verifies (HMAC-SHA256 over "<timestamp>.<body>"
# with the secret in SECRET_FILE, read at each request, compared in constant
# time) and the status returned: the number in STATUS_FILE, else 200.
import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, secret_file, log_file, status_file = sys.argv[1:5]
lock = threading.Lock()


def read(path, default):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        return default


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', '0')))
        secret = read(secret_file, b'').split(b'\n')[0]
        timestamp = self.headers.get('X-Eventshop-Timestamp', '')
        signature = self.headers.get('X-Eventshop-Signature', '')
        expected = 'v1=' + hmac.new(secret, timestamp.encode() + b'.' + body, hashlib.sha256).hexdigest()
        status = int(read(status_file, b'200').strip() or b'200')
        record = {
            'path': self.path,
            'id': self.headers.get('Idempotency-Key'),
            'authorization': self.headers.get('Authorization'),
            'content_type': self.headers.get('Content-Type'),
            'timestamp': timestamp,
            'signature': signature,
            'valid': bool(secret) and hmac.compare_digest(expected, signature),
            'body': body.decode('utf-8'),
            'status': status,
        }
        with lock:
            with open(log_file, 'a') as f:
                f.write(json.dumps(record) + '\n')
        reply = b'{"ok":true}' if status < 300 else b'{"error":"test says no"}'
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 256
ThreadingHTTPServer(('127.0.0.1', int(port)), Handler).serve_forever()
