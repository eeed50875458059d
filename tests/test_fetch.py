"""Weights fetched on first use, against loopback stand-ins of the real services.

`Loopback` serves, on 127.0.0.1 and random ports, what `huggingface_hub.hf_hub_download` reads
from the Hugging Face Hub (HEAD/GET `/<repo>/resolve/<revision>/<file>`: for an LFS file a 302
to a CDN on another origin, with `X-Repo-Commit`, `X-Linked-Etag` (the sha256), `X-Linked-Size`;
a missing file is a 404 with `X-Error-Code: EntryNotFound`), and a plain file host standing in
for torchvision's `download.pytorch.org/models/` (reached through FINETUNE_WEIGHTS_MIRROR).
Every request is counted, so "downloaded once" and "no request at all" are checked, not assumed.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import WeightsError
from finetune.models.backbone import build
from finetune.models.catalogue import resolve
from finetune.models.fetch import WeightsSource, fetch, published, status
from tests.conftest import one_line_error

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what the stand-in Hub calls its main branch


class Loopback:
    """The Hub's resolve endpoint, a CDN on another port, and a URL file host (the CDN's server)."""

    def __init__(self) -> None:
        self.hub: dict[tuple[str, str], bytes] = {}  # (repo, file) -> bytes
        self.urls: dict[str, bytes] = {}  # file name -> bytes, under /models/
        self.serve_instead: dict[str, bytes] = {}  # sha256 or file name -> other bytes (a bad transfer)
        self.claim_length: dict[str, int] = {}  # file name -> Content-Length sent (a connection cut)
        self.requests: Counter = Counter()  # (method, path)
        self.auth: dict[str, str | None] = {}  # path -> Authorization header seen
        self.cdn = self._serve(self._cdn_answer)
        self.resolve = self._serve(self._hub_answer)

    def _serve(self, answer) -> http.server.ThreadingHTTPServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._go(False)

            def do_GET(self) -> None:
                self._go(True)

            def _go(self, body: bool) -> None:
                path = self.path.split("?")[0]
                owner.requests[("GET" if body else "HEAD", path)] += 1
                owner.auth[path] = self.headers.get("authorization")
                answer(self, path, body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    @staticmethod
    def _url(server) -> str:
        return f"http://127.0.0.1:{server.server_address[1]}"

    @property
    def endpoint(self) -> str:
        return self._url(self.resolve)

    @property
    def mirror(self) -> str:
        return self._url(self.cdn) + "/models"

    def _hub_answer(self, h, path: str, body: bool) -> None:
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        _rev, _, fname = rest.partition("/")
        data = self.hub.get((repo, fname))
        if data is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        sha = hashlib.sha256(data).hexdigest()
        h.send_response(302)  # an LFS file: the metadata on the redirect, the bytes on the CDN
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("X-Linked-Etag", f'"{sha}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", '"0a1b2c3d"')  # the git pointer file's sha1, as the Hub sends it
        h.send_header("Location", f"{self._url(self.cdn)}/lfs/{sha}")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _cdn_answer(self, h, path: str, body: bool) -> None:
        kind, _, key = path.lstrip("/").partition("/")
        if kind == "lfs":
            data = next((d for d in self.hub.values() if hashlib.sha256(d).hexdigest() == key), None)
        else:
            data = self.urls.get(key)
        if data is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.serve_instead.get(key, data)
        h.send_response(200)
        h.send_header("Content-Length", str(self.claim_length.get(key, len(data))))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def gets(self, suffix: str) -> int:
        return sum(n for (m, p), n in self.requests.items() if m == "GET" and p.endswith(suffix))

    def stop(self) -> None:
        for s in (self.resolve, self.cdn):
            s.shutdown()
            s.server_close()


@pytest.fixture
def net(tmp_path, monkeypatch):
    """A machine with network: empty caches, the Hub and torchvision's host on loopback."""
    import huggingface_hub.constants

    server = Loopback()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("FINETUNE_WEIGHTS_MIRROR", server.mirror)
    monkeypatch.setenv("FINETUNE_ENGINE", "torch")  # no ONNX export: these tests are about weights
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "FINETUNE_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub read HF_HUB_OFFLINE at import; this process must look online to it too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


def tensors_file(state: dict) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in state.items()})


def torch_file(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def seeded_state(name: str, seed: int = 0, **kwargs) -> dict:
    """The backbone's published tensor names and shapes, with seeded random values."""
    torch.manual_seed(seed)
    return build(name, pretrained=False, **kwargs).model.state_dict()


@pytest.fixture
def resnet_on_hub(net) -> tuple[Loopback, str, dict, bytes]:
    """timm's tiny test_resnet published on the stand-in Hub under its real repo id."""
    repo = published(resolve("test_resnet")).repo
    state = seeded_state("test_resnet", seed=3)
    blob = tensors_file(state)
    net.hub[(repo, "model.safetensors")] = blob
    return net, repo, state, blob


def tv_publish(server: Loopback, monkeypatch, arch: str, blob: bytes, name: str | None = None) -> str:
    """Serve `blob` as torchvision's published file of `arch`; its enum URL names it `<arch>-<sha8>.pth`."""
    from finetune.models.fetch import tv_weights

    w = tv_weights(arch)
    name = name or f"{arch}-{hashlib.sha256(blob).hexdigest()[:8]}.pth"
    monkeypatch.setattr(w.value, "url", f"https://download.pytorch.org/models/{name}")
    server.urls[name] = blob
    return name


def run_args(data: Path, out: Path, backbone: str, *extra: str) -> list[str]:
    return ["run", str(data), "--backbone", backbone, "-o", str(out), "--workers", "0",
            "--set", "image_size=32", "--no-cache", *extra]  # fmt: skip


# --------------------------------------------------------------------------- the Hugging Face Hub


def test_first_use_downloads_once_records_the_file_then_offline_uses_the_cache(
    resnet_on_hub, make_folder, tmp_path, monkeypatch
):
    server, repo, state, blob = resnet_on_hub
    data = make_folder({"a": 4, "b": 4}, size=32)
    assert status(resolve("test_resnet")) == "downloadable"

    res = runner.invoke(app, run_args(data, tmp_path / "runs", "test_resnet"))
    assert res.exit_code == 0, res.output
    assert server.gets("/lfs/" + hashlib.sha256(blob).hexdigest()) == 1
    assert server.requests[("GET", f"/{repo}/resolve/main/pytorch_model.bin")] == 0  # safetensors first
    run_dir = next((tmp_path / "runs").iterdir())
    weights = json.loads((run_dir / "config.json").read_text())["weights"]
    assert weights["source"] == "hub" and weights["repo"] == repo and weights["revision"] == COMMIT
    assert weights["file"] == "model.safetensors"
    assert weights["sha256"] == hashlib.sha256(blob).hexdigest()  # what the server sent, hashed here
    cached = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    assert weights["path"].startswith(str(cached)) and Path(weights["path"]).read_bytes() == blob
    assert status(resolve("test_resnet")) == f"cached ({len(blob) / 1e6:.1f} MB)"

    # The same run again: from the cache, not one request, even with the network up.
    before = sum(server.requests.values())
    assert runner.invoke(app, run_args(data, tmp_path / "runs2", "test_resnet")).exit_code == 0
    assert sum(server.requests.values()) == before

    # Server gone: --offline, FINETUNE_OFFLINE=1 and HF_HUB_OFFLINE=1 all use the cache.
    server.stop()
    res = runner.invoke(app, run_args(data, tmp_path / "r3", "test_resnet", "--offline"))
    assert res.exit_code == 0, res.output
    assert json.loads((next((tmp_path / "r3").iterdir()) / "config.json").read_text())["weights"] == weights
    for var in ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        bb = build("test_resnet")
        assert bb.weights.to_dict() == weights
        torch.testing.assert_close(bb.model.fc.weight, state["fc.weight"])  # the served values, loaded
        monkeypatch.delenv(var)


def test_offline_and_not_cached_is_one_line_naming_the_file_where_it_goes_and_fetch(
    resnet_on_hub, make_folder, tmp_path
):
    server, repo, _, _ = resnet_on_hub
    data = make_folder({"a": 3, "b": 3}, size=32)
    line = one_line_error(
        runner.invoke(app, run_args(data, tmp_path / "runs", "test_resnet", "--offline")),
        f"{repo} model.safetensors",
        str(Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"),
        "`finetune fetch test_resnet`",
    )
    assert "offline" in line
    assert sum(server.requests.values()) == 0  # offline means no request at all
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unreachable_hub_is_one_line_while_retrying_then_one_error(
    resnet_on_hub, make_folder, tmp_path, monkeypatch
):
    import huggingface_hub.utils._http as hf_http

    server, repo, _, _ = resnet_on_hub
    server.stop()  # the port is closed: connection refused, as on a machine without network
    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # huggingface_hub's retry backoff
    data = make_folder({"a": 3, "b": 3}, size=32)
    res = runner.invoke(app, run_args(data, tmp_path / "runs", "test_resnet"))
    # one line while huggingface_hub retries (about 25 s on a machine without network), then the error
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    retrying, error = res.output.strip().splitlines()
    assert retrying.startswith("warning: the Hub does not answer for test_resnet (") and retrying.endswith(
        "retrying for about 25 s (Ctrl-C stops; --offline never tries)"
    ), res.output
    assert error.startswith("error: cannot download")
    hub_cache = str(Path(os.environ["HF_HOME"]) / "hub")
    for needle in (f"{repo} model.safetensors", "`finetune fetch test_resnet`", hub_cache):
        assert needle in error, error


def test_safetensors_first_then_pytorch_model_bin_read_safely(net):
    repo = published(resolve("test_resnet")).repo
    state = seeded_state("test_resnet", seed=4)
    net.hub[(repo, "pytorch_model.bin")] = torch_file(state)
    info = fetch(published(resolve("test_resnet")))
    assert info.file == "pytorch_model.bin" and info.repo == repo
    # safetensors was asked for first (a 404), then the .bin downloaded once
    assert net.requests[("HEAD", f"/{repo}/resolve/main/model.safetensors")] == 1
    assert net.gets("/lfs/" + info.sha256) == 1
    bb = build("test_resnet")
    torch.testing.assert_close(bb.model.fc.weight, state["fc.weight"])


def test_hf_token_and_endpoint_are_honoured(resnet_on_hub, monkeypatch):
    server, repo, _, blob = resnet_on_hub
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_token")
    fetch(published(resolve("test_resnet")))
    resolve_path = f"/{repo}/resolve/main/model.safetensors"
    assert server.auth[resolve_path] == "Bearer hf_loopback_token"  # HF_ENDPOINT reached, with HF_TOKEN
    assert server.auth["/lfs/" + hashlib.sha256(blob).hexdigest()] is None  # not sent to the CDN


def _nothing_kept(root: Path) -> list[str]:
    """Weights-like files left under a cache: blobs, snapshot entries, partial downloads."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink())
        and ({"blobs", "snapshots"} & set(p.parts) or "incomplete" in p.name)
    )


@pytest.mark.parametrize("damage", ["wrong-hash", "cut-short"])
def test_a_corrupt_hub_download_is_refused_and_not_kept(resnet_on_hub, damage):
    server, _, _, blob = resnet_on_hub
    sha = hashlib.sha256(blob).hexdigest()
    if damage == "wrong-hash":
        server.serve_instead[sha] = blob[:-8] + b"\x00" * 8  # same size, other bytes
    else:
        server.serve_instead[sha] = blob[: len(blob) // 2]  # the transfer ends half-way
    with pytest.raises(WeightsError, match="not kept|cannot download") as err:
        fetch(published(resolve("test_resnet")))
    assert "\n" not in str(err.value)
    hf = Path(os.environ["HF_HOME"])
    assert _nothing_kept(hf) == []  # no blob, no snapshot, no .incomplete
    assert status(resolve("test_resnet")) == "downloadable"
    server.serve_instead.clear()  # a good transfer afterwards works
    assert fetch(published(resolve("test_resnet"))).sha256 == sha


def test_a_cached_hub_file_that_does_not_match_its_etag_is_refused(resnet_on_hub):
    info = fetch(published(resolve("test_resnet")))
    blob_path = Path(os.path.realpath(info.path))
    blob_path.write_bytes(blob_path.read_bytes()[:-4] + b"\x00" * 4)  # damaged on disk, later
    with pytest.raises(WeightsError, match="does not match.*delete it"):
        build("test_resnet", offline=True)


# --------------------------------------------------------------------------- torchvision's URLs


def test_torchvision_first_use_downloads_once_into_torch_home_with_its_aux_heads(
    net, monkeypatch, make_folder, tmp_path
):
    """GoogLeNet's published file holds its two auxiliary heads: built for loading, then dropped."""
    import torchvision

    torch.manual_seed(5)
    published_model = torchvision.models.googlenet(aux_logits=True, init_weights=False, transform_input=True)
    state = published_model.state_dict()  # googlenet-1378be20.pth: 344 tensors, 20 of them aux*
    assert sum(k.startswith("aux") for k in state) == 20
    blob = torch_file(state)
    name = tv_publish(net, monkeypatch, "googlenet", blob)
    data = make_folder({"a": 4, "b": 4}, size=32)

    res = runner.invoke(app, run_args(data, tmp_path / "runs", "googlenet"))
    assert res.exit_code == 0, res.output
    assert net.gets(f"/models/{name}") == 1
    target = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / name
    assert target.read_bytes() == blob
    assert [p.name for p in target.parent.iterdir()] == [name]  # no temporary file left behind
    weights = json.loads((next((tmp_path / "runs").iterdir()) / "config.json").read_text())["weights"]
    assert weights["source"] == "url" and weights["url"] == f"https://download.pytorch.org/models/{name}"
    assert weights["file"] == name and weights["sha256"] == hashlib.sha256(blob).hexdigest()

    net.stop()
    bb = build("googlenet", offline=True)
    assert bb.model.aux1 is None and bb.model.aux2 is None and not bb.model.aux_logits
    assert bb.model.transform_input  # as torchvision builds it for its weights
    torch.testing.assert_close(bb.model.fc.weight, state["fc.weight"])
    assert not any(k.startswith("aux") for k in bb.model.state_dict())


@pytest.mark.parametrize("damage", ["wrong-hash", "cut-short"])
def test_a_corrupt_url_download_is_refused_and_not_kept(net, monkeypatch, damage):
    blob = torch_file(seeded_state("tv:squeezenet1_1", seed=6))
    name = tv_publish(net, monkeypatch, "squeezenet1_1", blob)
    if damage == "wrong-hash":
        net.serve_instead[name] = blob[:-8] + b"\x00" * 8
    else:
        net.claim_length[name] = len(blob) + 1000  # the connection closes before the promised end
    with pytest.raises(WeightsError, match="not kept|cannot download"):
        build("tv:squeezenet1_1")
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []
    assert status(resolve("tv:squeezenet1_1")) == "downloadable"


def test_unreachable_url_is_one_line(net, monkeypatch, make_folder, tmp_path):
    blob = torch_file(seeded_state("tv:squeezenet1_1", seed=6))
    name = tv_publish(net, monkeypatch, "squeezenet1_1", blob)
    net.stop()
    data = make_folder({"a": 3, "b": 3}, size=32)
    one_line_error(
        runner.invoke(app, run_args(data, tmp_path / "runs", "tv:squeezenet1_1")),
        "cannot download",
        name,
        str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / name),
        "`finetune fetch tv:squeezenet1_1`",
    )


def test_a_url_download_shows_its_size_and_speed(net, monkeypatch, capsys):
    blob = torch_file(seeded_state("tv:squeezenet1_1", seed=9))
    name = tv_publish(net, monkeypatch, "squeezenet1_1", blob)
    monkeypatch.setenv("FINETUNE_PROGRESS", "1")
    fetch(published(resolve("tv:squeezenet1_1")))
    err = capsys.readouterr().err
    assert name in err and "100%" in err and "B/s" in err and f"{len(blob) / 1e6:.2f}M" in err


def test_the_environment_set_before_the_process_starts_is_honoured(net, tmp_path):
    """A real `finetune` process: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import."""
    import subprocess
    import sys

    repo = published(resolve("test_resnet")).repo
    blob = tensors_file(seeded_state("test_resnet", seed=10))
    net.hub[(repo, "model.safetensors")] = blob
    env = {**os.environ, "FINETUNE_PROGRESS": "0"}

    def finetune(*args, **extra):
        return subprocess.run([sys.executable, "-m", "finetune", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    offline = finetune("fetch", "test_resnet", HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and "offline mode is on" in offline.stderr
    assert sum(net.requests.values()) == 0
    online = finetune("fetch", "test_resnet")
    assert online.returncode == 0, online.stderr
    assert hashlib.sha256(blob).hexdigest() in online.stdout
    assert net.gets("/lfs/" + hashlib.sha256(blob).hexdigest()) == 1
    listed = finetune("backbones", "test_resnet", HF_HUB_OFFLINE="1")
    assert f"weights: cached ({len(blob) / 1e6:.1f} MB)" in listed.stdout


# --------------------------------------------------------------------------- finetune fetch, then offline


def test_fetch_ahead_then_copy_the_caches_and_run_offline(net, monkeypatch, make_folder, tmp_path):
    repo = published(resolve("test_resnet")).repo
    net.hub[(repo, "model.safetensors")] = tensors_file(seeded_state("test_resnet", seed=7))
    tv_blob = torch_file(seeded_state("tv:squeezenet1_1", seed=8))
    tv_name = tv_publish(net, monkeypatch, "squeezenet1_1", tv_blob)

    res = runner.invoke(app, ["backbones", "test_resnet"])
    assert "weights: downloadable" in res.output and "finetune fetch test_resnet" in res.output
    res = runner.invoke(app, ["fetch", "test_resnet", "tv:squeezenet1_1", "lite0"])
    assert res.exit_code == 0, res.output
    assert f"test_resnet: {repo}@{COMMIT[:12]} model.safetensors" in res.output
    assert f"tv:squeezenet1_1: https://download.pytorch.org/models/{tv_name} {tv_name}" in res.output
    assert "lite0: packaged" in res.output
    assert str(Path(os.environ["HF_HOME"]) / "hub") in res.output
    assert str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints") in res.output
    assert "cached (" in runner.invoke(app, ["backbones", "test_resnet"]).output
    net.stop()

    # Another machine: the copied caches (cp -a keeps the Hub's links), no network at all.
    other = tmp_path / "offline-machine"
    shutil.copytree(os.environ["HF_HOME"], other / "hf", symlinks=True)
    shutil.copytree(os.environ["TORCH_HOME"], other / "torch", symlinks=True)
    monkeypatch.setenv("HF_HOME", str(other / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(other / "torch"))
    monkeypatch.setenv("FINETUNE_OFFLINE", "1")
    data = make_folder({"a": 4, "b": 4}, size=32)
    for backbone in ("test_resnet", "tv:squeezenet1_1"):
        res = runner.invoke(app, run_args(data, tmp_path / "runs", backbone, "--offline"))
        assert res.exit_code == 0, res.output
    weights = [json.loads((d / "config.json").read_text())["weights"] for d in (tmp_path / "runs").iterdir()]
    assert {w["path"].startswith(str(other)) for w in weights} == {True}


def test_fetch_refuses_unknown_or_unpublished_names_before_downloading(net):
    one_line_error(runner.invoke(app, ["fetch", "test_resnet", "resnt18"]), "did you mean")
    one_line_error(
        runner.invoke(app, ["fetch", "lenet5"]), "no published ImageNet weights", "--no-pretrained"
    )
    assert sum(net.requests.values()) == 0


def test_published_sources_of_the_catalogue():
    """timm models from their Hub repo, torchvision models from the URL in torchvision's enum."""
    import torchvision

    src = published(resolve("vgg16"))
    assert src == WeightsSource(
        "vgg16", repo="timm/vgg16.tv_in1k", files=("model.safetensors", "pytorch_model.bin")
    )
    alex = published(resolve("alexnet"))
    assert alex.url == torchvision.models.AlexNet_Weights.DEFAULT.url and alex.repo is None
    assert published(resolve("lenet5")) is None and published(resolve("zfnet")) is None


# --------------------------------------------------------------------------- the README's headline command


def _vgg16_published() -> bytes:
    """timm's vgg16.tv_in1k layout (its Hub file's names and shapes), seeded random values, as safetensors."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build("vgg16", pretrained=False).model.state_dict().items()}
    g = torch.Generator().manual_seed(16)
    return tensors_file({k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()})


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FINETUNE_HEADLINE_TEST") != "1",
    reason="550 MB of vgg16 weights, ~30 s and 3.5 GB: FINETUNE_HEADLINE_TEST=1 pytest -k headline "
    "(the same path runs by default with test_resnet above)",
)
def test_headline_vgg16_linear_probe_online_then_offline_after_fetch(net, make_folder, tmp_path, monkeypatch):
    """`finetune run ./mydata --backbone vgg16 --strategy linear-probe` on a connected machine (the
    loopback Hub), then `finetune fetch vgg16`, the cache copied, and the same command offline."""
    blob = _vgg16_published()
    net.hub[("timm/vgg16.tv_in1k", "model.safetensors")] = blob
    data = make_folder({"cat": 6, "dog": 6}, size=32, name="mydata")
    headline = ["run", str(data), "--backbone", "vgg16", "--strategy", "linear-probe",
                "--set", "image_size=32", "--workers", "0"]  # fmt: skip

    res = runner.invoke(app, [*headline, "-o", str(tmp_path / "runs-online")])
    assert res.exit_code == 0, res.output
    assert net.gets("/lfs/" + hashlib.sha256(blob).hexdigest()) == 1

    monkeypatch.setenv("HF_HOME", str(tmp_path / "connected"))  # another machine's empty cache: fetch there
    res = runner.invoke(app, ["fetch", "vgg16"])
    assert res.exit_code == 0, res.output
    assert net.gets("/lfs/" + hashlib.sha256(blob).hexdigest()) == 2
    net.stop()
    shutil.copytree(tmp_path / "connected", tmp_path / "offline", symlinks=True)  # cp -a
    monkeypatch.setenv("HF_HOME", str(tmp_path / "offline"))
    res = runner.invoke(app, [*headline, "--offline", "-o", str(tmp_path / "runs-offline")])
    assert res.exit_code == 0, res.output
    config = json.loads((next((tmp_path / "runs-offline").iterdir()) / "config.json").read_text())
    assert config["weights"]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert config["weights"]["repo"] == "timm/vgg16.tv_in1k" and config["tap"] == "pool"
