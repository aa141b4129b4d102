"""Registry promotion: every evaluated checkpoint becomes a version of ONE registered model; the aliases decide.

Rule (:func:`decide`): the ``champion`` alias moves to a candidate only when each of its headline metrics is
above the champion's by at least ``min_improvement`` (absolute; always strictly above) AND none of the guarded
benchmark metrics (default: the results table's columns) falls more than ``tolerance`` (absolute) below the
champion's; otherwise the candidate gets ``challenger``. With no champion yet, the first candidate becomes champion.
Headline metrics of a candidate ``rl_<scenario>``: that scenario's headline from ``results.json``; of any other
candidate (``sft``): every headline metric.

:func:`run_promote` reads ``results.json`` (written by :mod:`unirl.eval.report`), takes the candidates in order
(``sft`` first, then the RL checkpoints), logs each checkpoint directory as the serving pyfunc model
(:mod:`unirl.serving`) in one MLflow run, registers it (the same weights, identified by the sha256 of
``model.safetensors``, are registered only once), sets the alias, and tags the version with ``decision``,
``reason``, ``metrics`` (JSON), ``headline``, ``data_version``, ``git_commit``, ``config`` (the model profile),
``eval_settings`` and the checkpoint's name, path and hash. The champion is compared on the CURRENT evaluation
when its weights are among the candidates, else on the metrics tagged when it was promoted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from unirl.config import option, to_dict

log = logging.getLogger(__name__)

__all__ = ["PromoteConfig", "candidate_order", "decide", "headline_for", "run_promote", "validate_results"]

CHAMPION, CHALLENGER = "champion", "challenger"
_EPS = 1e-12  # float slack so that a drop of exactly ``tolerance`` is allowed


@dataclasses.dataclass
class PromoteConfig:
    """Parameters of the ``promote`` stage (``params.yaml: promote``)."""

    results_path: str = option("data/eval/results.json", "The eval stage's results (metrics per checkpoint).")
    registered_model: str = option("unirl", "Name of the ONE registered model every checkpoint is a version of.")
    tolerance: float = option(0.05, "Largest allowed absolute drop of any other benchmark metric vs the champion.")
    min_improvement: float = option(0.02, "Smallest absolute gain of each headline metric over the champion's "
                                          "that moves the alias (0: any gain; tiny gains are evaluation noise).")
    guarded_metrics: list = option([], "Metrics that must not regress (empty: the results table's columns).")
    candidates: list = option([], "Checkpoint names in promotion order (empty: sft first, then the others).")
    experiment: str = option("promotion", "MLflow experiment of the run that logs the candidate models.")
    dvc_lock: str = option("dvc.lock", "dvc.lock whose hashes are recorded as the data/checkpoint versions.")
    data_path: str = option("data/shards", "The data whose dvc.lock hash is the data version.")
    decision_path: str = option("data/promotion/decision.json", "Where the decisions are written (JSON).")


def decide(
    candidate_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    headline_metrics: Iterable[str],
    tolerance: float,
    guarded: Iterable[str] | None = None,
    min_improvement: float = 0.0,
) -> tuple[bool, str]:
    """Whether a candidate takes the champion alias, and why (see the module docstring).

    ``guarded`` (default: every metric both have) are checked for regressions, headline metrics excluded.

    >>> decide({"a": 0.5}, None, ["a"], 0.05)
    (True, 'first candidate: no champion yet')
    >>> decide({"a": 0.6, "b": 0.50}, {"a": 0.5, "b": 0.52}, ["a"], 0.05)[0]
    True
    >>> decide({"a": 0.6, "b": 0.40}, {"a": 0.5, "b": 0.52}, ["a"], 0.05)
    (False, 'b regressed 0.5200 -> 0.4000 (-0.1200), beyond the tolerance 0.05')
    >>> decide({"a": 0.51}, {"a": 0.5}, ["a"], 0.05, min_improvement=0.02)
    (False, 'headline a did not beat the champion by 0.02: 0.5100 against 0.5000 (+0.0100)')
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if min_improvement < 0 or not math.isfinite(min_improvement):
        raise ValueError(f"min_improvement must be a finite number >= 0, got {min_improvement}")
    if champion_metrics is None:
        return True, "first candidate: no champion yet"
    headline = list(dict.fromkeys(headline_metrics))
    if not headline:
        raise ValueError("decide needs at least one headline metric to compare on")
    for m in headline:
        if m not in candidate_metrics or not math.isfinite(float(candidate_metrics[m])):
            return False, f"candidate has no (finite) value for headline metric {m}"
        if m not in champion_metrics:
            return False, f"champion has no value for headline metric {m}: re-evaluate it before comparing"
    gains = {m: float(candidate_metrics[m]) - float(champion_metrics[m]) for m in headline}
    not_better = [m for m, gain in gains.items() if not gain > 0]
    if not_better:
        return False, "; ".join(f"headline {m} did not beat the champion: {candidate_metrics[m]:.4f} <= "
                                f"{champion_metrics[m]:.4f}" for m in not_better)
    small = [m for m, gain in gains.items() if gain < min_improvement - _EPS]
    if small:
        return False, "; ".join(f"headline {m} did not beat the champion by {min_improvement:g}: "
                                f"{candidate_metrics[m]:.4f} against {champion_metrics[m]:.4f} ({gains[m]:+.4f})"
                                for m in small)
    names = sorted(set(candidate_metrics) & set(champion_metrics)) if guarded is None else list(guarded)
    regressions = []
    for m in names:
        if m in headline or m not in candidate_metrics or m not in champion_metrics:
            continue
        new, old = float(candidate_metrics[m]), float(champion_metrics[m])
        if not math.isfinite(new) or old - new > tolerance + _EPS:
            regressions.append(f"{m} regressed {old:.4f} -> {new:.4f} ({new - old:+.4f})")
    if regressions:
        return False, "; ".join(regressions) + f", beyond the tolerance {tolerance:g}"
    gains = ", ".join(f"{m} {champion_metrics[m]:.4f} -> {candidate_metrics[m]:.4f}" for m in headline)
    return True, f"headline improved ({gains}); no other benchmark regressed by more than {tolerance:g}"


def headline_for(name: str, headline: Mapping[str, str]) -> list[str]:
    """Headline metrics of checkpoint ``name``: its scenario's (``rl_<scenario>``), else all of them."""
    scenario = name[3:] if name.startswith("rl_") else None
    if scenario in headline:
        return [headline[scenario]]
    return list(dict.fromkeys(headline.values()))


def candidate_order(results: Mapping[str, Any], names: Iterable[str] = ()) -> list[str]:
    """``names`` if given, else the evaluated checkpoints with ``sft`` first, the others in results order."""
    names = list(names)
    evaluated = list(results["checkpoints"])
    if names:
        unknown = [n for n in names if n not in evaluated]
        if unknown:
            raise ValueError(f"promote.candidates {unknown} were not evaluated; results have {evaluated}")
        return names
    return [n for n in evaluated if n == "sft"] + [n for n in evaluated if n != "sft"]


def validate_results(results: Any) -> list[str]:
    """Problems that block promotion (empty when ``results`` is a usable ``results.json``)."""
    if not isinstance(results, Mapping):
        return [f"results must be a JSON object, got {type(results).__name__}"]
    problems = [f"results.json has no {k!r}" for k in ("checkpoints", "headline", "settings", "paths")
                if k not in results]
    if problems:
        return problems
    if not results["checkpoints"]:
        problems.append("results.json evaluated no checkpoint")
    for name, metrics in results["checkpoints"].items():
        for m in headline_for(name, results["headline"]):
            v = metrics.get(m)
            if not isinstance(v, int | float) or not math.isfinite(v):
                problems.append(f"checkpoint {name!r}: headline metric {m} is missing or not finite ({v!r})")
        if name not in results["paths"]:
            problems.append(f"checkpoint {name!r} has no path in results.json")
    return problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="unirl unified model (LM + DiT experts); aliases: "
                                                         "champion (promoted), challenger (evaluated, not promoted)")


def run_promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Register every evaluated checkpoint and move the aliases (see the module docstring); returns the decisions."""
    import mlflow

    from unirl.atomic import atomic_write_json
    from unirl.models.io import WEIGHTS_FILE, read_config
    from unirl.serving import log_serving_model
    from unirl.tracking import MlflowTracker, data_version, flatten_params, git_commit

    path = Path(cfg.results_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the eval stage first (unirl eval / dvc repro eval)")
    results = json.loads(path.read_text())
    problems = validate_results(results)
    if problems:
        raise ValueError(f"{path} cannot be promoted from: " + "; ".join(problems))
    order = candidate_order(results, cfg.candidates)
    guarded = list(cfg.guarded_metrics) or list(results.get("columns") or [])
    tracker = MlflowTracker(cfg.experiment)
    client = mlflow.MlflowClient(tracking_uri=tracker.uri)
    name = cfg.registered_model
    _ensure_registered_model(client, name)
    commit = git_commit()
    dv = data_version(cfg.dvc_lock, cfg.data_path.rstrip("/"))
    shas = {}
    for cand in order:
        weights = Path(results["paths"][cand]) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: checkpoint {cand!r} was evaluated but is gone")
        shas[cand] = _sha256(weights)
    current = {shas[c]: results["checkpoints"][c] for c in order}
    decisions: list[dict[str, Any]] = []
    tracker.start("promote", params=flatten_params({"promote": to_dict(cfg)}), tags={"stage": "promote"})
    try:
        for cand in order:
            ckpt = Path(results["paths"][cand])
            metrics = results["checkpoints"][cand]
            existing = [v for v in client.search_model_versions(f"name='{name}'")
                        if v.tags.get("checkpoint_sha256") == shas[cand]]
            if existing:
                version = existing[0]
            else:
                info = log_serving_model(ckpt, cand, tags={"checkpoint": cand, "git_commit": str(commit),
                                                           "data_version": str(dv)})
                version = mlflow.register_model(info.model_uri, name, tags={"checkpoint_sha256": shas[cand]})
            champion = _alias_version(client, name, CHAMPION)
            headline = headline_for(cand, results["headline"])
            if champion is not None and str(champion.version) == str(version.version):
                promote, reason, against = True, "already the champion (same weights)", None
            else:
                against = str(champion.version) if champion is not None else None
                champ_metrics = None
                if champion is not None:
                    sha = champion.tags.get("checkpoint_sha256")
                    champ_metrics = current.get(sha) or json.loads(champion.tags.get("metrics") or "{}")
                promote, reason = decide(metrics, champ_metrics, headline, cfg.tolerance, guarded, cfg.min_improvement)
            alias = CHAMPION if promote else CHALLENGER
            client.set_registered_model_alias(name, alias, version.version)
            settings = {b: s["sampling"].get(cand) for b, s in results["settings"].get("benchmarks", {}).items()}
            tags = {
                "decision": alias, "reason": reason, "metrics": json.dumps(metrics, sort_keys=True),
                "headline": json.dumps(headline), "compared_to_version": str(against or ""),
                "data_version": str(dv), "checkpoint_version": str(data_version(cfg.dvc_lock, str(ckpt))),
                "git_commit": str(commit), "config": json.dumps(read_config(ckpt)["model_config"], sort_keys=True),
                "eval_settings": json.dumps(settings, sort_keys=True), "checkpoint": cand,
                "checkpoint_path": str(ckpt), "checkpoint_sha256": shas[cand],
            }  # fmt: skip
            for key, value in tags.items():
                client.set_model_version_tag(name, version.version, key, value)
            if promote and against is not None:
                client.set_model_version_tag(name, against, "superseded_by", str(version.version))
            log.info("promote %s -> version %s: %s (%s)", cand, version.version, alias, reason)
            decisions.append({"checkpoint": cand, "version": str(version.version), "alias": alias,
                              "promoted": promote, "reason": reason, "headline": headline})
            tracker.log_metrics({f"promoted/{cand}": float(promote)}, step=0)
        champion = _alias_version(client, name, CHAMPION)
        out = {
            "registered_model": name,
            "champion": {"version": str(champion.version), "checkpoint": champion.tags.get("checkpoint"),
                         "uri": f"models:/{name}@{CHAMPION}"},
            "decisions": decisions,
            "mlflow_run": tracker.run_url(),
        }
        atomic_write_json(Path(cfg.decision_path), out)
        tracker.log_dict(out, "promotion.json")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return out
