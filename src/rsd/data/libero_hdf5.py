"""Writer, reader and validator for demonstrations in the official LIBERO HDF5 schema.

Layout (the keys of LIBERO's official dataset files)::

    data/                       attrs: env_name, problem_info (JSON: problem_name, domain_name,
                                       language_instruction), macros_image_convention, bddl_file_name,
                                       bddl_file_content, env_args (JSON: type, env_name, problem_name,
                                       bddl_file, env_kwargs), num_demos, total
        demo_0/                 attrs: num_samples, model_file (optional), init_state,
                                       init_state_index (rsd extra, optional)
            actions             [T, 7]  float64, OSC_POSE deltas in [-1, 1], gripper -1 open / +1 close
            states              [T, S]  float64, flattened MuJoCo state before each action
                                        (``env.sim.get_state().flatten()``; ``env.set_init_state`` takes it)
            robot_states        [T, 9]  gripper qpos (2), eef pos (3), eef quat xyzw (4)
            rewards             [T]
            dones               [T]     1 at the last step of a successful demo
            obs/
                ee_pos          [T, 3]
                ee_ori          [T, 3]  axis-angle of the eef quaternion
                ee_states       [T, 6]  ee_pos + ee_ori
                gripper_states  [T, 2]
                joint_states    [T, 7]
                agentview_rgb   [T, H, W, 3] uint8 (only with images; upside down, "opengl" convention)
                eye_in_hand_rgb [T, H, W, 3] uint8 (only with images)
        demo_1/ ...

rsd adds a few attributes of its own (all prefixed ``rsd_`` on ``data/``, plus ``init_state_index`` per
demo); none of them is required to read a file, so official LIBERO files are read unchanged.

Row ``t`` of every per-step array describes the same moment: the observation and state on which action
``t`` was taken. Files are named as LIBERO names them: ``{root}/{suite}/{task_name}_demo.hdf5``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Per-demo datasets every LIBERO demo carries (official files and ours).
REQUIRED_DEMO_KEYS = ("actions", "states", "obs")
LOW_DIM_OBS_KEYS = ("ee_pos", "ee_ori", "ee_states", "gripper_states", "joint_states")
IMAGE_OBS_KEYS = ("agentview_rgb", "eye_in_hand_rgb")
REQUIRED_DATA_ATTRS = ("problem_info", "env_args")
ACTION_DIM = 7


class DemoSchemaError(ValueError):
    """A file is not a LIBERO demonstration file; the message names the first problem and the fix."""


@dataclass
class Episode:
    """One demonstration. Per-step arrays share their first dimension ``T``."""

    actions: np.ndarray  # [T, 7]
    states: np.ndarray  # [T, S]
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    robot_states: np.ndarray | None = None  # [T, 9]
    rewards: np.ndarray | None = None  # [T]
    dones: np.ndarray | None = None  # [T]
    init_state: np.ndarray | None = None  # defaults to states[0]
    init_state_index: int | None = None  # which of the task's fixed init states it started from
    model_file: str | None = None
    name: str = ""  # "demo_i" once written / read
    attrs: dict[str, Any] = field(default_factory=dict)  # any other per-demo attributes

    @property
    def num_samples(self) -> int:
        return int(self.actions.shape[0])

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float64)
        self.states = np.asarray(self.states, dtype=np.float64)
        if self.init_state is None and self.states.shape[0] > 0:
            self.init_state = self.states[0].copy()


@dataclass
class DemoFile:
    """A LIBERO demonstration file, read eagerly (images included unless ``load_images=False``)."""

    path: Path
    language: str  # the task's language instruction (benchmark wording; see read_demo_file)
    bddl_language: str  # problem_info["language_instruction"] as written in the BDDL file
    bddl_file: str
    env_name: str
    problem_info: dict[str, Any]
    env_args: dict[str, Any]
    attrs: dict[str, Any]  # every attribute of data/, JSON strings decoded
    episodes: list[Episode]

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def num_demos(self) -> int:
        return len(self.episodes)

    @property
    def total(self) -> int:
        return int(sum(ep.num_samples for ep in self.episodes))

    @property
    def suite(self) -> str | None:
        return self.attrs.get("rsd_suite")

    @property
    def task_name(self) -> str:
        name = self.attrs.get("rsd_task_name")
        return str(name) if name else _task_name_from_path(self.path)


def demo_path(root: str | os.PathLike, suite: str, task_name: str) -> Path:
    """Where LIBERO keeps a task's demos: ``{root}/{suite}/{task_name}_demo.hdf5``."""
    return Path(root) / suite / f"{task_name}_demo.hdf5"


def _task_name_from_path(path: str | os.PathLike) -> str:
    stem = Path(path).name
    for suffix in (".hdf5", ".h5"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem[: -len("_demo")] if stem.endswith("_demo") else stem


def _language_from_problem_info(problem_info: dict) -> str:
    lang = problem_info.get("language_instruction", "")
    if isinstance(lang, list | tuple):  # some LIBERO versions store a list of words/characters
        lang = "".join(lang) if all(len(str(c)) <= 1 for c in lang) else " ".join(map(str, lang))
    return str(lang).strip().strip('"')


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.shape == ():
        value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _decode_json(value: Any, key: str, path: Path) -> dict:
    value = _decode(value)
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise DemoSchemaError(
            f"{path}: attribute data.attrs['{key}'] is not valid JSON ({exc}). LIBERO files store it as a "
            "JSON string; regenerate the file with rsd.data.libero_hdf5.write_demo_file."
        ) from exc
    if not isinstance(out, dict):
        raise DemoSchemaError(f"{path}: data.attrs['{key}'] must be a JSON object, got {type(out).__name__}.")
    return out


def _demo_names(data_group) -> list[str]:
    names = [k for k in data_group.keys() if k.startswith("demo_")]

    def order(name: str) -> tuple[int, str]:
        suffix = name[len("demo_") :]
        return (int(suffix), name) if suffix.isdigit() else (1 << 30, name)

    return sorted(names, key=order)


def _controller_config() -> dict:
    try:
        import robosuite

        return dict(robosuite.load_controller_config(default_controller="OSC_POSE"))
    except Exception:  # robosuite missing: record the controller by name only
        return {"type": "OSC_POSE"}


def problem_info_from_bddl(bddl_text: str, fallback_language: str = "") -> dict[str, str]:
    """``problem_info`` as LIBERO's ``bddl_utils.get_problem_info`` computes it (lower-cased problem name
    and language), without importing LIBERO."""
    problem = re.search(r"\(\s*problem\s+([^\s()]+)", bddl_text, flags=re.IGNORECASE)
    language = re.search(r"\(\s*:language\s+([^()]*)\)", bddl_text, flags=re.IGNORECASE)
    return {
        "problem_name": problem.group(1).lower() if problem else "libero_tabletop_manipulation",
        "domain_name": "robosuite",
        "language_instruction": " ".join(language.group(1).lower().split()) if language else fallback_language,
    }


def make_env_kwargs(bddl_file: str, images: bool, resolution: int = 256) -> dict:
    """The env kwargs recorded in ``env_args`` (what rsd.envs.libero_env.make_env builds)."""
    return {
        "robots": ["Panda"],
        "controller_configs": _controller_config(),
        "bddl_file_name": bddl_file,
        "has_renderer": False,
        "has_offscreen_renderer": bool(images),
        "ignore_done": False,
        "use_camera_obs": bool(images),
        "camera_depths": False,
        "camera_names": ["agentview", "robot0_eye_in_hand"],
        "reward_shaping": False,
        "control_freq": 20,
        "camera_heights": int(resolution),
        "camera_widths": int(resolution),
        "camera_segmentations": None,
    }


def write_demo_file(
    path: str | os.PathLike,
    task,
    episodes: Iterable[Episode],
    images: bool = False,
    *,
    resolution: int = 256,
    extra_attrs: dict[str, Any] | None = None,
    compression: str | None = None,
) -> Path:
    """Write ``episodes`` of ``task`` (a :class:`rsd.envs.libero_env.TaskSpec`) in the LIBERO schema.

    ``images`` controls whether ``obs/agentview_rgb`` and ``obs/eye_in_hand_rgb`` are written (episodes
    must then carry them). The file is written to a temporary name and renamed, so a crash never leaves
    a truncated file under the final name. Returns the path.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bddl_file = str(task.bddl_file)
    bddl_content = Path(bddl_file).read_text() if Path(bddl_file).exists() else ""
    problem_info = problem_info_from_bddl(bddl_content, fallback_language=task.language)
    env_kwargs = make_env_kwargs(bddl_file, images, resolution)
    env_name = "_".join(p.capitalize() for p in problem_info["problem_name"].split("_"))
    try:
        import robosuite.macros as macros

        convention = macros.IMAGE_CONVENTION
    except Exception:
        convention = "opengl"

    tmp = path.with_name(path.name + ".tmp")
    total = 0
    n_demos = 0
    try:
        with h5py.File(tmp, "w") as f:
            grp = f.create_group("data")
            grp.attrs["env_name"] = env_name
            grp.attrs["problem_info"] = json.dumps(problem_info)
            grp.attrs["macros_image_convention"] = convention
            grp.attrs["bddl_file_name"] = bddl_file
            grp.attrs["bddl_file_content"] = bddl_content
            grp.attrs["env_args"] = json.dumps(
                {
                    "type": 1,
                    "env_name": env_name,
                    "problem_name": problem_info["problem_name"],
                    "bddl_file": bddl_file,
                    "env_kwargs": env_kwargs,
                }
            )
            grp.attrs["rsd_suite"] = task.suite
            grp.attrs["rsd_task_id"] = int(task.task_id)
            grp.attrs["task_id"] = int(task.task_id)  # read by rsd.data.action_chunks.task_ids_for_files
            grp.attrs["rsd_task_name"] = task.name
            grp.attrs["rsd_task_language"] = task.language
            grp.attrs["rsd_images"] = bool(images)
            for k, v in (extra_attrs or {}).items():
                grp.attrs[k] = json.dumps(v) if isinstance(v, dict | list) else v

            for i, ep in enumerate(episodes):
                _check_episode(ep, images, i)
                g = grp.create_group(f"demo_{i}")
                T = ep.num_samples
                g.create_dataset("actions", data=np.asarray(ep.actions, dtype=np.float64))
                g.create_dataset("states", data=np.asarray(ep.states, dtype=np.float64))
                if ep.robot_states is not None:
                    g.create_dataset("robot_states", data=np.asarray(ep.robot_states, dtype=np.float64))
                rewards = np.zeros(T) if ep.rewards is None else ep.rewards
                dones = np.zeros(T, dtype=np.uint8) if ep.dones is None else ep.dones
                g.create_dataset("rewards", data=np.asarray(rewards, dtype=np.uint8))
                g.create_dataset("dones", data=np.asarray(dones, dtype=np.uint8))
                og = g.create_group("obs")
                for key in LOW_DIM_OBS_KEYS:
                    og.create_dataset(key, data=np.asarray(ep.obs[key], dtype=np.float64))
                if images:
                    for key in IMAGE_OBS_KEYS:
                        og.create_dataset(key, data=np.asarray(ep.obs[key], dtype=np.uint8), compression=compression)
                for key, value in ep.obs.items():  # any further observations the episode carries
                    if key not in og and key not in IMAGE_OBS_KEYS:
                        og.create_dataset(key, data=np.asarray(value))
                g.attrs["num_samples"] = T
                g.attrs["init_state"] = np.asarray(ep.init_state if ep.init_state is not None else ep.states[0])
                if ep.init_state_index is not None:
                    g.attrs["init_state_index"] = int(ep.init_state_index)
                if ep.model_file is not None:
                    g.attrs["model_file"] = ep.model_file
                for k, v in ep.attrs.items():
                    g.attrs[k] = v
                total += T
                n_demos += 1
            grp.attrs["num_demos"] = n_demos
            grp.attrs["total"] = total
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def _check_episode(ep: Episode, images: bool, i: int) -> None:
    T = ep.num_samples
    if ep.actions.ndim != 2 or ep.actions.shape[1] != ACTION_DIM:
        raise DemoSchemaError(f"episode {i}: actions must be [T, {ACTION_DIM}], got {ep.actions.shape}.")
    if ep.states.shape[0] != T:
        raise DemoSchemaError(f"episode {i}: states has {ep.states.shape[0]} rows, actions {T}.")
    needed = LOW_DIM_OBS_KEYS + (IMAGE_OBS_KEYS if images else ())
    for key in needed:
        if key not in ep.obs:
            hint = " (collect with images=True)" if key in IMAGE_OBS_KEYS else ""
            raise DemoSchemaError(f"episode {i}: observation '{key}' is missing{hint}.")
        if np.asarray(ep.obs[key]).shape[0] != T:
            raise DemoSchemaError(f"episode {i}: obs '{key}' has {np.asarray(ep.obs[key]).shape[0]} rows, actions {T}.")


def _open_checked(path: Path):
    import h5py

    if not path.exists():
        raise DemoSchemaError(f"{path}: no such file. Collect demos with `python -m rsd.data.collect`.")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DemoSchemaError(
            f"{path}: not a readable HDF5 file ({exc}). It may be truncated; delete it and collect again."
        ) from exc
    if "data" not in f:
        keys = list(f.keys())
        f.close()
        raise DemoSchemaError(
            f"{path}: missing top-level group 'data' (found {keys}). This is not a LIBERO demo file; "
            "LIBERO files have data/demo_i/{actions,states,obs}. Convert it with "
            "rsd.data.libero_hdf5.write_demo_file or collect with `python -m rsd.data.collect`."
        )
    return f


def validate_demo_file(path: str | os.PathLike, require_images: bool = False) -> None:
    """Check that ``path`` follows the LIBERO demo schema; raise :class:`DemoSchemaError` otherwise.

    Returns None when the file is valid (see :func:`summarize_demo_file` for its contents). Only what
    every LIBERO demo file has is required (our ``rsd_*``/``init_state_index`` attributes are optional),
    so official files validate unchanged.
    """
    summarize_demo_file(path, require_images)


def summarize_demo_file(path: str | os.PathLike, require_images: bool = False) -> dict[str, Any]:
    """Validate ``path`` (as :func:`validate_demo_file`) and return a short summary: ``num_demos``,
    ``total``, ``state_dim``, ``images``, ``language``, ``env_name``."""
    path = Path(path)
    fix = (
        "Official LIBERO files and files from `python -m rsd.data.collect` have it; regenerate the file "
        "(delete it and rerun the collection) or convert it with rsd.data.libero_hdf5.write_demo_file."
    )
    with _open_checked(path) as f:
        data = f["data"]
        for key in REQUIRED_DATA_ATTRS:
            if key not in data.attrs:
                raise DemoSchemaError(f"{path}: missing attribute data.attrs['{key}']. {fix}")
        problem_info = _decode_json(data.attrs["problem_info"], "problem_info", path)
        env_args = _decode_json(data.attrs["env_args"], "env_args", path)
        if "language_instruction" not in problem_info:
            raise DemoSchemaError(f"{path}: data.attrs['problem_info'] has no 'language_instruction'. {fix}")
        names = _demo_names(data)
        if not names:
            raise DemoSchemaError(f"{path}: no demo_i groups under 'data'. {fix}")
        total = 0
        state_dim = None
        images = True
        for name in names:
            demo = data[name]
            where = f"{path}: data/{name}"
            for key in REQUIRED_DEMO_KEYS:
                if key not in demo:
                    raise DemoSchemaError(f"{where}: missing '{key}'. {fix}")
            actions = demo["actions"]
            if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
                raise DemoSchemaError(f"{where}/actions: expected shape [T, {ACTION_DIM}], got {actions.shape}.")
            T = actions.shape[0]
            for key in ("states", "robot_states", "rewards", "dones"):
                if key in demo and demo[key].shape[0] != T:
                    raise DemoSchemaError(f"{where}/{key}: {demo[key].shape[0]} rows, but actions has {T}.")
            if state_dim is None:
                state_dim = int(demo["states"].shape[1]) if demo["states"].ndim == 2 else None
            obs = demo["obs"]
            for key in LOW_DIM_OBS_KEYS:
                if key not in obs:
                    raise DemoSchemaError(f"{where}/obs: missing '{key}'. {fix}")
                if obs[key].shape[0] != T:
                    raise DemoSchemaError(f"{where}/obs/{key}: {obs[key].shape[0]} rows, but actions has {T}.")
            has_images = all(k in obs for k in IMAGE_OBS_KEYS)
            images = images and has_images
            if require_images and not has_images:
                missing = [k for k in IMAGE_OBS_KEYS if k not in obs][0]
                raise DemoSchemaError(
                    f"{where}/obs: missing '{missing}'. This file was collected without images; collect "
                    "with `python -m rsd.data.collect images=true` for image-based training."
                )
            if "num_samples" in demo.attrs and int(demo.attrs["num_samples"]) != T:
                raise DemoSchemaError(f"{where}: attrs['num_samples']={int(demo.attrs['num_samples'])} != {T} rows.")
            total += T
        language = _file_language(path, data, problem_info)
    return {
        "path": str(path),
        "num_demos": len(names),
        "total": total,
        "state_dim": state_dim,
        "images": images,
        "language": language,
        "env_name": env_args.get("env_name"),
    }


def _file_language(path: Path, data, problem_info: dict) -> str:
    """The task's instruction: our recorded benchmark wording, else the one OpenVLA derives from the
    file name (``{task_name}_demo.hdf5`` with underscores as spaces), else the BDDL's wording."""
    if "rsd_task_language" in data.attrs:
        return str(_decode(data.attrs["rsd_task_language"]))
    if path.name.endswith("_demo.hdf5"):
        return _task_name_from_path(path).replace("_", " ")
    return _language_from_problem_info(problem_info)


def read_demo_file(
    path: str | os.PathLike, load_images: bool = True, demos: Sequence[int] | None = None
) -> DemoFile:
    """Read a LIBERO demo file (ours or official) after validating it.

    ``demos`` selects demo positions (in ``demo_i`` order); ``load_images=False`` skips the image
    arrays (fast for low-dim work).
    """
    path = Path(path)
    validate_demo_file(path)
    with _open_checked(path) as f:
        data = f["data"]
        attrs = {}
        for k, v in data.attrs.items():
            v = _decode(v)
            if k in ("problem_info", "env_args"):
                v = _decode_json(v, k, path)
            attrs[k] = v
        problem_info = attrs["problem_info"]
        env_args = attrs["env_args"]
        names = _demo_names(data)
        if demos is not None:
            names = [names[i] for i in demos]
        episodes = []
        for name in names:
            g = data[name]
            obs = {}
            for key in g["obs"].keys():
                if not load_images and key in IMAGE_OBS_KEYS:
                    continue
                obs[key] = g["obs"][key][()]
            ep_attrs = {k: _decode(v) for k, v in g.attrs.items()}
            init_state = ep_attrs.pop("init_state", None)
            idx = ep_attrs.pop("init_state_index", None)
            model_file = ep_attrs.pop("model_file", None)
            ep_attrs.pop("num_samples", None)
            episodes.append(
                Episode(
                    actions=g["actions"][()],
                    states=g["states"][()],
                    obs=obs,
                    robot_states=g["robot_states"][()] if "robot_states" in g else None,
                    rewards=g["rewards"][()] if "rewards" in g else None,
                    dones=g["dones"][()] if "dones" in g else None,
                    init_state=None if init_state is None else np.asarray(init_state, dtype=np.float64),
                    init_state_index=None if idx is None else int(idx),
                    model_file=model_file,
                    name=name,
                    attrs=ep_attrs,
                )
            )
        language = _file_language(path, data, problem_info)
    return DemoFile(
        path=path,
        language=language,
        bddl_language=_language_from_problem_info(problem_info),
        bddl_file=str(attrs.get("bddl_file_name", env_args.get("bddl_file", ""))),
        env_name=str(attrs.get("env_name", env_args.get("env_name", ""))),
        problem_info=problem_info,
        env_args=env_args,
        attrs=attrs,
        episodes=episodes,
    )
