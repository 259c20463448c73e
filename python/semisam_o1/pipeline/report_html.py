"""``WORK/final/report.html``: one static page (no server, no external file but the pictures
beside it) with the run's settings, the Dice by round, the montage and the per-case table,
sortable by any column (a few lines of inline JavaScript), each case linking to its label file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from semisam_o1.core.files import atomic_path

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
details { margin: 0.5em 0 1.5em; }
"""

# sorts table #cases by the clicked column: numbers numerically (empty cells last), text otherwise
_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.dir !== 'up';
    th.dataset.dir = up ? 'up' : 'down';
    rows.sort(function (a, b) {
      var x = a.cells[col].textContent, y = b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (x === '' || y === '') return (x === '') - (y === '');
      var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return up ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _dice_table(report: dict) -> str:
    """Rows: round; columns: mean pool Dice of the pseudo-labels (diagnostic) and test Dice per class."""
    names = []
    for entry in report.get("rounds", []):
        for name in ((entry.get("test_metrics") or {}).get("dice") or {}):
            if name not in names:
                names.append(name)
    head = "".join(f"<th>test Dice {_e(n)}</th>" for n in names)
    rows = []
    for entry in report.get("rounds", []):
        pool = (entry.get("pseudo_label_dice_unlabeled") or {}).get("mean_foreground_dice")
        dice = (entry.get("test_metrics") or {}).get("dice") or {}
        cells = "".join(f'<td class="num">{_num(dice.get(n))}</td>' for n in names)
        rows.append(f'<tr><td>{entry["round"]}</td><td class="num">{_num(pool)}</td>{cells}</tr>')
    return (f"<table><thead><tr><th>round</th><th>pool Dice of pseudo-labels (real labels, diagnostic)</th>"
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _cases_table(final: dict) -> str:
    """The per-case table: rank, case, agreement, foreground entropy, real Dice where known, label link."""
    labels = final.get("labels", {})
    rows = []
    for rank, r in enumerate(final.get("quality", []), start=1):
        link = labels.get(r["case"])
        cell = f'<a href="{_e(link)}">{_e(link)}</a>' if link else ""
        rows.append(f'<tr><td class="num">{rank}</td><td>{_e(r["case"])}</td>'
                    f'<td class="num">{_num(r.get("agreement"))}</td>'
                    f'<td class="num">{_num(r.get("foreground_entropy"))}</td>'
                    f'<td class="num">{_num(r.get("dice_real"))}</td><td>{cell}</td></tr>')
    return ('<table id="cases" class="sortable"><thead><tr><th>rank</th><th>case</th>'
            "<th>agreement (round 0 vs network)</th><th>foreground entropy (nats)</th>"
            "<th>Dice vs real label (diagnostic)</th><th>label file</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def render(report: dict, settings: dict | None = None) -> str:
    """The page's HTML for a ``report.json`` dict that has a ``final`` entry."""
    final = report.get("final", {})
    settings_json = json.dumps(settings if settings is not None else report.get("config", {}), indent=1,
                               default=str)
    pictures = "".join(f'<p><img src="{name}" alt="{alt}"></p>' for name, alt in
                       (("report_dice_by_round.png", "Dice by round"), ("report_montage.png", "montage")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>semisam-o1 report</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style></head>
<body>
<h1>semisam-o1 report</h1>
<p>{_e(report.get("method"))}. Template <b>{_e(report.get("template"))}</b>, {_e(report.get("n_unlabeled"))}
pool cases, {_e(report.get("n_test"))} test cases. Labels and model from round <b>{_e(final.get("round"))}</b>
({_e(final.get("reason"))}): <a href="labels/">labels/</a>, <a href="model/">model/</a>,
<a href="cases.csv">cases.csv</a>, <a href="report.json">report.json</a>.</p>
<h2>Cases to check first</h2>
<p>Sorted by agreement between each case's round-0 pseudo-label and the network's prediction (Dice, low
first): where the two disagree, one of them is wrong. Click a column to sort by it.</p>
{_cases_table(final)}
<h2>Dice by round</h2>
{_dice_table(report)}
{pictures}
<h2>Settings</h2>
<details><summary>the run's settings</summary><pre>{_e(settings_json)}</pre></details>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_page(path: Path, report: dict, settings: dict | None = None) -> Path:
    """Write :func:`render`'s page to ``path`` atomically; returns ``path``."""

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(render(report, settings), encoding="utf-8")
    return path
