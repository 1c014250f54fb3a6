"""libero_object's expert: pick an object across its narrow side and drop it into the basket."""

from __future__ import annotations

import math

import numpy as np

from rsd.envs.expert.bowl_place import BowlPlaceExpert
from rsd.envs.expert.common import ExpertConfig, ExpertError
from rsd.envs.libero_env import TaskSpec


class ObjectInBasketExpert(BowlPlaceExpert):
    """libero_object: pick ``obj`` across its narrow side at its centre and drop it into the basket.

    The target is the simulator site ``basket_1_contain_region`` (not in the observations). The grasp
    axis is the object's narrow horizontal side (principal axes of its collision geometry), or the wide
    one when that side is blocked and the object still fits the 8 cm opening.
    """

    @classmethod
    def supports(cls, pred: str, obj: str, target: str) -> bool:
        return pred == "in" and target.endswith("contain_region")

    def __init__(self, env, task: TaskSpec, config: ExpertConfig | None = None):
        super().__init__(env, task, config)
        import mujoco

        self._target_site = mujoco.mj_name2id(self._m, mujoco.mjtObj.mjOBJ_SITE, self.target)
        if self._target_site < 0:
            raise ExpertError(f"Task {task.name}: no simulator site named {self.target!r}.")
        self._obj_geoms = [
            g for g in range(self._m.ngeom)
            if int(self._m.body_rootid[self._m.geom_bodyid[g]]) == int(self._m.body_rootid[self._obj_bid])
            and (self._m.geom_contype[g] or self._m.geom_conaffinity[g])
        ]

    def _object_points(self) -> np.ndarray:
        """Corners of the object's collision geoms' bounding boxes, world frame."""
        m, d = self._m, self._d
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        pts = []
        for g in self._obj_geoms:
            c, h = m.geom_aabb[g][:3], m.geom_aabb[g][3:]
            local = c + signs * h
            pts.append(d.geom_xpos[g] + local @ d.geom_xmat[g].reshape(3, 3).T)
        return np.concatenate(pts, axis=0)

    def _plan_grasp(self) -> bool:
        cfg = self.cfg
        pts = self._object_points()
        xy = pts[:, :2]
        mean = xy.mean(axis=0)
        cov = np.cov((xy - mean).T)
        evals, evecs = np.linalg.eigh(cov)
        axes = [evecs[:, 0], evecs[:, 1]]  # narrow first
        bottom, top = float(pts[:, 2].min()), float(pts[:, 2].max())
        z = max(0.5 * (bottom + top), bottom + cfg.obj_min_grasp_above_bottom)
        candidates = []
        for rank, u2 in enumerate(axes):
            proj = (xy - mean) @ u2
            width = float(proj.max() - proj.min())
            other = np.array([-u2[1], u2[0]])
            center = mean + u2 * 0.5 * (proj.max() + proj.min())
            center = center + other * 0.5 * ((xy - mean) @ other).max() + other * 0.5 * ((xy - mean) @ other).min()
            if width > 2 * cfg.finger_open_half_gap - 0.006:
                continue
            u = np.array([u2[0], u2[1], 0.0])
            v = np.array([other[0], other[1], 0.0])
            g = np.array([center[0], center[1], z])
            fingers = [g + sgn * (cfg.finger_open_half_gap + 0.008) * u + b * v for sgn in (-1, 1) for b in (-0.01, 0.0, 0.01)]
            h = self._with_visible_collision_geoms(lambda f=fingers: self._max_height(np.array(f), z + 0.35))
            clearance = (z - cfg.finger_below_eef) - h
            angle = math.atan2(u[1], u[0])
            candidates.append((min(clearance, 0.01) - 0.002 * rank, angle, g, clearance))
        candidates = [c for c in candidates if all(abs(c[1] - a) > 1e-6 for a in self._tried)]
        if not candidates:
            return False
        _, angle, g, clearance = max(candidates, key=lambda c: c[0])
        self._tried.append(angle)
        self._yaw = self._yaw_for(angle)
        self._grasp_pos = g
        self._obj_top = top
        self.log.append(f"axis {math.degrees(angle):.0f}deg clearance {clearance:.3f}")
        return True

    def _site(self) -> np.ndarray:
        return self._d.site_xpos[self._target_site].copy()

    def _pregrasp_target(self) -> np.ndarray:
        above = max(self._obj_top + 0.06, self._grasp_pos[2] + self.cfg.pregrasp_height)
        return np.array([self._grasp_pos[0], self._grasp_pos[1], above])

    def _task_phase(self, pos: np.ndarray) -> np.ndarray | None:
        """The object's close, lift/carry/lower (one slip check) and regrasp phases; None in others."""
        cfg = self.cfg
        if self.phase == "close":
            if self.phase_t >= cfg.close_steps:
                obj_pos, obj_rot = self._body(self._obj_bid)
                self._grip_local = obj_rot.T @ (pos - obj_pos)
                self._lift_start_z = pos[2]
                bottom = float(self._object_points()[:, 2].min())
                self._grip_above_bottom = pos[2] - bottom
                self._profile_start = obj_pos[:2].copy()
                self._profile_goal = self._site()[:2]
                self._profile = self._with_visible_collision_geoms(
                    lambda: self._carry_profile(self._profile_start, self._profile_goal)
                )
                self._set_phase("lift")
                return self._act()
            return self._servo(self._grasp_pos, 1.0)

        if self.phase in ("lift", "carry", "lower"):
            obj_pos, obj_rot = self._body(self._obj_bid)
            slip = float(np.linalg.norm(obj_pos + obj_rot @ self._grip_local - pos))
            rose_eef = pos[2] - self._lift_start_z
            if (self.phase != "lift" or rose_eef > cfg.lift_check) and slip > cfg.drop_slip:
                self.log.append(f"{'lift failed' if self.phase == 'lift' else 'dropped'} (slip {slip:.3f})")
                self._set_phase("regrasp")
                return self._act()
            site = self._site()
            need = max(self._clear_height(obj_pos[:2]), site[2])
            carry_z = need + cfg.carry_clearance + self._grip_above_bottom
            if self.phase == "lift":
                target = np.array([self._grasp_pos[0], self._grasp_pos[1], carry_z])
                if rose_eef > cfg.lift_check and pos[2] > carry_z - 0.02:
                    self._set_phase("carry")
                    return self._act()
                return self._servo(target, 1.0)
            xy = site[:2] + (pos[:2] - obj_pos[:2])
            if self.phase == "carry":
                return self._carry(np.array([xy[0], xy[1], carry_z]), pos, 0.015, 0.03)
            floor = self._with_visible_collision_geoms(lambda: self._height(float(site[0]), float(site[1]), site[2] + 0.3))
            z = max(floor, site[2] - 0.07) + cfg.obj_release_height + self._grip_above_bottom
            target = np.array([xy[0], xy[1], z])
            if self._pos_err(target) < 0.01 or (self.phase_t > 8 and self._stall > 4):
                self._set_phase("release")
                return self._act()
            return self._servo(target, 1.0, 0.6)

        if self.phase == "regrasp":
            up = np.array([pos[0], pos[1], max(pos[2], self._grasp_pos[2] + cfg.pregrasp_height)])
            if self.phase_t >= cfg.open_steps:
                self._tried = []
                self._set_phase("pregrasp" if self._plan_grasp() else "failed")
                return self._act()
            return self._servo(up if self.phase_t >= 3 else pos, -1.0)
        return None
