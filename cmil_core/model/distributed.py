"""The Ray executor: ingest and feature extraction across the nodes of a Ray cluster.

The local executor (the default, no Ray needed) runs everything on this
machine. ``--executor ray`` hands the heavy, store-free work to a Ray
cluster and keeps the rest on the *driver* (the process that runs the
command):

* **ingest**: each slide is one Ray task (:func:`scan_slides`): hash the file,
  open it, find the smear, lay the grid and measure every patch
  (:func:`cmil_core.ingest.pipeline.scan_slide`). The driver takes the results in
  the slides' order and makes the same decisions as the local executor
  (duplicates, unknown patients, already tiled), writing each slide in its
  own transaction. A slide that fails is marked ``failed`` with its reason;
  the others go on.
* **feature extraction** (``train`` and ``score``): work units are patch
  ranges of a slide (:data:`UNIT_PATCHES` patches; a small slide is one
  unit). Reading and decoding run as CPU tasks that return uint8 batches
  ``[64, px, px, 3]`` (a quarter of float32's bytes on the wire); encoding
  runs in a pool of actors, one per GPU (``num_gpus=1``, normalised on the
  GPU) or one per :func:`actor_cpus` cores, each holding the encoder's
  network; a last task per slide writes its feature file atomically under
  the encoder key (:func:`cmil_core.model.features.write_feature_file`). The set
  of feature files stays the resumable queue: a slide whose file exists is
  not sent, so a killed run resumes where it stopped.

The store stays single-writer: workers never open DuckDB. Actors restart
(``max_restarts``) and re-run their lost calls (``max_task_retries``) when a
worker process dies; read tasks are retried by Ray on a lost worker. Results
are bit-identical to the local executor's (same batches, same arithmetic),
up to the ``created_at`` time in a feature file's metadata.

Paths: the store records the driver's slide paths. Every node must read the
same files (a shared filesystem) and the features folder (beside the store).
Where a node mounts them elsewhere, set ``CMIL_PATH_MAP`` on that node before
``ray start`` (``DRIVER_PREFIX=NODE_PREFIX``, several separated by ``;``):
workers rewrite paths by it (:func:`map_path`).

Ray is imported only here, only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.errors import InputError

__all__ = [
    "ACTOR_CPUS_ENV",
    "EXECUTORS",
    "PATH_MAP_ENV",
    "RAY_ADDRESS_ENV",
    "UNIT_PATCHES",
    "actor_cpus",
    "check_executor",
    "extract_features",
    "map_path",
    "parse_path_map",
    "ray_address",
    "ray_session",
    "scan_slides",
]

EXECUTORS: tuple[str, ...] = ("local", "ray")
RAY_ADDRESS_ENV = "CMIL_RAY_ADDRESS"
PATH_MAP_ENV = "CMIL_PATH_MAP"
ACTOR_CPUS_ENV = "CMIL_RAY_ACTOR_CPUS"
#: Patches per work unit of a slide's extraction (a multiple of the batch size).
UNIT_PATCHES = 1024
#: Name prefix of the encoder actors (tests kill one by it).
ACTOR_PREFIX = "cmil-encoder"
_RETRIES = 3
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_INSTALL = ("--executor ray needs Ray: pip install -r requirements-cluster.txt "
            "(or pip install '.[cluster]')")


def check_executor(executor: str) -> str:
    """``executor`` when it is ``local`` or ``ray``, else an InputError."""
    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    return executor


def ray_address(address: str | None = None) -> str | None:
    """The cluster to use: ``address``, else ``$CMIL_RAY_ADDRESS``, else None (a local one)."""
    if address:
        return address
    return os.environ.get(RAY_ADDRESS_ENV, "").strip() or None


def parse_path_map(text: str | None) -> list[tuple[str, str]]:
    """``"A=B;C=D"`` -> ``[("A", "B"), ("C", "D")]``, longest prefix first."""
    pairs = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        src, sep, dst = part.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise InputError(f"{PATH_MAP_ENV}: {part!r} is not DRIVER_PREFIX=NODE_PREFIX")
        pairs.append((src.strip(), dst.strip()))
    return sorted(pairs, key=lambda p: -len(p[0]))


def map_path(path: str | os.PathLike[str], mapping: str | None = None) -> str:
    """``path`` as this node reads it: the first matching prefix of ``$CMIL_PATH_MAP`` rewritten.

    ``mapping`` overrides the variable. A prefix matches whole path
    components (``/data`` maps ``/data/x``, not ``/database``).
    """
    text = str(path)
    pairs = parse_path_map(os.environ.get(PATH_MAP_ENV) if mapping is None else mapping)
    for src, dst in pairs:
        stem = src.rstrip("/")
        if text == stem or text.startswith(stem + "/"):
            return dst.rstrip("/") + text[len(stem):]
    return text


def actor_cpus() -> int:
    """CPU cores per CPU encoder actor: ``$CMIL_RAY_ACTOR_CPUS``, default 1."""
    env = os.environ.get(ACTOR_CPUS_ENV, "").strip()
    if not env:
        return 1
    try:
        value = int(env)
    except ValueError:
        raise InputError(f"{ACTOR_CPUS_ENV}={env!r} is not a whole number") from None
    if value < 1:
        raise InputError(f"{ACTOR_CPUS_ENV}={env!r} must be at least 1")
    return value


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected: to the session already open in this process, else to
    ``address`` (:func:`ray_address`), else to a new local cluster; closed again at the end
    when it was opened here."""
    where = ray_address(address)
    if where and "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    ):  # as Ray does itself when it finds a local cluster: join with the token there is
        # (set before Ray is imported, which reads it once)
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise InputError(_INSTALL) from None
    if ray.is_initialized():
        yield ray
        return
    # This package travels with the job (Ray's py_modules: zipped once into the cluster's
    # store), so that nodes need only its dependencies installed, not this code.
    package = str(Path(__file__).resolve().parent)
    try:
        ray.init(address=where, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True,
                 runtime_env={"py_modules": [package]})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--ray-address {where}: cannot join the Ray cluster ({first})") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _cause(exc: BaseException) -> str:
    """The message of the error a Ray task raised (its cause), one line, without colours."""
    cause = getattr(exc, "cause", None)
    inner = cause if isinstance(cause, BaseException) else exc
    text = _ANSI.sub("", str(inner)).strip()
    if not isinstance(inner, InputError):
        text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    first = text.splitlines()[0] if text else type(inner).__name__
    return first if len(first) <= 300 else first[:300] + "…"


def _failures_text(failures: list[tuple[str, str]]) -> str:
    """``name: reason; ...``; slides failing for one same reason (a lost cluster) named once."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in failures:
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        if len(names) == 1:
            parts.append(reason if reason.startswith(names[0]) else f"{names[0]}: {reason}")
        else:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                            else "")
            parts.append(f"{shown}: {reason}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- ingest


def _scan_remote(source: Any, mpp_override: float | None, config: Any, thresholds: Any,
                 tiled: dict[str, tuple[Any, Any, Any]], patients: set[str]) -> Any:
    """A worker: one slide's share of ingest (runs where Ray puts it)."""
    from cmil_core.ingest.pipeline import scan_slide
    from cmil_core.model.encoders import set_threads

    set_threads(1)
    return scan_slide(source, mpp_override, config, thresholds, tiled=tiled, patients=patients,
                      workers=1, path=map_path(source.path))


def scan_slides(
    sources: Sequence[Any],
    *,
    mpp_override: float | None,
    config: Any,
    thresholds: Any,
    tiled: dict[str, tuple[Any, Any, Any]],
    patients: set[str],
    address: str | None = None,
    window: int | None = None,
) -> Iterator[Any]:
    """:class:`~cmil_core.ingest.pipeline.SlideScan` of each of ``sources``, in their order, scanned
    by Ray tasks (at most ``window`` in flight; default twice the cluster's CPUs).

    A slide whose worker is lost for good (after Ray's retries) comes back
    with ``read_error`` set, so that it fails alone.
    """
    from cmil_core.ingest.pipeline import SlideScan

    with ray_session(address) as ray:
        task = ray.remote(num_cpus=1, max_retries=_RETRIES)(_scan_remote)
        cap = window or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        tiled_ref, patients_ref = ray.put(tiled), ray.put(patients)
        refs: dict[int, Any] = {}
        nxt = 0

        def submit_up_to(limit: int) -> None:
            nonlocal nxt
            while nxt < len(sources) and nxt < limit:
                refs[nxt] = task.remote(sources[nxt], mpp_override, config, thresholds,
                                        tiled_ref, patients_ref)
                nxt += 1

        try:
            submit_up_to(cap)
            for i, source in enumerate(sources):
                ref = refs.pop(i)
                try:
                    scan = ray.get(ref)
                except ray.exceptions.RayError as exc:  # a worker lost for good, or a bug
                    scan = SlideScan(read_error=f"{source.path.name}: {_cause(exc)}")
                submit_up_to(i + 1 + cap)
                yield scan
        finally:
            for ref in refs.values():
                with contextlib.suppress(Exception):
                    ray.cancel(ref)


# --------------------------------------------------------------------------- extraction


class _EncoderActor:
    """An encoder on one device (a GPU, or its share of a node's CPU cores).

    The network comes with each call, as a reference inside a list (nothing
    is copied but its id), and is fetched on the first call: a restarted
    actor fetches it again from the driver's copy, which lives as long as the
    run.
    """

    def __init__(self, spec: dict[str, Any], batch_size: int, threads: int, gpu: bool) -> None:
        from cmil_core.model.encoders import set_threads

        set_threads(threads)
        self.spec, self.batch_size, self.gpu = spec, batch_size, gpu
        self.encoder: Any = None

    def _encoder(self, holder: list[Any]) -> Any:
        if self.encoder is None:
            import ray

            from cmil_core.model.encoders import Encoder, EncoderSpec, encoder_from_spec

            module = ray.get(holder[0])
            if module is None:  # not picklable (TorchScript): rebuilt from its file
                encoder = encoder_from_spec(self.spec, batch_size=self.batch_size)
            else:
                encoder = Encoder(module, EncoderSpec.from_dict(self.spec),
                                  batch_size=self.batch_size)
            self.encoder = encoder.to("cuda") if self.gpu else encoder
        return self.encoder

    def embed(self, batch: npt.NDArray[np.uint8], slide_name: str,
              holder: list[Any]) -> npt.NDArray[np.float16]:
        """float16 embeddings of uint8 patches (normalised on the device)."""
        from cmil_core.model.features import as_float16

        encoder = self._encoder(holder)
        if not batch.flags.writeable:  # a read-only view of the object store
            batch = batch.copy()
        return as_float16(encoder.embed(batch), slide_name, encoder.spec.key)

    def pid(self) -> int:
        return os.getpid()


def _read_remote(path: str, mpp: float | None, coords: npt.NDArray[np.int64], output_px: int,
                 batch_size: int) -> Any:
    """A worker: uint8 batches of a slide's patches at ``coords`` (one Ray return each)."""
    from cmil_core.ingest.patch_reading import read_patch
    from cmil_core.ingest.slides import open_slide

    out = []
    with open_slide(map_path(path), mpp=mpp) as slide:
        for start in range(0, coords.shape[0], batch_size):
            part = coords[start:start + batch_size]
            batch = np.empty((part.shape[0], output_px, output_px, 3), dtype=np.uint8)
            for j, (x, y, size) in enumerate(part.tolist()):
                batch[j] = read_patch(slide, x, y, size, output_px)
            out.append(batch)
    return out[0] if len(out) == 1 else tuple(out)


def _write_remote(path: str, spec: dict[str, Any], sha: str, slide_name: str,
                  mpp: float | None, tiling_key: str, ids: npt.NDArray[np.int64],
                  coords: npt.NDArray[np.int64], *parts: npt.NDArray[np.float16]) -> str:
    """A worker: one slide's feature file from its embedded batches, written atomically."""
    from cmil_core.model.encoders import EncoderSpec
    from cmil_core.model.features import write_feature_file

    enc = EncoderSpec.from_dict(spec)
    features = (np.concatenate(parts) if parts
                else np.empty((0, enc.embed_dim), dtype=np.float16))
    write_feature_file(map_path(path), features, ids, coords, enc, slide_sha256=sha,
                       slide_name=slide_name, mpp=mpp, tiling_key=tiling_key)
    return slide_name


@dataclass
class _Slide:
    task: Any  # features.SlideTask
    path: Path  # its feature file (driver's path)
    sha: str
    ids: npt.NDArray[np.int64]
    coords: npt.NDArray[np.int64]
    parts: list[Any]
    units_left: int


def _shippable(module: Any) -> Any:
    """The network itself when it pickles (sent once through the object store), else None."""
    import pickle

    try:
        pickle.dumps(module)
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError):
        # TorchScript and other foreign graphs: rebuilt from the spec's file
        return None
    return module


def extract_features(
    tasks: Sequence[Any],
    encoder: Any,
    root: str | os.PathLike[str],
    *,
    address: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    batch_size: int = 64,
    unit_patches: int = UNIT_PATCHES,
) -> int:
    """Write the missing feature files of ``tasks`` (:class:`~cmil_core.model.features.SlideTask`)
    on a Ray cluster; returns the number of slides written.

    Same files as :func:`cmil_core.model.features.slide_features` would write. A
    slide whose file exists is skipped. A slide that fails does not stop the
    others; once all are done, an :class:`InputError` lists the failed slides
    and their reasons (the others' files are written: rerun to resume).
    ``progress(done, total, slide name)`` after each file.
    """
    from cmil_core.ingest.slides import file_sha256
    from cmil_core.model.features import feature_path

    spec = encoder.spec
    unit_patches = max(batch_size, unit_patches // batch_size * batch_size)
    slides: list[_Slide] = []
    for t in tasks:
        sha = t.sha256 or file_sha256(t.path)
        path = feature_path(root, spec.key, sha, t.tiling_key)
        if path.exists():
            continue
        table = t.patches
        ids = table["patch_id"].to_numpy().astype(np.int64)
        coords = (table[["x", "y", "size"]].to_numpy().astype(np.int64).reshape(-1, 3))
        units = max(1, -(-ids.size // unit_patches))
        slides.append(_Slide(t, path, sha, ids, coords, [], units))
    if not slides:
        return 0
    with ray_session(address) as ray:
        return _run_extraction(ray, slides, encoder, batch_size, unit_patches, progress)


def _run_extraction(ray: Any, slides: list[_Slide], encoder: Any, batch_size: int,
                    unit_patches: int, progress: Callable[[int, int, str], None] | None) -> int:
    spec = encoder.spec
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    per = actor_cpus()
    if gpus:
        n_actors, options = gpus, {"num_gpus": 1, "num_cpus": 1}
    else:  # leave cores for the read tasks: an actor per `per` cores, one core reads beside
        n_actors = max(1, min(cpus // (per + 1), len(slides) * 4))
        options = {"num_cpus": per}
    actor_cls = ray.remote(max_restarts=_RETRIES, max_task_retries=_RETRIES)(_EncoderActor)
    module_ref = ray.put(_shippable(encoder.module))
    holder = [module_ref]
    token = uuid.uuid4().hex[:8]
    actors = [
        actor_cls.options(name=f"{ACTOR_PREFIX}-{token}-{k}", scheduling_strategy="SPREAD",
                          **options).remote(spec.to_dict(), encoder.batch_size, per,
                                            bool(gpus))
        for k in range(n_actors)
    ]
    read = ray.remote(num_cpus=1, max_retries=_RETRIES)(_read_remote)
    write = ray.remote(num_cpus=1, max_retries=_RETRIES)(_write_remote)
    spec_dict = spec.to_dict()
    unit_batches = unit_patches // batch_size
    cap = max(2 * unit_batches, 4 * n_actors * min(unit_batches, 8))
    units = deque((s, start) for s in slides for start in range(0, max(1, s.ids.size),
                                                                   unit_patches))
    pending: set[Any] = set()
    writes: dict[Any, _Slide] = {}
    failures: list[tuple[str, str]] = []
    done = written = 0
    turn = 0
    try:
        while units or pending or writes:
            while units and len(pending) < cap:
                s, start = units.popleft()
                coords = s.coords[start:start + unit_patches]
                k = -(-coords.shape[0] // batch_size)
                if k:
                    out = read.options(num_returns=k).remote(
                        str(s.task.path), s.task.mpp, coords, spec.input_px, batch_size)
                    refs = [out] if k == 1 else list(out)
                    for ref in refs:
                        emb = actors[turn % n_actors].embed.remote(
                            ref, Path(s.task.path).name, holder)
                        turn += 1
                        s.parts.append(emb)
                        pending.add(emb)
                s.units_left -= 1
                if s.units_left == 0:
                    ref = write.remote(str(s.path), spec_dict, s.sha, Path(s.task.path).name,
                                       s.task.mpp, s.task.tiling_key, s.ids, s.coords,
                                       *s.parts)
                    writes[ref] = s
                    s.parts = []
            ready, _ = ray.wait([*pending, *writes], num_returns=1, fetch_local=False)
            for ref in ready:
                if ref in pending:
                    pending.discard(ref)
                    continue
                s = writes.pop(ref)
                name = Path(s.task.path).name
                try:
                    ray.get(ref)
                    written += 1
                except ray.exceptions.RayError as exc:  # this slide fails alone
                    failures.append((name, _cause(exc)))
                done += 1
                if progress is not None:
                    progress(done, len(slides), name)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
    if failures:
        raise InputError(
            f"{len(failures)} of {len(slides)} slides failed (the others' features are "
            f"written; rerun to resume): {_failures_text(failures)}")
    return written
