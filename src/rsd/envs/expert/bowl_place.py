"""libero_spatial's expert: pick a bowl by its rim and place it on the plate (see ``rsd.envs.expert``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsd.envs.expert.common import (
    R_DOWN,
    ROBOT_PREFIXES,
    ExpertConfig,
    ExpertError,
    orientation_error,
    parse_goal,
    rot_z,
    wrap_half_pi,
)
from rsd.envs.libero_env import TaskSpec


@dataclass
class _Side:
    angle: float  # direction from the bowl axis to the grasp point
    clearance: float  # free height margin (m) for fingers and hand; larger is better
    yaw: float  # gripper yaw that closes the fingers radially
    reach: float  # distance of the grasp point from the robot's shoulder (m)


class BowlPlaceExpert:
    """Pick ``obj`` (a bowl) by its rim and place it on ``target``; privileged state, closed loop.

    Build it after ``env.reset()``, ``env.set_init_state(...)`` and the warm-up no-ops (it reads the
    gripper's home orientation then), and call ``action = expert.act(obs)`` once per step; ``reset()``
    restarts the state machine. ``expert.phase`` and ``expert.log`` describe what it did. Another task
    family subclasses it with its own ``_plan_grasp``, ``_pregrasp_target`` and ``_task_phase``.
    """

    @classmethod
    def supports(cls, pred: str, obj: str, target: str) -> bool:
        return pred == "on" and "bowl" in obj

    def __init__(self, env, task: TaskSpec, config: ExpertConfig | None = None):
        pred, obj, target = parse_goal(task.bddl_file)
        if not self.supports(pred, obj, target):
            raise ExpertError(
                f"Task {task.suite}/{task.name}: {type(self).__name__} does not support the goal "
                f"'({pred} {obj} {target})'; the scripted experts handle '(On <bowl> <target>)' "
                "(libero_spatial) and '(In <object> <basket region>)' (libero_object)."
            )
        self.env = env
        self.task = task
        self.obj = obj
        self.target = target
        self.cfg = config or ExpertConfig()
        self._inner = env.env
        self._sim = env.sim
        self._m = self._sim.model._model
        self._d = self._sim.data._data
        self._obj_bid = self._inner.obj_body_id[obj]
        self._target_bid = self._inner.obj_body_id.get(target)  # None when the target is a site
        robot = self._inner.robots[0]
        self._eef_site = robot.eef_site_id
        self._shoulder = np.asarray(robot.base_pos, dtype=np.float64) + np.array([0.0, 0.0, self.cfg.shoulder_height])
        self._exclude_roots = self._robot_and_object_roots()
        self._closing_angle, self._home_yaw = self._gripper_frame()
        self.reset()

    # ------------------------------------------------------------------ state access
    def _robot_and_object_roots(self) -> set[int]:
        import mujoco

        roots = {int(self._m.body_rootid[self._obj_bid])}
        for b in range(self._m.nbody):
            name = mujoco.mj_id2name(self._m, mujoco.mjtObj.mjOBJ_BODY, b) or ""
            if name.startswith(ROBOT_PREFIXES):
                roots.add(int(self._m.body_rootid[b]))
        return roots

    def _gripper_frame(self) -> tuple[float, float]:
        """Closing-axis angle at yaw 0 (for ``Rz(yaw) @ R_DOWN``) and the current (home) yaw."""
        import mujoco

        g1 = mujoco.mj_name2id(self._m, mujoco.mjtObj.mjOBJ_GEOM, "gripper0_finger1_pad_collision")
        g2 = mujoco.mj_name2id(self._m, mujoco.mjtObj.mjOBJ_GEOM, "gripper0_finger2_pad_collision")
        _, rot = self._eef()
        if g1 >= 0 and g2 >= 0:
            closing_site = rot.T @ (self._d.geom_xpos[g2] - self._d.geom_xpos[g1])
        else:  # robosuite's Panda gripper closes along the eef site's x axis
            closing_site = np.array([1.0, 0.0, 0.0])
        c = R_DOWN @ closing_site
        rz = rot @ R_DOWN.T
        return math.atan2(c[1], c[0]), math.atan2(rz[1, 0], rz[0, 0])

    def _yaw_for(self, side_angle: float) -> float:
        """Gripper yaw closing the fingers along ``side_angle``, within a quarter turn of the home yaw."""
        yaw = side_angle - self._closing_angle
        return self._home_yaw + wrap_half_pi(yaw - self._home_yaw)

    def _eef(self) -> tuple[np.ndarray, np.ndarray]:
        return self._d.site_xpos[self._eef_site].copy(), self._d.site_xmat[self._eef_site].reshape(3, 3).copy()

    def _body(self, bid: int) -> tuple[np.ndarray, np.ndarray]:
        return self._d.xpos[bid].copy(), self._d.xmat[bid].reshape(3, 3).copy()

    def _bowl_center(self, height: float) -> np.ndarray:
        """Point on the bowl's axis ``height`` above its bottom centre (follows tilt)."""
        pos, rot = self._body(self._obj_bid)
        return pos + rot[:, 2] * height

    # ------------------------------------------------------------------ height map (ray casts)
    def _height(self, x: float, y: float, z_top: float) -> float:
        """Highest collision surface below ``z_top`` at (x, y), ignoring the robot and the grasped object."""
        import mujoco

        m, d = self._m, self._d
        pnt = np.array([x, y, z_top], dtype=np.float64)
        vec = np.array([0.0, 0.0, -1.0])
        gid = np.zeros(1, dtype=np.int32)
        for _ in range(20):
            dist = mujoco.mj_ray(m, d, pnt, vec, None, 1, -1, gid)
            if dist < 0:
                return -np.inf
            g = int(gid[0])
            z = pnt[2] - dist
            collides = m.geom_contype[g] != 0 or m.geom_conaffinity[g] != 0
            if collides and int(m.body_rootid[m.geom_bodyid[g]]) not in self._exclude_roots:
                return z
            pnt[2] = z - 1e-4
        return -np.inf

    def _max_height(self, points: np.ndarray, z_top: float) -> float:
        return max(self._height(float(p[0]), float(p[1]), z_top) for p in points)

    def _with_visible_collision_geoms(self, fn):
        """mj_ray skips geoms with alpha 0; make collision geoms visible while casting rays."""
        rgba = self._m.geom_rgba
        saved = rgba[:, 3].copy()
        rgba[:, 3] = np.maximum(saved, 0.5)
        try:
            return fn()
        finally:
            rgba[:, 3] = saved

    def _score_sides(self) -> list[_Side]:
        cfg = self.cfg
        bottom, rot = self._body(self._obj_bid)
        center = self._bowl_center(cfg.grasp_height)
        eef_z = center[2]
        finger_z = eef_z - cfg.finger_below_eef
        hand_z = eef_z + cfg.hand_above_eef
        z_top = eef_z + 0.35
        sides = []
        for k in range(cfg.n_sides):
            ang = 2 * math.pi * k / cfg.n_sides
            u = np.array([math.cos(ang), math.sin(ang), 0.0])
            v = np.array([-u[1], u[0], 0.0])
            g = center + cfg.rim_radius * u
            # Outer finger (inner finger is inside the bowl, which is excluded from the height map).
            outer = g + cfg.finger_open_half_gap * u
            finger_pts = [outer + a * u + b * v for a in (-0.01, 0.0, 0.012) for b in (-0.012, 0.0, 0.012)]
            hand_pts = [
                g + a * u + b * v
                for a in np.linspace(-cfg.hand_half_length, cfg.hand_half_length, 7)
                for b in (-cfg.hand_half_width, 0.0, cfg.hand_half_width)
            ]
            h_f = self._max_height(np.array(finger_pts), z_top)
            h_h = self._max_height(np.array(hand_pts), z_top)
            clearance = min(finger_z - h_f, hand_z - h_h)
            yaw = self._yaw_for(ang)
            reach = float(np.linalg.norm(g - self._shoulder))
            sides.append(_Side(ang, clearance, yaw, reach))
        return sides

    def _rank_sides(self, sides: list[_Side]) -> list[_Side]:
        # Prefer free sides (clearance), then sides well inside the arm's reach (a stretched arm is
        # near the elbow singularity, where OSC stalls), then small yaw changes (less wrist rotation).
        cfg = self.cfg

        def key(s: _Side) -> float:
            free = min(s.clearance, 0.02)
            overreach = max(0.0, s.reach - cfg.comfortable_reach)
            return free * 100.0 - 20.0 * overreach - 0.3 * abs(s.yaw - self._home_yaw)

        return sorted(sides, key=key, reverse=True)

    def _carry_profile(self, start_xy: np.ndarray, goal_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Obstacle height under the bowl's footprint at points along the straight carry path.

        Returns ``(s, h)``: arc length from the start (m) and the highest obstacle there.
        """
        length = float(np.linalg.norm(goal_xy - start_xy))
        n = max(2, int(length / 0.02) + 1)
        top = self._body(self._obj_bid)[0][2] + 0.4
        if self._target_bid is not None:
            top = max(top, self._body(self._target_bid)[0][2] + 0.4)
        r = 0.06
        offsets = [np.array([a, b]) for a in (-r, 0.0, r) for b in (-r, 0.0, r) if a * a + b * b <= r * r * 1.01]
        offsets += [np.array([r, r]) * 0.7, np.array([r, -r]) * 0.7, np.array([-r, r]) * 0.7, np.array([-r, -r]) * 0.7]
        s_vals = np.linspace(0.0, length, n)
        heights = np.empty(n)
        for i, t in enumerate(np.linspace(0.0, 1.0, n)):
            c = start_xy + t * (goal_xy - start_xy)
            heights[i] = self._max_height(np.array([c + o for o in offsets]), top)
        return s_vals, heights

    def _clear_height(self, bowl_xy: np.ndarray, behind: float = 0.04, ahead: float = 0.12) -> float:
        """Highest obstacle near the bowl's position along the carry path (window behind/ahead)."""
        s_vals, heights = self._profile
        d = self._profile_goal - self._profile_start
        length = float(np.linalg.norm(d))
        s_now = float(np.dot(bowl_xy - self._profile_start, d / max(length, 1e-9))) if length > 0 else 0.0
        mask = (s_vals >= s_now - behind) & (s_vals <= s_now + ahead)
        if not mask.any():
            mask = np.abs(s_vals - s_now) == np.abs(s_vals - s_now).min()
        return float(heights[mask].max())

    # ------------------------------------------------------------------ control
    def reset(self) -> None:
        self.phase = "settle"
        self.t = 0
        self.phase_t = 0
        self.log: list[str] = []
        self._integral = np.zeros(3)
        self._prev_positions: np.ndarray | None = None
        self._settled_steps = 0
        self._sides: list[_Side] = []
        self._side: _Side | None = None
        self._tried: list[float] = []
        self._yaw = self._home_yaw
        self._hold_pos: np.ndarray | None = None
        self._grasp_pos: np.ndarray | None = None
        self._bowl_z_at_grasp = 0.0
        self._profile: tuple[np.ndarray, np.ndarray] = (np.zeros(1), np.zeros(1))
        self._profile_start = np.zeros(2)
        self._profile_goal = np.zeros(2)
        self._grip_local = np.zeros(3)
        self._lift_start_z = 0.0
        self._stall = 0
        self._last_err = np.inf

    def _set_phase(self, phase: str) -> None:
        self.log.append(f"{self.t}:{phase}")
        self.phase = phase
        self.phase_t = 0
        self._integral[:] = 0.0
        self._stall = 0
        self._last_err = np.inf

    def _servo(self, target: np.ndarray, gripper: float, max_action: float | None = None) -> np.ndarray:
        cfg = self.cfg
        pos, rot = self._eef()
        err = target - pos
        near = np.abs(err) < cfg.integral_zone
        self._integral = np.where(near, self._integral + err, 0.0)
        self._integral = np.clip(self._integral, -cfg.integral_cap, cfg.integral_cap)
        a_pos = cfg.kp * err + cfg.ki * cfg.kp * self._integral
        cap = cfg.max_pos_action if max_action is None else max_action
        a_pos = np.clip(a_pos, -cap, cap)
        ori_err = orientation_error(rot_z(self._yaw) @ R_DOWN, rot)
        a_ori = np.clip(cfg.k_ori * ori_err, -cfg.max_ori_action, cfg.max_ori_action)
        # An exactly-zero orientation delta would freeze the OSC orientation goal; keep it tiny instead.
        a_ori = np.where(a_ori == 0.0, 1e-6, a_ori)
        # Track progress for stall detection.
        dist = float(np.linalg.norm(err))
        if dist > self._last_err - 5e-4:
            self._stall += 1
        else:
            self._stall = 0
        self._last_err = min(self._last_err, dist)
        return np.concatenate([a_pos, a_ori, [gripper]]).astype(np.float64)

    def _carry(self, target: np.ndarray, pos: np.ndarray, arrived: float, stalled_near: float) -> np.ndarray:
        """Carry the grasped object toward ``target`` (closed gripper, capped speed); lower it once the gripper is
        within ``arrived`` metres of the target horizontally, or within ``stalled_near`` and no longer moving."""
        xy_err = float(np.linalg.norm(target[:2] - pos[:2]))
        if xy_err < arrived or (xy_err < stalled_near and self.phase_t > 10 and self._stall > 8):
            self._set_phase("lower")
            return self._act()
        return self._servo(target, 1.0, self.cfg.carry_max_action)

    def _pos_err(self, target: np.ndarray) -> float:
        return float(np.linalg.norm(target - self._eef()[0]))

    def _ori_err(self) -> float:
        return float(np.linalg.norm(orientation_error(rot_z(self._yaw) @ R_DOWN, self._eef()[1])))

    def _object_positions(self) -> np.ndarray:
        ids = list(self._inner.obj_body_id.values())
        return self._d.xpos[ids].copy()

    def _plan_grasp(self) -> bool:
        """Aim at the best rim side not tried yet; False when none is left."""
        sides = self._with_visible_collision_geoms(self._score_sides)
        ranked = [s for s in self._rank_sides(sides) if all(abs(s.angle - a) > 1e-6 for a in self._tried)]
        if not ranked:
            return False
        self._side = ranked[0]
        self._tried.append(self._side.angle)
        self._yaw = self._side.yaw
        u = np.array([math.cos(self._side.angle), math.sin(self._side.angle), 0.0])
        center = self._bowl_center(self.cfg.grasp_height)
        self._grasp_pos = center + self.cfg.rim_radius * u
        self.log.append(
            f"side {math.degrees(self._side.angle):.0f}deg clearance {self._side.clearance:.3f} "
            f"reach {self._side.reach:.3f}"
        )
        return True

    # ------------------------------------------------------------------ phases both experts share
    def _settle(self) -> np.ndarray:
        """Hold still until the objects stop moving (init states drop them), then plan the grasp."""
        cfg = self.cfg
        cur = self._object_positions()
        if self._prev_positions is not None:
            speed = np.linalg.norm(cur - self._prev_positions, axis=1).max()
            self._settled_steps = self._settled_steps + 1 if speed < cfg.settle_speed else 0
        self._prev_positions = cur
        if self._settled_steps >= 2 or self.phase_t >= cfg.settle_max_steps:
            self._set_phase("pregrasp" if self._plan_grasp() else "failed")
            return self._act()
        return self._servo(self._hold_pos, -1.0)

    def _pregrasp(self, target: np.ndarray) -> np.ndarray:
        """Move above the grasp point with the gripper open and turned to the planned yaw."""
        if self._pos_err(target) < 0.015 and self._ori_err() < 0.08:
            self._set_phase("descend")
            return self._act()
        return self._servo(target, -1.0)

    def _descend(self) -> np.ndarray:
        """Go down to the grasp point, slower near it; a stall after 10 steps counts as arrived."""
        target = self._grasp_pos
        if (self._pos_err(target) < 0.006 and self._ori_err() < 0.05) or (self.phase_t > 10 and self._stall > 5):
            self._bowl_z_at_grasp = self._body(self._obj_bid)[0][2]
            self._set_phase("close")
            return self._act()
        slow = 0.6 if self._pos_err(target) < 0.04 else None
        return self._servo(target, -1.0, slow)

    def _release(self, pos: np.ndarray) -> np.ndarray:
        """Open the gripper where it stood when the phase began, then retreat."""
        if self.phase_t >= self.cfg.open_steps:
            self._set_phase("retreat")
            return self._act()
        self._hold_pos = pos if self.phase_t == 0 else self._hold_pos
        return self._servo(self._hold_pos, -1.0)

    def act(self, obs: dict | None = None) -> np.ndarray:
        """The next action (``obs`` is accepted for API symmetry; the expert reads ``env.sim``)."""
        action = self._act()
        self.t += 1
        self.phase_t += 1
        return action

    def _act(self) -> np.ndarray:
        """One step of the state machine: the phases both experts share here, the others in ``_task_phase``."""
        pos, _ = self._eef()
        if self._hold_pos is None:
            self._hold_pos = pos.copy()
        if self.phase == "settle":
            return self._settle()
        if self.phase == "pregrasp":
            return self._pregrasp(self._pregrasp_target())
        if self.phase == "descend":
            return self._descend()
        if self.phase == "release":
            return self._release(pos)
        if self.phase == "retreat":
            return self._servo(self._hold_pos + np.array([0.0, 0.0, 0.1]), -1.0)
        action = self._task_phase(pos)
        # failed: hold still with the gripper open.
        return self._servo(pos, -1.0) if action is None else action

    def _pregrasp_target(self) -> np.ndarray:
        return self._grasp_pos + np.array([0.0, 0.0, self.cfg.pregrasp_height])

    def _task_phase(self, pos: np.ndarray) -> np.ndarray | None:
        """The bowl's close, lift, regrasp, carry and lower phases; None in any other phase."""
        cfg = self.cfg
        if self.phase == "close":
            if self.phase_t >= cfg.close_steps:
                bowl_pos, bowl_rot = self._body(self._obj_bid)
                goal_xy = self._body(self._target_bid)[0][:2]
                self._profile_start = bowl_pos[:2].copy()
                self._profile_goal = goal_xy.copy()
                self._profile = self._with_visible_collision_geoms(
                    lambda: self._carry_profile(self._profile_start, self._profile_goal)
                )
                # Where the eef holds the bowl, in the bowl's frame (to check that the bowl follows).
                self._grip_local = bowl_rot.T @ (pos - bowl_pos)
                self._lift_start_z = pos[2]
                self._set_phase("lift")
                return self._act()
            return self._servo(self._grasp_pos, 1.0)

        if self.phase == "lift":
            bowl_pos, bowl_rot = self._body(self._obj_bid)
            grip_above_bottom = self._lift_start_z - self._bowl_z_at_grasp
            need = max(self._clear_height(bowl_pos[:2], 0.06, 0.08), self._bowl_z_at_grasp)
            lift_z = need + cfg.carry_clearance + grip_above_bottom
            target = np.array([self._grasp_pos[0], self._grasp_pos[1], lift_z])
            held_err = float(np.linalg.norm(bowl_pos + bowl_rot @ self._grip_local - pos))
            rose_eef = pos[2] - self._lift_start_z
            rose = bowl_pos[2] - self._bowl_z_at_grasp
            if rose_eef > cfg.lift_check and held_err > 0.02:
                self.log.append(f"lift failed (eef rose {rose_eef:.3f}, bowl rose {rose:.3f}, slip {held_err:.3f})")
                self._set_phase("regrasp")
                return self._act()
            if rose_eef > cfg.lift_check and pos[2] > lift_z - 0.02:
                self._set_phase("carry")
                return self._act()
            return self._servo(target, 1.0)

        if self.phase == "regrasp":
            up = np.array([pos[0], pos[1], self._grasp_pos[2] + cfg.pregrasp_height])
            if self.phase_t >= cfg.open_steps and self._pos_err(up) < 0.03:
                if not self._plan_grasp():
                    self._set_phase("failed")
                else:
                    self._set_phase("pregrasp")
                return self._act()
            return self._servo(up if self.phase_t >= 3 else pos, -1.0)

        if self.phase in ("carry", "lower"):
            bowl, bowl_rot = self._body(self._obj_bid)
            plate = self._body(self._target_bid)[0]
            slip = float(np.linalg.norm(bowl + bowl_rot @ self._grip_local - pos))
            if slip > (cfg.drop_slip if self.phase == "carry" else 1.5 * cfg.drop_slip):
                self.log.append(f"dropped (slip {slip:.3f})")
                self._tried = []  # the bowl moved: every side is worth trying again
                self._set_phase("regrasp")
                return self._act()
            offset = pos[:2] - bowl[:2]
            xy = plate[:2] + offset
            grip_above_bottom = pos[2] - bowl[2]
            if self.phase == "carry":
                need = max(self._clear_height(bowl[:2]), plate[2])
                z = need + cfg.carry_clearance + grip_above_bottom
                return self._carry(np.array([xy[0], xy[1], z]), pos, 0.01, 0.025)
            z = plate[2] + cfg.place_height + grip_above_bottom
            target = np.array([xy[0], xy[1], z])
            if (self._pos_err(target) < 0.008) or (self.phase_t > 8 and self._stall > 4):
                self._set_phase("release")
                return self._act()
            slow = 0.5 if abs(pos[2] - z) < 0.04 else None
            return self._servo(target, 1.0, slow)
        return None
