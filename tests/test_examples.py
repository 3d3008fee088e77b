"""The scripts in ``examples/`` run end to end (quick mode) and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (``examples/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(obj: object, path: str = "") -> list[tuple[str, object]]:
    """Every leaf of a JSON value that is a number or ``None``, with its path."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in numbers(v, f"{path}[{i}]")]
    if obj is None or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        return [(path, obj)]
    return []


def test_online_regression_quick(tmp_path):
    example = load_example("online_regression")
    samples = [0, 5, 10]
    report = example.run(tmp_path, samples, nuts_samples=30, nuts_warmup=30, chains=1, seed=0, progress=False)

    png, js = tmp_path / "online_regression.png", tmp_path / "online_regression.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    assert data["results"].keys() == {str(n) for n in samples} == report["results"].keys()
    assert len(data["grid"]) == 50

    for n in samples:
        entry = data["results"][str(n)]
        assert entry.keys() == {"kbt_block", "kbt_diag", "nuts"}
        for method in entry.values():
            assert len(method["mean"]) == len(method["std"]) == 50
            assert min(method["std"]) > 0
        for cov in ("block", "diag"):
            r = entry[f"kbt_{cov}"]
            assert r["n_updates"] == n
            assert 0 < r["std_ratio_min"] <= r["std_ratio_max"]
        assert (entry["nuts"]["max_rhat"] is None) == (n == 0)

    leaves = numbers(data["results"])
    assert leaves
    for path, value in leaves:
        if value is None:
            assert path.endswith("nuts.max_rhat"), path
        else:
            assert math.isfinite(value), (path, value)

    # n = 0: the Kalman guide's predictive is the exact prior predictive (one hidden layer, deterministic
    # input), and the 30 prior draws are an unbiased estimate of it; 5 MC standard errors.
    prior = data["results"]["0"]
    assert prior["kbt_block"]["max_mean_err_over_nuts_std"] < 5 / math.sqrt(30)

    assert "n" in example.format_table(report)


def test_online_regression_flags_unconverged_nuts(tmp_path, monkeypatch):
    """A quick run's NUTS (1 chain x 30 draws) is flagged on its panel, and the figure says smoke test."""
    example = load_example("online_regression")
    titles: list[str] = []
    save = example.Figure.savefig

    def capture(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        titles.append(fig._suptitle.get_text())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(example.Figure, "savefig", capture)
    report = example.run(tmp_path, [0, 5], nuts_samples=30, nuts_warmup=30, chains=1, seed=0, progress=False,
                         smoke_test=True)  # fmt: skip
    rhat = report["results"]["5"]["nuts"]["max_rhat"]
    assert rhat is not None and math.isfinite(rhat)
    flagged = [t for t in titles if "NUTS NOT CONVERGED" in t]
    assert bool(flagged) == (rhat > example.RHAT_OK)
    assert "SMOKE TEST (--quick): not a result" in titles[-1]
    assert report["config"]["smoke_test"] is True
