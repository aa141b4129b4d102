"""MLflow tracking: one run per stage, metrics/images/figures, every checkpoint logged as a pyfunc model.

* :class:`MlflowTracker` and :class:`NullTracker` implement the same :class:`Tracker` protocol; library code
  logs unconditionally and :func:`make_tracker` hands non-zero ranks (or disabled tracking) the null twin.
* Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project>/mlflow/mlflow.db``. Experiments are
  created with their artifacts next to a SQLite database (``<db dir>/artifacts/<experiment>``, i.e.
  ``<project>/mlflow/artifacts`` by default); a server URI keeps the server's artifact store.
* :meth:`MlflowTracker.log_checkpoint` logs a checkpoint directory (the safetensors files of
  :mod:`unirl.train.checkpoint`) as an MLflow 3 *LoggedModel* of the pyfunc flavour: the directory is the
  model's artifact ``checkpoint``; the Python class :class:`UnifiedCheckpointModel` is logged "from code" (a
  three-line script that imports it), so nothing is pickled; ``pip_requirements`` are given explicitly so
  MLflow does not spawn its requirement-inference subprocess. The model carries the step, the run's params,
  the data version (``dvc.lock`` hash), the git commit and the seed as tags/params, and the import path of the
  function that turns the directory into a model (``loader``), read back by ``load_context``.
* :func:`log_pyfunc_checkpoint` is that logging step on its own (any active run, an optional signature): the
  serving flavour (:mod:`unirl.serving`) and registry promotion (:mod:`unirl.promotion`) log through it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlflow.pyfunc  # binds ``mlflow`` too
import yaml

from unirl.config import PROJECT_ROOT

__all__ = [
    "DEFAULT_LOADER",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "UnifiedCheckpointModel",
    "data_version",
    "flatten_params",
    "git_commit",
    "import_string",
    "log_pyfunc_checkpoint",
    "make_tracker",
    "tracking_uri",
]

DEFAULT_LOADER = "unirl.train.checkpoint:load_checkpoint"
_MODEL_CODE = (
    '"""MLflow models-from-code entry point: the pyfunc class lives in unirl.tracking."""\n'
    "import mlflow\n"
    "from unirl.tracking import UnifiedCheckpointModel\n\n"
    "mlflow.models.set_model(UnifiedCheckpointModel())\n"
)


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<project>/mlflow/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow' / 'mlflow.db'}"


def default_artifact_root(uri: str) -> Path | None:
    """``<db dir>/artifacts`` for a SQLite store; ``None`` (the server decides) otherwise."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent / "artifacts"
    return None


def git_commit(repo: str | os.PathLike = PROJECT_ROOT) -> str | None:
    """The checked-out commit of ``repo`` (``None`` outside a git checkout or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def data_version(dvc_lock_path: str | os.PathLike, stage_or_out_path: str) -> str | None:
    """The md5 that ``dvc.lock`` records for an output/dependency path (e.g. ``data/shards``) or a stage.

    A path is looked up among every stage's ``outs`` first, then ``deps``; a stage name gives the md5 of its
    single output (several outputs: ``path:md5`` pairs joined by ``,``). ``None`` when the lock file or the
    entry does not exist (e.g. before the first ``dvc repro``).
    """
    lock = Path(dvc_lock_path)
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    want = stage_or_out_path.rstrip("/")

    def md5(entry: dict) -> str | None:
        return entry.get("md5") or entry.get("hash_md5") or entry.get("etag")

    for section in ("outs", "deps"):
        for stage in stages.values():
            for entry in stage.get(section) or []:
                if str(entry.get("path", "")).rstrip("/") == want:
                    return md5(entry)
    if want in stages:
        outs = stages[want].get("outs") or []
        if len(outs) == 1:
            return md5(outs[0])
        return ",".join(f"{o['path']}:{md5(o)}" for o in outs) or None
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` strings, as MLflow params want them (values cut at 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = (json.dumps(v) if isinstance(v, list | tuple) else str(v))[:6000]
    return out


def import_string(path: str) -> Any:
    """``"package.module:attr"`` (or ``package.module.attr``) -> the object."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import {path!r} ({e}): is the package installed in this environment?") from e


class UnifiedCheckpointModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a checkpoint directory.

    ``load_context`` calls the function named by ``model_config["loader"]`` (``"module:function"``, default
    :data:`DEFAULT_LOADER`) on the logged directory; the model module provides a loader that returns a ready
    model. ``predict`` forwards to the loaded object's ``predict(model_input, params)``.
    """

    def load_context(self, context: Any) -> None:
        self.checkpoint_dir = Path(context.artifacts["checkpoint"])
        self.loader_path = (context.model_config or {}).get("loader", DEFAULT_LOADER)
        self.model = import_string(self.loader_path)(self.checkpoint_dir)

    # ``predict`` takes whatever the loaded model takes: opt out of MLflow's type-hint input validation (and of
    # its warnings about a predict without hints).
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params: dict[str, Any] | None = None):  # noqa: ANN001
        predict = getattr(self.model, "predict", None)
        if predict is None:
            raise NotImplementedError(
                f"the object returned by loader {self.loader_path!r} has no predict(model_input, params) method"
            )
        return predict(model_input, params)


@runtime_checkable
class Tracker(Protocol):
    """What training and evaluation code logs through (MLflow or nothing).

    The bodies here do nothing and return ``None``: they are :class:`NullTracker`'s, which subclasses this protocol.
    """

    def start(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def log_image(self, image: Any, name: str, step: int) -> None:
        return None

    def log_figure(self, figure: Any, name: str, step: int | None = None) -> None:
        return None

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        return None

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        return None

    def log_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        step: int,
        *,
        seed: int | None = None,
        data_version: str | None = None,
        params: Mapping[str, Any] | None = None,
        loader: str = DEFAULT_LOADER,
        name: str | None = None,
    ) -> str | None:
        return None

    def run_url(self) -> str | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        return None


class NullTracker(Tracker):
    """Does nothing, with :class:`MlflowTracker`'s methods (non-zero ranks, tracking off, tests).

    Every method is the protocol's no-op body: one signature per method, shared with :class:`Tracker`.
    """

    run_id: str | None = None


CHECKPOINT_REQUIREMENTS: tuple[str, ...] = ("mlflow", "torch", "safetensors", "numpy", "pyyaml")


def _pip_requirements(packages: tuple[str, ...] = CHECKPOINT_REQUIREMENTS) -> list[str]:
    """``package==installed version`` for each of ``packages`` (unpinned when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_pyfunc_checkpoint(
    ckpt_dir: str | os.PathLike,
    name: str,
    *,
    loader: str = DEFAULT_LOADER,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    step: int = 0,
    signature: Any | None = None,
    input_example: Any | None = None,
    requirements: tuple[str, ...] = CHECKPOINT_REQUIREMENTS,
) -> Any:
    """Log ``ckpt_dir`` into the ACTIVE run as a pyfunc LoggedModel of :class:`UnifiedCheckpointModel`.

    The directory becomes the model's artifact ``checkpoint``; the class is logged from code (nothing pickled);
    ``loader`` (``"module:function"``) turns the directory into the object whose ``predict`` serves requests;
    ``signature`` (an ``mlflow.models.ModelSignature``) declares the served columns and params. Returns MLflow's
    ``ModelInfo`` (``model_uri``, ``model_id``).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist: save the checkpoint first")
    if mlflow.active_run() is None:
        raise RuntimeError("log_pyfunc_checkpoint logs into the active MLflow run: start one first")
    tags = dict(tags or {})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "unified_checkpoint_model.py"
        code.write_text(_MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={"checkpoint": str(ckpt_dir)},
            model_config={"loader": loader},
            pip_requirements=_pip_requirements(requirements),
            metadata={"loader": loader, **tags},
            params=dict(params) if params else None,
            tags=tags,
            step=step,
            signature=signature,
            input_example=input_example,
        )


class MlflowTracker:
    """One MLflow run in experiment ``experiment`` of the store at ``uri`` (default :func:`tracking_uri`)."""

    def __init__(self, experiment: str, uri: str | None = None, artifact_location: str | os.PathLike | None = None):
        self.uri = uri or tracking_uri()
        self.experiment = experiment
        if artifact_location is not None:
            self.artifact_location: str | None = Path(artifact_location).resolve().as_uri()
        else:
            root = default_artifact_root(self.uri)
            self.artifact_location = (root / experiment).resolve().as_uri() if root is not None else None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}

    def _client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.uri)

    def start(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> None:
        """Create the experiment if needed and open a run tagged with the git commit; log ``params``."""
        mlflow.set_tracking_uri(self.uri)
        client = self._client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            self.experiment_id = client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        else:
            self.experiment_id = exp.experiment_id
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        commit = git_commit()
        if commit:
            self._tags.setdefault("git_commit", commit)
        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=self._tags)
        self.run_id = run.info.run_id
        self._params = flatten_params(params or {})
        if self._params:
            mlflow.log_params(self._params, run_id=self.run_id)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker.start(run_name, ...) must be called before logging")
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars (floats, ints, 0-d tensors) at ``step``; NaN/inf are kept as MLflow stores them."""
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self._require_run())

    def log_image(self, image: Any, name: str, step: int) -> None:
        """A PIL image (or HWC uint8 array) under ``name``, browsable per step in the run's Images view."""
        self._client().log_image(self._require_run(), image, key=name, step=step, synchronous=True)

    def log_figure(self, figure: Any, name: str, step: int | None = None) -> None:
        """A matplotlib figure as ``figures/<name>[_stepXXXXXX].png``."""
        suffix = f"_step{step:06d}" if step is not None else ""
        self._client().log_figure(self._require_run(), figure, f"figures/{name}{suffix}.png")

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """A dict as a JSON (``.json``) or YAML (``.yaml``) artifact."""
        self._client().log_dict(self._require_run(), dict(data), artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._client().log_artifact(self._require_run(), str(path), artifact_path)

    def log_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        step: int,
        *,
        seed: int | None = None,
        data_version: str | None = None,
        params: Mapping[str, Any] | None = None,
        loader: str = DEFAULT_LOADER,
        name: str | None = None,
    ) -> str | None:
        """Log ``ckpt_dir`` as a pyfunc model (artifact ``checkpoint``) at ``step``; return its ``models:/`` URI.

        ``params`` default to the run's params; ``loader`` is the ``"module:function"`` that turns the
        directory into a model when the pyfunc model is loaded.
        """
        run_id = self._require_run()
        commit = self._tags.get("git_commit") or git_commit()
        tags = {"step": str(step), "seed": str(seed), "data_version": str(data_version), "git_commit": str(commit)}
        model_params = flatten_params(params) if params is not None else dict(self._params)
        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:  # log_model logs into the active run
            mlflow.set_tracking_uri(self.uri)
            mlflow.start_run(run_id=run_id)
        info = log_pyfunc_checkpoint(ckpt_dir, name or f"checkpoint-{step:06d}", loader=loader, tags=tags,
                                     params=model_params or None, step=step)
        client = self._client()
        client.set_tag(run_id, "latest_checkpoint_step", str(step))
        client.set_tag(run_id, "latest_checkpoint_model", info.model_uri)
        return info.model_uri

    def run_url(self) -> str | None:
        """Link to the run in the MLflow UI (``$MLFLOW_UI_URL``, the server URI, or ``mlflow ui``'s default)."""
        if self.run_id is None:
            return None
        base = os.environ.get("MLFLOW_UI_URL") or (
            self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        )
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        if self.run_id is not None:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)
            else:
                self._client().set_terminated(self.run_id, status=status)


def make_tracker(
    experiment: str, enabled: bool = True, is_main: bool | None = None, uri: str | None = None
) -> MlflowTracker | NullTracker:
    """An :class:`MlflowTracker` on the main process when ``enabled``, else a :class:`NullTracker`."""
    if is_main is None:
        from unirl.train.distributed import dist_info

        is_main = dist_info().is_main
    return MlflowTracker(experiment, uri=uri) if enabled and is_main else NullTracker()
