"""A job's own code as a signed artifact (``fl/_artifact.py``): packing, the checks every
receiver makes (hashes, signer, paths, shadowing, limits) and a site's policy on it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flare_async.errors import BadRequest, ConfigError, IntegrityError
from flare_async.fl._artifact import (
    MAX_BYTES,
    MAX_FILES,
    JobCode,
    check_path,
    is_own_code,
    pack_job,
    top_level_names,
)
from flare_async.fl._privacy import policy_from_dict
from flare_async.security import SignatureVerifier, Signer, load_kit, provision

NOW = datetime.now(UTC)
ADMIN, OTHER = "alice@example.org", "bob@example.org"

RECIPE = """
import numpy as np
from flare_async.fl import FedAvgRecipe
from labjob.helpers import STEP


def train() -> None:
    import flare_async.client as flare
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        flare.send(model)


recipe = FedAvgRecipe(initial={"w": np.zeros(2) + STEP}, script="labjob:train", rounds=1)
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("code-kits")
    (root / "project.toml").write_text(
        'project = "code"\norg = "example.org"\n[server]\nlisten = ["tls://127.0.0.1:1"]\n'
        '[[clients]]\nname = "server.site-1"\nparent = "tls://127.0.0.1:1"\n'
        f'[[admins]]\nname = "{ADMIN}"\nparent = "tls://127.0.0.1:1"\n'
        f'[[admins]]\nname = "{OTHER}"\nparent = "tls://127.0.0.1:1"\n'
    )
    provision(root / "project.toml", root / "kits", now=NOW)
    return root / "kits"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's folder holding the package ``labjob`` (found nowhere else)."""
    pkg = tmp_path / "labjob"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(RECIPE)
    (pkg / "helpers.py").write_text("STEP = 1.5\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.pyc").write_bytes(b"cache")
    (pkg / ".secret").write_text("not shipped")
    (tmp_path / "data.json").write_text('{"lr": 0.1}')
    saved = list(sys.path)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # packing adds to it
    yield tmp_path
    sys.path[:] = saved
    for name in [m for m in sys.modules if m == "labjob" or m.startswith("labjob.")]:
        del sys.modules[name]


def signer(kits: Path, name: str = ADMIN) -> Signer:
    return Signer(load_kit(kits / name, now=NOW))


def verifier(kits: Path) -> SignatureVerifier:
    return SignatureVerifier.from_kit(load_kit(kits / "server", now=NOW))


def resigned(code: JobCode, kits: Path, files: dict[str, bytes], *, extra: str = "") -> JobCode:
    """``code`` with other files and a manifest that lists them, signed again by its admin."""
    meta = code.meta
    meta["files"] = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    meta["packages"] = top_level_names(files)
    manifest = json.dumps(meta).encode() + extra.encode()
    fields = {
        "src": ADMIN,
        "kind": "job-code",
        "manifest": hashlib.sha256(manifest).hexdigest(),
        "at": 1.0,
    }
    return JobCode(manifest, signer(kits).sign(fields), files)


# ---------------------------------------------------------------- packing
def test_a_recipe_of_ones_own_package_ships_that_package_signed(project: Path, kits: Path) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project, include=["data.json"])
    assert sorted(code.files) == ["data.json", "labjob/__init__.py", "labjob/helpers.py"]
    assert code.script == "labjob:train"
    assert code.packages == ["labjob"]
    assert code.recipe == "labjob:recipe"
    assert code.admin == ADMIN
    assert code.verify(verifier(kits), now=NOW, admin=ADMIN) is code


def test_a_recipe_file_ships_as_a_module_of_its_own(project: Path, kits: Path) -> None:
    (project / "solo.py").write_text(RECIPE.replace("labjob:train", "solo:train"))
    code = pack_job("solo.py:recipe", signer(kits), root=project)
    assert code.recipe == "solo:recipe"
    assert "solo.py" in code.files
    assert "labjob/helpers.py" not in code.files
    del sys.modules["solo"]


def test_an_installed_recipe_is_not_ones_own(project: Path) -> None:
    assert is_own_code("labjob:recipe", project)
    assert not is_own_code("flare_async.fl:FedAvgRecipe", project)
    with pytest.raises(ConfigError, match="installed here"):
        pack_job("flare_async.fl._recipe:FedAvgRecipe", None, root=project)


def test_an_include_outside_the_folder_is_refused(project: Path, kits: Path) -> None:
    with pytest.raises(ConfigError, match="not a file or folder inside"):
        pack_job("labjob:recipe", signer(kits), root=project, include=["../elsewhere"])


def test_export_writes_a_folder_that_reads_back_and_refuses_a_full_one(
    project: Path, kits: Path, tmp_path: Path
) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    out = tmp_path / "exported"
    code.write(out)
    again = JobCode.read(out)
    assert again.manifest == code.manifest
    assert dict(again.files) == dict(code.files)
    with pytest.raises(ConfigError, match="not an empty folder"):
        code.write(out)


def test_an_exported_folder_edited_afterwards_is_refused(
    project: Path, kits: Path, tmp_path: Path
) -> None:
    pack_job("labjob:recipe", signer(kits), root=project).write(tmp_path / "x")
    (tmp_path / "x" / "code" / "labjob" / "helpers.py").write_text("STEP = 99\n")
    with pytest.raises(IntegrityError, match="changed after signing"):
        JobCode.read(tmp_path / "x")


# ---------------------------------------------------------------- what a receiver checks
def test_a_changed_file_an_unlisted_one_and_a_missing_one_are_refused(
    project: Path, kits: Path
) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    files = dict(code.files)
    changed = {**files, "labjob/helpers.py": b"STEP = 2\n"}
    with pytest.raises(IntegrityError, match="changed after signing"):
        JobCode(code.manifest, code.signature, changed).checked()
    with pytest.raises(IntegrityError, match=r"unlisted 'labjob/evil\.py'"):
        JobCode(code.manifest, code.signature, {**files, "labjob/evil.py": b""}).checked()
    del files["labjob/helpers.py"]
    with pytest.raises(IntegrityError, match=r"missing 'labjob/helpers\.py'"):
        JobCode(code.manifest, code.signature, files).checked()


def test_the_manifest_itself_cannot_be_changed_under_the_signature(
    project: Path, kits: Path
) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    meta = code.meta
    meta["files"]["labjob/helpers.py"] = hashlib.sha256(b"STEP = 2\n").hexdigest()
    files = {**code.files, "labjob/helpers.py": b"STEP = 2\n"}
    forged = JobCode(json.dumps(meta).encode(), code.signature, files)
    assert forged.checked() is forged  # consistent in itself...
    with pytest.raises(IntegrityError, match="changed on the way"):
        forged.verify(verifier(kits), now=NOW, admin=ADMIN)  # ...but not what was signed


def test_code_signed_by_another_admin_or_a_site_or_nobody_is_refused(
    project: Path, kits: Path
) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    with pytest.raises(IntegrityError, match=f"but {OTHER} submits it"):
        code.verify(verifier(kits), now=NOW, admin=OTHER)
    with pytest.raises(IntegrityError, match="not signed"):
        JobCode(code.manifest, {}, code.files).verify(verifier(kits), now=NOW, admin=ADMIN)
    site = pack_job("labjob:recipe", signer(kits, "server.site-1"), root=project)
    with pytest.raises(IntegrityError, match="not an admin"):
        site.verify(verifier(kits), now=NOW)
    later = datetime(2200, 1, 1, tzinfo=UTC)
    with pytest.raises(IntegrityError, match="not valid at"):
        code.verify(verifier(kits), now=later, admin=ADMIN)


@pytest.mark.parametrize(
    "path",
    [
        "../labjob/x.py",
        "labjob/../../x.py",
        "/etc/cron.d/x",
        "labjob//x.py",
        "labjob/.hidden.py",
        "labjob\\x.py",
        "labjob/x\x00.py",
        "labjob/x\n.py",
        "labjob/native" + ".cpython-311-x86_64-linux-gnu.so",
        "labjob/mod.pyc",
        "numpy.pyc",
        "labjob/__pycache__/mod.cpython-311.pyc",
        "labjob/__pycache__/notes.txt",
        "a/" + "b" * 256,
        "a" * 513,
        "",
    ],
)
def test_a_path_that_is_not_plain_and_relative_is_refused(path: str) -> None:
    with pytest.raises(BadRequest):
        check_path(path)


def test_a_path_at_the_length_limits_is_taken() -> None:
    longest = "/".join(["b" * 255, "c" * 254, "d"])  # MAX_PATH (512), a part of 255 bytes
    assert check_path(longest) == longest
    with pytest.raises(BadRequest):
        check_path(longest + "e")


@pytest.mark.parametrize(
    "name",
    ["numpy", "flare_async", "os", "json", "sys", "test", "sitecustomize", "usercustomize"],
)
def test_code_that_would_stand_in_for_the_environment_is_refused(
    project: Path, kits: Path, name: str
) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    files = {**code.files, f"{name}/__init__.py": b"HIJACKED = True\n"}
    with pytest.raises(BadRequest, match=f"ships a module '{name}'"):
        resigned(code, kits, files).checked()


def test_the_file_count_and_size_limits_hold_at_their_edges(project: Path, kits: Path) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    base = dict(code.files)
    room = MAX_FILES - len(base)
    many = {**base, **{f"labjob/m{i}.py": b"" for i in range(room)}}
    assert len(resigned(code, kits, many).checked().files) == MAX_FILES
    with pytest.raises(BadRequest, match=f"at most {MAX_FILES} files"):
        resigned(code, kits, {**many, "labjob/one_more.py": b""}).checked()
    left = MAX_BYTES - sum(len(d) for d in base.values())
    full = {**base, "labjob/blob.bin": b"x" * left}
    assert resigned(code, kits, full).checked().size == MAX_BYTES
    wire = resigned(code, kits, full).to_wire()
    assert JobCode.from_wire(wire).size == MAX_BYTES
    over = {**base, "labjob/blob.bin": b"x" * (left + 1)}
    with pytest.raises(BadRequest, match=f"at most {MAX_BYTES} bytes"):
        resigned(code, kits, over).checked()
    with pytest.raises(BadRequest, match=f"at most {MAX_BYTES} bytes"):
        JobCode.from_wire(resigned(code, kits, over).to_wire())


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"manifest": "{}", "signature": {}},
        {"manifest": "{}", "signature": {}, "files": {}, "more": 1},
        {"manifest": 3, "signature": {}, "files": {}},
        {"manifest": "{}", "signature": {"a": 1}, "files": {}},
        {"manifest": "{}", "signature": {"other": "x"}, "files": {}},
        {"manifest": "{}", "signature": {f"sig.{i}": "x" for i in range(4)}, "files": {}},
        {"manifest": "{}", "signature": {}, "files": {"x.py": "not base64!"}},
        {"manifest": "not json", "signature": {}, "files": {}},
        {"manifest": '{"format": "other/1"}', "signature": {}, "files": {}},
    ],
)
def test_a_malformed_artifact_on_the_wire_is_a_bad_request(doc: object) -> None:
    with pytest.raises(BadRequest):
        JobCode.from_wire(doc)


def test_a_path_that_is_both_a_file_and_a_folder_is_refused(project: Path, kits: Path) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    files = {**code.files, "labjob/z": b"", "labjob/z/q.py": b""}
    with pytest.raises(BadRequest, match="both a file and a folder"):
        resigned(code, kits, files).checked()


@pytest.mark.parametrize(
    "manifest",
    [
        "[" * 100_000,
        '{"format": "flare-async-job/1", "recipe": "a:b", "script": "a:c", '
        '"admin": "", "packages": [1, "a"], "files": {"a.py": '
        f'"{hashlib.sha256(b"").hexdigest()}"}}',
    ],
)
def test_a_manifest_too_deep_or_of_wrong_types_is_a_bad_request(manifest: str) -> None:
    with pytest.raises(BadRequest):
        JobCode.from_wire({"manifest": manifest, "signature": {}, "files": {"a.py": ""}})


def test_the_byte_limit_counts_decoded_bytes_over_many_files(project: Path, kits: Path) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    left = MAX_BYTES - code.size
    quarter = left // 4
    files = {**code.files, **{f"labjob/b{i}.bin": b"x" * quarter for i in range(3)}}
    files["labjob/b3.bin"] = b"x" * (left - 3 * quarter)
    assert JobCode.from_wire(resigned(code, kits, files).to_wire()).size == MAX_BYTES


def test_a_folder_without_init_ships_its_python_source_only(project: Path, kits: Path) -> None:
    (project / "loose" / "sub").mkdir(parents=True)
    (project / "loose" / "job.py").write_text(RECIPE.replace("labjob:train", "loose.job:train"))
    (project / "loose" / "sub" / "util.py").write_text("X = 1\n")
    (project / "loose" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----")
    code = pack_job("loose.job:recipe", signer(kits), root=project)
    assert "loose/key.pem" not in code.files  # a namespace folder could be any folder
    assert {"loose/job.py", "loose/sub/util.py"} <= set(code.files)
    del sys.modules["loose.job"], sys.modules["loose"]


def test_the_recipe_must_be_in_the_shipped_code(project: Path, kits: Path) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    meta = code.meta
    meta["recipe"] = "os:system"
    with pytest.raises(BadRequest, match="not in its code"):
        JobCode(json.dumps(meta).encode(), {}, code.files).checked()


def test_install_writes_a_fresh_folder(project: Path, kits: Path, tmp_path: Path) -> None:
    code = pack_job("labjob:recipe", signer(kits), root=project)
    target = tmp_path / "job" / "code"
    target.mkdir(parents=True)
    (target / "stale.py").write_text("left from before")
    code.install(target)
    found = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert found == sorted(code.files)
    wire = code.to_wire()
    assert base64.b64decode(wire["files"]["labjob/helpers.py"]) == b"STEP = 1.5\n"


# ---------------------------------------------------------------- a site's policy
def test_a_sites_policy_decides_whether_whose_and_which_code_runs() -> None:
    default = policy_from_dict({})
    assert default.refuses_code(ADMIN, ["labjob"]) is None
    off = policy_from_dict({"jobs": {"custom_code": False}})
    assert "custom_code = false" in (off.refuses_code(ADMIN, ["labjob"]) or "")
    only = policy_from_dict({"jobs": {"code_from": [ADMIN], "packages": ["lab*"]}})
    assert only.refuses_code(ADMIN, ["labjob"]) is None
    assert OTHER in (only.refuses_code(OTHER, ["labjob"]) or "")
    assert "'tools'" in (only.refuses_code(ADMIN, ["labjob", "tools"]) or "")
    own = policy_from_dict({"jobs": {"scripts": ["ours.train:*"]}})
    assert "this site's scripts" in (own.refuses_code(ADMIN, ["ours"]) or "")
    assert own.refuses_code(ADMIN, ["labjob"]) is None


@pytest.mark.parametrize(
    "jobs",
    [{"custom_code": "yes"}, {"code_from": "alice"}, {"packages": [1]}, {"code": True}],
)
def test_a_policy_with_a_wrong_code_setting_does_not_load(jobs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        policy_from_dict({"jobs": jobs})


@pytest.mark.parametrize("job", ["inbox", "", ".x", "a/b", "a\\b", "x\x00", "-x", "a" * 101])
def test_a_job_id_that_is_not_a_plain_folder_of_the_sites_own_is_refused(job: str) -> None:
    from flare_async.fl._site import _check_job_id  # noqa: PLC0415 - a site's own rule

    with pytest.raises(BadRequest, match="bad job id"):
        _check_job_id(job)
    _check_job_id("20261207-0a1b2c3d")
