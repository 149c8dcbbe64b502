"""``python -m train.search --config FILE [key=value ...] --workdir DIR``: Bayesian search.

The config's ``search:`` section declares the space (dotted config keys, each with a
distribution), the trial budget, the sampler (Optuna's TPE, Bergstra et al. 2011, or random;
seeded), the pruner (median: a trial whose eval loss is above the median of the earlier
trials' at the same step is stopped) and the storage (default ``sqlite:///<workdir>/
search.db``). Each trial trains the config with its sampled values (``train.loop.fit``) in
``<workdir>/trial_<n>``, reporting every evaluation to the pruner; it scores the final eval
loss (lower is better).

Rerunning on the same workdir continues the study: finished trials are kept and only the
missing ones (up to ``search.trials``) run; raise ``search.trials`` to add more. Outputs:
``results.csv`` and ``results.md`` (every trial), ``best.yaml`` (the best trial's full
config, ready for ``python -m train --config best.yaml``), ``history.png`` (each trial's
score and the best so far) and ``importance.png`` / ``importance.json`` (Optuna's parameter
importances: fANOVA with scikit-learn installed, PED-ANOVA otherwise).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import re
import typing
from typing import Any

import yaml

from train import cli, metrics
from train import config as config_lib
from train.config import Config, ConfigError

RANGES = ("log_uniform", "uniform", "int", "log_int")
DISTRIBUTIONS = (*RANGES, "categorical")
FINISHED = ("COMPLETE", "PRUNED")  # trials that count towards search.trials
PRUNED_MESSAGE = "by the evaluation callback"  # train.loop.fit's "stopped" for on_eval


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` in DISTRIBUTIONS; [low, high] for ranges, or ``choices``."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def candidates(self) -> list:
        """Values that must each give a valid config: both ends, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def sample(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        log = self.kind.startswith("log")
        if self.kind in ("int", "log_int"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=log)
        return trial.suggest_float(self.key, self.low, self.high, log=log)


def override(key: str, value: Any) -> str:
    """``key=value`` for :func:`train.config.load`: JSON is YAML, and keeps the value's type."""
    return f"{key}={json.dumps(value)}"


def _check_key(key: Any) -> str:
    where = f"search.space.{key}"
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_0-9]\w*)+", key):
        raise ConfigError(f"search.space: {key!r:.80} is not a dotted config key (section.name)")
    section, name, *deeper = key.split(".")
    sections = typing.get_type_hints(Config)
    if section not in sections or section in ("search", "pbt"):
        known = ", ".join(s for s in sections if s not in ("search", "pbt"))
        raise ConfigError(f"{where}: no such section {section!r} to search (known: {known})")
    fields = typing.get_type_hints(sections[section])
    if name not in fields:
        raise ConfigError(f"{where}: unknown config key (known in {section}: {', '.join(fields)})")
    if deeper and fields[name] is not dict:
        raise ConfigError(f"{where}: {section}.{name} is not a mapping, nothing below it")
    return key


def _number(where: str, value: Any, integer: bool) -> float:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or not math.isfinite(value) or (integer and value != int(value)):
        raise ConfigError(
            f"{where}: expected a finite {'integer' if integer else 'number'}, got {value!r:.80}"
        )
    return value


def _param(key: str, spec: Any) -> Param:
    where = f"search.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: expected one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r:.80}"
        )
    kind, values = next(iter(spec.items()))
    where = f"{where}.{kind}"
    if kind == "categorical":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: expected a non-empty list of choices, got {values!r:.80}")
        for choice in values:  # what Optuna can store
            if choice is not None and not isinstance(choice, bool | int | float | str):
                raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null")
        return Param(key, kind, choices=tuple(values))
    if not isinstance(values, list) or len(values) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {values!r:.80}")
    low, high = (_number(where, v, kind in ("int", "log_int")) for v in values)
    if not low < high:
        raise ConfigError(f"{where}: needs low < high, got [{low}, {high}]")
    if kind.startswith("log") and not low > 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    return Param(key, kind, low, high)


def _may_nest(key: str) -> bool:
    """Whether ``key`` can have config keys below it: a section, or a mapping field."""
    section, *rest = key.split(".")
    sections = typing.get_type_hints(Config)
    if section not in sections or not rest:
        return section in sections
    return typing.get_type_hints(sections[section]).get(rest[0]) is dict


def flat_space(space: dict) -> dict:
    """{dotted key: spec}: YAML writes ``optimizer.learning_rate: {...}``, an override
    ``search.space.optimizer.learning_rate={...}`` nests it; a later entry for a key wins."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}.{name}" if prefix else name
            nested = isinstance(value, dict) and value and not set(value) & set(DISTRIBUTIONS)
            if nested and isinstance(name, str) and _may_nest(key):
                walk(value, key)
            else:
                flat[key] = value

    walk(space, "")
    return flat


def check_trial_config(cfg: Config) -> None:
    """What ``load`` cannot see: the schedule and optimizer build for these values."""
    from train.optimizer import make_momentum_schedule, make_optimizer, make_schedule

    schedule = make_schedule(cfg.optimizer, cfg.run.steps)
    make_optimizer(cfg.optimizer, schedule, make_momentum_schedule(cfg.optimizer, cfg.run.steps))


def search_space(
    cfg: Config, path: pathlib.Path | None = None, overrides: list[str] = ()
) -> list[Param]:
    """``cfg.search.space`` checked, or a ConfigError naming ``search.space.<key>``.

    Beyond the shape of each entry, every end of a range and every choice is applied, alone,
    to the base config (``path`` + ``overrides``), which must then load and build its
    optimizer: a value the trainer would refuse fails here, before any trial runs.
    """
    space = flat_space(cfg.search.space)
    if not space:
        raise ConfigError("search.space is empty: name at least one config key to search")
    params = [_param(_check_key(key), spec) for key, spec in space.items()]
    for param in params:
        for value in param.candidates():
            try:
                check_trial_config(config_lib.load(path, [*overrides, override(param.key, value)]))
            except ConfigError as err:
                raise ConfigError(f"search.space.{param.key}: {value!r}: {err}") from None
    return params


def _storage(cfg: Config, workdir: pathlib.Path) -> str:
    return cfg.search.storage or f"sqlite:///{(workdir / 'search.db').resolve()}"


def _sampler(cfg: Config, seed: int):
    import optuna

    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(cfg: Config):
    import optuna

    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner()
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, workdir: pathlib.Path):
    """The study in the storage, created or resumed; trials left RUNNING by a killed search
    are marked failed (one search runs at a time in a workdir)."""
    import optuna

    storage = _storage(cfg, workdir)
    # Seeding with the trial count already stored: a resumed search must not replay the
    # first run's random proposals.
    try:
        study = optuna.load_study(study_name=cfg.search.study_name, storage=storage)
    except KeyError:
        study = None
    seed = cfg.search.seed + (len(study.trials) if study is not None else 0)
    study = optuna.create_study(
        study_name=cfg.search.study_name,
        storage=storage,
        sampler=_sampler(cfg, seed),
        pruner=_pruner(cfg),
        direction="minimize",
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def _check_trial_dirs(study, workdir: pathlib.Path) -> None:
    """A trial directory the study does not know would be resumed by the next trial's fit."""
    known = len(study.trials)
    for path in workdir.glob("trial_*"):
        number = path.name.removeprefix("trial_")
        if number.isdigit() and int(number) >= known:
            raise ConfigError(
                f"{path} exists but study {study.study_name!r} in {_storage_name(study)} has "
                f"{known} trials: use a fresh --workdir or the storage that made it"
            )


def _storage_name(study) -> str:
    url = getattr(study._storage, "url", None)  # RDBStorage's
    return url or type(study._storage).__name__


def run(
    cfg: Config,
    workdir: pathlib.Path,
    *,
    path: pathlib.Path | None = None,
    overrides: list[str] = (),
    progress: bool = True,
):
    """Runs the missing trials of ``cfg``'s study in ``workdir``; writes the outputs; returns
    the study."""
    import optuna

    from train import loop

    params = search_space(cfg, path, overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, workdir)
    _check_trial_dirs(study, workdir)
    finished = sum(t.state.name in FINISHED for t in study.trials)
    missing = max(0, cfg.search.trials - finished)

    def objective(trial) -> float:
        values = {param.key: param.sample(trial) for param in params}
        trial_cfg = config_lib.load(
            path, [*overrides, *(override(k, v) for k, v in values.items())]
        )
        trial_dir = workdir / f"trial_{trial.number}"

        def on_eval(step: int, record: dict[str, float]) -> bool:
            trial.report(record["eval_loss"], step)
            # At the last step the trial is done: its score counts, pruned or not.
            return step < trial_cfg.run.steps and trial.should_prune()

        summary = loop.fit(trial_cfg, trial_dir, progress=False, on_eval=on_eval)
        score = summary["final_eval_loss"]
        trial.set_user_attr("final_eval_accuracy", summary["final_eval_accuracy"])
        if summary["stopped"] and PRUNED_MESSAGE in summary["stopped"]:
            raise optuna.TrialPruned(f"pruned after step {summary['steps']}")
        return score if math.isfinite(score) else math.inf  # a diverged trial: the worst

    def report(study, trial) -> None:
        if progress:
            shown = "" if trial.value is None else f" eval loss {trial.value:.4f}"
            print(f"trial {trial.number}: {trial.state.name.lower()}{shown} {trial.params}")

    if missing:
        # A config error in one combination of values (e.g. an option the sampled optimizer
        # lacks) fails that trial, not the search.
        study.optimize(objective, n_trials=missing, catch=(ConfigError,), callbacks=[report])
    write_outputs(study, cfg, workdir, path, overrides)
    return study


# ------------------------------------------------------------------------------ outputs


def _rows(study) -> list[dict]:
    rows = []
    for trial in study.trials:
        steps = trial.intermediate_values
        duration = trial.duration.total_seconds() if trial.duration else None
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "eval_loss": trial.value,
                "last_step": max(steps) if steps else None,
                "seconds": None if duration is None else round(duration, 2),
                **trial.params,
            }
        )
    return rows


def _markdown(rows: list[dict], columns: list[str], best: int | None) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    ranked = sorted(rows, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0.0))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in ranked:
        mark = " (best)" if row["number"] == best else ""
        cells = [cell(row.get(c)) + (mark if c == "number" else "") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_config(study, path: pathlib.Path | None, overrides: list[str]) -> Config:
    best = study.best_trial
    return config_lib.load(path, [*overrides, *(override(k, v) for k, v in best.params.items())])


def write_outputs(
    study, cfg: Config, workdir: pathlib.Path, path: pathlib.Path | None, overrides: list[str]
) -> None:
    rows = _rows(study)
    columns = [
        "number",
        "state",
        "eval_loss",
        "last_step",
        "seconds",
        *flat_space(cfg.search.space),
    ]
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = study.best_trial.number if complete else None
    (workdir / "results.md").write_text(_markdown(rows, columns, best))
    if complete:
        values = config_lib.to_dict(best_config(study, path, overrides))
        values.pop("search")  # best.yaml is a run, not a search
        trial = study.best_trial
        header = (
            f"# Best of study {study.study_name!r}: trial {trial.number}, final eval loss "
            f"{trial.value:.6g} after {values['run']['steps']} steps.\n# Searched values: "
            f"{json.dumps(trial.params)}\n# Run it: python -m train --config best.yaml\n"
        )
        (workdir / "best.yaml").write_text(header + yaml.safe_dump(values, sort_keys=False))
    _plot_history(study, workdir / "history.png")
    _write_importance(study, workdir)


def _plot_history(study, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [t for t in study.trials if t.state.name == "COMPLETE" and math.isfinite(t.value)]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    ax.plot([t.number for t in done], [t.value for t in done], "o", label="complete")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.plot([t.number for t in pruned], last, "x", label="pruned (last eval)")
    if done:
        best, numbers, bests = math.inf, [], []
        for t in sorted(done, key=lambda t: t.number):
            best = min(best, t.value)
            numbers.append(t.number)
            bests.append(best)
        ax.step(numbers, bests, where="post", color="red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("final eval loss")
    ax.set_title(f"Optimisation history: {study.study_name}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    metrics.save_figure(fig, path)


def importances(study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA needs scikit-learn; PED-ANOVA does not)."""
    import optuna

    try:
        import sklearn  # noqa: F401

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def _write_importance(study, workdir: pathlib.Path) -> None:
    try:
        scores = importances(study)
    except (ValueError, RuntimeError) as err:  # too few complete trials, one-point space
        (workdir / "importance.json").write_text(json.dumps({"error": str(err)}) + "\n")
        return
    (workdir / "importance.json").write_text(json.dumps(scores, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(scores) + 1.5))
    names = list(scores)[::-1]
    ax.barh(names, [scores[n] for n in names])
    ax.set_xlabel("importance (share of the eval loss's variation)")
    ax.set_title("Parameter importance")
    metrics.save_figure(fig, workdir / "importance.png")


# ---------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.recipe_parser(
        "python -m train.search",
        __doc__.split("\n\n")[1],
        workdir_help="default: runs/<recipe name>/search",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    cli.use_simulated_cpu_devices()

    with cli.user_errors():
        cfg = config_lib.load(args.config, args.overrides)
        workdir = args.workdir or cli.default_workdir(args.config, "search")
        study = run(cfg, workdir, path=args.config, overrides=list(args.overrides))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        print(
            f"{len(study.trials)} trials ({len(complete)} complete); best: trial {best.number}, "
            f"eval loss {best.value:.4f}, {best.params}; outputs in {workdir}"
        )
    else:
        print(f"{len(study.trials)} trials, none complete; outputs in {workdir}")
    return study


if __name__ == "__main__":
    main()
