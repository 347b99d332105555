"""`mlkit.gate`: the promotion gate judges plain evidence, check by check, in a fixed order."""
import pytest

from mlkit.gate import Evidence, GateFailed, judge, parse_floors


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
