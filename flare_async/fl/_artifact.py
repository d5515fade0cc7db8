"""A job's own code, shipped with it: a signed, self-contained artifact.

A job names its recipe as ``MODULE:RECIPE``. When that module is the user's own (not part of an
installed distribution nor the standard library), ``flare-async job export`` / ``job submit``
pack it: the recipe's top-level package (or module), the top-level package of its training
script, and any files named with ``--include``, as they are on the admin's disk. The admin's key
signs the artifact; the server and every site check that signature themselves, each against the
project's CA, and run the job with the artifact's ``code/`` folder first on the path of the job's
processes only (never installed anywhere, removed when the job ends on a site).

On disk (``job export``'s folder, and ``<store>/<job>/code`` on the server)::

    manifest.json   {"format": "flare-async-job/1", "recipe": "MODULE:RECIPE",
                     "script": "MODULE:FUNCTION", "admin": NAME,
                     "files": {"PATH": SHA256_HEX, ...}, "packages": [NAME, ...]}
    signature.json  {"sig.fields": ..., "sig.value": ..., "sig.cert": ...}: the admin's
                    signature over {"src": NAME, "kind": "job-code", "manifest": SHA256_HEX
                    of manifest.json's exact bytes, "at": UNIX_TIME}
    code/PATH       each file the manifest lists, nothing else

On the wire (inside the JSON of ``job/submit`` and ``job/start``): ``{"manifest": TEXT,
"signature": {...}, "files": {PATH: BASE64}}``.

What a hostile admin (or a server passing the artifact on) cannot do: change a byte of any file
(every file's SHA-256 is in the signed manifest; a file that is not listed, or a listed one that
is missing, is refused); ship it as someone else (the signer must be the submitting admin, whose
certificate must be the CA's and name an admin); write outside the job's folder (paths are plain
relative names, no ``..``, no hidden or control characters, written into a fresh folder);
replace a module of the site's own environment (a shipped top-level name that is a standard
library module, belongs to an installed distribution, is imported by a ``.pth`` file or is a
start-up hook such as ``sitecustomize`` is refused, so the job's code cannot stand in for
``flare_async`` and its privacy filters, or for ``numpy``); ship code other than what a reviewer
reads (Python source only: no bytecode, no native module); run it under another training script
than it was packed for (the manifest names the script, and a site runs no other with it); grow
without bound (:data:`MAX_FILES`, :data:`MAX_BYTES`).

What a site may refuse on top (its ``policy.toml``, :class:`~flare_async.fl._privacy.SitePolicy`):
any shipped code, code from admins not listed, top-level names not listed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from flare_async._spec import importable
from flare_async.errors import BadRequest, ConfigError, IntegrityError
from flare_async.security import Role, SignatureVerifier, Signer

FORMAT = "flare-async-job/1"
KIND = "job-code"
MAX_FILES = 2000
"""The most files one job may ship."""
MAX_BYTES = 16 * 2**20
"""The most bytes (all files together) one job may ship: code and small files, not data."""
MAX_PATH = 512
"""The longest path of one shipped file (characters)."""
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
CODE = "code"

_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
_COMPILED_SUFFIXES = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd", *_SKIP_SUFFIXES)
_MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())
_STARTUP = frozenset({"sitecustomize", "usercustomize"})
"""Modules the interpreter imports at start, before any job code is asked for."""


@dataclass(frozen=True)
class JobCode:
    """A job's code: the manifest's exact bytes, the admin's signature headers, the files."""

    manifest: bytes
    signature: Mapping[str, str]
    files: Mapping[str, bytes]

    # ------------------------------------------------------------------ reading it
    @property
    def meta(self) -> dict[str, Any]:
        """The manifest, parsed anew (the caller's to change; its shape checked by
        :meth:`checked`)."""
        doc: dict[str, Any] = json.loads(self.manifest)
        return doc

    @functools.cached_property
    def _meta(self) -> dict[str, Any]:
        """The manifest, parsed once, for the properties below (never handed out)."""
        return self.meta

    @property
    def recipe(self) -> str:
        return str(self._meta["recipe"])

    @property
    def script(self) -> str:
        """The training script the code was packed for (``MODULE:FUNCTION``): the only one a
        site runs with it."""
        return str(self._meta["script"])

    @property
    def admin(self) -> str:
        return str(self._meta["admin"])

    @property
    def packages(self) -> list[str]:
        return [str(p) for p in self._meta["packages"]]

    @property
    def digest(self) -> str:
        """SHA-256 of the manifest (which names every file's): the artifact's identity."""
        return hashlib.sha256(self.manifest).hexdigest()

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    # ------------------------------------------------------------------ checks
    def checked(self) -> JobCode:
        """This artifact, if it is well formed: the manifest's shape, every path plain, the
        files exactly those the manifest lists with those SHA-256s, within the limits.

        Raises:
            BadRequest: malformed, over a limit, or a path that is not a plain relative one.
            IntegrityError: a file differs from its manifest entry, is missing or unlisted.
        """
        if self.__dict__.get("_valid"):
            return self  # checked once already (an artifact is not changed once made)
        try:
            meta = self._meta
        except (ValueError, UnicodeError, RecursionError) as exc:
            raise BadRequest(f"the job's manifest is not JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BadRequest(f"the job's manifest is not a {FORMAT} manifest")
        keys = (
            ("recipe", str),
            ("script", str),
            ("admin", str),
            ("files", dict),
            ("packages", list),
        )
        for key, kind in keys:
            if not isinstance(meta.get(key), kind):
                raise BadRequest(f"the job's manifest has no {key} ({kind.__name__})")
        listed: dict[str, Any] = meta["files"]
        if len(listed) > MAX_FILES or len(self.files) > MAX_FILES:
            raise BadRequest(f"a job ships at most {MAX_FILES} files, not {len(listed)}")
        if self.size > MAX_BYTES:
            raise BadRequest(f"a job ships at most {MAX_BYTES} bytes of code, not {self.size}")
        for path in listed:
            check_path(path)
        folders = {path.rsplit("/", 1)[0] for path in listed if "/" in path}
        folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
        clash = sorted(folders & set(listed))
        if clash:
            raise BadRequest(f"the shipped path {clash[0]!r:.200} is both a file and a folder")
        unlisted = sorted(set(self.files) - set(listed))
        missing = sorted(set(listed) - set(self.files))
        if unlisted or missing:
            what = f"unlisted {unlisted[0]!r:.200}" if unlisted else f"missing {missing[0]!r:.200}"
            raise IntegrityError(f"the job's files differ from its signed manifest: {what}")
        for path, data in self.files.items():
            if hashlib.sha256(data).hexdigest() != listed[path]:
                raise IntegrityError(f"the job's file {path!r:.200} was changed after signing")
        packages = meta["packages"]
        if not all(isinstance(p, str) for p in packages) or sorted(packages) != top_level_names(
            listed
        ):
            raise BadRequest("the job's manifest names other packages than its files hold")
        module = str(meta["recipe"]).partition(":")[0]
        if not module or module.split(".", 1)[0] not in packages:
            raise BadRequest(f"the job's recipe {meta['recipe']!r:.200} is not in its code")
        check_shippable(packages)
        self.__dict__["_valid"] = True  # frozen: as functools.cached_property stores
        return self

    def verify(
        self, verifier: SignatureVerifier | None, *, now: datetime, admin: str | None = None
    ) -> JobCode:
        """:meth:`checked`, and signed by ``admin`` (the manifest's own when ``None``) with a
        certificate of the project's CA that names an admin. Without a verifier (a deployment
        without certificates, where nothing is signed) only the shape and hashes are checked:
        nothing says who made it.

        Raises:
            BadRequest: see :meth:`checked`.
            IntegrityError: a file changed, a signature that does not hold or is not the
                admin's, a certificate not of this CA or not an admin's.
        """
        self.checked()
        if verifier is None:
            return self
        if admin is not None and self.admin != admin:
            raise IntegrityError(
                f"the job's code is signed for {self.admin!r:.100}, but {admin} submits it"
            )
        expect = {"kind": KIND, "manifest": self.digest}
        _, identity = verifier.verify_signer(self.signature, src=self.admin, expect=expect, now=now)
        if identity.role is not Role.ADMIN:
            raise IntegrityError(
                f"the job's code is signed by {self.admin}, a {identity.role.value}, not an admin"
            )
        return self

    # ------------------------------------------------------------------ wire and disk
    def to_wire(self) -> dict[str, Any]:
        """The artifact as JSON-able data (inside ``job/submit`` and ``job/start``)."""
        return {
            "manifest": self.manifest.decode(),
            "signature": dict(self.signature),
            "files": {p: base64.b64encode(d).decode() for p, d in self.files.items()},
        }

    @classmethod
    def from_wire(cls, doc: object) -> JobCode:
        """The artifact in ``doc`` (see :meth:`to_wire`), its shape checked (not its signature).

        Raises:
            BadRequest: not an artifact, or over a limit.
            IntegrityError: see :meth:`checked`.
        """
        if not isinstance(doc, dict) or set(doc) != {"manifest", "signature", "files"}:
            raise BadRequest("a job's code is {'manifest', 'signature', 'files'}")
        manifest, signature, files = doc["manifest"], doc["signature"], doc["files"]
        if not isinstance(manifest, str) or len(manifest) > MAX_FILES * (6 * MAX_PATH + 80) + 4096:
            raise BadRequest("a job's manifest is text of bounded size")
        if (
            not isinstance(signature, dict)
            or len(signature) > 3
            or not all(
                isinstance(k, str) and k.startswith("sig.") and isinstance(v, str)
                for k, v in signature.items()
            )
        ):
            raise BadRequest("a job's signature is the sig.* headers (text) of one signature")
        if not isinstance(files, dict) or len(files) > MAX_FILES:
            raise BadRequest(f"a job's files are at most {MAX_FILES} PATH: BASE64 entries")
        decoded: dict[str, bytes] = {}
        total = 0
        for path, text in files.items():
            if not isinstance(path, str) or not isinstance(text, str):
                raise BadRequest("a job's files are PATH: BASE64 entries")
            total += len(text) * 3 // 4 - text[-2:].count("=")
            if total > MAX_BYTES:
                raise BadRequest(f"a job ships at most {MAX_BYTES} bytes of code")
            try:
                decoded[path] = base64.b64decode(text, validate=True)
            except (ValueError, binascii.Error):
                raise BadRequest(f"the job's file {path!r:.200} is not base64") from None
        return cls(manifest.encode(), dict(signature), decoded).checked()

    def write(self, folder: Path) -> Path:
        """Write the artifact as a folder (``manifest.json``, ``signature.json``, ``code/``),
        which must not exist or be empty; returns its ``code`` folder.

        Raises:
            ConfigError: the folder exists and holds something.
        """
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ConfigError(f"{folder} exists and is not an empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).write_bytes(self.manifest)
        (folder / SIGNATURE).write_text(json.dumps(dict(self.signature), indent=1) + "\n")
        return self.install(folder / CODE)

    def install(self, code: Path) -> Path:
        """Write the files into ``code`` (a fresh folder: an old one of that name is removed
        first), creating each file anew; returns ``code``."""
        if code.is_symlink() or code.is_file():
            code.unlink()
        elif code.exists():
            shutil.rmtree(code)
        code.mkdir(parents=True)
        for path, data in sorted(self.files.items()):
            target = code.joinpath(*path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return code

    @classmethod
    def read(cls, folder: Path) -> JobCode:
        """The artifact ``job export`` wrote into ``folder``, its shape checked.

        Raises:
            ConfigError: not such a folder (no manifest or signature), unreadable.
            BadRequest, IntegrityError: see :meth:`checked` (a file edited after export).
        """
        try:
            manifest = (folder / MANIFEST).read_bytes()
            signature = json.loads((folder / SIGNATURE).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder} is not an exported job ({exc})") from None
        code = folder / CODE
        files = dict(_walk(code, code, everything=True)) if code.is_dir() else {}
        if not isinstance(signature, dict):
            raise ConfigError(f"{folder / SIGNATURE} is not a signature")
        return cls(manifest, {str(k): str(v) for k, v in signature.items()}, files).checked()


# ---------------------------------------------------------------------------- packing
def pack_job(
    spec: str,
    signer: Signer | None,
    *,
    include: Iterable[str] = (),
    root: Path | None = None,
    now: float | None = None,
) -> JobCode:
    """The artifact of the recipe ``MODULE:RECIPE`` (or ``path/to/file.py:RECIPE``) as it is
    on this disk, signed by ``signer`` (an admin's kit). Ships the top-level package (or module)
    of the recipe and of its training script, when those are the user's own, and every file
    or folder in ``include`` (relative to ``root``, the current folder by default).

    The recipe is loaded here, with ``root`` first on the path as ``python -m`` would (the
    admin's own code, on the admin's machine), to learn its script.

    Raises:
        ConfigError: the recipe does not load, its module is installed (send it by name), a
            path to include is outside ``root``, or the result breaks a limit.
    """
    from flare_async.fl._recipe import load_recipe  # noqa: PLC0415 - the recipe imports fl

    root = (root or Path.cwd()).resolve()
    spec = importable(spec, root)
    module = spec.partition(":")[0]
    if _local_origin(module.split(".", 1)[0]) is None:
        raise ConfigError(
            f"{module} is installed here (not your own code): submit it by name "
            "(--installed) on a deployment where every site has it"
        )
    script_spec = load_recipe(spec).script_spec()
    script = script_spec.partition(":")[0]
    files: dict[str, bytes] = {}
    for top in dict.fromkeys(m.split(".", 1)[0] for m in (module, script)):
        where = _local_origin(top)
        if where is None:
            continue  # an installed script's package: the sites have it
        base = where.parent
        if where.is_dir():
            # A folder without __init__.py (a namespace package) could be any folder (a kit's
            # key beside the scripts): only its Python source goes; other files by --include.
            source_only = not (where / "__init__.py").is_file()
            files.update(_walk(where, base, source_only=source_only))
        else:
            files[where.name] = where.read_bytes()
    for item in include:
        path = (root / item).resolve()
        if not path.is_relative_to(root) or not path.exists():
            raise ConfigError(f"--include {item}: not a file or folder inside {root}")
        files.update(_walk(path, root) if path.is_dir() else {_rel(path, root): path.read_bytes()})
    if not files:
        raise ConfigError(f"nothing to ship for {spec}")
    packages = top_level_names(files)
    admin = signer.name if signer is not None else ""
    manifest = json.dumps(
        {
            "format": FORMAT,
            "recipe": spec,
            "script": script_spec,
            "admin": admin,
            "files": {p: hashlib.sha256(d).hexdigest() for p, d in sorted(files.items())},
            "packages": packages,
        },
        indent=1,
        sort_keys=True,
    ).encode()
    signature: dict[str, str] = {}
    if signer is not None:
        fields = {
            "src": admin,
            "kind": KIND,
            "manifest": hashlib.sha256(manifest).hexdigest(),
            "at": round(time.time() if now is None else now, 3),
        }
        signature = signer.sign(fields)
    try:
        return JobCode(manifest, signature, files).checked()
    except (BadRequest, IntegrityError) as exc:
        raise ConfigError(str(exc)) from None


def is_own_code(spec: str, root: Path) -> bool:
    """Whether the recipe ``spec`` names lives in the user's own code (shipped with the job)
    rather than in the environment (sent by name); ``root`` goes first on the path.

    Raises:
        ConfigError: no such module or file.
    """
    module = importable(spec, root).partition(":")[0]
    return _local_origin(module.split(".", 1)[0]) is not None


def _local_origin(top: str) -> Path | None:
    """Where the top-level module ``top`` lives if it is the user's own (its package folder or
    its ``.py`` file), ``None`` if the environment provides it."""
    if top in _environment():
        return None
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise ConfigError(f"no module {top} to ship")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None or not spec.origin.endswith(".py"):
        raise ConfigError(f"{top} is not Python source ({spec.origin}): it cannot be shipped")
    return Path(spec.origin)


def _walk(
    path: Path, base: Path, *, everything: bool = False, source_only: bool = False
) -> Iterable[tuple[str, bytes]]:
    """Every file under ``path`` as (its path relative to ``base``, its bytes): no caches,
    nothing hidden, no symbolic links (``everything``: all of them, symbolic links as their
    targets' bytes, for a check that no file was added; ``source_only``: ``.py`` files only)."""
    for here, dirs, names in os.walk(path):
        if not everything:
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            full = Path(here) / name
            skip = name.startswith(".") or name.endswith(_SKIP_SUFFIXES) or full.is_symlink()
            if (skip and not everything) or (source_only and not name.endswith(".py")):
                continue
            yield _rel(full, base), full.read_bytes()


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


# ---------------------------------------------------------------------------- rules
def check_path(path: object) -> str:
    """``path`` if it is a plain relative file path: ``/``-separated names, none empty, ``.``,
    ``..`` or hidden, none longer than 255 bytes, no backslash, NUL or other control character,
    at most :data:`MAX_PATH` characters; Python source, not compiled code (no native extension
    module, no bytecode, nothing in ``__pycache__``: what runs is what a reviewer reads).

    Raises:
        BadRequest: otherwise.
    """
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise BadRequest(f"a shipped file's path must be text of 1-{MAX_PATH} characters")
    for part in path.split("/"):
        if (
            not part
            or part.startswith(".")
            or "\\" in part
            or len(part.encode()) > 255
            or any(ord(c) < 32 or ord(c) == 127 for c in part)
        ):
            raise BadRequest(f"the shipped path {path!r:.200} is not a plain relative path")
    if path.endswith(_COMPILED_SUFFIXES) or "__pycache__" in path.split("/"):
        raise BadRequest(f"a job ships Python source, not compiled code ({path!r:.200})")
    return path


def top_level_names(paths: Iterable[str]) -> list[str]:
    """The importable top-level names the files make: ``X`` of ``X/...`` and of ``X.py`` (or
    any other suffix the importer loads)."""
    names = set()
    for path in paths:
        first, sep, _ = path.partition("/")
        if sep:
            names.add(first)
        else:
            for suffix in _MODULE_SUFFIXES:
                if first.endswith(suffix):
                    names.add(first[: -len(suffix)])
    return sorted(names)


def check_shippable(packages: Iterable[str]) -> None:
    """Refuse shipped top-level names the environment already has (the standard library,
    built-in modules, any installed distribution's): a job's code never stands in for them.

    Raises:
        BadRequest: such a name, or one that is not an identifier.
    """
    for name in packages:
        if not name.isidentifier():
            raise BadRequest(f"the job ships {name!r:.100}, which is not a module name")
        if name in _environment():
            raise BadRequest(
                f"the job ships a module {name!r}, which this environment already has "
                "(the standard library or an installed package): rename it"
            )


@cache
def _environment() -> frozenset[str]:
    """Top-level module names of the standard library (its folder's too: ``test``), the
    built-ins, every installed distribution (editable installs included), what the site
    folders' ``.pth`` files import, and the interpreter's start-up hooks."""
    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | set(_STARTUP)
    names |= set(importlib.metadata.packages_distributions())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if stdlib.is_dir():
        names |= {p.name.removesuffix(".py") for p in stdlib.iterdir()}
    for folder in {*site.getsitepackages(), site.getusersitepackages()}:
        for pth in Path(folder).glob("*.pth") if Path(folder).is_dir() else ():
            with contextlib.suppress(OSError, UnicodeError):
                for line in pth.read_text().splitlines():
                    if line.startswith(("import ", "import\t")):
                        names |= {
                            m.strip().split(".")[0] for m in line[7:].split(";")[0].split(",")
                        }
    return frozenset(n for n in names if n.isidentifier())


def code_path_env(code: Path | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a job's process: ``code`` first on ``PYTHONPATH`` (the process is
    started with ``-P``, so its working folder is not on the path)."""
    out = dict(os.environ if env is None else env)
    if code is not None:
        rest = out.get("PYTHONPATH", "")
        out["PYTHONPATH"] = str(code) + (os.pathsep + rest if rest else "")
    return out


def python(code: Path | None) -> list[str]:
    """The interpreter's argv start for a job's process: ``-P`` when it runs shipped code
    (its working folder, which may hold other copies of the code, stays off the path)."""
    return [sys.executable, "-P"] if code is not None else [sys.executable]


def load_wire(doc: object, where: str) -> JobCode | None:
    """The artifact in a request's ``code`` field (``None`` when absent).

    Raises:
        BadRequest: not an artifact (see :meth:`JobCode.from_wire`).
    """
    if doc is None:
        return None
    try:
        return JobCode.from_wire(doc)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc}") from None


__all__ = [
    "CODE",
    "FORMAT",
    "MAX_BYTES",
    "MAX_FILES",
    "JobCode",
    "check_path",
    "check_shippable",
    "code_path_env",
    "is_own_code",
    "pack_job",
    "python",
    "top_level_names",
]
