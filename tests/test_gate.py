"""`mlkit.gate`: the promotion gate judges plain evidence, check by check, in a fixed order; the paired test on the rows
both versions held out; `fit`'s record of the rows it stopped on."""
import json

import numpy as np
import pytest

from mlkit.gate import Evidence, GateFailed, Paired, judge, paired_bootstrap, parse_floors, row_scores
from mlkit.tasks import classification_metrics, regression_metrics


def checks(res) -> dict:
    return {c.name: c.passed for c in res.checks}


def test_the_checks_run_in_order_and_all_are_reported():
    res = judge("m", Evidence("5", {"test_accuracy": 0.4}, "d1", "false", retired=True), None, "test_accuracy",
                floors="test_accuracy>=0.5, test_loss<=1")
    assert [c.name for c in res.checks] == ["not_retired", "contract", "loaded_back", "floor test_accuracy>=0.5", "floor test_loss<=1.0",
                                            "beats_champion"]
    assert checks(res) == {"not_retired": False, "contract": False, "loaded_back": False, "floor test_accuracy>=0.5": False,
                           "floor test_loss<=1.0": False, "beats_champion": True}  # no champion: nothing to beat
    assert not res.passed and res.summary().splitlines()[0] == "m version 5 vs champion (none): gate FAILED"
    assert res.to_dict()["passed"] is False and len(res.to_dict()["checks"]) == 6


@pytest.mark.parametrize("mine,theirs,direction,margin,ok", [
    (0.93, 0.90, "max", 0.0, True), (0.93, 0.90, "max", 0.05, False), (0.89, 0.90, "max", 0.0, False),
    (0.20, 0.30, "min", 0.0, True), (0.20, 0.30, "min", 0.2, False), (0.35, 0.30, "min", 0.0, False)])
def test_the_candidate_must_beat_the_champion_by_the_margin(mine, theirs, direction, margin, ok):
    res = judge("m", Evidence("2", {"metric": mine}, "d1", "true", loaded_back="passed"), Evidence("1", {"metric": theirs}, "d1", "true", loaded_back="passed"), "metric", direction, margin)
    assert checks(res)["beats_champion"] is ok and res.champion == "1"


def test_metrics_of_different_data_do_not_compare():
    res = judge("m", Evidence("2", {"acc": 0.99}, "d2", "true", loaded_back="passed"), Evidence("1", {"acc": 0.5}, "d1", "true", loaded_back="passed"), "acc")
    assert not res.passed and "evaluated on another data version" in res.checks[-1].detail


def test_a_missing_metric_and_an_unrecorded_contract_fail():
    res = judge("m", Evidence("2", {}, "d1", None), Evidence("1", {"acc": 0.5}, "d1", "true", loaded_back="passed"), "acc")
    assert res.checks[1].detail == "data contract result: not recorded" and "acc is not a metric of version 2 (classification; its run has none)" in res.checks[-1].detail


def test_the_champion_itself_is_judged_on_its_floors_only():
    res = judge("m", Evidence("1", {"acc": 0.9}, "d1", "true", loaded_back="passed"), Evidence("1"), "acc", floors="acc>=0.5")
    assert res.passed and res.checks[-1].detail == "no other champion; acc = 0.9"


def test_a_refusal_carries_every_check():
    res = judge("m", Evidence("2", {"acc": 0.1}, "d1", "true", loaded_back="passed"), None, "acc", floors="acc>=0.5")
    e = GateFailed(res)
    assert e.result is res and "FAIL floor acc>=0.5: acc = 0.1" in str(e)


@pytest.mark.parametrize("text", ["accuracy > 0.8", "acc>=", ">=0.5", "acc>=0.5;loss<=1"])
def test_bad_floors_name_the_setting(text):
    with pytest.raises(ValueError, match=r"\[gate\] floors"): parse_floors(text)


def test_a_version_without_the_load_back_record_is_refused():
    champ = Evidence("1", {"acc": 0.5}, "d1", "true", loaded_back="passed")
    res = judge("m", Evidence("2", {"acc": 0.9}, "d1", "true"), champ, "acc")  # better, but never loaded back
    assert checks(res) == {"not_retired": True, "contract": True, "loaded_back": False, "beats_champion": True} and not res.passed
    assert "no record that its bundle loaded back in a fresh interpreter (not recorded)" in res.checks[2].detail
    assert judge("m", Evidence("2", {"acc": 0.9}, "d1", "true", loaded_back="passed"), champ, "acc").passed


# --- the same rows, the paired test and the held-out record (issue 19) ---
HELD = {"stopping_rows": "val", "val_rows": 50}


def test_a_tie_never_promotes_even_with_a_margin_of_zero():
    champ = Evidence("1", {"acc": 0.9}, "d1", "true", loaded_back="passed")
    res = judge("m", Evidence("2", {"acc": 0.9}, "d1", "true", loaded_back="passed"), champ, "acc", margin=0.0)
    assert checks(res)["beats_champion"] is False and not res.passed


@pytest.mark.parametrize("held,passed,says", [
    (HELD, True, "early stopping on the validation rows, 50 validation rows"),
    ({**HELD, "stopping_rows": "none"}, True, "early stopping on no rows"),
    ({**HELD, "stopping_rows": "test"}, False, "early-stopped on the test rows"),
    ({**HELD, "stopping_rows": "unknown"}, False, "train with mlkit.train.fit"),
    ({**HELD, "stopping_rows": None}, False, "(mlkit.fit.stopping_rows: not recorded)"),
    ({**HELD, "val_rows": 0}, False, "its split kept no validation rows (0)"),
    ({**HELD, "val_rows": None}, False, "its split kept no validation rows (not recorded)"),
    ({**HELD, "selected_by": "test_accuracy"}, False, "a sweep picked it by test_accuracy"),
    ({**HELD, "selected_by": "val_accuracy"}, True, "picked by val_accuracy")])
def test_a_candidate_whose_test_rows_chose_it_is_refused(held, passed, says):
    res = judge("m", Evidence("2", {"acc": 0.9}, "d1", "true", loaded_back="passed", held_out=held), None, "acc")
    check = next(c for c in res.checks if c.name == "held_out")
    assert check.passed is passed and says in check.detail and res.passed is passed, check.detail
    if not passed: assert check.detail.endswith("or promote it with --force and a reason")


def _naive(scores, gain, resamples, confidence, seed=0):
    "The bootstrap written plainly, one resample at a time, from the same random stream."
    rng = np.random.default_rng(seed)
    out = [gain(scores[rng.integers(0, len(scores), len(scores), dtype=np.intp)].mean(0)) for _ in range(resamples)]
    return float(gain(scores.mean(0))), float(np.quantile(out, 1 - confidence, method="lower"))


@pytest.mark.parametrize("n", [40, 5000])  # 5,000 rows: the resamples come in chunks
def test_the_vectorised_bootstrap_is_the_plain_one(n):
    rng = np.random.default_rng(3)
    scores = rng.normal(0.05, 1.0, size=(n, 2))
    gain = lambda m: np.sqrt(m[..., 1] ** 2 + 1) - np.sqrt(m[..., 0] ** 2 + 1)
    point, lower = paired_bootstrap(scores, gain, 1000, 0.9)
    assert (point, lower) == pytest.approx(_naive(scores, gain, 1000, 0.9), abs=1e-12)
    assert paired_bootstrap(scores, gain, 1000, 0.9) == (point, lower)  # seeded
    assert paired_bootstrap(scores, gain, 1000, 0.99)[1] < lower  # more confidence, a lower bound further down


def _metric_gain(kind, metric, direction, y, oc, oh, targets=None):
    scores, gain, _ = row_scores(kind, metric, direction, y, oc, oh, targets=targets)
    return gain(scores.mean(0))


@pytest.mark.parametrize("metric,direction", [("test_accuracy", "max"), ("test_log_loss", "min"), ("test_loss", "min")])
def test_a_classifier_s_row_scores_add_up_to_its_metric(metric, direction):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    oc, oh = (rng.dirichlet([1, 1, 1], 500) for _ in range(2))
    mc, mh = classification_metrics(y, oc), classification_metrics(y, oh)
    key = {"test_loss": "log_loss"}.get(metric, metric[5:])
    expected = mc[key] - mh[key] if direction == "max" else mh[key] - mc[key]
    assert _metric_gain("classification", metric, direction, y, oc, oh) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", ["test_rmse", "test_mae", "test_r2", "test_rmse.b", "test_mae.a", "test_r2.b"])
def test_a_regression_s_row_scores_add_up_to_its_metric(metric):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(300, 2)) * [1.0, 10.0]
    oc, oh = y + rng.normal(size=y.shape), y + 1.3 * rng.normal(size=y.shape)
    mc, mh = regression_metrics(y, oc, ["a", "b"]), regression_metrics(y, oh, ["a", "b"])
    key = metric[5:]
    expected = mc[key] - mh[key] if key.startswith("r2") else mh[key] - mc[key]
    direction = "max" if key.startswith("r2") else "min"
    assert _metric_gain("regression", metric, direction, y, oc, oh, targets=["a", "b"]) == pytest.approx(expected, abs=1e-9)


def test_the_paired_test_decides_beside_the_metric_and_its_numbers_go_to_the_ledger():
    champ = Evidence("1", {"acc": 0.90}, "d1", "true", loaded_back="passed")
    cand = Evidence("2", {"acc": 0.93}, "d1", "true", loaded_back="passed", held_out=HELD)
    rows = lambda d: Paired(len(d), f"the {len(d)} test rows both held out (the same split)", d[:, None], lambda m: m[..., 0],
                            "per-row correctness", rows_sha256="sha256:t")
    clear = judge("m", cand, champ, "acc", paired=rows(np.r_[np.ones(12), np.zeros(188)]), bootstrap=1000)
    assert clear.passed and [c.name for c in clear.checks][-3:] == ["held_out", "beats_champion", "significance"]
    noise = judge("m", cand, champ, "acc", paired=rows(np.r_[np.ones(6), -np.ones(4), np.zeros(190)]), bootstrap=1000)
    assert checks(noise)["beats_champion"] and not checks(noise)["significance"] and not noise.passed
    assert judge("m", cand, champ, "acc", paired=rows(np.r_[np.ones(6), -np.ones(4), np.zeros(190)]), bootstrap=0).passed  # the gain alone
    assert not judge("m", cand, champ, "acc", paired=rows(np.r_[np.ones(12), np.zeros(188)]), margin=0.06, bootstrap=0).passed  # 0.06: not beaten
    record = json.loads(json.dumps(clear.to_dict()))
    assert record["paired"] == {**clear.paired} and set(record["paired"]) == {
        "rows", "rows_sha256", "score", "gain", "lower_bound", "resamples", "confidence", "seed", "metric", "rescored"}
    assert len(json.dumps(record)) < 2000  # no per-row arrays in the ledger


def test_metrics_re_scored_on_the_rows_both_held_out_replace_the_logged_ones():
    champ = Evidence("1", {"acc": 0.99}, "d1", "true", test_rows="sha256:t1", loaded_back="passed")
    cand = Evidence("2", {"acc": 0.80}, "d1", "true", test_rows="sha256:t2", loaded_back="passed")  # logged on other rows: no matter
    p = Paired(80, "80 rows held out by both", np.r_[np.ones(8), np.zeros(72)][:, None], lambda m: m[..., 0], "per-row correctness",
               metrics=(0.95, 0.85))
    res = judge("m", cand, champ, "acc", paired=p, bootstrap=1000)
    assert res.passed and res.checks[-2].detail.startswith("acc 0.95 vs champion v1 0.85 on 80 rows held out by both")
    refused = judge("m", cand, champ, "acc", paired=Paired(refused="only 12 rows held out by both: fewer than 30"), bootstrap=1000)
    assert not refused.passed and refused.checks[-1].detail == "only 12 rows held out by both: fewer than 30" and not refused.paired


def test_fit_records_the_rows_it_stopped_on():
    import torch

    from mlkit.models import TabularMLP
    from mlkit.train import fit, held_out_check, input_digest
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3)).astype(np.float32); y = (X[:, 0] > 0).astype(np.int64)
    parts = {"train": slice(0, 80), "val": slice(80, 100), "test": slice(100, 120)}
    Xs, ys = ({k: a[s] for k, s in parts.items()} for a in (X, y))
    for stop_on, says in [("val", "val"), ("test", "test")]:
        m = TabularMLP(3, 2, hidden=[4])
        fit(m, Xs["train"], ys["train"], Xs[stop_on], ys[stop_on], epochs=2, patience=1, device="cpu", progress=False)
        assert held_out_check(m, Xs["test"], Xs["val"]) == says
    dict_in = {"a": torch.from_numpy(Xs["val"]), "b": Xs["val"][:, :1]}
    assert input_digest(dict_in) == input_digest({"b": Xs["val"][:, :1].astype(np.float64), "a": Xs["val"]})  # by name; as fit reads them
    assert input_digest(Xs["val"]) != input_digest(Xs["test"])
