"""Writes tests/fixtures/prdc_k3.json: small seeded feature sets and what Naeem et al.'s own
`prdc` package (PyPI `prdc`) computes on them, for src/eval/diversity.rs's parity test.

Run in a scratch venv (never CI):
    python3 -m venv /tmp/prdc-venv && /tmp/prdc-venv/bin/pip install prdc==0.2
    /tmp/prdc-venv/bin/python scripts/prdc_fixture.py
"""
import json
import pathlib

import numpy as np
import prdc

K = 3
D = 16
rng = np.random.default_rng(20201)
centres = rng.normal(0.0, 3.0, size=(4, D))


def mixture(n, which, scale):
    c = rng.choice(which, size=n)
    return centres[c] + scale * rng.normal(size=(n, D)) + 5.0


# Real: three modes. Generated: two of them, tighter, plus a mode the real data lacks.
real = mixture(300, [0, 1, 2], 1.0)
fake = np.concatenate([mixture(200, [0, 1], 0.8), mixture(50, [3], 1.0)])
rng.shuffle(fake)
# Exactly the f32 values written below.
as_text = lambda a: [[float(str(np.float32(v))) for v in row] for row in a]
real_t, fake_t = as_text(real), as_text(fake)
real = np.array(real_t, dtype=np.float32).astype(np.float64)
fake = np.array(fake_t, dtype=np.float32).astype(np.float64)

scores = prdc.compute_prdc(real, fake, nearest_k=K)
real_r = prdc.prdc.compute_nearest_neighbour_distances(real, K)
fake_r = prdc.prdc.compute_nearest_neighbour_distances(fake, K)

# No pair may sit on a ball's boundary within rounding: the comparison must be unambiguous.
d = np.sqrt(((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1))
gap = min(np.abs(d - real_r[:, None]).min() / real_r.min(), np.abs(d - fake_r[None, :]).min() / fake_r.min())
assert gap > 1e-6, f"a pair lies within {gap} of a ball boundary: pick another seed"

out = {
    "source": "prdc 0.2 (pip install prdc), compute_prdc(real, fake, nearest_k=3); scripts/prdc_fixture.py",
    "nearest_k": K,
    "d": D,
    "real": real_t,
    "fake": fake_t,
    "real_radii": real_r.tolist(),
    "fake_radii": fake_r.tolist(),
    **{k: float(v) for k, v in scores.items()},
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "prdc_k3.json"
path.write_text(json.dumps(out) + "\n")
print(path, {k: round(float(v), 4) for k, v in scores.items()}, f"boundary gap {gap:.2e}")
