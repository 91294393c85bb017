"""Experiment configs: the choices of one federated run (sites, classes, model, method, budget, runtime).

Site configs (medfl.config) hold facts about data; an experiment config holds choices. It is a YAML file
validated with pydantic: unknown keys are errors naming the key and the file, relative paths (site
configs, output_dir) resolve against the experiment file's folder, and the resolved config is written
into every run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medfl.config import (
    VOLUMETRIC_KEYS,
    DataSettings,
    SiteConfig,
    check_name_length,
    expand_env,
    load_site_config,
    load_yaml_mapping,
    validate_model,
)
from medfl.errors import ConfigError
from medfl.methods import METHODS, MethodSpec, method_spec
from medfl.network_facts import check_network, downsampling_factor
from medfl.task_facts import TaskKey, facts_for


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """Network name (medfl.models.MODEL_NAMES), channel width multiplier and the network's own options.

    - `name`: the network (table "Networks" below); segmentation experiments name a UNet (`unet`).
    - `width`: multiplies the network's channel counts (0.25: a quarter of the reference's width).
    - `options`: the network's own keyword arguments (table "Networks" below); an unknown one is an error.
    """

    name: str = "slim_vgg16"
    width: float = Field(default=0.25, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerSettings(_Section):
    """SGD (the reference: plain, no momentum) or Adam; the learning rate is multiplied by `lr_gamma` every
    `lr_step_rounds`.

    - `name`: `sgd` (the reference) or `adam` (learns faster in short CPU runs).
    - `lr`: the learning rate of the first round.
    - `momentum`: SGD's momentum (ignored by Adam); the reference uses none.
    - `weight_decay`: L2 weight decay of both optimizers.
    - `lr_step_rounds`: every this many rounds the learning rate is multiplied by `lr_gamma`.
    - `lr_gamma`: the learning-rate factor applied every `lr_step_rounds` rounds.
    - `reset_every_round`: every model gets a fresh optimizer at the start of each round, as the reference
      does (a deputy whose weights were replaced keeps no stale momentum or Adam moments).
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=1e-2, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=1e-6, ge=0)
    lr_step_rounds: int = Field(default=5, ge=1)
    lr_gamma: float = Field(default=0.5, gt=0, le=1)
    reset_every_round: bool = True

    def learning_rate(self, round_: int) -> float:
        """The learning rate of 0-based round `round_`: `lr` times `lr_gamma` per completed step of rounds."""
        return self.lr * self.lr_gamma ** (round_ // self.lr_step_rounds)


class PFASettings(_Section):
    """Progressive Fourier aggregation: low-frequency ratio from `start` to `end` over the rounds.

    - `start`: the low-frequency ratio L of round 0 (share of each spectrum axis that is shared).
    - `end`: the ratio L grows towards linearly, L_t = start + (t / rounds)(end - start); never reached.
    - `share_phase`: share amplitude and phase inside the low-frequency box (TMI 2022); false shares the
      amplitude only and keeps each site's phase (MICCAI 2021).
    - `weighting`: site weights of the shared spectra: `uniform` (the reference) or by training samples.
    """

    start: float = Field(default=0.7, ge=0, le=1)
    end: float = Field(default=0.95, ge=0, le=1)
    share_phase: bool = True
    weighting: Literal["uniform", "samples"] = "uniform"


class DETSettings(_Section):
    """Deputy-enhanced transfer thresholds (0 < lambda1 < lambda2 < 1) and distillation temperature.

    - `lambda1`: the deputy recovers (learns from P only) while its validation score is below lambda1 x P's.
    - `lambda2`: from Exchange, the deputy's score must reach lambda2 x P's for Sublimate (P learns from D).
    - `temperature`: distillation temperature tau_kd; the KL term is multiplied by its square.
    - `phi_source`: where phi (the task metric that picks DET's state) is measured: the validation split
      (`val`, the paper) or the training split with the evaluation preprocessing, both models in eval mode
      (`train`, the reference code).
    - `reestimate_bn_on_receive`: right after the model that receives the server's weights (D; the single model
      of one-model methods) has loaded them, replace its BatchNorm running statistics by those of the site's own
      training data (evaluation preprocessing, no weight change) before it is scored and trained. Averaged
      statistics of other sites are what most of the received model's drop is made of (the retrogress
      diagnostic); a no-op for networks without BatchNorm.
    """

    lambda1: float = Field(default=0.7, gt=0, lt=1)
    lambda2: float = Field(default=0.9, gt=0, lt=1)
    temperature: float = Field(default=1.0, gt=0)
    phi_source: Literal["val", "train"] = "val"
    reestimate_bn_on_receive: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> DETSettings:
        if not self.lambda1 < self.lambda2:
            raise ValueError(f"lambda1 ({self.lambda1}) must be below lambda2 ({self.lambda2})")
        return self


class CPASettings(_Section):
    """Conjoint prototype-aligned loss. `tau` None: 3 for classification, 1 for segmentation;
    `warmup_rounds` None: 30% of the rounds (gamma = 1 before).

    - `beta`: mitigation exponent: for a sample of class i, the softmax denominator weighs exp(logit) of
      each rarer class j by (N_j / N_i)^beta (N: the federation's training counts).
    - `tau`: refinement smoothing, gamma_c = (1 + tau) / (cos(local, global prototype) + tau); null: 3 for
      classification, 1 for segmentation.
    - `warmup_rounds`: rounds with gamma = 1 before prototypes refine the loss; null: 30% of the rounds.
    - `prototype_mode`: global prototypes as the count-weighted `mean` of the sites' prototypes, or
      `gaussian` (the mean plus noise scaled by the spread across sites, as the reference offers).
    - `gamma_max`: upper bound of gamma (its denominator can reach 0 with tau = 1).
    """

    beta: float = Field(default=0.8, ge=0)
    tau: float | None = Field(default=None, ge=0)
    warmup_rounds: int | None = Field(default=None, ge=0)
    prototype_mode: Literal["mean", "gaussian"] = "mean"
    gamma_max: float = Field(default=10.0, ge=1)


class BaselineSettings(_Section):
    """Hyper-parameters of the comparison methods: FedProx's mu, Ditto's lambda and FedProto's prototype-loss
    weight.

    - `fedprox_mu`: FedProx's proximal weight, mu/2 ||w - w_received||^2.
    - `ditto_lambda`: Ditto's weight lambda of lambda/2 ||v - w_received||^2, which ties the personalised model v
      (P) to the global model received this round (1.0: NVIDIA FLARE's prostate example; 0 trains P alone).
    - `fedproto_weight`: FedProto's weight of the distance between features and global prototypes.
    - `fedavg_weighting`: site weights of FedAvg-style averaging (fedavg, fedprox, fedbn, fml, ...):
      by training `samples` (FedAvg's rule) or `uniform`.
    """

    fedprox_mu: float = Field(default=0.01, ge=0)
    ditto_lambda: float = Field(default=1.0, ge=0)
    fedproto_weight: float = Field(default=1.0, ge=0)
    fedavg_weighting: Literal["samples", "uniform"] = "samples"


class DiagnosticsSettings(_Section):
    """Extra measurements that cost time.

    - `bn_reestimation`: right after each communication, also score the received model after re-estimating
      its BatchNorm statistics on the site's training data (no weight change), so that a report can say how
      much of a retrogress is normalisation statistics.
    """

    bn_reestimation: bool = False


class EvaluationSettings(_Section):
    """How 3-D experiments score whole volumes: MONAI's sliding-window inference over patches of
    `data.patch_size`. Every key is 3-D only (a 2-D experiment refuses them); null takes the default.

    - `sw_overlap`: overlap of neighbouring windows, as a share of the patch (null: 0.25).
    - `sw_mode`: how overlapping windows are blended: `constant` (plain mean) or `gaussian` (centre-weighted);
      null: constant.
    - `sw_batch_size`: windows run through the network at once (null: 2); more is faster and needs more memory.
    """

    sw_overlap: float | None = Field(default=None, ge=0, lt=1)
    sw_mode: Literal["constant", "gaussian"] | None = None
    sw_batch_size: int | None = Field(default=None, ge=1, le=256)


EVALUATION_DEFAULTS: dict[str, Any] = {"sw_overlap": 0.25, "sw_mode": "constant", "sw_batch_size": 2}


class RuntimeSettings(_Section):
    """Threads for torch, sites trained side by side, mixed precision (CUDA only, bfloat16), and whether idle
    sites' models wait on the CPU.

    - `threads`: torch's CPU threads; null leaves torch's default (one per core).
    - `parallel_sites`: worker processes that train the sites of a round at the same time (in process runs):
      1 trains them one after another in this process; N uses N workers (at most one per site), each owning
      its sites for the whole run, the threads shared out among them; `auto` uses them only where the work
      per round outweighs a worker's start-up. On a CUDA GPU the workers share it (a process, CUDA context
      and stream each) as far as its free memory holds them by an estimate made before the run starts: `auto`
      takes no more, a larger N is refused with the numbers. On the CPU results equal the sequential run's
      at equal threads per site. Pooled training ignores it.
    - `mixed_precision`: bfloat16 autocast in training on CUDA; ignored on the CPU.
    - `offload_idle_sites`: on CUDA, keep the models of sites that are not training on the CPU (many sites
      on one GPU).
    """

    threads: int | None = Field(default=None, ge=1)
    parallel_sites: Literal["auto"] | int = 1

    @field_validator("parallel_sites")
    @classmethod
    def _at_least_one_worker(cls, value: str | int) -> str | int:
        if value != "auto" and value < 1:
            raise ValueError("must be 'auto' or at least 1")
        return value
    mixed_precision: bool = False
    offload_idle_sites: bool = False


class ExperimentConfig(_Section):
    """One federated experiment. Defaults are the reference hyper-parameters scaled down for a CPU.

    - `name`: names the run folder, `<output_dir>/<name>-<method>-seed<seed>/`: letters, digits, `_`, `.` and
      `-`, at most 100 bytes.
    - `task`: classification or segmentation; every site config must have the same task.
    - `sites`: the site configs (paths relative to this file); site names must be unique.
    - `data`: the data choices shared by all sites (classes, input size, splits, recipes, loading).
    - `model`: the network every site trains (P and D have the same architecture).
    - `method`: the method (table "Methods" below): `prr` is PFA + DET + CPA; the others are baselines and
      ablations on the same code path.
    - `rounds`: communication rounds T.
    - `local_epochs`: local epochs E per round at every site.
    - `batch_size`: training batch size.
    - `optimizer`: the local optimizer of every model.
    - `pfa`: progressive Fourier aggregation (methods with `pfa` on the server).
    - `det`: deputy-enhanced transfer (methods with P and D).
    - `cpa`: the conjoint prototype-aligned loss (methods with the CPA loss).
    - `baselines`: hyper-parameters of the comparison methods.
    - `diagnostics`: extra measurements that cost time.
    - `evaluation`: how 3-D experiments score whole volumes (sliding-window inference).
    - `seed`: the experiment's seed: the common initialisation of every model, and per-site data order and
      augmentation (derived from the seed and the site's name).
    - `device`: `auto` (a CUDA GPU when there is one, else the CPU), `cpu` or `cuda`; aggregation runs
      there too.
    - `runtime`: threads, mixed precision and GPU memory.
    - `output_dir`: where run folders go (relative to this file).
    """

    name: str = Field(default="experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    task: TaskKey
    sites: list[Path] = Field(min_length=1)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    method: str = "prr"
    rounds: int = Field(default=10, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    pfa: PFASettings = Field(default_factory=PFASettings)
    det: DETSettings = Field(default_factory=DETSettings)
    cpa: CPASettings = Field(default_factory=CPASettings)
    baselines: BaselineSettings = Field(default_factory=BaselineSettings)
    diagnostics: DiagnosticsSettings = Field(default_factory=DiagnosticsSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    seed: int = Field(default=0, ge=-(2**63), le=2**64 - 1)  # torch.manual_seed's range; at most 20 digits in names
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    output_dir: Path = Path("runs")

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method '{value}'; choose one of: {', '.join(METHODS)}")
        return value

    @field_validator("name")
    @classmethod
    def _short_name(cls, value: str) -> str:
        return check_name_length(value)

    @field_validator("sites", "output_dir", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return expand_env(value)
        if isinstance(value, list):
            return [expand_env(v) if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> ExperimentConfig:
        source = (info.context or {}).get("source")
        if source is not None:
            self._source = Path(source).resolve()
            base = self._source.parent
            self.sites = [p if p.is_absolute() else (base / p).resolve() for p in self.sites]
            if not self.output_dir.is_absolute():
                self.output_dir = (base / self.output_dir).resolve()
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("a site config is listed twice")
        facts_for(self.task).check_experiment_classes(self.data.classes)
        check_network(facts_for(self.task), self.model.name, self.model.options)  # before torch loads
        self._check_dims()
        return self

    def _check_dims(self) -> None:
        """3-D: a task that has it, patches the network can take, the sliding window's defaults filled in;
        2-D: no sliding-window key."""
        given = [key for key in EVALUATION_DEFAULTS if getattr(self.evaluation, key) is not None]
        if self.data.dims == 2:
            if given:
                raise ValueError(f"key 'evaluation.{given[0]}' applies to 3-D experiments only (data.dims: 3); "
                                 "this one is 2-D")
            return
        facts = facts_for(self.task)
        if not facts.volumetric:
            raise ValueError(f"data.dims 3 is for segmentation experiments only; a {self.task} experiment is 2-D")
        multiple = downsampling_factor(facts, self.model.name, self.model.options)
        patch = self.data.patch_size or ()
        bad = [(axis, edge) for axis, edge in zip("xyz", patch, strict=True) if edge % multiple]
        if bad:
            axis, edge = bad[0]
            raise ValueError(f"key 'data.patch_size' {list(patch)}: edge {axis} ({edge}) is not a multiple of "
                             f"{multiple}, the total downsampling of model '{self.model.name}' (2^depth); use "
                             f"{max(multiple, edge - edge % multiple)} or {edge - edge % multiple + multiple}")
        for key, default in EVALUATION_DEFAULTS.items():
            if getattr(self.evaluation, key) is None:
                setattr(self.evaluation, key, default)

    @property
    def source_path(self) -> Path | None:
        return self._source

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    @property
    def classes(self) -> list[str]:
        """The federation's classes in order (segmentation: background, prostate)."""
        return facts_for(self.task).classes(self.data.classes)

    @property
    def cpa_tau(self) -> float:
        """CPA's tau: the config's, else the task's default (3 for classification, 1 for segmentation)."""
        if self.cpa.tau is not None:
            return self.cpa.tau
        return facts_for(self.task).default_cpa_tau

    @property
    def cpa_warmup_rounds(self) -> int:
        if self.cpa.warmup_rounds is not None:
            return self.cpa.warmup_rounds
        return int(round(0.3 * self.rounds))

    def load_sites(self) -> list[SiteConfig]:
        """Every site config, validated; names must be unique and tasks must match the experiment's."""
        sites = [load_site_config(path) for path in self.sites]
        names = [site.name for site in sites]
        for site in sites:
            if names.count(site.name) > 1:
                raise ConfigError(f"site '{site.name}' appears twice ({site.source_path}): site names must be unique")
            self._check_site(site)
        return sites

    def load_site(self, name: str) -> SiteConfig:
        """The config of site `name` alone, checked as `load_sites` checks it.

        A command that serves one site must not stop on another site's config: the listed files are read as
        plain YAML only to find the one named `name` (another site's missing file, or its unset `${VAR}`, is
        never expanded), and only that one is validated."""
        found, unreadable = [], []
        for path in self.sites:
            try:
                data = load_yaml_mapping(path)
            except ConfigError as error:
                unreadable.append(str(error))
                continue
            except OSError as error:  # another hospital's file this account may not read
                unreadable.append(f"{path}: {error.strerror or error}")
                continue
            if data.get("name") == name:
                found.append(path)
        if len(found) > 1:
            raise ConfigError(f"site '{name}' appears twice ({found[1]}): site names must be unique")
        if not found:
            listed = f"the {len(self.sites)} site configs" + (f" of {self._source}" if self._source else "")
            if not unreadable:
                raise ConfigError(f"site '{name}': none of {listed} is this site's")
            shown = "; ".join(unreadable[:3]) + ("; ..." if len(unreadable) > 3 else "")
            raise ConfigError(f"site '{name}': its config is not among those of {listed} that can be read here "
                              f"({len(unreadable)} cannot: {shown})")
        site = load_site_config(found[0])
        self._check_site(site)
        return site

    def _check_site(self, site: SiteConfig) -> None:
        if site.task != self.task:
            raise ConfigError(
                f"site '{site.name}' ({site.source_path}): its task is {site.task}, the experiment's is {self.task}"
            )
        missing = facts_for(self.task).missing_classes(site, self.classes)
        if missing:
            raise ConfigError(
                f"site '{site.name}' ({site.source_path}): its label_map does not cover class(es) "
                f"{', '.join(missing)} of the experiment"
            )

    def resolved(self) -> dict[str, Any]:
        """The config as plain data with absolute paths, as written to the run folder's config.yaml. A 2-D
        experiment's leaves out the 3-D keys (data.dims and its volumetric keys, the evaluation section): its
        config.yaml stays what it was before 3-D existed, so runs started earlier resume and compare equal."""
        dumped = self.model_dump(mode="json")
        if self.data.dims == 2:
            dumped["data"] = {k: v for k, v in dumped["data"].items() if k not in ("dims", *VOLUMETRIC_KEYS)}
            del dumped["evaluation"]
        return dumped


def load_experiment_config(path: str | Path, **overrides: Any) -> ExperimentConfig:
    """Read and validate an experiment config; `overrides` replace top-level keys (CLI options)."""
    path = Path(path)
    data = load_yaml_mapping(path)
    data.update({key: value for key, value in overrides.items() if value is not None})
    return validate_model(ExperimentConfig, data, path)
