"""Published ImageNet weights: where they live, whether they are here, and fetching them once.

timm models come from the Hugging Face Hub through `huggingface_hub` (its cache, `HF_HOME`,
`HF_ENDPOINT` for a mirror, `HF_TOKEN`), `model.safetensors` first; torchvision models (and
the few timm models published only as a URL) from the URL their library names, into
`$TORCH_HOME/hub/checkpoints/`, or from `$FINETUNE_WEIGHTS_MIRROR/<file name>`::

    src = published(resolve("vgg16"))   # WeightsSource(repo="timm/vgg16.tv_in1k", files=(...))
    cached_file(src)                    # the file in the framework's cache, or None (lookup only)
    info = fetch(src)                   # WeightsInfo(source="hub", repo, revision, file, path, sha256)
    info = fetch(src, offline=True)     # cache only: a WeightsError naming `finetune fetch vgg16`

A download goes to a temporary file that is renamed only once complete; its sha256 is then
checked against what the source publishes (the Hub's ETag of an LFS file is its sha256; a
torchvision file name carries the sha256 prefix, `alexnet-owt-7be5be79.pth`). A file that
does not match is deleted. The same check runs on every use, since the sha256 is computed for
the run record anyway: a damaged or planted cache file is refused, never loaded.

The environment is read at call time (huggingface_hub reads some of it once, at import), so a
process that changes `HF_HUB_OFFLINE` or `HF_ENDPOINT` is honoured. Nothing here reads tensors:
`weights.read_state_dict` does, for every file whatever its source.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import WeightsError
from finetune.models.catalogue import BackboneSpec
from finetune.models.weights import WeightsInfo, packaged_file

log = logging.getLogger(__name__)

OFFLINE_VARS = ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE")
MIRROR_VAR = "FINETUNE_WEIGHTS_MIRROR"  # base URL serving URL-published files by their file name
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: safetensors first
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth
_SHA256 = re.compile(r"[a-f0-9]{64}")
_COMMIT = re.compile(r"[a-f0-9]{40}")


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's published weights live: a Hugging Face repo, or a URL (or both).

    When both are known (timm's torchvision-derived weights), the Hub is the source and the
    URL's file in `$TORCH_HOME/hub/checkpoints/` is one more place a cached copy may be.
    """

    name: str  # the backbone as the user names it, for messages ("vgg16")
    repo: str | None = None  # "timm/vgg16.tv_in1k"
    revision: str | None = None  # a branch, tag or commit; None: the repo's main branch
    files: tuple[str, ...] = HF_FILES  # candidate file names in the repo, in order
    url: str | None = None  # "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"

    @property
    def file_name(self) -> str:
        """The file a person looks for: the first Hub candidate, or the URL's file name."""
        return self.files[0] if self.repo else os.path.basename(self.url or "")

    @property
    def where(self) -> str:
        """Where the file goes: the repo's folder in the Hub cache, or its path in torch hub checkpoints."""
        if self.repo:
            return os.path.join(hf_cache_dir(), "models--" + self.repo.replace("/", "--"))
        return os.path.join(torch_hub_dir(), "checkpoints", os.path.basename(self.url or ""))

    @property
    def label(self) -> str:
        """`timm/vgg16.tv_in1k model.safetensors` or the URL: what is fetched, in words."""
        return f"{self.repo} {self.file_name}" if self.repo else str(self.url)


# --------------------------------------------------------------------------- environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline_mode(offline: bool | None = None) -> bool:
    """True when asked (`--offline`) or when FINETUNE_OFFLINE / HF_HUB_OFFLINE says so, read now."""
    return bool(offline) or any(_truthy(os.environ.get(v)) for v in OFFLINE_VARS)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def torch_hub_dir() -> str:
    """The torch hub folder (`$TORCH_HOME/hub`); its `checkpoints/` holds URL-published weights."""
    import torch.hub

    return torch.hub.get_dir()


def _hf_endpoint() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None


def _mirrored(url: str) -> str:
    mirror = os.environ.get(MIRROR_VAR, "").strip().rstrip("/")
    return f"{mirror}/{os.path.basename(url)}" if mirror else url


# --------------------------------------------------------------------------- where weights are published


def tv_weights(arch: str):
    """torchvision's DEFAULT weights enum entry for `arch`, or None when it publishes none."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def timm_cfg(spec: BackboneSpec) -> dict:
    """timm's pretrained config of the spec's model (with its tag), as a dict; {} if none."""
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.model)
    return cfg.to_dict() if cfg is not None else {}


def _hf_files(cfg: dict) -> tuple[str, ...]:
    """Candidate files in the repo as timm tries them: the safetensors twin of a .bin first."""
    named = cfg.get("hf_hub_filename")
    if not named:
        return HF_FILES
    if named.endswith(".safetensors"):
        return (named,)
    twin = (
        "model.safetensors" if named == "pytorch_model.bin" else os.path.splitext(named)[0] + ".safetensors"
    )
    return (twin, named)


def published(spec: BackboneSpec) -> WeightsSource | None:
    """Where the spec's published ImageNet weights live, or None when there are none."""
    if not spec.has_weights or spec.source == "builtin":
        return None
    if spec.source == "torchvision":
        w = tv_weights(spec.arch)
        return WeightsSource(spec.name, url=w.url) if w is not None else None
    cfg = timm_cfg(spec)
    hf_id, url = cfg.get("hf_hub_id"), cfg.get("url") or None
    if hf_id:
        repo, _, rev = hf_id.partition("@")  # timm's "repo@revision" form
        return WeightsSource(spec.name, repo=repo, revision=rev or None, files=_hf_files(cfg), url=url)
    return WeightsSource(spec.name, url=url) if url else None


# --------------------------------------------------------------------------- the caches (lookup only)


def _hub_cached(src: WeightsSource) -> tuple[str, str] | None:
    from huggingface_hub import try_to_load_from_cache

    for fname in src.files:
        found = try_to_load_from_cache(src.repo, fname, cache_dir=hf_cache_dir(), revision=src.revision)
        if isinstance(found, str) and os.path.isfile(found):
            return found, fname
    return None


def _url_cached(src: WeightsSource) -> str | None:
    path = os.path.join(torch_hub_dir(), "checkpoints", os.path.basename(src.url or ""))
    return path if src.url and os.path.isfile(path) else None


def cached_file(src: WeightsSource) -> str | None:
    """The file already in a framework cache (Hub cache first, then torch hub), found by lookup only."""
    if src.repo:
        hit = _hub_cached(src)
        if hit is not None:
            return hit[0]
    return _url_cached(src)


def _revision_of(path: str) -> str | None:
    """The commit a Hub cache file belongs to: `.../snapshots/<commit>/<file>`."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3] == "snapshots" and _COMMIT.fullmatch(parts[-2]):
        return parts[-2]
    return None


# --------------------------------------------------------------------------- verification


def _expected_hash(path: str, url_named: bool) -> tuple[str, str] | None:
    """(expected sha256 or prefix, what says so) for a cache file, or None when nothing says."""
    if url_named:
        m = _HASH_IN_NAME.search(os.path.basename(path))
        return (m.group(1), "the sha256 prefix in its file name") if m else None
    blob = os.path.basename(os.path.realpath(path))  # the Hub cache names a blob by its ETag
    return (blob, "the sha256 the Hub published for it (its ETag)") if _SHA256.fullmatch(blob) else None


def _check(path: str, digest: str, src: WeightsSource, url_named: bool, fresh: bool) -> None:
    """Refuse a file whose sha256 is not what its source publishes.

    A fresh download is not kept (the caller's temp file goes, or the Hub's blob is deleted);
    a cached file is refused, with the command that replaces it.
    """
    expected = _expected_hash(path, url_named)
    if expected is None or digest.startswith(expected[0]):
        return
    if fresh:
        raise WeightsError(
            f"the download of {src.label} does not match {expected[1]} (got sha256 {digest[:16]}…); "
            "it was not kept",
            f"run `finetune fetch {src.name}` again; if it fails again, the server or mirror "
            "serves another file",
        )
    raise WeightsError(
        f"{path} does not match {expected[1]} (sha256 {digest[:16]}…): a damaged or foreign file",
        f"delete it and run `finetune fetch {src.name}`",
    )


def _verified_hub_download(path: str, src: WeightsSource) -> str:
    """The sha256 of a file huggingface_hub just downloaded, checked against its blob name (the
    ETag); it renamed the file into place after a size check only, so a mismatch is deleted here."""
    from finetune.io import sha256_file

    digest = sha256_file(path)
    try:
        _check(path, digest, src, url_named=False, fresh=True)
    except WeightsError:
        _discard(path)
        raise
    return digest


def _discard(path: str) -> None:
    """Remove a downloaded file: the Hub's snapshot link and the blob it points to."""
    real = os.path.realpath(path)
    for p in {path, real}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


# --------------------------------------------------------------------------- downloads


@contextlib.contextmanager
def _hub_quiet(src: WeightsSource) -> Iterator[None]:
    """huggingface_hub's retry chatter off for the call, but for one line at its first retry.

    On a machine without network hf_hub_download retries a lost connection five times over
    about 25 s (its backoff: 1 + 2 + 4 + 8 + 8 s) before our one-line error; without a word that
    looks like a hang. Everything else it logs is dropped: the outcome is ours to say.
    """
    hub, http = logging.getLogger("huggingface_hub"), logging.getLogger("huggingface_hub.utils._http")
    state = {"cause": "", "warned": False}

    def first_retry(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("'") and "' thrown while requesting " in text:  # the cause, then "Retrying in"
            state["cause"] = text[1 : text.index("' thrown")][:120]
        elif text.startswith(("Retrying in", "Rate limited")) and not state["warned"]:
            state["warned"] = True
            log.warning(
                f"the Hub does not answer for {src.name} ({state['cause'] or text}): retrying for about "
                "25 s (Ctrl-C stops; --offline never tries)"
            )
        return False  # nothing of theirs is printed

    levels = hub.level, http.level
    hub.setLevel(logging.ERROR)
    http.setLevel(logging.WARNING)
    http.addFilter(first_retry)
    try:
        yield
    finally:
        http.removeFilter(first_retry)
        hub.setLevel(levels[0])
        http.setLevel(levels[1])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def _cannot(src: WeightsSource, why: str) -> WeightsError:
    return WeightsError(
        f"cannot download {src.label} for {src.name} ({why}); it goes to {src.where}",
        f"on a machine with network run `finetune fetch {src.name}` and copy it here, "
        "or pass --weights FILE, or --no-pretrained",
    )


def _download_hub(src: WeightsSource) -> tuple[str, str]:
    """(cache path, file name) after hf_hub_download of the first file the repo holds."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for fname in src.files:
        try:
            with _hub_quiet(src):
                path = hf_hub_download(
                    src.repo,
                    fname,
                    revision=src.revision,
                    cache_dir=hf_cache_dir(),
                    endpoint=_hf_endpoint(),  # HF_ENDPOINT as set now; the token comes from HF_TOKEN
                )
            return path, fname
        except LocalEntryNotFoundError as err:  # no connection, and not in the cache
            raise _cannot(src, _first_line(err.__cause__ or err)) from None
        except EntryNotFoundError:
            continue  # no model.safetensors in this repo: try pytorch_model.bin
        except OSError as err:  # HTTP errors, a transfer cut short (size check), a full disk
            raise _cannot(src, _first_line(err)) from None
    raise WeightsError(
        f"{src.repo} holds none of {', '.join(src.files)}", "check the model name, or pass --weights FILE"
    )


def _download_url(src: WeightsSource) -> tuple[str, str]:
    """(path, sha256): the URL (or its mirror) streamed into `$TORCH_HOME/hub/checkpoints/`,
    renamed into place only once complete and matching the sha256 prefix its name carries."""
    import hashlib
    import http.client
    import urllib.error
    import urllib.request

    from huggingface_hub.utils import tqdm

    from finetune.console import enabled
    from finetune.io import atomic_write

    url = _mirrored(str(src.url))
    dest = Path(torch_hub_dir()) / "checkpoints" / os.path.basename(str(src.url))
    sha = hashlib.sha256()

    def write(fh) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "finetune"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            done = 0
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not enabled())
            with bar:  # size, bytes done and speed, as huggingface_hub shows its own downloads
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
                    sha.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        if total is not None and done != total:
            raise WeightsError(
                f"the download of {url} was cut short ({done} of {total} bytes); it was not kept",
                f"run `finetune fetch {src.name}` again",
            )
        _check(str(dest), sha.hexdigest(), src, url_named=True, fresh=True)  # raising here keeps nothing

    try:
        atomic_write(dest, write)  # a temp file in the same folder, renamed only after `write` returns
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise _cannot(src, _first_line(reason if isinstance(reason, BaseException) else err)) from None
    return str(dest), sha.hexdigest()


# --------------------------------------------------------------------------- the one entry point


def fetch(src: WeightsSource, offline: bool | None = None) -> WeightsInfo:
    """The weights file of `src`: from the cache, else downloaded once (unless offline), verified.

    Raises:
        WeightsError: offline and not cached, unreachable, cut short, or not the published file.
    """
    from finetune.io import sha256_file

    hit = _hub_cached(src) if src.repo else None
    path, fname = hit if hit else (_url_cached(src), None)
    if path is not None:  # cached: checked on every use, the sha256 is computed for the record anyway
        digest = sha256_file(path)
        _check(path, digest, src, url_named=fname is None, fresh=False)
    else:
        if offline_mode(offline):
            raise WeightsError(
                f"{src.label} for {src.name} is not in the cache and offline mode is on "
                f"(--offline, {' or '.join(OFFLINE_VARS)}); it goes to {src.where}",
                f"on a machine with network run `finetune fetch {src.name}` and copy it here, "
                "or pass --weights FILE, or --no-pretrained",
            )
        if src.repo:
            path, fname = _download_hub(src)
            digest = _verified_hub_download(path, src)
        else:
            path, digest = _download_url(src)
        log.debug(f"downloaded {os.path.getsize(path) / 1e6:.1f} MB into {path}")  # the bar showed it
    if fname is None:
        return WeightsInfo("url", path, digest, url=src.url, file=os.path.basename(path))
    return WeightsInfo("hub", path, digest, repo=src.repo, revision=_revision_of(path), file=fname)


def status(spec: BackboneSpec) -> str:
    """What `finetune backbones` says: packaged, cached (size), downloadable, or none published."""
    if spec.source == "timm" and packaged_file(spec.model) is not None:
        return "packaged"
    src = published(spec)
    if src is None:
        return "none published"
    found = cached_file(src)
    if found is None:
        return "downloadable"
    return f"cached ({os.path.getsize(found) / 1e6:.1f} MB)"


def fetch_backbones(names: list[str]) -> list[tuple[str, WeightsInfo | None]]:
    """`finetune fetch`: every name resolved first (a typo fails before any download), then fetched.

    Packaged backbones need nothing: their entry is None. A name without published weights is a
    BackboneError/WeightsError before anything is downloaded.
    """
    from finetune.models.catalogue import resolve

    plan = []
    for name in names:
        spec = resolve(name)
        if spec.source == "timm" and packaged_file(spec.model) is not None:
            plan.append((name, None))
            continue
        src = published(spec)
        if src is None:
            raise WeightsError(
                f"{name} has no published ImageNet weights to fetch", "use it with --no-pretrained"
            )
        plan.append((name, src))
    return [(name, None if src is None else fetch(src, offline=False)) for name, src in plan]


def cache_folders(infos: list[WeightsInfo | None]) -> list[str]:
    """The cache folders holding these files: what to copy to a machine that will be offline."""
    folders = [hf_cache_dir() if i.source == "hub" else os.path.dirname(str(i.path)) for i in infos if i]
    return list(dict.fromkeys(folders))
