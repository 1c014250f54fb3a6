"""A scripted pick-and-place expert for LIBERO that reads privileged simulator state.

The expert drives robosuite's ``OSC_POSE`` controller (7-d delta actions in [-1, 1]: dx, dy, dz, droll,
dpitch, dyaw, gripper with -1 open / +1 close) through a sequence of waypoints computed from object and
end-effector poses read from the observations and from ``env.sim``. It supports every libero_spatial
task (all goals are ``(On akita_black_bowl_1 plate_1)``; :class:`BowlPlaceExpert`) and every
libero_object task (``(In <object> basket_1_contain_region)``; :class:`ObjectInBasketExpert`).
:func:`make_expert` picks the right one from the task's BDDL goal.

What makes it work (measured while building it):

* Wait until the objects have settled after ``set_init_state`` (init states drop objects a few cm).
* The bowl (11 cm) is wider than the Panda's opening (8 cm): grasp its rim, fingers closing across the
  wall, with the closing axis turned radially. The free side of the rim is chosen by checking a
  height map around the bowl (ray casts against collision geometry) for room for the fingers and hand.
* P control with a small, capped integral term near the target; orientation control keeps the gripper
  pointing down at the planned yaw.
* Close the gripper for a few steps before lifting, verify the bowl rose with the gripper, and retry
  another side when it did not; a bowl dropped while carried is grasped again.
* Prefer grasp sides well inside the arm's reach: a stretched arm sits at the elbow singularity, where
  OSC stalls (bowls on/in the wooden cabinet).
* Carry the bowl just high enough over the obstacles under its path (ray-cast height profile).

The gripper action is always exactly -1 or +1 (what the evaluation protocol's binarization produces),
so demonstrations never rely on a half-open gripper.

Build the expert once the episode has started (``rsd.envs.libero_env.reset_to_init_state``: reset, init
state, warm-up no-ops) and call :meth:`BowlPlaceExpert.act` every step. Recording its episodes as
demonstrations is ``rsd.data.record``'s job.
"""

from __future__ import annotations

from rsd.envs.expert.bowl_place import BowlPlaceExpert
from rsd.envs.expert.common import ExpertConfig, ExpertError, parse_goal
from rsd.envs.expert.object_in_basket import ObjectInBasketExpert
from rsd.envs.libero_env import TaskSpec

SUPPORTED_SUITES = ("libero_spatial", "libero_object")


def make_expert(env, task: TaskSpec, config: ExpertConfig | None = None) -> BowlPlaceExpert:
    """The scripted expert for ``task`` (raises :class:`ExpertError` for unsupported goals)."""
    pred, obj, target = parse_goal(task.bddl_file)
    for cls in (BowlPlaceExpert, ObjectInBasketExpert):
        if cls.supports(pred, obj, target):
            return cls(env, task, config)
    return BowlPlaceExpert(env, task, config)  # raises ExpertError with the explanation


__all__ = ["SUPPORTED_SUITES", "BowlPlaceExpert", "ExpertConfig", "ExpertError", "ObjectInBasketExpert", "make_expert",
           "parse_goal"]
