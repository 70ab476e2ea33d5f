"""Online gradients of this package and of the published braintrace, side by side, on the same models.

Each model is written with public names that both packages share. The script runs itself once
per Python interpreter (``--ours``, default the current one, and ``--published``, an interpreter whose
environment has the published package, e.g. ``pip install braintrace==0.2.6`` in its own venv), saves
the gradients, and prints, per model and rule, the relative difference between the two and each one's
relative error against BPTT (float64).

    python ci/compare_published_grads.py --published /path/to/venv/bin/python

The interpreters import ``braintrace`` from their own environments: the script lives outside the
package, so this checkout is not on either one's path unless installed there. The models are those
of ``side_by_side_models.small_models`` (written with the names both packages share).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from side_by_side_models import SMALL_B as B
from side_by_side_models import SMALL_H as H
from side_by_side_models import SMALL_I as I
from side_by_side_models import small_models

T = 6


def _worker(out_path):
    import brainstate
    import jax
    import jax.numpy as jnp
    import numpy as np

    import braintrace

    jax.config.update("jax_enable_x64", True)
    brainstate.environ.set(precision=64)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(T, B, I)))
    ys = jnp.asarray(rng.normal(size=(T, B, H)))
    loss = lambda o, y: 0.5 * jnp.sum((o - y) ** 2)  # noqa: E731
    results = {"version": getattr(braintrace, "__version__", "?")}
    for name, (cls, plain, weights) in small_models().items():

        def bptt(ws):
            h, acc = jnp.zeros((B, H)), 0.0
            for t in range(T):
                h, out = plain(ws, xs[t], h)
                acc = acc + loss(h if out is None else out, ys[t])
            return acc

        results[f"{name}/bptt"] = {k: np.asarray(v).tolist() for k, v in jax.grad(bptt)(weights).items()}
        rules = [("D_RTRL", "single-step", 1), ("D_RTRL", "multi-step", 1), ("D_RTRL", "multi-step", 2)]
        rules += [("D_RTRL", "multi-step", T), ("ES_D_RTRL", "single-step", 1)]
        for alg_name, vjp, k in rules:
            model = cls()
            brainstate.nn.init_all_states(model, batch_size=B)
            kwargs = {"decay_or_rank": 0.7} if alg_name == "ES_D_RTRL" else {}
            alg = getattr(braintrace, alg_name)(model, vjp_method=vjp, **kwargs)
            alg.compile_graph(xs[0])
            params = model.states(brainstate.ParamState)
            total = {key: 0.0 for key in params}
            for s in range(0, T, k):
                if vjp == "multi-step":
                    window = braintrace.MultiStepData(xs[s : s + k])
                    f = lambda: jax.vmap(loss)(alg(window), ys[s : s + k]).sum()  # noqa: E731
                else:
                    f = lambda: loss(alg(xs[s]), ys[s])  # noqa: E731
                g = brainstate.transform.grad(f, params)()
                total = {key: total[key] + g[key] for key in params}
            results[f"{name}/{alg_name}/{vjp}/K={k}"] = {
                key[-1]: np.asarray(v).tolist() for key, v in total.items()
            }
        model = cls()
        brainstate.nn.init_all_states(model, batch_size=B)
        alg = braintrace.D_RTRL(model)
        alg.compile_graph(xs[0])
        grads = alg.etrace_grad(xs, ys, step_fn=lambda x, y: loss(alg(x), y))  # noqa: B023
        results[f"{name}/etrace_grad/step_fn runs the learner/mean"] = {
            key[-1]: np.asarray(v).tolist() for key, v in grads.items()
        }
    with open(out_path, "w") as f:
        json.dump(results, f)


def _rel(a, b):
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", default=sys.executable)
    parser.add_argument(
        "--published", required=True, help="a Python whose environment has the published package"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, python in (("ours", args.ours), ("published", args.published)):
            out = os.path.join(tmp, f"{label}.json")
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
            subprocess.run(
                [python, os.path.abspath(__file__), "--published", "-", "--worker", out],
                check=True,
                env=env,
                cwd=tmp,
            )
            with open(out) as f:
                runs[label] = json.load(f)
    ours, pub = runs["ours"], runs["published"]
    print(f"ours {ours.pop('version')} vs published {pub.pop('version')} (float64, T={T}, batch {B})")
    head = ("model / rule", "param", "ours vs published", "ours vs BPTT", "published vs BPTT")
    print(f"{head[0]:<44} {head[1]:>5} {head[2]:>18} {head[3]:>13} {head[4]:>18}")
    for key in ours:
        if key.endswith("/bptt"):
            continue
        bptt = ours[key.split("/")[0] + "/bptt"]
        if key.endswith("/mean"):  # the published driver's default reduction: the mean over the steps
            bptt = {p: (np.asarray(v) / T).tolist() for p, v in bptt.items()}
        for p in ours[key]:
            print(
                f"{key:<44} {p:>5} {_rel(ours[key][p], pub[key][p]):>18.2e} "
                f"{_rel(ours[key][p], bptt[p]):>13.2e} {_rel(pub[key][p], bptt[p]):>18.2e}"
            )


if __name__ == "__main__":
    main()
