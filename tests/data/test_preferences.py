"""dpo/data/preferences.py: label and score layouts read the right way round, row by row, in the exact
shapes of PKU-SafeRLHF, SHP, HelpSteer2, a `preference` column, chosen/rejected scores and raw
UltraFeedback; ties and contradicting scores are dropped and counted; anything that could be read
two ways stops with one line. The training proof (held-out reward accuracy through recipes/dpo_any.py)
is tests/recipes/test_recipe_generic.py::test_label_layout_trains_the_preferred_answer_up_and_an_inverted_label_down."""

import json

import pytest
from datasets import Dataset
from helpers import (
    ROOT,
    helpsteer2_preference_rows,
    load_recipe,
    one_line_error,
    pku_rows,
    qa,
    shp_rows,
    ultrafeedback_raw_rows,
)

from dpo.data import doctor
from dpo.data.doctor import check_data
from dpo.data.pairs import Columns, to_pairs
from dpo.data.preferences import CONTRADICTS, TIE, TOO_FEW
from dpo.offline.tiny import write_jsonl

N = 9  # three full cycles of where the better response sits (helpers._good_first)


def answers(pairs) -> list[tuple[str, str]]:
    """(chosen, rejected) text of every pair, chat or text format."""
    text = [
        (c, r) if isinstance(c, str) else (c[-1]["content"], r[-1]["content"])
        for c, r in zip(pairs["chosen"], pairs["rejected"])
    ]
    return text


def expected(n: int) -> list[tuple[str, str]]:
    return [qa(i)[1:] for i in range(n)]


def preference_rows(n):
    """A generic `preference` column naming the better response by its column suffix (a / b)."""
    rows = []
    for row in pku_rows(n):
        rows.append(
            {
                "prompt": row["prompt"],
                "response_a": row["response_0"],
                "response_b": row["response_1"],
                "preference": "a" if row["better_response_id"] == 0 else "B",  # either case
            }
        )
    return rows


def scored_rows(n):
    """Two responses and a score each, no label: the higher score wins."""
    return [
        {
            "prompt": r["prompt"],
            "response_a": r["response_0"],
            "response_b": r["response_1"],
            "score_a": 9.0 if r["better_response_id"] == 0 else 2.5,
            "score_b": 2.5 if r["better_response_id"] == 0 else 9.0,
        }
        for r in pku_rows(n)
    ]


def chosen_scored_rows(n):
    return [
        {"prompt": q, "chosen": good, "rejected": bad, "chosen_score": 8, "rejected_score": 3}
        for q, good, bad in map(qa, range(n))
    ]


@pytest.mark.parametrize(
    "rows, columns, how",
    [
        (
            pku_rows(N),
            Columns(label="better_response_id"),
            "the better of response_0 / response_1 by better_response_id",
        ),
        (
            shp_rows(N),
            Columns(),
            "prompt=history, chosen = the better of human_ref_A / human_ref_B by labels, checked by score_A / score_B",
        ),
        (helpsteer2_preference_rows(N), Columns(), "by preference_strength"),
        (preference_rows(N), Columns(), "the better of response_a / response_b by preference"),
        (scored_rows(N), Columns(), "the higher-scored of response_a / response_b by score_a / score_b"),
        (chosen_scored_rows(N), Columns(), "checked by chosen_score / rejected_score"),
        (ultrafeedback_raw_rows(N), Columns(), "best vs worst of completions by 'overall_score'"),
    ],
    ids=[
        "pku",
        "shp",
        "helpsteer2",
        "preference_column",
        "score_columns",
        "chosen_rejected_scores",
        "ultrafeedback_completions",
    ],
)
@pytest.mark.parametrize("prompt_format", ["chat", "text"])
def test_each_layout_is_oriented_row_by_row(rows, columns, how, prompt_format):
    pairs, layout = to_pairs(Dataset.from_list(rows), "d.jsonl", columns, prompt_format=prompt_format)
    assert answers(pairs) == expected(N)  # every row: the good answer chosen, the bad one rejected
    assert set(pairs["problem"]) == {""}
    assert how in layout.describe()


def test_pku_safer_response_id_orients_by_safety():
    rows = pku_rows(N)
    pairs, _ = to_pairs(Dataset.from_list(rows), "pku.jsonl", Columns(label="safer_response_id"))
    for (chosen, rejected), row in zip(answers(pairs), rows):
        safer = row[f"response_{row['safer_response_id']}"]
        assert chosen == safer and rejected != safer


def test_pku_with_two_labels_asks_which_one_in_one_line(tmp_path, capsys):
    path = write_jsonl(pku_rows(4), tmp_path / "pku.jsonl")
    line = one_line_error(doctor.main, [path], capsys)
    assert str(path) in line and "better_response_id" in line and "safer_response_id" in line, line
    assert "label_column" in line and "chosen_column" not in line, line  # the old hint trained 4 of 6 backwards


def test_pku_responses_mapped_as_chosen_and_rejected_are_refused(tmp_path, capsys):
    """What the old hint told PKU users to do: it ignored better_response_id and reversed the pairs it points the other way."""
    path = write_jsonl(pku_rows(4), tmp_path / "pku.jsonl")
    line = one_line_error(
        doctor.main, [path, "--chosen_column", "response_0", "--rejected_column", "response_1"], capsys
    )
    assert "are not chosen / rejected" in line and "label_column: better_response_id" in line, line


def test_ties_and_contradicting_scores_are_dropped_and_counted(tmp_path):
    uf = ultrafeedback_raw_rows(4)
    uf[1]["completions"] = [{**c, "overall_score": 5.0} for c in uf[1]["completions"]]  # row 2: all tied
    uf[2]["completions"] = uf[2]["completions"][:1]  # row 3: one completion
    hs = helpsteer2_preference_rows(4)
    hs[3]["preference_strength"] = 0  # row 4: a tie
    shp = shp_rows(4)
    shp[0]["score_A"], shp[0]["score_B"] = shp[0]["score_B"], shp[0]["score_A"]  # row 1: scores against the label
    scored = chosen_scored_rows(4)
    scored[1]["chosen_score"] = 1  # row 2: the scores say rejected is better
    scored[2]["chosen_score"] = scored[2]["rejected_score"]  # row 3: a tie
    for rows, drops in (
        (uf, [(2, TIE), (3, TOO_FEW)]),
        (hs, [(4, TIE)]),
        (shp, [(1, CONTRADICTS)]),
        (scored, [(2, CONTRADICTS), (3, TIE)]),
    ):
        report = check_data(Dataset.from_list(rows), "d.jsonl")
        assert report.drops == drops
        assert report.rows_in == len(rows) == report.rows_kept + report.rows_dropped
        for row, reason in drops:
            assert f"{reason}: row {row}" in report.table()


def test_a_label_that_names_no_response_names_file_row_and_field(tmp_path, capsys):
    rows = preference_rows(3)
    rows[1]["preference"] = "c"
    path = write_jsonl(rows, tmp_path / "pref.jsonl")
    line = one_line_error(doctor.main, [path], capsys)
    assert f"{path}, row 2, field 'preference': expected a (response_a is better), b" in line, line
    rows = ultrafeedback_raw_rows(3)
    rows[2]["completions"][1]["overall_score"] = "N/A"
    path = write_jsonl(rows, tmp_path / "uf.jsonl")
    line = one_line_error(doctor.main, [path], capsys)
    assert f"{path}, row 3, field 'completions[1].overall_score': expected a number" in line, line


def test_labels_and_scores_in_a_csv_are_read_from_their_text(tmp_path):
    """CSV cells are text: "0" / "1" labels and "4.5" scores are read as the numbers they spell."""
    path = tmp_path / "pku.csv"
    rows = pku_rows(N)
    header = ["prompt", "response_0", "response_1", "better_response_id"]
    path.write_text(
        "\n".join([",".join(header)] + [",".join(json.dumps(str(r[h])) for h in header) for r in rows]) + "\n"
    )
    report = doctor.main([str(path)])
    assert answers(report.kept) == expected(N)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label_column", "verdict"], "label_column: 'verdict' is not a column; the data has"),
        (["--score_columns", "score_a"], "score_columns: name 2 columns, a score per response; got ['score_a']"),
        (["--score_columns", "score_a", "points_b"], "score_columns: ['points_b'] not a column"),
    ],
    ids=["unknown_label_column", "one_score_column_for_two_responses", "unknown_score_column"],
)
def test_unknown_label_or_score_columns_are_one_line_naming_file_and_setting(flags, message, tmp_path, capsys):
    path = write_jsonl(scored_rows(3), tmp_path / "scored.jsonl")
    line = one_line_error(doctor.main, [path, *flags], capsys)
    assert str(path) in line and message in line, line


def test_label_and_score_settings_flow_through_the_recipes_yaml(tmp_path, tiny_model_dir, capsys, no_weights_load):
    """label_column / score_columns are ScriptArguments fields: YAML keys, parsed by TrlParser like the others,
    and a wrong one stops the recipe in one line before any weights load."""
    from dpo.compat import ModelConfig
    from dpo.train.config import RecipeDPOConfig, parse_recipe_args

    recipe = load_recipe("dpo_any")
    yaml = tmp_path / "mine.yaml"
    shipped = (ROOT / "recipes" / "dpo_any.yaml").read_text()
    assert "label_column: null" in shipped and "score_columns: null" in shipped  # listed with the other columns
    yaml.write_text(
        shipped.replace("label_column: null", "label_column: better_response_id").replace(
            "score_columns: null", "score_columns: [score_a, score_b]"
        )
    )
    script, *_ = parse_recipe_args((recipe.ScriptArguments, RecipeDPOConfig, ModelConfig), yaml, [])
    assert script.label_column == "better_response_id" and script.score_columns == ["score_a", "score_b"]

    path = write_jsonl(pku_rows(4), tmp_path / "pku.jsonl")
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", path, "--output_dir", tmp_path / "out"]
    line = one_line_error(recipe.main, [*argv, "--label_column", "harmless_id"], capsys)
    assert f"{path}: label_column: 'harmless_id' is not a column" in line, line


def test_an_empty_completions_list_in_row_1_is_a_dropped_row_not_the_layout(tmp_path):
    """Was: row 1's `completions: []` decided the data had no completions, and the file was refused as missing
    chosen and rejected."""
    rows = ultrafeedback_raw_rows(4)
    rows[0]["completions"] = []
    pairs, _ = to_pairs(Dataset.from_list(rows), "uf")
    assert pairs[0]["problem"] == TOO_FEW and all(not p for p in pairs["problem"][1:])
