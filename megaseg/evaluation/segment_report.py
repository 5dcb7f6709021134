"""`megaseg show-segments`: the paper's Fig. 2 as one self-contained HTML page (no network, no CDN, no fonts).

Each response is shown cut into the segments its reward model scored, each segment's background coloured by its
reward on a diverging scale (red below the centre, white at it, blue above), with the reward (raw and normalized),
its location p and its token count on hover; preference pairs show chosen and rejected side by side, each with its
e(x, y). Tokens after the last segment end (the EOS in segment modes, which is never scored) are shown uncoloured.

Inputs (one of):
- ``--reward-model RM --data FILE``: score a preference file now (eval-rm's scoring and its ``pair_details``);
- ``--details FILE``: the per-pair records `megaseg eval-rm --details FILE` wrote;
- ``--samples FILE``: a PPO run's ``samples.jsonl`` (one response per record, its rewarded pieces with raw and
  normalized reward and p).

Colour scale: ``--color normalized`` centres at 0 (a normalized reward is a z-score); ``--color raw`` centres at the
mean of all shown raw segment rewards (raw rewards of a location-biased model are rarely centred at 0). The scale's
half-width is the largest distance from the centre among the shown values. A button on the page switches between
the two when the normalized rewards exist (a few lines of inline script; the page reads the same without it).

In the DOM every scored segment is ``<span class="seg" data-raw=.. data-normalized=.. data-p=.. data-tokens=..>``
(values as Python's repr of the float: exact), every response ``<div class="response" data-reward=..>``.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from megaseg.atomic_io import write_text_atomic
from megaseg.config import MegasegConfig

COLOR_MODES = ("raw", "normalized")


@dataclass(frozen=True)
class ShownResponse:
    label: str                       # "chosen" / "rejected" / "response"
    reward: Optional[float]          # e(x, y)
    segments: list[dict[str, Any]]   # {"text", "raw", "normalized", "p", "num_tokens"}; raw None: unscored piece


@dataclass(frozen=True)
class ShownItem:
    title: str
    prompt: str
    responses: list[ShownResponse]


def items_from_details(records: Iterable[dict[str, Any]], source: str) -> list[ShownItem]:
    items = []
    for index, record in enumerate(records):
        try:
            responses = [ShownResponse(name, record[name]["reward"], record[name]["segments"])
                         for name in ("chosen", "rejected")]
            subset = f" [{record['subset']}]" if record.get("subset") else ""
            items.append(ShownItem(f"{record['id']}{subset}", record["prompt"], responses))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: record {index + 1} is not an eval-rm --details record (missing {error}); "
                             "write the file with `megaseg eval-rm --details FILE`") from None
    return items


def items_from_samples(records: Iterable[dict[str, Any]], source: str) -> list[ShownItem]:
    items = []
    for index, record in enumerate(records):
        try:
            segments = [dict(piece, num_tokens=piece.get("num_tokens")) for piece in record["segments"]]
            title = f"step {record['step']} / prompt {record['prompt_id']}" if "step" in record else \
                str(record.get("prompt_id", index + 1))
            items.append(ShownItem(title, record["prompt"], [ShownResponse("response", record.get("rm_score"),
                                                                           segments)]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: record {index + 1} is not a PPO samples.jsonl record (missing {error})") \
                from None
    return items


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON ({error})") from None
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


# --- colours ----------------------------------------------------------------------------------------------------

_LOW, _MID, _HIGH = (214, 47, 39), (255, 255, 255), (33, 102, 172)  # RdBu ends and white


def diverging_color(value: float, centre: float, half_width: float) -> str:
    """``rgb(...)`` of ``value`` on the red-white-blue scale: centre -> white, centre -/+ half_width -> red/blue."""
    t = 0.0 if half_width <= 0 else max(-1.0, min(1.0, (value - centre) / half_width))
    end = _HIGH if t > 0 else _LOW
    rgb = [round(m + abs(t) * (e - m)) for m, e in zip(_MID, end)]
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


@dataclass(frozen=True)
class ColorScale:
    centre: float
    half_width: float

    @classmethod
    def of(cls, values: Sequence[float], centred_at_zero: bool) -> "ColorScale":
        if not values:
            return cls(0.0, 1.0)
        centre = 0.0 if centred_at_zero else sum(values) / len(values)
        return cls(centre, max(abs(v - centre) for v in values) or 1.0)

    def color(self, value: float) -> str:
        return diverging_color(value, self.centre, self.half_width)


def _values(items: Sequence[ShownItem], key: str) -> list[float]:
    return [s[key] for item in items for r in item.responses for s in r.segments if s.get(key) is not None]


# --- HTML -------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 0 0 .4em 0; }
.item { border: 1px solid #ccc; border-radius: 6px; padding: .8em; margin: 1em 0; }
.prompt { white-space: pre-wrap; background: #f4f4f4; padding: .5em; border-radius: 4px; font-size: .9em; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 1em; margin-top: .6em; }
.response h3 { font-size: .95em; margin: .2em 0; }
.text { white-space: pre-wrap; line-height: 1.7; font-family: monospace; font-size: .9em; }
.seg { border-radius: 3px; padding: 1px 0; box-shadow: inset -1px 0 0 rgba(0,0,0,.35); background: var(--c-raw); }
body.mode-normalized .seg { background: var(--c-normalized, var(--c-raw)); }
.seg:hover { outline: 2px solid #000; }
.unscored { color: #999; }
.legend { display: flex; align-items: center; gap: .5em; font-size: .85em; }
.legend[hidden] { display: none; }
.bar { width: 240px; height: 14px; border: 1px solid #aaa;
       background: linear-gradient(to right, rgb(214,47,39), rgb(255,255,255), rgb(33,102,172)); }
"""

_SCRIPT = """
function setMode(mode) {
  document.body.className = 'mode-' + mode;
  document.querySelectorAll('.scale').forEach(function (e) { e.hidden = e.dataset.mode !== mode; });
}
"""


def _number(value: Optional[float]) -> str:
    return "" if value is None else repr(float(value))


def _tooltip(segment: dict[str, Any]) -> str:
    parts = [f"raw {segment['raw']:.4f}"]
    if segment.get("normalized") is not None:
        parts.append(f"normalized {segment['normalized']:.4f}")
    parts.append(f"p {segment['p']:.3f}" if segment.get("p") is not None else "p ?")
    if segment.get("num_tokens") is not None:
        parts.append(f"{segment['num_tokens']} tokens")
    return " | ".join(parts)


def _segment_html(segment: dict[str, Any], raw_scale: ColorScale, normalized_scale: Optional[ColorScale]) -> str:
    text = html.escape(segment["text"])
    if segment.get("raw") is None:
        return f'<span class="unscored" title="not scored (after the last segment end)">{text}</span>'
    style = f"--c-raw: {raw_scale.color(segment['raw'])};"
    if normalized_scale is not None and segment.get("normalized") is not None:
        style += f" --c-normalized: {normalized_scale.color(segment['normalized'])};"
    attributes = (f'data-raw="{_number(segment["raw"])}" data-normalized="{_number(segment.get("normalized"))}" '
                  f'data-p="{_number(segment.get("p"))}" data-tokens="{segment.get("num_tokens") or ""}"')
    return (f'<span class="seg" {attributes} style="{style}" title="{html.escape(_tooltip(segment))}">'
            f"{text}</span>")


def _response_html(response: ShownResponse, raw_scale: ColorScale, normalized_scale: Optional[ColorScale]) -> str:
    scored = [s for s in response.segments if s.get("raw") is not None]
    reward = "?" if response.reward is None else f"{response.reward:.4f}"
    body = "".join(_segment_html(s, raw_scale, normalized_scale) for s in response.segments)
    return (f'<div class="response" data-label="{response.label}" data-reward="{_number(response.reward)}">'
            f"<h3>{response.label}: e(x, y) = {reward} &middot; {len(scored)} segments</h3>"
            f'<div class="text">{body}</div></div>')


def _legend(mode: str, scale: ColorScale, hidden: bool) -> str:
    low, high = scale.centre - scale.half_width, scale.centre + scale.half_width
    return (f'<div class="legend scale" data-mode="{mode}"{" hidden" if hidden else ""}>{mode} reward: '
            f'<span>{low:.3f}</span><span class="bar"></span><span>{high:.3f}</span>'
            f"<span>(white = {scale.centre:.3f})</span></div>")


def render_report(items: Sequence[ShownItem], *, title: str, color: str = "raw") -> str:
    """The whole page as one string."""
    if color not in COLOR_MODES:
        raise ValueError(f"--color {color!r} is not one of {list(COLOR_MODES)}")
    raw_scale = ColorScale.of(_values(items, "raw"), centred_at_zero=False)
    normalized_values = _values(items, "normalized")
    normalized_scale = ColorScale.of(normalized_values, centred_at_zero=True) if normalized_values else None
    if color == "normalized" and normalized_scale is None:
        raise ValueError("--color normalized, but the records hold no normalized rewards (fit the reward model's "
                         "normalizer with `megaseg fit-normalizer`, or use --color raw)")
    controls = _legend("raw", raw_scale, hidden=color != "raw")
    if normalized_scale is not None:
        controls = ('<p><button onclick="setMode(\'raw\')">colour by raw reward</button> '
                    '<button onclick="setMode(\'normalized\')">colour by normalized reward</button></p>'
                    + controls + _legend("normalized", normalized_scale, hidden=color != "normalized"))
    body = []
    for item in items:
        responses = "".join(_response_html(r, raw_scale, normalized_scale) for r in item.responses)
        body.append(f'<div class="item"><h2>{html.escape(item.title)}</h2>'
                    f'<div class="prompt">{html.escape(item.prompt)}</div><div class="pair">{responses}</div></div>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>"
            f'<body class="mode-{color}"><h1>{html.escape(title)}</h1>{controls}{"".join(body)}</body></html>\n')


def write_report(path: str | Path, items: Sequence[ShownItem], *, title: str, color: str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(target, render_report(items, title=title, color=color))


def show_segments_command(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset(),
                          out: Optional[str] = None, samples: Optional[str] = None, details: Optional[str] = None,
                          color: str = "raw", max_items: Optional[int] = None) -> int:
    """Entry of `megaseg show-segments` (module docstring)."""
    from megaseg.parallel.collectives import is_rank_zero

    if out is None:
        raise ValueError("show-segments needs --out report.html")
    if color not in COLOR_MODES:
        raise ValueError(f"--color {color!r} is not one of {list(COLOR_MODES)}")
    scoring = config.rm.checkpoint is not None
    sources = [name for name, given in (("--reward-model/--data", scoring), ("--samples", samples is not None),
                                        ("--details", details is not None)) if given]
    if len(sources) != 1:
        raise ValueError("show-segments takes exactly one input: --reward-model RM --data FILE, --samples FILE "
                         f"(a PPO run's samples.jsonl) or --details FILE (from eval-rm); got {sources or 'none'}")
    if samples is not None:
        items, title = items_from_samples(read_jsonl(samples), samples), f"segment rewards: {samples}"
    elif details is not None:
        items, title = items_from_details(read_jsonl(details), details), f"segment rewards: {details}"
    else:
        from megaseg.scoring.evaluate import pair_details, score_evaluation_data

        scored, source, subsets = score_evaluation_data(config, explicit_keys)
        items = items_from_details(pair_details(scored, subsets), source) if is_rank_zero() else []
        title = f"segment rewards of {scored.rm_dir} on {source}"
    if max_items is not None:
        items = items[:max_items]
    if is_rank_zero():
        written = write_report(out, items, title=title, color=color)
        print(json.dumps({"report": str(written), "items": len(items),
                          "segments": sum(1 for i in items for r in i.responses for s in r.segments
                                          if s.get("raw") is not None)}), flush=True)
    return 0
