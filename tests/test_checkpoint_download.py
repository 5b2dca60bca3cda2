"""A checkpoint URL the server refuses: `main.py --eval --resume URL` stops with one error line
naming the URL, the HTTP status and, for Azure-style XML errors, the error code (the original
release host answers PublicAccessNotPermitted), and leaves nothing in the download cache."""
import concurrent.futures
import http.server
import os
import threading

import pytest

from helpers import run_main, write_config, write_image_folder

AZURE_REFUSAL = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>PublicAccessNotPermitted</Code>'
                 b'<Message>Public access is not permitted on this storage account.\n'
                 b'RequestId:0c1f Time:2024-11-18T00:47:30.1594977Z</Message></Error>')
AZURE_FORBIDDEN = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationFailure</Code>'
                   b'<Message>This request is not authorized to perform this operation.</Message>'
                   b'</Error>')
# path: (status, body, what the error line says after "the server answered")
ANSWERS = {
    '/refused/focal-tiny-is224-ws7.pth': (
        409, AZURE_REFUSAL, 'HTTP 409 Conflict: PublicAccessNotPermitted (Public access is not '
                            'permitted on this storage account.)'),
    '/forbidden/focal-tiny-is224-ws7.pth': (
        403, AZURE_FORBIDDEN, 'HTTP 403 Forbidden: AuthorizationFailure (This request is not '
                              'authorized to perform this operation.)'),
    '/missing/focal-tiny-is224-ws7.pth': (404, b'<html>no such file</html>', 'HTTP 404 Not Found'),
}


class RefusingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status, body, _ = ANSWERS[self.path]
        self.send_response(status)
        self.send_header('Content-Type', 'application/xml')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), RefusingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


def test_refused_download_is_one_line_naming_url_and_answer(tmp_path, server):
    data = write_image_folder(tmp_path / 'data', n_train=1, n_val=1)
    cfg = write_config(tmp_path / 'tiny.yaml')

    def evaluate(path):
        url = server + path
        return url, run_main(tmp_path, ['--cfg', cfg, '--data-path', data, '--eval',
                                        '--output', str(tmp_path / 'out'), '--resume', url])

    # the three runs are mostly interpreter start-up: run them side by side
    with concurrent.futures.ThreadPoolExecutor(len(ANSWERS)) as pool:
        outcomes = dict(zip(ANSWERS, pool.map(evaluate, ANSWERS)))
    for path, (url, result) in outcomes.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert lines == [f"error: cannot download checkpoint {url}: the server answered "
                         f"{ANSWERS[path][2]}"], result.stderr[-2000:]
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'  # TORCH_HOME of helpers.run_main
    assert not os.path.isdir(cache) or os.listdir(cache) == []
