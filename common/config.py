"""Run configuration: what the federation agrees on, parsed once from `[tool.flwr.app.config]`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.errors import ConfigError
from common.site_file import FITS

LIGHT_MODELS = ("lightcnn", "lightcnn-gn", "seedcnn")
BACKBONE_MODELS = ("densenet121", "resnet50", "efficientnetb0")
MODELS = LIGHT_MODELS + BACKBONE_MODELS  # common/model.py ARCHITECTURES, without importing Keras
PARTITIONS = ("iid", "dirichlet")
LOSSES = ("bce", "focal")
SCHEDULES = ("constant", "cosine")
WEIGHTINGS = ("none", "balanced", "logit-adjusted")
AGGREGATIONS = ("fedavg", "fedadam", "fedavgm", "clipped-mean", "median", "trimmed-mean", "multikrum")
OVERLAPS = ("count", "exclude")
PRIVACY = ("off", "central", "local")


def _setting(default: Any, check: Callable[[Any], bool] | None = None, allowed: str = "", doc: str = "") -> Any:
    """Declare a run setting with its default, its range check and a description of the allowed values."""
    return field(default=default, metadata={"check": check, "allowed": allowed, "doc": doc})


def _positive(value: Any) -> bool:
    """True for a number above zero."""
    return value > 0


def _fraction(value: Any) -> bool:
    """True for a number in (0, 1]."""
    return 0 < value <= 1


@dataclass(frozen=True)
class RunConfig:
    """Every run setting, typed and checked; keys are the dashed names of `[tool.flwr.app.config]`."""

    num_server_rounds: int = _setting(10, _positive, "an integer >= 1", "federated rounds")
    local_epochs: int = _setting(2, _positive, "an integer >= 1", "passes over a hospital's images per round")
    batch_size: int = _setting(16, _positive, "an integer >= 1", "images per training step")
    learning_rate: float = _setting(3e-3, _positive, "a number > 0", "Adam's learning rate")
    learning_rate_schedule: str = _setting("constant", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}", "constant: learning-rate every round; cosine: from learning-rate in round 1 down to a tenth of it in the last round, so late rounds move the model less and hospitals drift apart less (FedAvg needs a falling rate on skewed data, Li et al. 2020)")
    fraction_train: float = _setting(1.0, _fraction, "a number in (0, 1]", "share of hospitals sampled to train each round")
    fraction_evaluate: float = _setting(1.0, _fraction, "a number in (0, 1]", "share of hospitals sampled to validate each round")
    aggregation: str = _setting("fedavg", lambda v: v in AGGREGATIONS, f"one of {', '.join(AGGREGATIONS)}", "fedavg: the example-weighted mean; fedadam: that mean's step taken by a server-side Adam (Reddi et al. 2021); fedavgm: by server momentum (Hsu et al. 2019); robust to a broken or hostile hospital: clipped-mean, median, trimmed-mean, multikrum (server/aggregation.py says which to choose when)")
    server_learning_rate: float = _setting(0.01, _positive, "a number > 0", "fedadam: the server Adam's learning rate")
    server_momentum: float = _setting(0.9, lambda v: 0 <= v < 1, "a number in [0, 1)", "fedavgm: beta of the server's momentum (0: plain FedAvg)")
    trim_fraction: float = _setting(0.2, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)", "trimmed-mean: share of the highest and of the lowest values cut per weight")
    krum_byzantine: int = _setting(1, lambda v: v >= 0, "an integer >= 0", "multikrum: hospitals that may be hostile; the n - this updates closest to the others are averaged")
    max_update_norm: float = _setting(10.0, lambda v: v >= 0, "a number >= 0 (0: off)", "a train reply whose change to the model is larger than this many times the global model's own size (L2, whole model) is refused, naming the hospital")
    max_examples: int = _setting(1_000_000, lambda v: v >= 0, "an integer >= 0 (0: off)", "a reply claiming more training or validation images than this (or than the hospital declared in the roster) is refused, naming the hospital")
    max_site_auc_shift: float = _setting(0.05, lambda v: 0 <= v <= 1, "a number in [0, 1] (0: off)", "warn, naming the site, when leaving one site out moves the pooled validation AUC by more than this")
    max_site_sensitivity_shift: float = _setting(0.15, lambda v: 0 <= v <= 1, "a number in [0, 1] (0: off)", "warn, naming the site, when leaving one site out moves the other sites' sensitivity at the operating point by more than this")
    dp: str = _setting("off", lambda v: v in PRIVACY, f"one of {', '.join(PRIVACY)}", "differential privacy of each hospital's update (common/privacy.py): central: every hospital clips its update to dp-clip-norm in its own code and the server adds Gaussian noise to their unweighted mean; local: every hospital also adds the noise itself, so no un-noised weights leave it (under either, a hospital's training loss is withheld)")
    dp_clip_norm: float = _setting(1.0, _positive, "a number > 0", "dp: the largest L2 norm of a hospital's update (its weights minus the global model's, whole model); larger updates are scaled down to it")
    dp_noise_multiplier: float = _setting(1.0, lambda v: v >= 0, "a number >= 0", "dp: the noise's standard deviation in units of dp-clip-norm (on the sum of the updates); more noise, less epsilon spent per round")
    dp_delta: float = _setting(1e-5, lambda v: 0 < v < 1, "a number in (0, 1)", "dp: the delta of the (epsilon, delta) budget the run reports each round (history.csv dp_epsilon)")
    proximal_mu: float = _setting(0.0, lambda v: v >= 0, "a number >= 0 (0: off)", "FedProx: weight mu of the term mu/2 ||w - w_global||^2 in each hospital's training loss (the reported train loss includes it)")
    min_hospitals: int = _setting(2, _positive, "an integer >= 1", "fewest hospitals a round may start with")
    round_timeout: float = _setting(600.0, _positive, "a number of seconds > 0", "how long the server waits for replies in each phase of a round; who has not replied by then is recorded as timed out, and a reply that comes later as late")
    round_quorum: float = _setting(1.0, _fraction, "a number in (0, 1]", "a phase goes on quorum-grace seconds after this share of the hospitals asked has replied (1: wait for all, up to round-timeout)")
    quorum_grace: float = _setting(60.0, lambda v: v >= 0, "a number of seconds >= 0", "round-quorum below 1: how long a phase still waits for the others once the quorum has replied")
    node_wait: float = _setting(300.0, lambda v: v >= 0, "a number of seconds >= 0", "how long a phase waits for hospitals that are not connected (the roster's, else those seen earlier in the run, and at least min-hospitals) before going on with those present; the run fails when fewer than min-hospitals are")
    reply_poll_seconds: float = _setting(0.1, lambda v: 0 < v <= 10, "a number of seconds in (0, 10]", "how often the server asks the SuperLink for the hospitals' replies (Flower's own default: 3 s when deployed)")
    early_stop_rounds: int = _setting(0, lambda v: v >= 0, "an integer >= 0 (0: off)", "stop after this many rounds without a better model by the selection criterion (pooled validation AUC, else pooled validation log loss)")
    model: str = _setting("lightcnn", lambda v: v in MODELS, f"one of {', '.join(MODELS)}", "the CNN (common/model.py): the light CNNs, or an ImageNet backbone from keras.applications (images of at least 32x32; grey is repeated into three channels)")
    initial_weights: str = _setting("", None, "a path to a .keras or .weights.h5 file, or empty", "initial global weights")
    backbone_weights: str = _setting("", None, "a path to keras.applications' *_notop.h5 file of the model, or empty", "a backbone's ImageNet weights, read by the server from a local file (nothing is downloaded); the hospitals receive them as the initial global model")
    labels: tuple[str, ...] = _setting(("lesion",), lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(v), "comma-separated distinct names", "the findings, one logit each")
    image_size: int = _setting(64, lambda v: 16 <= v <= 1024, "an integer in [16, 1024]", "model input height and width")
    channels: int = _setting(1, lambda v: v in (1, 3), "1 (grey) or 3 (RGB)", "model input channels; every site's images are converted to them")
    image_fit: str = _setting("pad", lambda v: v in FITS, f"one of {', '.join(FITS)}", "how an image that is not square becomes the square input: pad with black, crop its centre, or stretch (a site file may choose its own)")
    loss: str = _setting("bce", lambda v: v in LOSSES, f"one of {', '.join(LOSSES)}", "binary cross-entropy, or focal loss (down-weights easy images)")
    focal_gamma: float = _setting(2.0, lambda v: v >= 0, "a number >= 0", "focal loss: how strongly easy images are down-weighted")
    class_weighting: str = _setting("balanced", lambda v: v in WEIGHTINGS, f"one of {', '.join(WEIGHTINGS)}", "balanced: each site weighs positives and negatives of a label by its own counts; logit-adjusted: each site shifts its logits by its own log prior odds while it trains (Menon et al. 2021), so a site holding one class barely moves the model")
    data: str = _setting("synthetic", None, "'synthetic' or a path to an .npz file", "the images the simulated hospitals share out")
    sites: tuple[str, ...] = _setting((), None, "comma-separated site YAML files, or empty", "simulate these sites (one hospital per file) instead of sharing out `data`")
    heldout_site: str = _setting("", None, "a site YAML file, or empty", "the server's held-out set: every image of this site (default: built-in or the .npz test split)")
    roster: str = _setting("", None, "a roster file, or empty", "deployment: the server operator's roster (server/roster.py): which registered node is which hospital; a reply claiming another hospital's name is refused")
    heldout_overlap: str = _setting("count", lambda v: v in OVERLAPS, f"one of {', '.join(OVERLAPS)}", "before training each hospital counts its images whose pixels equal a held-out image's (keyed digests; no image leaves); exclude: it also says which, and the server leaves those out of its held-out set")
    num_hospitals: int = _setting(4, _positive, "an integer >= 1", "simulated hospitals")
    images_per_hospital: int = _setting(600, lambda v: v >= 10, "an integer >= 10", "built-in data: images made per hospital on average")
    heldout_images: int = _setting(800, lambda v: v >= 10, "an integer >= 10", "built-in data: size of the server's held-out set")
    prevalence: float = _setting(0.5, lambda v: 0 < v < 1, "a number in (0, 1)", "built-in data: share of images with a lesion")
    partition: str = _setting("iid", lambda v: v in PARTITIONS, f"one of {', '.join(PARTITIONS)}", "how the images are shared out")
    dirichlet_alpha: float = _setting(0.5, _positive, "a number > 0", "label-skew concentration (smaller: more skew)")
    scanner_spread: float = _setting(1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]", "how much hospitals' scanners differ (0: identical)")
    val_fraction: float = _setting(0.2, lambda v: 0 < v < 1, "a number in (0, 1)", "share of a hospital's images kept for validation (of those left after its test share)")
    test_fraction: float = _setting(0.0, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)", "simulated hospitals: share of a hospital's images held back as its local test set, never trained or validated on (benchmarks)")
    threshold: float = _setting(0.5, lambda v: 0 < v < 1, "a probability in (0, 1)", "decision threshold for sensitivity and specificity")
    target_sensitivity: float = _setting(0.8, lambda v: 0 < v < 1, "a number in (0, 1)", "sensitivity the operating point must reach, chosen on pooled validation")
    min_bin_images: int = _setting(5, lambda v: v >= 1, "an integer >= 1", "every non-empty score-histogram bin a hospital sends holds at least this many of its validation images (bins are merged until they do)")
    gradcam_images: int = _setting(96, lambda v: v >= 0, "an integer >= 0 (0: off)", "held-out images the Grad-CAM checks look at each round")
    gradcam_border_threshold: float = _setting(0.4, lambda v: 0 < v <= 1, "a number in (0, 1]", "border energy above which a hospital's held-out images raise a shortcut warning")
    shortcut_hospital: int = _setting(-1, lambda v: v >= -1, "a hospital index, or -1 for none", "simulated shortcut: a marker in one corner of this hospital's positive images")
    histogram_bins: int = _setting(400, lambda v: 10 <= v <= 10_000, "an integer in [10, 10000]", "score-histogram bins")
    seed: int = _setting(42, lambda v: v >= 0, "an integer >= 0", "seed for data, splits and initial weights")
    deterministic: bool = _setting(False, None, "true or false", "repeatable figures: TensorFlow's ops run deterministically and each hospital's model is built afresh from the round's seed (slower); a resumed run then equals an uninterrupted one (differential privacy's noise is never repeatable)")
    resume: str = _setting("", None, "a run folder, or empty", "continue this run folder after its last checkpointed round, with the settings in its config.json (`python -m server.simulate --resume FOLDER` sets it; deployed, start the run with `--run-config FOLDER/resume.toml`)")
    threads_per_client: int = _setting(1, _positive, "an integer >= 1", "TensorFlow threads per client process")
    mixed_precision: bool = _setting(False, None, "true or false", "train in mixed float16 on a hospital's GPU (no effect on a CPU)")
    output_dir: str = _setting("runs", None, "a folder path", "where run folders are written")
    run_name: str = _setting("", None, "a folder name, or empty for a timestamp", "name of this run's folder")
    tensorboard: bool = _setting(True, None, "true or false", "write TensorBoard event files into the run folder's tensorboard/ (`tensorboard --logdir runs/` shows every run)")
    mlflow_tracking_uri: str = _setting("", None, "an MLflow tracking URI (file:, http(s):, ...), or empty for none", "also record the run's settings, figures per round and best model to this MLflow tracking location (needs the mlflow extra)")
    mlflow_experiment: str = _setting("fedimaging", lambda v: bool(v), "an experiment name", "mlflow-tracking-uri: the MLflow experiment the run is recorded under")

    @property
    def data_path(self) -> Path | None:
        """The `.npz` file named by `data`, or None for the built-in data."""
        return None if self.data == "synthetic" else Path(self.data)


_FIELDS = {f.name.replace("_", "-"): f for f in dataclasses.fields(RunConfig)}
RUN_SETTINGS = tuple(sorted(_FIELDS))  # every run setting's name, as users write it
PROJECT = Path(__file__).resolve().parent.parent


def project_settings() -> dict[str, Any]:
    """The run settings of the app's pyproject.toml, [tool.flwr.app.config]."""
    with open(PROJECT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """'key=value' pairs (TOML values; bare words taken as strings), as `flwr run --run-config` takes them."""
    overrides: dict[str, Any] = {}
    for text in texts:
        for pair in shlex.split(text):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"--run-config {pair!r}: expected key=value")
            try:
                overrides[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                overrides[key] = value
    return overrides


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert a TOML value to the field's type, or raise ConfigError naming the key."""
    allowed = f.metadata["allowed"]
    if f.type in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"run setting '{key}' = {value!r}: expected {allowed}")
        return value
    if f.type in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"run setting '{key}' = {value!r}: expected {allowed}")
        return value
    if f.type in ("float", float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run setting '{key}' = {value!r}: expected {allowed}")
        return float(value)
    if f.type in ("tuple[str, ...]",):
        if not isinstance(value, str):
            raise ConfigError(f"run setting '{key}' = {value!r}: expected {allowed}")
        return tuple(part.strip() for part in value.split(",")) if value.strip() else ()
    if not isinstance(value, str):
        raise ConfigError(f"run setting '{key}' = {value!r}: expected {allowed}")
    return value


def require_mlflow(cfg: RunConfig) -> None:
    """ConfigError where the run asks for MLflow (mlflow-tracking-uri) and it is not installed here."""
    if cfg.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "run setting 'mlflow-tracking-uri': MLflow is not installed here: bash scripts/bootstrap.sh mlflow (or pip install 'fedimaging[mlflow]')"
        )


def parse_run_config(raw: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Check every run setting and return the RunConfig; relative paths resolve against base_dir (default: cwd)."""
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown run setting(s) {', '.join(map(repr, unknown))}; known settings: {', '.join(RUN_SETTINGS)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = _FIELDS[key]
        value = _coerce(key, value, f)
        check = f.metadata["check"]
        if check is not None and not check(value):
            raise ConfigError(f"run setting '{key}' = {value!r} is out of range: expected {f.metadata['allowed']}")
        values[f.name] = value
    cfg = RunConfig(**values)
    return _resolve_paths(cfg, base_dir or Path.cwd())


def _resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    """Make path settings absolute and check that the named input files exist."""
    def absolute(path: str) -> str:
        return str((base_dir / path).resolve()) if path else path

    def tracking(uri: str) -> str:  # a local MLflow store as a path: absolute, for the ServerApp runs elsewhere
        if not uri or ("://" in uri and not uri.startswith("file://")):
            return uri
        return Path(absolute(uri.removeprefix("file://").removeprefix("file:"))).as_uri()

    data = cfg.data if cfg.data == "synthetic" else absolute(cfg.data)
    sites = tuple(absolute(site) for site in cfg.sites)
    cfg = dataclasses.replace(
        cfg, data=data, sites=sites, heldout_site=absolute(cfg.heldout_site), initial_weights=absolute(cfg.initial_weights),
        backbone_weights=absolute(cfg.backbone_weights),
        output_dir=absolute(cfg.output_dir), num_hospitals=len(sites) or cfg.num_hospitals, roster=absolute(cfg.roster),
        resume=absolute(cfg.resume), mlflow_tracking_uri=tracking(cfg.mlflow_tracking_uri),
    )  # fmt: skip
    if cfg.roster and not Path(cfg.roster).is_file():
        raise ConfigError(f"run setting 'roster': file not found: {cfg.roster}")
    for key, path in [("sites", site) for site in sites] + [("heldout-site", cfg.heldout_site)]:
        if path and not Path(path).is_file():
            raise ConfigError(f"run setting '{key}': site file not found: {path}")
    if cfg.data_path is not None:
        if cfg.data_path.suffix != ".npz":
            raise ConfigError(f"run setting 'data' = {cfg.data!r}: expected 'synthetic' or a path to an .npz file")
        if not cfg.data_path.is_file():
            raise ConfigError(f"run setting 'data': file not found: {cfg.data}")
    if cfg.initial_weights:
        if not cfg.initial_weights.endswith((".keras", ".weights.h5")):
            raise ConfigError(f"run setting 'initial-weights' = {cfg.initial_weights!r}: expected a .keras or .weights.h5 file")
        if not Path(cfg.initial_weights).is_file():
            raise ConfigError(f"run setting 'initial-weights': file not found: {cfg.initial_weights}")
    if cfg.backbone_weights:
        if cfg.model in LIGHT_MODELS:
            raise ConfigError(f"run setting 'backbone-weights' is for an ImageNet backbone ({', '.join(BACKBONE_MODELS)}), not model {cfg.model!r}")
        if not cfg.backbone_weights.endswith((".h5", ".hdf5")):
            raise ConfigError(f"run setting 'backbone-weights' = {cfg.backbone_weights!r}: expected keras.applications' *_notop.h5 file")
        if not Path(cfg.backbone_weights).is_file():
            raise ConfigError(f"run setting 'backbone-weights': file not found: {cfg.backbone_weights}")
        if cfg.initial_weights:
            raise ConfigError("run settings 'backbone-weights' and 'initial-weights' both set: expected one source of initial weights")
    if cfg.model in BACKBONE_MODELS and cfg.image_size < 32:
        raise ConfigError(f"run setting 'image-size' = {cfg.image_size}: model {cfg.model!r} needs at least 32")
    if "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"run setting 'run-name' = {cfg.run_name!r}: expected a plain folder name")
    if cfg.min_hospitals > cfg.num_hospitals:
        raise ConfigError(
            f"run setting 'min-hospitals' = {cfg.min_hospitals} exceeds 'num-hospitals' = {cfg.num_hospitals}: expected at most {cfg.num_hospitals}"
        )
    if cfg.dp == "central" and cfg.aggregation != "fedavg":
        raise ConfigError(f"run setting 'dp' = 'central' adds noise sized for the mean of the hospitals' updates: expected 'aggregation' = 'fedavg', not {cfg.aggregation!r}")
    if cfg.shortcut_hospital >= cfg.num_hospitals:
        raise ConfigError(
            f"run setting 'shortcut-hospital' = {cfg.shortcut_hospital}: expected -1 or a hospital below 'num-hospitals' = {cfg.num_hospitals}"
        )
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved configuration with dashed keys, as written to a run folder's config.json."""
    return {name: (",".join(getattr(cfg, f.name)) if isinstance(getattr(cfg, f.name), tuple) else getattr(cfg, f.name)) for name, f in _FIELDS.items()}


def toml_lines(settings: dict[str, Any]) -> str:
    """Run settings as TOML lines (key = value), as `flwr run --run-config FILE` takes them."""
    return "".join(f"{k} = {('true' if v else 'false') if isinstance(v, bool) else json.dumps(v)}\n" for k, v in settings.items())


def describe_settings() -> list[tuple[str, Any, str, str]]:
    """(key, default, allowed values, meaning) for every run setting, for the README and --help."""
    return [
        (name, ",".join(f.default) if isinstance(f.default, tuple) else f.default, f.metadata["allowed"], f.metadata["doc"])
        for name, f in _FIELDS.items()
    ]
