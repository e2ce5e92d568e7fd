"""RUN/index.html: one page to look at a training run, rewritten (atomically) at each checkpoint.

Built from the run folder's own files only, so any run folder can be given a page: the settings
(config.json), the loss and evaluation curves (loss.png, eval.png), the latest evaluation's numbers and
samples (metrics.jsonl, RUN/eval/step_XXXXXXX/), the latest previews (previews/), the data statistics
(data_stats.json) and links to the exported models and checkpoints. One HTML file with its style inline and
no script; every image and link is a relative path inside the run folder, so the page reads from a file
browser (file://) without a server. Videos show as their GIFs.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from urllib.parse import quote

from pipelines.errors import GentronError
from pipelines.files import atomic_write_bytes, read_json
from pipelines.model_folder import PIPELINE_FILE
from pipelines.train import checkpoint as ckpt
from pipelines.train.evaluation import latest_eval_folder
from pipelines.train.metrics import EVAL_LABELS, eval_records, metric_values, read_metrics

PAGE = "index.html"
MAX_SAMPLES = 64  # evaluation samples shown on the page (the folder holds them all)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; } .curves img { max-width: 100%; margin-right: 1em; }
.samples { display: flex; flex-wrap: wrap; gap: 0.8em; } figure { margin: 0; width: 10.5em; }
figure img { width: 10em; image-rendering: pixelated; border: 1px solid #ccc; } figcaption { font-size: 0.8em; }
img.preview { max-width: 100%; min-width: 16em; image-rendering: pixelated; border: 1px solid #ccc; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def relative_to(run_dir: Path, path: Path) -> str:
    """`path` inside the run folder, relative to it; either may be given relative to the working folder or absolute
    (the trainer records its run folders absolute, `gentron quickstart`'s default folder is relative)."""
    return Path(path).absolute().relative_to(Path(run_dir).absolute()).as_posix()


def href(run_dir: Path, path: Path) -> str:
    """The relative, URL-quoted address of `path` (inside the run folder); folders end with a slash."""
    return quote(relative_to(run_dir, path)) + ("/" if Path(path).is_dir() else "")


def link(run_dir: Path, path: Path, text: str | None = None) -> str:
    label = text if text is not None else relative_to(run_dir, path)
    return f'<a href="{href(run_dir, path)}">{escape(label)}</a>'


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escape(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _read_json(path: Path):
    """A JSON file the page shows, or None: a run page is written whatever state the run folder is in."""
    try:
        return read_json(path, "run file", "", expect=None)
    except GentronError:
        return None


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value, numeric: bool = False) -> str:
    return f'<td class="num">{_number(value)}</td>' if numeric else f"<td>{value}</td>"


def _latest_step_file(folder: Path, suffix: str) -> Path | None:
    found = sorted(
        (int(m.group(1)), p)
        for p in folder.glob(f"step_*{suffix}")
        if (m := ckpt.STEP_RE.match(p.name[: -len(suffix)]))
    )
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- sections


def _header(run_dir: Path, config: dict, records: list[dict]) -> str:
    losses = [r for r in records if "loss" in r]
    latest = ckpt.latest_checkpoint(run_dir)
    state = _read_json(latest / "state.json") if latest is not None else None
    step = state.get("step") if isinstance(state, dict) else (losses[-1]["step"] if losses else 0)
    parts = [
        f"<h1>{escape(run_dir.resolve().name)}</h1>",
        f'<p class="muted">{escape(config.get("stage", "?"))} run, step {_number(step)} of '
        f"{_number(config.get('steps', '?'))}; "
        f"page written {escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
    ]
    if losses:
        last = losses[-1]
        facts = [
            ("step", last["step"]),
            ("loss", last["loss"]),
            ("learning rate", last.get("lr")),
            ("samples/s", last.get("samples_per_s")),
            ("memory (MB)", last.get("memory_mb")),
            ("skipped steps", last.get("skipped_steps")),
        ]
        parts.append(
            "<p>" + " &middot; ".join(f"{escape(k)} <b>{_number(v)}</b>" for k, v in facts if v is not None) + "</p>"
        )
    files = [
        p for p in (run_dir / "config.json", run_dir / "metrics.jsonl", run_dir / "data_stats.json") if p.is_file()
    ]
    if files:
        parts.append("<p>files: " + ", ".join(link(run_dir, p) for p in files) + "</p>")
    return "\n".join(parts)


def _models(run_dir: Path) -> str:
    rows = []
    for name, what in (("model", "EMA weights: what `gentron sample --model RUN` loads"), ("model_raw", "raw weights")):
        folder = run_dir / name
        if (folder / "config.json").is_file():
            extra = [link(run_dir, folder / f, f) for f in ("config.json", PIPELINE_FILE) if (folder / f).is_file()]
            rows.append([_cell(link(run_dir, folder, name + "/")), _cell(escape(what)), _cell(", ".join(extra))])
    checkpoints = ckpt.list_checkpoints(run_dir)
    out = ["<h2>Exported models</h2>"]
    out.append(
        _table(["folder", "what", "files"], rows)
        if rows
        else '<p class="muted">none yet (written at the first checkpoint)</p>'
    )
    if checkpoints:
        out.append("<p>checkpoints: " + ", ".join(link(run_dir, p, p.name) for p in checkpoints) + "</p>")
    return "\n".join(out)


def _curves(run_dir: Path) -> str:
    images = [
        (run_dir / name, alt) for name, alt in (("loss.png", "training loss"), ("eval.png", "evaluation metrics"))
    ]
    shown = [
        f'<a href="{href(run_dir, p)}"><img src="{href(run_dir, p)}" alt="{escape(alt)}"></a>'
        for p, alt in images
        if p.is_file()
    ]
    if not shown:
        return ""
    return '<h2>Curves</h2>\n<div class="curves">' + "".join(shown) + "</div>"


def _evaluation(run_dir: Path, metrics_path: Path) -> str:

    records = eval_records(metrics_path) if metrics_path.is_file() else []
    if not records:
        return ""
    names = list(dict.fromkeys(k for _, e in records for k in metric_values(e)))
    headers = ["step"] + [EVAL_LABELS.get(n, n.replace("probe_", "probe: ")) for n in names] + ["samples", "seconds"]
    rows = [
        [_cell(step, True)]
        + [_cell(e.get(n, ""), True) for n in names]
        + [_cell(e.get("samples", ""), True), _cell(e.get("seconds", ""), True)]
        for step, e in reversed(records)
    ]
    out = ["<h2>Evaluation</h2>", _table(headers, rows)]
    folder = latest_eval_folder(run_dir)
    if folder is not None:
        out.append(_samples(run_dir, folder))
    return "\n".join(out)


def _samples(run_dir: Path, folder: Path) -> str:
    """The samples of one `gentron sample`-format folder: images as PNG, videos as GIF, captioned with their prompts."""
    figures = []
    sidecars = sorted(folder.glob("*.json"))
    for sidecar in sidecars[:MAX_SAMPLES]:
        record = _read_json(sidecar)
        if not isinstance(record, dict) or not isinstance(record.get("files"), list):
            continue
        files = [folder / f for f in record["files"] if isinstance(f, str)]
        shown = next((f for f in files if f.suffix == ".gif" and f.is_file()), None) or next(
            (f for f in files if f.suffix == ".png" and f.is_file()), None
        )
        if shown is None:
            continue
        figures.append(
            f'<figure><a href="{href(run_dir, shown)}"><img src="{href(run_dir, shown)}" '
            f'alt="{escape(record.get("prompt", ""))}"></a>'
            f"<figcaption>{escape(record.get('prompt', ''))}</figcaption></figure>"
        )
    more = f" (the first {MAX_SAMPLES} of {len(sidecars)})" if len(sidecars) > MAX_SAMPLES else ""
    return (
        f"<p>samples of the latest evaluation{more}: {link(run_dir, folder)} (<code>gentron eval</code> reads this "
        "folder)</p>"
        f'<div class="samples">{"".join(figures)}</div>'
    )


def _previews(run_dir: Path) -> str:
    folder = run_dir / "previews"
    if not folder.is_dir():
        return ""
    gif, png = _latest_step_file(folder, ".gif"), _latest_step_file(folder, ".png")
    latest = [p for p in (gif, png) if p is not None]
    if not latest:
        return ""
    step = max(latest, key=lambda p: p.name).name.split(".")[0]
    shown = [p for p in latest if p.name.split(".")[0] == step]
    out = [
        f"<h2>Latest previews ({escape(step)})</h2>",
        "<p>"
        + "".join(
            f'<a href="{href(run_dir, p)}"><img class="preview" src="{href(run_dir, p)}" alt="preview '
            f'{escape(p.name)}"></a> '
            for p in shown
        )
        + "</p>",
    ]
    prompts = folder / "prompts.txt"
    if prompts.is_file():
        lines = prompts.read_text(encoding="utf-8", errors="replace").splitlines()
        # "k (W x H[, T frames]): caption": the size each prompt was sampled at, then the caption
        out.append("<ol start=0>" + "".join(f"<li>{escape(line.split(' ', 1)[-1])}</li>" for line in lines) + "</ol>")
    return "\n".join(out)


def _data(run_dir: Path) -> str:
    stats = _read_json(run_dir / "data_stats.json")
    if not isinstance(stats, dict) or not stats:
        return ""
    rows = []
    for kind, s in stats.items():
        if not isinstance(s, dict) or kind == "buckets":
            continue
        reasons = ", ".join(f"{escape(r)}: {n}" for r, n in (s.get("skipped_by_reason") or {}).items()) or "-"
        unreadable = ", ".join(f"{escape(r)}: {n}" for r, n in (s.get("unreadable_by_reason") or {}).items()) or "-"
        rows.append(
            [
                _cell(escape(kind)),
                _cell(escape(s.get("folder", ""))),
                _cell(s.get("shards", ""), True),
                _cell(s.get("samples", ""), True),
                _cell(s.get("skipped", ""), True),
                _cell(reasons),
                _cell(unreadable),
            ]
        )
    return (
        "<h2>Data</h2>\n"
        + _table(
            [
                "kind",
                "folder",
                "shards",
                "samples",
                "skipped when indexing",
                "skipped by reason",
                "unreadable when read",
            ],
            rows,
        )
        + f"<p>every skipped sample with its shard, key and reason: {link(run_dir, run_dir / 'data_stats.json')}</p>"
        + _buckets(stats.get("buckets"))
    )


def _buckets(table) -> str:
    """The bucket table (pipelines/data/bucket_plan.py): what each batch shape holds, and what was merged or
    dropped."""
    if not isinstance(table, dict) or not table.get("buckets"):
        return ""
    from pipelines.data.bucket_plan import TABLE_COLUMNS, table_rows

    rows, notes = table_rows(table)
    cells = [[_cell(v, True) if i >= 2 else _cell(escape(v)) for i, v in enumerate(row)] for row in rows]
    return (
        f"\n<h3>Buckets ({escape(table['bucket_batch'])} batches, global batch {table['global_batch']})</h3>\n"
        "<p>one latent shape per batch; sizes width x height, tokens per step, share of steps "
        "(<code>gentron buckets</code> prints the same table)</p>\n"
        + _table(list(TABLE_COLUMNS), cells)
        + ("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>" if notes else "")
    )


def _settings(run_dir: Path, config: dict) -> str:
    if not config:
        return ""
    rows = [[_cell(f"<code>{escape(k)}</code>"), _cell(escape(json.dumps(v)))] for k, v in config.items()]
    return (
        f"<h2>Settings</h2>\n<p>{link(run_dir, run_dir / 'config.json')}: <code>gentron train --config "
        "RUN/config.json</code> "
        "repeats or continues the run</p>\n" + _table(["setting", "value"], rows)
    )


# --------------------------------------------------------------------------- the page


def render_run_page(run_dir: str | Path) -> str:
    """The page's HTML, from the files in `run_dir`."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    config = config if isinstance(config, dict) else {}
    metrics_path = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    sections = [
        _header(run_dir, config, records),
        _curves(run_dir),
        _evaluation(run_dir, metrics_path),
        _previews(run_dir),
        _models(run_dir),
        _data(run_dir),
        _settings(run_dir, config),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>gentron run '
        f"{escape(run_dir.resolve().name)}</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_run_page(run_dir: str | Path) -> Path:
    """Rewrite RUN/index.html atomically (a reader never sees half a page)."""
    path = Path(run_dir) / PAGE
    atomic_write_bytes(path, render_run_page(run_dir).encode("utf-8"))
    return path
