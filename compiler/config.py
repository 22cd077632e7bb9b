"""`CompressionConfig`: every knob of `compress`, validated, with a JSON round-trip (saved beside the
checkpoint so a run can be reproduced and resumed)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from procrustes_onnx.errors import UserError

__all__ = ["CompressionConfig", "PRESETS", "ROLES", "STRUCTURES"]

#: the paper's fixed configurations: name -> fraction of each compressed matrix KEPT
PRESETS = {"3/4": 0.75, "5/8": 0.625, "1/2": 0.5}
ROLES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "head")
STRUCTURES = ("kron", "gs", "dense")
ROTATIONS = ("global", "per-position")
METHODS = ("frobenius", "weighted", "slicegpt")
BALANCES = ("relative", "paper", "none")


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
    compress_embeddings: bool = False
    rotation: str = "global"
    method: str = "weighted"
    iterations: int = 50                                        # Frobenius ALS iterations (paper: 50)
    tol: float = 1e-5                                           # ALS early stop on relative decrease
    weighted_outer: int = 1                                     # paper: project, solve R, project
    rotation_iters: int = 100                                   # Riemannian steps per R solve
    balance: str = "relative"
    token_weighting: str = "sqrt"
    calib_text: str = "kjv"
    calib_samples: int = 32
    calib_seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the bad field and the fix."""
        if (self.ratio is None) == (self.preset is None):
            raise UserError("set exactly one of --ratio (fraction of parameters removed) and --preset "
                            f"({', '.join(PRESETS)})")
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
        _choice("rotation", self.rotation, ROTATIONS)
        _choice("method", self.method, METHODS)
        _choice("balance", self.balance, BALANCES)
        _choice("token weighting", self.token_weighting, ("sqrt", "log"))
        for name in ("iterations", "calib_samples", "calib_seq_len", "rotation_iters"):
            if int(getattr(self, name)) < (0 if name == "iterations" else 1):
                raise UserError(f"{name} = {getattr(self, name)} must be positive")
        if self.calib_samples * self.calib_seq_len > 128 * 2048:
            raise UserError("calibration is capped at the paper's 128 x 2048 tokens: lower --calib-samples or "
                            "--calib-seq-len")

    def structure_of(self, role: str, layer: int | None = None) -> str:
        """'kron', 'gs' or 'dense' for one matrix."""
        if role in self.dense_roles or (layer is not None and layer in self.dense_layers):
            return "dense"
        if role in ("embed", "head") and not self.compress_embeddings:
            return "dense"
        return self.structures.get(role, self.structure)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown compression settings {unknown}: remove them (known: {sorted(known)})")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "CompressionConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg}): fix or delete it") from None


def _choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
