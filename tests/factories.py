"""Builders of small real data for the tests (not a test module): synthetic feature caches and a tiny engine
whose draft, main model and tokenizer are artifacts with a traceable lineage (rsd.utils.artifacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsd.data.cache import write_cache
from rsd.data.heldout import write_start_states
from rsd.data.splits import is_validation_episode
from rsd.models.backbones import requested_backbone_id
from rsd.utils.artifacts import artifact_ref, write_artifact

SUITE = "libero_spatial"


D = 64  # tiny hidden size for the synthetic caches
BACKBONE = {"name": "sim_state", "hidden_dim": D}
TOKENIZER_ID = "rfsq-test0000"


def _episode_keys(n_train: int, n_val: int, suite: str = "libero_spatial") -> list[tuple[str, int]]:
    """Demo keys with a known split (the shared rule decides; pick keys until both sides are filled)."""
    out, tr, va, i = [], 0, 0, 0
    while tr < n_train or va < n_val:
        key = f"{suite}/0/demo_{i}"
        if is_validation_episode(key):
            if va < n_val:
                out.append((key, 1))
                va += 1
        elif tr < n_train:
            out.append((key, 0))
            tr += 1
        i += 1
    return out


def make_tiny_cache(cache_dir: Path, n_train: int = 6, n_val: int = 2, length: int = 24, seed: int = 0,
                    tokenizer: str = TOKENIZER_ID, backbone: dict | None = None, classes: int | None = None) -> Path:
    """A learnable synthetic cache: tokens are a fixed function of the hidden state (``classes``: hidden
    states are noisy copies of that many prototypes, each with its own random token table)."""
    rng = np.random.default_rng(seed)
    backbone = backbone or BACKBONE
    keys = _episode_keys(n_train, n_val)
    n = len(keys) * length
    if classes:
        protos = np.random.default_rng(123).standard_normal((classes, backbone["hidden_dim"]))
        tables = np.random.default_rng(124).integers(0, 7, (classes, 8, 128)).astype(np.uint8)
        cls = rng.integers(0, classes, n)
        hidden = (protos[cls] + 0.3 * rng.standard_normal((n, backbone["hidden_dim"]))).astype(np.float16)
        tokens = tables[cls]
    else:
        hidden = rng.standard_normal((n, backbone["hidden_dim"])).astype(np.float16)
        proj = np.random.default_rng(123).standard_normal((backbone["hidden_dim"], 8 * 128))
        tokens = np.clip(np.round(hidden.astype(np.float64) @ proj / 8 + 3), 0, 6).astype(np.uint8).reshape(n, 8, 128)
    actions = rng.uniform(-1, 1, (n, 8, 7)).astype(np.float32)
    episode = np.repeat(np.arange(len(keys)), length)
    split = np.repeat([s for _, s in keys], length)
    manifest = {
        "backbone": {"name": backbone["name"], "id": requested_backbone_id(backbone),
                     "hidden_dim": backbone["hidden_dim"], "feature_definition": "synthetic", "config": backbone},
        "suite": "libero_spatial",
        "tasks": [{"task_id": 0, "name": "synthetic", "language": "do the thing"}],
        "episodes": [{"key": k, "split": "val" if s else "train"} for k, s in keys],
        "tokenizer": {"identity": tokenizer},
    }
    return write_cache(cache_dir, hidden, tokens, actions, episode, np.zeros(n, np.int16), split, manifest)


def generated_scenes(task_id: int, n: int, offset: float = 0.02) -> list[np.ndarray]:
    """``n`` start scenes of a task that are none of its official init states (every coordinate moved)."""
    from rsd.envs.libero_env import get_init_states

    official = get_init_states(SUITE, task_id)
    return [official[i] + offset for i in range(n)]


def write_generated_demos(folder: Path, suite: str = SUITE, n: int = 2) -> Path:
    """A LIBERO-schema demo file of task 0 whose ``n`` episodes started from generated scenes."""
    from rsd.data.libero_hdf5 import Episode, write_demo_file
    from rsd.envs.libero_env import get_task

    dims = {"ee_pos": 3, "ee_ori": 3, "ee_states": 6, "gripper_states": 2, "joint_states": 7}
    episodes = [Episode(actions=np.zeros((2, 7)), states=np.stack([scene] * 2), robot_states=np.zeros((2, 9)),
                        obs={k: np.zeros((2, d)) for k, d in dims.items()},
                        attrs={"rsd_init_source": "generated", "rsd_scene_state": scene, "rsd_scene_seed": i})
                for i, scene in enumerate(generated_scenes(0, n))]
    write_demo_file(folder / "task0_demo.hdf5", get_task(suite, 0), episodes,
                    extra_attrs={"rsd_init_source": "generated"})
    return folder


def tiny_engine_artifacts(root: Path, suite: str = SUITE) -> dict:
    """A sim_state backbone, RFSQ tokenizer, main decoder and draft (random weights) saved as the pipeline does:
    each in an artifact folder whose manifest names its inputs by content hash, down to a tiny feature cache
    whose episodes started from generated scenes (so an evaluation on the official states is held out)."""
    import torch
    import torch.nn.functional as F

    from rsd.models.backbones import build_backbone
    from rsd.models.checkpoint import save_draft_checkpoint
    from rsd.models.draft import RFSQDraftModelWithProjection
    from rsd.models.main_decoder import RFSQMainDecoder, save_main_decoder
    from rsd.tokenizer import RFSQTokenizer

    torch.manual_seed(0)
    bb = build_backbone("sim_state", hidden_dim=256, linear_dim=64, axis_freqs=1)
    bb.fit(np.random.default_rng(0).normal(size=(16, len(bb.feature_names))))
    tok = RFSQTokenizer(hidden_dim=32, mlp_depth=1)
    tok.normalizer.fit(np.random.default_rng(1).uniform(-0.5, 0.5, size=(64, 7)))
    tok_dir = root / "data" / "tokenizers" / f"rfsq_{suite}"
    tok_path = tok.save(tok_dir / "rfsq.pt")
    demos_dir = write_generated_demos(root / "data" / "demos" / suite, suite)
    demos_ref = artifact_ref(demos_dir, write_artifact(demos_dir, "demos"))
    tokenizer_ref = artifact_ref(tok_dir, write_artifact(tok_dir, "tokenizer", inputs={"demos": demos_ref}))
    identity = {"backbone_id": bb.backbone_id, "backbone_name": "sim_state", "hidden_dim": 256,
                "tokenizer": RFSQTokenizer.load(tok_path).identity(), "suite": suite,
                "backbone_config": bb.config()}
    cache_dir = root / "data" / "cache" / f"sim_state_{suite}"
    n_ep, length = 2, 4
    episodes = [{"key": f"{suite}/0/demo_{i}", "task_id": 0, "split": "val" if i == 0 else "train",
                 "init_source": "generated", "init_state_index": None} for i in range(n_ep)]
    write_cache(cache_dir, np.zeros((n_ep * length, 256), np.float16), np.zeros((n_ep * length, 8, 128), np.uint8),
                np.zeros((n_ep * length, 8, 7), np.float32), np.repeat(np.arange(n_ep), length),
                np.zeros(n_ep * length, np.int16), np.repeat([1, 0], length),
                {"backbone": {"name": "sim_state", "id": bb.backbone_id, "hidden_dim": 256, "config": bb.config()},
                 "suite": suite, "tasks": [], "episodes": episodes, "tokenizer": {"identity": identity["tokenizer"]}})
    write_start_states(cache_dir, episodes, generated_scenes(0, n_ep))
    cache_ref = artifact_ref(cache_dir, write_artifact(cache_dir, "cache", inputs={"tokenizer": tokenizer_ref}))
    main = RFSQMainDecoder(input_dim=256, d_model=32, num_blocks=1, num_heads=2, ff_dim=64)
    with torch.no_grad():  # a fixed level per (layer, position) leads by 20 logits: no near-ties, so strict
        # speculation must reproduce the baseline's tokens on any CPU (rounding is ~1e-6)
        levels = torch.randint(0, 7, (main.num_layers, main.num_positions), generator=torch.Generator().manual_seed(0))
        main.head_bias.copy_(20.0 * F.one_hot(levels, 7).float().reshape(main.num_layers, -1))
    main_dir = root / "data" / "models" / f"main_sim_state_{suite}"
    save_main_decoder(main, main_dir / "main_decoder.pt", data=identity)
    main_ref = artifact_ref(main_dir, write_artifact(main_dir, "main", inputs={"cache": cache_ref,
                                                                                 "tokenizer": tokenizer_ref}))
    draft_cfg = dict(input_dim=256, hidden_dim=32, feedforward_dim=64)
    draft = RFSQDraftModelWithProjection(**draft_cfg)
    run = root / "logs" / "draft_proj" / "runs" / "r1"
    save_draft_checkpoint(run / "best_draft_with_projection.pt", draft.state_dict(), None, 0, 0.5, draft_cfg,
                          cache_manifest=identity)
    write_artifact(run, "draft", files=["best_draft_with_projection.pt"],
                   inputs={"tokenizer": tokenizer_ref, "cache": cache_ref, "main": main_ref},
                   extra={"suite": suite, "metric": {"name": "val/accuracy", "value": 0.5}})
    return {"tokenizer": str(tok_path), "log_dir": str(root / "logs"), "main": str(main_dir / "main_decoder.pt"),
            "demos": str(demos_dir),
            "draft": str(run / "best_draft_with_projection.pt"), "cache": str(cache_dir)}
