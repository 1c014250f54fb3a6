"""``sim_state``: privileged simulator state mapped to a D-dimensional hidden state by a fixed transform.

Needs no weights and no rendering, so features (and closed-loop evaluation) run on a CPU.

Raw feature vector (``SimStateBackbone.feature_names`` lists every entry), from one LIBERO observation:

- proprio: ``robot0_eef_pos`` (3), end-effector orientation as the first two columns of its rotation
  matrix (6; continuous, unlike a quaternion's sign), ``robot0_gripper_qpos`` (2), ``robot0_joint_pos`` (7)
  and, with ``include_velocity``, ``robot0_joint_vel`` (7) and ``robot0_gripper_qvel`` (2);
- objects of interest of the task (LIBERO's ``obj_of_interest``, e.g. the bowl to pick and the plate):
  position (3), rotation (6) and position relative to the end effector (3) each, and the offset from the
  first to the second (3);
- every object in object-state order (the order of the ``<obj>_pos`` keys in the observation, recorded per
  task), padded to ``max_objects`` slots: position (3), rotation (6), position relative to the end
  effector (3) and a presence flag (1);
- task identity: a fixed ``task_embed_dim``-d Gaussian vector seeded by the SHA-256 of the normalised
  instruction;
- with ``include_time``: ``obs["timestep"]`` (steps since the episode start) / ``time_scale``.

Transform: ``z = (raw - mean) / std`` with per-feature statistics computed once from the training demos
(``fit``), then ``hidden = [z @ W (linear_dim) | sqrt(2) cos(f * z_j + phi) for every feature j and
axis_freqs frequencies f | sqrt(2) cos(z @ Omega + b) (the remaining dims, random Fourier features of
bandwidth rff_scale)]``. ``W``, ``f``, ``phi``, ``Omega``, ``b`` come from ``numpy.random.RandomState(seed)``
(a stream NumPy keeps stable). ``config()`` records everything needed to rebuild the transform (seed,
dims, statistics, per-task object order), and ``transform_digest`` hashes the generated matrices so a
rebuilt backbone can be checked against the cache manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rsd.models.backbones.base import Backbone, BackboneError

VERSION = 1


def normalize_instruction(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().lower())


def quat_to_rot6(quat_xyzw: np.ndarray) -> np.ndarray:
    """robosuite quaternion ``(x, y, z, w)`` -> the first two columns of the rotation matrix (6)."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64) / max(float(np.linalg.norm(quat_xyzw)), 1e-12)
    return np.array([
        1 - 2 * (y * y + z * z), 2 * (x * y + z * w), 2 * (x * z - y * w),
        2 * (x * y - z * w), 1 - 2 * (x * x + z * z), 2 * (y * z + x * w),
    ])


def task_embedding(instruction: str, dim: int) -> np.ndarray:
    """Fixed Gaussian vector for an instruction (seeded by the SHA-256 of its normalised text)."""
    digest = hashlib.sha256(normalize_instruction(instruction).encode()).digest()
    return np.random.RandomState(int.from_bytes(digest[:4], "little")).standard_normal(dim)


def object_names(obs: Mapping[str, Any]) -> list[str]:
    """Objects of an observation in object-state order (``<obj>_pos`` keys, robot keys excluded)."""
    return [k[:-4] for k in obs if k.endswith("_pos") and not k.startswith("robot0_") and "_to_" not in k]


def describe_task(env, obs: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """``{"objects": object-state order, "interest": obj_of_interest}`` of a LIBERO env."""
    inner = getattr(env, "env", env)
    objects = object_names(obs) if obs is not None else list(getattr(inner, "objects_dict", {}).keys())
    interest = [str(o) for o in getattr(inner, "obj_of_interest", [])]
    return {"objects": objects, "interest": interest}


class SimStateBackbone(Backbone):
    """Privileged proprio + object poses + task identity -> ``[B, hidden_dim]`` (see module docstring)."""

    name = "sim_state"
    needs_images = False

    def __init__(self, hidden_dim: int = 4096, seed: int = 0, linear_dim: int = 1024, axis_freqs: int = 6,
                 axis_freq_range: Sequence[float] = (0.5, 16.0), rff_scale: float = 4.0,
                 task_embed_dim: int = 16, max_objects: int = 8, num_interest: int = 2,
                 include_velocity: bool = True, include_time: bool = False, time_scale: float = 100.0,
                 task_objects: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 version: int = VERSION, transform_digest: str | None = None) -> None:
        if version != VERSION:
            raise BackboneError(f"sim_state feature version {version} is not supported (this code: {VERSION})")
        self._hidden_dim = int(hidden_dim)
        self.seed = int(seed)
        self.linear_dim = int(linear_dim)
        self.axis_freqs = int(axis_freqs)
        self.axis_freq_range = (float(axis_freq_range[0]), float(axis_freq_range[1]))
        self.rff_scale = float(rff_scale)
        self.task_embed_dim = int(task_embed_dim)
        self.max_objects = int(max_objects)
        self.num_interest = int(num_interest)
        self.include_velocity = bool(include_velocity)
        self.include_time = bool(include_time)
        self.time_scale = float(time_scale)
        self.task_objects: dict[str, dict[str, list[str]]] = {}
        for instr, spec in (task_objects or {}).items():
            self.set_task_objects(instr, spec["objects"], spec.get("interest", []))
        self.feature_names = self._feature_names()
        d = len(self.feature_names)
        self.rff_dim = self._hidden_dim - self.linear_dim - d * self.axis_freqs
        if self.linear_dim < 0 or self.rff_dim < 0:
            raise BackboneError(
                f"sim_state: hidden_dim {hidden_dim} is too small for linear_dim {linear_dim} + "
                f"{d} features x {axis_freqs} axis frequencies")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)
        for label, arr in (("mean", self.mean), ("std", self.std)):
            if arr is not None and arr.shape != (d,):
                raise BackboneError(f"sim_state: {label} has {arr.shape[0]} entries, the features have {d}")
        self._build_transform()
        if transform_digest is not None and transform_digest != self.transform_digest:
            raise BackboneError("sim_state: the rebuilt transform does not match the recorded digest "
                                f"({self.transform_digest} != {transform_digest}); NumPy's RandomState stream "
                                "or the feature layout changed")

    # ------------------------------------------------------------------ identity
    @property
    def hidden_dim(self) -> int:
        return self._hidden_dim

    #: constructor arguments that fix the feature layout and the transform (part of ``backbone_id``)
    STRUCTURE = {"hidden_dim": 4096, "seed": 0, "linear_dim": 1024, "axis_freqs": 6,
                 "axis_freq_range": [0.5, 16.0], "rff_scale": 4.0, "task_embed_dim": 16, "max_objects": 8,
                 "num_interest": 2, "include_velocity": True, "include_time": False, "time_scale": 100.0}

    @classmethod
    def id_from_config(cls, cfg: Mapping[str, Any]) -> str:
        structure = {}
        for k, default in cls.STRUCTURE.items():
            v = cfg.get(k, default)
            structure[k] = ([float(x) for x in v] if isinstance(default, list) else type(default)(v))
        digest = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:8]
        return f"sim_state-v{VERSION}-d{int(structure['hidden_dim'])}-seed{int(structure['seed'])}-{digest}"

    @property
    def backbone_id(self) -> str:
        return self.id_from_config({k: getattr(self, k if k != "hidden_dim" else "_hidden_dim")
                                    for k in self.STRUCTURE})

    @property
    def feature_definition(self) -> str:
        return (f"sim_state v{VERSION}: {len(self.feature_names)} privileged state features (proprio, "
                f"{self.num_interest} objects of interest, {self.max_objects} object slots in object-state "
                f"order, {self.task_embed_dim}-d instruction hash embedding"
                f"{', timestep' if self.include_time else ''}), standardised with training-demo statistics, "
                f"mapped to {self._hidden_dim} dims by [linear {self.linear_dim} | axis Fourier "
                f"{len(self.feature_names)}x{self.axis_freqs} | RFF {self.rff_dim} (scale {self.rff_scale})], "
                f"RandomState seed {self.seed}")

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": VERSION, "hidden_dim": self._hidden_dim, "seed": self.seed,
            "linear_dim": self.linear_dim, "axis_freqs": self.axis_freqs,
            "axis_freq_range": list(self.axis_freq_range), "rff_scale": self.rff_scale,
            "task_embed_dim": self.task_embed_dim, "max_objects": self.max_objects,
            "num_interest": self.num_interest, "include_velocity": self.include_velocity,
            "include_time": self.include_time, "time_scale": self.time_scale,
            "task_objects": {k: {"objects": list(v["objects"]), "interest": list(v["interest"])}
                             for k, v in self.task_objects.items()},
            "mean": None if self.mean is None else [float(x) for x in self.mean],
            "std": None if self.std is None else [float(x) for x in self.std],
            "transform_digest": self.transform_digest,
        }

    # ------------------------------------------------------------------ tasks and raw features
    def set_task_objects(self, instruction: str, objects: Sequence[str], interest: Sequence[str]) -> None:
        """Record a task's object-state order and objects of interest (done once, by the cache builder)."""
        objects, interest = [str(o) for o in objects], [str(o) for o in interest]
        if len(objects) > self.max_objects:
            raise BackboneError(f"sim_state: task {instruction!r} has {len(objects)} objects, "
                                f"max_objects is {self.max_objects}")
        if len(interest) > self.num_interest:
            interest = interest[: self.num_interest]
        self.task_objects[normalize_instruction(instruction)] = {"objects": objects, "interest": interest}

    def _feature_names(self) -> list[str]:
        rot = [f"r{i}" for i in range(6)]
        names = [f"eef_pos.{a}" for a in "xyz"] + [f"eef_rot.{r}" for r in rot]
        names += ["gripper_qpos.0", "gripper_qpos.1"] + [f"joint_pos.{i}" for i in range(7)]
        if self.include_velocity:
            names += [f"joint_vel.{i}" for i in range(7)] + ["gripper_qvel.0", "gripper_qvel.1"]
        for k in range(self.num_interest):
            names += [f"interest{k}.pos.{a}" for a in "xyz"] + [f"interest{k}.rot.{r}" for r in rot]
            names += [f"interest{k}.rel_eef.{a}" for a in "xyz"]
        if self.num_interest >= 2:
            names += [f"interest1_minus_interest0.{a}" for a in "xyz"]
        for k in range(self.max_objects):
            names += [f"obj{k}.pos.{a}" for a in "xyz"] + [f"obj{k}.rot.{r}" for r in rot]
            names += [f"obj{k}.rel_eef.{a}" for a in "xyz"] + [f"obj{k}.present"]
        names += [f"task_embed.{i}" for i in range(self.task_embed_dim)]
        if self.include_time:
            names += ["timestep"]
        return names

    def _task(self, obs: Mapping[str, Any], instruction: str) -> dict[str, list[str]]:
        key = normalize_instruction(instruction)
        if key in self.task_objects:
            return self.task_objects[key]
        if self.task_objects:
            raise BackboneError(f"sim_state: unknown task instruction {instruction!r}; this backbone was fitted "
                                f"on {len(self.task_objects)} tasks: {sorted(self.task_objects)}")
        return {"objects": object_names(obs), "interest": []}

    @staticmethod
    def _get(obs: Mapping[str, Any], key: str, size: int) -> np.ndarray:
        if key not in obs:
            raise BackboneError(f"sim_state: observation has no {key!r} (keys: {sorted(obs)[:12]}...)")
        val = np.asarray(obs[key], dtype=np.float64).reshape(-1)
        if val.shape[0] != size:
            raise BackboneError(f"sim_state: observation {key!r} has {val.shape[0]} values, expected {size}")
        if not np.all(np.isfinite(val)):
            raise BackboneError(f"sim_state: observation {key!r} is not finite: {val}")
        return val

    def raw_features(self, obs: Mapping[str, Any], instruction: str) -> np.ndarray:
        """One observation -> the raw (unstandardised) feature vector ``[len(feature_names)]``."""
        task = self._task(obs, instruction)
        eef = self._get(obs, "robot0_eef_pos", 3)
        parts = [eef, quat_to_rot6(self._get(obs, "robot0_eef_quat", 4)),
                 self._get(obs, "robot0_gripper_qpos", 2), self._get(obs, "robot0_joint_pos", 7)]
        if self.include_velocity:
            parts += [self._get(obs, "robot0_joint_vel", 7), self._get(obs, "robot0_gripper_qvel", 2)]

        def pose(name: str) -> tuple[np.ndarray, np.ndarray]:
            return self._get(obs, f"{name}_pos", 3), quat_to_rot6(self._get(obs, f"{name}_quat", 4))

        interest_pos = []
        for k in range(self.num_interest):
            if k < len(task["interest"]):
                pos, rot = pose(task["interest"][k])
                parts += [pos, rot, pos - eef]
                interest_pos.append(pos)
            else:
                parts.append(np.zeros(12))
                interest_pos.append(np.zeros(3))
        if self.num_interest >= 2:
            parts.append(interest_pos[1] - interest_pos[0])
        objects = task["objects"]
        if len(objects) > self.max_objects:
            raise BackboneError(f"sim_state: {len(objects)} objects in the scene, max_objects={self.max_objects}")
        for k in range(self.max_objects):
            if k < len(objects):
                pos, rot = pose(objects[k])
                parts += [pos, rot, pos - eef, np.ones(1)]
            else:
                parts.append(np.zeros(13))
        parts.append(task_embedding(instruction, self.task_embed_dim))
        if self.include_time:
            if "timestep" not in obs:
                raise BackboneError("sim_state with include_time needs obs['timestep'] (steps since the "
                                    "episode start); the rollout loop must set it")
            parts.append(np.array([float(obs["timestep"]) / self.time_scale]))
        return np.concatenate(parts)

    # ------------------------------------------------------------------ statistics and transform
    def fit(self, raw: np.ndarray, min_std: float = 1e-3) -> SimStateBackbone:
        """Per-feature mean/std of training-demo raw features ``[N, d]`` (constant features keep std 1)."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.feature_names) or raw.shape[0] < 2:
            raise BackboneError(f"sim_state.fit expects [N>=2, {len(self.feature_names)}], got {raw.shape}")
        self.mean = raw.mean(0)
        std = raw.std(0)
        self.std = np.where(std < min_std, np.where(std < 1e-9, 1.0, min_std), std)
        return self

    @property
    def fitted(self) -> bool:
        return self.mean is not None and self.std is not None

    def _build_transform(self) -> None:
        d = len(self.feature_names)
        rs = np.random.RandomState(self.seed)
        w_lin = rs.standard_normal((d, self.linear_dim)) / math.sqrt(d)
        lo, hi = self.axis_freq_range
        freqs = np.exp(rs.uniform(math.log(lo), math.log(hi), size=(d, self.axis_freqs)))
        phase_axis = rs.uniform(0, 2 * math.pi, size=(d, self.axis_freqs))
        omega = rs.standard_normal((d, self.rff_dim)) / (self.rff_scale * math.sqrt(d) / 2)
        phase_rff = rs.uniform(0, 2 * math.pi, size=self.rff_dim)
        h = hashlib.sha256()
        for arr in (w_lin, freqs, phase_axis, omega, phase_rff):
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
        self.transform_digest = h.hexdigest()[:16]
        self._w_lin = torch.from_numpy(w_lin).float()
        self._freqs = torch.from_numpy(freqs).float()
        self._phase_axis = torch.from_numpy(phase_axis).float()
        self._omega = torch.from_numpy(omega).float()
        self._phase_rff = torch.from_numpy(phase_rff).float()

    def standardize(self, raw: np.ndarray) -> torch.Tensor:
        if not self.fitted:
            raise BackboneError("sim_state: no standardisation statistics; build the feature cache (which "
                                "fits them on the training demos) or load the backbone from a cache manifest")
        return torch.from_numpy((np.asarray(raw, dtype=np.float64) - self.mean) / self.std).float()

    def transform(self, raw: np.ndarray) -> torch.Tensor:
        """Raw features ``[B, d]`` -> hidden states ``[B, hidden_dim]`` (float32)."""
        z = self.standardize(raw)
        sqrt2 = math.sqrt(2.0)
        lin = z @ self._w_lin
        axis = sqrt2 * torch.cos(z[:, :, None] * self._freqs + self._phase_axis).flatten(1)
        rff = sqrt2 * torch.cos(z @ self._omega + self._phase_rff)
        return torch.cat([lin, axis, rff], dim=1)

    def encode(self, observations: list[dict], instructions: list[str]) -> torch.Tensor:
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        raw = np.stack([self.raw_features(o, i) for o, i in zip(observations, instructions, strict=True)])
        return self.transform(raw)
