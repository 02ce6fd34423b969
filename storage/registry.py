"""The artifact registry: immutable numbered versions, aliases and lineage per name.

    from soapflow.storage.registry import Registry
    reg = Registry("s3://bucket/soap", storage_options={"endpoint_url": ...})  # or a local path
    res = reg.publish("artifacts/run-17")          # PublishResult(name='dinov2_vits14/11', version=4, ...)
    reg.promote("dinov2_vits14/11", 4, "production")
    reg.pull("dinov2_vits14/11@production", "here/")   # verified sha256

Layout (the same on a local path and on an object store; ``<name>`` may hold ``/``)::

    <root>/<name>/~versions/<v>/claim.json        create-if-absent: who holds number <v>
                               /artifact/...       the artifact directory (SPEC §4), manifest
                                                   with name and version filled in
                               /record.json        lineage, parameters, supersedes, publish time
                               /committed.json     written last: content hash + sha256 of every
                                                   artifact file; a version without it is invisible
                               /evaluations/<key>.json   evaluation results, one file per key
    <root>/<name>/~aliases/<alias>.json            {"version": v, ...}, replaced atomically

``~`` cannot occur in a name, so ``~versions``/``~aliases`` never collide with name parts
(``dinov2_vits14/11`` and ``dinov2_vits14/11/q`` can coexist). ``latest`` is not stored: it is
always the highest committed version, so concurrent publishers cannot move it backwards.

Publishing: claim the next number with a create-if-absent write (``link(2)`` locally,
``PutObject If-None-Match: *`` on S3; on conflict try the next number), upload the artifact
(locally into a temp directory renamed into place), write ``record.json``, then create
``committed.json``. A crash at any point leaves an uncommitted number that readers skip and the
next publisher steps over — there is no lock to release.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from soapflow.errors import SoapError, json_object
from soapflow.common import is_url, utc_now
from soapflow.storage.artifact import MANIFEST_FILE, TENSORS_FILE, final_norm_of, read_artifact, sha256_file, verify_artifact
from soapflow.storage.diff import diff_artifacts, dotted, same_value
from soapflow.storage.objectstore import open_store

REGISTRY_SCHEMA = 1
VERSIONS = "~versions"
ALIASES = "~aliases"
LATEST = "latest"
CLAIM, RECORD, COMMITTED = "claim.json", "record.json", "committed.json"
ARTIFACT = "artifact"
EVALUATIONS = "evaluations"

_PART = re.compile(r"[A-Za-z0-9._-]+")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_EVAL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME = 200
PARAM_KEYS = ("mu", "mu_mode", "tau", "gamma", "threshold", "suppress", "feature", "image_size")
INPUT_KEYS = ("backbone", "weights", "layer", "feature", "final_norm", "image_size", "grid", "dim")


# --------------------------------------------------------------------------------------------
# names, refs, roots


def default_registry_root() -> str:
    """``$SOAPFLOW_REGISTRY``, else ``$XDG_DATA_HOME/soapflow/registry`` (``~/.local/share/…``)."""
    env = os.environ.get("SOAPFLOW_REGISTRY")
    if env:
        return env
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "soapflow", "registry")


def default_storage_options() -> dict | None:
    """``$SOAPFLOW_STORAGE_OPTIONS`` as a JSON object, if set (``AWS_ENDPOINT_URL`` etc. are read
    by botocore itself)."""
    env = os.environ.get("SOAPFLOW_STORAGE_OPTIONS")
    if not env:
        return None
    return json_object(env, "SOAPFLOW_STORAGE_OPTIONS")


def validate_name(name: Any) -> str:
    """A registry name: parts of ``[A-Za-z0-9._-]`` separated by single ``/``."""
    if not isinstance(name, str) or not name:
        raise SoapError(f"registry name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME:
        raise SoapError(f"registry name {name!r} is longer than {MAX_NAME} characters")
    if name.startswith("/") or name.endswith("/"):
        raise SoapError(f"registry name {name!r} must not start or end with '/'")
    for part in name.split("/"):
        if not part:
            raise SoapError(f"registry name {name!r} has an empty part ('//')")
        if part in (".", ".."):
            raise SoapError(f"registry name {name!r} must not contain '.' or '..' parts")
        if not _PART.fullmatch(part):
            bad = sorted({c for c in part if not _PART.fullmatch(c)})
            raise SoapError(
                f"registry name {name!r}: part {part!r} has characters {''.join(bad)!r} outside "
                "[A-Za-z0-9._-] (use '/' to separate parts)"
            )
    return name


def validate_alias(alias: Any) -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise SoapError(
            f"alias {alias!r} is not valid: start with a letter, then up to 63 of [A-Za-z0-9._-]"
        )
    return alias


def default_name(manifest: dict) -> str:
    """The manifest's own name (an artifact pulled from a registry keeps it), else
    ``<backbone>/<layer>`` (``/<feature>`` appended for q/k/v/kqv features)."""
    if manifest.get("name"):
        return validate_name(manifest["name"])
    backbone, layer = manifest.get("backbone"), manifest.get("layer")
    if not backbone or layer is None:
        raise SoapError(
            "the artifact's manifest names no backbone/layer to build a default registry name "
            f"(backbone={backbone!r}, layer={layer!r}); pass --name"
        )
    name = f"{backbone}/{layer}"
    feature = manifest.get("feature") or "out"
    if feature != "out":
        name += f"/{feature}"
    return validate_name(name)


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.alias or LATEST}"


def parse_ref(ref: Any) -> Ref:
    """``name`` (= ``name@latest``), ``name@alias`` or ``name:version``."""
    if isinstance(ref, Ref):
        return ref
    if not isinstance(ref, str) or not ref:
        raise SoapError(f"registry reference must be NAME, NAME@ALIAS or NAME:VERSION, got {ref!r}")
    if "@" in ref and ":" in ref:
        raise SoapError(f"registry reference {ref!r}: use either NAME@ALIAS or NAME:VERSION, not both")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        try:
            return Ref(validate_name(name), alias=validate_alias(alias))
        except SoapError as exc:
            raise SoapError(f"registry reference {ref!r}: {exc}") from None
    if ":" in ref:
        name, _, ver = ref.rpartition(":")
        if not ver.isdigit() or int(ver) < 1:
            raise SoapError(f"registry reference {ref!r}: version must be an integer ≥ 1, got {ver!r}")
        try:
            return Ref(validate_name(name), version=int(ver))
        except SoapError as exc:
            raise SoapError(f"registry reference {ref!r}: {exc}") from None
    try:
        return Ref(validate_name(ref), alias=LATEST)
    except SoapError as exc:
        raise SoapError(f"registry reference {ref!r}: {exc}") from None


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: int
    created: bool
    content_hash: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def __str__(self) -> str:
        return self.ref


# --------------------------------------------------------------------------------------------
# helpers


def _now() -> str:
    return utc_now("milliseconds")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _numpy_default(obj: Any) -> Any:
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps_strict(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_numpy_default) + "\n").encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _publisher() -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = None
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid()}


def _artifact_files(artifact_dir: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(artifact_dir.rglob("*")):
        rel = path.relative_to(artifact_dir)
        if any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        files[rel.as_posix()] = path
    return files


# --------------------------------------------------------------------------------------------
# the registry


class Registry:
    """A registry rooted at a local path or an fsspec URL (``s3://bucket/prefix``)."""

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict | None = None):
        if root is None or str(root) == "":
            root = default_registry_root()
        if storage_options is None and is_url(str(root)):
            storage_options = default_storage_options()
        self.store = open_store(root, storage_options)
        self.root = self.store.url
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # -- keys --------------------------------------------------------------------------------
    @staticmethod
    def _vkey(name: str, version: int, *rest: str) -> str:
        return "/".join((name, VERSIONS, str(version), *rest))

    @staticmethod
    def _akey(name: str, alias: str) -> str:
        return f"{name}/{ALIASES}/{alias}.json"

    def _read_json(self, key: str) -> dict:
        data = self.store.read_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise SoapError(f"registry {self.root}: {key} is not valid JSON ({exc})") from None

    # -- listing -----------------------------------------------------------------------------
    def _version_keys(self, name: str) -> tuple[set[int], set[int]]:
        """(claimed, committed) version numbers of ``name``."""
        claimed, committed = set(), set()
        prefix = f"{name}/{VERSIONS}/"
        for key in self.store.list_files(f"{name}/{VERSIONS}"):
            if not key.startswith(prefix):
                continue
            num, _, tail = key[len(prefix):].partition("/")
            if not num.isdigit() or not tail:
                continue
            claimed.add(int(num))
            if tail == COMMITTED:
                committed.add(int(num))
        return claimed, committed

    def names(self) -> list[str]:
        """Names with at least one committed version."""
        pattern = re.compile(rf"^(.+)/{re.escape(VERSIONS)}/(\d+)/{re.escape(COMMITTED)}$")
        found = set()
        for key in self.store.list_files(""):
            m = pattern.match(key)
            if m and VERSIONS not in m.group(1).split("/") and ALIASES not in m.group(1).split("/"):
                found.add(m.group(1))
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        """Committed versions of ``name``, ascending (empty for an unknown name)."""
        validate_name(name)
        return sorted(self._version_keys(name)[1])

    def _require_versions(self, name: str) -> list[int]:
        versions = self.versions(name)
        if not versions:
            known = self.names()
            hint = f"; names: {', '.join(known[:20])}" if known else " (the registry is empty)"
            raise SoapError(f"registry {self.root}: no name {name!r}{hint}")
        return versions

    def aliases(self, name: str) -> dict[str, int]:
        """``latest`` plus every promoted alias of ``name``."""
        versions = self._require_versions(name)
        out = {LATEST: versions[-1]}
        for key in self.store.list_files(f"{name}/{ALIASES}"):
            alias = key.rsplit("/", 1)[-1]
            if not alias.endswith(".json") or key != self._akey(name, alias[:-5]):
                continue
            try:
                doc = self._read_json(key)
            except FileNotFoundError:
                continue
            if isinstance(doc.get("version"), int):
                out[alias[:-5]] = doc["version"]
        return out

    # -- resolving ---------------------------------------------------------------------------
    def resolve(self, ref: str | Ref) -> tuple[str, int]:
        """``(name, version)`` of a committed version; a SoapError naming the ref otherwise."""
        r = parse_ref(ref)
        versions = self._require_versions(r.name)
        if r.version is not None:
            if r.version not in versions:
                raise SoapError(
                    f"registry {self.root}: {r.name}:{r.version} does not exist; "
                    f"versions of {r.name}: {_ranges(versions)}"
                )
            return r.name, r.version
        alias = r.alias or LATEST
        if alias == LATEST:
            return r.name, versions[-1]
        try:
            doc = self._read_json(self._akey(r.name, alias))
        except FileNotFoundError:
            known = ", ".join(sorted(self.aliases(r.name)))
            raise SoapError(f"registry {self.root}: {r.name} has no alias {alias!r} (aliases: {known})") from None
        version = doc.get("version")
        if version not in versions:
            raise SoapError(f"registry {self.root}: alias {r.name}@{alias} points at missing version {version!r}")
        return r.name, version

    def _commit(self, name: str, version: int) -> dict:
        try:
            return self._read_json(self._vkey(name, version, COMMITTED))
        except FileNotFoundError:
            raise SoapError(f"registry {self.root}: {name}:{version} does not exist") from None

    def _record_doc(self, name: str, version: int) -> dict:
        try:
            return self._read_json(self._vkey(name, version, RECORD))
        except FileNotFoundError:
            raise SoapError(f"registry {self.root}: {name}:{version} has no {RECORD}") from None

    def content_hash(self, ref: str | Ref) -> str:
        name, version = self.resolve(ref)
        return self._commit(name, version)["content_hash"]

    def record(self, ref: str | Ref) -> dict:
        """Everything known about one version: manifest, lineage, aliases, evaluations."""
        name, version = self.resolve(ref)
        commit = self._commit(name, version)
        doc = self._record_doc(name, version)
        aliases = sorted(a for a, v in self.aliases(name).items() if v == version)
        evaluations = dict((doc.get("manifest") or {}).get("evaluation") or {})
        evaluations.update(self._evaluations(name, version))
        return {
            **doc,
            "name": name,
            "version": version,
            "ref": f"{name}:{version}",
            "registry": self.root,
            "aliases": aliases,
            "content_hash": commit["content_hash"],
            "committed": commit.get("committed"),
            "files": commit.get("files", {}),
            "evaluations": evaluations,
        }

    def _evaluations(self, name: str, version: int) -> dict:
        out = {}
        prefix = self._vkey(name, version, EVALUATIONS)
        for key in self.store.list_files(prefix):
            fn = key.rsplit("/", 1)[-1]
            if fn.endswith(".json") and key == f"{prefix}/{fn}":
                try:
                    out[fn[:-5]] = self._read_json(key).get("value")
                except FileNotFoundError:
                    continue
        return out

    # -- publishing --------------------------------------------------------------------------
    def publish(self, artifact_dir: str | os.PathLike, name: str | None = None, lineage: dict | None = None) -> PublishResult:
        """Add an artifact directory as the next version of ``name`` (default ``<backbone>/<layer>``).

        Content already published under ``name`` (same content hash) is not duplicated: the
        existing version comes back with ``created=False``."""
        artifact_dir = Path(artifact_dir)
        if not artifact_dir.is_dir():
            raise SoapError(f"artifact directory {artifact_dir} does not exist")
        artifact = read_artifact(artifact_dir)  # verifies the content hash and the tensor names
        manifest = artifact.manifest
        del artifact
        name = validate_name(name) if name is not None else default_name(manifest)
        if lineage is not None and not isinstance(lineage, dict):
            raise SoapError(f"lineage must be a dict, got {type(lineage).__name__}")
        content_hash = manifest["content_hash"]

        existing = self._find_content(name, content_hash)
        if existing is not None:
            return PublishResult(name, existing, False, content_hash)

        artifact_files: dict[str, Any] = _artifact_files(artifact_dir)
        hashes = {rel: sha256_file(src) for rel, src in artifact_files.items() if rel != MANIFEST_FILE}
        if hashes.get(TENSORS_FILE) != content_hash:
            raise SoapError(f"artifact {artifact_dir}: {TENSORS_FILE} changed while publishing it")

        token = uuid.uuid4().hex
        version = self._claim(name, token)
        # the registry's copy of the manifest names itself; the tensors (and their hash) are untouched
        artifact_files[MANIFEST_FILE] = _dumps({**manifest, "name": name, "version": version})
        hashes[MANIFEST_FILE] = _sha256(artifact_files[MANIFEST_FILE])

        self.store.put_tree(self._vkey(name, version, ARTIFACT), artifact_files)

        committed_before = [v for v in self.versions(name) if v < version]
        stores = manifest.get("stores") or {}
        record = {
            "schema": REGISTRY_SCHEMA,
            "name": name,
            "version": version,
            "content_hash": content_hash,
            "published": _now(),
            "publisher": _publisher(),
            "supersedes": committed_before[-1] if committed_before else None,
            "source": str(artifact_dir.resolve()),
            "lineage": {
                **(lineage or {}),
                "stores": {
                    role: {k: (stores.get(role) or {}).get(k) for k in ("uri", "fingerprint", "count", "source")}
                    for role in ("real", "synthetic")
                },
                "backbone": manifest.get("backbone"),
                "weights": manifest.get("weights"),
                "final_norm": final_norm_of(manifest),
            },
            "inputs": {**{k: manifest.get(k) for k in INPUT_KEYS}, "final_norm": final_norm_of(manifest)},
            "parameters": {k: manifest.get(k) for k in PARAM_KEYS},
            "manifest": {**manifest, "name": name, "version": version},
        }
        self.store.write_bytes(self._vkey(name, version, RECORD), _dumps(record))

        # a concurrent publisher of the same content may have committed first: defer to it
        existing = self._find_content(name, content_hash)
        if existing is not None:
            self.store.remove_tree(self._vkey(name, version, ARTIFACT))
            return PublishResult(name, existing, False, content_hash)

        commit = {
            "schema": REGISTRY_SCHEMA,
            "name": name,
            "version": version,
            "content_hash": content_hash,
            "files": hashes,
            "committed": _now(),
            "token": token,
        }
        if not self.store.create_bytes(self._vkey(name, version, COMMITTED), _dumps(commit)):
            raise SoapError(f"registry {self.root}: {name}:{version} was committed by someone else (claim lost)")
        return PublishResult(name, version, True, content_hash)

    def _find_content(self, name: str, content_hash: str) -> int | None:
        for v in self.versions(name):
            try:
                if self._commit(name, v).get("content_hash") == content_hash:
                    return v
            except SoapError:
                continue
        return None

    def _claim(self, name: str, token: str) -> int:
        claim = _dumps({"token": token, "claimed": _now(), **_publisher()})
        claimed, _ = self._version_keys(name)
        version = max(claimed, default=0) + 1
        for attempt in range(1, 10_000):
            if self.store.create_bytes(self._vkey(name, version, CLAIM), claim):
                return version
            version += 1
            if attempt % 8 == 0:  # many publishers at once: skip ahead to the newest claim
                claimed, _ = self._version_keys(name)
                version = max(version, max(claimed, default=0) + 1)
        raise SoapError(f"registry {self.root}: could not claim a version number for {name}")

    # -- aliases -----------------------------------------------------------------------------
    def promote(self, name: str, version: int | None, alias: str) -> int:
        """Point ``alias`` (``production`` or any user alias) at a committed version.

        ``version=None`` takes ``name`` as a ref (``name@latest``, ``name:3``). Returns the
        version the alias pointed at before (or None)."""
        validate_alias(alias)
        if alias == LATEST:
            raise SoapError(f"alias {LATEST!r} moves by itself on every publish; promote another alias")
        if version is None:
            name, version = self.resolve(name)
        else:
            if isinstance(version, bool) or not isinstance(version, int):
                raise SoapError(f"version must be an integer, got {version!r}")
            name, version = self.resolve(Ref(validate_name(name), version=version))
        key = self._akey(name, alias)
        try:
            old = self._read_json(key)
        except FileNotFoundError:
            old = {}
        history = list(old.get("history") or [])[-49:]
        now = _now()
        history.append({"version": version, "at": now, "by": _publisher().get("user")})
        self.store.write_bytes(
            key,
            _dumps({"alias": alias, "name": name, "version": version, "updated": now,
                    "previous": old.get("version"), "history": history}),
        )
        return old.get("version")

    # -- reading artifacts -------------------------------------------------------------------
    def pull(self, ref: str | Ref, to_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Copy one version's artifact directory to ``to_dir``, verifying every file's sha256."""
        name, version = self.resolve(ref)
        commit = self._commit(name, version)
        to_dir = Path(to_dir)
        if to_dir.exists() and (not to_dir.is_dir() or any(to_dir.iterdir())) and not overwrite:
            raise SoapError(f"pull {name}:{version}: {to_dir} exists and is not empty; pass --overwrite or choose another --to")
        to_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to_dir.name}.pull-", dir=to_dir.parent))
        try:
            self._download_verified(name, version, commit, tmp)
            if to_dir.exists():
                trash = to_dir.parent / f".{to_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(to_dir, trash)
                os.rename(tmp, to_dir)
                if trash.is_dir():
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    trash.unlink()
            else:
                os.rename(tmp, to_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return to_dir

    def _download_verified(self, name: str, version: int, commit: dict, dest: Path) -> None:
        files = commit.get("files") or {}
        if TENSORS_FILE not in files or MANIFEST_FILE not in files:
            raise SoapError(f"registry {self.root}: {name}:{version} commit lists no {TENSORS_FILE}/{MANIFEST_FILE}")
        for rel, expected in sorted(files.items()):
            if rel.startswith("/") or ".." in rel.split("/"):
                raise SoapError(f"registry {self.root}: {name}:{version} lists an unsafe file path {rel!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.store.get_file(self._vkey(name, version, ARTIFACT, rel), target)
            except FileNotFoundError:
                raise SoapError(f"registry {self.root}: {name}:{version} is missing its file {rel}") from None
            actual = sha256_file(target)
            if actual != expected:
                raise SoapError(
                    f"registry {self.root}: {name}:{version} file {rel} has sha256 {actual[:16]}… but was "
                    f"published with {expected[:16]}…; the registry copy is corrupt or was modified — refusing it"
                )
        manifest = verify_artifact(dest)
        if manifest.get("content_hash") != commit.get("content_hash"):
            raise SoapError(f"registry {self.root}: {name}:{version} manifest content hash differs from its commit record")

    def verify(self, ref: str | Ref) -> dict:
        """Download (to a temp dir) and verify one version; return its manifest."""
        name, version = self.resolve(ref)
        commit = self._commit(name, version)
        with tempfile.TemporaryDirectory(prefix="soap-verify-") as tmp:
            self._download_verified(name, version, commit, Path(tmp))
            return verify_artifact(tmp)

    # -- evaluations -------------------------------------------------------------------------
    def record_evaluation(self, ref: str | Ref, results: dict) -> None:
        """Merge evaluation results into a version's record (never into the immutable artifact).

        Each top-level key is its own document, replaced atomically: concurrent writers of
        different keys never lose each other's results; for one key the last write wins."""
        name, version = self.resolve(ref)
        if not isinstance(results, dict) or not results:
            raise SoapError(f"evaluation results for {name}:{version} must be a non-empty dict")
        docs = {}
        for key, value in results.items():
            if not isinstance(key, str) or not _EVAL_KEY.fullmatch(key):
                raise SoapError(f"evaluation key {key!r} for {name}:{version}: use [A-Za-z0-9._-], starting alphanumeric")
            try:
                docs[key] = _dumps_strict({"key": key, "value": value, "recorded": _now()})
            except (TypeError, ValueError) as exc:
                raise SoapError(f"evaluation {key!r} for {name}:{version} is not JSON-serialisable: {exc}") from None
        for key, data in docs.items():
            self.store.write_bytes(self._vkey(name, version, EVALUATIONS, f"{key}.json"), data)

    # -- search ------------------------------------------------------------------------------
    def records(self, names: Iterable[str] | None = None) -> Iterable[dict]:
        for name in (self.names() if names is None else names):
            for v in self.versions(name):
                try:
                    doc = self._record_doc(name, v)
                except SoapError:
                    continue
                yield {**doc, "name": name, "version": v}

    def find(self, predicate: Callable[[dict], bool] | None = None, /, **filters: Any) -> list[tuple[str, int]]:
        """Versions whose record matches: ``predicate(record)`` and/or ``key=value`` filters on the
        manifest (dotted keys reach into it: ``stores.real.fingerprint=...``; ``name=`` too)."""
        out = []
        name_filter = filters.pop("name", None)
        names = [validate_name(name_filter)] if name_filter is not None else None
        for rec in self.records(names):
            manifest = rec.get("manifest") or {}
            if any(not same_value(dotted(manifest, k.replace("__", ".")), v) for k, v in filters.items()):
                continue
            if predicate is not None and not predicate(rec):
                continue
            out.append((rec["name"], rec["version"]))
        return out

    def find_by_inputs(
        self,
        weights: str,
        layer: int,
        data_fingerprint: str | None,
        params: dict | None = None,
        *,
        synth_fingerprint: str | None = None,
        backbone: str | None = None,
    ) -> list[tuple[str, int]]:
        """Versions fitted from these inputs: weights sha256 (or ``"random"``), layer, the real
        store's fingerprint, and the parameters given (``mu``, ``tau``, ``gamma``, ``threshold``,
        ``feature``, ``final_norm``, ``image_size``, ``suppress``; ``mu="auto"`` matches auto-μ fits;
        a manifest without ``final_norm`` was fitted before the final norm)."""
        params = dict(params or {})

        def match(rec: dict) -> bool:
            m = rec.get("manifest") or {}
            if m.get("weights") != weights or not same_value(m.get("layer"), layer):
                return False
            if backbone is not None and m.get("backbone") != backbone:
                return False
            if dotted(m, "stores.real.fingerprint") != data_fingerprint:
                return False
            if synth_fingerprint is not None and dotted(m, "stores.synthetic.fingerprint") != synth_fingerprint:
                return False
            for key, want in params.items():
                if want is None and key not in m:
                    continue
                if key == "mu" and want == "auto":
                    if m.get("mu_mode") != "auto":
                        return False
                    continue
                if key == "mu" and m.get("mu_mode") == "auto":
                    return False
                if key == "feature" and want is None:
                    want = "out"
                if key == "final_norm":
                    if final_norm_of(m) != bool(want):
                        return False
                    continue
                if not same_value(m.get(key), want):
                    return False
            return True

        return self.find(match)

    # -- comparing ---------------------------------------------------------------------------
    def diff(self, ref_a: str | Ref, ref_b: str | Ref) -> dict:
        """How two versions differ: principal angles between the suppressed subspaces, SI score
        changes of matched components, projector distance and manifest parameter changes."""
        with tempfile.TemporaryDirectory(prefix="soap-diff-") as tmp:
            arts = []
            for i, ref in enumerate((ref_a, ref_b)):
                name, version = self.resolve(ref)
                path = Path(tmp) / str(i)
                path.mkdir()
                self._download_verified(name, version, self._commit(name, version), path)
                arts.append((f"{name}:{version}", read_artifact(path)))
        return diff_artifacts(arts[0], arts[1])


def _ranges(versions: list[int]) -> str:
    if not versions:
        return "none"
    out, start, prev = [], versions[0], versions[0]
    for v in versions[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
