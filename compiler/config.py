"""`CompressionConfig`: every knob of `compress`, validated, with a JSON round-trip (saved beside the
checkpoint so a run can be reproduced and resumed)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from procrustes_onnx.core.errors import UserError

from .fanout import Fanout

__all__ = ["CompressionConfig", "PRESETS", "ROLES", "STRUCTURES", "result_settings"]

#: the paper's fixed configurations: name -> fraction of each compressed matrix KEPT
PRESETS = {"3/4": 0.75, "5/8": 0.625, "1/2": 0.5, "full": 1.0}  # "full": exact (lossless), for checks
EMBED_KEPT = 0.75    # default kept share of the token embedding with --compress-embeddings
ROLES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "head")
STRUCTURES = ("kron", "gs", "dense")
ROTATIONS = ("global", "per-position")
METHODS = ("frobenius", "weighted", "slicegpt")
DEVICES = ("cpu", "cuda")
BALANCES = ("relative", "paper", "none")
ALLOCATIONS = ("middle", "first", "last", "measured")
#: with --max-loss the rotation is solved for a uniform plan removing this share; the search then moves
#: the removal over the measured ladder at that rotation
MAX_LOSS_ROTATION_RATIO = 0.1


@dataclass
class CompressionConfig:
    """What to compress and how.

    ``ratio``: fraction of the model's parameters REMOVED, counted as the exported file stores them
    (skip matrices and all dense remainders included); or ``preset`` (one of PRESETS, per-matrix kept
    fraction as in the paper). Exactly one of them is set.
    """

    structure: str = "kron"
    ratio: float | None = 0.2
    preset: str | None = None
    structures: dict[str, str] = field(default_factory=dict)   # per-role overrides, e.g. {"down": "gs"}
    dense_roles: list[str] = field(default_factory=lambda: ["v"])
    dense_layers: list[int] = field(default_factory=list)      # layers whose linears stay dense
    kept: dict[str, float] = field(default_factory=dict)       # per-role fixed kept fraction, e.g. {"q": 0.375};
                                                                # --ratio is then met by the other roles
    compress_embeddings: bool = False                           # low-rank token embedding (and tied head),
                                                                # kept share kept["embed"] or EMBED_KEPT
    rotation: str = "global"
    method: str = "weighted"
    iterations: int = 50                                        # Frobenius ALS iterations (paper: 50)
    tol: float = 1e-5                                           # ALS early stop on relative decrease
    weighted_outer: int = 1                                     # paper: project, solve R, project
    rotation_iters: int = 100                                   # Riemannian steps per R solve
    balance: str = "relative"
    token_weighting: str = "sqrt"
    calib_text: str = "mix"                                     # modern prose: 5.6x lower W-GS PPL than KJV
    calib_samples: int = 32
    calib_seq_len: int = 512
    damp: float = 0.01                                          # Gram += damp * mean(diag) I (as SliceGPT)
    seed: int = 0
    kron_q: int | None = 8                                      # slabs of the hidden side (None: search)
    allocation: str = "middle"                                  # which layers shrink first to hit --ratio;
                                                                # "measured": kept shares by estimated loss
    max_loss: float | None = None                               # largest removal whose held-out perplexity
                                                                # stays within (1 + max_loss) x dense
    heldout_samples: int = 8                                    # held-out windows of the calibration text
    kron_split: str = "input"                                   # slab side: "input" (weighting acts there) or
                                                                # "hidden" (the paper: the rotated side)
    refine: str = "none"                                        # after the solve: "sequential" re-fits each
                                                                # linear on the compressed model's inputs,
                                                                # "corrected" also targets the dense output
    # how to run, not what to compute (the result is bitwise the same): left out of equality and settings()
    workers: int = field(default=1, compare=False)              # independent solves at once (> 1: on Ray)
    ray_address: str | None = field(default=None, compare=False)  # a Ray cluster to run them on
    stream: bool = field(default=False, compare=False)          # read the model one layer at a time (same tensors)
    device: str = field(default="cpu", compare=False)           # where Gram sums and solves run; cuda: the same
                                                                # float64 math, rounded differently

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the bad field and the fix."""
        if self.max_loss is not None:
            if self.ratio is not None or self.preset is not None:
                raise UserError("--max-loss and --ratio/--preset both given: pass one (--max-loss finds the removal "
                                "itself)")
            if not 0.0 <= float(self.max_loss) < 10.0:
                raise UserError(f"--max-loss {self.max_loss} is outside [0, 10): it is the allowed rise of held-out "
                                "perplexity over dense, e.g. 0.1 for 10%")
            if self.method != "weighted":
                raise UserError(f"--max-loss needs calibration statistics: use it with --method weighted, not "
                                f"{self.method}")
        elif (self.ratio is None) == (self.preset is None):
            raise UserError("set exactly one of --ratio (fraction of parameters removed), --preset "
                            f"({', '.join(PRESETS)}) and --max-loss")
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.ratio is not None and not 0.0 < float(self.ratio) < 0.9:
            raise UserError(f"--ratio {self.ratio} is outside (0, 0.9): it is the fraction of parameters removed")
        _choice("structure", self.structure, STRUCTURES[:2])
        for role, s in self.structures.items():
            _choice(f"structure of {role}", role, ROLES)
            _choice(f"structure of {role}", s, STRUCTURES)
        for role in self.dense_roles:
            _choice("dense role", role, ROLES)
        for role, frac in self.kept.items():
            _choice("kept role", role, ROLES)
            if not 0.0 < float(frac) <= 1.0:
                raise UserError(f"--kept {role}={frac} is outside (0, 1]: a kept fraction is the share of the "
                                "matrix's parameters kept")
        _choice("rotation", self.rotation, ROTATIONS)
        _choice("method", self.method, METHODS)
        _choice("balance", self.balance, BALANCES)
        _choice("allocation", self.allocation, ALLOCATIONS)
        if self.measured:
            if self.method != "weighted":
                raise UserError("--allocation measured needs calibration statistics: use it with --method weighted")
            if self.preset is not None:
                raise UserError("--allocation measured chooses kept shares itself: use --ratio or --max-loss, "
                                "not --preset")
            if self.refine != "none":
                raise UserError(f"--refine {self.refine} does not combine with measured allocation: drop one")
            if self.kept:
                raise UserError("--kept fixes shares by role, which measured allocation chooses: drop one")
        _choice("kron split", self.kron_split, ("input", "hidden"))
        check_device(self.device)
        if self.device == "cuda" and (int(self.workers) > 1 or self.ray_address):
            raise UserError("--device cuda solves in this process, one GPU (Ray workers are given none): drop "
                            "--workers/--ray-address, or use --device cpu")
        if "embed" in self.kept and not self.compress_embeddings:
            raise UserError("--kept embed=... needs --compress-embeddings (the embedding is dense otherwise)")
        if self.compress_embeddings and self.method == "slicegpt":
            raise UserError("--compress-embeddings does not apply to --method slicegpt (slicing already narrows the "
                            "table); drop one of them")
        if "head" in self.kept:
            raise UserError("--kept head=... is not supported: a tied head shares the embedding's factors, an "
                            "untied head stays dense; set embed=... with --compress-embeddings")
        _choice("refine", self.refine, ("none", "sequential", "corrected"))
        if self.refine != "none" and self.method != "weighted":
            raise UserError(f"--refine {self.refine} needs calibration: use it with --method weighted")
        _choice("token weighting", self.token_weighting, ("sqrt", "log"))
        for name, flag, least in (("iterations", "--iterations", 0), ("calib_samples", "--calib-samples", 1),
                                  ("heldout_samples", "--heldout-samples", 1),
                                  ("calib_seq_len", "--calib-seq-len", 2), ("rotation_iters", "rotation_iters", 1),
                                  ("workers", "--workers", 1)):
            if int(getattr(self, name)) < least:
                raise UserError(f"{flag} {getattr(self, name)} is too small: it must be at least {least}")
        if self.calib_samples * self.calib_seq_len > 128 * 2048:
            raise UserError("calibration is capped at the paper's 128 x 2048 tokens: lower --calib-samples or "
                            "--calib-seq-len")

    @property
    def measured(self) -> bool:
        """Whether kept shares come from the measured loss ladder (`--allocation measured`, `--max-loss`)."""
        return self.allocation == "measured" or self.max_loss is not None

    @property
    def plan_ratio(self) -> float | None:
        """The removal the uniform plan (and so the rotation) is built for."""
        return MAX_LOSS_ROTATION_RATIO if self.max_loss is not None else self.ratio

    def structure_of(self, role: str, layer: int | None = None) -> str:
        """'kron', 'gs' or 'dense' for one matrix."""
        if role in self.dense_roles or (layer is not None and layer in self.dense_layers):
            return "dense"
        if role in ("embed", "head") and not self.compress_embeddings:
            return "dense"
        return self.structures.get(role, self.structure)

    @property
    def fanout(self) -> Fanout:
        """Where the independent solves run (`compiler.fanout`)."""
        return Fanout(int(self.workers), self.ray_address)

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self) -> dict:
        """The fields that decide the result (not how it is run): what caches key on and checkpoints record."""
        return result_settings(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise UserError(f"compression settings must be a JSON object of name: value, not a {type(data).__name__}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown compression settings {unknown}: remove them (known: {sorted(known)})")
        try:
            return cls(**data)
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. "iterations": "many", "dense_layers": 3
            raise UserError(f"a compression setting has the wrong type ({exc}): fix the value in --config") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.settings(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "CompressionConfig":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--config {path} cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__}): "
                            "pass an existing CompressionConfig JSON file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg}): fix or delete it") from None
        return cls.from_dict(data)


def check_device(device: str) -> None:
    """``--device`` of compress and heal: cpu, or cuda where torch sees a GPU (refused in one line before any work,
    not at the first solve)."""
    _choice("device", device, DEVICES)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False): "
                        "use --device cpu, or a CUDA build of torch on a machine with a GPU")


def result_settings(config) -> dict:
    """A config dataclass's fields that decide its result: every field but those declared ``compare=False``
    (how it runs: workers, threads, device), which caches, resume checks and records leave out."""
    return {f.name: v for f, v in zip(fields(config), asdict(config).values()) if f.compare}


def _choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
