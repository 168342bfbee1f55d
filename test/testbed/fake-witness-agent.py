#!/usr/bin/python3
# TEST-ONLY stand-in for "ftkvm-agent witness" while the agent has no witness command: lets the
# converge test run the ftkvm_witness role (binary, shared token, hardened unit, firewall port,
# /health wait) on the witness container. It answers GET /health and nothing else; the pair
# runs in two-node mode then. Accepts exactly the witness command line of the role's unit.
import argparse, http.server, json, os, sys

if len(sys.argv) < 2 or sys.argv[1] != 'witness':
    print('fake ftkvm-agent: only "witness" is implemented', file=sys.stderr)
    sys.exit(2)
p = argparse.ArgumentParser(prog='ftkvm-agent witness')
p.add_argument('--listen', required=True)
p.add_argument('--data-dir', required=True)
p.add_argument('--token-file', required=True)
a = p.parse_args(sys.argv[2:])
token = open(a.token_file).read().strip()
if len(token) < 16:
    sys.exit(2)
host, port = a.listen.rsplit(':', 1)
os.makedirs(a.data_dir, exist_ok=True)


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code, body = (200, {'healthy': True, 'role': 'witness', 'fake': True}) if self.path == '/health' else (404, {'error': 'not found'})
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header('content-type', 'application/json')
        self.send_header('content-length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((host.strip('[]'), int(port)), H).serve_forever()
