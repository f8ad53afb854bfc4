"""Licensed model files: where they live under models/, which are present, and the fetch command.

GAGAvatar's weights and its FLAME_with_eye.pt are published by the authors on Hugging Face
(huggingface.co/xg-chu/GAGAvatar, the locations the GAGAvatar repository's build_resources.sh uses).
FLAME itself is licensed by the Max Planck Institute: the fetch command shows its terms and
downloads only after the user types "yes". Everything here except `fetch_assets` works offline.
The download uses the standard library (no extra dependency for a one-off fetch of two files).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gaga_ros.errors import InputError

#: The console command that runs `fetch_assets`.
FETCH_COMMAND = "gaga-ros fetch-assets"
FLAME_LICENSE_URL = "https://flame.is.tue.mpg.de"
#: Environment variable that overrides the models folder (default: ./models).
MODELS_ENV = "GAGA_ROS_MODELS"

FLAME_LICENSE_TERMS = f"""\
FLAME (Max Planck Institute for Intelligent Systems) is licensed, not free software.
Its licence allows non-commercial scientific research use only and forbids redistribution;
read the full terms and register at {FLAME_LICENSE_URL} before you continue.
GAGAvatar's FLAME_with_eye.pt is derived from FLAME and falls under the same licence.
The GAGAvatar weights (GAGAvatar.pt) are published by the GAGAvatar authors at
https://huggingface.co/xg-chu/GAGAvatar under their own terms.
"""

_HF = "https://huggingface.co/xg-chu/GAGAvatar/resolve/main/assets"


@dataclass(frozen=True)
class Download:
    """One published file: where it comes from and where it goes under models/."""

    name: str
    url: str
    relpath: str
    size: int | None = None
    sha256: str | None = None


#: The published files the fetch command downloads (sizes and hashes are not published upstream;
#: they are taken from the server's headers when it sends them, else recorded after the download).
DOWNLOADS = (
    Download("GAGAvatar weights", f"{_HF}/GAGAvatar.pt", "gagavatar/GAGAvatar.pt"),
    Download("FLAME with eyes (GAGAvatar layout)", f"{_HF}/FLAME_with_eye.pt", "flame/FLAME_with_eye.pt"),
)
#: Where the fetch command records what it downloaded (name, url, size, sha256).
RECORD_NAME = "assets.json"

GAGAVATAR_WEIGHTS = "gagavatar/GAGAvatar.pt"
FLAME_WITH_EYE = "flame/FLAME_with_eye.pt"
#: FLAME .pkl files from the FLAME website, in order of preference (2023 first).
FLAME_PKLS = ("flame/flame2023.pkl", "flame/generic_model.pkl")
FLAME_LANDMARKS = "flame/landmark_embedding.npy"
MEDIAPIPE_EMBEDDING = "flame/mediapipe_landmark_embedding.npz"


class LicenceNotAccepted(InputError):
    """The user did not type "yes" to the FLAME licence, so nothing was downloaded."""


class DownloadError(InputError):
    """A download failed or its content does not match the published size or hash."""


def models_dir(path: str | Path | None = None) -> Path:
    """The models folder: `path`, else $GAGA_ROS_MODELS, else ./models."""
    return Path(path if path is not None else os.environ.get(MODELS_ENV, "models"))


def flame_dir(path: str | Path | None = None) -> Path:
    """The folder FLAME files go in."""
    return models_dir(path) / "flame"


@dataclass
class AssetStatus:
    """Which licensed files are present under a models folder, and what works without them."""

    models_dir: Path
    gagavatar: Path | None
    flame: Path | None
    flame_landmarks: Path | None
    mediapipe_embedding: Path | None

    @property
    def complete(self) -> bool:
        """True when the GAGAvatar backend and the FLAME tracker can both run."""
        return self.gagavatar is not None and self.flame is not None

    def explain(self) -> str:
        """A user-facing summary: what was found, what works, and how to get the rest."""
        lines = [f"models folder: {self.models_dir.resolve()}"]
        for label, found, want in (
            ("GAGAvatar weights", self.gagavatar, GAGAVATAR_WEIGHTS),
            ("FLAME model", self.flame, f"{FLAME_WITH_EYE} or {' or '.join(FLAME_PKLS)}"),
            ("FLAME mediapipe embedding (optional)", self.mediapipe_embedding, MEDIAPIPE_EMBEDDING),
        ):
            lines.append(f"  {label}: {found if found else 'missing (expected ' + want + ')'}")
        if self.complete:
            lines.append("Everything is in place: photoreal GAGAvatar heads and FLAME tracking work.")
            return "\n".join(lines)
        lines.append("Works without them: the geometric avatar backend, mediapipe mesh tracking "
                     "(mesh-mode expressions), streaming and the scripted drivers.")
        if self.gagavatar is None:
            lines.append("Needs GAGAvatar.pt: the photoreal GAGAvatar backend.")
        if self.flame is None:
            lines.append("Needs a FLAME model: the GAGAvatar backend (it drives Gaussians with FLAME) "
                         "and the FLAME tracker.")
        lines.append(f"Get them with `{FETCH_COMMAND}` (asks you to accept the FLAME licence at "
                     f"{FLAME_LICENSE_URL}); FLAME .pkl files come only from that website after registering.")
        return "\n".join(lines)


def find_assets(path: str | Path | None = None) -> AssetStatus:
    """Look for the licensed files under the models folder (no loading, no network)."""
    root = models_dir(path)

    def first(*relpaths: str) -> Path | None:
        return next((root / r for r in relpaths if (root / r).is_file()), None)

    return AssetStatus(
        models_dir=root,
        gagavatar=first(GAGAVATAR_WEIGHTS),
        flame=first(FLAME_WITH_EYE, *FLAME_PKLS),
        flame_landmarks=first(FLAME_LANDMARKS),
        mediapipe_embedding=first(MEDIAPIPE_EMBEDDING),
    )


def ask_licence(ask: Callable[[str], str] = input, out: Callable[[str], None] = print) -> None:
    """Show the FLAME terms and require a typed "yes"; raise LicenceNotAccepted otherwise."""
    out(FLAME_LICENSE_TERMS)
    try:
        answer = ask(f'Have you registered and do you accept the FLAME licence at {FLAME_LICENSE_URL}? '
                     'Type "yes" to continue: ')
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        raise LicenceNotAccepted(
            f'FLAME licence not accepted (answer {answer.strip()!r}; only "yes" continues): nothing was '
            "downloaded. Without it the geometric backend and mesh tracking still work.")


def fetch_assets(path: str | Path | None = None, ask: Callable[[str], str] = input,
                 out: Callable[[str], None] = print,
                 downloads: tuple[Download, ...] = DOWNLOADS) -> AssetStatus:
    """Ask for the FLAME licence, then download the published files into models/ (resumable)."""
    ask_licence(ask, out)
    root = models_dir(path)
    record_path = root / RECORD_NAME
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for item in downloads:
        dest = root / item.relpath
        size, sha = _download(item, dest, record.get(item.relpath, {}), out)
        record[item.relpath] = {"name": item.name, "url": item.url, "size": size, "sha256": sha}
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    status = find_assets(root)
    out(status.explain())
    return status


def _published(url: str) -> tuple[int | None, str | None]:
    """Size and sha256 the server publishes for a file (Hugging Face sends them on the redirect)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, method="HEAD")
    try:
        response = urllib.request.build_opener(NoRedirect).open(request, timeout=30)
        headers = response.headers
    except urllib.error.HTTPError as exc:  # the 302 itself carries the headers
        if exc.code >= 400:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        headers = exc.headers
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: cannot connect ({exc.reason}); check the network") from None
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    etag = (headers.get("X-Linked-ETag") or "").strip('"').removeprefix("W/").strip('"')
    sha = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    return (int(size) if size and size.isdigit() else None), sha


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(item: Download, dest: Path, recorded: dict, out: Callable[[str], None]) -> tuple[int, str]:
    size, sha = _published(item.url)
    size = item.size or size
    sha = item.sha256 or sha or recorded.get("sha256")
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        have = _sha256(dest)
        if sha is None or have == sha:
            out(f"{item.name}: already present ({dest}, sha256 {have})")
            return dest.stat().st_size, have
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(item.url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and size is not None and offset == size:  # the .part is already whole
            response = None
        else:
            raise DownloadError(f"{item.url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"{item.url}: cannot connect ({exc.reason}); rerun to resume") from None
    if response is not None:
        resumed = offset and response.status == 206
        action = f"resuming at {offset} bytes" if resumed else "downloading"
        out(f"{item.name}: {action} from {item.url}")
        with response, part.open("ab" if resumed else "wb") as stream:
            done = offset if resumed else 0
            last = 0.0
            while block := response.read(1 << 20):
                stream.write(block)
                done += len(block)
                if time.monotonic() - last > 1.0:
                    last = time.monotonic()
                    total = f" / {size / 1e6:.1f} MB ({100 * done / size:.0f}%)" if size else " MB"
                    print(f"\r  {done / 1e6:.1f}{total}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    got_size, got_sha = part.stat().st_size, _sha256(part)
    if size is not None and got_size != size:
        raise DownloadError(f"{item.name}: got {got_size} bytes, expected {size}; rerun to resume")
    if sha is not None and got_sha != sha:
        part.unlink()
        raise DownloadError(f"{item.name}: sha256 {got_sha} does not match the published {sha}; "
                            "the partial file was removed, rerun to download again")
    part.replace(dest)
    out(f"{item.name}: {dest} ({got_size} bytes, sha256 {got_sha}{', verified' if sha else ', recorded'})")
    return got_size, got_sha
