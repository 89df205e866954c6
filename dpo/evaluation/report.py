"""The evaluation's outputs: metrics.json, generations.jsonl, report.md and report.html.

report.html puts pi_ref's and pi_theta's answers side by side, one row per prompt, greedy and
sampled, with their lengths (and the judge's scores when there is one): quicker to read than
the Markdown table when answers run to paragraphs.
"""

from __future__ import annotations

import html
from pathlib import Path

from dpo.files import file_sha256, json_text, jsonl_text
from dpo.folders import MARKER, marker_problem, read_marker, write_marked_folder

MODES = ("greedy", "sampled")
EVAL_KIND = "evaluation"  # eval/'s marker kind (dpo/folders.py)


def _interval(low: float, high: float, fmt: str = "{:.3f}") -> str:
    return f"[{fmt.format(low)}, {fmt.format(high)}]"


def summary_lines(m: dict) -> list[str]:
    """The headline numbers as Markdown table rows."""
    lines = [
        "| metric | value | 95% interval |",
        "|---|---|---|",
        f"| implicit-reward accuracy ({m['heldout_pairs']} held-out pairs) | {m['reward_accuracy']:.1%} | "
        f"{_interval(*m['reward_accuracy_ci95'], '{:.1%}')} |",
        f"| implicit-reward margin (beta={m['beta']}) | {m['reward_margin']:.4f} | {_interval(*m['reward_margin_ci95'], '{:.4f}')} |",
        f"| KL(pi_theta \\|\\| pi_ref), nats per answer ({m['generation_prompts']} sampled answers) | {m['kl']:.4f} | "
        f"{_interval(*m['kl_ci95'], '{:.4f}')} |",
    ]
    for mode in MODES:
        lines.append(
            f"| {mode} answer length, tokens: pi_ref -> pi_theta | {m[f'{mode}_length_reference']:.1f} -> "
            f"{m[f'{mode}_length_policy']:.1f} (ratio {m[f'{mode}_length_ratio']:.2f}) | |"
        )
    judge = m.get("judge")
    if judge:
        for mode in MODES:
            j = judge[mode]
            lines.append(
                f"| judge win rate of pi_theta over pi_ref, {mode} ({j['n']} prompts, {j['ties']} ties) | "
                f"{j['win_rate']:.1%} | {_interval(j['win_rate_low'], j['win_rate_high'], '{:.1%}')} |"
            )
            lines.append(f"| length-controlled win rate, {mode} | {j['length_controlled_win_rate']:.1%} | |")
    return lines


def markdown(metrics: dict, rows: list[dict]) -> str:
    judge = metrics.get("judge")
    lines = [
        "# Evaluation: pi_theta (this run's adapter) against pi_ref (what it trained against)",
        "",
        *summary_lines(metrics),
        "",
        "A length ratio well above 1 with a small accuracy gain is the signature of length exploitation.",
        f"Judge: {judge['reward_model']}." if judge else "No judge: pass --reward_model to score the answers.",
        "",
        "## Answers (tokens in brackets)",
        "",
    ]
    for i, row in enumerate(rows, 1):
        lines += [f"### Prompt {i}", "", "```", row["prompt"], "```", ""]
        lines += ["| | pi_ref | pi_theta |", "|---|---|---|"]
        for mode in MODES:
            cells = []
            for name in ("reference", "policy"):
                text = row[f"{mode}_{name}"].strip().replace("\n", "<br>").replace("|", "\\|")
                extra = f", score {row[f'{mode}_{name}_score']:.3f}" if f"{mode}_{name}_score" in row else ""
                cells.append(f"{text} ({row[f'{mode}_{name}_tokens']}{extra})")
            lines.append(f"| {mode} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines)


def page(metrics: dict, rows: list[dict]) -> str:
    """A self-contained HTML page: the summary, then the answers side by side."""
    esc = html.escape
    head = "".join(
        f"<tr>{''.join(f'<td>{esc(c.strip())}</td>' for c in line.strip('|').split(' | '))}</tr>"
        for line in summary_lines(metrics)[2:]
    )
    body = []
    for i, row in enumerate(rows, 1):
        body.append(
            f"<h3>Prompt {i}</h3><pre>{esc(row['prompt'])}</pre><table class=pair><tr><th></th><th>pi_ref</th><th>pi_theta</th></tr>"
        )
        for mode in MODES:
            cells = []
            for name in ("reference", "policy"):
                score = row.get(f"{mode}_{name}_score")
                note = f"{row[f'{mode}_{name}_tokens']} tokens" + (f", score {score:.3f}" if score is not None else "")
                cells.append(f"<td><pre>{esc(row[f'{mode}_{name}'])}</pre><small>{note}</small></td>")
            body.append(f"<tr><th>{mode}</th>{''.join(cells)}</tr>")
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;width:100%}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}table.pair td{width:48%}"
        "pre{white-space:pre-wrap;margin:0}"
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>evaluation</title><style>{style}</style></head><body>"
        f"<h1>pi_ref vs pi_theta</h1><table>{head}</table>{''.join(body)}</body></html>\n"
    )


def run_identity(output_dir: str | Path) -> str | None:
    """The sha256 of the run's run_complete.json, which records the sha256 of every final file (adapter, config,
    held-out pairs): it changes whenever the folder is trained again. None when the run has none."""
    from dpo.train.safety.runs import RUN_MARKER

    marker = Path(output_dir) / RUN_MARKER
    return file_sha256(marker) if marker.is_file() and not marker.is_symlink() else None


def evaluation_of_run(output_dir: str | Path) -> tuple[Path | None, str | None]:
    """(eval/metrics.json, None) when eval/ is whole and was made from the run now in `output_dir`; (None, why not)
    when eval/ exists but is not (trained again since, a file changed, not written by `python -m dpo.evaluate`);
    (None, None) when there is no eval/. The model card and the Hub upload (dpo/evaluation/export.py) take eval/
    only in the first case, so a card never reports the numbers of an adapter it does not ship."""
    folder = Path(output_dir) / "eval"
    if not folder.exists():
        return None, None
    rerun = "rerun python -m dpo.evaluate to replace it"
    if problem := marker_problem(folder, EVAL_KIND):
        return None, f"{problem}; {rerun}"
    made_from, now = read_marker(folder, EVAL_KIND).get("evaluated_run"), run_identity(output_dir)
    if made_from is None or made_from != now:
        what = (
            "records no run it evaluated (an older version wrote it)"
            if made_from is None
            else ("was made from an earlier run in this folder (its run_complete.json changed since: trained again)")
        )
        return None, f"{folder} {what} ({folder / MARKER}); {rerun}"
    return folder / "metrics.json", None


def write_eval_folder(output_dir: str | Path, metrics: dict, rows: list[dict], evaluated_run: str | None) -> Path:
    """output_dir/eval/{metrics.json, generations.jsonl, report.md, report.html}, written whole and marked
    (dpo/folders.py) with `evaluated_run`, the run_identity read when the evaluation checked the run (checked by
    evaluation_of_run): an eval folder the evaluation did not write is never replaced."""

    target = Path(output_dir) / "eval"  # named in the log should a metric be written as null

    def write(folder: Path) -> None:
        (folder / "metrics.json").write_text(
            json_text(metrics, target / "metrics.json", observations=True, indent=2, sort_keys=True) + "\n"
        )
        (folder / "generations.jsonl").write_text(jsonl_text(rows, target / "generations.jsonl", observations=True))
        (folder / "report.md").write_text(markdown(metrics, rows))
        (folder / "report.html").write_text(page(metrics, rows))

    return write_marked_folder(target, write, EVAL_KIND, made_by="python -m dpo.evaluate", evaluated_run=evaluated_run)
