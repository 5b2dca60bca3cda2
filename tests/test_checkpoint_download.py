"""Checkpoint URLs. One the server refuses: `main.py --eval --resume URL` stops with one error line
naming the URL, the HTTP status and, for Azure-style XML errors, the error code (the original
release host answers PublicAccessNotPermitted), and leaves nothing in the download cache. Two URLs
with one file name are two checkpoints, a file:// URL is read in place, and a torch hub hash prefix
in a file name is checked against the download."""
import argparse
import contextlib
import functools
import hashlib
import http.server
import logging
import os
import threading

import pytest
import torch

import utils
from helpers import TINY_KWARGS, run_main_together, write_config, write_image_folder
from models.backbone import load_weights
from models.checkpoint import CheckpointError, read_checkpoint, resolve
from models.focal_transformer import FocalTransformer

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


@contextlib.contextmanager
def serving(handler):
    """A ThreadingHTTPServer on loopback for `handler`, in a thread, while the block runs."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope='module')
def server():
    with serving(RefusingHandler) as httpd:
        yield f'http://127.0.0.1:{httpd.server_address[1]}'


def test_refused_download_is_one_line_naming_url_and_answer(tmp_path, server):
    data = write_image_folder(tmp_path / 'data', n_train=1, n_val=1)
    cfg = write_config(tmp_path / 'tiny.yaml')
    results = run_main_together(tmp_path, {path: ['--cfg', cfg, '--data-path', data, '--eval', '--output',
                                                  str(tmp_path / 'out'), '--resume', server + path]
                                           for path in ANSWERS})
    for path, result in results.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert lines == [f"error: cannot download checkpoint {server + path}: the server answered "
                         f"{ANSWERS[path][2]}"], result.stderr[-2000:]
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'  # TORCH_HOME of helpers.run_main
    assert not os.path.isdir(cache) or os.listdir(cache) == []


# ---------------------------------------------------------------------------------------------
# A URL means its file (issue 22, part 3)
# ---------------------------------------------------------------------------------------------
class FolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the files of one folder and counts the requests."""

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def two_hosts(tmp_path, monkeypatch):
    """Two servers on loopback, each serving a ckpt_best.pth of its own: the same weights, the
    second with its classifier zeroed (as the issue tried it). Returns [(url, weights, server)]."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    trained = FocalTransformer(**TINY_KWARGS).state_dict()
    zeroed = dict(trained, **{'head.weight': torch.zeros_like(trained['head.weight'])})
    with contextlib.ExitStack() as servers:
        hosts = []
        for name, weights in (('first', trained), ('second', zeroed)):
            folder = tmp_path / name
            folder.mkdir()
            torch.save({'model': weights}, folder / 'ckpt_best.pth')
            httpd = servers.enter_context(serving(functools.partial(FolderHandler, directory=str(folder))))
            httpd.requests = []
            hosts.append((f'http://127.0.0.1:{httpd.server_address[1]}/ckpt_best.pth', weights, httpd))
        yield hosts


def recorded_logger():
    logger = logging.getLogger('test_checkpoint_download')
    logger.setLevel(logging.INFO)
    logger.lines = []
    logger.info = logger.lines.append
    return logger


def test_two_urls_with_one_file_name_are_two_checkpoints(two_hosts):
    cached = []
    for url, weights, httpd in two_hosts:
        model = FocalTransformer(**TINY_KWARGS)
        logger = recorded_logger()
        config = argparse.Namespace(EVAL_MODE=True,
                                    THROUGHPUT_MODE=False)
        utils.load_checkpoint(url, config, argparse.Namespace(model=model), logger)
        assert torch.equal(model.state_dict()['head.weight'], weights['head.weight'])
        path = resolve(url)
        assert os.path.basename(path) == 'ckpt_best.pth' and f"{url} is read from {path}" in logger.lines
        cached.append(path)
        load_weights(model, read_checkpoint(url), url, adapt=False)  # from the cache now
        assert httpd.requests == ['/ckpt_best.pth']
    assert cached[0] != cached[1]


def test_a_file_url_is_read_in_place(two_hosts, tmp_path):
    for name, (_, weights, _) in zip(('first', 'second'), two_hosts):
        path = tmp_path / name / 'ckpt_best.pth'
        assert resolve(path.as_uri()) == str(path)
        assert torch.equal(read_checkpoint(path.as_uri())['model']['head.weight'], weights['head.weight'])
    assert not (tmp_path / 'torch_home').exists()


def test_a_hash_prefix_in_the_file_name_is_checked(two_hosts, tmp_path):
    """torch hub's convention: name-<first hex digits of the file's SHA-256>.ext."""
    url, _, httpd = two_hosts[0]
    content = (tmp_path / 'first' / 'ckpt_best.pth').read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    (tmp_path / 'first' / f'focal-{digest[:8]}.pth').write_bytes(content)
    (tmp_path / 'first' / 'focal-0badc0de.pth').write_bytes(content)
    host = url.rsplit('/', 1)[0]

    assert read_checkpoint(f'{host}/focal-{digest[:8]}.pth')['model'].keys() == \
        FocalTransformer(**TINY_KWARGS).state_dict().keys()
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(f'{host}/focal-0badc0de.pth')
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'downloaded checkpoint {host}/focal-0badc0de.pth ')
    assert '0badc0de' in message and digest in message
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    assert sorted(os.listdir(cache / entry)[0] for entry in os.listdir(cache)) == [f'focal-{digest[:8]}.pth']
