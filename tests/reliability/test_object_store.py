"""The cache job and the loader against a real S3-compatible server on loopback (moto's server,
through s3fs), including a connection reset in the middle of the job.

S3 PUTs are atomic (a cut upload leaves no object), but a chunk that was never written reads back
as zeros without any error: only the store's own records say what is there. So after every cut
the test checks that each record is backed by its data, and that a rerun ends identical to a
local, undisturbed store.
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.request
import uuid

import numpy as np
import pytest
import torch

from mdiff.config import load_config
from pipeline import store as S
from pipeline.cache import run_cache
from tests.reliability.fault_kit import Kit, data_files
from trainer.loader import ActivationLoader

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "mdiff-test"
SILENT = dict(log=lambda *a: None, progress=False)


class ResettingProxy:
    """A TCP proxy in front of the server that resets every connection once `limit` bytes have
    gone upstream in total: a network that drops in the middle of an upload."""

    def __init__(self, target: tuple[str, int], limit: int):
        self.target, self.limit, self.sent = target, limit, 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.tripped = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self.lock:
                        room = self.limit - self.sent
                        self.sent += len(data)
                    if room < len(data):
                        if room > 0:
                            dst.sendall(data[:room])
                        self.reset()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> None:
        """RST (not FIN) on both sides of every connection, from now on."""
        self.tripped.set()
        with self.lock:
            conns, self.conns = self.conns, []
            self.limit = -1
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()
        self.reset()


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/{BUCKET}", method="PUT"))
    yield host, port
    server.stop()


def _options(host: str, port: int) -> dict:
    # one attempt per request: s3fs and botocore retries would hide the cut
    return {"key": "k", "secret": "s", "endpoint_url": f"http://{host}:{port}",
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"retries": {"total_max_attempts": 1}}}


def _config(kit: Kit, path, url: str, options: dict | None):
    """One model, one hook, two shards of 1024 rows: every request to moto costs milliseconds."""
    return kit.config(path, store=url, models=("llama-s0",), hooks=((1, "resid_post"),),
                      shard_tokens=1024, storage_options=options)


def _objects(url: str, options: dict) -> dict[str, bytes]:
    """The store's chunk and shard objects, by path below the root."""
    root = S.StoreRoot(url, options)
    return {f[len(root.base) + 1:]: root.fs.cat_file(f) for f in root.fs.find(root.base)
            if "/c/" in f[len(root.base):]}


def _cut_run(kit: Kit, s3, url: str, cfg_path, limit: int) -> str:
    """Run the job through a proxy that resets after `limit` bytes upstream; its error message."""
    proxy = ResettingProxy(s3, limit)
    try:
        cfg = _config(kit, cfg_path, url, _options("127.0.0.1", proxy.port))
        with pytest.raises(S.StoreError) as e:
            run_cache(load_config(cfg), **SILENT)
    finally:
        proxy.close()
    assert proxy.tripped.is_set()
    message = str(e.value)
    assert url in message and f"erun: mdiff cache {cfg}" in message, message
    return message


def _nothing_half_written_counts(url: str, options: dict, ref: S.StoreRoot) -> None:
    """Every shard record is backed by its data (a missing object would read as zeros), and a
    token set marked complete holds the right tokens."""
    root = S.StoreRoot(url, options)
    for p in S.list_activation_arrays(root):
        arr = S.open_activation_array(root, p)
        assert not arr.is_complete() and S.verify_array(arr) == [], p
    for ts_id in S.list_token_sets(root):
        if S.token_set_complete(root, ts_id):
            assert np.array_equal(S.open_token_set(root, ts_id).tokens[:],
                                  S.open_token_set(ref, ts_id).tokens[:])


def test_cache_on_s3_survives_connection_resets_and_loads_like_local(kit: Kit, s3, tmp_path,
                                                                    monkeypatch):
    """The network drops twice in one store: after 30 kB went upstream (while the token set is
    written) and, in the next run, after 180 kB (inside the upload of the first 64 KiB shard; a
    whole run sends about 310 kB). A third run completes the store, identical to a local one, and
    the loader reads the same batches from both."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    local = tmp_path / "local"
    run_cache(load_config(_config(kit, tmp_path / "local.toml", str(local), None)), **SILENT)
    url, direct = f"s3://{BUCKET}/{uuid.uuid4().hex}", _options(*s3)

    first = _cut_run(kit, s3, url, tmp_path / "cut1.toml", 30_000)
    assert "could not write the metadata of token set" in first
    _nothing_half_written_counts(url, direct, S.StoreRoot(str(local)))
    second = _cut_run(kit, s3, url, tmp_path / "cut2.toml", 180_000)
    assert "could not write shard 0 (rows 0-1024)" in second
    _nothing_half_written_counts(url, direct, S.StoreRoot(str(local)))

    report = run_cache(load_config(_config(kit, tmp_path / "rerun.toml", url, direct)), **SILENT)
    hook = report.models[0].hooks["layer1.resid_post"]
    assert hook.status == "computed" and hook.shards_written == 2
    assert _objects(url, direct) == data_files(local)

    remote = S.open_activation_array(S.StoreRoot(url, direct), hook.path, require_complete=True)
    assert S.verify_array(remote) == []
    batches = []
    for arr in (remote, S.open_activation_array(S.StoreRoot(str(local)), hook.path)):
        ts = S.open_token_set(arr.root, arr.attrs["tokenset_id"])
        with ActivationLoader([arr], ts, split="train", batch_size=64, buffer_tokens=256) as ld:
            batches.append([b.clone() for _, b in zip(range(ld.batches_per_epoch), ld)])
        assert ld.readers == (("zarr",) if arr is remote else ("mmap",))
    assert len(batches[0]) > 10 and all(torch.equal(a, b) for a, b in zip(*batches))
