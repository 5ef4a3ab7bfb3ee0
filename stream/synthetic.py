"""A built-in synthetic multi-body sensor feed.

`SyntheticBodies` simulates `n` bodies whose joints swing along sums of sinusoids; every
modality is derived from the joint angles, so the signals are smooth and correlated the
way real body sensors are:

- proprioception: `tanh` of a fixed random linear mix of joint angles and velocities;
- tactile: contact pressure, rising linearly while a limb dips below its contact height;
- motor: the velocity command, the difference of successive joint targets over one tick;
- sensory: `tanh` of a fixed random projection of the other three.

`stream.sources.synthetic` paces ticks into the pipeline; the `send` client uses
`SyntheticBodies` too.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .protocol import ALL_PRESENT, Dims, Frame, FrameRun

__all__ = ["SyntheticBodies"]

_JOINTS = 6  # joint angles per body
_HARMONICS = 3  # sinusoids per joint
_LIMBS = 4  # limbs whose height drives the tactile sensors


class SyntheticBodies:
    """`n` simulated bodies, ticked all at once (vectorised over bodies).

    **Arguments:**

    - `n`: the number of bodies (streams).
    - `dims`: the modality sizes of the produced payloads.
    - `seed`: fixes frequencies, phases and mixing matrices; same seed, same signals.
    - `prefix`: stream ids are `f"{prefix}-{i:04d}"`.
    - `dt`: seconds between the two targets whose difference is the motor command.
    """

    def __init__(
        self, n: int, dims: Dims, *, seed: int = 0, prefix: str = "body", dt: float = 0.01
    ) -> None:
        if n < 0:
            raise ValueError(f"n={n}, expected n >= 0")
        if dt <= 0:
            raise ValueError(f"dt={dt}, expected dt > 0")
        rng = np.random.default_rng(seed)
        shape = (n, _JOINTS, _HARMONICS)
        self.n = n
        self.dims = dims
        self.dt = dt
        self.stream_ids = [f"{prefix}-{i:04d}" for i in range(n)]
        self._freq = rng.uniform(0.05, 1.5, shape)  # Hz
        self._phase = rng.uniform(0.0, 2 * math.pi, shape)
        self._amp = rng.uniform(0.2, 1.0, shape) / _HARMONICS  # rad; |angle| < 1
        self._w_proprio = _mix(rng, 2 * _JOINTS, dims.proprio)
        self._w_limb = _mix(rng, _JOINTS, _LIMBS)
        self._contact = rng.uniform(-0.6, -0.2, (n, _LIMBS)).astype(np.float32)
        self._w_tactile = rng.uniform(0.0, 4.0, (_LIMBS, dims.tactile)).astype(np.float32)
        self._w_motor = _mix(rng, _JOINTS, dims.motor)
        self._w_sensory = _mix(rng, dims.proprio + dims.tactile + dims.motor, dims.sensory)

    def _angles(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        # Reducing f·t modulo 1 in float64 keeps phases exact for months of t.
        theta = 2 * math.pi * np.mod(self._freq * t, 1.0) + self._phase
        angles = (self._amp * np.sin(theta)).sum(axis=2)
        velocity = (self._amp * 2 * math.pi * self._freq * np.cos(theta)).sum(axis=2)
        return angles.astype(np.float32), velocity.astype(np.float32)

    def tick(self, t: float) -> np.ndarray:
        """All bodies' sensor readings at time `t`.

        **Arguments:**

        - `t`: seconds on the simulated sensor clock.

        **Returns:**

        float32 of shape `(n, dims.total)`: sensory, proprio, tactile, motor per row.
        """
        angles, velocity = self._angles(t)
        proprio = np.tanh(np.concatenate([angles, velocity], axis=1) @ self._w_proprio)
        depth = np.maximum(self._contact - angles @ self._w_limb, 0.0)  # (n, limbs)
        tactile = depth @ self._w_tactile
        previous, _ = self._angles(t - self.dt)
        motor = ((angles - previous) / np.float32(self.dt)) @ self._w_motor
        combined = np.concatenate([proprio, tactile, motor], axis=1)
        sensory = np.tanh(combined @ self._w_sensory)
        return np.concatenate([sensory, proprio, tactile, motor], axis=1, dtype=np.float32)

    def frames(self, t: float, seq: int, *, source: str = "synthetic") -> list[Frame]:
        """One `Frame` per body for time `t`, all with every modality present: the rows
        of `run(t, seq, source=source)`."""
        return self.run(t, seq, source=source).frames()

    def run(self, t: float, seq: int, *, source: str = "synthetic") -> FrameRun:
        """Every body's frame for time `t`, as one `FrameRun` (columns, no object per
        frame), with every modality present.

        **Arguments:**

        - `t`: seconds on the simulated clock (the frames' `timestamp`).
        - `seq`: the frames' sequence number.
        - `source`: the frames' source label.

        **Returns:**

        A run of `n` frames; its `payload` is float32 of shape `(n, dims.total)`.
        """
        n = len(self.stream_ids)
        return FrameRun(
            list(self.stream_ids),
            [seq] * n,
            np.full(n, t, dtype=np.float64),
            self.tick(t),
            ALL_PRESENT,
            time.monotonic_ns(),
            source,
        )


def _mix(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    # Scaled so a unit-variance input gives outputs of about unit variance.
    scale = 1.0 / math.sqrt(max(n_in, 1))
    return rng.normal(0.0, scale, (n_in, n_out)).astype(np.float32)
