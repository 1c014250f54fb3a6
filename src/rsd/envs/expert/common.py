"""What the scripted experts share: their gains and geometry, the goal parser, and rotation helpers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

#: World-frame end-effector orientation with the gripper pointing straight down at yaw 0
#: (the Panda's home orientation; the fingers close along the world y axis).
R_DOWN = np.diag([1.0, -1.0, -1.0])
ROBOT_PREFIXES = ("robot0_", "gripper0_", "mount0_")


class ExpertError(RuntimeError):
    """The task is not supported by the scripted expert (message says why)."""


@dataclass
class ExpertConfig:
    """Gains and geometry of the bowl pick-and-place expert (lengths in metres)."""

    kp: float = 20.0  # action per metre of position error (action 1 moves the OSC target 5 cm)
    ki: float = 0.6  # integral gain (per step, per metre), only near the target
    integral_zone: float = 0.02  # integrate only when the error is below this
    integral_cap: float = 0.01  # cap of the accumulated error (metres)
    k_ori: float = 2.0  # action per radian of orientation error (action 1 = 0.5 rad)
    max_pos_action: float = 1.0
    max_ori_action: float = 0.6
    settle_speed: float = 0.001  # objects are settled below this speed (m/step)
    settle_max_steps: int = 25
    rim_radius: float = 0.046  # gripper centre distance from the bowl axis when grasping the rim
    grasp_height: float = 0.040  # eef height above the bowl's bottom centre when grasping
    pregrasp_height: float = 0.10  # above the grasp point before descending
    close_steps: int = 10
    open_steps: int = 10
    lift_check: float = 0.03  # the bowl must rise at least this much with the gripper
    drop_slip: float = 0.03  # the grasp point on the bowl left the gripper by this much: dropped
    carry_max_action: float = 0.8
    carry_clearance: float = 0.05  # bowl bottom above obstacles along the carry path
    place_height: float = 0.012  # bowl bottom above the plate's origin when releasing
    comfortable_reach: float = 0.70  # grasp points farther than this from the shoulder are penalized
    shoulder_height: float = 0.333  # Panda shoulder above the robot base
    n_sides: int = 16  # candidate grasp directions around the rim
    finger_open_half_gap: float = 0.040  # half the distance between the open fingers' pads
    finger_below_eef: float = 0.012  # fingertips below the eef site
    hand_above_eef: float = 0.045  # the hand's underside above the eef site
    hand_half_length: float = 0.105  # hand extent along the closing axis
    hand_half_width: float = 0.035  # hand extent across the closing axis
    # libero_object (ObjectInBasketExpert)
    obj_min_grasp_above_bottom: float = 0.016  # eef height above the object's bottom at least
    obj_release_height: float = 0.03  # object bottom above the basket floor when releasing


def parse_goal(bddl_file: str) -> tuple[str, str, str]:
    """The single goal predicate ``(Pred obj target)`` of a BDDL file, e.g. ``("on", "bowl", "plate")``."""
    text = open(bddl_file).read()
    m = re.search(r"\(:goal\s*\(And\s*\((\w+)\s+(\S+)\s+(\S+?)\)\s*\)", text, flags=re.IGNORECASE)
    if m is None:
        raise ExpertError(f"{bddl_file}: expected a single-predicate goal '(:goal (And (Pred a b)))'.")
    return m.group(1).lower(), m.group(2), m.group(3)


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def wrap_half_pi(angle: float) -> float:
    """Map a gripper yaw to [-pi/2, pi/2) (the gripper is symmetric under a half turn)."""
    return (angle + math.pi / 2) % math.pi - math.pi / 2


def orientation_error(desired: np.ndarray, current: np.ndarray) -> np.ndarray:
    return 0.5 * sum(np.cross(current[:, i], desired[:, i]) for i in range(3))
